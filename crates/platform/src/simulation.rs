//! A simulation: one or more systems, each with its own event queue.
//!
//! One system runs on the calling thread exactly as [`System::run`] does.
//! Several systems run on one host thread each, in lock-step windows of
//! `sim.quantum` simulated time separated by barriers. A value sent on a
//! link during window k arrives at send time + latency, which the config
//! guarantees to be at or after the start of window k+1 (latency >= quantum:
//! the quantum is the lookahead). At the barrier every system posts what it
//! sent into the receivers' inboxes (double-buffered by the parity of the
//! round: windows skipped in between do not count, so a fast sender can
//! never post into the buffer a slow receiver is still taking); after
//! it, each system takes its inbox, sorts it by (arrival tick, sender,
//! sequence) and schedules the arrivals: the same messages always arrive in
//! the same order, whatever the host threads did.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sim::barrier::SpinBarrier;

use sim::stats::Dump;
use sim::{Counter, ExitCause, ExitEvent, Stats, Tick};

use crate::config::{Config, LinkKind, NicOwner, DEFAULT_ETHERNET_BANDWIDTH};
use crate::distributed::{Dist, FinalPart, Outbox, Wire};
use crate::nics::NicEnd;
use crate::output::OutDir;
use crate::pcap::Capture;
use crate::switch::Switch;

/// A window at least this long in host time (ns) is not worth probing the
/// cost of a forced exit for ([`Simulation::warn_if_windows_dominate`]).
const LONG_WINDOW_NS: f64 = 10_000_000.0;
use crate::system::{CpuThread, LinkEnd, System};
use crate::PlatformError;

/// A value or an Ethernet frame in flight between systems.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Message {
    at: Tick,
    src: usize,
    seq: u64,
    port: u32,
    data: u64,
    frame: Option<Arc<[u8]>>,
}

/// Where a system's link port leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// Port `port` of system `system`, over `[[link]]` number `link`.
    System {
        system: usize,
        port: u32,
        link: usize,
    },
    /// Port `port` of `[[switch]]` number `switch`.
    Switch { switch: usize, port: usize },
}

/// Where each (system, port) of a link or switch leads.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// `peers[system][port]`.
    peers: Vec<Vec<Peer>>,
}

/// An Ethernet link's statistics (`link{i}.*`), each direction by the
/// index of its sending end in `systems`.
struct LinkStats {
    frames: [Counter; 2],
    bytes: [Counter; 2],
}

/// A frame waiting to be written to a capture: (first byte on the wire,
/// sender, its sequence number, frame).
type Captured = (Tick, usize, u64, Arc<[u8]>);

/// What a run knows of a link besides its route.
pub(crate) struct LinkRun {
    systems: [usize; 2],
    stats: Option<LinkStats>,
    capture: Option<Mutex<(Option<Capture>, Vec<Captured>)>>,
}

impl LinkRun {
    /// Writes the frames sent before `end` (the last window's), in (tick,
    /// sender, sequence) order: the same file whatever the host threads did. A
    /// capture that cannot be written is reported once and closed (the
    /// run goes on).
    fn flush_capture(&self, end: Tick) {
        let Some(c) = &self.capture else {
            return;
        };
        let mut g = c.lock().unwrap_or_else(|p| p.into_inner());
        let (cap, pending) = &mut *g;
        let (mut frames, later): (Vec<Captured>, Vec<Captured>) =
            std::mem::take(pending).into_iter().partition(|f| f.0 < end);
        *pending = later;
        let Some(w) = cap else {
            return;
        };
        frames.sort();
        let r = frames
            .iter()
            .try_for_each(|(at, _, _, f)| w.write(*at, f))
            .and_then(|()| w.flush());
        if let Err(e) = r {
            tracing::warn!("{}: {e}; the capture stops here", w.path());
            *cap = None;
        }
    }
}

/// What a run knows of a switch: the switch (serviced between windows by
/// the lead thread of system `home`) and where each port leads.
pub(crate) struct SwitchRun {
    switch: Mutex<Switch>,
    /// `targets[port]` = (system, that system's link port).
    targets: Vec<(usize, u32)>,
    /// The lowest system on the switch: its lead thread services it.
    home: usize,
    /// The smallest port latency.
    min_latency: Tick,
}

/// What lives between the systems in a checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSaved {
    /// The links' and switches' statistics.
    stats: sim::stats::StatsSaved,
    switches: Vec<crate::switch::SwitchSaved>,
}

/// Link and switch statistics as of the last window boundary, which
/// guest-requested dumps show (the same whatever the host threads did).
pub type NetSnapshot = Arc<Mutex<Vec<sim::stats::DumpEntry>>>;

/// Systems, links, switches and the quantum.
pub struct Simulation {
    names: Vec<String>,
    systems: Vec<System>,
    route: Route,
    links: Vec<LinkRun>,
    switches: Vec<SwitchRun>,
    /// The links' and switches' statistics (added to the final dump, and
    /// as of the last window to guest-requested ones).
    link_stats: Stats,
    net_snapshot: NetSnapshot,
    quantum: Tick,
    stop_on_fault: bool,
    out: OutDir,
    /// The resolved configuration (what a checkpoint keeps).
    config: Config,
    /// Checkpoints taken so far (their folders).
    checkpoints: Vec<std::path::PathBuf>,
    /// The GDB stub's socket (`sim.gdb`), bound at build time.
    gdb: Option<crate::gdb::GdbListener>,
    /// Systems that ended while the run stopped (for a checkpoint or the
    /// debugger), with their exits.
    ended: Vec<Option<ExitEvent>>,
    /// The numbers (in the config) of the systems this process runs, in
    /// the order of `systems`: all of them unless the run is distributed.
    ids: Vec<usize>,
    /// The other processes of a distributed run ([`crate::distributed`]).
    dist: Option<Dist>,
}

/// How a run of the threads ended.
pub(crate) enum RunEnd {
    /// Every system ended: one exit each.
    Exits(Vec<ExitEvent>),
    /// Every system drained for a checkpoint; the run can resume.
    Checkpoint,
    /// A CPU stopped for the debugger (crate::gdb); every thread left at
    /// the window boundary after it.
    Debug,
}

/// A checkpoint's config and state, read and checked.
pub struct Checkpoint {
    pub dir: std::path::PathBuf,
    pub state: ckpt::CheckpointState,
    /// The run's resolved configuration, as the checkpoint holds it.
    pub config: Config,
}

impl Checkpoint {
    /// Reads checkpoint folder `dir`.
    pub fn read(dir: &std::path::Path) -> Result<Self, PlatformError> {
        let state = ckpt::read_state(dir)?;
        // What kvmsim filled in as a result (the Linux command line it
        // built, the addresses PC events resolved to) is written, not
        // read: it is built again the same way.
        let mut saved = state.config.clone();
        if let Some(systems) = saved.get_mut("system").and_then(|s| s.as_array_mut()) {
            for s in systems {
                if let Some(o) = s.as_object_mut() {
                    o.remove("cmdline");
                    let events = o
                        .get_mut("cpu")
                        .and_then(|c| c.get_mut("pc_event"))
                        .and_then(|e| e.as_array_mut());
                    for e in events.into_iter().flatten() {
                        if let Some(e) = e.as_object_mut() {
                            e.remove("address");
                        }
                    }
                }
            }
        }
        let config: Config = serde_json::from_value(saved).map_err(|e| {
            PlatformError::Checkpoint(format!(
                "{}: the saved configuration does not parse: {e}",
                dir.join(ckpt::STATE_FILE).display()
            ))
        })?;
        if config.system.len() != state.systems.len() {
            return Err(PlatformError::Checkpoint(format!(
                "{}: the saved configuration has {} systems, the checkpoint {}",
                dir.join(ckpt::STATE_FILE).display(),
                config.system.len(),
                state.systems.len()
            )));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state,
            config,
        })
    }
}

impl Simulation {
    /// Builds every system of `cfg` (filling in host-dependent defaults).
    pub fn build(cfg: &mut Config, out: OutDir) -> Result<Self, PlatformError> {
        Self::build_from(cfg, out, None, None)
    }

