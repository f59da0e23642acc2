//! The audit's statements, followed from the client's message that starts
//! each to the server's answer that ends it, inside the engine.
//!
//! Two relays follow them: a pooled stream ([`crate::pooled`], which knows
//! its statements' texts itself) and a session-mode stream with the audit
//! on and no statement guard ([`SessionStatements`], which reads them from
//! the scanners' reports). Both record each finished statement through an
//! [`AuditAuthor`] with its rows and outcome, exactly as Python's
//! `SessionWatch` does, so no Python runs per statement.
//!
//! The server answers in order, so statements on their way wait in one
//! queue: a simple Query ends at its ReadyForQuery; an Execute at its
//! CommandComplete, EmptyQueryResponse, PortalSuspended or ErrorResponse; a
//! Sync marks where the server stops skipping after an error (the Executes
//! before it that got no answer were skipped).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use qmesh_pg as pg;

use crate::audit::AuditAuthor;
use crate::engine::TapRecord;

/// The tap record kind a pooled stream makes itself (never a Postgres type
/// byte): a statement still running when the engine's part ended, which
/// Python's relay follows from there (`at` is when it started; `raw` is
/// [`Statement::record`]'s layout). Finished statements go to the audit's
/// queue from the engine.
pub const STATEMENT_RUNNING: u8 = 0x02;

/// The most text the statements on their way may count, a shared text
/// counted for each statement that holds it: what a client that pipelines
/// without reading its answers can make the engine keep is bounded.
pub(crate) const MAX_PENDING_TEXT: usize = 8 << 20;

/// The outcome of a statement that had no answer when the stream ended (the
/// client left, the session was ended): it may have reached the server and run.
pub(crate) const UNANSWERED: &str = "unanswered";

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
    /// Bytes of the text counted against [`MAX_PENDING_TEXT`].
    counted: usize,
}

impl Statement {
    pub(crate) fn new(kind: u8, text: Arc<[u8]>, started: f64) -> Statement {
        Statement {
            kind,
            counted: text.len(),
            text,
            started,
            rows: None,
            sqlstate: None,
        }
    }

    /// A tap record: started (`f64`), rows (`i64`, -1 for none), SQLSTATE
    /// (5 bytes, zeros for none), the kind (`Q`, `E` or `S`; `P` and `B`
    /// for the texts of the unnamed statement and portal), then the text.
    pub(crate) fn record(self, at: f64) -> TapRecord {
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
        self.record_as(author, at, outcome);
    }

    fn record_as(self, author: &AuditAuthor, at: f64, outcome: Cow<'static, str>) {
        let rows = self.rows.map(|r| i64::try_from(r).unwrap_or(i64::MAX));
        author.record(self.text, at - self.started, rows, outcome);
    }
}

/// The statements on their way, in the order the server answers them, and
/// where each is recorded when it ends. Without an author nothing is kept.
pub(crate) struct Statements {
    queue: VecDeque<Statement>,
    /// Bytes of the texts in `queue`, a shared text counted for each.
    text: usize,
    author: Option<AuditAuthor>,
    /// The text of every Sync.
    empty: Arc<[u8]>,
}

