//! A transaction-mode client session relayed by the engine: the client's
//! stream borrows a server connection from its pool's [`Shelf`] when a
//! transaction starts, and gives it back at the server's ReadyForQuery
//! *idle* with no answer still due, all on the engine thread.
//!
//! The engine relays what it can follow exactly: simple Queries and the
//! extended protocol's unnamed statement and portal (psycopg's and JDBC's
//! default, `pgbench -M extended`), made on the loan that uses them, of
//! statements that cannot leave session state behind; Sync, Flush and
//! Terminate. The first message it cannot (a named statement or portal,
//! which Python's relay renames per connection; a Bind of an unnamed
//! statement parsed on another loan; a FunctionCall; COPY; a statement
//! that could pin the session) ends the engine's part as soon as the
//! server's bytes are between two messages: that message and all that
//! follows go to Python's relay ([`PooledEnd::leftover`]), with the
//! connection if the client holds one (a transaction block or pipeline
//! open, or answers still owed, which Python's relay then passes on).
//! Python's relay carries the session to its end.

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
    /// The answers the server still owes: the type byte of each client
    /// message whose answer had not ended, in order.
    pub owed: Vec<u8>,
    /// The client's unnamed statement (its Parse message), and whether the
    /// connection it holds has it (else it must be parsed again there).
    pub unnamed: Option<Vec<u8>>,
    pub unnamed_held: bool,
    /// The server discards the client's messages until its next Sync (an
    /// error in the extended protocol, no Sync sent since).
    pub skipping: bool,
    /// The server's transaction status at its last ReadyForQuery (`I`, `T`,
    /// `E`); 0 while a query is on its way or a pipeline is not synced.
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

/// Whether the engine can relay a statement of this text itself (a
/// Query's, or a Parse's).
pub(crate) fn native_text(text: &[u8]) -> bool {
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
    /// The answers the server still owes, in order: the type byte of each
    /// message relayed (Query, Parse, Bind, Describe, Execute, Close,
    /// Sync) until its answer ends ([`answer_ends`]). Python's relay takes
    /// over the rest.
    pub(crate) owed: VecDeque<u8>,
    /// Extended-protocol messages relayed since the last Sync: the server
    /// is inside an implicit transaction until that Sync's ReadyForQuery.
    pub(crate) open_pipeline: bool,
    pub(crate) status: u8,
    /// The client's unnamed statement (its Parse), which a simple Query or
    /// a Close drops; `unnamed_here` while the connection it holds has it.
    /// The connection's unnamed statement may be another client's: a Bind
    /// or Describe of it needs this client's Parse on this loan.
    pub(crate) unnamed: Option<Unnamed>,
    pub(crate) unnamed_here: bool,
    /// An error in the extended protocol with no Sync sent after it: the
    /// server discards what comes until the next Sync. Python's relay
    /// follows that (the client's next message, unless a Sync, moves the
    /// session there).
    pub(crate) skipping: bool,
    /// The unnamed portal bound on this loan: its statement's text.
    pub(crate) portal: Option<Arc<[u8]>>,
    /// Some once a message the engine does not relay came: it and what followed.
    pub(crate) handback: Option<Vec<u8>>,
    pub(crate) terminated: bool,
    pub(crate) server_fatal: bool,
    /// The audit's statements on their way (with an author), and the
    /// bytes of their texts (a shared text counted for each).
    pub(crate) statements: VecDeque<Statement>,
    pending_text: usize,
    pub(crate) audit: Option<AuditAuthor>,
}

/// The most text the audit's statements on their way may count: a client
/// that pipelines Execute after Execute of a long statement moves to
/// Python's relay past it, so what is handed over stays bounded.
const MAX_PENDING_TEXT: usize = 8 << 20;

/// The client's Parse of the unnamed statement, and the statement's text.
pub(crate) struct Unnamed {
    pub(crate) parse: Vec<u8>,
    text: Arc<[u8]>,
}

