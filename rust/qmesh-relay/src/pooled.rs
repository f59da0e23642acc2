//! A transaction-mode client session relayed by the engine: the client's
//! stream borrows a server connection from its pool's [`Shelf`] when a
//! transaction starts, and gives it back at the server's ReadyForQuery
//! *idle* with no answer still due, all on the engine thread.
//!
//! The engine relays what it can follow exactly: simple Queries and the
//! extended protocol (psycopg's and JDBC's default, asyncpg, `pgbench -M
//! extended` and `-M prepared`) with the unnamed portal, of statements
//! that cannot leave session state behind; Sync, Flush and Terminate.
//!
//! - **The unnamed statement** is relayed when it was parsed on the loan
//!   that uses it: PostgreSQL keeps it across transactions, but the
//!   connection may hold another client's by the next loan.
//! - **Named statements** are renamed as Python's relay names them
//!   (`qmesh_` and a hash of the text and parameter types, so clients
//!   share one server copy), on the connection's shared set of names
//!   ([`Prepared`]): a Bind or Describe of one the connection lacks is
//!   preceded by its Parse, whose ParseComplete the client never sees. A
//!   Parse of one the connection has, and a Close (the server's copy
//!   stays for the others), are stood in for by a Close of a name no
//!   connection has, which the server answers in its turn with a
//!   CloseComplete: the client gets its ParseComplete or CloseComplete in
//!   order, and nothing is made up out of turn. A message that needs to
//!   know the connection waits for one ([`Pooled::deferred`]).
//!
//! The first message it cannot relay (a named portal, a Bind of an unnamed
//! statement parsed on another loan, a re-Parse of an open name, a
//! FunctionCall, COPY, a statement that could pin the session or that names
//! one of a statement guard's words) ends the
//! engine's part as soon as the server's bytes are between two messages:
//! that message and all that follows go to Python's relay
//! ([`PooledEnd::leftover`]), with the connection if the client holds one
//! (a transaction block or pipeline open, or answers still owed, which
//! Python's relay then passes on) and the client's named statements.
//! Python's relay gives the session back once it stands between
//! transactions again, unpinned, with the client's statements
//! ([`PooledSpec::statements`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qmesh_pg as pg;

use crate::audit::{hex_digits, AuditAuthor};
use crate::engine::{mentions_any, TapRecord};
use crate::pool::{Lease, Prepared, Shelf};
use crate::readonly::{self, AnswerCut};
use crate::statements::{Statement, Statements};

/// What makes a native stream a pooled one.
pub struct PooledSpec {
    pub shelf: Arc<Shelf>,
    /// How long the client may wait in line before its session ends
    /// ([`crate::Ending::PoolTimeout`]).
    pub wait_limit: Duration,
    /// Past this many statements prepared on a connection, a client's
    /// Close reaches the server, and the connection is closed when it
    /// comes back (a long loan must not gather them without bound).
    pub max_prepared: usize,
    /// The client's named statements so far (a session back from Python's
    /// relay): (its name, the server's name, the Parse that makes it).
    pub statements: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    /// The client's unnamed statement so far (its Parse), if any.
    pub unnamed: Option<Vec<u8>>,
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
    /// The answers the server still owes, in order.
    pub owed: Vec<OwedAnswer>,
    /// The client's named statements: (its name, the server's name, the
    /// Parse that makes it on a connection).
    pub statements: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
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
    /// Transactions the engine relayed to their end (connections it gave
    /// back between transactions) in this part of the session.
    pub transactions: u64,
}

/// An answer the server owes, and what was booked for its message, undone
/// if an error makes the server skip it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedAnswer {
    /// The client message's type byte, or what the engine sent in its
    /// stead: `i` a Parse it added (its ParseComplete is not the client's),
    /// `p` a Close standing in for a Parse of a statement the connection
    /// has (its CloseComplete goes to the client as a ParseComplete), `c` a
    /// Close standing in for the client's Close of a statement the
    /// connection keeps.
    pub kind: u8,
    /// The server's name of the statement a Parse (`P`, `i`) prepares or a
    /// Close (`C`) closes; empty for none.
    pub target: Vec<u8>,
    /// The client's name of the statement (`P`, `p`, `c`, `C`); empty for none.
    pub name: Vec<u8>,
    /// The client's statement a Close forgot (`c`, `C`): (server name, Parse).
    pub saved: Option<(Vec<u8>, Vec<u8>)>,
}

/// Words a Query names when it might leave session state behind (a SET,
/// LISTEN, PREPARE, a WITH HOLD cursor, a temporary table, a session
/// advisory lock, LOAD, set_config, DEALLOCATE, DISCARD) or start COPY:
/// Python's relay decides those exactly. Each stands alone as a word, so
/// that `payload`, `attempts` or `threshold` are no alarm; a false alarm
/// (a column named `temp`) costs only the engine's speed for that session.
const HANDED_TO_PYTHON: &[&[u8]] = &[
    b"listen",
    b"prepare",
    b"hold",
    b"temp",
    b"temporary",
    b"load",
    b"deallocate",
    b"discard",
    b"copy",
];

/// Names that may sit inside a longer one (`pg_try_advisory_lock`,
/// `pg_catalog.set_config`).
const HANDED_TO_PYTHON_INSIDE: &[&[u8]] = &[b"advisory", b"set_config"];

/// Whether the engine can relay a statement of this text itself (a
/// Query's, or a Parse's).
pub(crate) fn native_text(text: &[u8]) -> bool {
    !names_any(text, HANDED_TO_PYTHON, true)
        && !names_any(text, HANDED_TO_PYTHON_INSIDE, false)
        && !sets_session(text)
}

/// Whether `text` contains any of `words` (lowercase, each starting with a
/// letter), ignoring ASCII case, as a word of its own if `alone`: one pass
/// over the text, and only at a letter that starts one of them are they
/// compared (the engine screens every statement).
fn names_any(text: &[u8], words: &[&[u8]], alone: bool) -> bool {
    let starts = words
        .iter()
        .fold(0u32, |mask, word| mask | 1 << (word[0] - b'a'));
    (0..text.len()).any(|i| {
        let first = text[i].to_ascii_lowercase();
        if !first.is_ascii_lowercase() || starts & 1 << (first - b'a') == 0 {
            return false;
        }
        if alone && i > 0 && is_word_byte(text[i - 1]) {
            return false;
        }
        let rest = &text[i..];
        words.iter().any(|word| {
            word[0] == first
                && rest.len() >= word.len()
                && rest[..word.len()].eq_ignore_ascii_case(word)
                && !(alone && rest.get(word.len()).is_some_and(|b| is_word_byte(*b)))
        })
    })
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

/// Whether the engine may relay a statement of this text: nothing in it
/// may leave session state, and a guard has nothing in it to judge.
fn relayable(text: &[u8], guard_screen: &[Vec<u8>]) -> bool {
    native_text(text) && !mentions_any(text, guard_screen)
}

/// A byte of an identifier (PostgreSQL's: letters, digits, `_`, `$`, and
/// anything not ASCII).
fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$' || byte >= 0x80
}

