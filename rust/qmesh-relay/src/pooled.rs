//! A transaction-mode client session relayed by the engine: the client's
//! stream borrows a server connection from its pool's [`Shelf`] when a
//! transaction starts, and gives it back at the server's ReadyForQuery
//! *idle* with no answer still due, all on the engine thread.
//!
//! The engine relays what it can follow exactly: simple Queries that cannot
//! leave session state behind, and Terminate. The first message it cannot
//! (the extended protocol, whose statements are renamed per connection; a
//! FunctionCall; COPY; a statement that could pin the session) ends the
//! engine's part as soon as the server's bytes are between two messages:
//! that message and all that follows go to Python's relay
//! ([`PooledEnd::leftover`]), with the connection if the client holds one
//! (a transaction block open, or answers still due, which Python's relay
//! then passes on). Python's relay carries the session to its end.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qmesh_pg as pg;

use crate::audit::AuditAuthor;
use crate::engine::TapRecord;
use crate::pool::{Lease, Shelf};

/// The tap record kind a pooled stream makes itself (never a Postgres type
/// byte): a statement still running when the engine's part ended, which
/// Python's relay follows from there (`at` is when it started; `raw` is
/// [`Statement::record`]'s layout). Finished statements go to the audit's
/// queue from the engine.
pub const STATEMENT_RUNNING: u8 = 0x02;

/// What makes a native stream a pooled one.
pub struct PooledSpec {
    pub shelf: Arc<Shelf>,
    /// How long the client may wait in line before its session ends
    /// ([`crate::Ending::PoolTimeout`]).
    pub wait_limit: Duration,
    /// Where each finished statement is recorded, if the audit is on.
    pub audit: Option<AuditAuthor>,
}

impl std::fmt::Debug for PooledSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledSpec")
            .field("wait_limit", &self.wait_limit)
            .finish_non_exhaustive()
    }
}

/// A pooled stream's state at its end, for Python to carry on or clean up.
#[derive(Debug, PartialEq, Eq)]
pub struct PooledEnd {
    /// The connection the client held (a transaction block open, answers
    /// due, or a broken one): Python decides what becomes of it.
    pub lease: Option<Lease>,
    /// Queries whose ReadyForQuery had not come.
    pub due: usize,
    /// The server's transaction status at its last ReadyForQuery (`I`, `T`,
    /// `E`); 0 while a query is on its way.
    pub status: u8,
    /// The server's bytes stopped inside a message.
    pub server_mid_message: bool,
    /// The server sent a FATAL error (the client has it).
    pub server_fatal: bool,
    /// Client bytes the engine did not relay, from the first message it
    /// does not relay natively: Python's relay starts with them.
    pub leftover: Vec<u8>,
    /// Client bytes consumed but not yet granted back in a WINDOW frame.
    pub consumed: u64,
}

/// Words a Query names when it might leave session state behind (a SET,
/// LISTEN, PREPARE, a WITH HOLD cursor, a temporary table, a session
/// advisory lock, LOAD, set_config, DEALLOCATE, DISCARD) or start COPY:
/// Python's relay decides those exactly. A false alarm (a column named
/// `temperature`) costs only the engine's speed for that session.
const HANDED_TO_PYTHON: &[&[u8]] = &[
    b"listen",
    b"prepare",
    b"hold",
    b"temp",
    b"advisory",
    b"load",
    b"deallocate",
    b"discard",
    b"copy",
    b"set_config",
];

/// Whether the engine can relay this Query itself.
pub(crate) fn native_query(raw: &[u8]) -> bool {
    let text = raw.get(pg::HEADER_LEN..).unwrap_or_default();
    !HANDED_TO_PYTHON
        .iter()
        .any(|word| contains_word(text, word))
        && !sets_session(text)
}

fn contains_word(text: &[u8], word: &[u8]) -> bool {
    text.windows(word.len())
        .any(|window| window.eq_ignore_ascii_case(word))
}

