//! One simulation spread over several processes (MPI ranks under
//! `mpirun`/`srun`): each process owns some of the config's systems and
//! runs them exactly as [`crate::simulation`] runs systems on threads, in
//! the same windows of `sim.quantum`. What crosses processes goes through a
//! [`Transport`] (the `kvmsim` binary implements it over MPI behind its
//! `mpi` feature, so that this crate needs no MPI library):
//!
//! - at every window boundary, one [`Transport::exchange`] (counts, then
//!   the bytes) carries the window's link messages and Ethernet frames to
//!   the processes of their receivers (and frames for a switch to the
//!   process of the switch's home system); it is also the window barrier;
//! - with switches, a second exchange carries what the switches let out;
//! - one [`Transport::sum`] then gives every process the same view of the
//!   window (each system's next activity, which systems ended, whether one
//!   stops the run, checkpoint requests): every process takes the same
//!   decision ([`crate::simulation`]'s plan) and they stay in lock step.
//!
//! Arrivals are sorted by (tick, sender system, sender's sequence) on the
//! receiving side as within one process, so a distributed run delivers the
//! same messages at the same ticks in the same order as one process does.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use sim::stats::{Dump, DumpEntry, StatValue};
use sim::Tick;

use crate::config::Config;
use crate::PlatformError;

/// How the processes of a distributed run talk. Every method is
/// collective: all processes call it, in the same order, and it returns
/// once every process has called it.
pub trait Transport: Send + Sync {
    /// This process's number, from 0.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Sends `to[r]` to process `r` (`to.len() == size()`); returns what
    /// every process sent to this one, by sender.
    fn exchange(&self, to: Vec<Vec<u8>>) -> Vec<Vec<u8>>;
    /// Element-wise sum of `v` over every process, into `v` on each.
    fn sum(&self, v: &mut [u64]);
    /// Ends every process of the run at once with status `code`: this
    /// one can no longer take part (one of its threads panicked), and the
    /// others would wait for it at the next collective forever. Not
    /// collective. The default ends this process only.
    fn abort(&self, code: i32) {
        std::process::exit(code)
    }
}

/// A distributed run: the transport and which process owns each system.
#[derive(Clone)]
pub struct Dist {
    transport: Arc<dyn Transport>,
    /// `owner[system]` = its process.
    owner: Vec<usize>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dist")
            .field("rank", &self.rank())
            .field("size", &self.size())
            .field("owner", &self.owner)
            .finish()
    }
}

impl Dist {
    /// Places `cfg`'s systems on the processes of `transport`: a system's
    /// `rank` if it has one, else round-robin (system i on process
    /// i mod size). Every process must own at least one system.
    pub fn new(transport: Arc<dyn Transport>, cfg: &Config) -> Result<Self, PlatformError> {
        let size = transport.size();
        let owner = placement(cfg, size)?;
        Ok(Dist { transport, owner })
    }

    /// This process's number.
    pub fn rank(&self) -> usize {
        self.transport.rank()
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.transport.size()
    }

    /// The process that owns system `system`.
    pub fn owner(&self, system: usize) -> usize {
        self.owner.get(system).copied().unwrap_or(0)
    }

    /// True if this process owns system `system`.
    pub fn is_local(&self, system: usize) -> bool {
        self.owner(system) == self.rank()
    }

    pub(crate) fn transport(&self) -> &dyn Transport {
        &*self.transport
    }

    /// Ends every process at once ([`Transport::abort`]).
    pub fn abort(&self, code: i32) {
        self.transport.abort(code)
    }

    /// True on every process if `ok` is true on every process (a failure
    /// on one, during set-up for example, stops all).
    pub fn all_ok(&self, ok: bool) -> bool {
        let mut v = [u64::from(!ok)];
        self.transport.sum(&mut v);
        v[0] == 0
    }

