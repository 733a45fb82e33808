//! `kvmsim bench`: kvmsim's overheads, each measured side by side with a
//! reference in one run, and written to `bench.json`.
//!
//! | figure | kvmsim side | reference side |
//! |---|---|---|
//! | compute | the `compute` guest's ring-3 loop, whole run | the same machine code natively |
//! | pio | `pioloop`: port reads at CPL0, per read | the same guest in a bare KVM loop |
//! | mmio | `mmioloop`: MMIO reads at CPL0, per read | the same guest in a bare KVM loop |
//! | kick | `kick`: what a forced exit with an interrupt costs beyond its timer period | the same guest in a bare KVM loop |
//! | parallel | aggregate throughput of 2 `compute` systems | 1 system |
//! | smp | aggregate throughput of `smpboot`'s ring-3 loop on 2 CPUs of one system | 1 CPU |
//! | window | the barrier two CPU threads meet at per window (`sim::barrier::SpinBarrier`), per window | `std::sync::Barrier` |
//! | se-compute | `se_bench N` (the compute loop in a static Linux program) in SE mode, from its first instruction to its exit (the VM built beforehand) | the same file run natively (spawn to exit) |
//! | se-syscall | `se_bench N s` (getppid N times) in SE mode, per call | getppid from kvmsim's own process, per call |
//!
//! kvmsim runs each guest as `kvmsim run` does (`platform::Simulation`);
//! the bare loops are `kvm::bare` (the same VM set-up, the exits serviced
//! with a constant). Building a VM is outside every timing. The two sides
//! alternate (A B A B ...), `runs` times each, and each side's best run is
//! reported, so that a busy host slows both alike; a goal that is missed is
//! reported, never an error.

use std::path::Path;
use std::time::{Duration, Instant};

use platform::{Config, OutDir, Simulation};

/// Work of each figure at scale 1.
const COMPUTE_ITERATIONS: u64 = 1_000_000_000;
const PIO_READS: u64 = 20_000;
const MMIO_READS: u64 = 20_000;
const KICK_EXITS: u64 = 2_000;
const KICK_PERIOD_US: u64 = 100;
const PARALLEL_ITERATIONS: u64 = 1_000_000_000;
const WINDOWS: u64 = 20_000;
const SMP_ITERATIONS: u64 = 1_000_000_000;
const SE_COMPUTE_ITERATIONS: u64 = 1_000_000_000;
const SE_SYSCALLS: u64 = 20_000;
/// The default quantum of the SMP figure: 1 ms, or, where a window end
/// costs more (kvmsim doctor: "cost of a forced exit"), 100 times that
/// cost, so that forced exits take about 1% of a window as they do at
/// 1 ms on a host with VMX or SVM (a few microseconds each). The figure
/// measures what several CPUs cost kvmsim (windows, barriers, devices
/// shared), not the host's exit; `--quantum` measures any other.
pub fn smp_default_quantum() -> u64 {
    let loss = kvm::probe::forced_exit_cost_cached().map_or(0, |c| c.loss_ns);
    loss.saturating_mul(100).max(1_000_000)
}

/// Which way a figure's values are better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// One figure of the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Figure {
    Compute,
    Pio,
    Mmio,
    Kick,
    Parallel,
    Smp,
    Window,
    SeCompute,
    SeSyscall,
}

impl Figure {
    pub const ALL: [Figure; 9] = [
        Figure::Compute,
        Figure::Pio,
        Figure::Mmio,
        Figure::Kick,
        Figure::Parallel,
        Figure::Smp,
        Figure::Window,
        Figure::SeCompute,
        Figure::SeSyscall,
    ];

