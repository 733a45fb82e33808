//! epoll (epoll_create1, epoll_ctl, epoll_wait and its forms): an
//! interest list of (descriptor, open file) items, each with the events
//! it asks for and the program's data word.
//!
//! Readiness is asked of the files when the program waits (pipes and
//! eventfds as poll gives them, kvmsim's standard streams always ready);
//! nothing is queued in between. A wait that finds nothing parks the
//! thread on the poll key ([`crate::pipe::POLL_KEY`]): any change of a
//! pipe or an eventfd wakes it and the wait is made again.
//!
//! - Level-triggered by default: a ready item is reported at every wait;
//!   the reported ones go to the back of the list so that a small
//!   `maxevents` reaches the others in turn, as Linux's ready list does.
//! - EPOLLET: an item is reported once per wake of its file that concerns
//!   the events it asks for (data or an end closed for a reader, room for
//!   a writer): each pipe and eventfd counts its wakes, and the item keeps
//!   the counts it last looked at.
//! - EPOLLONESHOT: once reported, an item is disabled until EPOLL_CTL_MOD.
//! - An epoll descriptor inside an epoll set is refused with EINVAL
//!   (Linux allows nesting; SE mode does not). Host files give EPERM, as
//!   Linux gives for regular files and directories.
//!
//! An item goes away with its open file (the last descriptor of it
//! closed), as in Linux. Host memory is bounded: at most [`MAX_WATCHES`]
//! items in all the process's epoll sets (more: ENOSPC, as Linux's
//! max_user_watches).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::sys::{Object, OpenFile};

/// Items in all the epoll sets of the process.
pub const MAX_WATCHES: usize = crate::sys::MAX_FDS;

pub const EPOLLIN: u32 = 0x001;
pub const EPOLLPRI: u32 = 0x002;
pub const EPOLLOUT: u32 = 0x004;
pub const EPOLLERR: u32 = 0x008;
pub const EPOLLHUP: u32 = 0x010;
pub const EPOLLRDNORM: u32 = 0x040;
pub const EPOLLRDBAND: u32 = 0x080;
pub const EPOLLWRNORM: u32 = 0x100;
pub const EPOLLWRBAND: u32 = 0x200;
pub const EPOLLMSG: u32 = 0x400;
pub const EPOLLRDHUP: u32 = 0x2000;
pub const EPOLLEXCLUSIVE: u32 = 1 << 28;
pub const EPOLLWAKEUP: u32 = 1 << 29;
pub const EPOLLONESHOT: u32 = 1 << 30;
pub const EPOLLET: u32 = 1 << 31;

/// The events an item reports (poll's bits).
const POLL_BITS: u32 = 0xffff;
const IN_BITS: u32 = EPOLLIN | EPOLLRDNORM | EPOLLRDBAND | EPOLLRDHUP;
const OUT_BITS: u32 = EPOLLOUT | EPOLLWRNORM | EPOLLWRBAND;
/// What EPOLLEXCLUSIVE may come with (Linux's EPOLLEXCLUSIVE_OK_BITS).
const EXCLUSIVE_OK: u32 = EPOLLIN
    | EPOLLOUT
    | EPOLLRDNORM
    | EPOLLRDBAND
    | EPOLLWRNORM
    | EPOLLWRBAND
    | EPOLLERR
    | EPOLLHUP
    | EPOLLWAKEUP
    | EPOLLET
    | EPOLLEXCLUSIVE;

pub const EPOLL_CTL_ADD: u64 = 1;
pub const EPOLL_CTL_DEL: u64 = 2;
pub const EPOLL_CTL_MOD: u64 = 3;

/// One watched (descriptor, open file).
#[derive(Debug)]
struct Item {
    fd: i32,
    file: Weak<OpenFile>,
    events: u32,
    data: u64,
    /// EPOLLONESHOT fired: nothing more until EPOLL_CTL_MOD.
    disabled: bool,
    /// EPOLLET: the file's wake counts when the item last looked.
    seen: Option<[u64; 2]>,
}

/// An event to report: the item's place in the list, its events and
/// data, and the wake counts it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    index: usize,
    pub events: u32,
    pub data: u64,
}

/// An epoll instance (one open file description; dup shares it).
#[derive(Debug)]
pub struct Epoll {
    items: Mutex<Vec<Item>>,
    /// Items in all the process's epoll sets.
    watches: Arc<AtomicUsize>,
}

/// The wake counts of a file (readers', writers'), for EPOLLET; `None`
/// for files that are always ready (never woken).
fn gens(obj: &Object) -> Option<[u64; 2]> {
    match obj {
        Object::Pipe(end) if end.is_writer() => Some([0, end.gen()]),
        Object::Pipe(end) => Some([end.gen(), 0]),
        Object::EventFd(e) => Some(e.gens()),
        _ => None,
    }
}

impl Epoll {
    pub fn new(watches: Arc<AtomicUsize>) -> Epoll {
        Epoll {
            items: Mutex::new(Vec::new()),
            watches,
        }
    }

