//! Request and response heads: the start line, the headers, and how the
//! body that follows is framed.

use crate::error::HttpError;

/// Headers a head may have at most (beyond: 431).
const MAX_HEADERS: usize = 100;

/// What one peer may send in one message.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Start line and headers (431 beyond).
    pub max_head: usize,
    /// A request's body (413 beyond).
    pub max_body: usize,
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0: no body).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// A response without either: its body ends when the connection does.
    UntilClose,
}

#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// Lower-case names, values as sent, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before its body.
    pub expect_continue: bool,
    /// An HTTP/1.0 request: its client knows no chunked answers, nor 100
    /// Continue.
    pub http10: bool,
    /// Bytes of the head, its blank line included.
    pub length: usize,
}

#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub framing: Framing,
    pub keep_alive: bool,
    pub length: usize,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find(&self.headers, name)
    }
}

impl ResponseHead {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        find(&self.headers, name)
    }
}

fn find<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

fn too_large(what: &str, limit: usize) -> HttpError {
    HttpError::new(431, format!("{what} head over {limit} bytes"))
}

fn parse_error(err: httparse::Error, what: &str) -> HttpError {
    match err {
        httparse::Error::TooManyHeaders => {
            HttpError::new(431, format!("{what} has over {MAX_HEADERS} headers"))
        }
        other => HttpError::bad(format!("bad request: malformed {what} head ({other})")),
    }
}

fn collect(raw: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    raw.iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect()
}

/// `Connection` tokens: (close, keep-alive).
fn connection_tokens(headers: &[(String, Vec<u8>)]) -> (bool, bool) {
    let (mut close, mut keep) = (false, false);
    for (_, value) in headers.iter().filter(|(n, _)| n == "connection") {
        for token in value.split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    (close, keep)
}

/// The framing the headers declare: `None` when they declare none.
fn declared_framing(headers: &[(String, Vec<u8>)]) -> Result<Option<Framing>, HttpError> {
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for (name, value) in headers {
        match name.as_str() {
            "content-length" => {
                // "5, 5" and repeated equal headers are one length; anything
                // else that disagrees is a smuggling attempt.
                for part in value.split(|&b| b == b',') {
                    let part = part.trim_ascii();
                    if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                        return Err(HttpError::bad("bad request: malformed Content-Length"));
                    }
                    // 19 digits fit in a u64.
                    let n: u64 = std::str::from_utf8(part)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| HttpError::bad("bad request: malformed Content-Length"))?;
                    if length.is_some_and(|seen| seen != n) {
                        return Err(HttpError::bad("bad request: conflicting Content-Length"));
                    }
                    length = Some(n);
                }
            }
            "transfer-encoding" => {
                if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(HttpError::new(
                        501,
                        "only Transfer-Encoding: chunked is supported",
                    ));
                }
                chunked = true;
            }
            _ => {}
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err(HttpError::bad(
            "bad request: both Content-Length and Transfer-Encoding",
        )),
        (Some(n), false) => Ok(Some(Framing::Length(n))),
        (None, true) => Ok(Some(Framing::Chunked)),
        (None, false) => Ok(None),
    }
}

/// A request head at the start of `buf`: `Ok(None)` while it is incomplete
/// (and within the limit).
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HttpError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut raw);
    let length = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => {
            return Err(too_large("request", limits.max_head))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(parse_error(err, "request")),
    };
    if length > limits.max_head {
        return Err(too_large("request", limits.max_head));
    }
    let version = request.version.unwrap_or(1);
    let method = request.method.unwrap_or("").to_owned();
    let target = request.path.unwrap_or("").to_owned();
    let headers = collect(request.headers);
    if version == 1 && find(&headers, "host").is_none() {
        return Err(HttpError::bad(
            "bad request: Missing mandatory Host: header",
        ));
    }
    let framing = declared_framing(&headers)?.unwrap_or(Framing::Length(0));
    if let Framing::Length(n) = framing {
        if n > limits.max_body as u64 {
            return Err(HttpError::new(
                413,
                format!("request body over {} bytes", limits.max_body),
            ));
        }
    }
    let (close, keep) = connection_tokens(&headers);
    let keep_alive = !close && (version == 1 || keep);
    let expect_continue = find(&headers, "expect")
        .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
    Ok(Some(RequestHead {
        method,
        target,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == 1,
        http10: version == 0,
        length,
    }))
}

/// A response head at the start of `buf` (the answer to a request that is
/// not HEAD): `Ok(None)` while incomplete. An interim (1xx) response is
/// returned like any other; the caller skips it.
pub fn parse_response(buf: &[u8], max_head: usize) -> Result<Option<ResponseHead>, HttpError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut raw);
    let length = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(too_large("response", max_head))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(parse_error(err, "response")),
    };
    if length > max_head {
        return Err(too_large("response", max_head));
    }
    let status = response.code.unwrap_or(0);
    let version = response.version.unwrap_or(1);
    let headers = collect(response.headers);
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        declared_framing(&headers)?.unwrap_or(Framing::UntilClose)
    };
    let (close, keep) = connection_tokens(&headers);
    let keep_alive = framing != Framing::UntilClose && !close && (version == 1 || keep);
    Ok(Some(ResponseHead {
        status,
        headers,
        framing,
        keep_alive,
        length,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 1024,
        max_body: 100,
    };

    #[test]
    fn a_request_head_with_its_framing() {
        let raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nAuthorization: Bearer k\r\n\r\nhello";
        let head = parse_request(raw, &LIMITS).unwrap().unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/v1/chat/completions");
        assert_eq!(head.framing, Framing::Length(5));
        assert_eq!(head.header("authorization"), Some(&b"Bearer k"[..]));
        assert!(head.keep_alive);
        assert_eq!(head.length, raw.len() - 5);
    }

    #[test]
    fn an_incomplete_head_waits_until_it_passes_the_limit() {
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n", &LIMITS)
            .unwrap()
            .is_none());
        let long = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 2000]].concat();
        assert_eq!(parse_request(&long, &LIMITS).unwrap_err().status, 431);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for (raw, status) in [
            (&b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..], 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n", 413),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
            (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ] {
            let err = parse_request(raw, &LIMITS).unwrap_err();
            assert_eq!(err.status, status, "{err} for {:?}", String::from_utf8_lossy(raw));
        }
        let same = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n";
        let head = parse_request(same, &LIMITS).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(3));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_tokens() {
        let close = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n";
        assert!(!parse_request(close, &LIMITS).unwrap().unwrap().keep_alive);
        let old = b"GET / HTTP/1.0\r\n\r\n";
        assert!(!parse_request(old, &LIMITS).unwrap().unwrap().keep_alive);
        let old_keep = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        assert!(
            parse_request(old_keep, &LIMITS)
                .unwrap()
                .unwrap()
                .keep_alive
        );
    }

    #[test]
    fn response_framing() {
        let sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = parse_response(sse, 1024).unwrap().unwrap();
        assert_eq!((head.status, head.framing), (200, Framing::Chunked));
        let bare = b"HTTP/1.1 200 OK\r\n\r\n";
        let head = parse_response(bare, 1024).unwrap().unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.keep_alive);
        let none = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(
            parse_response(none, 1024).unwrap().unwrap().framing,
            Framing::Length(0)
        );
    }
}