    fn key(self) -> &'static str {
        match self {
            Figure::Compute => "compute",
            Figure::Pio => "pio",
            Figure::Mmio => "mmio",
            Figure::Kick => "kick",
            Figure::Parallel => "parallel",
            Figure::Window => "window",
            Figure::Smp => "smp",
            Figure::SeCompute => "se-compute",
            Figure::SeSyscall => "se-syscall",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Figure::Compute => "compute",
            Figure::Pio => "port-IO round trip, CPL0",
            Figure::Mmio => "MMIO round trip, CPL0",
            Figure::Kick => "forced exit per quantum (kick)",
            Figure::Parallel => "2 systems vs 1 on 2 cores",
            Figure::Window => "window barrier, 2 threads",
            Figure::Smp => "2 CPUs vs 1 in one system",
            Figure::SeCompute => "SE compute loop",
            Figure::SeSyscall => "SE system call (getppid)",
        }
    }

    fn measured_as(self) -> &'static str {
        match self {
            Figure::Compute => "ring-3 loop in kvmsim (whole guest run) / the same machine code native",
            Figure::Pio => "kvmsim / bare KVM loop, host time per port read",
            Figure::Mmio => "kvmsim / bare KVM loop, host time per MMIO read",
            Figure::Kick => {
                "kvmsim / bare KVM loop, host time per forced exit (timer signal and interrupt injection) beyond the timer period"
            }
            Figure::Parallel => "aggregate throughput of 2 systems / 1 system",
            Figure::Smp => {
                "aggregate ring-3 throughput of smpboot on 2 CPUs of one system / on 1 CPU (sim.quantum 1ms, or 100x this host's forced-exit cost if more, so forced exits take about 1% as at 1ms with VMX/SVM: see work)"
            }
            Figure::Window => {
                "host time per window (one barrier wait whose last arrival decides, as every thread does at each window end) with kvmsim's spin-then-park barrier / std::sync::Barrier"
            }
            Figure::SeCompute => {
                "a static Linux program's compute loop in kvmsim se (first instruction to exit; the VM built beforehand) / the same file run natively (spawn to exit)"
            }
            Figure::SeSyscall => {
                "host time per getppid call: a static Linux program in kvmsim se (whole run / calls) / kvmsim's own process calling getppid (no goal: reported)"
            }
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Figure::Compute | Figure::SeCompute => "s",
            Figure::Pio | Figure::Mmio | Figure::Kick | Figure::Window | Figure::SeSyscall => "us",
            Figure::Parallel | Figure::Smp => "M iter/s",
        }
    }

    /// What the two columns are.
    fn sides(self) -> (&'static str, &'static str) {
        match self {
            Figure::Compute => ("kvmsim", "native"),
            Figure::Pio | Figure::Mmio | Figure::Kick => ("kvmsim", "bare KVM loop"),
            Figure::Parallel => ("2 systems", "1 system"),
            Figure::Window => ("spin-then-park", "std Barrier"),
            Figure::Smp => ("2 CPUs", "1 CPU"),
            Figure::SeCompute | Figure::SeSyscall => ("kvmsim se", "native"),
        }
    }

    fn better(self) -> Better {
        match self {
            Figure::Parallel | Figure::Smp => Better::Higher,
            _ => Better::Lower,
        }
    }

    /// The goal: (`<=` or `>=`, value) for the ratio; none where the
    /// ratio is reported only (an emulated system call costs an exit, a
    /// native one a few hundred nanoseconds).
    fn goal(self) -> Option<(&'static str, f64)> {
        Some(match self {
            // SE: native speed / SE speed >= 0.98, as a time ratio.
            Figure::Compute | Figure::SeCompute => ("<=", 1.02),
            Figure::Pio | Figure::Mmio | Figure::Kick => ("<=", 1.05),
            Figure::Parallel => (">=", 1.9),
            Figure::Window => ("<=", 0.1),
            Figure::Smp => (">=", 1.8),
            Figure::SeSyscall => return None,
        })
    }
}

/// How much work each figure does, and how often each side runs.
#[derive(Clone, Copy, Debug)]
pub struct Work {
    pub runs: u32,
    pub compute_iterations: u64,
    pub pio_reads: u64,
    pub mmio_reads: u64,
    pub kick_exits: u64,
    pub kick_period_us: u64,
    pub parallel_iterations: u64,
    pub windows: u64,
    pub smp_iterations: u64,
    /// sim.quantum of the SMP figure, in ns; None: `smp_default_quantum`
    /// (which probes the host's forced exit once, so only when needed).
    pub smp_quantum_ns: Option<u64>,
    pub se_iterations: u64,
    pub se_calls: u64,
}