/// The server message types that end the answer to a client message of
/// type `kind` (ParameterDescription precedes a statement's description,
/// rows precede an Execute's completion).
fn answer_ends(kind: u8) -> &'static [u8] {
    match kind {
        b'P' => b"1",
        b'B' => b"2",
        b'D' => b"Tn",
        b'E' => b"CIs",
        b'C' => b"3",
        _ => b"Z", // a Query or a Sync
    }
}

/// One statement for the audit: a simple Query (`b'Q'`) or an Execute
/// (`b'E'`) from relayed to its end, or a Sync (`b'S'`) that bounds the
/// Executes an error makes the server skip.
pub(crate) struct Statement {
    kind: u8,
    /// Shared: the Executes of one statement hold its one text.
    text: Arc<[u8]>,
    started: f64,
    rows: Option<u64>,
    sqlstate: Option<[u8; 5]>,
}

impl Statement {
    fn new(kind: u8, text: Arc<[u8]>, started: f64) -> Statement {
        Statement {
            kind,
            text,
            started,
            rows: None,
            sqlstate: None,
        }
    }

    /// A tap record: started (`f64`), rows (`i64`, -1 for none), SQLSTATE
    /// (5 bytes, zeros for none), the kind (`Q`, `E` or `S`; `P` and `B`
    /// for the texts of the unnamed statement and portal), then the text.
    fn record(self, at: f64) -> TapRecord {
        let mut raw = Vec::with_capacity(22 + self.text.len());
        raw.extend_from_slice(&self.started.to_be_bytes());
        let rows = self
            .rows
            .map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX));
        raw.extend_from_slice(&rows.to_be_bytes());
        raw.extend_from_slice(&self.sqlstate.unwrap_or([0; 5]));
        raw.push(self.kind);
        raw.extend_from_slice(&self.text);
        TapRecord {
            at,
            from_tunnel: true,
            tag: STATEMENT_RUNNING,
            raw,
            hold: false,
        }
    }

    /// Recorded, ended at `at`: rows and outcome (`skipped`, else "ok", or
    /// "error:" and the first error's SQLSTATE), as Python's relay records them.
    fn finish(self, author: &AuditAuthor, at: f64, skipped: bool) {
        let outcome = match self.sqlstate {
            _ if skipped => Cow::Borrowed("skipped"),
            None => Cow::Borrowed("ok"),
            Some(state) => Cow::Owned(format!("error:{}", String::from_utf8_lossy(&state))),
        };
        let rows = self.rows.map(|r| i64::try_from(r).unwrap_or(i64::MAX));
        author.record(self.text, at - self.started, rows, outcome);
    }
}

impl Pooled {
    pub(crate) fn new(spec: PooledSpec) -> Pooled {
        Pooled {
            shelf: spec.shelf,
            wait_limit: spec.wait_limit,
            lease: None,
            waiting: None,
            owed: VecDeque::new(),
            open_pipeline: false,
            status: b'I',
            unnamed: None,
            unnamed_here: false,
            skipping: false,
            portal: None,
            handback: None,
            terminated: false,
            server_fatal: false,
            statements: VecDeque::new(),
            pending_text: 0,
            audit: spec.audit,
        }
    }

    /// What Python's relay follows from here: the texts of the unnamed
    /// statement and portal, and the audit's statements still running.
    pub(crate) fn running(&mut self) -> Vec<TapRecord> {
        let mut records = Vec::new();
        if self.audit.is_some() {
            if let Some(unnamed) = &self.unnamed {
                records.push(Statement::new(b'P', unnamed.text.clone(), 0.0).record(0.0));
            }
            if let Some(text) = &self.portal {
                records.push(Statement::new(b'B', text.clone(), 0.0).record(0.0));
            }
        }
        self.pending_text = 0;
        records.extend(self.statements.drain(..).map(|statement| {
            let at = statement.started;
            statement.record(at)
        }));
        records
    }

    /// Whether the connection may go back to the shelf now: nothing owed,
    /// no pipeline open, the server idle outside a transaction block, and
    /// neither side inside a message.
    pub(crate) fn between_transactions(&self, in_message: bool) -> bool {
        self.lease.is_some()
            && self.owed.is_empty()
            && !self.open_pipeline
            && self.status == b'I'
            && !in_message
    }

