//! The virtio network device (virtio spec 1.2, 5.1) in simulated time.
//!
//! Two queues: 0 receives (the driver posts device-writable buffers), 1
//! transmits (the driver posts device-readable frames). Every buffer
//! starts with the 12-byte `virtio_net_hdr_v1` (VERSION_1 fixes its size);
//! no offloads are offered (no checksum, no segmentation, no mergeable
//! buffers), so the guest's stack sends finished Ethernet frames and the
//! header it writes must be all "none": flags 0, gso_type NONE. Features
//! offered: MAC (the address in the configuration space) and STATUS (the
//! link is always up).
//!
//! Timing: the NIC's transmit side is one end of a point-to-point wire
//! ([`Wire`]): frames leave one after another, each taking
//! `(len + WIRE_OVERHEAD) / bandwidth` (preamble, frame check sequence and
//! inter-frame gap count as on real Ethernet), and reach the other end
//! `latency` after their last byte left. A frame taken at tick `t` starts
//! at `max(t, free)` (`free`: when the previous one finished), and its
//! buffer goes back to the driver when it has left the wire, so a guest
//! cannot send faster than the wire carries. Sent frames wait in the
//! device's outbox ([`Net::take_sent`]) with their arrival tick until the
//! simulation carries them to the peer, which calls [`Net::deliver`] at
//! that tick. Received frames are written into the next receive buffer at
//! once; without a buffer they wait in a backlog of [`RX_BACKLOG`] frames
//! (a NIC's receive FIFO), and one arriving when it is full is dropped.
//!
//! A hostile driver: a transmitted frame shorter than an Ethernet header
//! ([`MIN_FRAME`]) or longer than [`MAX_FRAME`], a header asking for
//! offloads that were not offered, or a chain with device-writable parts
//! or parts outside RAM is dropped and counted, and its buffer given back
//! (a real NIC drops what it cannot send). A receive buffer that is
//! readable, outside RAM or too small for the frame is given back empty
//! and the frame is dropped (counted). A chain that loops or runs past the
//! table puts the device in the error state, as for the block device.
//! Host memory is bounded: at most [`QUEUE_SIZE`] frames in transmission,
//! [`RX_BACKLOG`] waiting for buffers and [`OUTBOX_CAPACITY`] waiting to
//! be carried, each at most [`MAX_FRAME`] bytes.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sim::tick::TICKS_PER_SECOND;
use sim::{Counter, Stats, Tick, Value};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use mem::{RestoreError, SavedState};

use super::{Outcome, VirtioDevice};

/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size,
/// csum_start, csum_offset, num_buffers.
pub const HDR_LEN: usize = 12;
/// The shortest frame sent: an Ethernet header (destination, source,
/// type).
pub const MIN_FRAME: usize = 14;
/// The longest frame sent: a 1500-byte payload, an Ethernet header and a
/// VLAN tag (no frame check sequence: the device adds it on the wire).
pub const MAX_FRAME: usize = 1518;
/// Bytes a frame occupies on the wire besides its own: preamble and start
/// delimiter (8), frame check sequence (4), inter-frame gap (12).
pub const WIRE_OVERHEAD: u64 = 24;
/// Received frames waiting for a receive buffer, at most.
pub const RX_BACKLOG: usize = 256;
/// Sent frames waiting to be carried to the peer, at most (the simulation
/// takes them at every window's end).
pub const OUTBOX_CAPACITY: usize = 65_536;

/// One direction of a point-to-point wire, as its sender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// From a frame's last byte leaving to its arrival.
    pub latency: Tick,
    /// Bytes per simulated second (at least 1).
    pub bandwidth: u64,
}

impl Wire {
    /// Ticks a frame of `len` bytes occupies the wire.
    pub fn serialize(&self, len: usize) -> Tick {
        let bytes = len as u128 + u128::from(WIRE_OVERHEAD);
        let t = bytes * u128::from(TICKS_PER_SECOND) / u128::from(self.bandwidth.max(1));
        t.min(u128::from(Tick::MAX)) as Tick
    }
}

/// A frame on its way to the other end of the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFrame {
    /// When it arrives.
    pub at: Tick,
    /// When its first byte went onto the wire.
    pub sent: Tick,
    pub data: Arc<[u8]>,
}

