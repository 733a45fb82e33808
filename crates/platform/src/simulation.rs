//! A simulation: one or more systems, each with its own event queue.
//!
//! One system runs on the calling thread exactly as [`System::run`] does.
//! Several systems run on one host thread each, in lock-step windows of
//! `sim.quantum` simulated time separated by barriers. A value sent on a
//! link during window k arrives at send time + latency, which the config
//! guarantees to be at or after the start of window k+1 (latency >= quantum:
//! the quantum is the lookahead). At the barrier every system posts what it
//! sent into the receivers' inboxes (double-buffered by window parity); after
//! it, each system takes its inbox, sorts it by (arrival tick, sender,
//! sequence) and schedules the arrivals: the same messages always arrive in
//! the same order, whatever the host threads did.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};

use sim::stats::Dump;
use sim::{ExitCause, ExitEvent, Tick};

use crate::config::Config;
use crate::output::OutDir;
use crate::system::{LinkEnd, System};
use crate::PlatformError;

/// A value in flight between systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Message {
    at: Tick,
    src: usize,
    seq: u64,
    port: u32,
    data: u64,
}

/// Where each (system, port) of a link leads.
#[derive(Debug, Clone)]
struct Route {
    /// `peers[system][port]` = (peer system, peer port).
    peers: Vec<Vec<(usize, u32)>>,
}

/// Systems, links and the quantum.
pub struct Simulation {
    names: Vec<String>,
    systems: Vec<System>,
    route: Route,
    quantum: Tick,
    stop_on_fault: bool,
    out: OutDir,
}

impl Simulation {
    /// Builds every system of `cfg` (filling in host-dependent defaults).
    pub fn build(cfg: &mut Config, out: OutDir) -> Result<Self, PlatformError> {
        let names = cfg.system_names();
        let n = cfg.system.len();
        let mut ends: Vec<Vec<LinkEnd>> = vec![Vec::new(); n];
        let mut peers: Vec<Vec<(usize, u32)>> = vec![Vec::new(); n];
        for l in &cfg.link {
            let [a, b] = l.systems;
            let pa = ends[a].len() as u32;
            let pb = ends[b].len() as u32;
            ends[a].push(LinkEnd {
                port: pa,
                latency: l.latency.0,
            });
            ends[b].push(LinkEnd {
                port: pb,
                latency: l.latency.0,
            });
            peers[a].push((b, pb));
            peers[b].push((a, pa));
        }
        let quantum = cfg.quantum();
        let sim = cfg.sim.clone();
        let mut systems = Vec::with_capacity(n);
        for (i, sc) in cfg.system.iter_mut().enumerate() {
            // Set-up takes time (images, decompression, probes): Ctrl-C ends it.
            if crate::console::interrupted() {
                return Err(PlatformError::Interrupted);
            }
            systems.push(System::build_named(
                &names[i],
                sc,
                &sim,
                &ends[i],
                out.clone(),
            )?);
        }
        Ok(Simulation {
            names,
            systems,
            route: Route { peers },
            quantum,
            stop_on_fault: sim.stop_on_fault,
            out,
        })
    }

