//! eventfd (eventfd, eventfd2): a 64-bit counter that is a file. A write
//! of 8 bytes adds to it, a read of 8 bytes takes it (or, with
//! EFD_SEMAPHORE, takes 1) and resets it.
//!
//! As for pipes ([`crate::pipe`]), a call that would block (a read while
//! the counter is 0, a write that would take it past [`MAX`]) says so
//! with the key to wait on; the device parks the thread and makes the
//! call again when the counter changes. The counter is the whole state:
//! host memory per eventfd is constant.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::pipe::{Ready, EVENTFD_BIT, POLL_KEY};

/// The largest value the counter holds (Linux's ULLONG_MAX - 1).
pub const MAX: u64 = u64::MAX - 1;

/// eventfd2's flags (Linux's values).
pub const EFD_SEMAPHORE: u64 = 1;
pub const EFD_NONBLOCK: u64 = libc::O_NONBLOCK as u64;
pub const EFD_CLOEXEC: u64 = libc::O_CLOEXEC as u64;

/// The key a thread waits on for eventfd `id`: readers wait for the
/// counter to leave 0, writers for room.
pub fn key(id: u64, writer: bool) -> u64 {
    crate::pipe::key(id, writer) | EVENTFD_BIT
}

/// The eventfd id and side of a wait key, or `None` for another key.
pub fn parse_key(key: u64) -> Option<(u64, bool)> {
    let both = crate::pipe::KEY_BIT | EVENTFD_BIT;
    (key & both == both && key < POLL_KEY).then_some(((key & !both) >> 1, key & 1 != 0))
}

/// One eventfd (one open file description; dup shares it).
#[derive(Debug)]
pub struct EventFd {
    id: u64,
    count: Mutex<u64>,
    semaphore: bool,
    nonblock: AtomicBool,
    /// The process's list of wait keys whose waiters must be woken.
    events: Arc<Mutex<Vec<u64>>>,
    /// Wakes of readers and of writers so far (epoll's edge-triggered
    /// mode).
    gens: [AtomicU64; 2],
}

impl EventFd {
    pub fn new(
        id: u64,
        init: u64,
        semaphore: bool,
        nonblock: bool,
        events: Arc<Mutex<Vec<u64>>>,
    ) -> EventFd {
        EventFd {
            id,
            count: Mutex::new(init),
            semaphore,
            nonblock: AtomicBool::new(nonblock),
            events,
            gens: Default::default(),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn nonblock(&self) -> bool {
        self.nonblock.load(Ordering::Relaxed)
    }

    pub fn set_nonblock(&self, on: bool) {
        self.nonblock.store(on, Ordering::Relaxed);
    }

    pub fn semaphore(&self) -> bool {
        self.semaphore
    }

    pub fn count(&self) -> u64 {
        *mem::lock(&self.count)
    }

    /// The wakes of this eventfd's readers and writers so far.
    pub fn gens(&self) -> [u64; 2] {
        [
            self.gens[0].load(Ordering::Relaxed),
            self.gens[1].load(Ordering::Relaxed),
        ]
    }

    fn event(&self, writer: bool) {
        self.gens[usize::from(writer)].fetch_add(1, Ordering::Relaxed);
        mem::lock(&self.events).push(key(self.id, writer));
    }

    /// poll's events: readable while the counter is above 0, writable
    /// while a write of 1 would not block.
    pub fn poll(&self) -> i16 {
        let c = *mem::lock(&self.count);
        let mut ev = 0;
        if c > 0 {
            ev |= libc::POLLIN | libc::POLLRDNORM;
        }
        if c < MAX {
            ev |= libc::POLLOUT | libc::POLLWRNORM;
        }
        ev
    }

    /// What a read takes, if the counter is above 0: all of it (it goes
    /// to 0), or 1 in semaphore mode. Writers may go on.
    pub fn read(&self) -> Ready<u64> {
        let mut c = mem::lock(&self.count);
        if *c == 0 {
            return Ready::Wait;
        }
        let v = if self.semaphore { 1 } else { *c };
        *c -= v;
        drop(c);
        self.event(true);
        Ready::Now(v)
    }

    /// Adds `v` (below `u64::MAX`, which the caller refuses) if the
    /// counter stays at most [`MAX`]. Readers may go on.
    pub fn write(&self, v: u64) -> Ready<()> {
        let mut c = mem::lock(&self.count);
        if v > MAX - *c {
            return Ready::Wait;
        }
        *c += v;
        drop(c);
        self.event(false);
        Ready::Now(())
    }

    /// The key a reader (or writer) of this eventfd waits on.
    pub fn key(&self, writer: bool) -> u64 {
        key(self.id, writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_keeps_linux_rules() {
        let ev = Arc::new(Mutex::new(Vec::new()));
        let e = EventFd::new(5, 0, false, false, ev.clone());
        assert_eq!(e.read(), Ready::Wait);
        assert_eq!(e.poll(), libc::POLLOUT | libc::POLLWRNORM);
        assert_eq!(e.write(3), Ready::Now(()));
        assert_eq!(e.write(4), Ready::Now(()));
        assert_eq!(
            mem::lock(&ev).drain(..).collect::<Vec<_>>(),
            [key(5, false); 2]
        );
        assert_eq!(e.gens(), [2, 0]);
        assert_eq!(e.poll() & libc::POLLIN, libc::POLLIN);
        assert_eq!(e.read(), Ready::Now(7), "all of it");
        assert_eq!(mem::lock(&ev).as_slice(), [key(5, true)]);
        assert_eq!(e.read(), Ready::Wait);
        // Up to MAX: one more waits, and the counter is unwritable.
        assert_eq!(e.write(MAX), Ready::Now(()));
        assert_eq!(e.write(1), Ready::Wait);
        assert_eq!(e.poll(), libc::POLLIN | libc::POLLRDNORM);
        assert_eq!(e.read(), Ready::Now(MAX));
        // Semaphore mode: one at a time.
        let s = EventFd::new(6, 2, true, true, ev.clone());
        assert!(s.nonblock() && s.semaphore());
        assert_eq!(s.read(), Ready::Now(1));
        assert_eq!(s.read(), Ready::Now(1));
        assert_eq!(s.read(), Ready::Wait);
        // Keys: told apart from pipes' and from the poll key.
        assert_eq!(parse_key(key(6, true)), Some((6, true)));
        assert_eq!(crate::pipe::parse_key(key(6, true)), None);
        assert_eq!(parse_key(crate::pipe::key(6, true)), None);
        assert_eq!(parse_key(POLL_KEY), None);
        assert_eq!(parse_key(u64::MAX), None);
    }
}