    /// Note a statement for the audit (with one on); false past
    /// [`MAX_PENDING_TEXT`]: the session moves to Python's relay.
    fn pending(&mut self, kind: u8, text: Arc<[u8]>, at: f64) -> bool {
        if self.audit.is_none() {
            return true;
        }
        if self.pending_text + text.len() > MAX_PENDING_TEXT {
            return false;
        }
        self.pending_text += text.len();
        self.statements.push_back(Statement::new(kind, text, at));
        true
    }

    /// The first statement on its way, done.
    fn done(&mut self) -> Option<Statement> {
        let statement = self.statements.pop_front()?;
        self.pending_text -= statement.text.len();
        Some(statement)
    }

    /// The connection, given back: what this loan made on it stays there.
    pub(crate) fn end_loan(&mut self) -> Option<Lease> {
        self.unnamed_here = false;
        self.portal = None;
        self.lease.take()
    }

    /// Whether the engine relays extended-protocol message `raw` (type
    /// `tag`), noting what it makes: only the unnamed statement and portal,
    /// made on this loan (named ones are renamed per connection by Python's
    /// relay), of statements that cannot leave session state behind.
    fn extended(&mut self, tag: u8, raw: &[u8], at: f64) -> bool {
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        // Malformed: Python's relay says what is wrong with it.
        let Ok(message) = pg::Frontend::parse(tag, body) else {
            return false;
        };
        match message {
            pg::Frontend::Parse { name, sql, .. } => {
                if !name.is_empty() || !native_text(sql) {
                    return false;
                }
                self.unnamed = Some(Unnamed {
                    parse: raw.to_vec(),
                    text: sql.into(),
                });
                self.unnamed_here = true;
            }
            pg::Frontend::Bind(bind) => {
                if !bind.portal.is_empty() || !bind.statement.is_empty() || !self.unnamed_here {
                    return false;
                }
                self.portal = self.unnamed.as_ref().map(|u| u.text.clone());
            }
            pg::Frontend::Describe { kind, name } => {
                let made = if kind == b'S' {
                    self.unnamed_here
                } else {
                    self.portal.is_some()
                };
                if !name.is_empty() || !made {
                    return false;
                }
            }
            pg::Frontend::Execute { portal, .. } => {
                let Some(text) = self.portal.clone().filter(|_| portal.is_empty()) else {
                    return false;
                };
                if !self.pending(b'E', text, at) {
                    return false;
                }
            }
            pg::Frontend::Close { kind, name } => {
                if !name.is_empty() {
                    return false;
                }
                if kind == b'S' {
                    (self.unnamed, self.unnamed_here) = (None, false);
                } else {
                    self.portal = None;
                }
            }
            pg::Frontend::Flush => {
                self.open_pipeline = true;
                return true; // no answer of its own
            }
            pg::Frontend::Sync => {
                if !self.pending(b'S', Arc::from(&b""[..]), at) {
                    return false;
                }
                self.status = 0;
                self.open_pipeline = false;
                self.skipping = false;
                self.owed.push_back(tag);
                return true;
            }
            _ => return false,
        }
        self.open_pipeline = true;
        self.owed.push_back(tag);
        true
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
        if pooled.skipping && tag != b'S' && tag != b'X' {
            pooled.handback = Some(raw.to_vec());
            return;
        }
        // The Query's text as sent, less the terminating NUL.
        let text = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        let text = text.strip_suffix(b"\0").unwrap_or(text);
        match tag {
            b'Q' if native_text(text) && pooled.pending(tag, text.into(), self.at) => {
                self.out.extend_from_slice(raw);
                pooled.owed.push_back(tag);
                pooled.status = 0;
                // A simple Query drops the unnamed statement and portal.
                (pooled.unnamed, pooled.unnamed_here, pooled.portal) = (None, false, None);
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S'
                if pooled.extended(tag, raw, self.at) =>
            {
                self.out.extend_from_slice(raw);
            }
            b'X' => {
                pooled.terminated = true;
                self.dropped += raw.len();
            }
            _ => pooled.handback = Some(raw.to_vec()),
        }
    }
}

/// The server's messages of a pooled stream (observe mode): the answers
/// owed followed to ReadyForQuery, errors and FATALs; with the audit on,
/// each statement's rows and outcome gathered into one record.
pub(crate) struct Back<'a> {
    pub(crate) pooled: &'a mut Pooled,
    pub(crate) at: f64,
}

