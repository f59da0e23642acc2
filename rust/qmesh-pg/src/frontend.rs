//! Typed messages a client sends (after the startup packet).
//!
//! [`Frontend::parse`] takes a type byte and a body, borrows every field
//! from the body and checks every count against the bytes that remain
//! before allocating a `Vec` for it. Strings are returned as raw bytes: they
//! are in the client's encoding, which need not be UTF-8.

use crate::error::{malformed, Result};
use crate::reader::Reader;

/// A parsed frontend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    /// `Q`: one or more SQL statements, simple protocol.
    Query { sql: &'a [u8] },
    /// `P`: prepare `sql` as statement `name` ("" = unnamed).
    Parse {
        name: &'a [u8],
        sql: &'a [u8],
        param_types: Vec<u32>,
    },
    /// `B`: bind parameters to statement `statement`, creating `portal`.
    Bind(Bind<'a>),
    /// `D`: describe a statement (`kind` b'S') or a portal (b'P').
    Describe { kind: u8, name: &'a [u8] },
    /// `E`: run `portal`, returning at most `max_rows` rows (0 = all).
    Execute { portal: &'a [u8], max_rows: i32 },
    /// `C`: close a statement (b'S') or a portal (b'P').
    Close { kind: u8, name: &'a [u8] },
    /// `S`
    Sync,
    /// `H`
    Flush,
    /// `d`
    CopyData(&'a [u8]),
    /// `c`
    CopyDone,
    /// `f`
    CopyFail { message: &'a [u8] },
    /// `X`
    Terminate,
    /// `p`: PasswordMessage, SASLInitialResponse, SASLResponse or
    /// GSSResponse; which one depends on the authentication exchange, so
    /// the body is left to [`sasl_initial_response`] and friends.
    AuthResponse(&'a [u8]),
    /// `F`: the fast-path function call.
    FunctionCall {
        oid: u32,
        arg_formats: Vec<i16>,
        args: Vec<Option<&'a [u8]>>,
        result_format: i16,
    },
}

/// The fields of a Bind message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<&'a [u8]>>,
    pub result_formats: Vec<i16>,
}

impl<'a> Frontend<'a> {
    /// Parse the body of a message of type `tag`.
    pub fn parse(tag: u8, body: &'a [u8]) -> Result<Self> {
        let msg = match tag {
            b'Q' => {
                let mut r = Reader::new(body, "Query");
                let sql = r.cstr("query")?;
                r.finish()?;
                Frontend::Query { sql }
            }
            b'P' => {
                let mut r = Reader::new(body, "Parse");
                let name = r.cstr("statement name")?;
                let sql = r.cstr("query")?;
                let n = r.count_i16("parameter type count", 4)?;
                let mut param_types = Vec::with_capacity(n);
                for _ in 0..n {
                    param_types.push(r.u32("parameter type")?);
                }
                r.finish()?;
                Frontend::Parse {
                    name,
                    sql,
                    param_types,
                }
            }
            b'B' => Frontend::Bind(parse_bind(body)?),
            b'D' | b'C' => {
                let what = if tag == b'D' { "Describe" } else { "Close" };
                let mut r = Reader::new(body, what);
                let kind = r.u8("kind")?;
                if kind != b'S' && kind != b'P' {
                    return Err(malformed(format!("{what}: kind must be 'S' or 'P'")));
                }
                let name = r.cstr("name")?;
                r.finish()?;
                if tag == b'D' {
                    Frontend::Describe { kind, name }
                } else {
                    Frontend::Close { kind, name }
                }
            }
            b'E' => {
                let mut r = Reader::new(body, "Execute");
                let portal = r.cstr("portal name")?;
                let max_rows = r.i32("row limit")?;
                r.finish()?;
                Frontend::Execute { portal, max_rows }
            }
            b'S' | b'H' | b'c' | b'X' => {
                Reader::new(body, "message without a body").finish()?;
                match tag {
                    b'S' => Frontend::Sync,
                    b'H' => Frontend::Flush,
                    b'c' => Frontend::CopyDone,
                    _ => Frontend::Terminate,
                }
            }
            b'd' => Frontend::CopyData(body),
            b'f' => {
                let mut r = Reader::new(body, "CopyFail");
                let message = r.cstr("message")?;
                r.finish()?;
                Frontend::CopyFail { message }
            }
            b'p' => Frontend::AuthResponse(body),
            b'F' => {
                let mut r = Reader::new(body, "FunctionCall");
                let oid = r.u32("function oid")?;
                let arg_formats = formats(&mut r, "argument format count")?;
                let n = r.count_i16("argument count", 4)?;
                let mut args = Vec::with_capacity(n);
                for _ in 0..n {
                    args.push(r.value("argument")?);
                }
                let result_format = r.i16("result format")?;
                r.finish()?;
                Frontend::FunctionCall {
                    oid,
                    arg_formats,
                    args,
                    result_format,
                }
            }
            other => {
                return Err(malformed(format!(
                    "invalid frontend message type {}",
                    crate::scanner::describe_tag(other)
                )))
            }
        };
        Ok(msg)
    }
}

fn formats(r: &mut Reader<'_>, field: &str) -> Result<Vec<i16>> {
    let n = r.count_i16(field, 2)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(r.i16("format code")?);
    }
    Ok(out)
}

fn parse_bind(body: &[u8]) -> Result<Bind<'_>> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr("portal name")?;
    let statement = r.cstr("statement name")?;
    let param_formats = formats(&mut r, "parameter format count")?;
    let n = r.count_i16("parameter count", 4)?;
    let mut params = Vec::with_capacity(n);
    for _ in 0..n {
        params.push(r.value("parameter")?);
    }
    let result_formats = formats(&mut r, "result format count")?;
    r.finish()?;
    Ok(Bind {
        portal,
        statement,
        param_formats,
        params,
        result_formats,
    })
}

/// The portal and statement names at the front of a Bind body. Works on a
/// peek prefix too (the parameters that follow may be cut off); `None` if
/// the names themselves are cut off.
pub fn bind_names(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr("portal name").ok()?;
    let statement = r.cstr("statement name").ok()?;
    Some((portal, statement))
}

/// SASLInitialResponse: the mechanism and the client's first message
/// (`None` when the client sent length -1).
pub fn sasl_initial_response(body: &[u8]) -> Result<(&str, Option<&[u8]>)> {
    let mut r = Reader::new(body, "SASLInitialResponse");
    let mechanism = r.cstr_utf8("mechanism")?;
    let data = r.value("initial response")?;
    r.finish()?;
    Ok((mechanism, data))
}

/// PasswordMessage: the password (cleartext or MD5 hash) without its NUL.
pub fn password_message(body: &[u8]) -> Result<&[u8]> {
    let mut r = Reader::new(body, "PasswordMessage");
    let password = r.cstr("password")?;
    r.finish()?;
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    fn body(raw: &[u8]) -> &[u8] {
        &raw[5..]
    }

    #[test]
    fn query_parse_bind_execute() {
        let q = encode::query(b"select 1").unwrap();
        assert_eq!(
            Frontend::parse(b'Q', body(&q)).unwrap(),
            Frontend::Query { sql: b"select 1" }
        );
        let p = encode::parse(b"s1", b"select $1", &[23]).unwrap();
        assert_eq!(
            Frontend::parse(b'P', body(&p)).unwrap(),
            Frontend::Parse {
                name: b"s1",
                sql: b"select $1",
                param_types: vec![23]
            }
        );
        let b = encode::bind(b"p1", b"s1", &[1], &[Some(b"\0\0\0\x07"), None], &[1]).unwrap();
        let parsed = Frontend::parse(b'B', body(&b)).unwrap();
        assert_eq!(
            parsed,
            Frontend::Bind(Bind {
                portal: b"p1",
                statement: b"s1",
                param_formats: vec![1],
                params: vec![Some(&b"\0\0\0\x07"[..]), None],
                result_formats: vec![1],
            })
        );
        assert_eq!(bind_names(&body(&b)[..6]), Some((&b"p1"[..], &b"s1"[..])));
        assert_eq!(bind_names(&body(&b)[..4]), None);
        let e = encode::execute(b"p1", 10).unwrap();
        assert_eq!(
            Frontend::parse(b'E', body(&e)).unwrap(),
            Frontend::Execute {
                portal: b"p1",
                max_rows: 10
            }
        );
    }

    #[test]
    fn counts_are_checked_before_allocating() {
        // Parse claiming 32767 parameter types in a few bytes.
        let mut b = b"s\0q\0".to_vec();
        b.extend(32767i16.to_be_bytes());
        assert!(Frontend::parse(b'P', &b).is_err());
        // Bind with a negative parameter count.
        let mut b = b"\0\0\0\0".to_vec();
        b.extend((-1i16).to_be_bytes());
        assert!(Frontend::parse(b'B', &b).is_err());
        // A parameter longer than the message.
        let mut b = b"\0\0\0\0\0\x01".to_vec();
        b.extend(1000i32.to_be_bytes());
        assert!(Frontend::parse(b'B', &b).is_err());
    }

    #[test]
    fn leftovers_and_bad_kinds() {
        assert!(Frontend::parse(b'S', b"x").is_err());
        assert!(Frontend::parse(b'D', b"Xname\0").is_err());
        assert!(Frontend::parse(b'Q', b"no nul").is_err());
        assert_eq!(
            Frontend::parse(b'C', b"Sst\0").unwrap(),
            Frontend::Close {
                kind: b'S',
                name: b"st"
            }
        );
    }

    #[test]
    fn sasl_and_function_call() {
        let raw = encode::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc").unwrap();
        assert_eq!(
            sasl_initial_response(body(&raw)).unwrap(),
            ("SCRAM-SHA-256", Some(&b"n,,n=,r=abc"[..]))
        );
        let mut f = 2078u32.to_be_bytes().to_vec();
        f.extend([0, 0, 0, 1, 0, 0, 0, 2, b'o', b'n', 0, 0]);
        assert_eq!(
            Frontend::parse(b'F', &f).unwrap(),
            Frontend::FunctionCall {
                oid: 2078,
                arg_formats: vec![],
                args: vec![Some(b"on")],
                result_format: 0
            }
        );
    }
}