/// A pooled stream's state in the engine.
pub(crate) struct Pooled {
    pub(crate) shelf: Arc<Shelf>,
    pub(crate) wait_limit: Duration,
    pub(crate) lease: Option<Lease>,
    /// The place in line while waiting for a connection, and until when.
    pub(crate) waiting: Option<(u64, Instant)>,
    /// The answers the server still owes, in order, until each ends
    /// ([`answer_ends`]). Python's relay takes over the rest.
    pub(crate) owed: VecDeque<Owed>,
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
    /// The client's named statements, by the client's names.
    named: HashMap<Box<[u8]>, Named>,
    /// The bytes of their Parses, together.
    named_bytes: usize,
    max_prepared: usize,
    /// Whole client messages waiting for a connection, in order: from the
    /// first that needs to know which statements its connection has (a
    /// named statement's Parse, Bind, Describe or Close) when there is
    /// none. They are relayed once one is lent.
    pub(crate) deferred: Vec<u8>,
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
    /// Connections given back between transactions.
    pub(crate) transactions: u64,
    /// The audit's statements on their way (with an author).
    pub(crate) statements: Statements,
    guard_screen: Vec<Vec<u8>>,
}

/// Answers one client's messages may await at once in the engine: a longer
/// pipeline moves to Python's relay, which bounds it with an error (54000).
/// Every request here reaches the server, so the server's reading bounds it
/// too; this keeps what a client can make the engine hold small.
const MAX_OWED: usize = 10_000;

/// Named statements one client may hold, and the bytes of their Parses
/// together: past either, Python's relay says so (SQLSTATE 53400).
const MAX_CLIENT_STATEMENTS: usize = 10_000;
const MAX_STATEMENT_BYTES: usize = 16 << 20;

/// Server names of statements: this prefix and a hash (as Python's relay
/// makes them).
const SERVER_PREFIX: &[u8] = b"qmesh_";
const SERVER_HASH_LEN: usize = 12;

/// A Close of a statement no connection has: the server answers it with
/// a CloseComplete (closing an absent name is no error), which stands in
/// for an answer the engine would otherwise make up. The name is never a
/// server name ([`server_name`]'s hashes are hexadecimal).
const ABSENT_CLOSE: &[u8] = b"C\0\0\0\x12Sqmesh_absent\0";
const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";

/// The client's Parse of the unnamed statement, and the statement's text.
pub(crate) struct Unnamed {
    pub(crate) parse: Vec<u8>,
    text: Arc<[u8]>,
    /// Whether the engine may relay the statement ([`Pooled::relays`]): a
    /// statement Python's relay prepared may be one it may not.
    relays: bool,
}

/// A client's named statement: its server name, the Parse that makes it on
/// a connection, its text for the audit, and whether the engine may relay
/// it (as [`Unnamed::relays`]).
#[derive(Clone)]
pub(crate) struct Named {
    target: Arc<[u8]>,
    parse: Arc<[u8]>,
    text: Arc<[u8]>,
    relays: bool,
}

/// An answer owed (see [`OwedAnswer`], whose fields these are).
pub(crate) struct Owed {
    kind: u8,
    target: Option<Arc<[u8]>>,
    name: Option<Box<[u8]>>,
    saved: Option<Named>,
}

impl Owed {
    fn plain(kind: u8) -> Owed {
        Owed {
            kind,
            target: None,
            name: None,
            saved: None,
        }
    }

    pub(crate) fn answer(self) -> OwedAnswer {
        OwedAnswer {
            kind: self.kind,
            target: self.target.as_deref().unwrap_or_default().to_vec(),
            name: self.name.as_deref().unwrap_or_default().to_vec(),
            saved: self.saved.map(|s| (s.target.to_vec(), s.parse.to_vec())),
        }
    }
}

/// The server message types that end the answer to a client message of
/// type `kind` (ParameterDescription precedes a statement's description,
/// rows precede an Execute's completion), or to what the engine sent.
fn answer_ends(kind: u8) -> &'static [u8] {
    match kind {
        b'P' | b'i' => b"1",
        b'B' => b"2",
        b'D' => b"Tn",
        b'E' => b"CIs",
        b'C' | b'p' | b'c' => b"3",
        _ => b"Z", // a Query or a Sync
    }
}

/// The server's name of a statement: [`SERVER_PREFIX`] and the hex of a
/// 12-byte BLAKE2b of what follows the name in its Parse (the text, its
/// terminator and the parameter types): the same whoever prepares it.
fn server_name(statement: &[u8]) -> Arc<[u8]> {
    use blake2::digest::{Update, VariableOutput};
    let mut hasher = blake2::Blake2bVar::new(SERVER_HASH_LEN).expect("a valid BLAKE2b size");
    hasher.update(statement);
    let mut digest = [0u8; SERVER_HASH_LEN];
    hasher
        .finalize_variable(&mut digest)
        .expect("the size asked for");
    let mut name = SERVER_PREFIX.to_vec();
    name.extend(hex_digits(&digest));
    name.into()
}

/// A message of type `tag` whose body is `parts` laid end to end.
fn frame(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let length = u32::try_from(body + 4).expect("a body within the scanner's limit");
    let mut out = Vec::with_capacity(body + pg::HEADER_LEN);
    out.push(tag);
    out.extend_from_slice(&length.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// The whole messages laid end to end in `buffer`: (type, message); it
/// stops at anything less than a whole message.
pub(crate) fn messages(mut buffer: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let header = buffer.get(..pg::HEADER_LEN)?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let message = buffer.get(..1 + length as usize)?;
        buffer = &buffer[message.len()..];
        Some((message[0], message))
    })
}

/// What the engine does with one client message.
enum Step {
    /// Relayed (what goes to the server is written out).
    Relayed,
    /// It needs a connection's statements, and none is held: it waits.
    Deferred,
    /// Python's relay takes it, and all that follows.
    Python,
}

