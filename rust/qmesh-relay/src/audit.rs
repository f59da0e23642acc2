//! The statement audit's queue, between those who record and the writer.
//!
//! Records come from the engine threads (each simple Query of a pooled
//! stream, paired with its rows and outcome at its ReadyForQuery) and from
//! Python's relay; Python's writer takes them in batches and stores them.
//! An engine never waits on the audit and never calls Python for it: a
//! record is a push under a short lock, and the writer hears of a queue that
//! stopped being empty through one eventfd.
//!
//! The queue is bounded in records and in statement bytes: past either, a
//! record is dropped and counted (an audit that stalled the database path
//! would turn a slow disk into an outage). The statement's SHA-256 and its
//! stored text (truncated) are made when the writer takes it, in the
//! writer's thread, as it encodes the stored blocks (`audit_block.rs`).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::sys::EventFd;

/// How much the queue holds before it drops, and how long a stored text may be.
#[derive(Clone, Copy, Debug)]
pub struct AuditLimits {
    pub max_records: usize,
    /// Statement bytes queued, all records together.
    pub max_bytes: usize,
    /// Characters of a statement's text kept (the hash is of the whole).
    pub max_statement_chars: usize,
}

/// Whose statements a record holds: one client session.
#[derive(Debug)]
pub struct Who {
    pub app: Arc<str>,
    pub alias: Arc<str>,
    /// The edge and the process id the client was told.
    pub session: Option<Arc<str>>,
    /// Whether the text is stored, or only its hash.
    pub keep_text: bool,
}

/// One statement, as recorded.
#[derive(Debug)]
pub struct Entry {
    /// When it ended (Unix time).
    pub ts: f64,
    pub who: Arc<Who>,
    /// Shared: the Executes of one prepared statement hold its one text.
    pub statement: Arc<[u8]>,
    pub duration_ms: f64,
    pub rows: Option<i64>,
    pub outcome: Cow<'static, str>,
}

/// Records accepted and dropped since the queue was made, and queued now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditCounts {
    pub recorded: u64,
    pub dropped: u64,
    pub queued: usize,
}

struct State {
    entries: VecDeque<Entry>,
    bytes: usize,
    recorded: u64,
    dropped: u64,
}

pub struct AuditQueue {
    state: Mutex<State>,
    wake: EventFd,
    limits: AuditLimits,
}