impl pg::Sink for Back<'_> {
    fn pass(&mut self, _bytes: &[u8]) {}

    fn message(&mut self, tag: u8, raw: &[u8], _complete: bool) {
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        let pooled = &mut *self.pooled;
        let owed = &mut pooled.owed;
        match tag {
            b'Z' => {
                // It ends the first Query or Sync owed, and whatever the
                // server skipped before it after an error.
                while let Some(kind) = owed.pop_front() {
                    if kind == b'Q' || kind == b'S' {
                        break;
                    }
                }
                pooled.status = pg::backend::ready_for_query(body).unwrap_or(b'E');
                while let Some(statement) = pooled.done() {
                    let kind = statement.kind;
                    if let (b'Q' | b'E', Some(author)) = (kind, &pooled.audit) {
                        statement.finish(author, self.at, kind == b'E');
                    }
                    if kind != b'E' {
                        break;
                    }
                }
            }
            b'E' => {
                let fields = pg::backend::notice_fields(body).unwrap_or_default();
                let field = |code: u8| fields.iter().find(|(c, _)| *c == code).map(|f| f.1);
                pooled.server_fatal |= matches!(field(b'S'), Some(b"FATAL" | b"PANIC"));
                // In the extended protocol the server skips to the next
                // Sync: the answers of what it skipped are owed no more,
                // and a Parse that failed or was skipped made no statement.
                let extended = !matches!(owed.front(), Some(b'Q' | b'S'));
                while owed.front().is_some_and(|&k| k != b'Q' && k != b'S') {
                    if owed.pop_front() == Some(b'P') {
                        (pooled.unnamed, pooled.unnamed_here) = (None, false);
                    }
                }
                // With no Sync sent yet, it skips what the client sends next.
                pooled.skipping |= extended && owed.is_empty();
                let state = field(b'C').and_then(|c| <[u8; 5]>::try_from(c).ok());
                if let Some(statement) = pooled.statements.front_mut() {
                    statement.sqlstate = statement.sqlstate.or(state.or(Some(*b"XX000")));
                    if statement.kind == b'E' {
                        let failed = pooled.done().expect("the front one");
                        if let Some(author) = &pooled.audit {
                            failed.finish(author, self.at, false);
                        }
                    }
                }
            }
            _ => {
                if owed.front().is_some_and(|&k| answer_ends(k).contains(&tag)) {
                    owed.pop_front();
                }
                let rows = if tag == b'C' {
                    pg::backend::command_complete(body)
                        .ok()
                        .and_then(pg::command_rows)
                } else {
                    None
                };
                let Some(statement) = pooled.statements.front_mut() else {
                    return;
                };
                if let Some(rows) = rows {
                    statement.rows = Some(statement.rows.unwrap_or(0) + rows);
                }
                if statement.kind == b'E' && matches!(tag, b'C' | b'I' | b's') {
                    let done = pooled.done().expect("the front one");
                    if let Some(author) = &pooled.audit {
                        done.finish(author, self.at, false);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLimits, AuditQueue, Who};

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
            assert!(native_text(sql.as_bytes()), "{sql}");
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
            assert!(!native_text(sql.as_bytes()), "{sql}");
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut raw = vec![tag];
        raw.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        raw.extend_from_slice(body);
        raw
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        msg(
            b'B',
            format!("{portal}\0{statement}\0\0\0\0\0\0\0").as_bytes(),
        )
    }

    fn execute() -> Vec<u8> {
        msg(b'E', b"\0\0\0\0\0")
    }

    fn error(state: &str) -> Vec<u8> {
        msg(b'E', format!("SERROR\0C{state}\0Mno\0\0").as_bytes())
    }

    /// A pooled stream with the audit on, holding a connection, and its queue.
    fn audited() -> (Pooled, Arc<AuditQueue>) {
        let limits = AuditLimits {
            max_records: 100,
            max_bytes: 1 << 20,
            max_statement_chars: 100,
        };
        let queue = AuditQueue::new(limits).unwrap();
        let who = Arc::new(Who {
            app: "shop".into(),
            alias: "orders".into(),
            session: None,
            keep_text: true,
        });
        let mut pooled = Pooled::new(PooledSpec {
            shelf: Shelf::new(Duration::from_secs(60)).unwrap(),
            wait_limit: Duration::from_secs(1),
            audit: Some(AuditAuthor {
                queue: queue.clone(),
                who,
            }),
        });
        pooled.lease = Some(Lease {
            id: 1,
            fd: -1,
            touched: true,
            expires: Instant::now() + Duration::from_secs(60),
        });
        (pooled, queue)
    }

    /// What the engine sends the server for these client messages.
    fn client(pooled: &mut Pooled, messages: &[Vec<u8>]) -> Vec<u8> {
        let mut front = Front {
            pooled,
            out: Vec::new(),
            dropped: 0,
            at: 1.0,
        };
        for raw in messages {
            pg::Sink::message(&mut front, raw[0], raw, true);
        }
        front.out
    }

    fn server(pooled: &mut Pooled, messages: &[Vec<u8>]) {
        let mut back = Back { pooled, at: 1.5 };
        for raw in messages {
            pg::Sink::message(&mut back, raw[0], raw, true);
        }
    }

    fn recorded(queue: &AuditQueue) -> Vec<(String, Option<i64>, String)> {
        let rows = queue.take(100).into_iter().map(|e| e.into_row(100));
        rows.map(|r| (r.text.unwrap_or_default(), r.rows, r.outcome.into_owned()))
            .collect()
    }

    #[test]
    fn the_unnamed_statement_and_portal_of_a_loan_are_relayed_and_followed() {
        let (mut pooled, queue) = audited();
        let sent = [
            parse("", "SELECT $1"),
            bind("", ""),
            msg(b'D', b"P\0"),
            execute(),
            msg(b'S', b""),
        ];
        assert_eq!(client(&mut pooled, &sent), sent.concat());
        assert!(pooled.handback.is_none());
        assert_eq!(pooled.owed, b"PBDES");
        assert!(!pooled.between_transactions(false), "answers owed");
        server(
            &mut pooled,
            &[
                msg(b'1', b""),
                msg(b'2', b""),
                msg(b'T', b"\0\0"),
                msg(b'C', b"SELECT 1\0"),
            ],
        );
        assert_eq!(pooled.owed, b"S");
        server(&mut pooled, &[msg(b'Z', b"I")]);
        assert!(pooled.between_transactions(false));
        let ok = ("SELECT $1".to_string(), Some(1), "ok".to_string());
        assert_eq!(recorded(&queue), [ok]);
        // Flushed but not synced: the implicit transaction holds the loan.
        client(&mut pooled, &[parse("", "SELECT 2"), msg(b'H', b"")]);
        server(&mut pooled, &[msg(b'1', b"")]);
        assert!(pooled.owed.is_empty() && !pooled.between_transactions(false));
        client(&mut pooled, &[msg(b'S', b"")]);
        server(&mut pooled, &[msg(b'Z', b"I")]);
        assert!(pooled.between_transactions(false));
        // On the next loan the connection's unnamed statement may be
        // another client's: a Bind without this loan's Parse goes to Python.
        pooled.end_loan();
        assert!(client(&mut pooled, &[bind("", ""), execute()]).is_empty());
        assert_eq!(pooled.handback, Some([bind("", ""), execute()].concat()));
    }

    #[test]
    fn an_error_skips_to_the_sync_and_the_executes_it_skipped_are_recorded_so() {
        let (mut pooled, queue) = audited();
        client(
            &mut pooled,
            &[
                parse("", "SELECT 1 / $1"),
                bind("", ""),
                execute(),
                bind("", ""),
                execute(),
                msg(b'S', b""),
            ],
        );
        server(
            &mut pooled,
            &[msg(b'1', b""), msg(b'2', b""), error("22012")],
        );
        assert_eq!(pooled.owed, b"S", "the rest is skipped");
        server(&mut pooled, &[msg(b'Z', b"I")]);
        let text = "SELECT 1 / $1".to_string();
        assert_eq!(
            recorded(&queue),
            [
                (text.clone(), None, "error:22012".to_string()),
                (text, None, "skipped".to_string())
            ]
        );
        // A failed Parse made no statement to bind.
        client(&mut pooled, &[parse("", "SELEC"), msg(b'S', b"")]);
        server(&mut pooled, &[error("42601"), msg(b'Z', b"I")]);
        assert!(pooled.unnamed.is_none());
        client(&mut pooled, &[bind("", "")]);
        assert!(pooled.handback.is_some());
    }

    #[test]
    fn after_an_error_with_no_sync_what_the_server_skips_goes_to_python() {
        let (mut pooled, _queue) = audited();
        client(&mut pooled, &[parse("", "SELEC 1"), msg(b'H', b"")]);
        server(&mut pooled, &[error("42601")]);
        assert!(pooled.skipping);
        client(&mut pooled, &[msg(b'S', b"")]); // the Sync ends the skipping
        assert!(!pooled.skipping && pooled.handback.is_none());
        server(&mut pooled, &[msg(b'Z', b"I")]);
        assert!(pooled.between_transactions(false));
        client(&mut pooled, &[parse("", "SELEC 1"), msg(b'H', b"")]);
        server(&mut pooled, &[error("42601")]);
        client(&mut pooled, &[parse("", "SELECT 2")]);
        assert_eq!(pooled.handback, Some(parse("", "SELECT 2")));
    }

    #[test]
    fn executes_of_a_long_statement_move_to_python_past_the_pending_text() {
        let (mut pooled, _queue) = audited();
        let long = format!("SELECT '{}'", "x".repeat(MAX_PENDING_TEXT / 3));
        let first = [
            parse("", &long),
            bind("", ""),
            execute(),
            bind("", ""),
            execute(),
        ];
        assert_eq!(client(&mut pooled, &first), first.concat());
        assert!(pooled.handback.is_none());
        // The third would hold more text than a handover may carry.
        assert!(client(&mut pooled, &[bind("", ""), execute()]).len() < 100);
        assert_eq!(pooled.handback, Some(execute()));
        let records = pooled.running();
        let texts: usize = records.iter().map(|r| r.raw.len()).sum();
        assert!(texts < MAX_PENDING_TEXT + long.len() * 2, "{texts}");
    }

    #[test]
    fn named_statements_and_portals_and_what_may_pin_go_to_python() {
        for messages in [
            vec![parse("s1", "SELECT 1")],
            vec![parse("", "SELECT 1"), bind("p1", "")],
            vec![parse("", "SET x = 1")],
            vec![parse("", "LISTEN ch")],
            vec![msg(b'D', b"S\0")], // no Parse on this loan
            vec![msg(b'E', b"\0\0\0\0\0")],
            vec![msg(b'P', b"\0no end")], // malformed: Python says what is wrong
        ] {
            let (mut pooled, _queue) = audited();
            client(&mut pooled, &messages);
            assert!(pooled.handback.is_some(), "{messages:?}");
        }
        // A simple Query drops the unnamed statement.
        let (mut pooled, _queue) = audited();
        client(
            &mut pooled,
            &[parse("", "SELECT 1"), msg(b'S', b""), query("SELECT 2")],
        );
        assert!(pooled.unnamed.is_none() && !pooled.unnamed_here);
        client(&mut pooled, &[bind("", "")]);
        assert!(pooled.handback.is_some());
    }
}
