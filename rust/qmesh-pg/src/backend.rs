//! Typed messages a server sends, with the fields a proxy needs.
//!
//! Like [`crate::frontend`], parsing borrows from the body and checks counts
//! before allocating.

use crate::error::{malformed, Result};
use crate::reader::Reader;

/// Authentication request codes (the `i32` after an `R`).
pub mod auth {
    pub const OK: i32 = 0;
    pub const KERBEROS_V5: i32 = 2;
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    pub const MD5_PASSWORD: i32 = 5;
    pub const GSS: i32 = 7;
    pub const GSS_CONTINUE: i32 = 8;
    pub const SSPI: i32 = 9;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// An `R` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    /// The mechanisms the server offers, in its order of preference.
    Sasl {
        mechanisms: Vec<&'a str>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// Kerberos, GSSAPI, SSPI: nothing qmesh speaks.
    Other {
        code: i32,
        data: &'a [u8],
    },
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub table_oid: u32,
    pub column: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
    pub format: i16,
}

/// A parsed backend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend<'a> {
    Authentication(Authentication<'a>),
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    /// The cancel key: 4 bytes of secret in protocol 3.0, up to 256 in 3.2.
    BackendKeyData {
        pid: u32,
        secret: &'a [u8],
    },
    /// `status`: b'I' idle, b'T' in a transaction, b'E' in a failed one.
    ReadyForQuery {
        status: u8,
    },
    RowDescription(Vec<Field<'a>>),
    DataRow(Vec<Option<&'a [u8]>>),
    CommandComplete {
        tag: &'a [u8],
    },
    /// Fields by their one-byte code (b'S' severity, b'C' SQLSTATE, b'M'
    /// message, ...), in the order sent.
    ErrorResponse(Vec<(u8, &'a [u8])>),
    NoticeResponse(Vec<(u8, &'a [u8])>),
    NotificationResponse {
        pid: u32,
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// `G`, `H`, `W`: overall format (0 text, 1 binary) and per-column formats.
    CopyInResponse {
        format: u8,
        column_formats: Vec<i16>,
    },
    CopyOutResponse {
        format: u8,
        column_formats: Vec<i16>,
    },
    CopyBothResponse {
        format: u8,
        column_formats: Vec<i16>,
    },
    CopyData(&'a [u8]),
    CopyDone,
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    PortalSuspended,
    EmptyQueryResponse,
    ParameterDescription(Vec<u32>),
    FunctionCallResponse(Option<&'a [u8]>),
    NegotiateProtocolVersion {
        newest_minor: u32,
        unrecognized: Vec<&'a str>,
    },
}

impl<'a> Backend<'a> {
    /// Parse the body of a message of type `tag`.
    pub fn parse(tag: u8, body: &'a [u8]) -> Result<Self> {
        let msg = match tag {
            b'R' => Backend::Authentication(authentication(body)?),
            b'S' => {
                let (name, value) = parameter_status(body)?;
                Backend::ParameterStatus { name, value }
            }
            b'K' => {
                let (pid, secret) = backend_key_data(body)?;
                Backend::BackendKeyData { pid, secret }
            }
            b'Z' => Backend::ReadyForQuery {
                status: ready_for_query(body)?,
            },
            b'T' => {
                let mut r = Reader::new(body, "RowDescription");
                // Each field takes at least 19 bytes (an empty name + 18).
                let n = r.count_i16("field count", 19)?;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    fields.push(Field {
                        name: r.cstr("field name")?,
                        table_oid: r.u32("table oid")?,
                        column: r.i16("column number")?,
                        type_oid: r.u32("type oid")?,
                        type_size: r.i16("type size")?,
                        type_modifier: r.i32("type modifier")?,
                        format: r.i16("format code")?,
                    });
                }
                r.finish()?;
                Backend::RowDescription(fields)
            }
            b'D' => {
                let mut r = Reader::new(body, "DataRow");
                let n = r.count_i16("column count", 4)?;
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(r.value("column value")?);
                }
                r.finish()?;
                Backend::DataRow(values)
            }
            b'C' => Backend::CommandComplete {
                tag: command_complete(body)?,
            },
            b'E' => Backend::ErrorResponse(notice_fields(body)?),
            b'N' => Backend::NoticeResponse(notice_fields(body)?),
            b'A' => {
                let (pid, channel, payload) = notification(body)?;
                Backend::NotificationResponse {
                    pid,
                    channel,
                    payload,
                }
            }
            b'G' | b'H' | b'W' => {
                let (format, column_formats) = copy_response(body)?;
                match tag {
                    b'G' => Backend::CopyInResponse {
                        format,
                        column_formats,
                    },
                    b'H' => Backend::CopyOutResponse {
                        format,
                        column_formats,
                    },
                    _ => Backend::CopyBothResponse {
                        format,
                        column_formats,
                    },
                }
            }
            b'd' => Backend::CopyData(body),
            b'c' | b'1' | b'2' | b'3' | b'n' | b's' | b'I' => {
                Reader::new(body, "message without a body").finish()?;
                match tag {
                    b'c' => Backend::CopyDone,
                    b'1' => Backend::ParseComplete,
                    b'2' => Backend::BindComplete,
                    b'3' => Backend::CloseComplete,
                    b'n' => Backend::NoData,
                    b's' => Backend::PortalSuspended,
                    _ => Backend::EmptyQueryResponse,
                }
            }
            b't' => {
                let mut r = Reader::new(body, "ParameterDescription");
                let n = r.count_i16("parameter count", 4)?;
                let mut types = Vec::with_capacity(n);
                for _ in 0..n {
                    types.push(r.u32("parameter type")?);
                }
                r.finish()?;
                Backend::ParameterDescription(types)
            }
            b'V' => {
                let mut r = Reader::new(body, "FunctionCallResponse");
                let value = r.value("result")?;
                r.finish()?;
                Backend::FunctionCallResponse(value)
            }
            b'v' => {
                let (newest_minor, unrecognized) = negotiate_protocol_version(body)?;
                Backend::NegotiateProtocolVersion {
                    newest_minor,
                    unrecognized,
                }
            }
            other => {
                return Err(malformed(format!(
                    "invalid backend message type {}",
                    crate::scanner::describe_tag(other)
                )))
            }
        };
        Ok(msg)
    }
}

/// The body of an `R` message.
pub fn authentication(body: &[u8]) -> Result<Authentication<'_>> {
    let mut r = Reader::new(body, "Authentication");
    let code = r.i32("request code")?;
    let out = match code {
        auth::OK | auth::CLEARTEXT_PASSWORD => {
            r.finish()?;
            if code == auth::OK {
                Authentication::Ok
            } else {
                Authentication::CleartextPassword
            }
        }
        auth::MD5_PASSWORD => {
            let salt = r.bytes(4, "salt")?;
            r.finish()?;
            Authentication::Md5Password {
                salt: [salt[0], salt[1], salt[2], salt[3]],
            }
        }
        auth::SASL => {
            let mut mechanisms = Vec::new();
            loop {
                let name = r.cstr_utf8("mechanism")?;
                if name.is_empty() {
                    break;
                }
                mechanisms.push(name);
            }
            r.finish()?;
            Authentication::Sasl { mechanisms }
        }
        auth::SASL_CONTINUE => Authentication::SaslContinue(r.rest()),
        auth::SASL_FINAL => Authentication::SaslFinal(r.rest()),
        code => Authentication::Other {
            code,
            data: r.rest(),
        },
    };
    Ok(out)
}

pub fn parameter_status(body: &[u8]) -> Result<(&[u8], &[u8])> {
    let mut r = Reader::new(body, "ParameterStatus");
    let name = r.cstr("name")?;
    let value = r.cstr("value")?;
    r.finish()?;
    Ok((name, value))
}

pub fn backend_key_data(body: &[u8]) -> Result<(u32, &[u8])> {
    let mut r = Reader::new(body, "BackendKeyData");
    let pid = r.u32("process id")?;
    let secret = r.rest();
    if secret.len() < 4 || secret.len() > crate::startup::MAX_CANCEL_KEY {
        return Err(malformed(format!(
            "BackendKeyData: secret key of {} bytes",
            secret.len()
        )));
    }
    Ok((pid, secret))
}

pub fn ready_for_query(body: &[u8]) -> Result<u8> {
    let mut r = Reader::new(body, "ReadyForQuery");
    let status = r.u8("transaction status")?;
    r.finish()?;
    if !matches!(status, b'I' | b'T' | b'E') {
        return Err(malformed("ReadyForQuery: unknown transaction status"));
    }
    Ok(status)
}

pub fn command_complete(body: &[u8]) -> Result<&[u8]> {
    let mut r = Reader::new(body, "CommandComplete");
    let tag = r.cstr("command tag")?;
    r.finish()?;
    Ok(tag)
}

/// The rows a command tag reports: `SELECT 5`, `INSERT 0 5`, `UPDATE 5`,
/// `DELETE 5`, `MERGE 5`, `FETCH 5`, `MOVE 5`, `COPY 5`. `None` for tags
/// that carry no count (`BEGIN`, `CREATE TABLE`, ...).
pub fn command_rows(tag: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(tag).ok()?;
    let mut words = text.split(' ');
    let command = words.next()?;
    let counted = matches!(
        command,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY"
    );
    if !counted {
        return None;
    }
    text.rsplit(' ').next()?.parse().ok()
}

/// The value of field `code` of an ErrorResponse or NoticeResponse body, or
/// of its first bytes: a relay reads a long error by its start, where
/// PostgreSQL puts the severity and the SQLSTATE (before the message,
/// whose length has no bound). None if the field is not wholly there.
pub fn notice_field(body: &[u8], code: u8) -> Option<&[u8]> {
    let mut rest = body;
    while let Some((&field, value)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = value.iter().position(|&b| b == 0)?;
        if field == code {
            return Some(&value[..end]);
        }
        rest = &value[end + 1..];
    }
    None
}

/// The fields of an ErrorResponse or NoticeResponse body.
pub fn notice_fields(body: &[u8]) -> Result<Vec<(u8, &[u8])>> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut fields = Vec::new();
    loop {
        let code = r.u8("field code")?;
        if code == 0 {
            break;
        }
        fields.push((code, r.cstr("field value")?));
    }
    r.finish()?;
    Ok(fields)
}

pub fn notification(body: &[u8]) -> Result<(u32, &[u8], &[u8])> {
    let mut r = Reader::new(body, "NotificationResponse");
    let pid = r.u32("process id")?;
    let channel = r.cstr("channel")?;
    let payload = r.cstr("payload")?;
    r.finish()?;
    Ok((pid, channel, payload))
}

pub fn copy_response(body: &[u8]) -> Result<(u8, Vec<i16>)> {
    let mut r = Reader::new(body, "CopyResponse");
    let format = r.u8("format")?;
    let n = r.count_i16("column count", 2)?;
    let mut formats = Vec::with_capacity(n);
    for _ in 0..n {
        formats.push(r.i16("column format")?);
    }
    r.finish()?;
    Ok((format, formats))
}

pub fn negotiate_protocol_version(body: &[u8]) -> Result<(u32, Vec<&str>)> {
    let mut r = Reader::new(body, "NegotiateProtocolVersion");
    let newest = r.u32("newest minor version")?;
    let n = r.i32("option count")?;
    let n = r.check_count(n as i64, "option count", 1)?;
    let mut options = Vec::with_capacity(n);
    for _ in 0..n {
        options.push(r.cstr_utf8("option")?);
    }
    r.finish()?;
    Ok((newest, options))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    #[test]
    fn command_tags() {
        assert_eq!(command_rows(b"SELECT 12"), Some(12));
        assert_eq!(command_rows(b"INSERT 0 3"), Some(3));
        assert_eq!(command_rows(b"COPY 100000"), Some(100_000));
        assert_eq!(command_rows(b"BEGIN"), None);
        assert_eq!(command_rows(b"CREATE TABLE"), None);
        assert_eq!(command_rows(b"SELECT"), None);
    }

    #[test]
    fn error_fields_round_trip() {
        let raw = encode::error_response(
            b'E',
            &[
                (b'S', "ERROR"),
                (b'C', "28P01"),
                (b'M', "password authentication failed"),
            ],
        )
        .unwrap();
        let fields = notice_fields(&raw[5..]).unwrap();
        assert_eq!(fields[1], (b'C', &b"28P01"[..]));
        assert!(notice_fields(b"Sx\0").is_err()); // no terminator
    }

    #[test]
    fn a_notice_field_is_read_from_the_start_of_a_message() {
        // A prefix: the fields wholly in it, and none after the terminator.
        assert_eq!(
            notice_field(b"SERROR\0C22P02\0Minvalid inp", b'C'),
            Some(&b"22P02"[..])
        );
        assert_eq!(notice_field(b"SERROR\0C22P02\0Minvalid inp", b'M'), None);
        assert_eq!(notice_field(b"SERROR\0C22P", b'C'), None);
        assert_eq!(notice_field(b"SERROR\0\0C22P02\0", b'C'), None);
        assert_eq!(notice_field(b"", b'S'), None);
    }

    #[test]
    fn authentication_kinds() {
        let mut sasl = 10i32.to_be_bytes().to_vec();
        sasl.extend(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            authentication(&sasl).unwrap(),
            Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
            }
        );
        let mut md5 = 5i32.to_be_bytes().to_vec();
        md5.extend([1, 2, 3, 4]);
        assert_eq!(
            authentication(&md5).unwrap(),
            Authentication::Md5Password { salt: [1, 2, 3, 4] }
        );
        assert_eq!(authentication(&[0, 0, 0, 0]).unwrap(), Authentication::Ok);
        assert!(authentication(&[0, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn rows_and_descriptions() {
        let mut d = 2i16.to_be_bytes().to_vec();
        d.extend(3i32.to_be_bytes());
        d.extend(b"abc");
        d.extend((-1i32).to_be_bytes());
        assert_eq!(
            Backend::parse(b'D', &d).unwrap(),
            Backend::DataRow(vec![Some(&b"abc"[..]), None])
        );
        let mut t = 1i16.to_be_bytes().to_vec();
        t.extend(b"id\0");
        t.extend([0u8; 18]);
        assert!(matches!(
            Backend::parse(b'T', &t).unwrap(),
            Backend::RowDescription(f) if f.len() == 1 && f[0].name == b"id"
        ));
        // 1000 fields claimed in 20 bytes.
        let mut t = 1000i16.to_be_bytes().to_vec();
        t.extend([0u8; 20]);
        assert!(Backend::parse(b'T', &t).is_err());
        assert_eq!(ready_for_query(b"T").unwrap(), b'T');
        assert!(ready_for_query(b"X").is_err());
        let (pid, secret) = backend_key_data(&[0, 0, 1, 0, 9, 9, 9, 9]).unwrap();
        assert_eq!((pid, secret), (256, &[9u8, 9, 9, 9][..]));
    }
}