/// A transmit buffer on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct TxSlot {
    head: u16,
    /// When the buffer goes back to the driver.
    done: Tick,
}

struct NetStats {
    tx_frames: Counter,
    tx_bytes: Counter,
    rx_frames: Counter,
    rx_bytes: Counter,
    tx_dropped: Counter,
    rx_dropped: Counter,
    short_frames: Counter,
    long_frames: Counter,
    bad_headers: Counter,
    bad_chains: Counter,
    small_buffers: Counter,
    no_link: Counter,
    backlog_now: Value,
    backlog_peak: Value,
    tx_queue_now: Value,
}

/// The network device.
pub struct Net {
    mac: [u8; 6],
    wire: Option<Wire>,
    /// When the wire is free for the next frame.
    free: Tick,
    tx: VecDeque<TxSlot>,
    backlog: VecDeque<Arc<[u8]>>,
    outbox: Vec<SentFrame>,
    stats: NetStats,
}

/// The device's saved state (for a checkpoint): what is in flight.
/// Frames are hex strings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSaved {
    pub mac: String,
    pub wire_free: Tick,
    pub tx: Vec<(u16, Tick)>,
    pub backlog: Vec<String>,
    /// Sent frames not yet carried: (arrival, sent, frame).
    pub outbox: Vec<(Tick, Tick, String)>,
}

/// Formats a MAC address as `02:00:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `02:00:00:00:00:01`; `None` unless six hex bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// What became of one chain taken from the transmit queue.
enum TxParse {
    Frame(Vec<u8>),
    Drop,
}

impl Net {
    /// A NIC with address `mac` sending on `wire` (`None`: not connected;
    /// what it sends is dropped and counted), statistics under `prefix`.
    pub fn new(
        mac: [u8; 6],
        wire: Option<Wire>,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        let c =
            |stats: &mut Stats, n: &str, d: &str, u| stats.counter(&format!("{prefix}.{n}"), d, u);
        let s = NetStats {
            tx_frames: c(stats, "txFrames", "Frames sent onto the wire", "Count")?,
            tx_bytes: c(
                stats,
                "txBytes",
                "Bytes of frames sent onto the wire",
                "Byte",
            )?,
            rx_frames: c(stats, "rxFrames", "Frames handed to the driver", "Count")?,
            rx_bytes: c(
                stats,
                "rxBytes",
                "Bytes of frames handed to the driver",
                "Byte",
            )?,
            tx_dropped: c(
                stats,
                "txDropped",
                "Frames from the driver dropped (malformed, no link, outbox full)",
                "Count",
            )?,
            rx_dropped: c(
                stats,
                "rxDropped",
                "Received frames dropped (backlog full, buffer unusable)",
                "Count",
            )?,
            short_frames: c(
                stats,
                "txShortFrames",
                "Frames from the driver shorter than an Ethernet header",
                "Count",
            )?,
            long_frames: c(
                stats,
                "txLongFrames",
                "Frames from the driver longer than the largest frame",
                "Count",
            )?,
            bad_headers: c(
                stats,
                "badHeaders",
                "Transmit headers asking for offloads not offered, or too short",
                "Count",
            )?,
            bad_chains: c(
                stats,
                "badChains",
                "Buffers with parts of the wrong direction or outside RAM",
                "Count",
            )?,
            small_buffers: c(
                stats,
                "rxSmallBuffers",
                "Receive buffers too small for the frame",
                "Count",
            )?,
            no_link: c(
                stats,
                "txNoLink",
                "Frames sent while the NIC is connected to nothing",
                "Count",
            )?,
            backlog_now: stats.value(
                &format!("{prefix}.rxBacklog"),
                "Received frames waiting for a receive buffer (at the dump)",
                "Count",
            )?,
            backlog_peak: stats.value(
                &format!("{prefix}.rxBacklogPeak"),
                "Most received frames waiting for a receive buffer at once",
                "Count",
            )?,
            tx_queue_now: stats.value(
                &format!("{prefix}.txQueue"),
                "Transmit buffers on the wire or waiting for it (at the dump)",
                "Count",
            )?,
        };
        Ok(Net {
            mac,
            wire,
            free: 0,
            tx: VecDeque::new(),
            backlog: VecDeque::new(),
            outbox: Vec::new(),
            stats: s,
        })
    }

