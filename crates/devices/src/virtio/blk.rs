//! The virtio block device (virtio spec 1.2, 5.2) in simulated time.
//!
//! One request queue of [`QUEUE_SIZE`]. A request is a descriptor chain:
//! a 16-byte header the device reads (type, reserved, sector), the data
//! (read by the device for a write, written by it for a read), and a
//! status byte it writes last. Types: IN (read), OUT (write), FLUSH and
//! GET_ID; others complete with UNSUPP. Features offered: FLUSH, RO for a
//! read-only disk, SEG_MAX and BLK_SIZE (512).
//!
//! Timing: the disk serves its requests one after another at `bandwidth`
//! bytes per simulated second, and each finishes `latency` after its data
//! has moved: a request taken at tick `t` completes at
//! `max(t, free) + bytes / bandwidth + latency`, where `free` is when the
//! previous transfer ended. A read of N bytes on an idle disk therefore
//! completes at `latency + N / bandwidth`. The data moves at completion
//! (the host file is read or written at that simulated tick; host time
//! does not count), then the status byte is written, the chain is put in
//! the used ring and the driver is interrupted.
//!
//! Bad requests from the guest: a sector range past the end, data not a
//! whole number of sectors, a write to a read-only disk, data buffers
//! outside RAM: status IOERR, the image untouched. A chain with readable
//! descriptors after writable ones, no room for the header or the status
//! byte, or one that loops or runs past the table (the chain iterator
//! stops after the queue's size): the device needs a reset (see the
//! transport).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mem::{RestoreError, SavedState};
use serde::{Deserialize, Serialize};
use sim::tick::TICKS_PER_SECOND;
use sim::{Counter, Stats, Tick};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Outcome, VirtioDevice};
use crate::disk::{Disk, SECTOR_SIZE};
use crate::state::check;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request the driver may use (SEG_MAX).
pub const SEG_MAX: u32 = 126;
/// Bytes moved through the host at a time.
const BOUNCE: usize = 1 << 20;
const HEADER_LEN: u64 = 16;

/// The disk's timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlkTiming {
    /// Time from the end of a request's transfer to its completion.
    pub latency: Tick,
    /// Bytes per simulated second (at least 1).
    pub bandwidth: u64,
}

impl BlkTiming {
    /// Ticks to move `bytes`.
    pub fn transfer(&self, bytes: u64) -> Tick {
        let t =
            u128::from(bytes) * u128::from(TICKS_PER_SECOND) / u128::from(self.bandwidth.max(1));
        t.min(u128::from(Tick::MAX)) as Tick
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Read {
        offset: u64,
    },
    Write {
        offset: u64,
    },
    Flush,
    GetId,
    /// Completes with this status and moves nothing.
    Fail(u8),
}

/// A guest buffer: address and length.
type Seg = (GuestAddress, u32);
/// A parsed chain: what to do, the data buffers, their bytes, the status byte.
type Parsed = (Kind, Vec<Seg>, u64, GuestAddress);

/// A request taken from the queue, waiting for its completion tick.
#[derive(Debug, Clone)]
struct Request {
    head: u16,
    kind: Kind,
    /// Guest buffers holding the data, in order.
    data: Vec<(GuestAddress, u32)>,
    status: GuestAddress,
    start: Tick,
    done: Tick,
}

/// What a saved request does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SavedKind {
    /// Reads the disk at byte `offset` into the data buffers.
    Read {
        offset: u64,
    },
    /// Writes the data buffers to the disk at byte `offset`.
    Write {
        offset: u64,
    },
    Flush,
    GetId,
    /// Completes with `status` (IOERR or UNSUPP) and moves nothing.
    Fail {
        status: u8,
    },
}

/// A guest buffer of a saved request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedSeg {
    pub addr: u64,
    pub len: u32,
}

/// A request in flight, as it is saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRequest {
    /// The head descriptor of its chain (given back in the used ring).
    pub head: u16,
    pub kind: SavedKind,
    /// The data buffers, in order.
    pub data: Vec<SavedSeg>,
    /// The guest address of the status byte.
    pub status: u64,
    /// The tick it was taken from the queue.
    pub start: Tick,
    /// The tick it completes.
    pub done: Tick,
}

/// The block device's saved state: the requests in flight, in completion
/// order, and when the disk's last transfer ends (absolute ticks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    pub inflight: Vec<SavedRequest>,
    pub free: Tick,
}