    /// Builds the systems of `cfg` that `dist` places on this process, for
    /// a run spread over processes ([`crate::distributed`]): links and
    /// switches are known whole; a capture is written by the process of
    /// the link's first system (of the switch's lowest system). A
    /// distributed run takes no checkpoint and serves no debugger.
    pub fn build_distributed(
        cfg: &mut Config,
        out: OutDir,
        dist: Dist,
    ) -> Result<Self, PlatformError> {
        if cfg.sim.gdb.is_some() {
            return Err(PlatformError::Setup(
                "sim.gdb: a distributed (MPI) run serves no debugger; run the config in one \
                 process to debug it"
                    .into(),
            ));
        }
        if let Some(t) = cfg.sim.checkpoint_at {
            return Err(PlatformError::Setup(format!(
                "sim.checkpoint_at = {} ticks: a distributed (MPI) run takes no checkpoint; \
                 take it with the config in one process",
                t.0
            )));
        }
        Self::build_from(cfg, out, None, Some(dist))
    }

    /// Builds every system of checkpoint `from` with its saved state;
    /// `cfg` is the checkpoint's configuration with the run's overrides.
    pub fn restore(
        cfg: &mut Config,
        out: OutDir,
        from: &Checkpoint,
    ) -> Result<Self, PlatformError> {
        Self::build_from(cfg, out, Some(from), None)
    }

    fn build_from(
        cfg: &mut Config,
        out: OutDir,
        from: Option<&Checkpoint>,
        dist: Option<Dist>,
    ) -> Result<Self, PlatformError> {
        let names = cfg.system_names();
        let n = cfg.system.len();
        let local = |i: usize| dist.as_ref().is_none_or(|d| d.is_local(i));
        let mut ends: Vec<Vec<LinkEnd>> = vec![Vec::new(); n];
        let mut peers: Vec<Vec<Peer>> = vec![Vec::new(); n];
        let mut link_stats = Stats::new();
        let mut links = Vec::new();
        let macs: Vec<Vec<(NicOwner, [u8; 6])>> = (0..n).map(|i| cfg.nics_of(i)).collect();
        for (i, l) in cfg.link.iter().enumerate() {
            let [a, b] = l.systems;
            let pa = ends[a].len() as u32;
            let pb = ends[b].len() as u32;
            let ethernet = l.kind == LinkKind::Ethernet;
            let nic = |sys: usize, end: usize| {
                let mac = macs[sys]
                    .iter()
                    .find(|m| m.0 == NicOwner::Link { link: i, end })
                    .map(|m| m.1)?;
                ethernet.then_some(NicEnd {
                    mac,
                    latency: l.latency.0,
                    bandwidth: l.bandwidth.map_or(DEFAULT_ETHERNET_BANDWIDTH, |b| b.0),
                })
            };
            ends[a].push(LinkEnd {
                port: pa,
                latency: l.latency.0,
                nic: nic(a, 0),
            });
            ends[b].push(LinkEnd {
                port: pb,
                latency: l.latency.0,
                nic: nic(b, 1),
            });
            peers[a].push(Peer::System {
                system: b,
                port: pb,
                link: i,
            });
            peers[b].push(Peer::System {
                system: a,
                port: pa,
                link: i,
            });
            let stats = if ethernet {
                let mut c = |what: &str, dir: &str, desc: &str, unit| {
                    link_stats.counter(&format!("link{i}.{what}{dir}"), desc, unit)
                };
                Some(LinkStats {
                    frames: [
                        c(
                            "frames",
                            "0to1",
                            "Frames carried from systems[0] to systems[1]",
                            "Count",
                        )?,
                        c(
                            "frames",
                            "1to0",
                            "Frames carried from systems[1] to systems[0]",
                            "Count",
                        )?,
                    ],
                    bytes: [
                        c(
                            "bytes",
                            "0to1",
                            "Bytes carried from systems[0] to systems[1]",
                            "Byte",
                        )?,
                        c(
                            "bytes",
                            "1to0",
                            "Bytes carried from systems[1] to systems[0]",
                            "Byte",
                        )?,
                    ],
                })
            } else {
                None
            };
            let capture = if l.pcap && local(l.systems[0]) {
                let path = out.file(&format!("link{i}.pcap"));
                let c = Capture::create(&path).map_err(|e| {
                    PlatformError::Setup(format!("link[{i}].pcap: {}: {e}", path.display()))
                })?;
                Some(Mutex::new((Some(c), Vec::new())))
            } else {
                None
            };
            links.push(LinkRun {
                systems: l.systems,
                stats,
                capture,
            });
        }
        let mut switches = Vec::new();
        for (i, sc) in cfg.switch.iter().enumerate() {
            let ports: Vec<_> = (0..sc.port.len()).map(|p| sc.resolved(p)).collect();
            let mut targets = Vec::with_capacity(ports.len());
            let mut captures = Vec::with_capacity(ports.len());
            // The switch lives with its lowest system (its home).
            let home_local = local(ports.iter().map(|p| p.system).min().unwrap_or(0));
            for (p, port) in ports.iter().enumerate() {
                let sys = port.system;
                let mac = macs[sys]
                    .iter()
                    .find(|m| m.0 == NicOwner::Switch { switch: i, port: p })
                    .map(|m| m.1)
                    .ok_or_else(|| {
                        PlatformError::Setup(format!("switch[{i}].port[{p}]: no NIC"))
                    })?;
                let sys_port = ends[sys].len() as u32;
                ends[sys].push(LinkEnd {
                    port: sys_port,
                    latency: port.latency,
                    nic: Some(NicEnd {
                        mac,
                        latency: port.latency,
                        bandwidth: port.bandwidth,
                    }),
                });
                peers[sys].push(Peer::Switch { switch: i, port: p });
                targets.push((sys, sys_port));
                captures.push(if port.pcap && home_local {
                    let path = out.file(&format!("{}.port{p}.pcap", sc.name));
                    let c = Capture::create(&path).map_err(|e| {
                        PlatformError::Setup(format!(
                            "switch[{i}].port[{p}].pcap: {}: {e}",
                            path.display()
                        ))
                    })?;
                    Some(c)
                } else {
                    None
                });
            }
            let switch = Switch::new(
                &sc.name,
                &ports,
                sc.ageing_time(),
                captures,
                &mut link_stats,
            )?;
            switches.push(SwitchRun {
                switch: Mutex::new(switch),
                home: targets.iter().map(|t| t.0).min().unwrap_or(0),
                targets,
                min_latency: sc.min_latency(),
            });
        }
        if let Some(c) = from {
            restore_network(&c.dir, &c.state.network, &mut link_stats, &switches)?;
        }
        let quantum = cfg.quantum();
        let sim = cfg.sim.clone();
        let mut systems = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for (i, sc) in cfg.system.iter_mut().enumerate() {
            if !local(i) {
                continue;
            }
            ids.push(i);
            // Set-up takes time (images, decompression, probes): Ctrl-C ends it.
            if crate::console::interrupted() {
                return Err(PlatformError::Interrupted);
            }
            let sys = match from {
                None => System::build_named(&names[i], sc, &sim, &ends[i], out.clone())?,
                Some(c) => {
                    let state = c.state.systems.get(i).filter(|s| s.name == names[i]);
                    let state = state.ok_or_else(|| {
                        PlatformError::Checkpoint(format!(
                            "{}: no saved state for system {}",
                            c.dir.display(),
                            names[i]
                        ))
                    })?;
                    let r = crate::system::Restore { dir: &c.dir, state };
                    System::build_restored(&names[i], sc, &sim, &ends[i], out.clone(), &r)?
                }
            };
            systems.push(sys);
        }
        let net_snapshot = NetSnapshot::default();
        if !cfg.link.is_empty() || !switches.is_empty() {
            *net_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = net_entries(&link_stats, 0);
            for s in &mut systems {
                s.attach_net_stats(net_snapshot.clone());
            }
        }
        let gdb = match &sim.gdb {
            Some(addr) => {
                let on = match sim.gdb_on_disconnect.as_deref() {
                    Some("exit") => crate::gdb::OnDisconnect::Exit,
                    _ => crate::gdb::OnDisconnect::Continue,
                };
                Some(crate::gdb::GdbListener::bind(addr, on)?)
            }
            None => None,
        };
        Ok(Simulation {
            names,
            systems,
            route: Route { peers },
            links,
            switches,
            link_stats,
            net_snapshot,
            quantum,
            stop_on_fault: sim.stop_on_fault,
            out,
            config: cfg.clone(),
            checkpoints: Vec::new(),
            gdb,
            ended: vec![None; n],
            ids,
            dist,
        })
    }

