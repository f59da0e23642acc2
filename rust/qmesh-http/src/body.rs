//! Bodies framed by length or chunked, decoded as they arrive.

use crate::error::HttpError;
use crate::head::Framing;

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// A chunk-size line (size, extensions) at most.
const MAX_SIZE_LINE: usize = 4096;
/// Trailer lines at most, all together.
const MAX_TRAILERS: usize = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Reading a chunk-size line: the size so far, digits seen, line length.
    Size {
        size: u64,
        digits: u32,
        line: usize,
        in_ext: bool,
    },
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// Reading trailer lines: bytes of them so far, bytes in this line.
    Trailer {
        total: usize,
        line: usize,
    },
    TrailerLf {
        total: usize,
        line: usize,
    },
}

/// Decodes one message's body.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Length { remaining: u64 },
    Chunked(Chunked),
    UntilClose,
    Done,
}

fn bad_chunk(why: &str) -> HttpError {
    HttpError::bad(format!("bad request: malformed chunked body ({why})"))
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length { remaining: n },
            Framing::Chunked => State::Chunked(Chunked::Size {
                size: 0,
                digits: 0,
                line: 0,
                in_ext: false,
            }),
            Framing::UntilClose => State::UntilClose,
        };
        BodyDecoder { state }
    }

    /// Whether the whole body has been decoded.
    pub fn done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the body ends with the connection (and so is whole at EOF).
    pub fn until_close(&self) -> bool {
        matches!(self.state, State::UntilClose)
    }

    /// Decode from `input`, appending body bytes to `out`; returns how much
    /// of `input` was used. Bytes past the body's end are left unused.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            match &mut self.state {
                State::Done => break,
                State::UntilClose => {
                    out.extend_from_slice(rest);
                    used = input.len();
                }
                State::Length { remaining } => {
                    used += copy_data(rest, remaining, out);
                    if *remaining == 0 {
                        self.state = State::Done;
                    }
                }
                State::Chunked(chunked) => {
                    if let Chunked::Data { remaining } = chunked {
                        used += copy_data(rest, remaining, out);
                        if *remaining == 0 {
                            *chunked = Chunked::DataCr;
                        }
                        continue;
                    }
                    let byte = rest[0];
                    used += 1;
                    if let Some(next) = step(*chunked, byte)? {
                        *chunked = next;
                    } else {
                        self.state = State::Done;
                    }
                }
            }
        }
        Ok(used)
    }
}

/// Body bytes from `rest`, at most `remaining` of them (which counts down):
/// how many were taken.
fn copy_data(rest: &[u8], remaining: &mut u64, out: &mut Vec<u8>) -> usize {
    let take = rest
        .len()
        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
    out.extend_from_slice(&rest[..take]);
    *remaining -= take as u64;
    take
}

/// One byte of the chunked framing outside data: the next state, or `None`
/// at the end of the body.
fn step(state: Chunked, byte: u8) -> Result<Option<Chunked>, HttpError> {
    Ok(Some(match state {
        Chunked::Size {
            size,
            digits,
            line,
            in_ext,
        } => {
            if line >= MAX_SIZE_LINE {
                return Err(bad_chunk("chunk-size line too long"));
            }
            let line = line + 1;
            match byte {
                b'\r' if digits > 0 => Chunked::SizeLf { size },
                _ if in_ext => Chunked::Size {
                    size,
                    digits,
                    line,
                    in_ext,
                },
                b';' if digits > 0 => Chunked::Size {
                    size,
                    digits,
                    line,
                    in_ext: true,
                },
                _ => {
                    let digit = (byte as char)
                        .to_digit(16)
                        .ok_or_else(|| bad_chunk("chunk size is not hexadecimal"))?;
                    if digits >= 16 {
                        return Err(bad_chunk("chunk size too large"));
                    }
                    Chunked::Size {
                        size: size << 4 | u64::from(digit),
                        digits: digits + 1,
                        line,
                        in_ext,
                    }
                }
            }
        }
        Chunked::SizeLf { size } => {
            if byte != b'\n' {
                return Err(bad_chunk("chunk size not ended by CRLF"));
            }
            if size == 0 {
                Chunked::Trailer { total: 0, line: 0 }
            } else {
                Chunked::Data { remaining: size }
            }
        }
        Chunked::Data { .. } => unreachable!("data is copied, not stepped"),
        Chunked::DataCr if byte == b'\r' => Chunked::DataLf,
        Chunked::DataLf if byte == b'\n' => Chunked::Size {
            size: 0,
            digits: 0,
            line: 0,
            in_ext: false,
        },
        Chunked::DataCr | Chunked::DataLf => return Err(bad_chunk("chunk data not ended by CRLF")),
        Chunked::Trailer { total, line } => {
            if total >= MAX_TRAILERS {
                return Err(bad_chunk("trailers too long"));
            }
            if byte == b'\r' {
                Chunked::TrailerLf {
                    total: total + 1,
                    line,
                }
            } else {
                Chunked::Trailer {
                    total: total + 1,
                    line: line + 1,
                }
            }
        }
        Chunked::TrailerLf { total, line } => {
            if byte != b'\n' {
                return Err(bad_chunk("trailer not ended by CRLF"));
            }
            if line == 0 {
                return Ok(None); // the blank line after the trailers
            }
            Chunked::Trailer {
                total: total + 1,
                line: 0,
            }
        }
    }))
}

/// `data` as one chunk of a chunked body (nothing for empty data: an empty
/// chunk would end the body).
pub fn encode_chunk(data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(
        framing: Framing,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, usize, bool), HttpError> {
        let mut decoder = BodyDecoder::new(framing);
        let mut out = Vec::new();
        let mut used = 0;
        for piece in input.chunks(step.max(1)) {
            let n = decoder.decode(piece, &mut out)?;
            used += n;
            if n < piece.len() {
                break;
            }
        }
        Ok((out, used, decoder.done()))
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let raw = b"5;name=v\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for step in [1, 2, 7, raw.len()] {
            let (body, used, done) = decode_all(Framing::Chunked, raw, step).unwrap();
            assert_eq!(body, b"hello world");
            assert!(done);
            assert_eq!(&raw[used..], b"NEXT");
        }
    }

    #[test]
    fn malformed_chunked_is_an_error() {
        for raw in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
            b"5\nhello\r\n",
        ] {
            assert!(decode_all(Framing::Chunked, raw, 3).is_err(), "{raw:?}");
        }
        let long_ext = [b"5;".as_slice(), &[b'a'; 5000]].concat();
        assert!(decode_all(Framing::Chunked, &long_ext, 100).is_err());
    }

    #[test]
    fn length_stops_at_its_end() {
        let (body, used, done) = decode_all(Framing::Length(3), b"abcdef", 2).unwrap();
        assert_eq!((body.as_slice(), used, done), (&b"abc"[..], 3, true));
    }

    proptest! {
        #[test]
        fn chunked_round_trips(pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8), step in 1usize..64) {
            let mut raw = Vec::new();
            for piece in &pieces {
                encode_chunk(piece, &mut raw);
            }
            raw.extend_from_slice(LAST_CHUNK);
            let (body, used, done) = decode_all(Framing::Chunked, &raw, step).unwrap();
            prop_assert_eq!(body, pieces.concat());
            prop_assert_eq!(used, raw.len());
            prop_assert!(done);
        }

        #[test]
        fn garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512), step in 1usize..64) {
            let _ = decode_all(Framing::Chunked, &raw, step);
        }
    }
}
