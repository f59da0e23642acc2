//! The engine threads: a small pool, each thread running one epoll over the
//! sockets of many sessions' engines.
//!
//! A thread per session made a Gate with thousands of edges a process with
//! thousands of threads (each with its stack, its scheduling and its epoll
//! and wake-up descriptors). Here a process has about one engine thread per
//! core ([`pool`]); each engine is registered with the least loaded one and
//! stays there. Every socket of an engine (its tunnel connection, its
//! native streams' sockets) is in that thread's epoll, under a token that
//! names the engine and the socket; the thread hands each batch of events
//! to the engines they belong to, one engine at a time, and fires their
//! timers from one heap.
//!
//! Locks: the thread never holds the engine table or the timer heap while it
//! calls into an engine, and an engine may schedule a timer while it holds
//! its own state, so the order is always engine state, then timers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Instant;

use crate::sys::{Epoll, EventFd, TimerFd, READABLE};

/// Bits of a token that name the socket within its engine (the rest name
/// the engine): room for the tunnel and 2^32 stream ids.
const LOCAL_BITS: u32 = 34;
const LOCAL_MASK: u64 = (1 << LOCAL_BITS) - 1;
/// The thread's own wake-up descriptor.
const TOKEN_WAKE: u64 = u64::MAX;
/// A manual reactor's timer descriptor.
const TOKEN_TIMER: u64 = u64::MAX - 1;
/// Events taken from epoll per wait.
const EVENTS_PER_WAIT: usize = 1024;
/// Engine threads per process at most, whatever the core count.
const MAX_THREADS: usize = 64;

/// What an engine thread drives.
pub(crate) trait Driven: Send + Sync {
    /// Readiness of some of the engine's sockets: `(local token, flags)`.
    fn ready(&self, events: &[(u64, u32)]);
    /// A deadline the engine scheduled has come (or a newer one replaced it).
    fn timer(&self, now: Instant);
}

/// A round's buffers, kept between rounds.
struct Rounds {
    ready: Vec<libc::epoll_event>,
    batch: Vec<(u64, u64, u32)>,
    group: Vec<(u64, u32)>,
}

impl Default for Rounds {
    fn default() -> Self {
        Rounds {
            ready: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT],
            batch: Vec::new(),
            group: Vec::new(),
        }
    }
}

struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    /// What the thread sleeps until (a manual reactor: what its timer
    /// descriptor is set for), so that an earlier deadline wakes it.
    sleeping_until: Option<Instant>,
}