    /// Says so when the end of every window of `sim.quantum` costs a large
    /// part of the window's host time on this host (kvmsim doctor: "cost
    /// of a forced exit"): the run is then slow for a reason the user can
    /// change.
    fn warn_if_windows_dominate(&self) {
        // The window in host time: simulated time over the fastest
        // host_factor (simulated time per host time inside KVM).
        let factor = self
            .config
            .system
            .iter()
            .map(|s| s.cpu.resolved_host_factor())
            .fold(0.0f64, f64::max);
        let quantum_ns = self.quantum as f64 / sim::tick::TICKS_PER_NS as f64;
        if factor <= 0.0 || quantum_ns <= 0.0 {
            return;
        }
        // A window this long in host time would need a forced exit of a
        // millisecond to lose 10%: no probe (it costs about 75 ms here).
        if quantum_ns / factor >= LONG_WINDOW_NS {
            return;
        }
        let Some(cost) = kvm::probe::forced_exit_cost_cached() else {
            return;
        };
        let share = cost.loss_ns as f64 / (quantum_ns / factor);
        tracing::debug!(
            "window cost: {} ns per forced exit, quantum {quantum_ns} ns, host_factor {factor}: \
             {:.1}% of each window",
            cost.loss_ns,
            share * 100.0
        );
        if share > 0.1 {
            tracing::warn!(
                "sim.quantum {}: each window end costs about {:.0} us of host time on this host \
                 (kvmsim doctor: cost of a forced exit), {:.0}% of a window; a sim.quantum of {} \
                 or more (`kvmsim se --quantum`, or [sim] quantum in the config) keeps that \
                 near 5%, with CPUs and systems drifting further apart in simulated time",
                kvm::doctor::fmt_us(self.quantum / sim::tick::TICKS_PER_NS),
                cost.loss_ns as f64 / 1e3,
                share * 100.0,
                kvm::doctor::fmt_us((cost.loss_ns as f64 * 20.0 * factor) as u64)
            );
        }
    }

    /// The checkpoints this run took (their folders), in order.
    pub fn checkpoints(&self) -> &[std::path::PathBuf] {
        &self.checkpoints
    }

    /// Writes a checkpoint of every system (all drained) into
    /// OUTDIR/cpt.TICK; returns its folder.
    fn take_checkpoint(
        &mut self,
        into: Option<std::path::PathBuf>,
    ) -> Result<std::path::PathBuf, PlatformError> {
        let start = std::time::Instant::now();
        let tick = self.systems.iter().map(|s| s.cur_tick()).max().unwrap_or(0);
        if let Some(i) = self.systems.iter().position(System::has_ended) {
            return Err(PlatformError::Checkpoint(format!(
                "a checkpoint at tick {tick} was asked for, but {} has already ended: a \
                 checkpoint holds systems that still run (take it before any system ends)",
                self.names[i]
            )));
        }
        let dir = into.unwrap_or_else(|| self.out.file(&format!("cpt.{tick}")));
        ckpt::create_dir(&dir)?;
        let mut states = Vec::with_capacity(self.systems.len());
        let mut pages = 0;
        for (i, s) in self.systems.iter_mut().enumerate() {
            let (st, w) = s.save(&dir, i)?;
            pages += w.pages_written;
            states.push(st);
        }
        // The debugger belongs to this run, not to the machine: a restore
        // waits for none unless it asks (--gdb).
        let mut saved = self.config.clone();
        saved.sim.gdb = None;
        saved.sim.gdb_on_disconnect = None;
        saved.sim.gdb_system = None;
        let config = serde_json::to_value(&saved)
            .map_err(|e| PlatformError::Checkpoint(format!("saving the configuration: {e}")))?;
        let network = NetworkSaved {
            stats: self.link_stats.save(),
            switches: self
                .switches
                .iter()
                .map(|s| s.switch.lock().unwrap_or_else(|p| p.into_inner()).save())
                .collect(),
        };
        let network = serde_json::to_value(&network)
            .map_err(|e| PlatformError::Checkpoint(format!("saving the network: {e}")))?;
        let bytes = ckpt::write_state(
            &dir,
            &ckpt::CheckpointState {
                kvmsim_version: env!("CARGO_PKG_VERSION").into(),
                tick,
                config,
                systems: states,
                network,
            },
        )?;
        tracing::info!(
            "checkpoint at tick {tick} ({:.6} s simulated) written to {} ({} RAM pages, \
             state {} bytes, {:.0} ms)",
            sim::tick::ticks_to_seconds(tick),
            dir.display(),
            pages,
            bytes,
            start.elapsed().as_secs_f64() * 1e3
        );
        self.checkpoints.push(dir.clone());
        Ok(dir)
    }

    /// Checks, before anything is built or written, that every system's
    /// input files can be read: the kernel (unless built in) and the
    /// initrd are regular files within their limits (1 GiB; guest RAM).
    pub fn check_inputs(cfg: &Config) -> Result<(), PlatformError> {
        use crate::input::{check_file, Limit};
        for (s, name) in cfg.system.iter().zip(cfg.system_names()) {
            crate::disks::check(&name, s)?;
            if !s.kernel.starts_with("builtin:") {
                let what = if s.platform == "se" {
                    "program"
                } else {
                    "kernel"
                };
                check_file(&s.kernel, what, &Limit::kernel())?;
            }
            if let Some(i) = &s.initrd {
                for path in crate::multiboot::initrd_paths(i) {
                    check_file(&path, "initrd", &Limit::initrd(s.memory.0))?;
                }
            }
            if let Some(m) = &s.symbols {
                let limit = Limit {
                    bytes: crate::pc_events::MAX_SYSTEM_MAP,
                    why: "the limit for symbol files".into(),
                };
                check_file(m, "system.symbols file", &limit)?;
            }
        }
        Ok(())
    }

    /// The systems' names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The systems.
    pub fn systems_mut(&mut self) -> &mut [System] {
        &mut self.systems
    }

