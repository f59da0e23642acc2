//! The shelf of a transaction-mode pool: its idle server connections and
//! the clients waiting for one, shared by the engine threads and Python.
//!
//! A pooled client session borrows a server connection for one transaction.
//! When the engine relays the session ([`crate::engine`]), the loan and the
//! return happen on the engine thread: a transaction never waits for
//! Python. Python keeps what needs it: logging in new connections, checking
//! one that idled long or spoke while idle, resetting one a client left
//! dirty, closing one past its lifetime, the pool's size and the caps. The
//! shelf tells it through [`ShelfEvent`]s and its own [`Notifier`].
//!
//! Python owns the sockets: the shelf and the engines only borrow their
//! descriptors while a connection is idle here or lent to an engine, and a
//! connection leaves them only through Python ([`ShelfEvent::Returned`],
//! [`Shelf::take_idle`]), which closes it.
//!
//! Locks: an engine calls in while holding its own state; the shelf then
//! calls [`LeaseTaker::deliver`], which takes only the engine's mailbox.
//! So the order is always engine state, shelf, mailbox.

use std::collections::{HashSet, VecDeque};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::notify::Notifier;
use crate::reactor::Roaming;
use crate::sys;
use crate::tls::TlsSlot;

/// A server connection on loan from the shelf.
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    /// Python's name for the connection.
    pub id: u64,
    /// An engine ran statements on it since Python last had it (the
    /// server then holds no client's unnamed statement: a simple Query
    /// drops it).
    pub touched: bool,
    /// Past this it is closed when it comes back.
    pub expires: Instant,
    /// The statements prepared on it under their server names, shared
    /// with Python's relay (see the `pooled` module).
    pub prepared: Arc<Prepared>,
    /// Its TLS connection, if it has one, shared with Python: the engine
    /// that holds the lease has it out of the slot.
    pub tls: Option<Arc<TlsSlot>>,
    /// Its socket's place in an engine thread's epoll, kept between loans;
    /// left when the lease is dropped (back with Python).
    pub(crate) roaming: Roaming,
}

impl Lease {
    pub fn new(
        id: u64,
        fd: RawFd,
        expires: Instant,
        prepared: Arc<Prepared>,
        tls: Option<Arc<TlsSlot>>,
    ) -> Lease {
        Lease {
            id,
            touched: false,
            expires,
            prepared,
            tls,
            roaming: Roaming::new(fd),
        }
    }

    /// Its socket.
    pub fn fd(&self) -> RawFd {
        self.roaming.fd()
    }
}

/// The names of the statements prepared on one server connection: read
/// and changed by whoever holds the connection (an engine while it is
/// lent to one, Python's relay otherwise), so the lock is never contended
/// for long.
#[derive(Debug, Default)]
pub struct Prepared {
    names: Mutex<HashSet<Box<[u8]>>>,
}

impl Prepared {
    fn names(&self) -> MutexGuard<'_, HashSet<Box<[u8]>>> {
        // A set of names is whole after any panic: keep using it.
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn contains(&self, name: &[u8]) -> bool {
        self.names().contains(name)
    }

    /// False if it was there already.
    pub fn insert(&self, name: &[u8]) -> bool {
        self.names().insert(name.into())
    }

    /// False if it was not there.
    pub fn remove(&self, name: &[u8]) -> bool {
        self.names().remove(name)
    }

    pub fn clear(&self) {
        self.names().clear();
    }