/// Whether a statement of `text` may start with SET (SET LOCAL included:
/// Python tells them apart). UPDATE … SET is not one: its SET follows a
/// word. Comments could hide where a statement starts, so a text with one
/// counts as yes.
fn sets_session(text: &[u8]) -> bool {
    if !contains_word(text, b"set") {
        return false;
    }
    if contains_word(text, b"--") || contains_word(text, b"/*") {
        return true;
    }
    let mut statement_start = true;
    let mut i = 0;
    while i < text.len() {
        let byte = text[i];
        if byte == b';' {
            statement_start = true;
        } else if !byte.is_ascii_whitespace() && byte != 0 {
            if statement_start
                && text[i..].len() >= 3
                && text[i..i + 3].eq_ignore_ascii_case(b"set")
                && text.get(i + 3).is_none_or(|b| !is_word_byte(*b))
            {
                return true;
            }
            statement_start = false;
        }
        i += 1;
    }
    false
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte >= 0x80
}

/// A pooled stream's state in the engine.
pub(crate) struct Pooled {
    pub(crate) shelf: Arc<Shelf>,
    pub(crate) wait_limit: Duration,
    pub(crate) lease: Option<Lease>,
    /// The place in line while waiting for a connection, and until when.
    pub(crate) waiting: Option<(u64, Instant)>,
    pub(crate) due: usize,
    pub(crate) status: u8,
    /// Some once a message the engine does not relay came: it and what followed.
    pub(crate) handback: Option<Vec<u8>>,
    pub(crate) terminated: bool,
    pub(crate) server_fatal: bool,
    /// The audit's statements on their way (with an author).
    pub(crate) statements: VecDeque<Statement>,
    pub(crate) audit: Option<AuditAuthor>,
}

/// One simple Query for the audit, from relayed to ReadyForQuery.
pub(crate) struct Statement {
    /// The Query message.
    raw: Vec<u8>,
    started: f64,
    rows: Option<u64>,
    sqlstate: Option<[u8; 5]>,
}

impl Statement {
    /// A tap record of `kind`: started (`f64`), rows (`i64`, -1 for none),
    /// SQLSTATE (5 bytes, zeros for none), then the Query message.
    pub(crate) fn record(self, kind: u8, at: f64) -> TapRecord {
        let mut raw = Vec::with_capacity(21 + self.raw.len());
        raw.extend_from_slice(&self.started.to_be_bytes());
        let rows = self
            .rows
            .map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX));
        raw.extend_from_slice(&rows.to_be_bytes());
        raw.extend_from_slice(&self.sqlstate.unwrap_or([0; 5]));
        raw.extend_from_slice(&self.raw);
        TapRecord {
            at,
            from_tunnel: true,
            tag: kind,
            raw,
            hold: false,
        }
    }
}

impl Statement {
    /// Recorded, ended at `at`: rows and outcome ("ok", or "error:" and
    /// the first error's SQLSTATE), as Python's relay records them.
    fn finish(self, author: &AuditAuthor, at: f64) {
        let outcome = match self.sqlstate {
            None => Cow::Borrowed("ok"),
            Some(state) => Cow::Owned(format!("error:{}", String::from_utf8_lossy(&state))),
        };
        let mut raw = self.raw;
        // The text as sent: after the header, less the terminating NUL.
        let end = raw.len() - usize::from(raw.last() == Some(&0) && raw.len() > pg::HEADER_LEN);
        raw.truncate(end);
        raw.drain(..pg::HEADER_LEN.min(raw.len()));
        let rows = self.rows.map(|r| i64::try_from(r).unwrap_or(i64::MAX));
        author.record(raw, at - self.started, rows, outcome);
    }
}

impl Pooled {
    pub(crate) fn new(spec: PooledSpec) -> Pooled {
        Pooled {
            shelf: spec.shelf,
            wait_limit: spec.wait_limit,
            lease: None,
            waiting: None,
            due: 0,
            status: b'I',
            handback: None,
            terminated: false,
            server_fatal: false,
            statements: VecDeque::new(),
            audit: spec.audit,
        }
    }

    /// The statements still running, for Python's relay to follow.
    pub(crate) fn running(&mut self) -> impl Iterator<Item = TapRecord> + '_ {
        self.statements.drain(..).map(|statement| {
            let at = statement.started;
            statement.record(STATEMENT_RUNNING, at)
        })
    }

    /// Whether the connection may go back to the shelf now: nothing due,
    /// the server idle outside a transaction block, and neither side
    /// inside a message.
    pub(crate) fn between_transactions(&self, in_message: bool) -> bool {
        self.lease.is_some() && self.due == 0 && self.status == b'I' && !in_message
    }
}

/// The client's messages of a pooled stream, as the frontend scanner
/// reports them (every kind whole).
pub(crate) struct Front<'a> {
    pub(crate) pooled: &'a mut Pooled,
    /// Bytes for the server.
    pub(crate) out: Vec<u8>,
    /// Bytes dropped (after a Terminate, and the Terminate itself).
    pub(crate) dropped: usize,
    pub(crate) at: f64,
}