impl Pooled {
    /// A pooled stream's state; `guard_screen` is its tap's (see
    /// [`crate::PgTap`]).
    pub(crate) fn new(
        spec: PooledSpec,
        audit: Option<AuditAuthor>,
        guard_screen: Vec<Vec<u8>>,
    ) -> Pooled {
        // What the client prepared before (in Python's relay); a Parse that
        // does not parse is left to the server's own error when it is bound.
        let text = |parse: &[u8]| match pg::Frontend::parse(b'P', &parse[pg::HEADER_LEN..]) {
            Ok(pg::Frontend::Parse { sql, .. }) => Arc::from(sql),
            _ => Arc::from(&b""[..]),
        };
        let named: HashMap<Box<[u8]>, Named> = spec
            .statements
            .into_iter()
            .filter(|(_, _, parse)| parse.len() > pg::HEADER_LEN)
            .map(|(name, target, parse)| {
                let text = text(&parse);
                let statement = Named {
                    target: target.into(),
                    relays: relayable(&text, &guard_screen),
                    text,
                    parse: parse.into(),
                };
                (name.into_boxed_slice(), statement)
            })
            .collect();
        let unnamed = spec
            .unnamed
            .filter(|parse| parse.len() > pg::HEADER_LEN)
            .map(|parse| {
                let text = text(&parse);
                Unnamed {
                    relays: relayable(&text, &guard_screen),
                    text,
                    parse,
                }
            });
        Pooled {
            shelf: spec.shelf,
            wait_limit: spec.wait_limit,
            lease: None,
            waiting: None,
            owed: VecDeque::new(),
            open_pipeline: false,
            status: b'I',
            unnamed,
            unnamed_here: false,
            named_bytes: named.values().map(|s| s.parse.len()).sum(),
            named,
            max_prepared: spec.max_prepared,
            deferred: Vec::new(),
            skipping: false,
            portal: None,
            handback: None,
            terminated: false,
            server_fatal: false,
            transactions: 0,
            statements: Statements::new(audit),
            guard_screen,
        }
    }

    /// Whether the engine may relay a statement of this text (a Query's or
    /// a Parse's), with this stream's guard ([`relayable`]).
    fn relays(&self, text: &[u8]) -> bool {
        relayable(text, &self.guard_screen)
    }

    /// What Python's relay follows from here: the texts of the unnamed
    /// statement and portal, and the audit's statements still running.
    pub(crate) fn running(&mut self) -> Vec<TapRecord> {
        let mut records = Vec::new();
        if self.statements.is_on() {
            if let Some(unnamed) = &self.unnamed {
                records.push(Statement::new(b'P', unnamed.text.clone(), 0.0).record(0.0));
            }
            if let Some(text) = &self.portal {
                records.push(Statement::new(b'B', text.clone(), 0.0).record(0.0));
            }
        }
        records.extend(self.statements.running());
        records
    }