impl Work {
    /// The default work times `scale` (each at least a small minimum).
    pub fn scaled(scale: f64, runs: u32) -> Result<Work, String> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(format!(
                "--scale {scale}: the scale must be a positive number (1 = the default work)"
            ));
        }
        let s = |n: u64, min: u64| ((n as f64 * scale).round() as u64).max(min);
        Ok(Work {
            runs: runs.max(1),
            compute_iterations: s(COMPUTE_ITERATIONS, 1000),
            pio_reads: s(PIO_READS, 10),
            mmio_reads: s(MMIO_READS, 10),
            kick_exits: s(KICK_EXITS, 3),
            kick_period_us: KICK_PERIOD_US,
            parallel_iterations: s(PARALLEL_ITERATIONS, 1000),
            windows: s(WINDOWS, 100),
            smp_iterations: s(SMP_ITERATIONS, 1000),
            smp_quantum_ns: None,
            se_iterations: s(SE_COMPUTE_ITERATIONS, 1000),
            se_calls: s(SE_SYSCALLS, 10),
        })
    }

    fn smp_quantum(&self) -> u64 {
        self.smp_quantum_ns.unwrap_or_else(smp_default_quantum)
    }

    fn json(&self, f: Figure) -> serde_json::Value {
        match f {
            Figure::Compute => serde_json::json!({"iterations": self.compute_iterations}),
            Figure::Pio => serde_json::json!({"reads": self.pio_reads}),
            Figure::Mmio => serde_json::json!({"reads": self.mmio_reads}),
            Figure::Kick => serde_json::json!({
                "forced_exits": self.kick_exits,
                "period_us": self.kick_period_us,
            }),
            Figure::Parallel => {
                serde_json::json!({"iterations_per_system": self.parallel_iterations})
            }
            Figure::Window => serde_json::json!({"windows": self.windows, "threads": 2}),
            Figure::Smp => serde_json::json!({
                "iterations_per_cpu": self.smp_iterations,
                "quantum": kvm::doctor::fmt_us(self.smp_quantum()),
                "forced_exit_us": kvm::probe::forced_exit_cost_cached().map(|c| c.loss_ns as f64 / 1e3),
            }),
            Figure::SeCompute => serde_json::json!({"iterations": self.se_iterations}),
            Figure::SeSyscall => serde_json::json!({"calls": self.se_calls}),
        }
    }
}

/// One run of one side: its value (in the figure's unit) and the exits
/// that show the run did the work it was asked for.
struct Sample {
    value: f64,
    exits: serde_json::Value,
}

/// All runs of one figure.
struct Measured {
    figure: Figure,
    kvmsim: Vec<Sample>,
    reference: Vec<Sample>,
}

impl Measured {
    fn best(&self, side: &[Sample]) -> Option<f64> {
        let vals = side.iter().map(|s| s.value).filter(|v| v.is_finite());
        match self.figure.better() {
            Better::Lower => vals.reduce(f64::min),
            Better::Higher => vals.reduce(f64::max),
        }
    }

    fn ratio(&self) -> Option<f64> {
        let r = self.best(&self.kvmsim)? / self.best(&self.reference)?;
        r.is_finite().then_some(r)
    }

    fn met(&self) -> Option<bool> {
        let r = self.ratio()?;
        Some(match self.figure.goal()? {
            ("<=", g) => r <= g,
            (_, g) => r >= g,
        })
    }
}

/// A scratch output folder for the kvmsim runs (removed on drop), and the
/// compute loop's expected result (iterations, result) once known.
struct Scratch(std::path::PathBuf, Option<(u64, u64)>);

impl Scratch {
    fn new() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("kvmsim-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir, None))
    }

