//! A learning Ethernet switch between systems (`[[switch]]`), in simulated
//! time.
//!
//! Each port is a cable to a virtio-net NIC in one system. A frame the NIC
//! sends crosses its cable as on a link (the NIC's [`Wire`]: serialization
//! at the port's bandwidth, then the port's latency) and is fully received
//! by the switch at tick `at` (store and forward). There the switch learns
//! the source address on that port, and sends the frame out of one port
//! (a destination it has learned and not yet aged out) or floods it out
//! of every other port (broadcast, multicast, unknown destinations); a
//! known destination on the port the frame came from is filtered. Each
//! output port has a queue of at most `queue_frames` frames (and
//! `queue_bytes` bytes, if set): the frame on the cable and those waiting
//! for it. A frame that finds the queue full is dropped and counted; one
//! that fits starts at `max(at, end of the previous frame)`, occupies the
//! cable for `(len + 24) / bandwidth` and reaches the NIC `latency` after
//! its last byte left.
//!
//! The switch lives in the simulation, not in a system. During window k
//! the systems' lead threads post the frames their NICs sent into it
//! ([`Switch::post`]); between the window's barriers one thread (the lead
//! thread of the switch's first port's system) runs [`Switch::service`]
//! with the horizon `(k+1)*Q + min_latency`: every frame sent later than
//! window k reaches the switch at or after it, so every frame before it is
//! known, and they are handled in (arrival tick, port, sequence) order,
//! whatever the host threads did. What leaves is already timed to the
//! tick: it goes to the receiving system's inbox as a frame arriving at
//! its NIC, never inside a window already run, because twice the smallest
//! port latency is at least the quantum (checked by the config).
//!
//! Host memory: at most [`MAC_TABLE_CAPACITY`] learned addresses; the
//! output queues hold only (end tick, length) pairs, the frames themselves
//! being events in the receivers' queues.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use devices::virtio::net::{format_mac, parse_mac, Wire, MAX_FRAME, MIN_FRAME};
use serde::{Deserialize, Serialize};
use sim::{Counter, Stats, Tick, Value};

use crate::config::SwitchPort;
use crate::pcap::Capture;
use crate::PlatformError;

/// Learned addresses kept at most (a guest sending from ever new source
/// addresses cannot grow the table further; those are not learned).
pub const MAC_TABLE_CAPACITY: usize = 4096;

/// A frame received by the switch, waiting for its turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ingress {
    /// When its last byte reached the switch.
    pub at: Tick,
    /// The port it came in on.
    pub port: usize,
    /// The switch's sequence number (order of arrival at the switch).
    pub seq: u64,
    #[serde(with = "crate::nics::frame_hex")]
    pub frame: Arc<[u8]>,
}

/// A frame leaving the switch, timed to its arrival at the NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// The output port.
    pub port: usize,
    /// When it arrives at the port's NIC.
    pub at: Tick,
    /// When its first byte went onto the port's cable.
    pub start: Tick,
    /// The switch's output sequence number (ties at the receiver).
    pub seq: u64,
    pub frame: Arc<[u8]>,
}

/// A frame posted during a window: (port, order of posting on the
/// sender's thread, first byte sent, fully received, frame).
type Posted = (usize, u64, Tick, Tick, Arc<[u8]>);

/// A record waiting to be written to a port's capture: (tick, 0 for a
/// frame into the switch or 1 for one out of it, sequence, frame).
type Record = (Tick, u8, u64, Arc<[u8]>);

struct PortStats {
    rx_frames: Counter,
    rx_bytes: Counter,
    forwarded_frames: Counter,
    forwarded_bytes: Counter,
    flooded_frames: Counter,
    flooded_bytes: Counter,
    dropped_frames: Counter,
    dropped_bytes: Counter,
    filtered_frames: Counter,
    queue_peak: Value,
    queue_bytes_peak: Value,
}

