//! qmesh's tunnel engine (see [`engine`]): the per-message path of a session
//! (tunnel socket, sealing, retention and ACKs, natively relayed streams)
//! outside Python, on a small pool of engine threads that each serve many
//! sessions (`reactor.rs`). [`error`] holds its one error type, split by who
//! is at fault; [`tls`] the TLS a native stream's socket may speak (the Gate
//! to a database server, an application to the MiniGate).

pub mod audit;
pub mod audit_block;
pub mod engine;
pub mod error;
mod fastroute;
pub mod http;
pub mod notify;
pub mod pool;
mod pooled;
mod reactor;
mod readonly;
mod statements;
mod sys;
pub mod tls;

pub use audit::{AuditAuthor, AuditCounts, AuditLimits, AuditQueue, Who};
pub use audit_block::{
    decode_block, encode_blocks, Block as AuditBlock, BlockError as AuditBlockError,
    StoredRecord as AuditRecord,
};
pub use engine::{
    Config, Ending, Engine, Event, Heartbeat, NativeSpec, Outcome, PgTap, Stats, TapRecord,
    TlsHandover,
};
pub use error::{Error, PgError, Result, Side, SocketError, Violation};
pub use fastroute::{FastRoute, RouteKey};
pub use http::{
    HttpConfig, HttpEngine, HttpEvent, HttpStats, ProxyOutcome, ProxySpec, UpstreamTls, Usage,
};
pub use notify::Notifier;
pub use pool::{Lease, Prepared, ReturnWhy, Shelf, ShelfEvent, ShelfStats};
pub use pooled::{OwedAnswer, PooledEnd, PooledSpec};
pub use reactor::{engine_poll, engine_polls, engine_threads, set_engine_poll, MAX_POLL};
pub use statements::STATEMENT_RUNNING;
pub use sys::{monotonic, request_time_slice};
