//! Pipes inside the SE process (pipe, pipe2): a bounded buffer shared by a
//! read end and a write end, each an open file of the process.
//!
//! A call that would block (a read of an empty pipe whose write end is
//! open, a write to a full one) does not block here: it says so
//! ([`crate::sys::ERESTARTSYS`] with the key to wait on), the device parks
//! the calling thread as a futex wait does, and when something changes on
//! the pipe (data written or read, an end closed: [`Pipe::events`]) the
//! waiters are woken and their call is made again from the start. Host
//! memory is bounded: [`CAPACITY`] bytes per pipe, and a process has at
//! most `MAX_FDS` descriptors.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes a pipe holds (Linux's default, 16 pages).
pub const CAPACITY: usize = 64 << 10;
/// Writes of at most this many bytes are atomic (POSIX PIPE_BUF).
pub const PIPE_BUF: usize = 4096;
/// Wait keys of pipes have this bit: futex keys are user addresses, below
/// it, and the signal wait's key (`u64::MAX`) is odd with every bit set,
/// which no pipe key is (ids stay below 2^60).
pub const KEY_BIT: u64 = 1 << 63;
/// Wait keys of eventfds (`crate::eventfd::key`) have this bit beside
/// [`KEY_BIT`]; pipes' keys do not.
pub const EVENTFD_BIT: u64 = 1 << 62;

/// The key a thread in poll waits on: every pipe's change wakes it.
pub const POLL_KEY: u64 = u64::MAX - 1;

/// The key a thread waits on for pipe `id`: readers wait for data or for
/// the last write end to close, writers for room or for the last read
/// end to close.
pub fn key(id: u64, writer: bool) -> u64 {
    KEY_BIT | ((id & ((1 << 60) - 1)) << 1) | u64::from(writer)
}

/// The pipe id and side of a wait key, or `None` for another key.
pub fn parse_key(key: u64) -> Option<(u64, bool)> {
    (key & KEY_BIT != 0 && key & EVENTFD_BIT == 0).then_some(((key & !KEY_BIT) >> 1, key & 1 != 0))
}

#[derive(Debug, Default)]
struct State {
    buf: VecDeque<u8>,
    readers: usize,
    writers: usize,
}

/// One pipe: its buffer and how many open ends it has.
#[derive(Debug)]
pub struct Pipe {
    id: u64,
    state: Mutex<State>,
    /// The process's list of wait keys whose waiters must be woken.
    events: Arc<Mutex<Vec<u64>>>,
    /// How many times the readers' side and the writers' side were woken
    /// (epoll's edge-triggered mode reports a change since it last looked).
    gens: [AtomicU64; 2],
}

/// An open end of a pipe (one open file description; dup shares it).
#[derive(Debug)]
pub struct PipeEnd {
    pipe: Arc<Pipe>,
    writer: bool,
    nonblock: AtomicBool,
}

/// What a read or write may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Ready<T> {
    Now(T),
    /// Nothing now: the caller waits (or, non-blocking, gets EAGAIN).
    Wait,
}

impl Pipe {
    /// A new pipe's two ends (read, write).
    pub fn open(id: u64, events: Arc<Mutex<Vec<u64>>>, nonblock: bool) -> (PipeEnd, PipeEnd) {
        let pipe = Arc::new(Pipe {
            id,
            state: Mutex::new(State {
                buf: VecDeque::new(),
                readers: 1,
                writers: 1,
            }),
            events,
            gens: Default::default(),
        });
        let end = |writer| PipeEnd {
            pipe: pipe.clone(),
            writer,
            nonblock: AtomicBool::new(nonblock),
        };
        (end(false), end(true))
    }

    fn event(&self, writer: bool) {
        self.gens[usize::from(writer)].fetch_add(1, Ordering::Relaxed);
        mem::lock(&self.events).push(key(self.id, writer));
    }
}

impl PipeEnd {
    pub fn is_writer(&self) -> bool {
        self.writer
    }

    pub fn nonblock(&self) -> bool {
        self.nonblock.load(Ordering::Relaxed)
    }

    pub fn set_nonblock(&self, on: bool) {
        self.nonblock.store(on, Ordering::Relaxed);
    }

    /// The key this end's caller waits on.
    pub fn key(&self) -> u64 {
        key(self.pipe.id, self.writer)
    }

    /// How many times this end's waiters were woken (data or room came,
    /// the other side closed).
    pub fn gen(&self) -> u64 {
        self.pipe.gens[usize::from(self.writer)].load(Ordering::Relaxed)
    }

    /// Bytes waiting to be read (FIONREAD).
    pub fn available(&self) -> usize {
        mem::lock(&self.pipe.state).buf.len()
    }

    /// poll's events for this end: a read end is readable with data, and
    /// hung up (POLLHUP) with no write end open; a write end is writable
    /// with room, and in error (POLLERR) too with no read end open (as
    /// Linux gives them: both at once when there is room).
    pub fn poll(&self) -> i16 {
        let s = mem::lock(&self.pipe.state);
        if self.writer {
            let room = if CAPACITY - s.buf.len().min(CAPACITY) >= PIPE_BUF {
                libc::POLLOUT | libc::POLLWRNORM
            } else {
                0
            };
            room | if s.readers == 0 { libc::POLLERR } else { 0 }
        } else {
            let data = if s.buf.is_empty() {
                0
            } else {
                libc::POLLIN | libc::POLLRDNORM
            };
            data | if s.writers == 0 { libc::POLLHUP } else { 0 }
        }
    }

