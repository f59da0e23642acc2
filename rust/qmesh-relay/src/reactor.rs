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
//! A pooled server connection moves from engine to engine, one transaction
//! at a time. Registering its socket for each loan and deleting it after
//! cost two `epoll_ctl` calls a transaction, as much as the rest of the
//! engine's work on the socket. So such a socket is a [`Roaming`] one: it
//! stays in the thread's epoll between loans under a token of its own, and
//! the thread hands its events to whichever engine holds it now. Between
//! loans nobody holds it: an event then (the server spoke, or hung up, while
//! idle) only takes it out of the epoll, and its next holder finds out.
//!
//! Locks: the thread never holds the engine table or the timer heap while it
//! calls into an engine, and an engine may schedule a timer while it holds
//! its own state, so the order is always engine state, then timers. A
//! roaming socket's place is locked before the table of roaming sockets.

// Foldhash, not SipHash: the keys are the reactor's own ids and keys,
// which no peer chooses, looked up for every event of a round.
use foldhash::{HashMap, HashMapExt};

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::sys::{self, Epoll, EventFd, TimerFd, READABLE};

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
/// The longest poll window a process may set ([`set_engine_poll`]).
pub const MAX_POLL: Duration = Duration::from_millis(1);
/// A poll window starts at, and shrinks to nothing below, this share of
/// the longest (as cpuidle-haltpoll's grow start).
const POLL_START_SHARE: u32 = 4;
/// The engine part of a roaming socket's token (engine ids start at 1).
const ROAMING: u64 = 0;

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
    /// Roaming sockets that reported while nobody held them.
    strays: Vec<u64>,
}

impl Default for Rounds {
    fn default() -> Self {
        Rounds {
            ready: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT],
            batch: Vec::new(),
            group: Vec::new(),
            strays: Vec::new(),
        }
    }
}

/// A roaming socket registered with this thread's epoll.
struct Roamer {
    /// The engine and the local token its events go to; none between loans.
    holder: Option<(u64, u64)>,
    socket: Weak<RoamingSocket>,
}

#[derive(Default)]
struct Roamers {
    by_key: HashMap<u64, Roamer>,
    next_key: u64,
}

impl Roamers {
    fn insert(&mut self, roamer: Roamer) -> u64 {
        // Keys are reused only after 2^34 registrations, and never while
        // still in use.
        loop {
            let key = self.next_key;
            self.next_key = (self.next_key + 1) & LOCAL_MASK;
            if let std::collections::hash_map::Entry::Vacant(slot) = self.by_key.entry(key) {
                slot.insert(roamer);
                return key;
            }
        }
    }
}

fn roaming_token(key: u64) -> u64 {
    (ROAMING << LOCAL_BITS) | key
}

struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    /// What the thread sleeps until (a manual reactor: what its timer
    /// descriptor is set for), so that an earlier deadline wakes it.
    sleeping_until: Option<Instant>,
    /// The thread is in a round: it looks at the heap before it sleeps
    /// again, so a deadline added meanwhile needs no wake-up. (A pool's
    /// connection given back between transactions schedules one on the
    /// thread's own round: an eventfd write, and a round that wakes only
    /// to drain it, each time.)
    awake: bool,
}