    /// Runs every system to its exit; returns one exit per system. With
    /// `sim.gdb`, under the debugger ([`crate::gdb::run`]).
    pub fn run(&mut self) -> Result<Vec<ExitEvent>, PlatformError> {
        if self.systems.len() > 1 || self.systems.iter().any(|s| s.cpu_count() > 1) {
            self.warn_if_windows_dominate();
        }
        if let Some(l) = self.gdb.take() {
            let r = crate::gdb::run(self, &l);
            self.gdb = Some(l);
            return r;
        }
        let r = self.run_free();
        let Some(dist) = &self.dist else {
            return r;
        };
        // Every process learns every system's exit (or the first error).
        let mine: Result<Vec<(usize, ExitEvent)>, String> = r
            .map(|e| self.ids.iter().copied().zip(e).collect())
            .map_err(|e| e.to_string());
        let all = dist.all_gather(&mine)?;
        let mut exits: Vec<Option<ExitEvent>> = vec![None; self.names.len()];
        for (rank, part) in all.into_iter().enumerate() {
            let part = part.map_err(|e| {
                PlatformError::Setup(format!("process (rank) {rank} of the run failed: {e}"))
            })?;
            for (i, e) in part {
                if let Some(slot) = exits.get_mut(i) {
                    *slot = Some(e);
                }
            }
        }
        exits
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                e.ok_or_else(|| {
                    PlatformError::Setup(format!(
                        "no process reported the exit of {}",
                        self.names[i]
                    ))
                })
            })
            .collect()
    }

    /// The distributed run this process is part of, if any.
    pub fn dist(&self) -> Option<&Dist> {
        self.dist.as_ref()
    }

    /// The names of the systems this process runs (all unless the run is
    /// distributed), in the order of [`Simulation::systems_mut`].
    pub fn local_names(&self) -> Vec<String> {
        self.ids.iter().map(|&i| self.names[i].clone()).collect()
    }

    /// Runs every system to its exit without a debugger.
    pub(crate) fn run_free(&mut self) -> Result<Vec<ExitEvent>, PlatformError> {
        loop {
            let end = if self.single() {
                match self.systems[0].run_until_checkpoint()? {
                    Some(exit) => RunEnd::Exits(vec![exit]),
                    None => RunEnd::Checkpoint,
                }
            } else {
                self.run_threads()?
            };
            match end {
                RunEnd::Exits(exits) => return Ok(exits),
                // No debugger: nothing stops for one.
                RunEnd::Debug => {}
                RunEnd::Checkpoint => {
                    if let Some(exits) = self.checkpoint_now(None, true)? {
                        return Ok(exits);
                    }
                }
            }
        }
    }

    /// One system of one CPU: it runs on the calling thread.
    fn single(&self) -> bool {
        self.dist.is_none() && self.systems.len() == 1 && self.systems[0].cpu_count() == 1
    }

    /// Every CPU of every system on a thread of its own, in windows.
    fn run_threads(&mut self) -> Result<RunEnd, PlatformError> {
        run_threads_on(
            &mut self.systems,
            &self.ids,
            self.quantum,
            self.stop_on_fault,
            Some(Net {
                route: &self.route,
                links: &self.links,
                switches: &self.switches,
                stats: &self.link_stats,
                snapshot: &self.net_snapshot,
            }),
            &mut self.ended,
            self.dist.as_ref(),
        )
    }

    /// Runs until the run ends (every system's exit), every system drained
    /// for a checkpoint, or a CPU stopped for the debugger (or was
    /// interrupted by it: [`crate::gdb::DebugHook`]). Held CPUs run
    /// nothing; with one system of one CPU it runs on this thread.
    pub(crate) fn run_debug(&mut self) -> Result<RunEnd, PlatformError> {
        if !self.single() {
            return self.run_threads();
        }
        let sys = &mut self.systems[0];
        Ok(match sys.run_window(None)? {
            Some(exit) => RunEnd::Exits(vec![exit]),
            None if sys.checkpoint_ready() => RunEnd::Checkpoint,
            None => RunEnd::Debug,
        })
    }

    /// Every system drained for a checkpoint: writes it (into `dir`, or
    /// OUTDIR/cpt.TICK) and resumes every system, or ends the run if
    /// `sim.checkpoint_exit` (and `may_exit`) says so (`Some`: the exits).
    /// A checkpoint that cannot hold the run (a system ended, SE mode) is
    /// declined with a warning and the run goes on.
    pub(crate) fn checkpoint_now(
        &mut self,
        dir: Option<std::path::PathBuf>,
        may_exit: bool,
    ) -> Result<Option<Vec<ExitEvent>>, PlatformError> {
        // A distributed run writes no checkpoint (each process would hold
        // part of it): every process declines it at the same window.
        if self.dist.is_some() {
            if crate::console::first_time("mpi-checkpoint") {
                tracing::warn!(
                    "a guest asked for a checkpoint, but a distributed (MPI) run takes none: \
                     none is taken and the run goes on (said once)"
                );
            }
            self.resume_all()?;
            return Ok(None);
        }
        // A checkpoint holds systems that still run: with one ended, none
        // is taken, and the run goes on.
        if let Some(i) = self.systems.iter().position(System::has_ended) {
            tracing::warn!(
                "checkpoint at tick {} not taken: {} has already ended (a checkpoint holds \
                 systems that still run); the run goes on",
                self.systems.iter().map(|s| s.cur_tick()).max().unwrap_or(0),
                self.names[i]
            );
            self.resume_all()?;
            return Ok(None);
        }
        // An SE-mode process (host files, its page tables) is not
        // checkpointable yet: the guest's checkpoint sim-op is declined
        // (the config refuses the other ways).
        if let Some(s) = self.config.system.iter().position(|s| s.platform == "se") {
            if crate::console::first_time("se-checkpoint") {
                tracing::warn!(
                    "{}: a checkpoint was asked for, but an SE-mode process cannot be \
                     checkpointed yet: none is taken (said once)",
                    self.names[s]
                );
            }
            self.resume_all()?;
            return Ok(None);
        }
        let dir = self.take_checkpoint(dir)?;
        if may_exit && self.config.sim.checkpoint_exit {
            return Ok(Some(
                self.systems
                    .iter()
                    .map(|s| {
                        ExitEvent::new(
                            ExitCause::Checkpoint,
                            0,
                            s.cur_tick(),
                            format!("checkpoint written to {}", dir.display()),
                        )
                    })
                    .collect(),
            ));
        }
        self.resume_all()?;
        Ok(None)
    }

    /// After a checkpoint: every system goes on.
    fn resume_all(&mut self) -> Result<(), PlatformError> {
        for s in &mut self.systems {
            s.resume_after_checkpoint()?;
        }
        Ok(())
    }

    /// Asks every system for a checkpoint now (each drains; the run stops
    /// when all have: [`Simulation::run_debug`] returns
    /// [`RunEnd::Checkpoint`]).
    pub(crate) fn request_checkpoint(&mut self) -> Result<(), PlatformError> {
        for s in self.systems.iter_mut().filter(|s| !s.has_ended()) {
            s.request_checkpoint()?;
        }
        Ok(())
    }

    /// The system the debugger serves (`sim.gdb_system`, default 0).
    pub(crate) fn gdb_system(&self) -> usize {
        self.config
            .sim
            .gdb_system
            .unwrap_or(0)
            .min(self.systems.len().saturating_sub(1))
    }

    /// System `i`.
    pub(crate) fn system_mut(&mut self, i: usize) -> &mut System {
        &mut self.systems[i]
    }

    /// The systems' exits kept while the run is stopped (a system that
    /// ended before a checkpoint or a debugger's stop), by system.
    pub(crate) fn ended(&self) -> &[Option<ExitEvent>] {
        &self.ended
    }

    /// The process status for `exits`: the first failing system's (earliest
    /// tick, then lowest index), or 0.
    pub fn status(exits: &[ExitEvent]) -> (i32, Option<usize>) {
        crate::report::status(exits)
    }

    /// Final statistics (one block with every system) and exit.json.
    pub fn finish(&mut self, exits: &[ExitEvent], status: i32) -> Result<(), PlatformError> {
        if let Some(dist) = self.dist.clone() {
            return self.finish_distributed(&dist, exits, status);
        }
        if self.systems.len() == 1 {
            return self.systems[0].finish(&exits[0], status);
        }
        let now = exits.iter().map(|e| e.tick).max().unwrap_or(0);
        // The run is over: the switches write what their captures hold.
        for s in &self.switches {
            s.switch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_captures(Tick::MAX);
        }
        let dumps = self.systems.iter().map(|s| s.stats_dump(now)).collect();
        let mut dump = Dump::combine(now, dumps);
        dump.entries.extend(net_entries(&self.link_stats, now));
        self.out.write_dump(&dump)?;
        let named: Vec<(String, ExitEvent)> = self
            .names
            .iter()
            .cloned()
            .zip(exits.iter().cloned())
            .collect();
        crate::report::write_exit_json(&self.out, &named, status)
    }
}

impl Simulation {
    /// [`Simulation::finish`] of a distributed run: each process sends
    /// its systems' final statistics and its count of the network's to
    /// process 0, which writes one merged block to stats.txt
    /// ([`crate::distributed::merge_final`]) and exit.json.
    fn finish_distributed(
        &mut self,
        dist: &Dist,
        exits: &[ExitEvent],
        status: i32,
    ) -> Result<(), PlatformError> {
        let now = exits.iter().map(|e| e.tick).max().unwrap_or(0);
        for s in &self.switches {
            s.switch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_captures(Tick::MAX);
        }
        let dumps: Vec<Dump> = self.systems.iter().map(|s| s.stats_dump(now)).collect();
        let net = net_entries(&self.link_stats, now);
        let part = FinalPart::new(self.ids.iter().copied().zip(dumps.iter()).collect(), &net);
        let parts = dist.all_gather(&part)?;
        if dist.rank() != 0 {
            return Ok(());
        }
        let dump = crate::distributed::merge_final(now, parts);
        self.out.write_dump(&dump)?;
        let named: Vec<(String, ExitEvent)> = self
            .names
            .iter()
            .cloned()
            .zip(exits.iter().cloned())
            .collect();
        crate::report::write_exit_json(&self.out, &named, status)
    }
}