    /// Up to `max` bytes from the front without taking them (an empty
    /// vector: end of file, every write end closed), or `Wait`.
    pub fn peek(&self, max: usize) -> Ready<Vec<u8>> {
        let s = mem::lock(&self.pipe.state);
        if s.buf.is_empty() {
            return if s.writers == 0 {
                Ready::Now(Vec::new())
            } else {
                Ready::Wait
            };
        }
        let n = max.min(s.buf.len());
        Ready::Now(s.buf.iter().take(n).copied().collect())
    }

    /// Takes `n` bytes from the front (after a [`peek`](Self::peek) whose
    /// bytes reached the reader): writers may go on.
    pub fn consume(&self, n: usize) {
        let mut s = mem::lock(&self.pipe.state);
        let n = n.min(s.buf.len());
        s.buf.drain(..n);
        drop(s);
        if n > 0 {
            self.pipe.event(true);
        }
    }

    /// How many of `want` bytes may be written now: `Err(())` if no read
    /// end is open (EPIPE); `Wait` if none may (or, for a write of at most
    /// [`PIPE_BUF`] bytes, not all of them: such writes are atomic).
    #[allow(clippy::result_unit_err)]
    pub fn room(&self, want: usize) -> Result<Ready<usize>, ()> {
        let s = mem::lock(&self.pipe.state);
        if s.readers == 0 {
            return Err(());
        }
        let free = CAPACITY - s.buf.len().min(CAPACITY);
        if free == 0 || (want <= PIPE_BUF && free < want) {
            return Ok(Ready::Wait);
        }
        Ok(Ready::Now(want.min(free)))
    }

    /// Appends `data` (at most what [`room`](Self::room) allowed): readers
    /// may go on.
    pub fn push(&self, data: &[u8]) {
        let mut s = mem::lock(&self.pipe.state);
        let free = CAPACITY - s.buf.len().min(CAPACITY);
        let n = data.len().min(free);
        s.buf.extend(&data[..n]);
        drop(s);
        if n > 0 {
            self.pipe.event(false);
        }
    }
}

impl Drop for PipeEnd {
    /// The last descriptor of this end closed: the other side's waiters
    /// learn of it (readers get end of file, writers EPIPE).
    fn drop(&mut self) {
        let mut s = mem::lock(&self.pipe.state);
        if self.writer {
            s.writers = s.writers.saturating_sub(1);
        } else {
            s.readers = s.readers.saturating_sub(1);
        }
        drop(s);
        self.pipe.event(!self.writer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_keeps_linux_rules() {
        let ev = Arc::new(Mutex::new(Vec::new()));
        let (r, w) = Pipe::open(7, ev.clone(), false);
        assert_eq!(r.peek(10), Ready::Wait);
        assert_eq!(w.room(10), Ok(Ready::Now(10)));
        w.push(b"hello");
        assert_eq!(
            mem::lock(&ev).drain(..).collect::<Vec<_>>(),
            [key(7, false)]
        );
        assert_eq!(r.peek(3), Ready::Now(b"hel".to_vec()));
        r.consume(3);
        assert_eq!(mem::lock(&ev).drain(..).collect::<Vec<_>>(), [key(7, true)]);
        assert_eq!(r.available(), 2);
        // Bounded: a full pipe takes nothing more; a small write is
        // atomic (all or wait), a large one takes what fits.
        let big = vec![1u8; CAPACITY];
        assert_eq!(w.room(CAPACITY), Ok(Ready::Now(CAPACITY - 2)));
        w.push(&big);
        assert_eq!(r.available(), CAPACITY);
        assert_eq!(w.room(1), Ok(Ready::Wait));
        assert_eq!(w.room(PIPE_BUF + 1), Ok(Ready::Wait));
        r.consume(100);
        assert_eq!(w.room(200), Ok(Ready::Wait));
        assert_eq!(w.room(PIPE_BUF + 1), Ok(Ready::Now(100)));
        // The write end closes: the data is still read, then end of file.
        mem::lock(&ev).clear();
        drop(w);
        assert_eq!(mem::lock(&ev).as_slice(), [key(7, false)]);
        r.consume(CAPACITY);
        assert_eq!(r.peek(1), Ready::Now(Vec::new()));
        // The read end closes: EPIPE.
        let (r, w) = Pipe::open(8, ev.clone(), true);
        assert!(r.nonblock() && w.is_writer() && !r.is_writer());
        drop(r);
        assert_eq!(w.room(1), Err(()));
        assert_eq!(w.poll(), libc::POLLOUT | libc::POLLWRNORM | libc::POLLERR);
        assert_eq!(parse_key(w.key()), Some((8, true)));
        assert_eq!(parse_key(u64::MAX), None);
        assert_eq!(parse_key(0x7fff_0000), None);
    }
}