/// Statistics of one disk.
struct BlkStats {
    reads: Counter,
    writes: Counter,
    flushes: Counter,
    others: Counter,
    errors: Counter,
    bytes_read: Counter,
    bytes_written: Counter,
    total_latency: Counter,
    completed: Counter,
}

/// The virtio block device.
pub struct Block {
    disk: Box<dyn Disk>,
    timing: BlkTiming,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// Requests in flight, in completion order.
    inflight: VecDeque<Request>,
    inflight_now: Arc<AtomicU64>,
    /// When the disk's last transfer ends.
    free: Tick,
    bounce: Vec<u8>,
    stats: BlkStats,
}

impl Block {
    /// A block device over `disk` with `timing`, named `serial` to the
    /// guest (GET_ID, at most 20 bytes), statistics under `prefix`.
    pub fn new(
        disk: Box<dyn Disk>,
        timing: BlkTiming,
        serial: &str,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (d, s) in id.iter_mut().zip(serial.bytes()) {
            *d = s;
        }
        let c =
            |stats: &mut Stats, n: &str, d: &str, u| stats.counter(&format!("{prefix}.{n}"), d, u);
        let s = BlkStats {
            reads: c(stats, "reads", "Read requests completed", "Count")?,
            writes: c(stats, "writes", "Write requests completed", "Count")?,
            flushes: c(stats, "flushes", "Flush requests completed", "Count")?,
            others: c(
                stats,
                "otherRequests",
                "Other requests completed (GET_ID, unsupported)",
                "Count",
            )?,
            errors: c(
                stats,
                "errors",
                "Requests completed with an error status (IOERR, UNSUPP)",
                "Count",
            )?,
            bytes_read: c(stats, "bytesRead", "Bytes read from the disk", "Byte")?,
            bytes_written: c(stats, "bytesWritten", "Bytes written to the disk", "Byte")?,
            total_latency: c(
                stats,
                "totalLatency",
                "Sum over completed requests of the time from submission to completion",
                "Tick",
            )?,
            completed: c(stats, "requests", "Requests completed", "Count")?,
        };
        let inflight_now = Arc::new(AtomicU64::new(0));
        let g = inflight_now.clone();
        stats.formula(
            &format!("{prefix}.inflight"),
            "Requests taken from the queue and not yet completed (at the dump)",
            "Count",
            move |_| g.load(Ordering::Relaxed) as f64,
        )?;
        let (lat, n) = (s.total_latency.clone(), s.completed.clone());
        stats.formula(
            &format!("{prefix}.avgLatency"),
            "Average time from submission to completion",
            "Tick",
            move |_| {
                if n.get() == 0 {
                    f64::NAN
                } else {
                    lat.get() as f64 / n.get() as f64
                }
            },
        )?;
        let br = s.bytes_read.clone();
        stats.formula(
            &format!("{prefix}.readBandwidth"),
            "Bytes read per simulated second",
            "Byte/Second",
            move |f| {
                if f.sim_ticks == 0 {
                    f64::NAN
                } else {
                    br.get() as f64 * TICKS_PER_SECOND as f64 / f.sim_ticks as f64
                }
            },
        )?;
        Ok(Block {
            disk,
            timing,
            id,
            inflight: VecDeque::new(),
            inflight_now,
            free: 0,
            bounce: Vec::new(),
            stats: s,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// The disk image (for a checkpoint to save or identify it).
    pub fn disk_mut(&mut self) -> &mut dyn Disk {
        &mut *self.disk
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Takes one chain apart into a request; `Err` for a chain the device
    /// cannot even answer (it then needs a reset).
    fn parse(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Parsed, ()> {
        let mut readable: Vec<(GuestAddress, u32)> = Vec::new();
        let mut writable: Vec<(GuestAddress, u32)> = Vec::new();
        let mut last_has_next = false;
        for d in chain {
            last_has_next = d.has_next();
            if d.len() == 0 {
                continue;
            }
            if d.is_write_only() {
                writable.push((d.addr(), d.len()));
            } else if writable.is_empty() {
                readable.push((d.addr(), d.len()));
            } else {
                return Err(()); // readable after writable
            }
        }
        if last_has_next {
            return Err(()); // looped, or ran past the table
        }
        // The status byte: the last writable byte.
        let (saddr, slen) = *writable.last().ok_or(())?;
        let status = saddr.checked_add(u64::from(slen) - 1).ok_or(())?;
        if let Some(l) = writable.last_mut() {
            l.1 -= 1;
            if l.1 == 0 {
                writable.pop();
            }
        }
        // The header: the first 16 readable bytes.
        let mut header = [0u8; HEADER_LEN as usize];
        let mut got = 0usize;
        let mut rest = Vec::new();
        for &(a, l) in &readable {
            let take = (HEADER_LEN as usize - got).min(l as usize);
            if take > 0 {
                mem.read_slice(&mut header[got..got + take], a)
                    .map_err(|_| ())?;
                got += take;
            }
            if (l as usize) > take {
                rest.push((a.checked_add(take as u64).ok_or(())?, l - take as u32));
            }
        }
        if got < HEADER_LEN as usize {
            return Err(());
        }
        let ty = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let span = |segs: &[(GuestAddress, u32)]| segs.iter().map(|s| u64::from(s.1)).sum::<u64>();
        let in_disk = |bytes: u64| {
            sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|o| o.checked_add(bytes).map(|e| (o, e)))
                .filter(|&(_, e)| e <= self.disk.size())
                .map(|(o, _)| o)
        };
        let in_ram = |segs: &[(GuestAddress, u32)]| {
            segs.iter()
                .all(|&(a, l)| GuestMemoryBackend::check_range(mem, a, l as usize))
        };
        Ok(match ty {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let segs = if ty == VIRTIO_BLK_T_IN {
                    writable
                } else {
                    rest
                };
                let bytes = span(&segs);
                let kind = match in_disk(bytes) {
                    _ if !bytes.is_multiple_of(SECTOR_SIZE) || segs.len() > SEG_MAX as usize => {
                        Kind::Fail(ioerr)
                    }
                    _ if !in_ram(&segs) => Kind::Fail(ioerr),
                    None => Kind::Fail(ioerr),
                    Some(_) if ty == VIRTIO_BLK_T_OUT && self.disk.read_only() => Kind::Fail(ioerr),
                    Some(offset) if ty == VIRTIO_BLK_T_IN => Kind::Read { offset },
                    Some(offset) => Kind::Write { offset },
                };
                (kind, segs, bytes, status)
            }
            VIRTIO_BLK_T_FLUSH => (Kind::Flush, vec![], 0, status),
            VIRTIO_BLK_T_GET_ID => (Kind::GetId, writable, 0, status),
            _ => (Kind::Fail(VIRTIO_BLK_S_UNSUPP as u8), vec![], 0, status),
        })
    }

    /// Takes available chains while there is room in flight.
    fn take(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, now: Tick) -> Outcome {
        let mut out = Outcome::default();
        while self.inflight.len() < usize::from(QUEUE_SIZE) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match self.parse(chain, mem) {
                Ok((kind, data, bytes, status)) => {
                    let moved = if matches!(kind, Kind::Read { .. } | Kind::Write { .. }) {
                        bytes
                    } else {
                        0
                    };
                    let start = now.max(self.free);
                    self.free = start.saturating_add(self.timing.transfer(moved));
                    let done = self.free.saturating_add(self.timing.latency);
                    self.inflight.push_back(Request {
                        head,
                        kind,
                        data,
                        status,
                        start: now,
                        done,
                    });
                }
                Err(()) => {
                    // Give the chain back (nothing written) and stop.
                    if q.add_used(mem, head, 0).is_ok() {
                        out.used = true;
                    }
                    out.broken = true;
                    break;
                }
            }
        }
        self.inflight_now
            .store(self.inflight.len() as u64, Ordering::Relaxed);
        out
    }

    /// Moves a request's data; returns the status byte and the bytes the
    /// device wrote into guest buffers.
    fn perform(&mut self, r: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let ok = VIRTIO_BLK_S_OK as u8;
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        match r.kind {
            Kind::Fail(s) => {
                self.stats.errors.inc();
                self.stats.others.inc();
                (s, 0)
            }
            Kind::Flush => {
                self.stats.flushes.inc();
                match self.disk.flush() {
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        tracing::warn!("disk flush failed: {e}");
                        self.stats.errors.inc();
                        (ioerr, 0)
                    }
                }
            }
            Kind::GetId => {
                self.stats.others.inc();
                let mut written = 0u32;
                let mut src: &[u8] = &self.id;
                for &(a, l) in &r.data {
                    let n = (l as usize).min(src.len());
                    if n == 0 {
                        break;
                    }
                    if mem.write_slice(&src[..n], a).is_err() {
                        self.stats.errors.inc();
                        return (ioerr, written);
                    }
                    written += n as u32;
                    src = &src[n..];
                }
                (ok, written)
            }
            Kind::Read { offset } | Kind::Write { offset } => {
                let read = matches!(r.kind, Kind::Read { .. });
                if read {
                    self.stats.reads.inc();
                } else {
                    self.stats.writes.inc();
                }
                let mut pos = offset;
                let mut written = 0u32;
                for &(a, l) in &r.data {
                    let mut done = 0u64;
                    while done < u64::from(l) {
                        let n = (u64::from(l) - done).min(BOUNCE as u64) as usize;
                        if self.bounce.len() < n {
                            self.bounce.resize(n, 0);
                        }
                        let buf = &mut self.bounce[..n];
                        let addr = GuestAddress(a.0.wrapping_add(done));
                        let res = if read {
                            self.disk
                                .read_at(pos, buf)
                                .map_err(|e| e.to_string())
                                .and_then(|()| {
                                    mem.write_slice(buf, addr).map_err(|e| e.to_string())
                                })
                        } else {
                            mem.read_slice(buf, addr)
                                .map_err(|e| e.to_string())
                                .and_then(|()| {
                                    self.disk.write_at(pos, buf).map_err(|e| e.to_string())
                                })
                        };
                        if let Err(e) = res {
                            tracing::debug!("disk request failed: {e}");
                            self.stats.errors.inc();
                            return (ioerr, written);
                        }
                        if read {
                            self.stats.bytes_read.add(n as u64);
                            // The used ring's length is 32-bit.
                            written = written.saturating_add(n as u32);
                        } else {
                            self.stats.bytes_written.add(n as u64);
                        }
                        done += n as u64;
                        pos += n as u64;
                    }
                }
                (ok, written)
            }
        }
    }
}

impl Block {
    /// The saved request `r` (number `i`) as a request this disk could
    /// have in flight; the error names the field.
    fn request_from(&self, i: usize, r: &SavedRequest) -> Result<Request, RestoreError> {
        let f = |field: &str| format!("inflight[{i}].{field}");
        check(
            r.head < QUEUE_SIZE,
            &f("head"),
            format_args!("{} is past the queue ({QUEUE_SIZE})", r.head),
        )?;
        check(
            r.start <= r.done,
            &f("done"),
            format_args!("{} is before its start {}", r.done, r.start),
        )?;
        check(
            r.data.len() <= usize::from(QUEUE_SIZE),
            &f("data"),
            format_args!("{} buffers, a chain has at most {QUEUE_SIZE}", r.data.len()),
        )?;
        for (k, seg) in r.data.iter().enumerate() {
            check(
                seg.addr.checked_add(u64::from(seg.len)).is_some(),
                &f(&format!("data[{k}]")),
                "the buffer wraps around the address space",
            )?;
        }
        let bytes: u64 = r.data.iter().map(|s| u64::from(s.len)).sum();
        let kind = match r.kind {
            SavedKind::Read { offset } | SavedKind::Write { offset } => {
                let write = matches!(r.kind, SavedKind::Write { .. });
                check(
                    offset.is_multiple_of(SECTOR_SIZE) && bytes.is_multiple_of(SECTOR_SIZE),
                    &f("kind"),
                    format_args!("offset {offset} or length {bytes} is not whole sectors"),
                )?;
                check(
                    offset
                        .checked_add(bytes)
                        .is_some_and(|e| e <= self.disk.size()),
                    &f("kind"),
                    format_args!(
                        "{bytes} bytes at {offset} run past the disk ({} bytes)",
                        self.disk.size()
                    ),
                )?;
                check(
                    r.data.len() <= SEG_MAX as usize,
                    &f("data"),
                    format_args!("{} buffers, at most {SEG_MAX}", r.data.len()),
                )?;
                check(
                    !write || !self.disk.read_only(),
                    &f("kind"),
                    "a write to a read-only disk",
                )?;
                if write {
                    Kind::Write { offset }
                } else {
                    Kind::Read { offset }
                }
            }
            SavedKind::Flush => {
                check(r.data.is_empty(), &f("data"), "a flush has no data buffers")?;
                Kind::Flush
            }
            SavedKind::GetId => Kind::GetId,
            SavedKind::Fail { status } => {
                check(
                    u32::from(status) == VIRTIO_BLK_S_IOERR
                        || u32::from(status) == VIRTIO_BLK_S_UNSUPP,
                    &f("kind"),
                    format_args!("status {status} is neither IOERR nor UNSUPP"),
                )?;
                // Its data buffers (a read past the end keeps them) are
                // never touched.
                Kind::Fail(status)
            }
        };
        Ok(Request {
            head: r.head,
            kind,
            data: r
                .data
                .iter()
                .map(|s| (GuestAddress(s.addr), s.len))
                .collect(),
            status: GuestAddress(r.status),
            start: r.start,
            done: r.done,
        })
    }
}

impl VirtioDevice for Block {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.read_only() {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn num_queues(&self) -> usize {
        1
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64), size_max (u32),
        // seg_max (u32), geometry (4 bytes), blk_size (u32), ...
        let mut cfg = [0u8; 0x40];
        cfg[0..8].copy_from_slice(&self.sectors().to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        cfg[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn reset(&mut self) {
        self.inflight.clear();
        self.free = 0;
        self.inflight_now.store(0, Ordering::Relaxed);
    }

    fn notify(
        &mut self,
        queues: &mut [Queue],
        queue: usize,
        mem: &GuestMemoryMmap,
        now: Tick,
    ) -> Outcome {
        match queues.get_mut(queue) {
            Some(q) => self.take(q, mem, now),
            None => Outcome::default(),
        }
    }

    fn next_deadline(&self) -> Option<Tick> {
        self.inflight.front().map(|r| r.done)
    }

    fn on_deadline(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap, now: Tick) -> Outcome {
        let mut out = Outcome::default();
        let Some(q) = queues.first_mut() else {
            return out;
        };
        while self.inflight.front().is_some_and(|r| r.done <= now) {
            let Some(r) = self.inflight.pop_front() else {
                break;
            };
            let (status, written) = self.perform(&r, mem);
            self.stats.completed.inc();
            self.stats.total_latency.add(now.saturating_sub(r.start));
            if mem.write_obj(status, r.status).is_err()
                || q.add_used(mem, r.head, written.saturating_add(1)).is_err()
            {
                out.broken = true;
                break;
            }
            out.used = true;
        }
        self.inflight_now
            .store(self.inflight.len() as u64, Ordering::Relaxed);
        if !out.broken && q.ready() && q.is_valid(mem) {
            let more = self.take(q, mem, now);
            out.used |= more.used;
            out.broken |= more.broken;
        }
        out
    }

    fn save(&self) -> SavedState {
        let inflight = self
            .inflight
            .iter()
            .map(|r| SavedRequest {
                head: r.head,
                kind: match r.kind {
                    Kind::Read { offset } => SavedKind::Read { offset },
                    Kind::Write { offset } => SavedKind::Write { offset },
                    Kind::Flush => SavedKind::Flush,
                    Kind::GetId => SavedKind::GetId,
                    Kind::Fail(status) => SavedKind::Fail { status },
                },
                data: r
                    .data
                    .iter()
                    .map(|&(a, len)| SavedSeg { addr: a.0, len })
                    .collect(),
                status: r.status.0,
                start: r.start,
                done: r.done,
            })
            .collect();
        crate::state::save(&BlockState {
            inflight,
            free: self.free,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: BlockState = crate::state::parse(state)?;
        check(
            s.inflight.len() <= usize::from(QUEUE_SIZE),
            "inflight",
            format_args!("{} requests, at most {QUEUE_SIZE}", s.inflight.len()),
        )?;
        let mut inflight = VecDeque::with_capacity(s.inflight.len());
        let mut last = 0;
        for (i, r) in s.inflight.iter().enumerate() {
            check(
                r.done >= last,
                &format!("inflight[{i}].done"),
                format_args!("{} is before the previous request's {last}", r.done),
            )?;
            last = r.done;
            inflight.push_back(self.request_from(i, r)?);
        }
        self.inflight = inflight;
        self.free = s.free;
        self.inflight_now
            .store(self.inflight.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