/// What joins the systems of a run.
#[derive(Clone, Copy)]
pub(crate) struct Net<'a> {
    route: &'a Route,
    links: &'a [LinkRun],
    switches: &'a [SwitchRun],
    stats: &'a Stats,
    snapshot: &'a NetSnapshot,
}

/// The statistics of `stats` (links and switches) without the built-ins.
fn net_entries(stats: &Stats, now: Tick) -> Vec<sim::stats::DumpEntry> {
    stats
        .dump(now)
        .entries
        .into_iter()
        .filter(|e| !sim::stats::BUILTINS.contains(&e.name.as_str()))
        .collect()
}

/// Puts a checkpoint's network state back (links' and switches'
/// statistics, switches).
fn restore_network(
    dir: &std::path::Path,
    saved: &serde_json::Value,
    stats: &mut Stats,
    switches: &[SwitchRun],
) -> Result<(), PlatformError> {
    let file = dir.join(ckpt::STATE_FILE);
    let err = |m: String| PlatformError::Checkpoint(format!("{}: network: {m}", file.display()));
    if saved.is_null() {
        // A checkpoint of systems without links or switches.
        if switches.is_empty() {
            return Ok(());
        }
        return Err(err("missing, and the configuration has switches".into()));
    }
    let n: NetworkSaved = serde_json::from_value(saved.clone()).map_err(|e| err(e.to_string()))?;
    if n.switches.len() != switches.len() {
        return Err(err(format!(
            "{} switches saved, the configuration has {}",
            n.switches.len(),
            switches.len()
        )));
    }
    stats.restore(&n.stats).map_err(err)?;
    for (i, (s, sw)) in n.switches.iter().zip(switches).enumerate() {
        sw.switch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(s)
            .map_err(|e| err(format!("switches[{i}].{e}")))?;
    }
    Ok(())
}

/// What the threads of a run share.
struct Run<'a> {
    net: Option<Net<'a>>,
    /// The other processes of a distributed run.
    dist: Option<&'a Dist>,
    /// Messages for systems (and switches) of other processes, sent at the
    /// window's end.
    outbox: Outbox,
    /// Per switch: the tick by which it must be serviced next
    /// ([`Switch::next_activity`]), published by its home thread before
    /// the plan.
    switch_next: Vec<AtomicU64>,
    /// Frames were carried in this window (the statistics' snapshot is
    /// taken again).
    net_dirty: AtomicBool,
    quantum: Tick,
    stop_on_fault: bool,
    barrier: SpinBarrier,
    /// Link messages for each system, by the parity of the round (the
    /// count of windows run, not the window number: see [`run_windows`]).
    inboxes: Vec<[Mutex<Vec<Message>>; 2]>,
    /// Systems that have ended.
    done: AtomicUsize,
    stop: AtomicBool,
    /// Each system's end (first come, first kept).
    results: Vec<Mutex<Option<Result<ExitEvent, PlatformError>>>>,
    /// Each thread's (system, next activity tick or `u64::MAX` for none),
    /// published before the window's first barrier.
    next: Vec<(usize, AtomicU64)>,
    /// Per system, published by its CPU 0 thread before the first barrier:
    /// a checkpoint was asked for, and every CPU drained for it.
    ckpt_asked: Vec<AtomicBool>,
    ckpt_ready: Vec<AtomicBool>,
    /// The run stopped for a checkpoint.
    stopped_for_checkpoint: AtomicBool,
    /// A CPU stopped for the debugger in the window under way.
    debug_stop: AtomicBool,
    /// The run stopped for the debugger.
    stopped_for_debug: AtomicBool,
    /// The last round's decision ([`Run::decide`]).
    decision: Mutex<Decision>,
}

/// What every thread does after a window, decided once by the last thread
/// to reach the window's last barrier.
#[derive(Clone, Debug, Default)]
struct Decision {
    /// Per system: nothing is left that could ever wake it.
    halted: Vec<bool>,
    /// The window to run next.
    skip_to: u64,
    /// Every system ended, or one ended the whole run.
    finished: bool,
    /// Some system asked for a checkpoint.
    asked: bool,
    /// Every live system drained for it: the run stops for the checkpoint.
    checkpoint: bool,
    /// A CPU stopped for the debugger (crate::gdb): every thread leaves at
    /// this boundary (the stopped CPU mid-window, the others at its end or
    /// at their next consistent point, kicked by it), and simulated time
    /// stands still while GDB holds the machine.
    debug: bool,
}

