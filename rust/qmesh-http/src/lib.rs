//! qmesh's sans-IO HTTP/1.1 layer, for the Gate's native LLM path: it parses
//! request and response heads (with `httparse`), decodes bodies framed by
//! length or chunked, and reads token usage from a relayed answer. It never
//! touches a socket; `qmesh-relay`'s HTTP engine drives it.
//!
//! Every limit is checked before anything is allocated for it: a head is
//! measured before it is copied, a declared length before the body is
//! buffered, a chunk-size line and the trailers have their own small caps.
//! Ambiguous framing (a request with both `Content-Length` and
//! `Transfer-Encoding`, differing lengths, a coding other than `chunked`)
//! is refused, never guessed at: that is how requests are smuggled.
//!
//! Not for: routing, authentication or what a body means.

mod body;
mod error;
mod head;
mod json;
mod openai;
mod usage;

pub use body::{encode_chunk, BodyDecoder, LAST_CHUNK};
pub use error::HttpError;
pub use head::{parse_request, parse_response, Framing, Limits, RequestHead, ResponseHead};
pub use json::nesting_depth;
pub use openai::{read_completion_request, CompletionRequest};
pub use usage::UsageScan;