    /// The client's named statements, handed to Python's relay.
    pub(crate) fn take_named(&mut self) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        self.named_bytes = 0;
        self.named
            .drain()
            .map(|(name, s)| (name.into_vec(), s.target.to_vec(), s.parse.to_vec()))
            .collect()
    }

    /// Whether the connection may go back to the shelf now: nothing owed
    /// or waiting, no pipeline open, the server idle outside a transaction
    /// block, and neither side inside a message.
    pub(crate) fn between_transactions(&self, in_message: bool) -> bool {
        self.lease.is_some()
            && self.owed.is_empty()
            && self.deferred.is_empty()
            && !self.open_pipeline
            && self.status == b'I'
            && !in_message
    }

    /// Whether a connection that comes back from this loan holds more
    /// statements than a connection may keep.
    pub(crate) fn over_prepared(&self, lease: &Lease) -> bool {
        lease.prepared.len() > self.max_prepared
    }

    /// The connection, given back: what this loan made on it stays there.
    pub(crate) fn end_loan(&mut self) -> Option<Lease> {
        self.transactions += 1;
        self.unnamed_here = false;
        self.portal = None;
        self.lease.take()
    }

    fn owe(&mut self, owed: Owed) {
        self.open_pipeline = true;
        self.owed.push_back(owed);
    }

    fn remember(&mut self, name: &[u8], statement: Named) {
        self.named_bytes += statement.parse.len();
        if let Some(old) = self.named.insert(name.into(), statement) {
            self.named_bytes -= old.parse.len();
        }
    }

    fn forget(&mut self, name: &[u8]) -> Option<Named> {
        let statement = self.named.remove(name)?;
        self.named_bytes -= statement.parse.len();
        Some(statement)
    }

    /// The connection's set of statement names; None between loans.
    fn prepared(&self) -> Option<Arc<Prepared>> {
        self.lease.as_ref().map(|lease| lease.prepared.clone())
    }

    /// Statement `name` of the client's, on the connection held (its Parse
    /// added before the message in `out` if the connection lacks it).
    fn prepare_here(&mut self, prepared: &Prepared, statement: &Named, out: &mut Vec<u8>) {
        if prepared.insert(&statement.target) {
            out.extend_from_slice(&statement.parse);
            self.owe(Owed {
                target: Some(statement.target.clone()),
                ..Owed::plain(b'i')
            });
        }
    }

    /// An answer the server failed or skipped after an error: what was
    /// booked for its message did not happen.
    fn undo(&mut self, owed: Owed) {
        let prepared = self.prepared();
        let Owed {
            kind,
            target,
            name,
            saved,
        } = owed;
        match (kind, &target) {
            (b'P', None) => (self.unnamed, self.unnamed_here) = (None, false),
            (b'P' | b'i', Some(target)) => {
                if let Some(prepared) = &prepared {
                    prepared.remove(target);
                }
            }
            (b'C', Some(target)) => {
                if let Some(prepared) = &prepared {
                    prepared.insert(target);
                }
            }
            _ => {}
        }
        let Some(name) = name else {
            return;
        };
        match kind {
            // A Parse that did not happen leaves no client statement.
            b'P' | b'p' => {
                let known = self.named.get(&name[..]).map(|s| s.target.clone());
                if known.is_some_and(|t| target.as_ref().is_none_or(|target| *target == t)) {
                    self.forget(&name);
                }
            }
            // A Close that did not happen leaves it open.
            b'c' | b'C' => {
                if let Some(saved) = saved {
                    self.remember(&name, saved);
                }
            }
            _ => {}
        }
    }

    /// Relay extended-protocol message `raw` (type `tag`) into `out`,
    /// noting what it makes, if the engine follows it (see the module's
    /// documentation).
    fn extended(&mut self, tag: u8, raw: &[u8], at: f64, out: &mut Vec<u8>) -> Step {
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        // Malformed: Python's relay says what is wrong with it.
        let Ok(message) = pg::Frontend::parse(tag, body) else {
            return Step::Python;
        };
        match message {
            pg::Frontend::Parse { name: b"", sql, .. } => {
                // A client that parses the same unnamed statement in every
                // transaction (libpq's PQexecParams, pgbench -M extended)
                // has it judged and copied once.
                let again = self
                    .unnamed
                    .as_ref()
                    .is_some_and(|u| u.relays && *u.parse == *raw);
                if !again {
                    if !self.relays(sql) {
                        return Step::Python;
                    }
                    self.unnamed = Some(Unnamed {
                        parse: raw.to_vec(),
                        text: sql.into(),
                        relays: true,
                    });
                }
                self.unnamed_here = true;
                out.extend_from_slice(raw);
                self.owe(Owed::plain(tag));
            }
            pg::Frontend::Parse { name, sql, .. } => {
                let Some(prepared) = self.prepared() else {
                    return Step::Deferred;
                };
                // An open name again (42P05), or past the bounds (53400):
                // Python's relay says so.
                if !self.relays(sql)
                    || self.named.contains_key(name)
                    || self.named.len() >= MAX_CLIENT_STATEMENTS
                {
                    return Step::Python;
                }
                // What follows the name: its terminator, the text, the types.
                let statement = &body[name.len()..];
                let target = server_name(&statement[1..]);
                let parse: Arc<[u8]> = frame(b'P', &[&target, statement]).into();
                if self.named_bytes + parse.len() > MAX_STATEMENT_BYTES {
                    return Step::Python;
                }
                let named = Named {
                    target: target.clone(),
                    parse: parse.clone(),
                    text: sql.into(),
                    relays: true,
                };
                self.remember(name, named);
                let name = Some(name.into());
                if prepared.insert(&target) {
                    out.extend_from_slice(&parse);
                    let target = Some(target);
                    self.owe(Owed {
                        target,
                        name,
                        ..Owed::plain(b'P')
                    });
                } else {
                    out.extend_from_slice(ABSENT_CLOSE);
                    self.owe(Owed {
                        name,
                        ..Owed::plain(b'p')
                    });
                }
            }
            pg::Frontend::Bind(bind) => {
                if !bind.portal.is_empty() {
                    return Step::Python;
                }
                if bind.statement.is_empty() {
                    if !self.unnamed_here {
                        return Step::Python;
                    }
                    self.portal = self.unnamed.as_ref().map(|u| u.text.clone());
                    out.extend_from_slice(raw);
                } else {
                    let Some(prepared) = self.prepared() else {
                        return Step::Deferred;
                    };
                    // A name the client never prepared (the server's 26000),
                    // or a statement only Python's relay may follow.
                    let Some(statement) = self.named.get(bind.statement).filter(|s| s.relays)
                    else {
                        return Step::Python;
                    };
                    let statement = statement.clone();
                    self.prepare_here(&prepared, &statement, out);
                    let rest = &body[bind.statement.len() + 2..];
                    out.extend(frame(b'B', &[b"\0", &statement.target, b"\0", rest]));
                    self.portal = Some(statement.text);
                }
                self.owe(Owed::plain(tag));
            }
            pg::Frontend::Describe { kind, name } => {
                if kind == b'P' || name.is_empty() {
                    let made = if kind == b'S' {
                        self.unnamed_here
                    } else {
                        self.portal.is_some()
                    };
                    if !name.is_empty() || !made {
                        return Step::Python;
                    }
                    out.extend_from_slice(raw);
                } else {
                    let Some(prepared) = self.prepared() else {
                        return Step::Deferred;
                    };
                    let Some(statement) = self.named.get(name).filter(|s| s.relays).cloned() else {
                        return Step::Python;
                    };
                    self.prepare_here(&prepared, &statement, out);
                    out.extend(frame(b'D', &[b"S", &statement.target, b"\0"]));
                }
                self.owe(Owed::plain(tag));
            }
            pg::Frontend::Execute { portal, .. } => {
                let Some(text) = self.portal.clone().filter(|_| portal.is_empty()) else {
                    return Step::Python;
                };
                if !self.statements.push(b'E', text, at) {
                    return Step::Python;
                }
                out.extend_from_slice(raw);
                self.owe(Owed::plain(tag));
            }
            pg::Frontend::Close { kind, name: b"" } => {
                if kind == b'S' {
                    (self.unnamed, self.unnamed_here) = (None, false);
                } else {
                    self.portal = None;
                }
                out.extend_from_slice(raw);
                self.owe(Owed::plain(tag));
            }
            pg::Frontend::Close { kind: b'S', name } => {
                let Some(prepared) = self.prepared() else {
                    return Step::Deferred;
                };
                let saved = self.forget(name);
                let name = Some(name.into());
                match saved {
                    // A connection held long (a pinned session, a long
                    // transaction) would gather statements without bound.
                    Some(saved)
                        if prepared.len() > self.max_prepared && prepared.remove(&saved.target) =>
                    {
                        out.extend(frame(b'C', &[b"S", &saved.target, b"\0"]));
                        self.owe(Owed {
                            target: Some(saved.target.clone()),
                            name,
                            saved: Some(saved),
                            ..Owed::plain(b'C')
                        });
                    }
                    // The server's copy stays, for this client's next Parse
                    // of the same text and for the other clients.
                    saved => {
                        out.extend_from_slice(ABSENT_CLOSE);
                        self.owe(Owed {
                            name,
                            saved,
                            ..Owed::plain(b'c')
                        });
                    }
                }
            }
            pg::Frontend::Flush => {
                self.open_pipeline = true;
                out.extend_from_slice(raw); // no answer of its own
            }
            pg::Frontend::Sync => {
                if !self.statements.push_sync(at) {
                    return Step::Python;
                }
                self.status = 0;
                self.skipping = false;
                out.extend_from_slice(raw);
                self.owed.push_back(Owed::plain(tag));
                self.open_pipeline = false;
            }
            _ => return Step::Python,
        }
        Step::Relayed
    }
}

/// The client's messages of a pooled stream, as the frontend scanner
/// reports them (every kind whole).
pub(crate) struct Front<'a> {
    pub(crate) pooled: &'a mut Pooled,
    /// Bytes for the server...
    pub(crate) out: Vec<u8>,
    /// ...and the client bytes they stand for.
    pub(crate) input: usize,
    /// Bytes dropped (after a Terminate, and the Terminate itself).
    pub(crate) dropped: usize,
    pub(crate) at: f64,
}