    /// Every process's `mine`, by process.
    pub fn all_gather<T>(&self, mine: &T) -> Result<Vec<T>, PlatformError>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        let bytes = serde_json::to_vec(mine)
            .map_err(|e| PlatformError::Setup(format!("distributed run: encoding: {e}")))?;
        let got = self.transport.exchange(vec![bytes; self.size()]);
        got.iter()
            .enumerate()
            .map(|(r, b)| {
                serde_json::from_slice(b).map_err(|e| {
                    PlatformError::Setup(format!(
                        "distributed run: what process {r} sent does not decode: {e}"
                    ))
                })
            })
            .collect()
    }
}

/// Which process owns each system of `cfg` with `size` processes.
pub fn placement(cfg: &Config, size: usize) -> Result<Vec<usize>, PlatformError> {
    let size = size.max(1);
    let mut owner = Vec::with_capacity(cfg.system.len());
    for (i, s) in cfg.system.iter().enumerate() {
        let r = s.rank.unwrap_or(i % size);
        if r >= size {
            return Err(PlatformError::Setup(format!(
                "system[{i}].rank = {r}: the run has {size} processes (ranks 0 to {}); start \
                 more (mpirun -np {}) or place the system on a lower rank",
                size - 1,
                r + 1
            )));
        }
        owner.push(r);
    }
    if let Some(idle) = (0..size).find(|r| !owner.contains(r)) {
        return Err(PlatformError::Setup(format!(
            "process (rank) {idle} of {size} owns no system: the config has {} systems{}; start \
             at most as many processes as it places",
            cfg.system.len(),
            if cfg.system.iter().any(|s| s.rank.is_some()) {
                " and system.rank places them elsewhere"
            } else {
                ""
            }
        )));
    }
    Ok(owner)
}

/// A message between processes at a window boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wire {
    /// A link value or frame for system `to`'s inbox (see
    /// `simulation::Message`); `sent` is when a frame's first byte left
    /// (for the link's capture on the receiving side).
    Inbox {
        to: usize,
        at: Tick,
        src: usize,
        seq: u64,
        port: u32,
        data: u64,
        sent: Tick,
        frame: Option<Arc<[u8]>>,
    },
    /// A frame for port `port` of switch `switch` (posted there in the
    /// sender's order).
    Switch {
        switch: usize,
        port: usize,
        order: u64,
        sent: Tick,
        at: Tick,
        frame: Arc<[u8]>,
    },
}

