//! qmesh's tunnel engine (see [`engine`]): the per-message path of a session
//! (tunnel socket, sealing, retention and ACKs, natively relayed streams) on
//! a thread of its own, outside Python. [`error`] holds its one error type,
//! split by who is at fault; [`tls`] the TLS client a native stream's
//! socket may speak (the Gate to a database server).

pub mod engine;
pub mod error;
mod sys;
pub mod tls;

pub use engine::{
    Config, Ending, Engine, Event, NativeSpec, Outcome, PgTap, Stats, TapRecord, TlsHandover,
};
pub use error::{Error, PgError, Result, Side, SocketError, Violation};
pub use sys::monotonic;