impl Front<'_> {
    /// Client messages of `pooled` from now.
    pub(crate) fn new(pooled: &mut Pooled) -> Front<'_> {
        Front {
            pooled,
            out: Vec::new(),
            input: 0,
            dropped: 0,
            at: crate::sys::monotonic(),
        }
    }

    /// (bytes for the server, the client bytes they stand for, client bytes dropped)
    pub(crate) fn into_parts(self) -> (Vec<u8>, usize, usize) {
        (self.out, self.input, self.dropped)
    }

    /// The messages deferred until a connection came, now that one has.
    pub(crate) fn replay_deferred(&mut self) {
        let deferred = std::mem::take(&mut self.pooled.deferred);
        for (tag, raw) in messages(&deferred) {
            pg::Sink::message(self, tag, raw, true);
        }
    }
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
        if !pooled.deferred.is_empty() {
            pooled.deferred.extend_from_slice(raw); // in order, behind them
            return;
        }
        if (pooled.skipping && tag != b'S' && tag != b'X') || pooled.owed.len() >= MAX_OWED {
            pooled.handback = Some(raw.to_vec());
            return;
        }
        // The Query's text as sent, less the terminating NUL.
        let text = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        let text = text.strip_suffix(b"\0").unwrap_or(text);
        let step = match tag {
            // A Query inside an open pipeline is skipped with it after an
            // error: Python's relay follows such mixes.
            b'Q' if !pooled.open_pipeline
                && pooled.relays(text)
                && pooled.statements.push(tag, text.into(), self.at) =>
            {
                self.out.extend_from_slice(raw);
                pooled.owed.push_back(Owed::plain(tag));
                pooled.status = 0;
                // A simple Query drops the unnamed statement and portal.
                (pooled.unnamed, pooled.unnamed_here, pooled.portal) = (None, false, None);
                Step::Relayed
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' => {
                pooled.extended(tag, raw, self.at, &mut self.out)
            }
            b'X' => {
                pooled.terminated = true;
                self.dropped += raw.len();
                return;
            }
            _ => Step::Python,
        };
        match step {
            Step::Relayed => self.input += raw.len(),
            Step::Deferred => pooled.deferred = raw.to_vec(),
            Step::Python => pooled.handback = Some(raw.to_vec()),
        }
    }
}

/// The server's messages of a pooled stream (relay mode): the answers
/// owed followed to ReadyForQuery, errors and FATALs, what the engine sent
/// in the client's stead answered as the client expects; with the audit
/// on, each statement's rows and outcome gathered into one record.
pub(crate) struct Back<'a> {
    pub(crate) pooled: &'a mut Pooled,
    pub(crate) at: f64,
    /// What the client gets of the read; the answers to Parses the engine
    /// added are swallowed.
    pub(crate) cut: AnswerCut,
}