impl PortStats {
    fn new(stats: &mut Stats, prefix: &str) -> Result<Self, PlatformError> {
        let mut c = |n: &str, d: &str, u| stats.counter(&format!("{prefix}.{n}"), d, u);
        let s = PortStats {
            rx_frames: c("rxFrames", "Frames received from the port's NIC", "Count")?,
            rx_bytes: c("rxBytes", "Bytes received from the port's NIC", "Byte")?,
            forwarded_frames: c(
                "forwardedFrames",
                "Frames sent out of this port to a learned address",
                "Count",
            )?,
            forwarded_bytes: c(
                "forwardedBytes",
                "Bytes sent out of this port to a learned address",
                "Byte",
            )?,
            flooded_frames: c(
                "floodedFrames",
                "Frames sent out of this port by flooding (broadcast, multicast, unknown \
                 destination)",
                "Count",
            )?,
            flooded_bytes: c(
                "floodedBytes",
                "Bytes sent out of this port by flooding",
                "Byte",
            )?,
            dropped_frames: c(
                "droppedFrames",
                "Frames dropped because this port's output queue was full",
                "Count",
            )?,
            dropped_bytes: c(
                "droppedBytes",
                "Bytes dropped because this port's output queue was full",
                "Byte",
            )?,
            filtered_frames: c(
                "filteredFrames",
                "Frames received for an address learned on this same port (not forwarded)",
                "Count",
            )?,
            queue_peak: stats.value(
                &format!("{prefix}.queuePeak"),
                "Most frames in this port's output queue at once",
                "Count",
            )?,
            queue_bytes_peak: stats.value(
                &format!("{prefix}.queueBytesPeak"),
                "Most bytes in this port's output queue at once",
                "Byte",
            )?,
        };
        Ok(s)
    }
}

struct Port {
    cfg: SwitchPort,
    /// Frames accepted and not yet fully sent: (last byte leaves, length).
    queue: VecDeque<(Tick, u32)>,
    queued_bytes: u64,
    /// When the cable is free (the last accepted frame's end).
    free: Tick,
    stats: PortStats,
    capture: Option<Capture>,
    /// Records not yet written (written once no earlier one can come).
    records: Vec<Record>,
}

/// A switch and everything in flight inside it.
pub struct Switch {
    name: String,
    ports: Vec<Port>,
    ageing: Tick,
    min_latency: Tick,
    /// Learned address -> (port, tick of the last frame from it).
    table: BTreeMap<[u8; 6], (usize, Tick)>,
    /// Frames posted during the current window.
    arriving: Vec<Posted>,
    /// Received frames not yet handled, in (at, port, seq) order.
    pending: Vec<Ingress>,
    next_seq: u64,
    next_out: u64,
    table_full: Counter,
    learned: Counter,
}

/// A switch's saved state (a checkpoint): the address table, the output
/// queues, the frames received and not yet handled, and the capture
/// records not yet written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSaved {
    pub name: String,
    /// (address, port, tick of its last frame).
    pub table: Vec<(String, usize, Tick)>,
    pub ports: Vec<PortSaved>,
    pub pending: Vec<Ingress>,
    pub next_seq: u64,
    pub next_out: u64,
}

/// One port's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSaved {
    /// (tick the frame's last byte leaves, its length), in order.
    pub queue: Vec<(Tick, u32)>,
    pub free: Tick,
    /// Capture records not yet written: (tick, direction, sequence,
    /// frame in hex).
    pub records: Vec<(Tick, u8, u64, String)>,
}

impl Switch {
    /// A switch named `name` with `ports` (settings resolved) and captures
    /// (one per port, `None` for an uncaptured port); statistics under
    /// `{name}.port{p}` in `stats`.
    pub fn new(
        name: &str,
        ports: &[SwitchPort],
        ageing: Tick,
        mut captures: Vec<Option<Capture>>,
        stats: &mut Stats,
    ) -> Result<Self, PlatformError> {
        captures.resize_with(ports.len(), || None);
        let mut out = Vec::with_capacity(ports.len());
        for (p, (cfg, capture)) in ports.iter().zip(captures).enumerate() {
            out.push(Port {
                cfg: *cfg,
                queue: VecDeque::new(),
                queued_bytes: 0,
                free: 0,
                stats: PortStats::new(stats, &format!("{name}.port{p}"))?,
                capture,
                records: Vec::new(),
            });
        }
        Ok(Switch {
            name: name.into(),
            min_latency: ports.iter().map(|p| p.latency).min().unwrap_or(0),
            ports: out,
            ageing: ageing.max(1),
            table: BTreeMap::new(),
            arriving: Vec::new(),
            pending: Vec::new(),
            next_seq: 0,
            next_out: 0,
            table_full: stats.counter(
                &format!("{name}.macTableFull"),
                "Source addresses not learned because the address table was full",
                "Count",
            )?,
            learned: stats.counter(
                &format!("{name}.learnedAddresses"),
                "Addresses learned (new, or moved to another port)",
                "Count",
            )?,
        })
    }

