//! qmesh's tunnel engine (see [`engine`]): the per-message path of a session
//! (tunnel socket, sealing, retention and ACKs, natively relayed streams) on
//! a thread of its own, outside Python.

pub mod engine;
mod sys;

pub use engine::{
    Config, ConnError, Ending, Engine, Event, NativeSpec, Outcome, PgTap, Stats, TapRecord,
};
pub use sys::monotonic;