impl pg::Sink for Back<'_> {
    fn pass(&mut self, bytes: &[u8]) {
        self.cut.pass(bytes);
    }

    fn message(&mut self, tag: u8, raw: &[u8], _complete: bool) {
        let body = raw.get(pg::HEADER_LEN..).unwrap_or_default();
        let pooled = &mut *self.pooled;
        let was_off = self.cut.off;
        if self.cut.withheld(tag, raw) {
            if !was_off {
                pooled.statements.ends_on_front(readonly::SQLSTATE);
            }
            // The connection is to be closed: only the audit follows the rest.
            pooled.statements.server(tag, raw, self.at);
            return;
        }
        match tag {
            b'Z' => {
                // It ends the first Query or Sync owed, and whatever the
                // server skipped before it after an error.
                while let Some(owed) = pooled.owed.pop_front() {
                    if owed.kind == b'Q' || owed.kind == b'S' {
                        break;
                    }
                }
                pooled.status = pg::backend::ready_for_query(body).unwrap_or(b'E');
                pooled.statements.server(tag, raw, self.at);
            }
            b'E' => {
                // The severity as sent, not translated (PostgreSQL 9.6 on),
                // else as shown.
                let severity = pg::backend::notice_field(body, b'V')
                    .or_else(|| pg::backend::notice_field(body, b'S'));
                pooled.server_fatal |= matches!(severity, Some(b"FATAL" | b"PANIC"));
                // In the extended protocol the server skips every message
                // up to the next Sync, Queries too: the answers of what it
                // skipped are owed no more, and what was booked for them
                // did not happen. Undone last first, each restores the
                // state the one before it left.
                let extended = !pooled
                    .owed
                    .front()
                    .is_some_and(|o| o.kind == b'Q' || o.kind == b'S');
                if extended {
                    let ends = pooled.owed.iter().position(|o| o.kind == b'S');
                    let skipped: Vec<Owed> = pooled
                        .owed
                        .drain(..ends.unwrap_or(pooled.owed.len()))
                        .collect();
                    for owed in skipped.into_iter().rev() {
                        pooled.undo(owed);
                    }
                }
                // With no Sync sent yet, it skips what the client sends next.
                pooled.skipping |= extended && pooled.owed.is_empty();
                pooled.statements.server(tag, raw, self.at);
            }
            _ => {
                let ends = pooled
                    .owed
                    .front()
                    .filter(|o| answer_ends(o.kind).contains(&tag))
                    .map(|o| o.kind);
                if ends.is_some() {
                    pooled.owed.pop_front();
                }
                match ends {
                    Some(b'i') => {
                        self.cut.swallowed += raw.len();
                        return;
                    }
                    Some(b'p') => {
                        // Both are bodiless: the client's credit is unchanged.
                        self.cut.out.extend_from_slice(PARSE_COMPLETE);
                        return;
                    }
                    _ => {}
                }
                pooled.statements.server(tag, raw, self.at);
            }
        }
        self.cut.push(tag, raw);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::testing::{self, recorded};
    use crate::audit::AuditQueue;
    use crate::statements::MAX_PENDING_TEXT;

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
            "create local temporary table t (x int)",
            "SELECT * INTO TEMP t FROM s",
            "SELECT pg_try_advisory_lock_shared(1)",
            "SELECT pg_catalog.set_config('a', 'b', false)",
            "copy(select 1) to stdout",
            "CREATE TABLE \"temp\" (x int)", // a false alarm, and harmless
        ] {
            assert!(!native_text(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn words_inside_longer_names_are_no_alarm() {
        for sql in [
            "SELECT payload, attempts, threshold FROM jobs",
            "INSERT INTO templates (copyright, household) VALUES ($1, $2)",
            "UPDATE t SET prepared_at = now(), unloaded = true",
            "SELECT listener_id FROM discarded_items",
        ] {
            assert!(native_text(sql.as_bytes()), "{sql}");
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

    /// The server's answers to a Parse, Bind, Execute and Sync of one row.
    fn answered() -> [Vec<u8>; 4] {
        [
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
        ]
    }

    fn error(state: &str) -> Vec<u8> {
        msg(b'E', format!("SERROR\0C{state}\0Mno\0\0").as_bytes())
    }

    /// A pooled stream with the audit on, holding a connection, and its queue.
    fn audited() -> (Pooled, Arc<AuditQueue>) {
        audited_with(Vec::new(), None)
    }

    /// The same, for a client that prepared these statements before (its
    /// named ones, and its unnamed statement's Parse).
    fn audited_with(
        statements: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
        unnamed: Option<Vec<u8>>,
    ) -> (Pooled, Arc<AuditQueue>) {
        let (author, queue) = testing::author(1 << 20);
        let spec = PooledSpec {
            shelf: Shelf::new(Duration::from_secs(60)).unwrap(),
            wait_limit: Duration::from_secs(1),
            max_prepared: 2,
            statements,
            unnamed,
        };
        let mut pooled = Pooled::new(spec, Some(author), Vec::new());
        pooled.lease = Some(lease());
        (pooled, queue)
    }

    /// A read-only session's stream, with the guard's words (as Python's
    /// guard gives them), holding a connection.
    fn guarded() -> Pooled {
        let spec = PooledSpec {
            shelf: Shelf::new(Duration::from_secs(60)).unwrap(),
            wait_limit: Duration::from_secs(1),
            max_prepared: 2,
            statements: Vec::new(),
            unnamed: None,
        };
        let screen = [
            "read",
            "set_config",
            "pg_settings",
            "characteristics",
            "u&'",
            "u&\"",
        ]
        .map(|word| word.as_bytes().to_vec())
        .to_vec();
        let mut pooled = Pooled::new(spec, None, screen);
        pooled.lease = Some(lease());
        pooled
    }

    /// A connection with no statements prepared on it.
    fn lease() -> Lease {
        let mut lease = Lease::new(
            1,
            -1,
            Instant::now() + Duration::from_secs(60),
            Arc::default(),
            None,
        );
        lease.touched = true;
        lease
    }

    /// The kinds of the answers owed, in order.
    fn owed(pooled: &Pooled) -> Vec<u8> {
        pooled.owed.iter().map(|o| o.kind).collect()
    }

    /// What the engine sends the server for these client messages.
    fn client(pooled: &mut Pooled, messages: &[Vec<u8>]) -> Vec<u8> {
        let mut front = Front {
            pooled,
            out: Vec::new(),
            input: 0,
            dropped: 0,
            at: 1.0,
        };
        for raw in messages {
            pg::Sink::message(&mut front, raw[0], raw, true);
        }
        front.out
    }

    /// What the client gets for these server messages.
    fn server(pooled: &mut Pooled, messages: &[Vec<u8>]) -> Vec<u8> {
        server_cut(pooled, messages, AnswerCut::new(0, false, false)).out
    }

    /// The same through `cut`, returned with what it kept for the client.
    fn server_cut(pooled: &mut Pooled, messages: &[Vec<u8>], cut: AnswerCut) -> AnswerCut {
        let mut back = Back {
            pooled,
            at: 1.5,
            cut,
        };
        for raw in messages {
            pg::Sink::message(&mut back, raw[0], raw, true);
        }
        back.cut
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
        assert_eq!(owed(&pooled), b"PBDES");
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
        assert_eq!(owed(&pooled), b"S");
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
    fn the_same_unnamed_parse_again_is_relayed_and_recorded_without_a_new_copy() {
        let (mut pooled, queue) = audited();
        let transaction = [
            parse("", "SELECT $1"),
            bind("", ""),
            execute(),
            msg(b'S', b""),
        ];
        let answers = answered();
        assert_eq!(client(&mut pooled, &transaction), transaction.concat());
        server(&mut pooled, &answers);
        let first = pooled.unnamed.as_ref().unwrap().text.clone();
        pooled.end_loan();
        pooled.lease = Some(lease());
        assert_eq!(client(&mut pooled, &transaction), transaction.concat());
        assert!(pooled.handback.is_none());
        assert!(Arc::ptr_eq(&first, &pooled.unnamed.as_ref().unwrap().text));
        server(&mut pooled, &answers);
        let ok = ("SELECT $1".to_string(), Some(1), "ok".to_string());
        assert_eq!(recorded(&queue), [ok.clone(), ok]);
        // Another text is a new statement, judged as the first was.
        client(&mut pooled, &[parse("", "LISTEN x")]);
        assert!(pooled.handback.is_some());
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
        assert_eq!(owed(&pooled), b"S", "the rest is skipped");
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
    fn named_portals_unknown_names_and_what_may_pin_go_to_python() {
        for messages in [
            vec![parse("s1", "SELECT 1"), parse("s1", "SELECT 1")], // 42P05
            vec![bind("", "never_prepared")],                       // 26000
            vec![parse("s1", "SET x = 1")],
            vec![parse("", "SELECT 1"), bind("p1", "")],
            vec![msg(b'C', b"Pp1\0")],
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

    /// Python's `server_name(b"SELECT $1\0\0\0")`.
    const TARGET: &[u8] = b"qmesh_9e41757594ef9fcdc663ac20";

    fn renamed_bind() -> Vec<u8> {
        bind("", std::str::from_utf8(TARGET).unwrap())
    }

    #[test]
    fn named_statements_are_renamed_and_prepared_where_the_connection_lacks_them() {
        let (mut pooled, queue) = audited();
        let target_parse = msg(b'P', &[TARGET, b"\0SELECT $1\0\0\0"].concat());
        let sent = client(
            &mut pooled,
            &[
                parse("s1", "SELECT $1"),
                bind("", "s1"),
                execute(),
                msg(b'S', b""),
            ],
        );
        let expected = [
            target_parse.clone(),
            renamed_bind(),
            execute(),
            msg(b'S', b""),
        ];
        assert_eq!(sent, expected.concat());
        assert_eq!(owed(&pooled), b"PBES");
        let answers = answered();
        assert_eq!(server(&mut pooled, &answers), answers.concat());
        assert!(pooled.between_transactions(false));
        let ok = ("SELECT $1".to_string(), Some(1), "ok".to_string());
        assert_eq!(recorded(&queue), [ok]);

        // Another connection lacks it: its Parse goes first, and its
        // ParseComplete is not the client's.
        pooled.end_loan();
        pooled.lease = Some(lease());
        let again = [bind("", "s1"), execute(), msg(b'S', b"")];
        let sent = client(&mut pooled, &again);
        let expected = [target_parse, renamed_bind(), execute(), msg(b'S', b"")];
        assert_eq!(sent, expected.concat());
        assert_eq!(owed(&pooled), b"iBES");
        assert_eq!(server(&mut pooled, &answers), answers[1..].concat());
        // Now it has it: the Bind alone.
        let sent = client(&mut pooled, &again);
        assert_eq!(sent, [renamed_bind(), execute(), msg(b'S', b"")].concat());
        server(&mut pooled, &answers[1..]);

        // A Parse of what the connection has, and a Close, are stood in
        // for: the client gets its answers in their turn.
        let sent = client(
            &mut pooled,
            &[
                parse("s2", "SELECT $1"),
                msg(b'C', b"Ss1\0"),
                msg(b'S', b""),
            ],
        );
        assert_eq!(sent, [ABSENT_CLOSE, ABSENT_CLOSE, &msg(b'S', b"")].concat());
        assert_eq!(owed(&pooled), b"pcS");
        let got = server(
            &mut pooled,
            &[msg(b'3', b""), msg(b'3', b""), msg(b'Z', b"I")],
        );
        assert_eq!(
            got,
            [msg(b'1', b""), msg(b'3', b""), msg(b'Z', b"I")].concat()
        );
        assert!(pooled.between_transactions(false));
        assert!(pooled.handback.is_none());
        let statements = pooled.take_named();
        assert_eq!(statements.len(), 1);
        assert_eq!(
            (&statements[0].0[..], &statements[0].1[..]),
            (&b"s2"[..], TARGET)
        );
    }

    #[test]
    fn named_messages_without_a_connection_wait_for_one_in_order() {
        let (mut pooled, _queue) = audited();
        client(&mut pooled, &[parse("s1", "SELECT $1"), msg(b'S', b"")]);
        server(&mut pooled, &[msg(b'1', b""), msg(b'Z', b"I")]);
        pooled.end_loan();
        let later = [bind("", "s1"), execute(), msg(b'S', b""), msg(b'X', b"")];
        assert!(client(&mut pooled, &later).is_empty());
        assert_eq!(pooled.deferred, later.concat());
        assert!(pooled.owed.is_empty() && !pooled.terminated);
        pooled.lease = Some(lease());
        let mut front = Front {
            pooled: &mut pooled,
            out: Vec::new(),
            input: 0,
            dropped: 0,
            at: 2.0,
        };
        front.replay_deferred();
        let (out, input, dropped) = (front.out, front.input, front.dropped);
        assert_eq!(out[0], b'P', "the connection lacks it: parsed first");
        assert!(out.ends_with(&[renamed_bind(), execute(), msg(b'S', b"")].concat()));
        assert_eq!(input + dropped, later.concat().len());
        assert_eq!(owed(&pooled), b"iBES");
        assert!(pooled.terminated && pooled.deferred.is_empty());
    }

    #[test]
    fn what_an_error_makes_the_server_skip_is_undone() {
        let (mut pooled, _queue) = audited();
        // A Parse that fails prepares nothing, for the connection or the client.
        client(
            &mut pooled,
            &[parse("s1", "SELECT $1"), bind("", "s1"), msg(b'S', b"")],
        );
        server(&mut pooled, &[error("42P01")]);
        assert_eq!(owed(&pooled), b"S");
        let prepared = pooled.prepared().unwrap();
        assert!(prepared.is_empty() && pooled.named.is_empty());
        server(&mut pooled, &[msg(b'Z', b"I")]);
        // Past max_prepared (2) a Close reaches the server; skipped, it
        // leaves the statement open on both sides.
        client(
            &mut pooled,
            &[
                parse("a", "SELECT 1"),
                parse("b", "SELECT 2"),
                parse("s1", "SELECT $1"),
                msg(b'S', b""),
            ],
        );
        server(
            &mut pooled,
            &[
                msg(b'1', b""),
                msg(b'1', b""),
                msg(b'1', b""),
                msg(b'Z', b"I"),
            ],
        );
        assert_eq!(prepared.len(), 3);
        let sent = client(
            &mut pooled,
            &[
                parse("", "SELECT 1 / 0"),
                bind("", ""),
                execute(),
                msg(b'C', b"Ss1\0"),
                msg(b'S', b""),
            ],
        );
        assert!(
            sent.ends_with(&[msg(b'C', &[b"S", TARGET, b"\0"].concat()), msg(b'S', b"")].concat())
        );
        assert!(!prepared.contains(TARGET) && !pooled.named.contains_key(&b"s1"[..]));
        server(&mut pooled, &[error("22012")]);
        assert!(prepared.contains(TARGET) && pooled.named.contains_key(&b"s1"[..]));
        assert!(pooled.over_prepared(pooled.lease.as_ref().unwrap()));
    }

    #[test]
    fn what_an_error_skips_is_undone_last_first() {
        let (mut pooled, _queue) = audited();
        // s1 and s2 share a server statement; with three prepared the
        // connection is past max_prepared (2), so a Close reaches the server.
        client(
            &mut pooled,
            &[
                parse("a", "SELECT 1"),
                parse("b", "SELECT 2"),
                parse("s1", "SELECT $1"),
                parse("s2", "SELECT $1"),
                msg(b'S', b""),
            ],
        );
        let parsed = msg(b'1', b"");
        let answers = [&parsed, &parsed, &parsed, &msg(b'3', b""), &msg(b'Z', b"I")];
        server(&mut pooled, &answers.map(Vec::clone));
        let prepared = pooled.prepared().unwrap();
        assert_eq!(prepared.len(), 3);
        // The Close removes the server statement; the Bind of s2 then
        // prepares it again. The failed Parse makes the server skip both.
        let sent = client(
            &mut pooled,
            &[
                parse("", "SELEC"),
                msg(b'C', b"Ss1\0"),
                bind("", "s2"),
                msg(b'S', b""),
            ],
        );
        assert!(sent.ends_with(&[renamed_bind(), msg(b'S', b"")].concat()));
        assert_eq!(owed(&pooled), b"PCiBS");
        server(&mut pooled, &[error("42601")]);
        assert_eq!(owed(&pooled), b"S");
        // Undone in order, the Close would put it back and the Parse take
        // it out again: the set would lack what the server still has.
        assert!(prepared.contains(TARGET), "the server still has it");
        assert!(pooled.named.contains_key(&b"s1"[..]) && pooled.named.contains_key(&b"s2"[..]));
    }

    #[test]
    fn a_query_inside_an_open_pipeline_goes_to_python() {
        let (mut pooled, _queue) = audited();
        // After an error the server skips to the Sync, the Query too: the
        // engine does not follow such a mix.
        let sent = client(
            &mut pooled,
            &[
                parse("", "SELECT 1 / 0"),
                bind("", ""),
                execute(),
                query("SELECT 1"),
                msg(b'S', b""),
            ],
        );
        assert_eq!(
            sent,
            [parse("", "SELECT 1 / 0"), bind("", ""), execute()].concat()
        );
        assert_eq!(
            pooled.handback,
            Some([query("SELECT 1"), msg(b'S', b"")].concat())
        );
        // Between pipelines a Query is the engine's.
        let (mut pooled, _queue) = audited();
        let pipeline = [
            parse("", "SELECT 1"),
            bind("", ""),
            execute(),
            msg(b'S', b""),
        ];
        client(&mut pooled, &pipeline);
        assert_eq!(client(&mut pooled, &[query("SELECT 2")]), query("SELECT 2"));
        assert!(pooled.handback.is_none());
        assert_eq!(owed(&pooled), b"PBESQ");
    }

    #[test]
    fn statements_python_prepared_that_the_engine_may_not_relay_stay_with_python() {
        let copy = parse("", "COPY t FROM STDIN");
        let statements = vec![(
            b"c".to_vec(),
            b"qmesh_c".to_vec(),
            parse("c", "COPY t FROM STDIN"),
        )];
        let (mut pooled, _queue) = audited_with(statements, Some(copy.clone()));
        assert!(client(&mut pooled, &[bind("", "c")]).is_empty());
        assert_eq!(pooled.handback, Some(bind("", "c")));
        let (mut pooled, _queue) = audited_with(Vec::new(), Some(copy.clone()));
        // The same Parse again is judged anew, not waved through.
        assert!(client(&mut pooled, std::slice::from_ref(&copy)).is_empty());
        assert_eq!(pooled.handback, Some(copy));
        let statements = vec![(
            b"c".to_vec(),
            b"qmesh_c".to_vec(),
            parse("c", "COPY t FROM STDIN"),
        )];
        let (mut pooled, _queue) = audited_with(statements, None);
        assert!(client(&mut pooled, &[msg(b'D', b"Sc\0")]).is_empty());
        assert!(pooled.handback.is_some());
    }

    #[test]
    fn a_pipeline_past_the_answers_the_engine_awaits_goes_to_python() {
        let (mut pooled, _queue) = audited();
        let close = msg(b'C', b"Sx\0");
        let closes = vec![close.clone(); MAX_OWED];
        let sent = client(&mut pooled, &closes);
        assert_eq!(sent.len(), ABSENT_CLOSE.len() * MAX_OWED);
        assert!(pooled.handback.is_none());
        client(&mut pooled, std::slice::from_ref(&close));
        assert_eq!(pooled.handback, Some(close));
    }

    #[test]
    fn statements_prepared_before_are_the_clients_in_the_engine() {
        let target_parse = msg(b'P', &[TARGET, b"\0SELECT $1\0\0\0"].concat());
        let statements = vec![(b"s1".to_vec(), TARGET.to_vec(), target_parse.clone())];
        let (mut pooled, queue) = audited_with(statements, Some(parse("", "SELECT 2")));
        let sent = client(&mut pooled, &[bind("", "s1"), execute(), msg(b'S', b"")]);
        let expected = [target_parse, renamed_bind(), execute(), msg(b'S', b"")];
        assert_eq!(sent, expected.concat());
        server(
            &mut pooled,
            &[
                msg(b'1', b""),
                msg(b'2', b""),
                msg(b'C', b"SELECT 1\0"),
                msg(b'Z', b"I"),
            ],
        );
        let ok = ("SELECT $1".to_string(), Some(1), "ok".to_string());
        assert_eq!(recorded(&queue), [ok]);
        // The unnamed statement was parsed on another loan: Python's relay
        // parses it again where it runs.
        assert!(pooled.unnamed.is_some() && !pooled.unnamed_here);
        client(&mut pooled, &[bind("", "")]);
        assert!(pooled.handback.is_some());
    }

    #[test]
    fn statements_that_name_a_guarded_word_go_to_python() {
        let plain = query("SELECT count(*) FROM ledger");
        let mut pooled = guarded();
        assert_eq!(client(&mut pooled, std::slice::from_ref(&plain)), plain);
        assert!(pooled.handback.is_none());
        for words in [
            query("BEGIN READ WRITE"),
            query("SELECT pg_catalog.SET_CONFIG('x', 'y', false)"),
            parse("", "UPDATE pg_settings SET setting = 'off'"),
            parse(
                "s1",
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            ),
            query("SELECT U&'\\0072ead'"),
        ] {
            let mut pooled = guarded();
            assert_eq!(client(&mut pooled, std::slice::from_ref(&words)), b"");
            assert_eq!(pooled.handback.as_deref(), Some(words.as_slice()));
        }
        // Without a guard, the same words are only words.
        let (mut unguarded, _) = audited();
        let text = query("SELECT 'read'");
        assert_eq!(client(&mut unguarded, std::slice::from_ref(&text)), text);
    }

    #[test]
    fn a_read_only_session_told_the_setting_is_off_gets_nothing_more() {
        let mut pooled = guarded();
        client(&mut pooled, &[query("SELECT lift()")]);
        let reported = |name: &str, value: &str| msg(b'S', format!("{name}\0{value}\0").as_bytes());
        let other = reported("application_name", "shop");
        let on = reported("default_transaction_read_only", "on");
        let answer = [
            msg(b'T', b"\0\0"),
            msg(b'C', b"SELECT 1\0"),
            other.clone(),
            on.clone(),
            msg(b'Z', b"I"),
        ];
        let read = |pooled: &mut Pooled, off: bool, messages: &[Vec<u8>]| {
            server_cut(pooled, messages, AnswerCut::new(0, true, off))
        };
        let cut = read(&mut pooled, false, &answer);
        assert_eq!((cut.out, cut.off), (answer.concat(), false));
        // Two pipelined: the first's whole answer, in the same read as the
        // report, still goes.
        client(&mut pooled, &[query("SELECT 1"), query("SELECT lift()")]);
        let off = reported("default_transaction_read_only", "off");
        let earlier = [msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")];
        let rest = [
            &earlier[..],
            &[msg(b'C', b"SELECT 1\0"), off, msg(b'Z', b"I")],
        ]
        .concat();
        let cut = read(&mut pooled, false, &rest);
        assert_eq!((cut.out, cut.off), (earlier.concat(), true));
        // Still owed: the connection is not idle, and goes back to be closed.
        assert_eq!(owed(&pooled), b"Q");
        assert_eq!(read(&mut pooled, true, &[msg(b'Z', b"I")]).out, b"");
        // A session that is not read-only is told as the server tells it.
        let (mut writable, _) = audited();
        client(&mut writable, &[query("SELECT lift()")]);
        let off = reported("default_transaction_read_only", "off");
        assert_eq!(server(&mut writable, std::slice::from_ref(&off)), off);
    }
}
