//! The few Linux system calls the engine needs, as safe functions over raw
//! file descriptors it does not own (Python owns the sockets; the engine only
//! borrows their numbers while they are registered with it).

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

fn check(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `read(2)`, retried on EINTR. `Ok(0)` is end of stream.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes.
        let ret = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match check(ret) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `send(2)` with MSG_NOSIGNAL (a closed peer is an error, not SIGPIPE),
/// retried on EINTR. Sockets only.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid, readable region of `buf.len()` bytes.
        let ret = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        match check(ret) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `sendmsg(2)` of several buffers in one call, with MSG_NOSIGNAL, retried
/// on EINTR: how many bytes of them, in order, were taken. Sockets only.
pub fn send_vectored(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // The kernel takes at most IOV_MAX (1024) buffers a call.
    let bufs = &bufs[..bufs.len().min(1024)];
    loop {
        // SAFETY: an all-zero msghdr is valid (no address, no control data).
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on Unix; the kernel only
        // reads through these pointers.
        message.msg_iov = bufs.as_ptr().cast_mut().cast();
        message.msg_iovlen = bufs.len() as _;
        // SAFETY: `message` points at `bufs.len()` valid, readable iovecs.
        let ret = unsafe { libc::sendmsg(fd, &message, libc::MSG_NOSIGNAL) };
        match check(ret) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `shutdown(fd, SHUT_WR)`; a socket already disconnected is not an error.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain system call on a descriptor number.
    let ret = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    match check(ret as isize) {
        Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Give the CPU to another runnable thread, if any; back at once if none.
pub fn yield_now() {
    // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
    unsafe { libc::sched_yield() };
}

/// Whether `fd` has something to read (or hung up) right now; never blocks.
pub fn readable_now(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let ret = unsafe { libc::poll(&mut poll, 1, 0) };
    ret > 0 && poll.revents != 0
}

pub fn would_block(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

/// Readiness the engine asks for (level-triggered).
pub const READABLE: u32 = libc::EPOLLIN as u32;
pub const WRITABLE: u32 = libc::EPOLLOUT as u32;
/// Hang-up and error are reported whatever was asked for.
pub const BROKEN: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// An epoll instance (owned: closed on drop).
pub struct Epoll(RawFd);

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        check(fd as isize).map(|_| Epoll(fd))
    }

    pub fn fd(&self) -> RawFd {
        self.0
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: `event` outlives the call; the kernel copies it.
        let ret = unsafe { libc::epoll_ctl(self.0, op, fd, &mut event) };
        check(ret as isize).map(|_| ())
    }

    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    /// Stop watching `fd`. Once this returns, a later `wait` reports nothing
    /// new for it, so its owner may close it (a report already returned
    /// is the caller's to ignore).
    pub fn delete(&self, fd: RawFd) {
        // Errors mean it was not registered (or already closed): either way
        // it is not watched any more.
        let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
    }

    /// Wait for readiness; `None` waits without a deadline.
    pub fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let millis = match timeout {
            // Round up: waking a little late is fine, early means a spin.
            Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
            None => -1,
        };
        // SAFETY: `events` is a valid buffer of `events.len()` entries.
        let ret =
            unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as _, millis) };
        match check(ret as isize) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(0),
            other => other,
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// A non-blocking eventfd (owned): one side signals, the other waits for it
/// to become readable and drains it.
pub struct EventFd(RawFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        check(fd as isize).map(|_| EventFd(fd))
    }

    pub fn fd(&self) -> RawFd {
        self.0
    }

    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64. It cannot fail short of
        // the counter overflowing, which needs 2^64 signals without a drain.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }

    pub fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN (nothing to drain) is fine.
        unsafe { libc::read(self.0, (&mut value as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// A non-blocking timerfd on the monotonic clock (owned): readable once
/// its deadline has passed, until drained.
pub struct TimerFd(RawFd);

impl TimerFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        check(fd as isize).map(|_| TimerFd(fd))
    }

    pub fn fd(&self) -> RawFd {
        self.0
    }

    /// Fire once, `after` from now; `None` disarms it.
    pub fn set(&self, after: Option<Duration>) {
        let value = match after {
            // A zero value would disarm it: a deadline already passed fires at once.
            Some(after) => libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: after.subsec_nanos().max(u32::from(after.is_zero())) as libc::c_long,
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        // It cannot fail on our own timerfd with a normalised value.
        unsafe { libc::timerfd_settime(self.0, 0, &spec, std::ptr::null_mut()) };
    }

    pub fn drain(&self) {
        let mut expirations: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN (not fired) is fine.
        unsafe { libc::read(self.0, (&mut expirations as *mut u64).cast(), 8) };
    }
}

impl Drop for TimerFd {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { libc::close(self.0) };
    }
}

/// `time.monotonic()`'s clock, in seconds, so Python can compare the times
/// the engine stamps on what it reports.
pub fn monotonic() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// `struct sched_attr` as the kernel first defined it (`SCHED_ATTR_SIZE_VER0`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    /// For the fair policies (Linux 6.12 on): the thread's time slice.
    runtime: u64,
    deadline: u64,
    period: u64,
}

fn sched_getattr() -> io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: `attr` is a writable sched_attr of `size` bytes; 0 names the
    // calling thread.
    let ret = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
    check(ret as isize)?;
    Ok(attr)
}

/// Ask for a time slice of `slice` for the calling thread, its policy and
/// nice value kept; `None`: the kernel's own again. Under Linux's fair
/// scheduler (6.12 on), a thread woken with a shorter slice than the one
/// running preempts it at once, rather than waiting for the running one's
/// slice (1.5 ms or more) to end: the event loop's thread asks for a short
/// one, so the bulk work of other threads (an audit batch into SQLite) does
/// not hold up the requests it serves. A thread inherits the slice of the
/// one that created it. The kernel clamps it to 0.1–100 ms. `Ok(false)`:
/// the kernel keeps no slice per thread (before 6.12).
pub fn request_time_slice(slice: Option<Duration>) -> io::Result<bool> {
    let mut attr = sched_getattr()?;
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.runtime = slice.map_or(0, |slice| {
        u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX)
    });
    // SAFETY: `attr` is a valid sched_attr of `attr.size` bytes; 0 names the
    // calling thread.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
    check(ret as isize)?;
    Ok(sched_getattr()?.runtime != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_nice_value_when_it_asks_for_a_time_slice() {
        std::thread::spawn(|| {
            // SAFETY: plain system calls on the calling thread.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) };
            let took = request_time_slice(Some(Duration::from_micros(500))).expect("sched_setattr");
            let attr = sched_getattr().unwrap();
            assert_eq!((attr.policy, attr.nice), (libc::SCHED_OTHER as u32, 3));
            // Kernels before 6.12 keep no slice of a fair thread's own.
            assert_eq!(attr.runtime, if took { 500_000 } else { 0 });
            // A thread it starts inherits the slice, and can give it up.
            std::thread::spawn(move || {
                assert_eq!(
                    sched_getattr().unwrap().runtime,
                    if took { 500_000 } else { 0 }
                );
                assert_eq!(request_time_slice(None).expect("sched_setattr"), took);
                // The kernel shows its own slice, whatever it is here.
                let attr = sched_getattr().unwrap();
                assert_ne!(attr.runtime, 500_000);
                assert_eq!(attr.nice, 3);
            })
            .join()
            .unwrap();
        })
        .join()
        .unwrap();
    }
}
