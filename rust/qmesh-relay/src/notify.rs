//! Wake-ups from engines to Python, many engines to one descriptor.
//!
//! A Gate holds thousands of idle sessions; a descriptor per session for its
//! wake-ups would double what each costs against the process's descriptor
//! limit. A [`Notifier`] is one eventfd and a list of the keys (sessions)
//! that have something for Python: the one Trio task waiting on the eventfd
//! takes the keys and wakes those sessions.

use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};

use crate::sys::EventFd;

pub struct Notifier {
    wake: EventFd,
    ready: Mutex<Vec<u64>>,
}

impl Notifier {
    pub fn new() -> std::io::Result<Notifier> {
        Ok(Notifier {
            wake: EventFd::new()?,
            ready: Mutex::new(Vec::new()),
        })
    }

    /// Readable while [`Notifier::take`] has keys.
    pub fn fd(&self) -> RawFd {
        self.wake.fd()
    }

    /// `key` has something for Python. The caller posts a key at most once
    /// until Python takes it (an engine's `notified` flag), so the list holds
    /// each key once.
    pub fn post(&self, key: u64) {
        let mut ready = self.lock();
        // The eventfd is signalled only by the first post after a take:
        // under the lock, so a take cannot drain between push and signal.
        if ready.is_empty() {
            self.wake.signal();
        }
        ready.push(key);
    }

    /// Every key posted since the last take.
    pub fn take(&self) -> Vec<u64> {
        let mut ready = self.lock();
        self.wake.drain();
        std::mem::take(&mut *ready)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u64>> {
        // The list stays valid whatever panicked while holding it.
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn keys_come_back_once_and_the_fd_follows_them() {
        let n = Notifier::new().unwrap();
        assert!(!readable(n.fd()));
        n.post(7);
        n.post(9);
        assert!(readable(n.fd()));
        assert_eq!(n.take(), vec![7, 9]);
        assert!(!readable(n.fd()));
        assert!(n.take().is_empty());
        n.post(3);
        assert!(readable(n.fd()));
        assert_eq!(n.take(), vec![3]);
    }
}