    /// Checks, before anything is built or written, that every system's
    /// input files can be read: the kernel (unless built in) and the
    /// initrd are regular files within their limits (1 GiB; guest RAM).
    pub fn check_inputs(cfg: &Config) -> Result<(), PlatformError> {
        use crate::input::{check_file, Limit};
        for s in &cfg.system {
            if !s.kernel.starts_with("builtin:") {
                check_file(&s.kernel, "kernel", &Limit::kernel())?;
            }
            if let Some(i) = &s.initrd {
                check_file(i, "initrd", &Limit::initrd(s.memory.0))?;
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

    /// Runs every system to its exit; returns one exit per system.
    pub fn run(&mut self) -> Result<Vec<ExitEvent>, PlatformError> {
        if self.systems.len() == 1 {
            return Ok(vec![self.systems[0].run()?]);
        }
        let n = self.systems.len();
        let barrier = Barrier::new(n);
        let inboxes: Vec<[Mutex<Vec<Message>>; 2]> = (0..n).map(|_| Default::default()).collect();
        let done = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let quantum = self.quantum;
        let stop_on_fault = self.stop_on_fault;
        let route = &self.route;
        let results: Vec<Result<ExitEvent, PlatformError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .systems
                .iter_mut()
                .enumerate()
                .map(|(i, sys)| {
                    let (barrier, inboxes, done, stop) = (&barrier, &inboxes, &done, &stop);
                    std::thread::Builder::new()
                        .name(format!("kvmsim-{}", sys.name()))
                        .spawn_scoped(scope, move || {
                            run_windows(
                                i,
                                sys,
                                route,
                                quantum,
                                stop_on_fault,
                                barrier,
                                inboxes,
                                done,
                                stop,
                            )
                        })
                        .expect("spawning a system thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(PlatformError::Setup("a system thread panicked".into()))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// The process status for `exits`: the first failing system's (earliest
    /// tick, then lowest index), or 0.
    pub fn status(exits: &[ExitEvent]) -> (i32, Option<usize>) {
        crate::report::status(exits)
    }

    /// Final statistics (one block with every system) and exit.json.
    pub fn finish(&mut self, exits: &[ExitEvent], status: i32) -> Result<(), PlatformError> {
        if self.systems.len() == 1 {
            return self.systems[0].finish(&exits[0], status);
        }
        let now = exits.iter().map(|e| e.tick).max().unwrap_or(0);
        let dumps = self.systems.iter().map(|s| s.stats_dump(now)).collect();
        self.out.write_dump(&Dump::combine(now, dumps))?;
        let named: Vec<(String, ExitEvent)> = self
            .names
            .iter()
            .cloned()
            .zip(exits.iter().cloned())
            .collect();
        crate::report::write_exit_json(&self.out, &named, status)
    }
}

/// The thread body of one system in a multi-system run.
#[allow(clippy::too_many_arguments)]
fn run_windows(
    me: usize,
    sys: &mut System,
    route: &Route,
    quantum: Tick,
    stop_on_fault: bool,
    barrier: &Barrier,
    inboxes: &[[Mutex<Vec<Message>>; 2]],
    done: &AtomicUsize,
    stop: &AtomicBool,
) -> Result<ExitEvent, PlatformError> {
    let n = inboxes.len();
    let mut exit: Option<ExitEvent> = None;
    let mut error: Option<PlatformError> = None;
    let mut seq = 0u64;
    let mut window: u64 = 0;
    loop {
        let end = (window + 1).saturating_mul(quantum);
        if exit.is_none() && error.is_none() {
            match sys.run_window(Some(end)) {
                Ok(Some(e)) => {
                    let fatal = !matches!(e.cause, ExitCause::GuestExit | ExitCause::MaxTick)
                        || (e.cause == ExitCause::GuestExit && e.code != 0);
                    if e.cause == ExitCause::UserInterrupt || (stop_on_fault && fatal) {
                        stop.store(true, Ordering::SeqCst);
                    }
                    exit = Some(e);
                    done.fetch_add(1, Ordering::SeqCst);
                }
                Ok(None) => {}
                Err(e) => {
                    error = Some(e);
                    stop.store(true, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
            for o in sys.take_outgoing() {
                if let Some(&(peer, port)) = route.peers[me].get(o.port as usize) {
                    let msg = Message {
                        at: o.at,
                        src: me,
                        seq,
                        port,
                        data: o.data,
                    };
                    seq += 1;
                    inboxes[peer][(window % 2) as usize]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(msg);
                }
            }
        }
        // Everyone has finished window `window` and posted its messages.
        barrier.wait();
        let finished = done.load(Ordering::SeqCst) == n || stop.load(Ordering::SeqCst);
        // Everyone has read the decision before anyone changes it.
        barrier.wait();
        if finished {
            break;
        }
        let mut msgs = std::mem::take(
            &mut *inboxes[me][(window % 2) as usize]
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if exit.is_none() && error.is_none() {
            msgs.sort();
            for m in msgs {
                // The lookahead: nothing sent in window k may arrive in it.
                let next = end;
                let r = if m.at < next {
                    Err(PlatformError::Setup(format!(
                        "{}: a link message from system {} arrives at tick {} inside the window it \
                         was sent in (ending at {next}): link latency below sim.quantum",
                        sys.name(),
                        m.src,
                        m.at
                    )))
                } else {
                    sys.schedule_delivery(m.port, m.at, m.data)
                };
                if let Err(e) = r {
                    error = Some(e);
                    stop.store(true, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    break;
                }
            }
        }
        window += 1;
    }
    if let Some(e) = error {
        return Err(e);
    }
    Ok(exit.unwrap_or_else(|| {
        ExitEvent::new(
            if crate::console::interrupted() {
                ExitCause::UserInterrupt
            } else {
                ExitCause::Stopped
            },
            0,
            sys.cur_tick(),
            "stopped because another system ended the run",
        )
    }))
}