    /// The switch's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cable of port `p` as its NIC sees it.
    pub fn wire(&self, p: usize) -> Wire {
        let c = &self.ports[p].cfg;
        Wire {
            latency: c.latency,
            bandwidth: c.bandwidth,
        }
    }

    /// A frame sent by port `port`'s NIC: its first byte went onto the
    /// cable at `sent`, its last reaches the switch at `at`. `order` is
    /// the order of posting on the sender's thread (frames of one port
    /// come from one thread).
    pub fn post(&mut self, port: usize, order: u64, sent: Tick, at: Tick, frame: Arc<[u8]>) {
        if port < self.ports.len() {
            self.arriving.push((port, order, sent, at, frame));
        }
    }

    /// Takes the frames posted since the last call into the switch (in
    /// (port, order) order, which is deterministic), then handles, in
    /// (arrival, port, sequence) order, every frame received before
    /// `horizon`; returns what leaves. Capture records before `written`
    /// are written.
    pub fn service(&mut self, horizon: Tick, written: Tick) -> Vec<Egress> {
        let mut arriving = std::mem::take(&mut self.arriving);
        arriving.sort_by_key(|a| (a.0, a.1));
        for (port, _, sent, at, frame) in arriving {
            let seq = self.next_seq;
            self.next_seq += 1;
            let p = &mut self.ports[port];
            p.stats.rx_frames.inc();
            p.stats.rx_bytes.add(frame.len() as u64);
            if p.capture.is_some() {
                p.records.push((sent, 0, seq, frame.clone()));
            }
            self.pending.push(Ingress {
                at,
                port,
                seq,
                frame,
            });
        }
        self.pending.sort_by_key(|i| (i.at, i.port, i.seq));
        let n = self.pending.partition_point(|i| i.at < horizon);
        let due: Vec<Ingress> = self.pending.drain(..n).collect();
        let mut out = Vec::new();
        for i in due {
            self.forward(i, &mut out);
        }
        self.write_captures(written);
        out
    }

    /// The tick by which the switch must be serviced next, reported to the
    /// window plan: the earliest frame waiting, less the smallest latency
    /// (the window holding this tick is the last whose service comes
    /// early enough).
    pub fn next_activity(&self) -> Option<Tick> {
        self.pending
            .iter()
            .map(|i| i.at)
            .min()
            .map(|t| t.saturating_sub(self.min_latency))
    }

    /// Whether frames are waiting inside the switch.
    pub fn busy(&self) -> bool {
        !self.pending.is_empty()
    }

    fn forward(&mut self, i: Ingress, out: &mut Vec<Egress>) {
        let f = &i.frame;
        if f.len() < MIN_FRAME {
            return;
        }
        let dst: [u8; 6] = f[0..6].try_into().unwrap_or([0xff; 6]);
        let src: [u8; 6] = f[6..12].try_into().unwrap_or([0; 6]);
        self.learn(src, i.port, i.at);
        let flood = dst[0] & 1 != 0;
        let known = if flood {
            None
        } else {
            self.table
                .get(&dst)
                .filter(|(_, seen)| i.at < seen.saturating_add(self.ageing))
                .map(|(p, _)| *p)
        };
        match known {
            Some(p) if p == i.port => self.ports[p].stats.filtered_frames.inc(),
            Some(p) => {
                if let Some(e) = self.enqueue(p, &i, false) {
                    out.push(e);
                }
            }
            None => {
                for p in (0..self.ports.len()).filter(|&p| p != i.port) {
                    if let Some(e) = self.enqueue(p, &i, true) {
                        out.push(e);
                    }
                }
            }
        }
    }