    /// The NIC's address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Takes the frames sent since the last call, in the order sent.
    pub fn take_sent(&mut self) -> Vec<SentFrame> {
        std::mem::take(&mut self.outbox)
    }

    /// Frames waiting for a receive buffer.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// Transmit buffers not yet given back.
    pub fn tx_in_flight(&self) -> usize {
        self.tx.len()
    }

    fn gauges(&self) {
        let b = self.backlog.len() as f64;
        self.stats.backlog_now.set(b);
        if b > self.stats.backlog_peak.get() {
            self.stats.backlog_peak.set(b);
        }
        self.stats.tx_queue_now.set(self.tx.len() as f64);
    }

    /// Reads one transmit chain; `Err` for a chain that loops or runs past
    /// the table (the device then needs a reset).
    fn parse_tx(
        &self,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<TxParse, ()> {
        let mut parts: Vec<(GuestAddress, u32)> = Vec::new();
        let mut writable = false;
        let mut last_has_next = false;
        let mut total = 0u64;
        for d in chain {
            last_has_next = d.has_next();
            writable |= d.is_write_only();
            total += u64::from(d.len());
            if d.len() > 0 {
                parts.push((d.addr(), d.len()));
            }
        }
        if last_has_next {
            return Err(());
        }
        if writable || !parts.iter().all(|&(a, l)| mem.check_range(a, l as usize)) {
            self.stats.bad_chains.inc();
            return Ok(TxParse::Drop);
        }
        if total < HDR_LEN as u64 {
            self.stats.bad_headers.inc();
            return Ok(TxParse::Drop);
        }
        let len = total - HDR_LEN as u64;
        if len < MIN_FRAME as u64 {
            self.stats.short_frames.inc();
            return Ok(TxParse::Drop);
        }
        if len > MAX_FRAME as u64 {
            self.stats.long_frames.inc();
            return Ok(TxParse::Drop);
        }
        // Bounded: at most HDR_LEN + MAX_FRAME bytes.
        let mut buf = vec![0u8; total as usize];
        let mut at = 0usize;
        for &(a, l) in &parts {
            let l = l as usize;
            if mem.read_slice(&mut buf[at..at + l], a).is_err() {
                self.stats.bad_chains.inc();
                return Ok(TxParse::Drop);
            }
            at += l;
        }
        let flags = buf[0];
        let gso = buf[1];
        if flags != 0 || u32::from(gso) != VIRTIO_NET_HDR_GSO_NONE {
            self.stats.bad_headers.inc();
            return Ok(TxParse::Drop);
        }
        buf.drain(..HDR_LEN);
        Ok(TxParse::Frame(buf))
    }

    /// Takes transmit chains while fewer than a queue's worth are on the
    /// wire.
    fn take_tx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, now: Tick) -> Outcome {
        let mut out = Outcome::default();
        while self.tx.len() < usize::from(QUEUE_SIZE) {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = match self.parse_tx(chain, mem) {
                Ok(p) => p,
                Err(()) => {
                    if q.add_used(mem, head, 0).is_ok() {
                        out.used = true;
                    }
                    out.broken = true;
                    break;
                }
            };
            // Buffers go back in order: a dropped frame's after the ones
            // before it.
            let mut done = self.tx.back().map_or(now, |s| s.done.max(now));
            match (parsed, self.wire) {
                (TxParse::Frame(data), Some(wire)) if self.outbox.len() < OUTBOX_CAPACITY => {
                    let start = now.max(self.free);
                    self.free = start.saturating_add(wire.serialize(data.len()));
                    done = self.free;
                    self.stats.tx_frames.inc();
                    self.stats.tx_bytes.add(data.len() as u64);
                    self.outbox.push(SentFrame {
                        at: self.free.saturating_add(wire.latency),
                        sent: start,
                        data: data.into(),
                    });
                }
                (TxParse::Frame(_), Some(_)) => self.stats.tx_dropped.inc(),
                (TxParse::Frame(_), None) => {
                    self.stats.no_link.inc();
                    self.stats.tx_dropped.inc();
                }
                (TxParse::Drop, _) => self.stats.tx_dropped.inc(),
            }
            self.tx.push_back(TxSlot { head, done });
        }
        self.gauges();
        out
    }