impl Run<'_> {
    /// Puts `msg` into system `to`'s inbox, or sends it to the process that
    /// runs `to` (with `sent`, when a frame's first byte left, for the
    /// link's capture there).
    fn post(&self, to: usize, buf: usize, msg: Message, sent: Tick) {
        match self.dist {
            Some(d) if !d.is_local(to) => self.outbox.push(
                d.owner(to),
                &Wire::Inbox {
                    to,
                    at: msg.at,
                    src: msg.src,
                    seq: msg.seq,
                    port: msg.port,
                    data: msg.data,
                    sent,
                    frame: msg.frame,
                },
            ),
            _ => {
                if let Some(inbox) = self.inboxes.get(to) {
                    inbox[buf]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(msg);
                }
            }
        }
    }

    /// Sends the outbox to the other processes and takes in what they
    /// sent: messages into the inboxes (a frame into its link's capture
    /// if this process writes it), frames into the switches that live
    /// here. False (and the run stops) if what came does not decode.
    fn exchange(&self, dist: &Dist, buf: usize) -> bool {
        let got = match self.outbox.exchange(dist.transport()) {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("distributed run: {e}; the run stops");
                self.stop.store(true, Ordering::SeqCst);
                return false;
            }
        };
        for w in got.into_iter().flatten() {
            match w {
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
                    if !dist.is_local(to) {
                        continue;
                    }
                    if let (Some(f), Some(net)) = (&frame, self.net) {
                        let link = match net.route.peers.get(to).and_then(|p| p.get(port as usize))
                        {
                            Some(&Peer::System { link, .. }) => net.links.get(link),
                            _ => None,
                        };
                        if let Some(c) = link.and_then(|l| l.capture.as_ref()) {
                            c.lock().unwrap_or_else(|p| p.into_inner()).1.push((
                                sent,
                                src,
                                seq,
                                f.clone(),
                            ));
                        }
                    }
                    self.inboxes[to][buf]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Message {
                            at,
                            src,
                            seq,
                            port,
                            data,
                            frame,
                        });
                }
                Wire::Switch {
                    switch,
                    port,
                    order,
                    sent,
                    at,
                    frame,
                } => {
                    if let Some(sw) = self.net.and_then(|n| n.switches.get(switch)) {
                        sw.switch
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .post(port, order, sent, at, frame);
                    }
                }
            }
        }
        true
    }

    /// [`Run::decide`] across processes, by the last thread of this
    /// process to arrive: the window's messages are exchanged (a second
    /// time after the switches that live here are serviced, if the run
    /// has switches), then one sum gives every process the same view,
    /// from which each takes the same decision.
    fn decide_distributed(&self, window: u64, buf: usize, end: Tick) {
        let Some(dist) = self.dist else {
            return self.decide(window, buf, end);
        };
        let n = self.inboxes.len();
        let mut ok = self.exchange(dist, buf);
        if let Some(net) = self.net.filter(|n| !n.switches.is_empty()) {
            for (i, sw) in net.switches.iter().enumerate() {
                if dist.is_local(sw.home) {
                    service_switch(self, n + i, sw, &self.switch_next[i], buf, end);
                }
            }
            // Every process exchanges again, whatever happened before.
            let again = self.exchange(dist, buf);
            ok = ok && again;
        }
        // [next activity per system, per switch; ended; stop; asked; ready]:
        // each value comes from the one process that owns it, 0 from the
        // others.
        let switches = self.switch_next.len();
        let mut v = vec![0u64; n + switches + 4];
        let local_next = self.local_next(buf);
        for (i, x) in v.iter_mut().take(n).enumerate() {
            if dist.is_local(i) {
                *x = local_next[i];
            }
        }
        if let Some(net) = self.net {
            for (i, sw) in net.switches.iter().enumerate() {
                if dist.is_local(sw.home) {
                    v[n + i] = self.switch_next[i].load(Ordering::Acquire);
                }
            }
        }
        let base = n + switches;
        v[base] = self.done.load(Ordering::SeqCst) as u64;
        v[base + 1] = u64::from(self.stop.load(Ordering::SeqCst) || !ok);
        let locals = || (0..n).filter(|&i| dist.is_local(i));
        v[base + 2] = locals()
            .filter(|&i| self.ckpt_asked[i].load(Ordering::Acquire))
            .count() as u64;
        v[base + 3] = locals()
            .filter(|&i| self.ckpt_ready[i].load(Ordering::Acquire))
            .count() as u64;
        dist.transport().sum(&mut v);
        let switch_min = v[n..base].iter().copied().min().unwrap_or(Tick::MAX);
        let (halted, skip_to) = self.plan_with(v[..n].to_vec(), switch_min, window, end);
        let finished = v[base] as usize == n || v[base + 1] > 0;
        let asked = v[base + 2] > 0;
        let checkpoint = !finished && asked && v[base + 3] as usize == n;
        if let Some(net) = self.net {
            if self.net_dirty.swap(false, Ordering::Relaxed) {
                let entries = net_entries(net.stats, end);
                *net.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = entries;
            }
        }
        *self.decision.lock().unwrap_or_else(|p| p.into_inner()) = Decision {
            halted,
            skip_to,
            finished,
            asked,
            checkpoint,
            debug: false,
        };
    }

    /// The decision after window `window` (ending at `end`), taken by the
    /// last thread to arrive while all others wait: every thread has
    /// published its next activity, checkpoint state and messages.
    fn decide(&self, window: u64, buf: usize, end: Tick) {
        let (halted, skip_to) = self.plan(window, buf, end);
        let finished = self.done.load(Ordering::SeqCst) == self.inboxes.len()
            || self.stop.load(Ordering::SeqCst);
        let asked = self.ckpt_asked.iter().any(|a| a.load(Ordering::Acquire));
        // A checkpoint holds every system: once one asks, all drain, and the
        // run stops when every live one has.
        let checkpoint =
            !finished && asked && self.ckpt_ready.iter().all(|r| r.load(Ordering::Acquire));
        let debug = !finished && !checkpoint && self.debug_stop.load(Ordering::SeqCst);
        if let Some(net) = self.net {
            // Nothing changes the links' and switches' statistics until the
            // next window's posts: their snapshot for guest dumps.
            if self.net_dirty.swap(false, Ordering::Relaxed) {
                let entries = net_entries(net.stats, end);
                *net.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = entries;
            }
        }
        *self.decision.lock().unwrap_or_else(|p| p.into_inner()) = Decision {
            halted,
            skip_to,
            finished,
            asked,
            checkpoint,
            debug,
        };
    }

    /// After the first barrier of window `window` (ending at `end`), every
    /// thread computes the same two things from what all published: the
    /// systems with nothing left to do at all (no event in any of their
    /// queues, no link message on its way to them, and no link to a system
    /// that still runs: halted for good), and
    /// the window to run next: the one holding the earliest next activity
    /// of any live system (windows with nothing in them are skipped).
    fn plan(&self, window: u64, buf: usize, end: Tick) -> (Vec<bool>, u64) {
        let next = self.local_next(buf);
        // A frame inside a switch is due to be handled by then.
        let switches = self
            .switch_next
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .min()
            .unwrap_or(Tick::MAX);
        self.plan_with(next, switches, window, end)
    }

    /// Each system's next activity as this process sees it: its threads'
    /// next events and the link messages in its inbox (`Tick::MAX`: none).
    fn local_next(&self, buf: usize) -> Vec<Tick> {
        let n = self.inboxes.len();
        let mut next = vec![Tick::MAX; n];
        for (sys, t) in &self.next {
            next[*sys] = next[*sys].min(t.load(Ordering::Acquire));
        }
        for (i, inbox) in self.inboxes.iter().enumerate() {
            let msgs = inbox[buf].lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = msgs.iter().map(|m| m.at).min() {
                next[i] = next[i].min(at);
            }
        }
        next
    }

    /// [`Run::plan`] from every system's next activity and the switches'.
    fn plan_with(
        &self,
        next: Vec<Tick>,
        switches: Tick,
        window: u64,
        end: Tick,
    ) -> (Vec<bool>, u64) {
        let n = next.len();
        let earliest = next
            .iter()
            .copied()
            .min()
            .unwrap_or(Tick::MAX)
            .min(switches);
        // A system with nothing to do can still be woken by a link message
        // while a system it is linked to runs on.
        let linked = |i: usize| {
            self.net
                .and_then(|n| n.route.peers.get(i))
                .is_some_and(|p| !p.is_empty())
        };
        let halted: Vec<bool> = (0..n)
            .map(|i| next[i] == Tick::MAX && (earliest == Tick::MAX || !linked(i)))
            .collect();
        let skip_to = if earliest == Tick::MAX {
            window + 1
        } else {
            (earliest / self.quantum).max(window + 1)
        };
        debug_assert!(skip_to.saturating_mul(self.quantum) >= end);
        (halted, skip_to)
    }
}

/// Runs `systems` with one host thread per CPU, in lock-step windows of
/// `quantum`: every thread runs its CPU's queue (CPU 0's thread also the
/// system's) up to the window's end, then all meet at a barrier, where the
/// last to arrive decides for all whether and where to go on, and CPU 0's
/// threads exchange link messages.
/// Returns one exit per system.
pub(crate) fn run_threads(
    systems: &mut [System],
    quantum: Tick,
    stop_on_fault: bool,
    net: Option<Net<'_>>,
    ended: &mut [Option<ExitEvent>],
) -> Result<RunEnd, PlatformError> {
    let ids: Vec<usize> = (0..systems.len()).collect();
    run_threads_on(systems, &ids, quantum, stop_on_fault, net, ended, None)
}

/// [`run_threads`] for the systems of this process (`ids`: their numbers
/// among all of the run's; `ended` is by number), with the other
/// processes of a distributed run. Returns the exits of these systems.
fn run_threads_on(
    systems: &mut [System],
    ids: &[usize],
    quantum: Tick,
    stop_on_fault: bool,
    net: Option<Net<'_>>,
    ended: &mut [Option<ExitEvent>],
    dist: Option<&Dist>,
) -> Result<RunEnd, PlatformError> {
    let n = ended.len().max(systems.len());
    // A run resumed after a checkpoint (or restored from one) starts with
    // the window that holds the least far any system has come (a system
    // further on waits in the windows before its time).
    let mut start = systems.iter().map(|s| s.cur_tick()).min().unwrap_or(0) / quantum.max(1);
    if let Some(d) = dist {
        // Every process starts with the same window.
        start = d.all_gather(&start)?.into_iter().min().unwrap_or(start);
    }
    let threads: usize = systems.iter().map(|s| s.cpu_count()).sum();
    let next = systems
        .iter()
        .zip(ids)
        .flat_map(|(s, &i)| (0..s.cpu_count()).map(move |_| (i, AtomicU64::new(0))))
        .collect();
    let switches = net.map_or(0, |n| n.switches.len());
    let run = Run {
        net,
        dist,
        outbox: Outbox::new(dist.map_or(0, Dist::size)),
        switch_next: (0..switches)
            .map(|i| {
                let next = net
                    .and_then(|n| n.switches.get(i))
                    .and_then(|s| {
                        s.switch
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .next_activity()
                    })
                    .unwrap_or(Tick::MAX);
                AtomicU64::new(next)
            })
            .collect(),
        net_dirty: AtomicBool::new(false),
        quantum: quantum.max(1),
        stop_on_fault,
        barrier: SpinBarrier::new(threads),
        inboxes: (0..n).map(|_| Default::default()).collect(),
        // Systems that ended before a checkpoint stay ended, with their exit.
        done: AtomicUsize::new(ended.iter().filter(|e| e.is_some()).count()),
        stop: AtomicBool::new(false),
        results: (0..n)
            .map(|i| Mutex::new(ended.get_mut(i).and_then(Option::take).map(Ok)))
            .collect(),
        next,
        ckpt_asked: (0..n).map(|_| AtomicBool::new(false)).collect(),
        ckpt_ready: (0..n).map(|_| AtomicBool::new(false)).collect(),
        stopped_for_checkpoint: AtomicBool::new(false),
        debug_stop: AtomicBool::new(false),
        stopped_for_debug: AtomicBool::new(false),
        decision: Mutex::new(Decision::default()),
    };
    let mut slot = 0;
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (sys, &i) in systems.iter_mut().zip(ids) {
            for t in sys.threads() {
                let run = &run;
                let name = format!("kvmsim-{}-cpu{}", t.system_name(), t.index());
                let me = slot;
                slot += 1;
                handles.push(
                    std::thread::Builder::new()
                        .name(name.clone())
                        .spawn_scoped(scope, move || {
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                run_windows(i, me, t, run, start)
                            }));
                            if let Err(payload) = r {
                                thread_panicked(run, i, &name, &*payload);
                            }
                        })
                        .expect("spawning a CPU thread"),
                );
            }
        }
        for h in handles {
            if h.join().is_err() {
                run.stop.store(true, Ordering::SeqCst);
            }
        }
    });
    let debug = run.stopped_for_debug.load(Ordering::SeqCst);
    if run.stopped_for_checkpoint.load(Ordering::SeqCst) || debug {
        // Kept for the run that goes on after the checkpoint (or the
        // debugger's stop).
        for (i, slot) in ended.iter_mut().enumerate().take(n) {
            if let Some(Ok(e)) = run.results[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                *slot = Some(e);
            }
        }
        if debug && !run.stopped_for_checkpoint.load(Ordering::SeqCst) {
            // New threads run the CPUs next: each binds its run timer again.
            for s in systems.iter_mut() {
                s.startup_threads()?;
            }
            return Ok(RunEnd::Debug);
        }
        return Ok(RunEnd::Checkpoint);
    }
    let mut exits = Vec::with_capacity(n);
    for (sys, &i) in systems.iter().zip(ids) {
        let r = run.results[i]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        exits.push(match r {
            Some(r) => r?,
            None => ExitEvent::new(
                if crate::console::interrupted() {
                    ExitCause::UserInterrupt
                } else {
                    ExitCause::Stopped
                },
                0,
                sys.cur_tick(),
                "stopped because another system ended the run",
            ),
        });
    }
    Ok(RunEnd::Exits(exits))
}