    /// The result of `n` iterations of the compute loop.
    fn compute_result(&mut self, n: u64) -> u64 {
        match self.1 {
            Some((m, r)) if m == n => r,
            _ => {
                let r = guests::compute_loop_native(n);
                self.1 = Some((n, r));
                r
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A config of one system running builtin guest `guest` with `args`, as
/// `kvmsim run --kernel builtin:GUEST --arg ... --quiet` builds it.
fn guest_config(guest: &str, args: &[u64], posix: bool) -> Config {
    let mut cfg = Config::for_kernel(&format!("builtin:{guest}"));
    let sc = &mut cfg.system[0];
    sc.args = args.to_vec();
    sc.serial.stdout = false;
    sc.serial.stdin = false;
    if posix {
        // The bare loops use a POSIX run timer.
        sc.cpu.timer = "posix".into();
    }
    cfg
}

/// What a kvmsim run of one guest gave.
struct SimRun {
    wall: f64,
    stats: sim::stats::Dump,
    serial: String,
}

/// Runs `cfg` as `kvmsim run` does; times `Simulation::run` (not the
/// build); the guest must end with sim-ops exit.
fn kvmsim_run(mut cfg: Config, scratch: &Scratch, what: &str) -> Result<SimRun, String> {
    let dir = scratch.0.join(what);
    let out = OutDir::create(&dir).map_err(text)?;
    let mut s = Simulation::build(&mut cfg, out).map_err(|e| format!("{what}: {e}"))?;
    let t = Instant::now();
    let exits = s.run().map_err(|e| format!("{what}: {e}"))?;
    let wall = t.elapsed().as_secs_f64();
    if let Some(e) = exits.iter().find(|e| e.cause != sim::ExitCause::GuestExit) {
        return Err(format!(
            "{what}: the guest did not exit cleanly: {} {}",
            e.cause.describe(),
            e.message.trim_end()
        ));
    }
    let sys = s.systems_mut().first_mut().ok_or("no system")?;
    let stats = sys.stats_dump(sys.cur_tick());
    drop(s);
    let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    Ok(SimRun {
        wall,
        stats,
        serial,
    })
}

/// The SE bench program, written once into the scratch folder.
fn se_program(scratch: &Scratch) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let p = scratch.0.join("se_bench");
    if !p.exists() {
        std::fs::write(&p, guests::SE_BENCH)
            .and_then(|()| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(p)
}

/// Runs the SE bench program with `args` as `kvmsim se --quiet` does;
/// times `Simulation::run`; returns the time, the stats and its stdout.
fn se_run(scratch: &Scratch, args: &[String], what: &str) -> Result<SimRun, String> {
    let prog = se_program(scratch)?;
    let mut cfg = Config::for_kernel(&prog.to_string_lossy());
    let sc = &mut cfg.system[0];
    sc.platform = "se".into();
    sc.memory = platform::units::Size(64 << 20);
    sc.serial.stdout = false;
    sc.serial.stdin = false;
    sc.se = Some(platform::config::SeConfig {
        args: args.to_vec(),
        ..Default::default()
    });
    let dir = scratch.0.join(what);
    let out = OutDir::create(&dir).map_err(text)?;
    let mut s = Simulation::build(&mut cfg, out).map_err(|e| format!("{what}: {e}"))?;
    let t = Instant::now();
    let exits = s.run().map_err(|e| format!("{what}: {e}"))?;
    let wall = t.elapsed().as_secs_f64();
    if let Some(e) = exits
        .iter()
        .find(|e| e.cause != sim::ExitCause::ProcessExit || e.code != 0)
    {
        return Err(format!(
            "{what}: the program did not exit with 0: {} {}",
            e.cause.describe(),
            e.message.trim_end()
        ));
    }
    let sys = s.systems_mut().first_mut().ok_or("no system")?;
    let stats = sys.stats_dump(sys.cur_tick());
    drop(s);
    let serial = std::fs::read_to_string(dir.join("stdout.txt")).unwrap_or_default();
    Ok(SimRun {
        wall,
        stats,
        serial,
    })
}

fn stat(d: &sim::stats::Dump, name: &str) -> u64 {
    d.get(name).map_or(0, |v| v.as_f64() as u64)
}

/// Loads builtin guest `guest` into RAM of the size kvmsim gives it by
/// default, as kvmsim's loader does; returns the RAM and the entry.
fn load_bare(guest: &str) -> Result<(mem::GuestRam, u64), String> {
    let name = format!("builtin:{guest}");
    let image = guests::builtin(guest).ok_or_else(|| format!("no built-in guest {guest}"))?;
    let size = Config::for_kernel(&name).system[0].memory.0;
    let ram = mem::GuestRam::new(mem::MemoryMap::for_size(size).map_err(text)?).map_err(text)?;
    let info = platform::loader::inspect(image, &name).map_err(text)?;
    let entry = platform::loader::load(&ram, image, &info, &name).map_err(text)?;
    Ok((ram, entry))
}

/// The value a bare loop returns for every read: all ones, what an
/// unclaimed port or address reads.
const BARE_READ: u64 = u64::MAX;

fn bare_io(guest: &str, args: &[u64]) -> Result<kvm::bare::BareRun, String> {
    let (ram, entry) = load_bare(guest)?;
    let mut vm = kvm::bare::BareVm::new(&ram, entry, args).map_err(text)?;
    vm.run_io(BARE_READ)
        .map_err(|e| format!("bare {guest}: {e}"))
}

fn check(ok: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(msg())
    }
}

/// One run of one side of `figure`.
fn sample(figure: Figure, kvmsim: bool, w: &Work, scratch: &mut Scratch) -> Result<Sample, String> {
    let us = 1e6;
    match (figure, kvmsim) {
        (Figure::Compute, false) => {
            let n = w.compute_iterations;
            let t = Instant::now();
            let r = guests::compute_loop_native(std::hint::black_box(n));
            let value = t.elapsed().as_secs_f64();
            scratch.1 = Some((n, r));
            Ok(Sample {
                value,
                exits: serde_json::Value::Null,
            })
        }
        (Figure::Compute, true) => {
            let n = w.compute_iterations;
            let r = kvmsim_run(guest_config("compute", &[n], false), scratch, "compute")?;
            let want = format!("result=0x{:016x}", scratch.compute_result(n));
            check(r.serial.contains(&want), || {
                format!(
                    "compute: the guest's result differs from the native one ({want}); serial.log: {}",
                    r.serial
                )
            })?;
            Ok(Sample {
                value: r.wall,
                exits: serde_json::json!({"exits": stat(&r.stats, "system.cpu.numVMExits")}),
            })
        }
        (Figure::Pio | Figure::Mmio, true) => {
            let (guest, n, what) = if figure == Figure::Pio {
                ("pioloop", w.pio_reads, "system.cpu.numIO")
            } else {
                ("mmioloop", w.mmio_reads, "system.cpu.numMMIO")
            };
            let r = kvmsim_run(guest_config(guest, &[n], false), scratch, guest)?;
            let exits = stat(&r.stats, what);
            check(exits >= n, || {
                format!("{guest}: {exits} exits in kvmsim for {n} reads")
            })?;
            Ok(Sample {
                value: r.wall / n as f64 * us,
                exits: serde_json::json!({"io": exits}),
            })
        }
        (Figure::Pio | Figure::Mmio, false) => {
            let (guest, n) = if figure == Figure::Pio {
                ("pioloop", w.pio_reads)
            } else {
                ("mmioloop", w.mmio_reads)
            };
            let r = bare_io(guest, &[n])?;
            let exits = if figure == Figure::Pio {
                r.pio_exits
            } else {
                r.mmio_exits
            };
            check(exits >= n, || {
                format!("{guest}: {exits} exits in the bare loop for {n} reads")
            })?;
            Ok(Sample {
                value: r.wall.as_secs_f64() / n as f64 * us,
                exits: serde_json::json!({"io": exits}),
            })
        }
        (Figure::Kick, side) => {
            let (k, period_us) = (w.kick_exits, w.kick_period_us);
            let args = [period_us * 1000, k];
            let (wall, forced, injected, stalls) = if side {
                let r = kvmsim_run(guest_config("kick", &args, true), scratch, "kick")?;
                (
                    r.wall,
                    stat(&r.stats, "system.cpu.numExitSignal"),
                    stat(&r.stats, "system.cpu.numInterrupts"),
                    Some(stat(&r.stats, "system.cpu.numProgressStalls")),
                )
            } else {
                let (ram, entry) = load_bare("kick")?;
                let mut vm = kvm::bare::BareVm::new(&ram, entry, &args).map_err(text)?;
                let r = vm
                    .run_kicked(Duration::from_micros(period_us), 0x40, BARE_READ)
                    .map_err(|e| format!("bare kick: {e}"))?;
                (r.wall.as_secs_f64(), r.forced_exits, r.injected, None)
            };
            let who = if side { "kvmsim" } else { "the bare loop" };
            check(injected >= k, || {
                format!("kick: {injected} interrupts injected by {who}; the guest waits for {k}")
            })?;
            // Each of the k interrupts needs one period of guest time; the
            // rest of the run's host time is the forced exits' cost.
            Ok(Sample {
                value: (wall / k as f64 - period_us as f64 / us) * us,
                exits: match stalls {
                    Some(st) => serde_json::json!({
                        "forced": forced,
                        "injected": injected,
                        "progress_stalls": st,
                    }),
                    None => serde_json::json!({"forced": forced, "injected": injected}),
                },
            })
        }
        (Figure::Window, spin) => {
            let n = w.windows;
            let value = if spin {
                let b = sim::barrier::SpinBarrier::new(2);
                let decided = std::sync::atomic::AtomicU64::new(0);
                windows(n, &|| {
                    b.wait_then(|| {
                        decided.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    });
                })
            } else {
                let b = std::sync::Barrier::new(2);
                windows(n, &|| {
                    b.wait();
                })
            };
            Ok(Sample {
                value: value * us,
                exits: serde_json::Value::Null,
            })
        }
        (Figure::Smp, two) => {
            let cpus = if two { 2 } else { 1 };
            let n = w.smp_iterations;
            let quantum = kvm::doctor::fmt_us(w.smp_quantum());
            let toml = format!(
                "[sim]\nquantum = \"{quantum}\"\n[system]\nkernel = \"builtin:smpboot\"\n\
                 cpus = {cpus}\nargs = [{cpus}, {n}, 3600000]\n[system.serial]\nstdout = false\n\
                 stdin = false\n[system.cpu]\ntimer = \"posix\"\n"
            );
            let cfg = Config::parse(&toml, Path::new("bench")).map_err(text)?;
            let r = kvmsim_run(cfg, scratch, if two { "smp2" } else { "smp1" })?;
            let want = format!("smpboot: {cpus} of {cpus} CPUs started");
            check(r.serial.contains(&want), || {
                format!(
                    "smp: not every CPU reported ({want}); serial.log: {}",
                    r.serial
                )
            })?;
            Ok(Sample {
                value: (cpus * n) as f64 / r.wall / 1e6,
                exits: serde_json::json!({
                    "cpu0_exits": stat(&r.stats, if two { "system.cpu0.numVMExits" } else { "system.cpu.numVMExits" }),
                }),
            })
        }
        (Figure::SeCompute, se) => {
            let n = w.se_iterations;
            let want = format!("result=0x{:016x}\n", scratch.compute_result(n));
            let args = [n.to_string()];
            let (value, got, exits) = if se {
                let r = se_run(scratch, &args, "se-compute")?;
                let calls = stat(&r.stats, "system.se.syscalls::total");
                (r.wall, r.serial, serde_json::json!({"syscalls": calls}))
            } else {
                let prog = se_program(scratch)?;
                let t = Instant::now();
                let o = std::process::Command::new(&prog)
                    .args(&args)
                    .env_clear()
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", prog.display()))?;
                let wall = t.elapsed().as_secs_f64();
                (
                    wall,
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    serde_json::Value::Null,
                )
            };
            check(got == want, || {
                format!("se-compute: the program printed {got:?}, expected {want:?}")
            })?;
            Ok(Sample { value, exits })
        }
        (Figure::SeSyscall, true) => {
            let n = w.se_calls;
            let r = se_run(scratch, &[n.to_string(), "s".into()], "se-syscall")?;
            let calls = stat(&r.stats, "system.se.syscalls::getppid");
            check(calls == n && r.serial == "calls=done\n", || {
                format!(
                    "se-syscall: {calls} getppid calls counted for {n}; stdout {:?}",
                    r.serial
                )
            })?;
            Ok(Sample {
                value: r.wall / n as f64 * us,
                exits: serde_json::json!({"getppid": calls, "exits": stat(&r.stats, "system.cpu.numVMExits")}),
            })
        }
        (Figure::SeSyscall, false) => {
            let n = w.se_calls;
            let t = Instant::now();
            for _ in 0..n {
                // getppid(2) through the C library: a system call each time.
                std::hint::black_box(std::os::unix::process::parent_id());
            }
            Ok(Sample {
                value: t.elapsed().as_secs_f64() / n as f64 * us,
                exits: serde_json::Value::Null,
            })
        }
        (Figure::Parallel, two) => {
            let systems = if two { 2 } else { 1 };
            let n = w.parallel_iterations;
            let mut toml = String::new();
            for _ in 0..systems {
                toml.push_str(&format!(
                    "[[system]]\nmemory = \"32MiB\"\nkernel = \"builtin:compute\"\nargs = [{n}]\n\
                     [system.serial]\nstdout = false\nstdin = false\n[system.cpu]\ntimer = \"posix\"\n"
                ));
            }
            let cfg = Config::parse(&toml, Path::new("bench")).map_err(text)?;
            let r = kvmsim_run(cfg, scratch, if two { "parallel2" } else { "parallel1" })?;
            Ok(Sample {
                value: (systems * n) as f64 / r.wall / 1e6,
                exits: serde_json::Value::Null,
            })
        }
    }
}

/// Host seconds per window for two threads meeting twice per window at
/// `wait` (the barrier of a run's window end), `n` windows.
fn windows(n: u64, wait: &(dyn Fn() + Sync)) -> f64 {
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..n {
                    wait();
                }
            });
        }
    });
    t.elapsed().as_secs_f64() / n as f64
}