    /// Writes waiting frames into receive buffers while both last.
    fn fill_rx(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Outcome {
        let mut out = Outcome::default();
        while let Some(frame) = self.backlog.front().cloned() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut parts: Vec<(GuestAddress, u32)> = Vec::new();
            let mut readable = false;
            let mut last_has_next = false;
            for d in chain {
                last_has_next = d.has_next();
                readable |= !d.is_write_only();
                if d.len() > 0 {
                    parts.push((d.addr(), d.len()));
                }
            }
            if last_has_next {
                if q.add_used(mem, head, 0).is_ok() {
                    out.used = true;
                }
                out.broken = true;
                break;
            }
            self.backlog.pop_front();
            let room: u64 = parts.iter().map(|p| u64::from(p.1)).sum();
            let need = (HDR_LEN + frame.len()) as u64;
            let written = if readable || !parts.iter().all(|&(a, l)| mem.check_range(a, l as usize))
            {
                self.stats.bad_chains.inc();
                None
            } else if room < need {
                self.stats.small_buffers.inc();
                None
            } else {
                // The header: no flags, no segmentation, one buffer.
                let mut hdr = [0u8; HDR_LEN];
                hdr[10] = 1;
                let mut src = hdr.iter().chain(frame.iter()).copied();
                let mut ok = true;
                for &(a, l) in &parts {
                    let chunk: Vec<u8> = src.by_ref().take(l as usize).collect();
                    if chunk.is_empty() {
                        break;
                    }
                    if mem.write_slice(&chunk, a).is_err() {
                        ok = false;
                        break;
                    }
                }
                ok.then_some(need as u32)
            };
            match written {
                Some(n) => {
                    self.stats.rx_frames.inc();
                    self.stats.rx_bytes.add(frame.len() as u64);
                    if q.add_used(mem, head, n).is_err() {
                        out.broken = true;
                        break;
                    }
                }
                None => {
                    self.stats.rx_dropped.inc();
                    if q.add_used(mem, head, 0).is_err() {
                        out.broken = true;
                        break;
                    }
                }
            }
            out.used = true;
        }
        self.gauges();
        out
    }

    /// A frame arrives from the wire at `now`: into a receive buffer, the
    /// backlog, or dropped when the backlog is full (or the frame is not
    /// a frame).
    /// A frame arriving while the driver is not running (`live` false) is
    /// dropped, as by a NIC that is down.
    pub fn deliver(
        &mut self,
        frame: Arc<[u8]>,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
        live: bool,
    ) -> Outcome {
        if !live
            || frame.len() < MIN_FRAME
            || frame.len() > MAX_FRAME
            || self.backlog.len() >= RX_BACKLOG
        {
            self.stats.rx_dropped.inc();
            self.gauges();
            return Outcome::default();
        }
        self.backlog.push_back(frame);
        match queues.get_mut(RX_QUEUE) {
            Some(q) if q.ready() && q.is_valid(mem) => self.fill_rx(q, mem),
            _ => {
                self.gauges();
                Outcome::default()
            }
        }
    }

    /// The device's state in flight, for a checkpoint.
    pub fn save_state(&self) -> NetSaved {
        NetSaved {
            mac: format_mac(&self.mac),
            wire_free: self.free,
            tx: self.tx.iter().map(|s| (s.head, s.done)).collect(),
            backlog: self.backlog.iter().map(|f| hex(f)).collect(),
            outbox: self
                .outbox
                .iter()
                .map(|f| (f.at, f.sent, hex(&f.data)))
                .collect(),
        }
    }