/// Services switch `sw` (sender number `src` in the receivers' inboxes)
/// after window `window` (ending at `end`): every frame that reaches it
/// before `end + min_latency` is handled (no frame sent later can reach it
/// earlier), and what leaves goes to the receivers' inboxes; then its next
/// activity is published for the plan.
fn service_switch(
    run: &Run<'_>,
    src: usize,
    sw: &SwitchRun,
    next: &AtomicU64,
    buf: usize,
    end: Tick,
) {
    let mut s = sw.switch.lock().unwrap_or_else(|p| p.into_inner());
    let out = s.service(end.saturating_add(sw.min_latency), end);
    if !out.is_empty() {
        run.net_dirty.store(true, Ordering::Relaxed);
    }
    for e in out {
        let Some(&(system, port)) = sw.targets.get(e.port) else {
            continue;
        };
        run.post(
            system,
            buf,
            Message {
                at: e.at,
                src,
                seq: e.seq,
                port,
                data: 0,
                frame: Some(e.frame),
            },
            0,
        );
    }
    next.store(s.next_activity().unwrap_or(Tick::MAX), Ordering::Release);
}

/// The body of the thread of CPU `t` of system `me` (thread number
/// `slot` of the run).
/// A CPU thread panicked (a bug in kvmsim): its system ends with an error
/// naming the thread, and the barrier is abandoned so that the other
/// threads stop at their next window end instead of waiting for it
/// forever; their systems end as stopped, and the run's output is written
/// as for any error. The other processes of a distributed run wait for
/// this one at every window: they are ended at once (MPI_Abort).
fn thread_panicked(
    run: &Run<'_>,
    system: usize,
    thread: &str,
    payload: &(dyn std::any::Any + Send),
) {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    tracing::error!("{thread}: kvmsim's thread panicked ({what}); the run stops");
    *run.results[system]
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(Err(PlatformError::Setup(format!(
        "kvmsim's thread {thread} panicked: {what} (a bug in kvmsim: please report it with \
             the run's config)"
    ))));
    run.stop.store(true, Ordering::SeqCst);
    run.barrier.abandon();
    if let Some(d) = run.dist {
        tracing::error!(
            "{thread}: the other {} process(es) of this distributed run wait for this one: \
             ending them all",
            d.size().saturating_sub(1)
        );
        d.abort(crate::status::SIM_ERROR);
    }
}

