//! `qmesh._core.PoolShelf`: the Python face of a transaction-mode pool's
//! shelf (`qmesh-relay`'s `pool.rs`): idle server connections and the
//! clients waiting for one, shared by the engine threads and Python.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use qmesh_relay as relay;

use crate::tls::TlsSession;
use crate::Result;
use crate::NEVER;

/// ``(kind, lease, touched, ticket)``: ``"delivered"`` (``lease`` for the
/// waiter ``ticket``), ``"check"`` or ``"close"`` (``lease`` needs Python),
/// ``"wanted"`` (an engine's client waits: open one if there is room).
type PyShelfEvent = (&'static str, u64, bool, u64);

/// Seconds from Python, a negative number meaning none.
fn seconds(value: f64, what: &str) -> Result<Duration> {
    Ok(crate::seconds(value.max(0.0), what)?)
}

/// The names of the statements prepared on one server connection, under
/// their server names: a set of ``bytes``, shared with the engine that
/// holds the connection while it is lent to one.
#[pyclass(module = "qmesh._core", name = "PreparedNames", frozen)]
#[derive(Default)]
pub struct PreparedNames {
    inner: Arc<relay::Prepared>,
}

#[pymethods]
impl PreparedNames {
    #[new]
    fn new() -> Self {
        PreparedNames::default()
    }

    fn __contains__(&self, name: &[u8]) -> bool {
        self.inner.contains(name)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn add(&self, name: &[u8]) {
        self.inner.insert(name);
    }

    /// Remove ``name`` if it is there.
    fn discard(&self, name: &[u8]) {
        self.inner.remove(name);
    }

    fn clear(&self) {
        self.inner.clear();
    }

    fn __repr__(&self) -> String {
        format!("PreparedNames({} names)", self.inner.len())
    }
}

/// The idle connections of one pool and its line of waiting clients.
/// Connections are named by Python's ids; the shelf borrows their
/// descriptors while they are idle here or lent to an engine.
#[pyclass(module = "qmesh._core", name = "PoolShelf", frozen)]
pub struct PoolShelf {
    pub(crate) inner: Arc<relay::Shelf>,
}

#[pymethods]
impl PoolShelf {
    /// A shelf whose connections idle longer than ``check_after`` seconds
    /// go to Python to be checked before they are lent.
    #[new]
    fn new(check_after: f64) -> Result<Self> {
        let check_after = seconds(check_after, "check_after").unwrap_or(NEVER);
        Ok(PoolShelf {
            inner: relay::Shelf::new(check_after.min(NEVER))?,
        })
    }

    /// Readable while :meth:`take_events` has something.
    #[getter]
    fn notify_fd(&self) -> RawFd {
        self.inner.notify_fd()
    }

    /// Connection ``lease`` (socket ``fd``, its statements ``prepared``,
    /// its TLS connection ``tls`` if it has one), ready for use, to the
    /// first in line or idle; closed when it comes back after
    /// ``expires_in`` seconds.
    #[pyo3(signature = (lease, fd, expires_in, prepared, *, tls = None))]
    fn give(
        &self,
        lease: u64,
        fd: RawFd,
        expires_in: f64,
        prepared: &PreparedNames,
        tls: Option<PyRef<'_, TlsSession>>,
    ) -> Result<()> {
        let now = Instant::now();
        let expires = now
            + seconds(expires_in, "expires_in")
                .unwrap_or(NEVER)
                .min(NEVER);
        self.inner.give(relay::Lease::new(
            lease,
            fd,
            expires,
            prepared.inner.clone(),
            tls.map(|session| session.slot()),
        ));
        Ok(())
    }

    /// ``(lease, touched)`` of an idle connection if one is here and nobody
    /// waits, else None.
    fn take(&self) -> Option<(u64, bool)> {
        self.inner.take().map(|lease| (lease.id, lease.touched))
    }

    /// ``(lease, touched, 0)`` for an idle connection now, else ``(None,
    /// False, ticket)``: a place in line, served by a ``"delivered"`` event.
    fn take_or_wait(&self) -> (Option<u64>, bool, u64) {
        match self.inner.take_or_wait_python() {
            Ok(lease) => (Some(lease.id), lease.touched, 0),
            Err(ticket) => (None, false, ticket),
        }
    }

    /// Leave the line; False if the ticket was served already.
    fn cancel(&self, ticket: u64) -> bool {
        self.inner.cancel(ticket)
    }

    /// The ticket of the first of Python's waiters, taken out of line to
    /// look again (a place came free); None if none waits.
    fn wake_python(&self) -> Option<u64> {
        self.inner.wake_python()
    }

    /// Everything waiting for Python, in order.
    fn take_events(&self) -> Vec<PyShelfEvent> {
        self.inner
            .take_events()
            .into_iter()
            .map(|event| match event {
                relay::ShelfEvent::Delivered { ticket, lease } => {
                    ("delivered", lease.id, lease.touched, ticket)
                }
                relay::ShelfEvent::Returned { lease, why } => {
                    let kind = match why {
                        relay::ReturnWhy::Check => "check",
                        relay::ReturnWhy::Close => "close",
                    };
                    (kind, lease.id, lease.touched, 0)
                }
                relay::ShelfEvent::Wanted => ("wanted", 0, false, 0),
            })
            .collect()
    }

    /// Idle connections that idled longer than ``idle_for`` seconds (every
    /// one with None), taken off the shelf: ``(lease, touched)``.
    #[pyo3(signature = (idle_for = None))]
    fn take_idle(&self, idle_for: Option<f64>) -> Result<Vec<(u64, bool)>> {
        let idle_for = idle_for.map(|s| seconds(s, "idle_for")).transpose()?;
        Ok(self
            .inner
            .take_idle(idle_for)
            .into_iter()
            .map(|lease| (lease.id, lease.touched))
            .collect())
    }

    /// The least recently used idle connection, taken off the shelf.
    fn take_oldest_idle(&self) -> Option<u64> {
        self.inner.take_oldest_idle().map(|lease| lease.id)
    }

    /// Close this many connections as they come back from engines.
    fn set_excess(&self, excess: usize) {
        self.inner.set_excess(excess);
    }

    /// Whether the pool holds all the connections it may: an engine's
    /// client then waits in line without a ``"wanted"`` event (Python
    /// looks at the line itself when a place comes free).
    fn set_full(&self, full: bool) {
        self.inner.set_full(full);
    }

    /// ``(idle, waiting, longest_wait_s, engine_loans, waits, wait_s_total)``:
    /// waits are of the clients that had to wait in line.
    fn stats(&self) -> (usize, usize, f64, u64, u64, f64) {
        let s = self.inner.stats();
        (
            s.idle,
            s.waiting,
            s.longest_wait.as_secs_f64(),
            s.engine_loans,
            s.waits,
            s.wait_total.as_secs_f64(),
        )
    }

    /// Engines' clients waiting in line.
    fn engine_waiters(&self) -> usize {
        self.inner.engine_waiters()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PreparedNames>()?;
    m.add_class::<PoolShelf>()
}