    /// Puts back a saved state, checked whole before anything changes:
    /// the same MAC, counts within the device's bounds, buffer heads
    /// within the queue, completion ticks in order, frames of valid size.
    pub fn restore_state(&mut self, s: &NetSaved) -> Result<(), String> {
        if parse_mac(&s.mac) != Some(self.mac) {
            return Err(format!(
                "mac: {:?} is not this NIC's {}",
                s.mac,
                format_mac(&self.mac)
            ));
        }
        if s.tx.len() > usize::from(QUEUE_SIZE) {
            return Err(format!("tx: {} buffers, at most {QUEUE_SIZE}", s.tx.len()));
        }
        for (i, &(head, done)) in s.tx.iter().enumerate() {
            if head >= QUEUE_SIZE {
                return Err(format!("tx[{i}]: head {head} outside the queue"));
            }
            if i > 0 && done < s.tx[i - 1].1 {
                return Err(format!(
                    "tx[{i}]: completes at {done}, before tx[{}]",
                    i - 1
                ));
            }
        }
        let frame = |what: &str, f: &str| -> Result<Arc<[u8]>, String> {
            let d = unhex(f).ok_or_else(|| format!("{what}: not a hex string"))?;
            if d.len() < MIN_FRAME || d.len() > MAX_FRAME {
                return Err(format!(
                    "{what}: a frame of {} bytes ({MIN_FRAME} to {MAX_FRAME})",
                    d.len()
                ));
            }
            Ok(d.into())
        };
        if s.backlog.len() > RX_BACKLOG {
            return Err(format!(
                "backlog: {} frames, at most {RX_BACKLOG}",
                s.backlog.len()
            ));
        }
        if s.outbox.len() > OUTBOX_CAPACITY {
            return Err(format!(
                "outbox: {} frames, at most {OUTBOX_CAPACITY}",
                s.outbox.len()
            ));
        }
        let backlog = s
            .backlog
            .iter()
            .enumerate()
            .map(|(i, f)| frame(&format!("backlog[{i}]"), f))
            .collect::<Result<VecDeque<_>, _>>()?;
        let outbox = s
            .outbox
            .iter()
            .enumerate()
            .map(|(i, (at, sent, f))| {
                Ok(SentFrame {
                    at: *at,
                    sent: *sent,
                    data: frame(&format!("outbox[{i}]"), f)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        self.free = s.wire_free;
        self.tx =
            s.tx.iter()
                .map(|&(head, done)| TxSlot { head, done })
                .collect();
        self.backlog = backlog;
        self.outbox = outbox;
        self.gauges();
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_NET_F_MAC) | (1u64 << VIRTIO_NET_F_STATUS)
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status (u16), ...
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn reset(&mut self) {
        // Frames already on the wire stay there; buffers and the backlog
        // belong to the driver's old rings.
        self.tx.clear();
        self.backlog.clear();
        self.gauges();
    }

    fn notify(
        &mut self,
        queues: &mut [Queue],
        queue: usize,
        mem: &GuestMemoryMmap,
        now: Tick,
    ) -> Outcome {
        match (queue, queues.get_mut(queue)) {
            (TX_QUEUE, Some(q)) => self.take_tx(q, mem, now),
            (RX_QUEUE, Some(q)) => self.fill_rx(q, mem),
            _ => Outcome::default(),
        }
    }

    fn next_deadline(&self) -> Option<Tick> {
        self.tx.front().map(|s| s.done)
    }

    fn save(&self) -> SavedState {
        crate::state::save(&self.save_state())
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: NetSaved = crate::state::parse(state)?;
        self.restore_state(&s).map_err(RestoreError)
    }

    fn on_deadline(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap, now: Tick) -> Outcome {
        let mut out = Outcome::default();
        let Some(q) = queues.get_mut(TX_QUEUE) else {
            return out;
        };
        // Buffers taken now may be due now (dropped frames): give them back
        // too, so that the next deadline is later than `now`. Each round
        // takes buffers from the ring, so this ends.
        loop {
            while self.tx.front().is_some_and(|s| s.done <= now) {
                let Some(s) = self.tx.pop_front() else {
                    break;
                };
                if q.add_used(mem, s.head, 0).is_err() {
                    out.broken = true;
                    break;
                }
                out.used = true;
            }
            if out.broken || !q.ready() || !q.is_valid(mem) {
                break;
            }
            let before = self.tx.len();
            let more = self.take_tx(q, mem, now);
            out.used |= more.used;
            out.broken |= more.broken;
            let due = self.tx.front().is_some_and(|s| s.done <= now);
            if out.broken || self.tx.len() == before || !due {
                break;
            }
        }
        self.gauges();
        out
    }
}