    pub fn len(&self) -> usize {
        self.names().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One connection's set is equal only to itself.
impl PartialEq for Prepared {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Prepared {}

/// Why a connection went back to Python rather than to the shelf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnWhy {
    /// It idled past the check delay, or the server sent something while
    /// nobody was talking to it: Python checks it, then gives it back.
    Check,
    /// Past its lifetime, or beyond a smaller pool size: Python closes it.
    Close,
}

/// What the shelf has for Python.
#[derive(Debug, PartialEq, Eq)]
pub enum ShelfEvent {
    /// A connection for Python's waiter `ticket`.
    Delivered { ticket: u64, lease: Lease },
    /// A connection that needs Python.
    Returned { lease: Lease, why: ReturnWhy },
    /// An engine's client waits with no idle connection to be had: Python
    /// opens one if the pool has room. Not sent while Python said the pool
    /// is full ([`Shelf::set_full`]): it looks at the line itself when a
    /// place comes free.
    Wanted,
}

/// An engine that can be handed a connection its stream waits for.
pub(crate) trait LeaseTaker: Send + Sync {
    /// `lease` for stream `sid`'s wait `ticket`. Called with the shelf
    /// locked: take only a lock of your own that nothing else nests in.
    fn deliver(&self, shelf: Arc<Shelf>, sid: u32, ticket: u64, lease: Lease);
}

enum Waiter {
    Engine {
        taker: Weak<dyn LeaseTaker>,
        sid: u32,
        ticket: u64,
        since: Instant,
    },
    Python {
        ticket: u64,
        since: Instant,
    },
}

impl Waiter {
    fn ticket(&self) -> u64 {
        match self {
            Waiter::Engine { ticket, .. } | Waiter::Python { ticket, .. } => *ticket,
        }
    }

    fn since(&self) -> Instant {
        match self {
            Waiter::Engine { since, .. } | Waiter::Python { since, .. } => *since,
        }
    }
}

struct Idle {
    lease: Lease,
    since: Instant,
}

/// Counters for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShelfStats {
    pub idle: usize,
    pub waiting: usize,
    /// How long the first in line has waited.
    pub longest_wait: Duration,
    /// Loans to engines' clients.
    pub engine_loans: u64,
    /// Clients that had to wait in line, and their waits together.
    pub waits: u64,
    pub wait_total: Duration,
}

struct State {
    /// Most recently used last: its caches are warm.
    idle: Vec<Idle>,
    waiters: VecDeque<Waiter>,
    events: Vec<ShelfEvent>,
    notified: bool,
    check_after: Duration,
    /// Connections to close as they come back (the pool shrank).
    excess: usize,
    /// The pool holds all the connections it may: no use asking for more.
    full: bool,
    next_ticket: u64,
    engine_loans: u64,
    waits: u64,
    wait_total: Duration,
}

/// See the module documentation.
pub struct Shelf {
    state: Mutex<State>,
    notifier: Notifier,
    me: Weak<Shelf>,
}

impl Shelf {
    /// A shelf whose idle connections are checked by Python before a loan
    /// once they idled longer than `check_after`.
    pub fn new(check_after: Duration) -> std::io::Result<Arc<Shelf>> {
        let notifier = Notifier::new()?;
        Ok(Arc::new_cyclic(|me| Shelf {
            me: me.clone(),
            state: Mutex::new(State {
                idle: Vec::new(),
                waiters: VecDeque::new(),
                events: Vec::new(),
                notified: false,
                check_after,
                excess: 0,
                full: false,
                next_ticket: 1,
                engine_loans: 0,
                waits: 0,
                wait_total: Duration::ZERO,
            }),
            notifier,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change leaves the state whole; a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Readable while [`Shelf::take_events`] has something.
    pub fn notify_fd(&self) -> RawFd {
        self.notifier.fd()
    }

    /// A connection ready for use (new, checked, reset, or back from a
    /// client): to the first in line, else idle.
    pub fn give(&self, lease: Lease) {
        let mut st = self.lock();
        self.place(&mut st, lease, Instant::now());
    }

    /// A connection back from an engine's client, clean: closed if it
    /// expired or the pool shrank, else [`Shelf::give`].
    pub(crate) fn give_back(&self, lease: Lease) {
        let mut st = self.lock();
        let now = Instant::now();
        if now >= lease.expires || st.excess > 0 {
            st.excess = st.excess.saturating_sub(1);
            self.return_locked(&mut st, lease, ReturnWhy::Close);
            return;
        }
        self.place(&mut st, lease, now);
    }

    fn place(&self, st: &mut State, lease: Lease, now: Instant) {
        while let Some(waiter) = st.waiters.pop_front() {
            st.wait_total += now.saturating_duration_since(waiter.since());
            match waiter {
                Waiter::Python { ticket, .. } => {
                    st.events.push(ShelfEvent::Delivered { ticket, lease });
                    self.notify(st);
                    return;
                }
                Waiter::Engine {
                    taker, sid, ticket, ..
                } => {
                    if let (Some(taker), Some(me)) = (taker.upgrade(), self.me.upgrade()) {
                        st.engine_loans += 1;
                        taker.deliver(me, sid, ticket, lease);
                        return;
                    }
                    // An engine gone: its clients wait no more.
                }
            }
        }
        st.idle.push(Idle { lease, since: now });
    }

    /// A connection Python must see to (see [`ReturnWhy`]).
    pub(crate) fn return_to_python(&self, lease: Lease, why: ReturnWhy) {
        let mut st = self.lock();
        self.return_locked(&mut st, lease, why);
    }

    fn return_locked(&self, st: &mut State, lease: Lease, why: ReturnWhy) {
        st.events.push(ShelfEvent::Returned { lease, why });
        self.notify(st);
    }

    fn notify(&self, st: &mut State) {
        if !st.notified {
            st.notified = true;
            self.notifier.post(0);
        }
    }

    /// A fresh idle connection, if one is here; those that need a check on
    /// the way go to Python.
    fn take_fresh(&self, st: &mut State) -> Option<Lease> {
        let now = Instant::now();
        while let Some(idle) = st.idle.pop() {
            let stale = now.duration_since(idle.since) > st.check_after;
            if stale || sys::readable_now(idle.lease.fd()) {
                self.return_locked(st, idle.lease, ReturnWhy::Check);
                continue;
            }
            return Some(idle.lease);
        }
        None
    }

    /// For an engine's stream `sid`: a connection now, or the ticket of its
    /// place in line (the connection comes through `taker`).
    pub(crate) fn take_or_wait(
        &self,
        taker: Weak<dyn LeaseTaker>,
        sid: u32,
    ) -> std::result::Result<Lease, u64> {
        let mut st = self.lock();
        let taken = self.take_or_queue(&mut st, |ticket, since| Waiter::Engine {
            taker,
            sid,
            ticket,
            since,
        });
        match taken {
            Ok(_) => st.engine_loans += 1,
            // A waiter in a full pool is served by a connection coming back:
            // waking Python for each (64 clients on 20 connections: most
            // transactions wait) only has it find the pool full again.
            Err(_) if st.full => {}
            Err(_) => {
                st.events.push(ShelfEvent::Wanted);
                self.notify(&mut st);
            }
        }
        taken
    }

    /// For Python: a connection now if one is idle and nobody waits.
    pub fn take(&self) -> Option<Lease> {
        let mut st = self.lock();
        if !st.waiters.is_empty() {
            return None;
        }
        self.take_fresh(&mut st)
    }

    /// For Python: a connection now, or the ticket of its place in line
    /// (the connection comes as [`ShelfEvent::Delivered`]).
    pub fn take_or_wait_python(&self) -> std::result::Result<Lease, u64> {
        let mut st = self.lock();
        self.take_or_queue(&mut st, |ticket, since| Waiter::Python { ticket, since })
    }

    /// A fresh idle connection if nobody waits before, else a place in line
    /// for the waiter `make` builds from its ticket and the time.
    fn take_or_queue(
        &self,
        st: &mut State,
        make: impl FnOnce(u64, Instant) -> Waiter,
    ) -> std::result::Result<Lease, u64> {
        if st.waiters.is_empty() {
            if let Some(lease) = self.take_fresh(st) {
                return Ok(lease);
            }
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.waits += 1;
        st.waiters.push_back(make(ticket, Instant::now()));
        Err(ticket)
    }

    /// Leave the line; false if `ticket` was served already (its
    /// connection is on its way).
    pub fn cancel(&self, ticket: u64) -> bool {
        let mut st = self.lock();
        let Some(index) = st.waiters.iter().position(|w| w.ticket() == ticket) else {
            return false;
        };
        let waiter = st.waiters.remove(index).expect("found above");
        st.wait_total += waiter.since().elapsed();
        true
    }

    /// Tell the first waiter that is Python's to look again (a place to
    /// open a connection came free): its ticket, served with no connection.
    pub fn wake_python(&self) -> Option<u64> {
        let mut st = self.lock();
        let index = st
            .waiters
            .iter()
            .position(|w| matches!(w, Waiter::Python { .. }))?;
        st.waiters.remove(index).map(|w| w.ticket())
    }

    /// Everything waiting for Python.
    pub fn take_events(&self) -> Vec<ShelfEvent> {
        let mut st = self.lock();
        self.notifier.take();
        st.notified = false;
        std::mem::take(&mut st.events)
    }

    /// Idle connections that idled longer than `idle_for`, taken off the
    /// shelf (all of them with `None`); the least recently used first.
    pub fn take_idle(&self, idle_for: Option<Duration>) -> Vec<Lease> {
        let mut st = self.lock();
        let now = Instant::now();
        let (old, keep): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut st.idle)
            .into_iter()
            .partition(|i| idle_for.is_none_or(|d| now.duration_since(i.since) > d));
        st.idle = keep;
        old.into_iter().map(|i| i.lease).collect()
    }

    /// The least recently used idle connection, taken off the shelf.
    pub fn take_oldest_idle(&self) -> Option<Lease> {
        let mut st = self.lock();
        (!st.idle.is_empty()).then(|| st.idle.remove(0).lease)
    }

    /// Close this many connections as they come back from engines.
    pub fn set_excess(&self, excess: usize) {
        self.lock().excess = excess;
    }

    /// Whether the pool holds all it may: engines' clients then wait in
    /// line without a [`ShelfEvent::Wanted`].
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    pub fn stats(&self) -> ShelfStats {
        let st = self.lock();
        ShelfStats {
            idle: st.idle.len(),
            waiting: st.waiters.len(),
            longest_wait: st
                .waiters
                .front()
                .map_or(Duration::ZERO, |w| w.since().elapsed()),
            engine_loans: st.engine_loans,
            waits: st.waits,
            wait_total: st.wait_total,
        }
    }

    /// Clients of engines waiting in line (Python opens for them).
    pub fn engine_waiters(&self) -> usize {
        let st = self.lock();
        st.waiters
            .iter()
            .filter(|w| matches!(w, Waiter::Engine { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine stand-in that keeps what it is handed.
    #[derive(Default)]
    struct Taker(Mutex<Vec<(u32, u64, u64)>>);

    impl LeaseTaker for Taker {
        fn deliver(&self, _shelf: Arc<Shelf>, sid: u32, ticket: u64, lease: Lease) {
            self.0.lock().unwrap().push((sid, ticket, lease.id));
        }
    }

    fn lease(id: u64, fd: RawFd) -> Lease {
        let expires = Instant::now() + Duration::from_secs(3600);
        Lease::new(id, fd, expires, Arc::default(), None)
    }

    /// A connected socket whose peer has said nothing (so the shelf's
    /// "spoke while idle" check passes), and that peer.
    fn quiet_socket() -> (
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    ) {
        std::os::unix::net::UnixStream::pair().unwrap()
    }

    #[test]
    fn waiters_are_served_first_come_first_served_across_engines_and_python() {
        use std::os::fd::AsRawFd;
        let shelf = Shelf::new(Duration::from_secs(60)).unwrap();
        let taker: Arc<Taker> = Arc::default();
        let weak = Arc::downgrade(&taker) as Weak<dyn LeaseTaker>;
        let first = shelf.take_or_wait(weak.clone(), 7).unwrap_err();
        let second = shelf.take_or_wait_python().unwrap_err();
        let third = shelf.take_or_wait(weak, 9).unwrap_err();
        assert!(shelf.take().is_none(), "nobody jumps the line");
        let (a, _pa) = quiet_socket();
        let (b, _pb) = quiet_socket();
        shelf.give(lease(1, a.as_raw_fd()));
        shelf.give(lease(2, b.as_raw_fd()));
        assert_eq!(*taker.0.lock().unwrap(), vec![(7, first, 1)]);
        let delivered: Vec<(u64, u64)> = shelf
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                ShelfEvent::Delivered { ticket, lease } => Some((ticket, lease.id)),
                _ => None,
            })
            .collect();
        assert_eq!(delivered, vec![(second, 2)]);
        assert!(shelf.cancel(third), "still in line");
        assert!(!shelf.cancel(first), "served already");
        let stats = shelf.stats();
        assert_eq!((stats.waiting, stats.waits, stats.engine_loans), (0, 3, 1));
    }

    #[test]
    fn a_full_pool_does_not_ask_python_for_more() {
        let shelf = Shelf::new(Duration::from_secs(60)).unwrap();
        let taker: Arc<Taker> = Arc::default();
        let weak = Arc::downgrade(&taker) as Weak<dyn LeaseTaker>;
        shelf.set_full(true);
        assert!(shelf.take_or_wait(weak.clone(), 1).is_err());
        assert!(
            shelf.take_events().is_empty(),
            "served by a connection coming back"
        );
        shelf.set_full(false);
        assert!(shelf.take_or_wait(weak, 2).is_err());
        assert!(matches!(
            shelf.take_events().as_slice(),
            [ShelfEvent::Wanted]
        ));
        assert_eq!(shelf.stats().waiting, 2);
    }

    #[test]
    fn connections_that_need_python_go_to_python() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let shelf = Shelf::new(Duration::from_secs(60)).unwrap();
        let taker: Arc<Taker> = Arc::default();
        let weak = Arc::downgrade(&taker) as Weak<dyn LeaseTaker>;
        // The server spoke while the connection idled: checked by Python.
        let (spoke, mut server) = quiet_socket();
        server.write_all(b"E").unwrap();
        shelf.give(lease(1, spoke.as_raw_fd()));
        assert!(shelf.take_or_wait(weak.clone(), 1).is_err());
        let events = shelf.take_events();
        assert!(matches!(
            events.as_slice(),
            [ShelfEvent::Returned { lease, why: ReturnWhy::Check }, ShelfEvent::Wanted]
                if lease.id == 1
        ));
        // Expired, or beyond a smaller pool: closed by Python.
        let (quiet, _peer) = quiet_socket();
        let mut old = lease(2, quiet.as_raw_fd());
        old.expires = Instant::now();
        shelf.give_back(old);
        shelf.set_excess(1);
        shelf.give_back(lease(3, quiet.as_raw_fd()));
        shelf.give_back(lease(4, quiet.as_raw_fd()));
        let closed: Vec<u64> = shelf
            .take_events()
            .into_iter()
            .filter_map(|e| match e {
                ShelfEvent::Returned {
                    lease,
                    why: ReturnWhy::Close,
                } => Some(lease.id),
                _ => None,
            })
            .collect();
        assert_eq!(closed, vec![2, 3]);
        assert_eq!(*taker.0.lock().unwrap(), vec![(1, 1, 4)]);
    }
}