fn put(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_frame(b: &mut Vec<u8>, f: Option<&[u8]>) {
    match f {
        None => put(b, u64::MAX),
        Some(f) => {
            put(b, f.len() as u64);
            b.extend_from_slice(f);
        }
    }
}

impl Wire {
    pub(crate) fn encode(&self, b: &mut Vec<u8>) {
        match self {
            Wire::Inbox {
                to,
                at,
                src,
                seq,
                port,
                data,
                sent,
                frame,
            } => {
                b.push(0);
                for v in [
                    *to as u64,
                    *at,
                    *src as u64,
                    *seq,
                    u64::from(*port),
                    *data,
                    *sent,
                ] {
                    put(b, v);
                }
                put_frame(b, frame.as_deref());
            }
            Wire::Switch {
                switch,
                port,
                order,
                sent,
                at,
                frame,
            } => {
                b.push(1);
                for v in [*switch as u64, *port as u64, *order, *sent, *at] {
                    put(b, v);
                }
                put_frame(b, Some(frame));
            }
        }
    }

    /// Every message in `b` (what one process sent).
    pub(crate) fn decode_all(mut b: &[u8]) -> Result<Vec<Wire>, String> {
        fn take(b: &mut &[u8]) -> Result<u64, String> {
            let (h, t) = b.split_first_chunk::<8>().ok_or("a message ends early")?;
            *b = t;
            Ok(u64::from_le_bytes(*h))
        }
        fn frame(b: &mut &[u8]) -> Result<Option<Arc<[u8]>>, String> {
            let n = take(b)?;
            if n == u64::MAX {
                return Ok(None);
            }
            let n = usize::try_from(n).map_err(|_| "a frame length overflows")?;
            if n > b.len() {
                return Err(format!("a frame of {n} bytes with {} left", b.len()));
            }
            let (f, t) = b.split_at(n);
            *b = t;
            Ok(Some(Arc::from(f)))
        }
        let mut out = Vec::new();
        while let Some((&kind, rest)) = b.split_first() {
            b = rest;
            let mut v = [0u64; 7];
            let fields = if kind == 0 { 7 } else { 5 };
            for x in v.iter_mut().take(fields) {
                *x = take(&mut b)?;
            }
            out.push(match kind {
                0 => Wire::Inbox {
                    to: v[0] as usize,
                    at: v[1],
                    src: v[2] as usize,
                    seq: v[3],
                    port: u32::try_from(v[4]).map_err(|_| "a port number overflows")?,
                    data: v[5],
                    sent: v[6],
                    frame: frame(&mut b)?,
                },
                1 => Wire::Switch {
                    switch: v[0] as usize,
                    port: v[1] as usize,
                    order: v[2],
                    sent: v[3],
                    at: v[4],
                    frame: frame(&mut b)?.ok_or("a switch message without a frame")?,
                },
                k => return Err(format!("unknown message kind {k}")),
            });
        }
        Ok(out)
    }
}

/// Messages waiting for the next exchange, by destination process.
pub(crate) struct Outbox {
    to: Vec<Mutex<Vec<u8>>>,
}

impl Outbox {
    pub(crate) fn new(size: usize) -> Self {
        Outbox {
            to: (0..size).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    pub(crate) fn push(&self, rank: usize, w: &Wire) {
        if let Some(b) = self.to.get(rank) {
            w.encode(&mut b.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Sends what waits and returns what arrived (by sender, each in the
    /// order it was encoded there).
    pub(crate) fn exchange(&self, t: &dyn Transport) -> Result<Vec<Vec<Wire>>, String> {
        let to = self
            .to
            .iter()
            .map(|b| std::mem::take(&mut *b.lock().unwrap_or_else(|p| p.into_inner())))
            .collect();
        t.exchange(to)
            .iter()
            .enumerate()
            .map(|(r, b)| Wire::decode_all(b).map_err(|e| format!("from process {r}: {e}")))
            .collect()
    }
}

/// A stats dump as it crosses processes.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct DumpWire {
    tick: Tick,
    entries: Vec<EntryWire>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EntryWire {
    name: String,
    /// `Int` value, or the bits of a `Float` one.
    value: u64,
    float: bool,
    desc: String,
    unit: String,
    label: Option<(String, Vec<String>)>,
}

impl From<&Dump> for DumpWire {
    fn from(d: &Dump) -> Self {
        DumpWire {
            tick: d.tick,
            entries: d.entries.iter().map(entry_wire).collect(),
        }
    }
}

fn entry_wire(e: &DumpEntry) -> EntryWire {
    let (value, float) = match e.value {
        StatValue::Int(v) => (v, false),
        StatValue::Float(f) => (f.to_bits(), true),
    };
    EntryWire {
        name: e.name.clone(),
        value,
        float,
        desc: e.desc.clone(),
        unit: e.unit.to_string(),
        label: e.label.clone(),
    }
}

/// A unit's name as the `&'static str` dumps hold (each distinct unit is
/// kept once for the process's life).
fn unit(u: &str) -> &'static str {
    static UNITS: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut g = UNITS.lock().unwrap_or_else(|p| p.into_inner());
    let set = g.get_or_insert_with(HashSet::new);
    if let Some(s) = set.get(u) {
        return s;
    }
    let s: &'static str = Box::leak(u.to_string().into_boxed_str());
    set.insert(s);
    s
}

impl DumpWire {
    pub(crate) fn into_dump(self) -> Dump {
        Dump {
            tick: self.tick,
            entries: self
                .entries
                .into_iter()
                .map(EntryWire::into_entry)
                .collect(),
        }
    }
}

impl EntryWire {
    fn into_entry(self) -> DumpEntry {
        DumpEntry {
            name: self.name,
            value: if self.float {
                StatValue::Float(f64::from_bits(self.value))
            } else {
                StatValue::Int(self.value)
            },
            desc: self.desc,
            unit: unit(&self.unit),
            label: self.label,
        }
    }
}

/// What one process contributes to the final stats.txt: its systems'
/// dumps (by system) and its view of the links' and switches' statistics.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct FinalPart {
    systems: Vec<(usize, DumpWire)>,
    net: Vec<EntryWire>,
}

impl FinalPart {
    pub(crate) fn new(systems: Vec<(usize, &Dump)>, net: &[DumpEntry]) -> Self {
        FinalPart {
            systems: systems.into_iter().map(|(i, d)| (i, d.into())).collect(),
            net: net.iter().map(entry_wire).collect(),
        }
    }
}

/// The final dump of a distributed run from every process's part: every
/// system's statistics in system order (as one process combines them),
/// then the links' and switches' statistics summed over the processes. A
/// link's direction and a switch are each counted by one process only
/// (the sender's, the switch's home), so the sums are what one process
/// counts.
pub(crate) fn merge_final(now: Tick, parts: Vec<FinalPart>) -> Dump {
    let mut systems: BTreeMap<usize, Dump> = BTreeMap::new();
    let mut net: Vec<DumpEntry> = Vec::new();
    for p in parts {
        for (i, d) in p.systems {
            systems.insert(i, d.into_dump());
        }
        for e in p.net.into_iter().map(EntryWire::into_entry) {
            match net.iter_mut().find(|n| n.name == e.name) {
                Some(n) => {
                    n.value = match (n.value, e.value) {
                        (StatValue::Int(a), StatValue::Int(b)) => {
                            StatValue::Int(a.saturating_add(b))
                        }
                        (a, b) => StatValue::Float(a.as_f64() + b.as_f64()),
                    }
                }
                None => net.push(e),
            }
        }
    }
    let mut dump = Dump::combine(now, systems.into_values().collect());
    dump.entries.extend(net);
    dump
}

/// A [`Transport`] between threads of one process, for tests: `n`
/// endpoints that meet at every call.
#[doc(hidden)]
pub mod local {
    use std::sync::{Arc, Barrier, Mutex};

    use super::Transport;

    struct Shared {
        n: usize,
        barrier: Barrier,
        mail: Mutex<Vec<Vec<Vec<u8>>>>,
        sums: Mutex<Vec<Vec<u64>>>,
    }

    /// One endpoint.
    pub struct Local {
        rank: usize,
        shared: Arc<Shared>,
    }

    /// `n` endpoints, rank 0 first.
    pub fn endpoints(n: usize) -> Vec<Local> {
        let shared = Arc::new(Shared {
            n,
            barrier: Barrier::new(n),
            mail: Mutex::new(vec![vec![Vec::new(); n]; n]),
            sums: Mutex::new(vec![Vec::new(); n]),
        });
        (0..n)
            .map(|rank| Local {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    impl Transport for Local {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.shared.n
        }
        fn exchange(&self, to: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
            {
                let mut m = self.shared.mail.lock().unwrap();
                for (r, b) in to.into_iter().enumerate() {
                    m[r][self.rank] = b;
                }
            }
            self.shared.barrier.wait();
            let got = std::mem::take(&mut self.shared.mail.lock().unwrap()[self.rank]);
            self.shared.barrier.wait();
            self.shared.mail.lock().unwrap()[self.rank] = vec![Vec::new(); self.shared.n];
            got
        }
        fn sum(&self, v: &mut [u64]) {
            self.shared.sums.lock().unwrap()[self.rank] = v.to_vec();
            self.shared.barrier.wait();
            let all = self.shared.sums.lock().unwrap().clone();
            self.shared.barrier.wait();
            for (i, x) in v.iter_mut().enumerate() {
                *x = all.iter().map(|s| s.get(i).copied().unwrap_or(0)).sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_encoded_and_come_back_equal() {
        let frame: Arc<[u8]> = Arc::from(&b"\x01\x02\x03frame"[..]);
        let msgs = vec![
            Wire::Inbox {
                to: 3,
                at: 100,
                src: 1,
                seq: 7,
                port: 2,
                data: 42,
                sent: 90,
                frame: None,
            },
            Wire::Switch {
                switch: 1,
                port: 4,
                order: 9,
                sent: 5,
                at: 6,
                frame: frame.clone(),
            },
            Wire::Inbox {
                to: 0,
                at: u64::MAX - 1,
                src: 0,
                seq: 0,
                port: 0,
                data: 0,
                sent: 0,
                frame: Some(Arc::from(&[][..])),
            },
        ];
        let mut b = Vec::new();
        for m in &msgs {
            m.encode(&mut b);
        }
        assert_eq!(Wire::decode_all(&b).unwrap(), msgs);
        // A cut message is an error, never a panic.
        for cut in 0..b.len() {
            let r = Wire::decode_all(&b[..cut]);
            let whole = [0, 65, 65 + 1 + 8 * 5 + 8 + frame.len()];
            assert_eq!(r.is_ok(), whole.contains(&cut), "cut at {cut}");
        }
        assert!(Wire::decode_all(&[9]).is_err());
    }

    #[test]
    fn systems_are_placed_by_rank_or_round_robin_and_every_process_gets_one() {
        let mut cfg: Config = toml::from_str(
            "[[system]]\nkernel = \"builtin:hello\"\n[[system]]\nkernel = \"builtin:hello\"\n\
             [[system]]\nkernel = \"builtin:hello\"\n",
        )
        .unwrap();
        assert_eq!(placement(&cfg, 2).unwrap(), vec![0, 1, 0]);
        assert_eq!(placement(&cfg, 1).unwrap(), vec![0, 0, 0]);
        cfg.system[0].rank = Some(1);
        cfg.system[1].rank = Some(1);
        // System 2 stays round-robin (2 mod 2).
        assert_eq!(placement(&cfg, 2).unwrap(), vec![1, 1, 0]);
        cfg.system[2].rank = Some(1);
        let e = placement(&cfg, 2).unwrap_err().to_string();
        assert!(e.contains("(rank) 0 of 2 owns no system"), "{e}");
        cfg.system[2].rank = Some(2);
        let e = placement(&cfg, 2).unwrap_err().to_string();
        assert!(e.contains("system[2].rank = 2"), "{e}");
        let e = placement(&cfg, 4).unwrap_err().to_string();
        assert!(e.contains("owns no system"), "{e}");
    }

    #[test]
    fn final_stats_merge_systems_in_order_and_sum_the_network() {
        let mut a = sim::Stats::new();
        a.counter("system0.x", "x", "Count").unwrap().add(3);
        let mut b = sim::Stats::new();
        b.counter("system1.x", "x", "Count").unwrap().add(4);
        let net = |v: u64| {
            let mut s = sim::Stats::new();
            s.counter("link0.frames0to1", "f", "Count").unwrap().add(v);
            s.dump(10)
                .entries
                .into_iter()
                .filter(|e| !sim::stats::BUILTINS.contains(&e.name.as_str()))
                .collect::<Vec<_>>()
        };
        let (n0, n1) = (net(5), net(0));
        let (da, db) = (a.dump(10), b.dump(10));
        // Process 1 owns system 1 and reports first: the order is the systems'.
        let parts = [
            FinalPart::new(vec![(1, &db)], &n1),
            FinalPart::new(vec![(0, &da)], &n0),
        ];
        let wire: Vec<FinalPart> = parts
            .iter()
            .map(|p| serde_json::from_slice(&serde_json::to_vec(p).unwrap()).unwrap())
            .collect();
        let d = merge_final(10, wire);
        let names: Vec<&str> = d.entries.iter().map(|e| e.name.as_str()).collect();
        let x0 = names.iter().position(|n| *n == "system0.x").unwrap();
        let x1 = names.iter().position(|n| *n == "system1.x").unwrap();
        assert!(x0 < x1);
        assert_eq!(d.get("system1.x"), Some(StatValue::Int(4)));
        assert_eq!(d.get("link0.frames0to1"), Some(StatValue::Int(5)));
        assert_eq!(names.iter().filter(|n| **n == "simTicks").count(), 1);
    }
}