impl Statements {
    pub(crate) fn new(author: Option<AuditAuthor>) -> Statements {
        Statements {
            queue: VecDeque::new(),
            text: 0,
            author,
            empty: Arc::from(&b""[..]),
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.author.is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Note a statement (with the audit on); false past
    /// [`MAX_PENDING_TEXT`], when it is not noted.
    pub(crate) fn push(&mut self, kind: u8, text: Arc<[u8]>, at: f64) -> bool {
        if self.author.is_none() {
            return true;
        }
        if self.text + text.len() > MAX_PENDING_TEXT {
            return false;
        }
        self.text += text.len();
        self.queue.push_back(Statement::new(kind, text, at));
        true
    }

    /// Note a Sync (or what ends a batch as one does).
    pub(crate) fn push_sync(&mut self, at: f64) -> bool {
        let empty = self.empty.clone();
        self.push(b'S', empty, at)
    }

    /// Note a statement whose (shared) text is not counted.
    fn push_uncounted(&mut self, kind: u8, text: Arc<[u8]>, at: f64) {
        if self.author.is_some() {
            let statement = Statement::new(kind, text, at);
            self.queue.push_back(Statement {
                counted: 0,
                ..statement
            });
        }
    }

    /// Forget the statements noted after the first `len` (their messages
    /// never reached the server).
    pub(crate) fn truncate(&mut self, len: usize) {
        for statement in self.queue.drain(len.min(self.queue.len())..) {
            self.text -= statement.counted;
        }
    }

    /// Every statement on its way, as tap records (oldest first): Python's
    /// relay follows them from here.
    pub(crate) fn running(&mut self) -> impl Iterator<Item = TapRecord> + '_ {
        self.text = 0;
        self.queue.drain(..).map(|statement| {
            let at = statement.started;
            statement.record(at)
        })
    }

    /// The stream ends with these statements unanswered: each is recorded,
    /// ended at `at`, as [`UNANSWERED`]. The server may have run them, so
    /// the audit must not lose them.
    pub(crate) fn end_unanswered(&mut self, at: f64) {
        self.text = 0;
        let queue = std::mem::take(&mut self.queue);
        let Some(author) = &self.author else {
            return;
        };
        for statement in queue {
            if statement.kind == b'Q' || statement.kind == b'E' {
                statement.record_as(author, at, Cow::Borrowed(UNANSWERED));
            }
        }
    }

    /// The session ends on the answer coming now: the statement it answers
    /// (not one already finished) is recorded with `sqlstate`, whatever
    /// the rest of its answer says.
    pub(crate) fn ends_on_front(&mut self, sqlstate: [u8; 5]) {
        if let Some(front) = self.queue.front_mut().filter(|s| s.kind != b'S') {
            front.sqlstate = Some(sqlstate);
        }
    }

    fn pop(&mut self) -> Option<Statement> {
        let statement = self.queue.pop_front()?;
        self.text -= statement.counted;
        Some(statement)
    }

    fn finish(&self, statement: Statement, at: f64, skipped: bool) {
        if let Some(author) = &self.author {
            statement.finish(author, at, skipped);
        }
    }

    /// The server's message `raw` (type `tag`), seen at `at`: what it ends.
    /// Other kinds than ReadyForQuery, ErrorResponse, CommandComplete,
    /// EmptyQueryResponse and PortalSuspended change nothing. An
    /// ErrorResponse may be its first bytes alone (its SQLSTATE is there).
    pub(crate) fn server(&mut self, tag: u8, raw: &[u8], at: f64) {
        if self.queue.is_empty() {
            return;
        }
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        match tag {
            // The first Query ends, or everything up to a Sync: the
            // Executes before it that got no answer were skipped.
            b'Z' => {
                while let Some(statement) = self.pop() {
                    let kind = statement.kind;
                    if kind != b'S' {
                        self.finish(statement, at, kind == b'E');
                    }
                    if kind != b'E' {
                        break;
                    }
                }
            }
            b'E' => {
                let state = pg::backend::notice_field(body, b'C')
                    .and_then(|value| <[u8; 5]>::try_from(value).ok());
                let front = self.queue.front_mut().expect("not empty");
                front.sqlstate = front.sqlstate.or(state.or(Some(*b"XX000")));
                if front.kind == b'E' {
                    let failed = self.pop().expect("the front one");
                    self.finish(failed, at, false);
                }
            }
            b'C' | b'I' | b's' => {
                let rows = if tag == b'C' {
                    pg::backend::command_complete(body)
                        .ok()
                        .and_then(pg::command_rows)
                } else {
                    None
                };
                let front = self.queue.front_mut().expect("not empty");
                if let Some(rows) = rows {
                    front.rows = Some(front.rows.unwrap_or(0).saturating_add(rows));
                }
                if front.kind == b'E' {
                    let done = self.pop().expect("the front one");
                    self.finish(done, at, false);
                }
            }
            _ => {}
        }
    }
}

impl Drop for Statements {
    /// Whatever way the stream ends, what it sent is not lost from the audit.
    fn drop(&mut self) {
        self.end_unanswered(crate::sys::monotonic());
    }
}

/// Names the audit remembers per session (statements, and portals
/// apart), and the bytes of their names and texts: past either, one is
/// forgotten for each new one (only its text for the audit is lost; the
/// server still has it).
const MAX_TRACKED_NAMES: usize = 10_000;
const MAX_TRACKED_BYTES: usize = 16 << 20;

/// The text of a statement or portal prepared where the audit could not see it.
const UNKNOWN_STATEMENT: &[u8] = b"<statement prepared before the audit could see it>";

/// The text of a statement noted past [`MAX_PENDING_TEXT`].
const TEXT_NOT_KEPT: &[u8] = b"<text not kept: too many statements waiting for the server>";

/// What a session-mode stream's audit follows: its statements, and the
/// texts behind the client's statement and portal names. It reads the
/// messages the stream's scanners report: Query and Parse whole; Bind,
/// Execute and Close by their front (a peek, room for any name the server
/// tells apart); Sync and FunctionCall, which each end a batch.
pub(crate) struct SessionStatements {
    pub(crate) statements: Statements,
    prepared: Names,
    portals: Names,
    unknown: Arc<[u8]>,
    dropped: Arc<[u8]>,
}

impl SessionStatements {
    pub(crate) fn new(author: AuditAuthor) -> SessionStatements {
        SessionStatements {
            statements: Statements::new(Some(author)),
            prepared: Names::default(),
            portals: Names::default(),
            unknown: Arc::from(UNKNOWN_STATEMENT),
            dropped: Arc::from(TEXT_NOT_KEPT),
        }
    }