    fn learn(&mut self, src: [u8; 6], port: usize, at: Tick) {
        if src[0] & 1 != 0 || src == [0; 6] {
            return;
        }
        if let Some(e) = self.table.get_mut(&src) {
            if e.0 != port {
                self.learned.inc();
            }
            *e = (port, at);
            return;
        }
        if self.table.len() >= MAC_TABLE_CAPACITY {
            let ageing = self.ageing;
            self.table
                .retain(|_, (_, seen)| at < seen.saturating_add(ageing));
        }
        if self.table.len() >= MAC_TABLE_CAPACITY {
            self.table_full.inc();
            return;
        }
        self.table.insert(src, (port, at));
        self.learned.inc();
    }

    /// Queues `i` on port `p`: the frame leaving, or `None` when the queue
    /// is full (dropped, counted).
    fn enqueue(&mut self, p: usize, i: &Ingress, flooded: bool) -> Option<Egress> {
        let wire = self.wire(p);
        let port = &mut self.ports[p];
        let len = i.frame.len();
        while let Some(&(end, l)) = port.queue.front() {
            if end > i.at {
                break;
            }
            port.queue.pop_front();
            port.queued_bytes -= u64::from(l);
        }
        let full = port.queue.len() >= port.cfg.queue_frames as usize
            || port
                .cfg
                .queue_bytes
                .is_some_and(|b| port.queued_bytes + len as u64 > b);
        if full {
            port.stats.dropped_frames.inc();
            port.stats.dropped_bytes.add(len as u64);
            return None;
        }
        let start = i.at.max(port.free);
        let end = start.saturating_add(wire.serialize(len));
        port.free = end;
        port.queue.push_back((end, len as u32));
        port.queued_bytes += len as u64;
        let peak = &port.stats;
        if port.queue.len() as f64 > peak.queue_peak.get() {
            peak.queue_peak.set(port.queue.len() as f64);
        }
        if port.queued_bytes as f64 > peak.queue_bytes_peak.get() {
            peak.queue_bytes_peak.set(port.queued_bytes as f64);
        }
        let (frames, bytes) = if flooded {
            (&peak.flooded_frames, &peak.flooded_bytes)
        } else {
            (&peak.forwarded_frames, &peak.forwarded_bytes)
        };
        frames.inc();
        bytes.add(len as u64);
        let seq = self.next_out;
        self.next_out += 1;
        if port.capture.is_some() {
            port.records.push((start, 1, i.seq, i.frame.clone()));
        }
        Some(Egress {
            port: p,
            at: end.saturating_add(wire.latency),
            start,
            seq,
            frame: i.frame.clone(),
        })
    }

    /// Writes every capture record stamped before `before`, in (tick,
    /// direction, sequence) order. A capture that cannot be written is
    /// reported once and closed (the run goes on).
    pub fn write_captures(&mut self, before: Tick) {
        for port in &mut self.ports {
            let Some(w) = &mut port.capture else {
                port.records.clear();
                continue;
            };
            port.records.sort();
            let n = port.records.partition_point(|r| r.0 < before);
            let r = port.records[..n]
                .iter()
                .try_for_each(|(at, _, _, f)| w.write(*at, f))
                .and_then(|()| w.flush());
            port.records.drain(..n);
            if let Err(e) = r {
                tracing::warn!("{}: {e}; the capture stops here", w.path());
                port.capture = None;
                port.records.clear();
            }
        }
    }

    /// The switch's state for a checkpoint (taken between windows: no
    /// frame is still being posted).
    pub fn save(&self) -> SwitchSaved {
        SwitchSaved {
            name: self.name.clone(),
            table: self
                .table
                .iter()
                .map(|(m, (p, t))| (format_mac(m), *p, *t))
                .collect(),
            ports: self
                .ports
                .iter()
                .map(|p| PortSaved {
                    queue: p.queue.iter().copied().collect(),
                    free: p.free,
                    records: p
                        .records
                        .iter()
                        .map(|(t, d, s, f)| (*t, *d, *s, hex(f)))
                        .collect(),
                })
                .collect(),
            pending: self.pending.clone(),
            next_seq: self.next_seq,
            next_out: self.next_out,
        }
    }