/// Measures `figures` with `w`: for each run, each figure's two sides one
/// after the other (kvmsim first).
fn measure(figures: &[Figure], w: &Work) -> Result<Vec<Measured>, String> {
    let mut scratch = Scratch::new()?;
    let mut all: Vec<Measured> = figures
        .iter()
        .map(|&figure| Measured {
            figure,
            kvmsim: vec![],
            reference: vec![],
        })
        .collect();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for run in 0..w.runs {
        for m in &mut all {
            if progress {
                eprint!(
                    "\rkvmsim bench: run {}/{}: {:<32}",
                    run + 1,
                    w.runs,
                    m.figure.title()
                );
            }
            m.kvmsim.push(sample(m.figure, true, w, &mut scratch)?);
            m.reference.push(sample(m.figure, false, w, &mut scratch)?);
        }
    }
    if progress {
        eprint!("\r{:<80}\r", "");
    }
    Ok(all)
}

fn fmt_value(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if v.abs() >= 100.0 => format!("{v:.1} {unit}"),
        Some(v) if v.abs() >= 1.0 => format!("{v:.3} {unit}"),
        Some(v) => format!("{v:.4} {unit}"),
        None => "n/a".into(),
    }
}

/// The table.
fn table(all: &[Measured], w: &Work) -> String {
    let mut s = format!(
        "kvmsim bench: {} run(s) per side, the sides interleaved (A B A B ...); each side's best run is shown \
         (lowest time, highest throughput)\n\n",
        w.runs
    );
    s.push_str(&format!(
        "{:<32} {:<30} {:<34} {:>7}  {:<8} {}\n",
        "figure", "kvmsim", "reference", "ratio", "goal", "met"
    ));
    for m in all {
        let f = m.figure;
        let (a, b) = f.sides();
        let goal = f.goal().map_or("-".into(), |(op, g)| format!("{op} {g}"));
        let side = |name: &str, v: Option<f64>| format!("{} ({name})", fmt_value(v, f.unit()));
        s.push_str(&format!(
            "{:<32} {:<30} {:<34} {:>7}  {:<8} {}\n",
            f.title(),
            side(a, m.best(&m.kvmsim)),
            side(b, m.best(&m.reference)),
            m.ratio().map_or("n/a".into(), |r| format!("{r:.3}")),
            goal,
            match m.met() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            }
        ));
    }
    s.push('\n');
    for m in all {
        s.push_str(&format!(
            "  {:<9} {}; work per run: {}\n",
            m.figure.key(),
            m.figure.measured_as(),
            w.json(m.figure)
        ));
    }
    s
}