    /// Items watched now.
    pub fn len(&self) -> usize {
        mem::lock(&self.items).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the items whose open file is gone.
    fn prune(&self, items: &mut Vec<Item>) {
        let before = items.len();
        items.retain(|i| i.file.strong_count() > 0);
        self.watches
            .fetch_sub(before - items.len(), Ordering::Relaxed);
    }

    /// epoll_ctl on `fd` (open as `file`, which the caller checked may be
    /// watched): `ev` is the event's (events, data) for ADD and MOD.
    pub fn ctl(
        &self,
        op: u64,
        fd: i32,
        file: &Arc<OpenFile>,
        ev: Option<(u32, u64)>,
    ) -> Result<(), i64> {
        use crate::sys::{EEXIST, ENOENT, ENOSPC};
        let mut items = mem::lock(&self.items);
        self.prune(&mut items);
        let at = items
            .iter()
            .position(|i| i.fd == fd && std::ptr::eq(i.file.as_ptr(), Arc::as_ptr(file)));
        let (events, data) = ev.unwrap_or_default();
        if events & EPOLLEXCLUSIVE != 0
            && (op == EPOLL_CTL_MOD || (op == EPOLL_CTL_ADD && events & !EXCLUSIVE_OK != 0))
        {
            return Err(crate::mm::EINVAL);
        }
        match (op, at) {
            (EPOLL_CTL_ADD, Some(_)) => Err(EEXIST),
            (EPOLL_CTL_ADD, None) => {
                if self.watches.load(Ordering::Relaxed) >= MAX_WATCHES {
                    return Err(ENOSPC);
                }
                self.watches.fetch_add(1, Ordering::Relaxed);
                items.push(Item {
                    fd,
                    file: Arc::downgrade(file),
                    events,
                    data,
                    disabled: false,
                    seen: None,
                });
                Ok(())
            }
            (EPOLL_CTL_MOD, Some(i)) => {
                let it = &mut items[i];
                if it.events & EPOLLEXCLUSIVE != 0 {
                    return Err(crate::mm::EINVAL);
                }
                it.events = events;
                it.data = data;
                it.disabled = false;
                it.seen = None;
                Ok(())
            }
            (EPOLL_CTL_DEL, Some(i)) => {
                items.remove(i);
                self.watches.fetch_sub(1, Ordering::Relaxed);
                Ok(())
            }
            (EPOLL_CTL_MOD | EPOLL_CTL_DEL, None) => Err(ENOENT),
            _ => Err(crate::mm::EINVAL),
        }
    }

    /// The events a wait would report now, at most `max`, in list order;
    /// nothing changes until [`commit`](Self::commit).
    pub fn ready(&self, max: usize) -> Vec<Event> {
        let mut items = mem::lock(&self.items);
        self.prune(&mut items);
        let mut out = Vec::new();
        for (index, it) in items.iter().enumerate() {
            if out.len() >= max {
                break;
            }
            if it.disabled {
                continue;
            }
            let Some(f) = it.file.upgrade() else {
                continue;
            };
            let mask = (it.events | EPOLLERR | EPOLLHUP) & POLL_BITS;
            if it.events & EPOLLET != 0 && it.seen.is_some() && it.seen == Self::seen(&f, mask) {
                continue;
            }
            let r = u32::from(crate::sys::poll_state(&f.obj) as u16) & mask;
            if r != 0 {
                out.push(Event {
                    index,
                    events: r,
                    data: it.data,
                });
            }
        }
        out
    }

    /// The wake counts an EPOLLET item asking for `mask` looks at.
    fn seen(f: &OpenFile, mask: u32) -> Option<[u64; 2]> {
        gens(&f.obj).map(|[r, w]| {
            [
                if mask & IN_BITS != 0 { r } else { 0 },
                if mask & OUT_BITS != 0 { w } else { 0 },
            ]
        })
    }

    /// The wait reported `events` (from [`ready`](Self::ready), nothing
    /// changed since): EPOLLONESHOT items are disabled, EPOLLET items
    /// note what they saw (and so do the edge-triggered items that were
    /// looked at and found not ready, as Linux drops them from its ready
    /// list), and the reported items go to the back of the list.
    pub fn commit(&self, events: &[Event]) {
        let mut items = mem::lock(&self.items);
        let upto = events.last().map_or(items.len(), |e| e.index + 1);
        for it in items.iter_mut().take(upto) {
            if it.events & EPOLLET != 0 && !it.disabled {
                if let Some(f) = it.file.upgrade() {
                    let mask = (it.events | EPOLLERR | EPOLLHUP) & POLL_BITS;
                    it.seen = Self::seen(&f, mask);
                }
            }
        }
        let mut moved = Vec::with_capacity(events.len());
        for e in events.iter().rev() {
            if e.index < items.len() {
                let mut it = items.remove(e.index);
                if it.events & EPOLLONESHOT != 0 {
                    it.disabled = true;
                }
                moved.push(it);
            }
        }
        items.extend(moved.into_iter().rev());
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        let n = mem::lock(&self.items).len();
        self.watches.fetch_sub(n, Ordering::Relaxed);
    }
}