    /// The client's message `raw` (type `tag`, or its front), relayed at
    /// `at`. A malformed one is left to the server, which ends the session
    /// with its own error.
    pub(crate) fn client(&mut self, tag: u8, raw: &[u8], at: f64) {
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        match tag {
            b'Q' => {
                let text = body.strip_suffix(b"\0").unwrap_or(body);
                self.push(tag, text.into(), at);
            }
            b'P' => {
                if let Ok(pg::Frontend::Parse { name, sql, .. }) = pg::Frontend::parse(tag, body) {
                    self.prepared.remember(name, sql.into());
                }
            }
            b'B' => {
                if let Some((portal, statement)) = pg::frontend::bind_names(body) {
                    let text = self
                        .prepared
                        .get(statement)
                        .unwrap_or(&self.unknown)
                        .clone();
                    self.portals.remember(portal, text);
                }
            }
            b'E' => {
                // Followed even when its name cannot be read: the server
                // answers it all the same.
                let text = leading_name(body).and_then(|portal| self.portals.get(portal));
                let text = text.unwrap_or(&self.unknown).clone();
                self.push(tag, text, at);
            }
            b'C' => {
                if let Some((&kind, rest)) = body.split_first() {
                    if let Some(name) = leading_name(rest) {
                        let names = if kind == b'S' {
                            &mut self.prepared
                        } else {
                            &mut self.portals
                        };
                        names.remove(name);
                    }
                }
            }
            b'S' | b'F' => {
                // A Sync's text is empty: it is always noted.
                self.statements.push_sync(at);
            }
            _ => {}
        }
    }

    /// Past [`MAX_PENDING_TEXT`] a statement's text is not kept: it is
    /// followed with a text of its own kind, so the answers still pair up.
    /// How many wait is bounded by the stream's window and the server's
    /// reading, as in Python's relay.
    fn push(&mut self, kind: u8, text: Arc<[u8]>, at: f64) {
        if !self.statements.push(kind, text, at) {
            self.statements
                .push_uncounted(kind, self.dropped.clone(), at);
        }
    }
}

/// The name a message body starts with (a NUL-terminated string); None
/// when the terminator is not in it (a front cut short, or malformed).
fn leading_name(body: &[u8]) -> Option<&[u8]> {
    let end = body.iter().position(|&b| b == 0)?;
    Some(&body[..end])
}

/// The texts behind one kind of the client's names (statements, or
/// portals), bounded by [`MAX_TRACKED_NAMES`] and [`MAX_TRACKED_BYTES`].
#[derive(Default)]
struct Names {
    texts: HashMap<Box<[u8]>, Arc<[u8]>>,
    /// Bytes of the names and their texts (a shared text counted for each).
    bytes: usize,
}

impl Names {
    fn get(&self, name: &[u8]) -> Option<&Arc<[u8]>> {
        self.texts.get(name)
    }