    /// Puts back a saved state, checked whole before anything changes
    /// (the error names the field).
    pub fn restore(&mut self, s: &SwitchSaved) -> Result<(), String> {
        if s.name != self.name {
            return Err(format!("name: {:?} is not {:?}", s.name, self.name));
        }
        let n = self.ports.len();
        if s.ports.len() != n {
            return Err(format!(
                "ports: {} ports, the switch has {n}",
                s.ports.len()
            ));
        }
        if s.table.len() > MAC_TABLE_CAPACITY {
            return Err(format!(
                "table: {} addresses, at most {MAC_TABLE_CAPACITY}",
                s.table.len()
            ));
        }
        let mut table = BTreeMap::new();
        for (k, (m, p, t)) in s.table.iter().enumerate() {
            let mac = parse_mac(m).ok_or_else(|| format!("table[{k}]: {m:?} is no address"))?;
            if *p >= n {
                return Err(format!("table[{k}]: port {p} of {n}"));
            }
            if table.insert(mac, (*p, *t)).is_some() {
                return Err(format!("table[{k}]: {m} twice"));
            }
        }
        let len_ok = |l: usize| (MIN_FRAME..=MAX_FRAME).contains(&l);
        let mut records = Vec::with_capacity(n);
        for (i, (ps, port)) in s.ports.iter().zip(&self.ports).enumerate() {
            if ps.queue.len() > port.cfg.queue_frames as usize {
                return Err(format!(
                    "ports[{i}].queue: {} frames, the queue holds {}",
                    ps.queue.len(),
                    port.cfg.queue_frames
                ));
            }
            let bytes: u64 = ps.queue.iter().map(|q| u64::from(q.1)).sum();
            if port.cfg.queue_bytes.is_some_and(|b| bytes > b) {
                return Err(format!(
                    "ports[{i}].queue: {bytes} bytes, more than it holds"
                ));
            }
            for (k, &(end, len)) in ps.queue.iter().enumerate() {
                if !len_ok(len as usize) {
                    return Err(format!("ports[{i}].queue[{k}]: a frame of {len} bytes"));
                }
                if (k > 0 && end < ps.queue[k - 1].0) || end > ps.free {
                    return Err(format!(
                        "ports[{i}].queue[{k}]: ends at {end}, out of order"
                    ));
                }
            }
            let mut r = Vec::with_capacity(ps.records.len());
            for (k, (t, d, seq, f)) in ps.records.iter().enumerate() {
                let f = unhex(f)
                    .filter(|f| len_ok(f.len()))
                    .ok_or_else(|| format!("ports[{i}].records[{k}]: not a frame in hex"))?;
                if *d > 1 {
                    return Err(format!("ports[{i}].records[{k}]: direction {d}"));
                }
                r.push((*t, *d, *seq, Arc::from(f)));
            }
            records.push(r);
        }
        for (k, i) in s.pending.iter().enumerate() {
            if i.port >= n || !len_ok(i.frame.len()) || i.seq >= s.next_seq {
                return Err(format!(
                    "pending[{k}]: port {}, {} bytes, seq {}",
                    i.port,
                    i.frame.len(),
                    i.seq
                ));
            }
        }
        self.table = table;
        for ((port, ps), r) in self.ports.iter_mut().zip(&s.ports).zip(records) {
            port.queue = ps.queue.iter().copied().collect();
            port.queued_bytes = ps.queue.iter().map(|q| u64::from(q.1)).sum();
            port.free = ps.free;
            port.records = if port.capture.is_some() {
                r
            } else {
                Vec::new()
            };
        }
        self.pending = s.pending.clone();
        self.pending.sort_by_key(|i| (i.at, i.port, i.seq));
        self.arriving.clear();
        self.next_seq = s.next_seq;
        self.next_out = s.next_out;
        Ok(())
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        // The run is over: nothing earlier can come.
        self.write_captures(Tick::MAX);
    }
}

fn hex(f: &[u8]) -> String {
    f.iter().map(|b| format!("{b:02x}")).collect()
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

#[cfg(test)]
mod tests;
