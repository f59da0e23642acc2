//! qmesh's sans-IO PostgreSQL wire layer: it parses and builds the bytes of
//! the frontend/backend protocol (version 3.0) and never touches a socket.
//! The Python binding (`qmesh._core`) wraps it for the MiniGate's Postgres
//! listener and the Gate's relay.
//!
//! * [`startup`]: the untyped first packets: StartupMessage, SSLRequest,
//!   GSSENCRequest, CancelRequest.
//! * [`scanner`]: the batch API. Feed a buffer, get the message boundaries;
//!   only the kinds asked for are reported, everything else is relayed
//!   without being copied, however large.
//! * [`frontend`], [`backend`]: typed messages and their fields, parsed by
//!   borrowing from the body.
//! * [`MessageCursor`]: whether a relayed stream stands between two
//!   messages, for a proxy that ends it with a message of its own.
//! * [`encode`]: builders for the messages a proxy has to write itself.
//! * [`error`]: the one error type.
//!
//! Size caps are checked before anything is allocated: a length field above
//! the limit fails from the header alone, and a count read from a message
//! is checked against the bytes left in it before a `Vec` is sized for it.
//!
//! Not for: SQL. What a statement means is the caller's business; this crate
//! only finds it.

pub mod backend;
mod cursor;
pub mod encode;
pub mod error;
pub mod frontend;
mod reader;
pub mod scanner;
pub mod startup;

pub use backend::{command_rows, Authentication, Backend, Field};
pub use cursor::MessageCursor;
pub use error::{Error, Result};
pub use frontend::{Bind, Frontend};
pub use scanner::{
    Direction, Scanner, ScannerConfig, Sink, TagSet, BACKEND_TAGS, DEFAULT_MAX_MESSAGE,
    DEFAULT_PEEK_MAX, FRONTEND_TAGS, HEADER_LEN, MAX_MESSAGE_LIMIT,
};
pub use startup::{
    parse_startup, Startup, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET,
    PROTOCOL_3_0, SSL_REQUEST_CODE,
};
