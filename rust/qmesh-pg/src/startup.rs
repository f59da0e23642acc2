//! The untyped packets a client sends before its first typed message:
//! StartupMessage, SSLRequest, GSSENCRequest and CancelRequest.
//!
//! Each is `i32 length` (itself included) then `i32 code`; what follows
//! depends on the code. The length is checked against the caller's limit as
//! soon as its four bytes are in, before anything else is awaited.

use crate::error::{malformed, Error, Result};
use crate::reader::Reader;

/// Request code of SSLRequest (`1234 << 16 | 5679`).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of GSSENCRequest (`1234 << 16 | 5680`).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Request code of CancelRequest (`1234 << 16 | 5678`).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0, the version every server since 7.4 speaks.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// PostgreSQL's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// The longest cancel key a CancelRequest may carry (protocol 3.2 allows
/// 256 bytes; 3.0 uses exactly 4).
pub const MAX_CANCEL_KEY: usize = 256;

/// One startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup<'a> {
    /// The client asks for TLS; answer one byte, `S` or `N`.
    SslRequest,
    /// The client asks for GSSAPI encryption; answer `G` or `N`.
    GssEncRequest,
    /// Cancel the query running on the backend with this key.
    CancelRequest { pid: u32, secret: &'a [u8] },
    /// The session's parameters (`user`, `database`, `options`, GUCs, and
    /// `_pq_.` protocol extensions), in the order sent.
    StartupMessage {
        version: u32,
        params: Vec<(&'a str, &'a str)>,
    },
}

/// Parse the packet at the front of `buf`.
///
/// `Ok(None)`: incomplete, feed more bytes. `Ok(Some((packet, used)))`: the
/// packet took the first `used` bytes. Errors: [`Error::TooLarge`] from the
/// length alone, [`Error::Malformed`] for a bad length, an unknown request
/// code, a protocol major version other than 3, or a parameter list that is
/// not NUL-terminated UTF-8 name/value pairs.
pub fn parse_startup(buf: &[u8], max_length: usize) -> Result<Option<(Startup<'_>, usize)>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if length > max_length {
        return Err(Error::TooLarge {
            length: length as u64,
            limit: max_length,
        });
    }
    if length < 8 {
        return Err(malformed(format!(
            "startup packet length {length} is below 8"
        )));
    }
    if buf.len() < length {
        return Ok(None);
    }
    let mut r = Reader::new(&buf[4..length], "startup packet");
    let code = r.u32("request code")?;
    let packet = match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            r.finish()?;
            if code == SSL_REQUEST_CODE {
                Startup::SslRequest
            } else {
                Startup::GssEncRequest
            }
        }
        CANCEL_REQUEST_CODE => {
            let pid = r.u32("process id")?;
            let secret = r.rest();
            if secret.len() < 4 || secret.len() > MAX_CANCEL_KEY {
                return Err(malformed(format!(
                    "cancel request key of {} bytes (expected 4..={MAX_CANCEL_KEY})",
                    secret.len()
                )));
            }
            Startup::CancelRequest { pid, secret }
        }
        version if version >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let name = r.cstr_utf8("parameter name")?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr_utf8("parameter value")?;
                params.push((name, value));
            }
            r.finish()?;
            Startup::StartupMessage { version, params }
        }
        other => {
            return Err(malformed(format!(
                "unsupported protocol version or request code {}.{}",
                other >> 16,
                other & 0xffff
            )))
        }
    };
    Ok(Some((packet, length)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    #[test]
    fn startup_message_round_trips() {
        let raw = encode::startup_message(
            PROTOCOL_3_0,
            &[
                ("user", "app"),
                ("database", "db"),
                ("application_name", "é"),
            ],
        )
        .unwrap();
        let (packet, used) = parse_startup(&raw, MAX_STARTUP_PACKET).unwrap().unwrap();
        assert_eq!(used, raw.len());
        assert_eq!(
            packet,
            Startup::StartupMessage {
                version: PROTOCOL_3_0,
                params: vec![
                    ("user", "app"),
                    ("database", "db"),
                    ("application_name", "é")
                ],
            }
        );
        // Every proper prefix is incomplete, never an error.
        for cut in 0..raw.len() {
            assert_eq!(parse_startup(&raw[..cut], MAX_STARTUP_PACKET), Ok(None));
        }
    }

    #[test]
    fn requests() {
        let ssl = encode::ssl_request();
        assert_eq!(
            parse_startup(&ssl, 100).unwrap(),
            Some((Startup::SslRequest, 8))
        );
        let gss = encode::gssenc_request();
        assert_eq!(
            parse_startup(&gss, 100).unwrap(),
            Some((Startup::GssEncRequest, 8))
        );
        let cancel = encode::cancel_request(42, &[1, 2, 3, 4]).unwrap();
        let mut with_more = cancel.clone();
        with_more.extend_from_slice(b"trailing");
        assert_eq!(
            parse_startup(&with_more, 100).unwrap(),
            Some((
                Startup::CancelRequest {
                    pid: 42,
                    secret: &[1, 2, 3, 4]
                },
                16
            ))
        );
    }

    #[test]
    fn hostile_lengths_are_refused_from_four_bytes() {
        let huge = (1u32 << 30).to_be_bytes();
        assert!(matches!(
            parse_startup(&huge, MAX_STARTUP_PACKET),
            Err(Error::TooLarge { length, .. }) if length == 1 << 30
        ));
        assert!(matches!(
            parse_startup(&[0, 0, 0, 3], MAX_STARTUP_PACKET),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn malformed_packets() {
        // Protocol 2.0.
        let mut v2 = vec![0, 0, 0, 9, 0, 2, 0, 0, 0];
        assert!(matches!(parse_startup(&v2, 100), Err(Error::Malformed(_))));
        // A parameter list without its final NUL.
        v2 = vec![0, 0, 0, 13, 0, 3, 0, 0, b'u', 0, b'x', 0, b'y'];
        assert!(matches!(parse_startup(&v2, 100), Err(Error::Malformed(_))));
        // SSLRequest with a body.
        let bad_ssl = [0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 0];
        assert!(matches!(
            parse_startup(&bad_ssl, 100),
            Err(Error::Malformed(_))
        ));
        // Invalid UTF-8 in a name.
        let bad = [0, 0, 0, 12, 0, 3, 0, 0, 0xff, 0, 0, 0];
        assert!(matches!(parse_startup(&bad, 100), Err(Error::Malformed(_))));
        // A cancel key that is too short.
        let short = [0, 0, 0, 14, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0];
        assert!(matches!(
            parse_startup(&short, 100),
            Err(Error::Malformed(_))
        ));
    }
}