fn run_windows(me: usize, slot: usize, mut t: CpuThread<'_>, run: &Run<'_>, start: u64) {
    let n = run.inboxes.len();
    let lead = t.index() == 0;
    let mut seq = 0u64;
    let mut window: u64 = start;
    // The inbox buffer of this round: rounds alternate, whatever windows
    // the plan skips. (By window parity, a skip of an even number of
    // windows would hand a fast sender of the next round the buffer a slow
    // receiver is still taking this round's messages from: they would be
    // scheduled a round early, in an order that depends on the threads.)
    let mut buf = 0usize;
    let finish = |r: Result<ExitEvent, PlatformError>, t: &CpuThread<'_>| {
        if t.mark_exited() {
            let stop = match &r {
                Ok(e) => {
                    let fatal = !matches!(
                        e.cause,
                        ExitCause::GuestExit | ExitCause::MaxTick | ExitCause::PcEvent
                    ) || (e.cause == ExitCause::GuestExit && e.code != 0);
                    e.cause == ExitCause::UserInterrupt || (run.stop_on_fault && fatal)
                }
                Err(_) => true,
            };
            *run.results[me].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            if stop {
                run.stop.store(true, Ordering::SeqCst);
            }
            run.done.fetch_add(1, Ordering::SeqCst);
        }
    };
    loop {
        let end = (window + 1).saturating_mul(run.quantum);
        if !t.system_exited() {
            // A CPU the debugger holds runs nothing (crate::gdb).
            if !t.debug_held() {
                match t.run_window(Some(end)) {
                    Ok(Some(e)) => finish(Ok(e), &t),
                    Ok(None) => {}
                    Err(e) => finish(Err(e), &t),
                }
                if t.debug_stopped() {
                    run.debug_stop.store(true, Ordering::SeqCst);
                }
            }
            if lead {
                for o in t.take_outgoing() {
                    let Some(&Peer::System { system, port, .. }) = run
                        .net
                        .and_then(|n| n.route.peers.get(me))
                        .and_then(|p| p.get(o.port as usize))
                    else {
                        continue;
                    };
                    let msg = Message {
                        at: o.at,
                        src: me,
                        seq,
                        port,
                        data: o.data,
                        frame: None,
                    };
                    seq += 1;
                    run.post(system, buf, msg, 0);
                }
                for (port, f) in t.take_frames() {
                    let Some(net) = run.net else {
                        continue;
                    };
                    let Some(&peer) = net.route.peers.get(me).and_then(|p| p.get(port as usize))
                    else {
                        continue;
                    };
                    run.net_dirty.store(true, Ordering::Relaxed);
                    let (peer, peer_port, link) = match peer {
                        Peer::System { system, port, link } => (system, port, link),
                        Peer::Switch { switch, port } => {
                            match (net.switches.get(switch), run.dist) {
                                (Some(sw), Some(d)) if !d.is_local(sw.home) => run.outbox.push(
                                    d.owner(sw.home),
                                    &Wire::Switch {
                                        switch,
                                        port,
                                        order: seq,
                                        sent: f.sent,
                                        at: f.at,
                                        frame: f.data,
                                    },
                                ),
                                (Some(sw), _) => sw
                                    .switch
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .post(port, seq, f.sent, f.at, f.data),
                                (None, _) => {}
                            }
                            seq += 1;
                            continue;
                        }
                    };
                    if let Some(link) = net.links.get(link) {
                        let dir = usize::from(link.systems[0] != me);
                        if let Some(s) = &link.stats {
                            s.frames[dir].inc();
                            s.bytes[dir].add(f.data.len() as u64);
                        }
                        if let Some(c) = &link.capture {
                            c.lock().unwrap_or_else(|p| p.into_inner()).1.push((
                                f.sent,
                                me,
                                seq,
                                f.data.clone(),
                            ));
                        }
                    }
                    let msg = Message {
                        at: f.at,
                        src: me,
                        seq,
                        port: peer_port,
                        data: 0,
                        frame: Some(f.data),
                    };
                    seq += 1;
                    run.post(peer, buf, msg, f.sent);
                }
            }
        }
        let next = if t.system_exited() {
            None
        } else {
            t.next_activity()
        };
        run.next[slot]
            .1
            .store(next.unwrap_or(Tick::MAX), Ordering::Release);
        if lead {
            let live = !t.system_exited();
            run.ckpt_asked[me].store(live && t.checkpoint_pending(), Ordering::Release);
            run.ckpt_ready[me].store(!live || t.checkpoint_ready(), Ordering::Release);
        }
        // Fault injection (tests/failpoints.rs): a panic in the second
        // thread of the run, as a bug would raise one.
        fail::fail_point!("cpu-thread-window-end", slot == 1, |_| {});
        // Everyone has finished window `window` and posted its messages.
        // The last thread to arrive at the window's last barrier takes the
        // round's decision for all; nobody changes what it reads before
        // every thread has arrived at the next round's barrier, so one
        // barrier per window is enough (two with switches, which are
        // serviced once every frame of the window is in them).
        let waiting = std::time::Instant::now();
        let decide = || run.decide(window, buf, end);
        match run.net.filter(|n| !n.switches.is_empty()) {
            // Across processes, the last thread here exchanges the
            // window with the other processes (switches included) and
            // decides: one barrier.
            _ if run.dist.is_some() => {
                run.barrier
                    .wait_then(|| run.decide_distributed(window, buf, end));
            }
            Some(net) => {
                run.barrier.wait();
                if lead {
                    for (i, sw) in net.switches.iter().enumerate().filter(|s| s.1.home == me) {
                        service_switch(run, n + i, sw, &run.switch_next[i], buf, end);
                    }
                }
                run.barrier.wait_then(decide);
            }
            None => {
                run.barrier.wait_then(decide);
            }
        }
        t.count_window(waiting.elapsed());
        if run.barrier.is_broken() {
            // Another thread panicked (`thread_panicked`): nothing is decided.
            break;
        }
        let Decision {
            halted,
            skip_to,
            finished,
            asked,
            checkpoint,
            debug,
        } = run
            .decision
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(net) = run.net {
            // Every frame of the window is posted: the lead thread of each
            // link's first system writes its capture (frames of the next
            // window, which faster threads may post meanwhile, wait for
            // the next round).
            if lead {
                for l in net.links.iter().filter(|l| l.systems[0] == me) {
                    l.flush_capture(end);
                }
            }
        }
        if finished {
            break;
        }
        if asked && !checkpoint && lead && !t.system_exited() {
            if let Err(e) = t.request_checkpoint() {
                finish(Err(e), &t);
            }
        }
        // A system drained for a checkpoint has no CPU tick scheduled
        // until it resumes: it waits for the checkpoint, it has not halted.
        if lead && halted[me] && !t.system_exited() && !t.checkpoint_pending() {
            // Counted at the next window's barrier, like any other end.
            let at = t.cur_tick();
            finish(
                Ok(ExitEvent::new(
                    ExitCause::GuestHalted,
                    0,
                    at,
                    "every CPU halted or waits for a startup IPI, and no event is left that \
                     could wake one",
                )),
                &t,
            );
        }
        if lead {
            let mut msgs = std::mem::take(
                &mut *run.inboxes[me][buf]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if !t.system_exited() {
                msgs.sort();
                for m in msgs {
                    // The lookahead: nothing sent in window k may arrive in it.
                    let r = if m.at < end {
                        Err(PlatformError::Setup(format!(
                            "{}: a link message from system {} arrives at tick {} inside the \
                             window it was sent in (ending at {end}): link latency below \
                             sim.quantum",
                            t.system_name(),
                            m.src,
                            m.at
                        )))
                    } else if let Some(f) = m.frame {
                        t.schedule_frame(m.port, m.at, f)
                    } else {
                        t.schedule_delivery(m.port, m.at, m.data)
                    };
                    if let Err(e) = r {
                        finish(Err(e), &t);
                        run.stop.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            }
        }
        if checkpoint {
            // The window's link messages are in the systems' queues now:
            // the checkpoint holds them.
            if slot == 0 {
                run.stopped_for_checkpoint.store(true, Ordering::SeqCst);
            }
            break;
        }
        if debug {
            if slot == 0 {
                run.stopped_for_debug.store(true, Ordering::SeqCst);
            }
            break;
        }
        window = skip_to;
        buf ^= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with<'a>(next: &[(usize, Tick)], systems: usize, quantum: Tick) -> Run<'a> {
        Run {
            net: None,
            dist: None,
            outbox: Outbox::new(0),
            switch_next: Vec::new(),
            net_dirty: AtomicBool::new(false),
            quantum,
            stop_on_fault: false,
            barrier: SpinBarrier::new(1),
            inboxes: (0..systems).map(|_| Default::default()).collect(),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            results: (0..systems).map(|_| Mutex::new(None)).collect(),
            next: next.iter().map(|&(s, t)| (s, AtomicU64::new(t))).collect(),
            ckpt_asked: (0..systems).map(|_| AtomicBool::new(false)).collect(),
            ckpt_ready: (0..systems).map(|_| AtomicBool::new(false)).collect(),
            stopped_for_checkpoint: AtomicBool::new(false),
            debug_stop: AtomicBool::new(false),
            stopped_for_debug: AtomicBool::new(false),
            decision: Mutex::new(Decision::default()),
        }
    }

    #[test]
    fn plans_skip_empty_windows_and_find_halted_systems() {
        let q = 10;
        // System 0: CPU 0 has something at tick 95, CPU 1 nothing; system
        // 1: nothing at all.
        let run = run_with(&[(0, 95), (0, Tick::MAX), (1, Tick::MAX)], 2, q);
        let (halted, skip_to) = run.plan(2, 0, 30);
        assert_eq!(halted, vec![false, true]);
        assert_eq!(skip_to, 9, "the window holding tick 95");
        // Something due in the next window: no skipping.
        let run = run_with(&[(0, 31)], 1, q);
        assert_eq!(run.plan(2, 0, 30), (vec![false], 3));
        // A link message on its way keeps a system alive and bounds the skip.
        let run = run_with(&[(0, 500), (1, Tick::MAX)], 2, q);
        run.inboxes[1][0].lock().unwrap().push(Message {
            at: 70,
            src: 0,
            seq: 0,
            port: 0,
            data: 1,
            frame: None,
        });
        assert_eq!(run.plan(2, 0, 30), (vec![false, false], 7));
        // A system with nothing to do that is linked to one that runs waits.
        let route = Route {
            peers: vec![
                vec![Peer::System {
                    system: 1,
                    port: 0,
                    link: 0,
                }],
                vec![Peer::System {
                    system: 0,
                    port: 0,
                    link: 0,
                }],
            ],
        };
        let stats = Stats::new();
        let snapshot = NetSnapshot::default();
        let net = Net {
            route: &route,
            links: &[],
            switches: &[],
            stats: &stats,
            snapshot: &snapshot,
        };
        let mut run = run_with(&[(0, 500), (1, Tick::MAX)], 2, q);
        run.net = Some(net);
        assert_eq!(run.plan(2, 0, 30), (vec![false, false], 50));
        let mut run = run_with(&[(0, Tick::MAX), (1, Tick::MAX)], 2, q);
        run.net = Some(net);
        assert_eq!(run.plan(2, 0, 30).0, vec![true, true]);
        // A frame waiting inside a switch keeps its systems alive and bounds
        // the skip like any activity.
        let mut run = run_with(&[(0, Tick::MAX), (1, Tick::MAX)], 2, q);
        run.net = Some(net);
        run.switch_next = vec![AtomicU64::new(75), AtomicU64::new(Tick::MAX)];
        assert_eq!(run.plan(2, 0, 30), (vec![false, false], 7));
        // Nothing anywhere: every system has halted; the next window is next.
        let run = run_with(&[(0, Tick::MAX)], 1, q);
        assert_eq!(run.plan(4, 0, 50), (vec![true], 5));
    }
}