impl Timers {
    /// The round is over: the next deadline is what the thread sleeps
    /// until, and from here an earlier one added wakes it.
    fn settle(&mut self) -> Option<Instant> {
        self.awake = false;
        self.sleeping_until = self.heap.peek().map(|Reverse((at, _))| *at);
        self.sleeping_until
    }
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
    roamers: Mutex<Roamers>,
    timers: Mutex<Timers>,
    load: AtomicUsize,
    next_id: AtomicU64,
    /// The longest this thread polls for work before it sleeps, in
    /// nanoseconds (0: it never polls); see [`set_engine_poll`].
    poll_max_ns: AtomicU64,
    /// Polls that found work, and polls that ran out and slept.
    polls_caught: AtomicU64,
    polls_missed: AtomicU64,
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
            .spawn(move || {
                // Not the short slice of the event loop's thread, which a
                // thread inherits from the one that starts it: an engine
                // thread serves many streams a wake-up, and with that slice
                // each server it woke preempted it (pgbench -S -c 16 through
                // qmesh here: about 8 % more TPS with the kernel's own).
                // Where the kernel has no sched_setattr, there is no slice
                // to give up either.
                let _ = sys::request_time_slice(None);
                runner.run()
            })?;
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
            roamers: Mutex::new(Roamers::default()),
            timers: Mutex::new(Timers {
                heap: BinaryHeap::new(),
                sleeping_until: None,
                awake: false,
            }),
            load: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            poll_max_ns: AtomicU64::new(POLL_MAX_NS.load(Ordering::Relaxed)),
            polls_caught: AtomicU64::new(0),
            polls_missed: AtomicU64::new(0),
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
        self.round(&mut rounds, Some(Duration::ZERO));
        if let Some(timer) = &self.timer {
            // Set for the next deadline, the ones this round added included,
            // under the lock: an earlier one scheduled meanwhile is not undone.
            let mut timers = lock(&self.timers);
            let before = timers.sleeping_until;
            let next = timers.settle();
            if next != before {
                timer.set(next.map(|at| at.saturating_duration_since(Instant::now())));
            }
        }
    }

    fn run(&self) {
        let mut rounds = lock(&self.rounds);
        let mut window = PollWindow::default();
        loop {
            let idle_since = Instant::now();
            let poll = window.get(self.poll_max());
            if !poll.is_zero() && self.poll_for(&mut rounds, poll) {
                continue;
            }
            let timeout = self.before_sleep();
            if self.round(&mut rounds, timeout) > 0 {
                // The setting now: it may have changed while the thread slept.
                window.woke_after(idle_since.elapsed(), self.poll_max());
            }
        }
    }

    /// How long the thread may sleep: until the next deadline. From here
    /// until its next round, a deadline added earlier than that wakes it.
    fn before_sleep(&self) -> Option<Duration> {
        let next = lock(&self.timers).settle();
        next.map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn poll_max(&self) -> Duration {
        Duration::from_nanos(self.poll_max_ns.load(Ordering::Relaxed))
    }

    /// Rounds that do not sleep, until one finds work or `window` has
    /// passed, giving the CPU to any other runnable thread between them.
    /// Whether one found work.
    fn poll_for(&self, rounds: &mut Rounds, window: Duration) -> bool {
        let until = Instant::now() + window;
        loop {
            if self.round(rounds, Some(Duration::ZERO)) > 0 {
                self.polls_caught.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            if Instant::now() >= until {
                self.polls_missed.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            crate::sys::yield_now();
        }
    }

    /// One wait for events (at most `timeout`) and what they and the due
    /// timers call for; the number of events.
    fn round(&self, rounds: &mut Rounds, timeout: Option<Duration>) -> usize {
        let Rounds {
            ready,
            batch,
            group,
            strays,
        } = rounds;
        // EBADF/EINVAL cannot happen on our own epoll.
        let n = self.epoll.wait(ready, timeout).unwrap_or(0);
        lock(&self.timers).awake = true;
        {
            batch.clear();
            let mut roamers = None;
            for event in &ready[..n] {
                // epoll_event is packed: copy the fields out, never borrow them.
                let (token, flags) = (event.u64, event.events);
                if token == TOKEN_WAKE {
                    self.wake.drain();
                } else if token == TOKEN_TIMER {
                    if let Some(timer) = &self.timer {
                        timer.drain();
                    }
                } else if token >> LOCAL_BITS == ROAMING {
                    let key = token & LOCAL_MASK;
                    let roamers = roamers.get_or_insert_with(|| lock(&self.roamers));
                    // A key no longer there: released meanwhile.
                    match roamers.by_key.get(&key).map(|r| r.holder) {
                        Some(Some((id, local))) => batch.push((id, local, flags)),
                        Some(None) => strays.push(key),
                        None => {}
                    }
                } else {
                    batch.push((token >> LOCAL_BITS, token & LOCAL_MASK, flags));
                }
            }
            drop(roamers);
            // One call per engine per round, as when each had a thread.
            batch.sort_by_key(|&(id, _, _)| id);
            for events in batch.chunk_by(|a, b| a.0 == b.0) {
                if let Some(engine) = self.engine(events[0].0) {
                    group.clear();
                    group.extend(events.iter().map(|&(_, local, flags)| (local, flags)));
                    engine.ready(group);
                }
            }
            for key in strays.drain(..) {
                self.release_stray(key);
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
        n
    }

    fn engine(&self, id: u64) -> Option<Arc<dyn Driven>> {
        lock(&self.engines).get(&id).and_then(Weak::upgrade)
    }

    /// A roaming socket reported while nobody held it: out of the epoll,
    /// unless a holder took it meanwhile (its events are then its own).
    fn release_stray(&self, key: u64) {
        let socket = lock(&self.roamers)
            .by_key
            .get(&key)
            .and_then(|r| r.socket.upgrade());
        let Some(socket) = socket else {
            return;
        };
        let mut place = socket.lock();
        let here = place
            .as_ref()
            .is_some_and(|p| p.key == key && std::ptr::eq(p.reactor.as_ptr(), self));
        if here
            && lock(&self.roamers)
                .by_key
                .get(&key)
                .is_some_and(|r| r.holder.is_none())
        {
            socket.release(&mut place);
        }
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

/// The process's longest poll window, for engine threads started later.
static POLL_MAX_NS: AtomicU64 = AtomicU64::new(0);

/// Let the engine threads poll for work for up to `max` (at most
/// [`MAX_POLL`]) before they sleep; zero: they never poll (the default).
///
/// A thread that sleeps in `epoll_wait` and is woken by the next message
/// pays the kernel's wake-up, and on a virtual machine the virtual CPU's
/// halt and its wake-up by the hypervisor, often tens of microseconds: at
/// one client that is most of a round trip through both proxies. Polling
/// trades CPU for that: while the window lasts, the thread asks the epoll
/// without waiting and yields the CPU to any other runnable thread between
/// asks. Each thread sizes its window from its own sleeps, as Linux's
/// cpuidle-haltpoll does for a virtual CPU's halt ([`PollWindow`]), so a
/// thread whose traffic comes in gaps longer than `max` stops polling.
pub fn set_engine_poll(max: Duration) {
    let nanos = u64::try_from(max.min(MAX_POLL).as_nanos()).unwrap_or(u64::MAX);
    POLL_MAX_NS.store(nanos, Ordering::Relaxed);
    for reactor in POOL.get().into_iter().flatten() {
        reactor.poll_max_ns.store(nanos, Ordering::Relaxed);
    }
}

/// The longest poll window the engine threads use now.
pub fn engine_poll() -> Duration {
    Duration::from_nanos(POLL_MAX_NS.load(Ordering::Relaxed))
}

/// `(caught, missed)`: the engine threads' polls that found work, and
/// those that ran out of their window and slept.
pub fn engine_polls() -> (u64, u64) {
    POOL.get()
        .into_iter()
        .flatten()
        .fold((0, 0), |(caught, missed), r| {
            (
                caught + r.polls_caught.load(Ordering::Relaxed),
                missed + r.polls_missed.load(Ordering::Relaxed),
            )
        })
}

/// One thread's poll window: how long it polls before it sleeps.
///
/// After an idle spell ended by an event: if the spell (its poll and its
/// sleep) was no longer than the longest window, polling that long would
/// have caught the event, so the window doubles (from a quarter of the
/// longest, up to it); if it was longer, the window halves, and below a
/// quarter of the longest it closes. Polls that find work leave it as it
/// is. Timers that end a sleep say nothing of the traffic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PollWindow(Duration);

impl PollWindow {
    /// The window now, under the longest `max` (which may have changed).
    fn get(self, max: Duration) -> Duration {
        self.0.min(max)
    }

    fn woke_after(&mut self, idle: Duration, max: Duration) {
        let start = max / POLL_START_SHARE;
        self.0 = if max.is_zero() {
            Duration::ZERO
        } else if idle <= max {
            (self.0 * 2).clamp(start, max)
        } else if self.0 / 2 < start {
            Duration::ZERO
        } else {
            self.0 / 2
        };
    }
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

    /// [`Registration::set_interest`] for a roaming socket, which this
    /// engine holds from now on under `local`: kept in the thread's epoll
    /// if it is there already (no system call unless the interest changes),
    /// else moved here.
    pub(crate) fn hold(&self, socket: &Roaming, local: u64, current: &mut u32, want: u32) {
        if want == *current {
            return; // held here already (or not watched at all)
        }
        let socket = &socket.0;
        let mut place = socket.lock();
        *current = 0;
        if want == 0 {
            socket.release(&mut place);
            return;
        }
        let reactor = &self.reactor;
        if let Some(p) = place
            .as_mut()
            .filter(|p| std::ptr::eq(p.reactor.as_ptr(), Arc::as_ptr(reactor)))
        {
            if p.interest != want {
                if reactor
                    .epoll
                    .modify(socket.fd, roaming_token(p.key), want)
                    .is_err()
                {
                    socket.release(&mut place);
                    return;
                }
                p.interest = want;
            }
            // A place and its table entry change together, under the place's
            // lock: the entry is there.
            let mut roamers = lock(&reactor.roamers);
            let roamer = roamers.by_key.get_mut(&p.key);
            debug_assert!(
                roamer.is_some(),
                "a registered roaming socket is in the table"
            );
            if let Some(roamer) = roamer {
                roamer.holder = Some((self.id, local));
                *current = want;
            }
            return;
        }
        socket.release(&mut place);
        // In the table before the epoll: an event is never for a key unknown.
        let key = lock(&reactor.roamers).insert(Roamer {
            holder: Some((self.id, local)),
            socket: Arc::downgrade(socket),
        });
        if reactor
            .epoll
            .add(socket.fd, roaming_token(key), want)
            .is_err()
        {
            lock(&reactor.roamers).by_key.remove(&key);
            return;
        }
        *place = Some(Place {
            reactor: Arc::downgrade(reactor),
            key,
            interest: want,
        });
        *current = want;
    }

    /// This engine lets go of a roaming socket between loans. It stays in
    /// the epoll for its next holder if it is watched for reading only
    /// (anything else would report at once).
    pub(crate) fn park(&self, socket: &Roaming) {
        let socket = &socket.0;
        let mut place = socket.lock();
        let Some(p) = place.as_ref() else {
            return;
        };
        if p.interest == READABLE && std::ptr::eq(p.reactor.as_ptr(), Arc::as_ptr(&self.reactor)) {
            if let Some(roamer) = lock(&self.reactor.roamers).by_key.get_mut(&p.key) {
                roamer.holder = None;
                return;
            }
        }
        socket.release(&mut place);
    }

    /// Call the engine's [`Driven::timer`] at `deadline` (or soon after).
    pub(crate) fn schedule(&self, deadline: Instant) {
        let mut timers = lock(&self.reactor.timers);
        timers.heap.push(Reverse((deadline, self.id)));
        if !timers.awake
            && timers
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

/// A socket that may be watched by one engine after another (a pooled
/// server connection, lent for one transaction at a time): see the module
/// documentation. Dropping it takes it out of any epoll, so it is dropped
/// before its owner closes the socket (as a [`crate::Lease`] is, when it
/// goes back to Python).
pub struct Roaming(Arc<RoamingSocket>);

impl std::fmt::Debug for Roaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Roaming({})", self.0.fd)
    }
}

impl Roaming {
    pub fn new(fd: RawFd) -> Roaming {
        Roaming(Arc::new(RoamingSocket {
            fd,
            place: Mutex::new(None),
        }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.fd
    }

    /// Out of any engine thread's epoll.
    pub(crate) fn release(&self) {
        self.0.release(&mut self.0.lock());
    }
}

impl Drop for Roaming {
    fn drop(&mut self) {
        self.release();
    }
}

/// One socket's roaming is equal only to itself.
impl PartialEq for Roaming {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Roaming {}

pub(crate) struct RoamingSocket {
    fd: RawFd,
    place: Mutex<Option<Place>>,
}

/// Where a roaming socket is registered: which thread's epoll, under
/// which key, for what.
struct Place {
    reactor: Weak<Reactor>,
    key: u64,
    interest: u32,
}

impl RoamingSocket {
    fn lock(&self) -> MutexGuard<'_, Option<Place>> {
        lock(&self.place)
    }

    fn release(&self, place: &mut Option<Place>) {
        let Some(p) = place.take() else {
            return;
        };
        // A reactor gone took its epoll with it.
        if let Some(reactor) = p.reactor.upgrade() {
            lock(&reactor.roamers).by_key.remove(&p.key);
            reactor.epoll.delete(self.fd);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.reactor.engines).remove(&self.id);
        self.reactor.load.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    const NONE: Vec<RawFd> = Vec::new();

    /// An engine stand-in that keeps the events it is handed.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, u32)>>);

    impl Driven for Recorder {
        fn ready(&self, events: &[(u64, u32)]) {
            lock(&self.0).extend_from_slice(events);
        }
        fn timer(&self, _now: Instant) {}
    }

    impl Recorder {
        fn take(&self) -> Vec<u64> {
            std::mem::take(&mut *lock(&self.0))
                .into_iter()
                .map(|(local, _)| local)
                .collect()
        }
    }

    fn engine(reactor: &Arc<Reactor>) -> (Arc<Recorder>, Registration) {
        let recorder = Arc::new(Recorder::default());
        let weak = Arc::downgrade(&recorder) as Weak<dyn Driven>;
        (recorder, Registration::on(Arc::clone(reactor), weak))
    }

    /// The descriptors `reactor`'s epoll watches, from the kernel's own
    /// account (each ADD of one is a new entry; a MOD keeps it).
    fn watched(reactor: &Reactor) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = epoll_info(reactor)
            .lines()
            .filter_map(|line| line.strip_prefix("tfd:"))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        fds.retain(|&fd| {
            fd != reactor.wake.fd() && Some(fd) != reactor.timer.as_ref().map(TimerFd::fd)
        });
        fds
    }

    /// A connected pair, the first end roaming.
    fn roaming_socket() -> (UnixStream, UnixStream, Roaming) {
        let (server, peer) = UnixStream::pair().unwrap();
        let roaming = Roaming::new(server.as_raw_fd());
        (server, peer, roaming)
    }

    /// The kernel's account of `reactor`'s epoll: a line per descriptor,
    /// with what it is watched for and its token.
    fn epoll_info(reactor: &Reactor) -> String {
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", reactor.fd()))
            .expect("fdinfo of an epoll")
    }

    /// The server end speaks once; the reactor runs a round; the byte is
    /// read back out so the socket is quiet again.
    fn speak(peer: &mut UnixStream, server: &mut UnixStream, reactor: &Reactor) {
        peer.write_all(b"x").unwrap();
        reactor.poll();
        server.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 8];
        let _ = server.read(&mut byte);
    }

    #[test]
    fn a_poll_window_grows_with_short_idle_spells_and_closes_with_long_ones() {
        let us = Duration::from_micros;
        let max = us(200);
        let mut window = PollWindow::default();
        assert_eq!(window.get(max), Duration::ZERO, "closed until a spell says");
        window.woke_after(us(60), max);
        assert_eq!(window.get(max), us(50), "opened at a quarter");
        window.woke_after(us(60), max);
        window.woke_after(us(150), max);
        assert_eq!(window.get(max), us(200), "doubled, up to the longest");
        window.woke_after(us(900), max);
        assert_eq!(window.get(max), us(100), "halved after a long spell");
        assert_eq!(window.get(us(80)), us(80), "held to a lowered longest");
        window.woke_after(us(900), max);
        assert_eq!(window.get(max), us(50));
        window.woke_after(us(900), max);
        assert_eq!(window.get(max), Duration::ZERO, "closed below a quarter");
        window.woke_after(us(10), Duration::ZERO);
        assert_eq!(
            window.get(us(200)),
            Duration::ZERO,
            "no polling when it is off"
        );
    }

    /// An engine stand-in that reads its socket whenever it is ready.
    struct Reader {
        socket: UnixStream,
        bytes: AtomicUsize,
    }

    impl Driven for Reader {
        fn ready(&self, _events: &[(u64, u32)]) {
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = (&self.socket).read(&mut buf) {
                self.bytes.fetch_add(n, Ordering::SeqCst);
            }
        }
        fn timer(&self, _now: Instant) {}
    }

    /// A [`Reader`] on `reactor`, watching its end of a pair; the other end.
    fn reading(reactor: &Arc<Reactor>) -> (Arc<Reader>, Registration, UnixStream) {
        let (server, peer) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = server.as_raw_fd();
        let reader = Arc::new(Reader {
            socket: server,
            bytes: AtomicUsize::new(0),
        });
        let weak = Arc::downgrade(&reader) as Weak<dyn Driven>;
        let registration = Registration::on(Arc::clone(reactor), weak);
        let mut interest = 0;
        registration.set_interest(fd, 1, &mut interest, READABLE);
        (reader, registration, peer)
    }

    /// Wait (at most 10 s) until `done`.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_thread_allowed_to_poll_takes_the_next_message_without_sleeping() {
        let reactor = Reactor::start(MAX_THREADS).unwrap();
        let polls = || {
            let caught = reactor.polls_caught.load(Ordering::SeqCst);
            (caught, reactor.polls_missed.load(Ordering::SeqCst))
        };
        let (reader, _registration, mut peer) = reading(&reactor);
        let read =
            |bytes: usize, what: &str| until(what, || reader.bytes.load(Ordering::SeqCst) == bytes);
        peer.write_all(b"a").unwrap();
        read(1, "a message while polling is off");
        assert_eq!(polls(), (0, 0));

        // A window far longer than the test: the message after the one
        // that wakes the thread is taken by a poll, whatever the timing.
        let max = Duration::from_secs(60).as_nanos() as u64;
        reactor.poll_max_ns.store(max, Ordering::SeqCst);
        peer.write_all(b"b").unwrap();
        read(2, "the message that wakes the thread");
        peer.write_all(b"c").unwrap();
        read(3, "the next message");
        // Counted just after the round that read it.
        until("a message taken by a poll", || polls().0 >= 1);
        assert_eq!(polls().1, 0, "no poll ran out");

        // A window cut short runs out, and the thread sleeps again.
        reactor.poll_max_ns.store(1_000_000, Ordering::SeqCst);
        peer.write_all(b"d").unwrap();
        until("a poll run out", || polls().1 >= 1);
        reactor.poll_max_ns.store(0, Ordering::SeqCst);
        peer.write_all(b"e").unwrap();
        read(5, "a message after polling is off again");
    }

    /// An engine that sets a deadline whenever it is handed events.
    #[derive(Default)]
    struct Scheduler(OnceLock<Registration>);

    impl Driven for Scheduler {
        fn ready(&self, _events: &[(u64, u32)]) {
            let registration = self.0.get().expect("registered");
            registration.schedule(Instant::now() + Duration::from_secs(60));
        }
        fn timer(&self, _now: Instant) {}
    }

    #[test]
    fn a_deadline_set_in_a_round_wakes_nobody_and_bounds_the_next_sleep() {
        let reactor = Reactor::new(None).unwrap();
        let scheduler = Arc::new(Scheduler::default());
        let weak = Arc::downgrade(&scheduler) as Weak<dyn Driven>;
        let registration = scheduler
            .0
            .get_or_init(|| Registration::on(Arc::clone(&reactor), weak));
        let (socket, mut peer) = UnixStream::pair().unwrap();
        let mut interest = 0;
        registration.set_interest(socket.as_raw_fd(), 1, &mut interest, READABLE);
        let woken = || sys::readable_now(reactor.wake.fd());

        assert_eq!(reactor.before_sleep(), None);
        peer.write_all(b"x").unwrap();
        let mut rounds = Rounds::default();
        assert_eq!(reactor.round(&mut rounds, Some(Duration::ZERO)), 1);
        assert!(!woken(), "the thread sets the deadline itself: no wake-up");
        let sleep = reactor.before_sleep().expect("a deadline");
        assert!(sleep > Duration::from_secs(59), "{sleep:?}");

        // Asleep (or about to be), an earlier deadline from elsewhere wakes it.
        registration.schedule(Instant::now() + Duration::from_secs(1));
        assert!(woken());
        registration.unwatch(socket.as_raw_fd());
    }

    #[test]
    fn a_thread_not_allowed_to_poll_never_does() {
        let reactor = Reactor::start(MAX_THREADS + 1).unwrap();
        assert_eq!(
            reactor.poll_max_ns.load(Ordering::SeqCst),
            0,
            "off by default"
        );
        let (reader, _registration, mut peer) = reading(&reactor);
        for (i, byte) in [b"a", b"b", b"c"].into_iter().enumerate() {
            peer.write_all(byte).unwrap();
            until("a message read", || {
                reader.bytes.load(Ordering::SeqCst) == i + 1
            });
        }
        let caught = reactor.polls_caught.load(Ordering::SeqCst);
        assert_eq!(
            (caught, reactor.polls_missed.load(Ordering::SeqCst)),
            (0, 0)
        );
    }

    #[test]
    fn a_roaming_socket_stays_registered_between_holders_of_one_thread() {
        let reactor = Reactor::manual().unwrap();
        let (a, reg_a) = engine(&reactor);
        let (b, reg_b) = engine(&reactor);
        let (mut server, mut peer, roaming) = roaming_socket();
        let fd = server.as_raw_fd();

        let (mut interest_a, mut interest_b) = (0, 0);
        reg_a.hold(&roaming, 7, &mut interest_a, READABLE);
        assert_eq!((interest_a, watched(&reactor)), (READABLE, vec![fd]));
        speak(&mut peer, &mut server, &reactor);
        assert_eq!((a.take(), b.take()), (vec![7], vec![]));

        // A lets go; B takes it on the same thread: the same registration.
        reg_a.park(&roaming);
        let before = epoll_info(&reactor);
        reg_b.hold(&roaming, 9, &mut interest_b, READABLE);
        assert_eq!(
            before,
            epoll_info(&reactor),
            "no epoll_ctl for a new holder"
        );
        speak(&mut peer, &mut server, &reactor);
        assert_eq!((a.take(), b.take()), (vec![], vec![9u64]));

        // Nobody holds it and it speaks: it leaves the epoll, and nobody
        // is told (its next holder finds the bytes).
        reg_b.park(&roaming);
        peer.write_all(b"x").unwrap();
        reactor.poll();
        assert_eq!(
            (a.take(), b.take(), watched(&reactor)),
            (vec![], vec![], NONE)
        );
        let mut interest = 0;
        reg_a.hold(&roaming, 7, &mut interest, READABLE);
        reactor.poll();
        assert_eq!((a.take(), watched(&reactor)), (vec![7], vec![fd]));

        // Dropped (back with Python): out of the epoll before it is closed.
        drop(roaming);
        assert_eq!(watched(&reactor), NONE);
        assert!(lock(&reactor.roamers).by_key.is_empty());
    }

    #[test]
    fn a_roaming_socket_moves_to_the_thread_of_its_new_holder() {
        let (first, second) = (Reactor::manual().unwrap(), Reactor::manual().unwrap());
        let (a, reg_a) = engine(&first);
        let (c, reg_c) = engine(&second);
        let (mut server, mut peer, roaming) = roaming_socket();
        let fd = server.as_raw_fd();

        let (mut interest_a, mut interest_c) = (0, 0);
        reg_a.hold(&roaming, 7, &mut interest_a, READABLE);
        reg_a.park(&roaming);
        reg_c.hold(&roaming, 3, &mut interest_c, READABLE);
        assert_eq!((watched(&first), watched(&second)), (NONE, vec![fd]));
        speak(&mut peer, &mut server, &second);
        first.poll();
        assert_eq!((a.take(), c.take()), (vec![], vec![3u64]));

        // Watched for nothing: out of every epoll.
        reg_c.hold(&roaming, 3, &mut interest_c, 0);
        assert_eq!((interest_c, watched(&second)), (0, NONE));
    }

    #[test]
    fn a_socket_parked_while_watched_for_writing_leaves_the_epoll() {
        let reactor = Reactor::manual().unwrap();
        let (_a, reg_a) = engine(&reactor);
        let (_server, _peer, roaming) = roaming_socket();
        let mut interest = 0;
        reg_a.hold(&roaming, 7, &mut interest, READABLE | crate::sys::WRITABLE);
        assert_eq!(watched(&reactor).len(), 1);
        reg_a.park(&roaming);
        assert_eq!(watched(&reactor), NONE);
    }
}