impl AuditQueue {
    pub fn new(limits: AuditLimits) -> std::io::Result<Arc<AuditQueue>> {
        Ok(Arc::new(AuditQueue {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                bytes: 0,
                recorded: 0,
                dropped: 0,
            }),
            wake: EventFd::new()?,
            limits,
        }))
    }

    pub fn limits(&self) -> AuditLimits {
        self.limits
    }

    /// Readable once a record arrives in an empty queue, until [`Self::take`].
    pub fn fd(&self) -> RawFd {
        self.wake.fd()
    }

    /// Queue `entry`; false when the queue is full and it was dropped.
    pub fn push(&self, entry: Entry) -> bool {
        let mut state = self.lock();
        let size = entry.statement.len();
        if state.entries.len() >= self.limits.max_records
            || state.bytes + size > self.limits.max_bytes
        {
            state.dropped += 1;
            return false;
        }
        // Signalled under the lock, by the push that ends an empty spell:
        // a take cannot drain between the push and the signal.
        if state.entries.is_empty() {
            self.wake.signal();
        }
        state.entries.push_back(entry);
        state.bytes += size;
        state.recorded += 1;
        true
    }

    /// Up to `max` records, oldest first. Whatever is left stays queued
    /// without a signal: the writer looks at [`Self::counts`] before it waits.
    pub fn take(&self, max: usize) -> Vec<Entry> {
        let mut state = self.lock();
        self.wake.drain();
        let count = max.min(state.entries.len());
        let taken: Vec<Entry> = state.entries.drain(..count).collect();
        state.bytes -= taken.iter().map(|e| e.statement.len()).sum::<usize>();
        taken
    }

    pub fn counts(&self) -> AuditCounts {
        let state = self.lock();
        AuditCounts {
            recorded: state.recorded,
            dropped: state.dropped,
            queued: state.entries.len(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The queue stays valid whatever panicked while holding it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What an engine's stream records with: its session and the queue.
#[derive(Clone)]
pub struct AuditAuthor {
    pub queue: Arc<AuditQueue>,
    pub who: Arc<Who>,
}

impl AuditAuthor {
    /// A statement that ended now, after `duration_s`.
    pub fn record(
        &self,
        statement: Arc<[u8]>,
        duration_s: f64,
        rows: Option<i64>,
        outcome: Cow<'static, str>,
    ) -> bool {
        self.queue.push(Entry {
            ts: unix_now(),
            who: self.who.clone(),
            statement,
            duration_ms: duration_s * 1000.0,
            rows,
            outcome,
        })
    }
}

impl std::fmt::Debug for AuditAuthor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditAuthor")
            .field("who", &self.who)
            .finish_non_exhaustive()
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `bytes` as lowercase hexadecimal digits, two a byte (by table: this runs
/// for every statement audited).
pub(crate) fn hex_digits(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|byte| [HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 15)]])
}

/// For the tests of those who record: an author whose records go to a
/// queue of its own, and the records as stored.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Text kept, up to 100 records and `max_bytes` of statements.
    pub(crate) fn author(max_bytes: usize) -> (AuditAuthor, Arc<AuditQueue>) {
        let limits = AuditLimits {
            max_records: 100,
            max_bytes,
            max_statement_chars: 100,
        };
        let queue = AuditQueue::new(limits).unwrap();
        let who = Arc::new(Who {
            app: "shop".into(),
            alias: "orders".into(),
            session: None,
            keep_text: true,
        });
        let author = AuditAuthor {
            queue: queue.clone(),
            who,
        };
        (author, queue)
    }

    /// (text, rows, outcome) of each record taken off `queue`.
    pub(crate) fn recorded(queue: &AuditQueue) -> Vec<(String, Option<i64>, String)> {
        let taken = queue.take(100).into_iter();
        taken
            .map(|e| {
                let text = String::from_utf8_lossy(&e.statement).into_owned();
                (text, e.rows, e.outcome.into_owned())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(keep_text: bool) -> Arc<Who> {
        Arc::new(Who {
            app: "shop".into(),
            alias: "orders".into(),
            session: Some("edge-1/42".into()),
            keep_text,
        })
    }

    fn entry(statement: &[u8], keep_text: bool) -> Entry {
        Entry {
            ts: 1.0,
            who: who(keep_text),
            statement: statement.into(),
            duration_ms: 1.5,
            rows: Some(1),
            outcome: Cow::Borrowed("ok"),
        }
    }

    fn readable(fd: RawFd) -> bool {
        crate::sys::readable_now(fd)
    }

    #[test]
    fn the_queue_is_bounded_in_records_and_bytes_and_counts_what_it_drops() {
        let limits = AuditLimits {
            max_records: 3,
            max_bytes: 10,
            max_statement_chars: 100,
        };
        let queue = AuditQueue::new(limits).unwrap();
        assert!(!readable(queue.fd()));
        assert!(queue.push(entry(b"SELECT 1", true)));
        assert!(readable(queue.fd()), "the first record wakes the writer");
        assert!(!queue.push(entry(b"SELECT 2", true)), "past the bytes");
        assert!(queue.push(entry(b"a", true)));
        assert!(queue.push(entry(b"b", true)));
        assert!(!queue.push(entry(b"c", true)), "past the records");
        let counts = queue.counts();
        assert_eq!((counts.recorded, counts.dropped, counts.queued), (3, 2, 3));
        let first = queue.take(2);
        assert_eq!(first.len(), 2);
        assert_eq!(&*first[0].statement, b"SELECT 1");
        assert!(!readable(queue.fd()), "a take drains the signal");
        assert!(queue.push(entry(b"SELECT 3", true)), "room again");
        let rest = queue.take(10);
        assert_eq!(
            rest.iter().map(|e| &*e.statement).collect::<Vec<_>>(),
            [b"b".as_slice(), b"SELECT 3"]
        );
        assert_eq!(queue.counts().queued, 0);
    }
}
