//! Building messages. Every builder refuses what the protocol cannot carry
//! (a NUL inside a string, a message over 2 GiB) with
//! [`Error::InvalidArgument`], rather than sending something the peer would
//! misread.

use crate::error::{Error, Result};
use crate::startup::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};

/// Appends fields to a message body.
#[derive(Debug, Default)]
pub struct Body(Vec<u8>);

impl Body {
    pub fn new() -> Self {
        Body(Vec::new())
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }

    /// A string and its NUL terminator; refuses a string that contains NUL.
    pub fn cstr(&mut self, v: &[u8]) -> Result<&mut Self> {
        if v.contains(&0) {
            return Err(Error::InvalidArgument(
                "a protocol string may not contain a NUL byte".into(),
            ));
        }
        self.0.extend_from_slice(v);
        self.0.push(0);
        Ok(self)
    }

    /// A count as the protocol's `i16`.
    pub fn count16(&mut self, n: usize) -> Result<&mut Self> {
        let n = i16::try_from(n)
            .map_err(|_| Error::InvalidArgument(format!("count {n} does not fit in an i16")))?;
        Ok(self.i16(n))
    }

    /// A length-prefixed value; `None` is NULL (length -1).
    pub fn value(&mut self, v: Option<&[u8]>) -> Result<&mut Self> {
        match v {
            None => Ok(self.i32(-1)),
            Some(v) => {
                let n = i32::try_from(v.len()).map_err(|_| {
                    Error::InvalidArgument("a value over 2 GiB cannot be sent".into())
                })?;
                Ok(self.i32(n).bytes(v))
            }
        }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

/// A typed message: `tag`, the length, `body`.
pub fn message(tag: u8, body: &[u8]) -> Result<Vec<u8>> {
    let length = body
        .len()
        .checked_add(4)
        .and_then(|n| i32::try_from(n).ok())
        .ok_or_else(|| Error::InvalidArgument("message body over 2 GiB".into()))?;
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

fn untagged(code: u32, rest: &[u8]) -> Vec<u8> {
    let length = (8 + rest.len()) as u32;
    let mut out = Vec::with_capacity(length as usize);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(rest);
    out
}

/// A StartupMessage for protocol `version` with `params` in order.
pub fn startup_message(version: u32, params: &[(&str, &str)]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    for (name, value) in params {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "empty startup parameter name".into(),
            ));
        }
        body.cstr(name.as_bytes())?.cstr(value.as_bytes())?;
    }
    body.u8(0);
    let rest = body.into_inner();
    if rest.len() + 8 > crate::startup::MAX_STARTUP_PACKET {
        return Err(Error::InvalidArgument(
            "startup packet over 10000 bytes".into(),
        ));
    }
    Ok(untagged(version, &rest))
}

pub fn ssl_request() -> Vec<u8> {
    untagged(SSL_REQUEST_CODE, &[])
}

pub fn gssenc_request() -> Vec<u8> {
    untagged(GSSENC_REQUEST_CODE, &[])
}

pub fn cancel_request(pid: u32, secret: &[u8]) -> Result<Vec<u8>> {
    if secret.len() < 4 || secret.len() > crate::startup::MAX_CANCEL_KEY {
        return Err(Error::InvalidArgument(format!(
            "a cancel key has 4..=256 bytes, got {}",
            secret.len()
        )));
    }
    let mut rest = pid.to_be_bytes().to_vec();
    rest.extend_from_slice(secret);
    Ok(untagged(CANCEL_REQUEST_CODE, &rest))
}

/// ErrorResponse (`tag` b'E') or NoticeResponse (b'N') with `fields`.
pub fn error_response(tag: u8, fields: &[(u8, &str)]) -> Result<Vec<u8>> {
    if tag != b'E' && tag != b'N' {
        return Err(Error::InvalidArgument("tag must be 'E' or 'N'".into()));
    }
    let mut body = Body::new();
    for (code, value) in fields {
        if *code == 0 {
            return Err(Error::InvalidArgument("field code 0 ends the list".into()));
        }
        body.u8(*code).cstr(value.as_bytes())?;
    }
    body.u8(0);
    message(tag, &body.into_inner())
}

pub fn query(sql: &[u8]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.cstr(sql)?;
    message(b'Q', &body.into_inner())
}

pub fn parse(name: &[u8], sql: &[u8], param_types: &[u32]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.cstr(name)?.cstr(sql)?.count16(param_types.len())?;
    for t in param_types {
        body.i32(*t as i32);
    }
    message(b'P', &body.into_inner())
}

pub fn bind(
    portal: &[u8],
    statement: &[u8],
    param_formats: &[i16],
    params: &[Option<&[u8]>],
    result_formats: &[i16],
) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.cstr(portal)?.cstr(statement)?;
    body.count16(param_formats.len())?;
    for f in param_formats {
        body.i16(*f);
    }
    body.count16(params.len())?;
    for p in params {
        body.value(*p)?;
    }
    body.count16(result_formats.len())?;
    for f in result_formats {
        body.i16(*f);
    }
    message(b'B', &body.into_inner())
}

pub fn execute(portal: &[u8], max_rows: i32) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.cstr(portal)?.i32(max_rows);
    message(b'E', &body.into_inner())
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.cstr(mechanism.as_bytes())?.value(Some(data))?;
    message(b'p', &body.into_inner())
}

/// The `R` message with `code` and `data` (e.g. SASL, SASLContinue).
pub fn authentication(code: i32, data: &[u8]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.i32(code).bytes(data);
    message(b'R', &body.into_inner())
}

pub fn backend_key_data(pid: u32, secret: &[u8]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.i32(pid as i32).bytes(secret);
    message(b'K', &body.into_inner())
}

pub fn parameter_status(name: &[u8], value: &[u8]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.cstr(name)?.cstr(value)?;
    message(b'S', &body.into_inner())
}

pub fn ready_for_query(status: u8) -> Result<Vec<u8>> {
    if !matches!(status, b'I' | b'T' | b'E') {
        return Err(Error::InvalidArgument(
            "status must be 'I', 'T' or 'E'".into(),
        ));
    }
    message(b'Z', &[status])
}

pub fn negotiate_protocol_version(newest_minor: u32, unrecognized: &[&str]) -> Result<Vec<u8>> {
    let mut body = Body::new();
    body.i32(newest_minor as i32).i32(unrecognized.len() as i32);
    for option in unrecognized {
        body.cstr(option.as_bytes())?;
    }
    message(b'v', &body.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_the_protocol_cannot_carry() {
        assert!(query(b"a\0b").is_err());
        assert!(startup_message(3 << 16, &[("", "x")]).is_err());
        assert!(error_response(b'Z', &[]).is_err());
        assert!(cancel_request(1, &[1, 2]).is_err());
        assert!(ready_for_query(b'x').is_err());
        let long = "x".repeat(10_000);
        assert!(startup_message(3 << 16, &[("user", &long)]).is_err());
    }

    #[test]
    fn shapes() {
        assert_eq!(ssl_request(), [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
        assert_eq!(message(b'S', b"").unwrap(), [b'S', 0, 0, 0, 4]);
        assert_eq!(ready_for_query(b'I').unwrap(), [b'Z', 0, 0, 0, 5, b'I']);
    }
}