/// One engine thread.
pub(crate) struct Reactor {
    epoll: Epoll,
    wake: EventFd,
    /// A manual reactor's: makes [`Reactor::fd`] readable when a timer is
    /// due, so its owner needs no clock of its own to poll it on time.
    timer: Option<TimerFd>,
    /// A manual reactor's buffers, kept between polls.
    rounds: Mutex<Rounds>,
    engines: Mutex<HashMap<u64, Weak<dyn Driven>>>,
    timers: Mutex<Timers>,
    load: AtomicUsize,
    next_id: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic under these locks is a bug; the data stays usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Reactor {
    fn start(index: usize) -> std::io::Result<Arc<Reactor>> {
        let reactor = Reactor::new(None)?;
        let runner = Arc::clone(&reactor);
        std::thread::Builder::new()
            .name(format!("qmesh-engine-{index}"))
            .spawn(move || runner.run())?;
        Ok(reactor)
    }

    /// A reactor without a thread: its owner calls [`Reactor::poll`] when
    /// [`Reactor::fd`] is readable, which it also is when a timer is due.
    pub(crate) fn manual() -> std::io::Result<Arc<Reactor>> {
        Reactor::new(Some(TimerFd::new()?))
    }

    fn new(timer: Option<TimerFd>) -> std::io::Result<Arc<Reactor>> {
        let reactor = Arc::new(Reactor {
            epoll: Epoll::new()?,
            wake: EventFd::new()?,
            timer,
            rounds: Mutex::new(Rounds::default()),
            engines: Mutex::new(HashMap::new()),
            timers: Mutex::new(Timers {
                heap: BinaryHeap::new(),
                sleeping_until: None,
            }),
            load: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        });
        reactor.epoll.add(reactor.wake.fd(), TOKEN_WAKE, READABLE)?;
        if let Some(timer) = &reactor.timer {
            reactor.epoll.add(timer.fd(), TOKEN_TIMER, READABLE)?;
        }
        Ok(reactor)
    }

    /// The epoll descriptor: readable when a round has work.
    pub(crate) fn fd(&self) -> RawFd {
        self.epoll.fd()
    }

    /// One round without waiting: what is ready, then what is due.
    pub(crate) fn poll(&self) {
        let mut rounds = lock(&self.rounds);
        self.round(&mut rounds, Some(std::time::Duration::ZERO));
        if let Some(timer) = &self.timer {
            // Set for the next deadline, the ones this round added included.
            let mut timers = lock(&self.timers);
            let next = timers.heap.peek().map(|Reverse((at, _))| *at);
            if next != timers.sleeping_until {
                timers.sleeping_until = next;
                timer.set(next.map(|at| at.saturating_duration_since(Instant::now())));
            }
        }
    }

    fn run(&self) {
        let mut rounds = lock(&self.rounds);
        loop {
            let timeout = {
                let mut timers = lock(&self.timers);
                let next = timers.heap.peek().map(|Reverse((at, _))| *at);
                timers.sleeping_until = next;
                next.map(|at| at.saturating_duration_since(Instant::now()))
            };
            self.round(&mut rounds, timeout);
        }
    }

    fn round(&self, rounds: &mut Rounds, timeout: Option<std::time::Duration>) {
        let Rounds {
            ready,
            batch,
            group,
        } = rounds;
        {
            // EBADF/EINVAL cannot happen on our own epoll.
            let n = self.epoll.wait(ready, timeout).unwrap_or(0);
            batch.clear();
            for event in &ready[..n] {
                // epoll_event is packed: copy the fields out, never borrow them.
                let (token, flags) = (event.u64, event.events);
                if token == TOKEN_WAKE {
                    self.wake.drain();
                } else if token == TOKEN_TIMER {
                    if let Some(timer) = &self.timer {
                        timer.drain();
                    }
                } else {
                    batch.push((token >> LOCAL_BITS, token & LOCAL_MASK, flags));
                }
            }
            // One call per engine per round, as when each had a thread.
            batch.sort_by_key(|&(id, _, _)| id);
            for events in batch.chunk_by(|a, b| a.0 == b.0) {
                if let Some(engine) = self.engine(events[0].0) {
                    group.clear();
                    group.extend(events.iter().map(|&(_, local, flags)| (local, flags)));
                    engine.ready(group);
                }
            }
            let now = Instant::now();
            let mut due = Vec::new();
            {
                let mut timers = lock(&self.timers);
                while let Some(Reverse((at, id))) = timers.heap.peek().copied() {
                    if at > now {
                        break;
                    }
                    timers.heap.pop();
                    due.push(id);
                }
            }
            due.sort_unstable();
            due.dedup();
            for id in due {
                if let Some(engine) = self.engine(id) {
                    engine.timer(now);
                }
            }
        }
    }

    fn engine(&self, id: u64) -> Option<Arc<dyn Driven>> {
        lock(&self.engines).get(&id).and_then(Weak::upgrade)
    }
}

static POOL: OnceLock<Vec<Arc<Reactor>>> = OnceLock::new();

/// Start the process's engine threads if they are not running yet: one per
/// core the process may use (at least one, at most [`MAX_THREADS`]).
pub(crate) fn start_pool() -> std::io::Result<()> {
    if POOL.get().is_some() {
        return Ok(());
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_THREADS);
    let started = (0..threads)
        .map(Reactor::start)
        .collect::<std::io::Result<Vec<_>>>()?;
    // Two first uses at once: one pool wins, the other's threads idle.
    POOL.get_or_init(|| started);
    Ok(())
}

/// How many engine threads run (0 before the first engine).
pub fn engine_threads() -> usize {
    POOL.get().map_or(0, Vec::len)
}

/// An engine's place on an engine thread: its sockets' tokens, its timers.
/// Dropping it takes the engine off the thread.
pub(crate) struct Registration {
    reactor: Arc<Reactor>,
    id: u64,
}

impl Registration {
    /// Register `engine` with the least loaded engine thread
    /// ([`start_pool`] first).
    pub(crate) fn new(engine: Weak<dyn Driven>) -> Registration {
        let reactor = POOL
            .get()
            .expect("start_pool() before registering an engine")
            .iter()
            .min_by_key(|r| r.load.load(Ordering::Relaxed))
            .map(Arc::clone)
            .expect("the pool has a thread");
        Registration::on(reactor, engine)
    }

    /// Register `engine` with `reactor` (a [`Reactor::manual`] one).
    pub(crate) fn on(reactor: Arc<Reactor>, engine: Weak<dyn Driven>) -> Registration {
        let id = reactor.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&reactor.engines).insert(id, engine);
        reactor.load.fetch_add(1, Ordering::Relaxed);
        Registration { reactor, id }
    }

    fn token(&self, local: u64) -> u64 {
        debug_assert!(local <= LOCAL_MASK);
        (self.id << LOCAL_BITS) | local
    }

    /// Watch `fd` for `want` (0: not at all) under `local`; `current` is
    /// what it is watched for now, and becomes what it is watched for after.
    pub(crate) fn set_interest(&self, fd: RawFd, local: u64, current: &mut u32, want: u32) {
        if want == *current {
            return;
        }
        let epoll = &self.reactor.epoll;
        // An unwatched socket (want 0) is deleted rather than kept with no
        // events: epoll reports hang-ups regardless, which would spin.
        let result = match (*current, want) {
            (_, 0) => {
                epoll.delete(fd);
                Ok(())
            }
            (0, _) => epoll.add(fd, self.token(local), want),
            _ => epoll.modify(fd, self.token(local), want),
        };
        *current = if result.is_ok() { want } else { 0 };
    }

    /// Stop watching `fd` (see [`Epoll::delete`]).
    pub(crate) fn unwatch(&self, fd: RawFd) {
        self.reactor.epoll.delete(fd);
    }

    /// Call the engine's [`Driven::timer`] at `deadline` (or soon after).
    pub(crate) fn schedule(&self, deadline: Instant) {
        let mut timers = lock(&self.reactor.timers);
        timers.heap.push(Reverse((deadline, self.id)));
        if timers
            .sleeping_until
            .is_none_or(|sleeping| deadline < sleeping)
        {
            timers.sleeping_until = Some(deadline);
            match &self.reactor.timer {
                Some(timer) => {
                    timer.set(Some(deadline.saturating_duration_since(Instant::now())));
                }
                None => self.reactor.wake.signal(),
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.reactor.engines).remove(&self.id);
        self.reactor.load.fetch_sub(1, Ordering::Relaxed);
    }
}