impl pg::Sink for Front<'_> {
    fn pass(&mut self, bytes: &[u8]) {
        // Every kind is reported whole; a pass would be a kind the engine
        // does not know, which Python's relay answers.
        match self.pooled.handback.as_mut() {
            Some(rest) => rest.extend_from_slice(bytes),
            None => self.pooled.handback = Some(bytes.to_vec()),
        }
    }

    fn message(&mut self, tag: u8, raw: &[u8], _complete: bool) {
        let pooled = &mut *self.pooled;
        if pooled.terminated {
            self.dropped += raw.len();
            return;
        }
        if let Some(rest) = pooled.handback.as_mut() {
            rest.extend_from_slice(raw);
            return;
        }
        match tag {
            b'Q' if native_query(raw) => {
                self.out.extend_from_slice(raw);
                pooled.due += 1;
                pooled.status = 0;
                if pooled.audit.is_some() {
                    pooled.statements.push_back(Statement {
                        raw: raw.to_vec(),
                        started: self.at,
                        rows: None,
                        sqlstate: None,
                    });
                }
            }
            b'X' => {
                pooled.terminated = true;
                self.dropped += raw.len();
            }
            _ => pooled.handback = Some(raw.to_vec()),
        }
    }
}

/// The server's messages of a pooled stream (observe mode): ReadyForQuery
/// and errors followed; with the audit on, each statement's rows and
/// outcome gathered into one record at its ReadyForQuery.
pub(crate) struct Back<'a> {
    pub(crate) pooled: &'a mut Pooled,
    pub(crate) at: f64,
}

impl pg::Sink for Back<'_> {
    fn pass(&mut self, _bytes: &[u8]) {}

    fn message(&mut self, tag: u8, raw: &[u8], _complete: bool) {
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        let pooled = &mut *self.pooled;
        match tag {
            b'Z' => {
                pooled.due = pooled.due.saturating_sub(1);
                pooled.status = pg::backend::ready_for_query(body).unwrap_or(b'E');
                if let (Some(statement), Some(author)) =
                    (pooled.statements.pop_front(), &pooled.audit)
                {
                    statement.finish(author, self.at);
                }
            }
            b'E' => {
                let fields = pg::backend::notice_fields(body).unwrap_or_default();
                let field = |code: u8| fields.iter().find(|(c, _)| *c == code).map(|f| f.1);
                pooled.server_fatal |= matches!(field(b'S'), Some(b"FATAL" | b"PANIC"));
                if let Some(statement) = pooled.statements.front_mut() {
                    let state = field(b'C').and_then(|c| <[u8; 5]>::try_from(c).ok());
                    statement.sqlstate = statement.sqlstate.or(state.or(Some(*b"XX000")));
                }
            }
            b'C' => {
                let rows = pg::backend::command_complete(body)
                    .ok()
                    .and_then(pg::command_rows);
                if let (Some(statement), Some(rows)) = (pooled.statements.front_mut(), rows) {
                    statement.rows = Some(statement.rows.unwrap_or(0) + rows);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sql: &str) -> Vec<u8> {
        let mut raw = vec![b'Q'];
        raw.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        raw.extend_from_slice(sql.as_bytes());
        raw.push(0);
        raw
    }

    #[test]
    fn plain_statements_stay_in_the_engine() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "UPDATE t SET x = 1 WHERE id = 2",
            "BEGIN",
            "COMMIT",
            "insert into offsets values (1)",
        ] {
            assert!(native_query(&query(sql)), "{sql}");
        }
    }

    #[test]
    fn statements_that_may_leave_state_go_to_python() {
        for sql in [
            "SET search_path = x",
            "  set statement_timeout to 5",
            "select 1; SET x = 1",
            "SET LOCAL x = 1",
            "LISTEN ch",
            "PREPARE p AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE t (x int)",
            "SELECT pg_advisory_lock(1)",
            "LOAD 'x'",
            "SELECT set_config('a', 'b', false)",
            "DISCARD ALL",
            "DEALLOCATE ALL",
            "COPY t FROM STDIN",
            "/* c */ SET x = 1",
            "-- c\nSET x = 1",
        ] {
            assert!(!native_query(&query(sql)), "{sql}");
        }
    }
}