fn num(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn opt(v: Option<f64>) -> serde_json::Value {
    v.map_or(serde_json::Value::Null, num)
}

/// The `/proc/loadavg` averages (1, 5, 15 minutes), if readable.
fn load_average() -> Option<[f64; 3]> {
    let t = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = t.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

fn report_json(
    all: &[Measured],
    w: &Work,
    load: (Option<[f64; 3]>, Option<[f64; 3]>),
) -> serde_json::Value {
    let figures: Vec<_> = all
        .iter()
        .map(|m| {
            let f = m.figure;
            let (a, b) = f.sides();
            let goal = f
                .goal()
                .map(|(op, g)| serde_json::json!({"op": op, "value": g}));
            let values = |v: &[Sample]| v.iter().map(|s| num(s.value)).collect::<Vec<_>>();
            let exits = |v: &[Sample]| v.iter().map(|s| s.exits.clone()).collect::<Vec<_>>();
            serde_json::json!({
                "key": f.key(),
                "figure": f.title(),
                "measured_as": f.measured_as(),
                "unit": f.unit(),
                "kvmsim_side": a,
                "reference_side": b,
                "kvmsim": opt(m.best(&m.kvmsim)),
                "reference": opt(m.best(&m.reference)),
                "ratio": opt(m.ratio()),
                "goal": goal,
                "met": m.met(),
                "work": w.json(f),
                "samples": {"kvmsim": values(&m.kvmsim), "reference": values(&m.reference)},
                "exits": {"kvmsim": exits(&m.kvmsim), "reference": exits(&m.reference)},
            })
        })
        .collect();
    serde_json::json!({
        "kvmsim_version": env!("CARGO_PKG_VERSION"),
        "runs": w.runs,
        "statistic": "best",
        "order": "interleaved: for each run, each figure's kvmsim side, then its reference side",
        "host": {
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "loadavg_before": load.0,
            "loadavg_after": load.1,
        },
        "figures": figures,
    })
}

/// Writes `text` to stdout; a failure (a closed pipe) is an error, not a panic.
fn print_out(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))
}