    fn remove(&mut self, name: &[u8]) {
        if let Some((name, text)) = self.texts.remove_entry(name) {
            self.bytes -= name.len() + text.len();
        }
    }

    /// `name` stands for `text` from now on; one larger than the whole
    /// bound is forgotten instead.
    fn remember(&mut self, name: &[u8], text: Arc<[u8]>) {
        self.remove(name);
        let size = name.len() + text.len();
        if size > MAX_TRACKED_BYTES {
            return;
        }
        while self.texts.len() >= MAX_TRACKED_NAMES || self.bytes + size > MAX_TRACKED_BYTES {
            let Some(old) = self.texts.keys().next().cloned() else {
                break;
            };
            self.remove(&old);
        }
        self.bytes += size;
        self.texts.insert(name.into(), text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::testing::{self, recorded};
    use crate::audit::AuditQueue;
    use pg::encode;

    fn session() -> (SessionStatements, Arc<AuditQueue>) {
        let (author, queue) = testing::author(4 * MAX_PENDING_TEXT);
        (SessionStatements::new(author), queue)
    }

    fn client(session: &mut SessionStatements, messages: &[Vec<u8>]) {
        for raw in messages {
            session.client(raw[0], raw, 1.0);
        }
    }

    fn server(session: &mut SessionStatements, messages: &[Vec<u8>]) {
        for raw in messages {
            session.statements.server(raw[0], raw, 1.5);
        }
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        encode::bind(portal.as_bytes(), statement.as_bytes(), &[], &[], &[]).unwrap()
    }

    fn execute(portal: &str) -> Vec<u8> {
        encode::execute(portal.as_bytes(), 0).unwrap()
    }

    fn close(kind: u8, name: &str) -> Vec<u8> {
        encode::message(b'C', &[&[kind], name.as_bytes(), b"\0"].concat()).unwrap()
    }

    fn sync() -> Vec<u8> {
        encode::message(b'S', b"").unwrap()
    }

    fn complete(tag: &str) -> Vec<u8> {
        encode::message(b'C', &[tag.as_bytes(), b"\0"].concat()).unwrap()
    }

    fn error(sqlstate: &str) -> Vec<u8> {
        let fields = [(b'S', "ERROR"), (b'C', sqlstate), (b'M', "no")];
        encode::error_response(b'E', &fields).unwrap()
    }

    fn ready() -> Vec<u8> {
        encode::ready_for_query(b'I').unwrap()
    }

    fn owned(text: &str, rows: Option<i64>, outcome: &str) -> (String, Option<i64>, String) {
        (text.into(), rows, outcome.into())
    }

    #[test]
    fn a_pipeline_is_recorded_with_rows_errors_and_what_the_server_skipped() {
        let (mut session, queue) = session();
        client(
            &mut session,
            &[
                encode::parse(b"s1", b"SELECT g FROM generate_series(1, $1) g", &[]).unwrap(),
                bind("p1", "s1"),
                execute("p1"),
                encode::parse(b"", b"SELECT * FROM missing", &[]).unwrap(),
                bind("", ""),
                execute(""),
                bind("", "s1"),
                execute(""),
                sync(),
            ],
        );
        server(
            &mut session,
            &[
                encode::message(b'1', b"").unwrap(),
                encode::message(b'2', b"").unwrap(),
                complete("SELECT 3"),
                error("42P01"),
                ready(),
            ],
        );
        assert_eq!(
            recorded(&queue),
            [
                owned("SELECT g FROM generate_series(1, $1) g", Some(3), "ok"),
                owned("SELECT * FROM missing", None, "error:42P01"),
                owned("SELECT g FROM generate_series(1, $1) g", None, "skipped"),
            ]
        );
        assert_eq!(session.statements.len(), 0);
    }

    #[test]
    fn statements_unanswered_when_the_stream_ends_are_recorded_as_such() {
        let (mut session, queue) = session();
        let q = |sql: &str| encode::query(sql.as_bytes()).unwrap();
        client(
            &mut session,
            &[
                q("DELETE FROM orders"),
                encode::parse(b"", b"UPDATE t SET x = 1", &[]).unwrap(),
                bind("", ""),
                execute(""),
                sync(),
            ],
        );
        // The DELETE's rows came, not its ReadyForQuery.
        server(&mut session, &[complete("DELETE 7")]);
        session.statements.end_unanswered(2.0);
        assert_eq!(
            recorded(&queue),
            [
                owned("DELETE FROM orders", Some(7), UNANSWERED),
                owned("UPDATE t SET x = 1", None, UNANSWERED),
            ]
        );
        // However the stream goes, what it sent is recorded.
        client(&mut session, &[q("SELECT pg_sleep(60)")]);
        drop(session);
        assert_eq!(
            recorded(&queue),
            [owned("SELECT pg_sleep(60)", None, UNANSWERED)]
        );
    }

    #[test]
    fn the_statement_a_session_ends_on_is_marked_and_those_after_keep_their_outcomes() {
        let (mut session, queue) = session();
        let q = |sql: &str| encode::query(sql.as_bytes()).unwrap();
        client(
            &mut session,
            &[
                q("SELECT lift()"),
                q("INSERT INTO t VALUES (1)"),
                q("SELECT 2"),
            ],
        );
        server(&mut session, &[complete("SELECT 1")]);
        session.statements.ends_on_front(*b"25006");
        server(&mut session, &[ready(), complete("INSERT 0 1"), ready()]);
        assert_eq!(
            recorded(&queue),
            [
                owned("SELECT lift()", Some(1), "error:25006"),
                owned("INSERT INTO t VALUES (1)", Some(1), "ok"),
            ]
        );
        drop(session);
        assert_eq!(recorded(&queue), [owned("SELECT 2", None, UNANSWERED)]);
    }

    #[test]
    fn a_simple_query_ends_at_ready_for_query_with_all_its_rows_or_its_first_error() {
        let (mut session, queue) = session();
        let q = |sql: &str| encode::query(sql.as_bytes()).unwrap();
        client(
            &mut session,
            &[q("SELECT 1; SELECT 2, 3"), q("SELECT 1/0; SELECT 1")],
        );
        server(
            &mut session,
            &[complete("SELECT 1"), complete("SELECT 1"), ready()],
        );
        server(&mut session, &[error("22012"), ready()]);
        assert_eq!(
            recorded(&queue),
            [
                owned("SELECT 1; SELECT 2, 3", Some(2), "ok"),
                owned("SELECT 1/0; SELECT 1", None, "error:22012"),
            ]
        );
    }

    #[test]
    fn names_closed_or_never_seen_are_recorded_as_unknown() {
        let (mut session, queue) = session();
        client(
            &mut session,
            &[
                encode::parse(b"s1", b"SELECT 1", &[]).unwrap(),
                close(b'S', "s1"),
                bind("", "s1"),
                execute(""),
                execute("never_bound"),
                sync(),
            ],
        );
        server(
            &mut session,
            &[complete("SELECT 1"), complete("SELECT 1"), ready()],
        );
        let unknown = String::from_utf8_lossy(UNKNOWN_STATEMENT).into_owned();
        assert_eq!(
            recorded(&queue),
            [
                (unknown.clone(), Some(1), "ok".into()),
                (unknown, Some(1), "ok".into())
            ]
        );
    }

    #[test]
    fn statements_of_a_chunk_the_server_never_got_are_forgotten() {
        let (mut session, queue) = session();
        client(&mut session, &[encode::query(b"SELECT 1").unwrap()]);
        let before = session.statements.len();
        client(&mut session, &[encode::query(b"SELECT 2").unwrap()]);
        session.statements.truncate(before);
        server(&mut session, &[complete("SELECT 1"), ready(), ready()]);
        assert_eq!(recorded(&queue), [owned("SELECT 1", Some(1), "ok")]);
    }

    #[test]
    fn past_the_text_bound_statements_are_still_paired_with_their_answers() {
        let (mut session, queue) = session();
        let long = format!("SELECT '{}'", "x".repeat(MAX_PENDING_TEXT / 2));
        let messages = [long.as_str(), long.as_str(), "SELECT 3"]
            .map(|sql| encode::query(sql.as_bytes()).unwrap());
        client(&mut session, &messages);
        assert_eq!(session.statements.len(), 3);
        assert!(session.statements.text <= MAX_PENDING_TEXT);
        for _ in 0..3 {
            server(&mut session, &[complete("SELECT 1"), ready()]);
        }
        let texts: Vec<String> = recorded(&queue).into_iter().map(|r| r.0).collect();
        let not_kept = String::from_utf8_lossy(TEXT_NOT_KEPT).into_owned();
        assert_eq!(texts[1..], [not_kept, "SELECT 3".into()]);
        assert!(texts[0].starts_with("SELECT 'xxx"));
        assert_eq!(session.statements.text, 0);
    }

    proptest::proptest! {
        /// Whatever a hostile client and server send (the scanners check
        /// only framing), following it never panics, and the text counted
        /// against the bound is the text held.
        #[test]
        fn any_messages_are_followed_and_the_count_holds(
            messages in proptest::collection::vec(
                (
                    proptest::bool::ANY,
                    proptest::sample::select(b"QPBECSFXZIsT12n".to_vec()),
                    // Few symbols: NULs and repeated names hit every path.
                    proptest::collection::vec(proptest::sample::select(b"\0\0abSP\x01".to_vec()), 0..24),
                ),
                0..80,
            )
        ) {
            let (mut session, _queue) = session();
            for (from_client, tag, body) in messages {
                let length = u32::try_from(body.len() + 4).unwrap().to_be_bytes();
                let raw = [&[tag][..], &length, &body].concat();
                if from_client {
                    session.client(tag, &raw, 1.0);
                } else {
                    session.statements.server(tag, &raw, 2.0);
                }
                let held: usize = session.statements.queue.iter().map(|s| s.counted).sum();
                proptest::prop_assert_eq!(held, session.statements.text);
            }
        }
    }

    #[test]
    fn the_names_remembered_are_bounded() {
        let (mut session, _queue) = session();
        for i in 0..MAX_TRACKED_NAMES + 10 {
            let name = format!("s{i}");
            let parse = encode::parse(name.as_bytes(), b"SELECT 1", &[]).unwrap();
            client(&mut session, &[parse.clone(), bind(&name, &name)]);
        }
        assert_eq!(session.prepared.texts.len(), MAX_TRACKED_NAMES);
        assert_eq!(session.portals.texts.len(), MAX_TRACKED_NAMES);
        assert!(session.prepared.get(b"s10009").is_some());
        // And their bytes: long texts push the oldest out.
        let long = "x".repeat(MAX_TRACKED_BYTES / 8);
        for i in 0..20 {
            let parse = encode::parse(format!("l{i}").as_bytes(), long.as_bytes(), &[]).unwrap();
            client(&mut session, &[parse]);
        }
        let held: usize = session
            .prepared
            .texts
            .iter()
            .map(|(n, t)| n.len() + t.len())
            .sum();
        assert_eq!(held, session.prepared.bytes);
        assert!(held <= MAX_TRACKED_BYTES && session.prepared.get(b"l19").is_some());
        let huge = "x".repeat(MAX_TRACKED_BYTES + 1);
        client(
            &mut session,
            &[encode::parse(b"huge", huge.as_bytes(), &[]).unwrap()],
        );
        assert!(session.prepared.get(b"huge").is_none());
    }
}