/// `kvmsim bench`: every figure; `DIR/bench.json`, then the table on stdout.
pub fn all(w: &Work, out: &Path) -> Result<(), String> {
    let path = out.join("bench.json");
    // Fail on an unwritable folder before spending minutes measuring.
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let before = load_average();
    let m = measure(&Figure::ALL, w)?;
    let after = load_average();
    let json = report_json(&m, w, (before, after));
    let text = serde_json::to_string_pretty(&json).map_err(text)? + "\n";
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let fmt = |l: Option<[f64; 3]>| l.map_or("unknown".into(), |l| format!("{:.2}", l[0]));
    print_out(&format!(
        "{}  host: {} CPUs, load average {} before, {} after\n  written: {}\n",
        table(&m, w),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        fmt(before),
        fmt(after),
        path.display()
    ))
}

/// One figure alone (`kvmsim bench compute|kick|parallel|pio|mmio`): its row
/// of the table, nothing written.
pub fn one(figure: Figure, w: &Work) -> Result<(), String> {
    let m = measure(&[figure], w)?;
    print_out(&table(&m, w))
}

/// `kvmsim bench restore`: how long a restore takes from reading the
/// checkpoint to the first guest instruction (the run is limited to 1
/// simulated ns after the checkpoint's tick, so it stops at the first
/// entry into KVM), best of `runs`, and the checkpoint's size on disk.
/// Without `dir`, a checkpoint of the `ckpt` guest with 128 MiB of RAM is
/// taken first.
pub fn restore(dir: Option<&Path>, runs: u32) -> Result<(), String> {
    let scratch = Scratch::new()?;
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let mut cfg = guest_config("ckpt", &[], false);
            cfg.system[0].memory = platform::units::Size(128 << 20);
            cfg.sim.checkpoint_at = Some(platform::units::Duration(sim::tick::TICKS_PER_MS));
            cfg.sim.checkpoint_exit = true;
            let out_dir = scratch.0.join("take");
            let out = OutDir::create(&out_dir).map_err(text)?;
            let mut s = Simulation::build(&mut cfg, out).map_err(text)?;
            s.run().map_err(text)?;
            s.checkpoints()
                .first()
                .cloned()
                .ok_or("the ckpt guest's run took no checkpoint")?
        }
    };
    let info = ckpt::info(&dir).map_err(text)?;
    let mut best: Option<(f64, f64)> = None;
    for i in 0..runs.max(1) {
        let t = Instant::now();
        let c = platform::simulation::Checkpoint::read(&dir).map_err(text)?;
        let mut cfg = c.config.clone();
        cfg.sim.max_time = Some(platform::units::Duration(
            c.state.tick + sim::tick::TICKS_PER_NS,
        ));
        cfg.sim.checkpoint_at = None;
        for s in &mut cfg.system {
            s.serial.stdout = false;
            s.serial.stdin = false;
        }
        let out = OutDir::create(&scratch.0.join(format!("restore{i}"))).map_err(text)?;
        let mut s = Simulation::restore(&mut cfg, out, &c).map_err(text)?;
        let built = t.elapsed().as_secs_f64();
        s.run().map_err(text)?;
        let total = t.elapsed().as_secs_f64();
        drop(s);
        if best.is_none_or(|(b, _)| total < b) {
            best = Some((total, built));
        }
    }
    let (total, built) = best.unwrap_or_default();
    let ram: u64 = info.systems.iter().map(|s| s.ram_bytes).sum();
    let on_disk: u64 = info.systems.iter().map(|s| s.ram_bytes_on_disk).sum();
    print_out(&format!(
        "restore of {} (best of {}):\n  to the first guest instruction  {:.1} ms (goal < 50 ms)\n  \
         of which reading and building   {:.1} ms\n  checkpoint: state file {} bytes, RAM {} MiB \
         ({:.1} MiB on disk)\n",
        dir.display(),
        runs.max(1),
        total * 1e3,
        built * 1e3,
        info.state_bytes,
        ram >> 20,
        on_disk as f64 / (1 << 20) as f64
    ))
}
