//! A simulated system: RAM, a KVM VM and its CPUs, the IO bus with its
//! devices, statistics, and the event queues that drive them.
//!
//! Every CPU has an event queue of its own (its ticks, its local APIC's
//! timer, interrupts arriving from other CPUs, samples); the system's queue
//! holds what the shared devices and the simulator do (device deadlines,
//! statistics, the end of the run, link arrivals). With one CPU both queues
//! run on one thread, merged in (tick, priority) order. With several, each
//! CPU runs its queue on a host thread of its own and CPU 0's thread also
//! runs the system's queue; the threads meet at the end of every window of
//! `sim.quantum` (see [`crate::simulation`]). What crosses threads (an IPI,
//! an interrupt for another CPU's APIC) goes into that CPU's inbox with its
//! arrival tick, and the CPU is kicked out of KVM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::i8042::{PostPort, I8042, I8042_DATA, POST_PORT};
use devices::intc::{IntcHandle, VectorIntc};
use devices::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use devices::irq::IrqLine;
use devices::lapic::{Ipi, Lapic, LAPIC_BASE, LAPIC_SIZE};
use devices::mailbox::{MAILBOX_BASE, MAILBOX_SIZE};
use devices::pic::{PicPair, ELCR_BASE, MASTER_BASE, SLAVE_BASE};
use devices::pit::{Pit, PIT_BASE, PORT_B, PORT_B_OFFSET};
use devices::rtc::{Rtc, RTC_BASE};
use devices::simops::{SIMOPS_BASE, SIMOPS_SIZE};
use devices::timer::{TIMER_BASE, TIMER_SIZE};
use devices::uart::{COM1_BASE, UART_PORTS};
use devices::{IntervalTimer, Mailbox, SimOps, Uart16550};
use kvm::arch::x86_64::{boot, X86_64};
use kvm::cpu::CpuOptions;
use kvm::timer::{KickHandle, TimerKind};
use kvm::{CpuConfig as KvmCpuConfig, KvmCpu, KvmVm, TickOutcome, VcpuSpec};
use mem::{AccessCtx, GuestRam, IoBus, MemoryMap, Rebased, Space, TimedDevice, TimedHandle};
use sim::eventq::{CPU_TICK_PRI, DEFAULT_PRI, SIM_EXIT_PRI, STAT_EVENT_PRI};
use sim::intr::{InterruptController, Pending};
use sim::{ClockDomain, Counter, EventId, EventQueue, ExitCause, ExitEvent, Request, Stats, Tick};
use vm_memory::Bytes;

use crate::config::{SimConfig, SystemConfig, DEFAULT_HOST_FACTOR};
use crate::console::{self, SerialSink};
use crate::loader;
use crate::output::OutDir;
use crate::units::Frequency;
use crate::PlatformError;

/// A CPU's interrupt controller, as the system holds it.
type CpuIntc = Arc<Mutex<dyn InterruptController>>;

/// The interrupt controllers of a system: each CPU's, the local APICs (if
/// any), where vectored device interrupts go, the I/O APIC and the ISA
/// interrupt lines (on a PC).
type Controllers = (
    Vec<CpuIntc>,
    Vec<Arc<Mutex<Lapic>>>,
    IntcHandle,
    Option<Arc<Mutex<IoApic>>>,
    Option<Vec<IrqLine>>,
);

/// How the SE device reaches the process's CPUs.
struct SeCpus {
    /// One CPU: its controller.
    vectors: IntcHandle,
    /// Several: their local APICs.
    lapics: Vec<Arc<Mutex<Lapic>>>,
}

impl se::dev::CpuLink for SeCpus {
    fn raise(&mut self, cpu: usize, vector: u8) {
        match self.lapics.get(cpu) {
            Some(l) => mem::lock(l).deliver(vector, false),
            None if cpu == 0 => mem::lock(&self.vectors).raise_vector(vector),
            None => {}
        }
    }

    fn eoi(&mut self, cpu: usize) {
        if let Some(l) = self.lapics.get(cpu) {
            mem::lock(l).end_of_interrupt();
        }
    }
}

/// Priority of a CPU's startup event: before anything else at tick 0.
const STARTUP_PRI: i32 = i32::MIN;
/// Priority of a window's end: first in its tick (that tick belongs to the
/// next window).
const WINDOW_PRI: i32 = i32::MIN + 1;

mod snapshot;
pub use snapshot::Restore;

/// Events of the system's queue: the shared devices and the simulator.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum SysEvent {
    /// A shared timed device's deadline (index into `Core::timed`).
    Device(usize),
    Exit {
        code: i64,
    },
    /// The emulated process ended (SE mode).
    ProcessExit {
        code: i64,
        message: String,
    },
    /// The guest reset the machine.
    Reset,
    /// The guest wrote `value` to QEMU's isa-debug-exit.
    DebugExit {
        value: u64,
    },
    DumpStats {
        reset: bool,
        period: Tick,
    },
    ResetStats {
        period: Tick,
    },
    Drain {
        period: Tick,
    },
    MaxTick,
    /// A value arrives on link port `port`.
    LinkDeliver {
        port: u32,
        data: u64,
    },
    /// Take a checkpoint (then again every `period` if non-zero): drain
    /// every CPU, then stop the run for the checkpoint to be written.
    Checkpoint {
        period: Tick,
    },
    /// A CPU reached PC event `name` at `addr`, whose action is exit.
    PcExit {
        name: String,
        addr: u64,
        cpu: String,
    },
    /// An Ethernet frame arrives at the NIC of link port `port`.
    FrameDeliver {
        port: u32,
        #[serde(with = "crate::nics::frame_hex")]
        frame: Arc<[u8]>,
    },
}

/// Events of a CPU's queue.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum CpuEvent {
    /// Per-thread CPU setup, on the thread that runs this queue.
    Startup,
    Tick,
    /// The end of a lock-step window.
    WindowEnd,
    /// Record a CPU sample (sim.sample_period).
    Sample {
        period: Tick,
    },
    /// The CPU's local APIC timer is due.
    ApicTimer,
    /// Something from another CPU's thread (or the system's queue) arrives.
    Arrive(Arrival),
}

/// What another thread sends a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Arrival {
    /// An interrupt was delivered to the CPU's APIC: wake it if it halted.
    Wake,
    /// An inter-processor interrupt (delivery mode and vector).
    Ipi { mode: u8, vector: u8 },
    /// Drain: finish what is in flight, then stop until resumed.
    Drain,
    /// Every CPU of the system drained: go on.
    Resume,
}

/// One end of a link in a system: its port and the link's latency; a
/// mailbox, or with `nic` a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEnd {
    pub port: u32,
    pub latency: Tick,
    pub nic: Option<crate::nics::NicEnd>,
}

/// A value sent out of a link port, to arrive at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outgoing {
    pub port: u32,
    pub at: Tick,
    pub data: u64,
}

/// A timed device and its scheduled event.
struct Timed {
    dev: TimedHandle,
    event: Option<(EventId, Tick)>,
}

/// A CPU's inbox: arrivals posted by other threads, with their ticks.
struct Inbox {
    items: Mutex<Vec<(Tick, Arrival)>>,
    full: AtomicBool,
    kick: KickHandle,
}

/// The system's queue and what its events touch (locked by whichever
/// thread acts on it).
struct Core {
    queue: EventQueue<SysEvent>,
    timed: Vec<Timed>,
    stats: Stats,
    ioapic: Option<Arc<Mutex<IoApic>>>,
    periodic_dump: Option<EventId>,
    periodic_reset: Option<EventId>,
    draining: bool,
    /// The drain under way ends in a checkpoint.
    checkpoint_pending: bool,
    drains: Counter,
    mailboxes: Vec<Arc<Mutex<Mailbox>>>,
    outgoing: Vec<Outgoing>,
    /// NICs by link port.
    nics: Vec<(u32, crate::nics::NicHandle)>,
}

/// What every CPU thread of a system shares.
struct Shared {
    name: String,
    bus: IoBus,
    out: OutDir,
    core: Mutex<Core>,
    inboxes: Vec<Inbox>,
    /// The local APIC of each CPU (empty on a bare single-CPU system).
    lapics: Vec<Arc<Mutex<Lapic>>>,
    /// A bare single-CPU system's interrupt controller (not on the bus:
    /// its state is saved with the simulator's).
    vector_intc: Option<Arc<Mutex<VectorIntc>>>,
    ipi_latency: Tick,
    /// Some thread of this system ended the run.
    exited: AtomicBool,
    /// CPUs drained in the drain under way.
    drained: std::sync::atomic::AtomicUsize,
    /// Every CPU drained for a checkpoint: the threads stop running until
    /// it is written and the system resumed.
    ckpt_ready: AtomicBool,
    ipis_sent: Counter,
    /// The links' and switches' statistics as of the last window
    /// boundary, added to this system's dumps during the run.
    net_stats: Option<crate::simulation::NetSnapshot>,
    /// The disks, for checkpoints.
    disks: Vec<crate::disks::AttachedDisk>,
}

impl Shared {
    /// A dump of the system's statistics at `now`, with the links' and
    /// switches' as of the last window boundary.
    fn dump_with_net(&self, stats: &Stats, now: Tick) -> sim::stats::Dump {
        let mut dump = stats.dump(now);
        if let Some(n) = &self.net_stats {
            dump.entries
                .extend(n.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        }
        dump
    }
}

/// One CPU with its queue.
struct CpuSlot {
    index: usize,
    cpu: KvmCpu<X86_64>,
    queue: EventQueue<CpuEvent>,
    tick_event: Option<EventId>,
    /// The tick of the CPU's next tick event: the simulated time the CPU
    /// has reached (it ran up to there).
    next: Tick,
    intc: CpuIntc,
    lapic: Option<Arc<Mutex<Lapic>>>,
    timer_event: Option<(EventId, Tick)>,
    requests: Vec<Request>,
    /// An AP before its startup IPI (or after INIT): it does not run.
    waiting_sipi: bool,
    /// Drained, waiting for the other CPUs of the system: it does not run.
    drain_stopped: bool,
    samples: String,
    progress: Option<Progress>,
    ipis_received: Counter,
    /// `CPU.numWindows`: lock-step windows this CPU's thread ran.
    windows: Counter,
    /// `CPU.windowWaitSeconds`: host time its thread waited for the other
    /// threads at window ends.
    window_wait: sim::Value,
    /// A debugger's hold on the CPU (crate::gdb).
    debug: crate::gdb::DebugHook,
    /// The system's PC events and this CPU's counts of them.
    pc: Option<PcSlot>,
    /// The earliest arrival this thread posted to another CPU's inbox
    /// since it last reported its next activity (`Tick::MAX`: none). The
    /// receiver may have reported before the post; the sender reports it
    /// instead, so that no window holding the arrival is skipped.
    posted: Tick,
}

/// A CPU's view of its system's PC events (crate::pc_events).
struct PcSlot {
    events: Arc<crate::pc_events::PcEvents>,
    /// `CPU.pcEvents`: one element per event.
    counts: sim::Vector,
}

/// One simulated system.
pub struct System {
    // Drop order: the vCPUs, then the VM, then the RAM it maps.
    cpus: Vec<CpuSlot>,
    shared: Shared,
    _vm: KvmVm,
    _ram: GuestRam,
}

/// The progress line on stderr (only when stderr is a terminal). A helper
/// thread kicks the CPU out of KVM once per host second so that the line
/// moves even while the guest computes without exits (one extra exit per
/// host second, only then).
struct Progress {
    start: std::time::Instant,
    last: std::time::Instant,
    exits: Counter,
    last_exits: u64,
    shown: bool,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Progress {
    fn new(exits: Counter, kick: kvm::timer::KickHandle) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let _ = std::thread::Builder::new()
            .name("kvmsim-progress".into())
            .spawn(move || {
                for sig in [libc::SIGINT, libc::SIGTERM] {
                    let _ = vmm_sys_util::signal::block_signal(sig);
                }
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    if !s.load(std::sync::atomic::Ordering::Relaxed) {
                        kick.kick();
                    }
                }
            });
        Progress {
            start: std::time::Instant::now(),
            last: std::time::Instant::now(),
            exits,
            last_exits: 0,
            shown: false,
            stop,
        }
    }

    /// Every host second: simulated seconds, host seconds, exits per second.
    fn update(&mut self, now: Tick) {
        let t = std::time::Instant::now();
        let dt = t.duration_since(self.last).as_secs_f64();
        if dt < 1.0 {
            return;
        }
        let exits = self.exits.get();
        let rate = exits.saturating_sub(self.last_exits) as f64 / dt;
        eprint!(
            "\r[kvmsim] simulated {:.3} s | host {:.1} s | {:.0} exits/s   ",
            sim::tick::ticks_to_seconds(now),
            t.duration_since(self.start).as_secs_f64(),
            rate
        );
        self.last = t;
        self.last_exits = exits;
        self.shown = true;
    }

    fn finish(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if std::mem::take(&mut self.shown) {
            eprintln!();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads the image named by `kernel`: `builtin:NAME` or a file path.
pub fn read_image(kernel: &str) -> Result<Vec<u8>, PlatformError> {
    match kernel.strip_prefix("builtin:") {
        Some(name) => guests::builtin(name)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| PlatformError::Kernel(format!("{kernel}: no such built-in guest"))),
        // A regular file of at most 1 GiB, read so that Ctrl-C stops it.
        None => Ok(crate::input::read_file(
            kernel,
            "kernel",
            &crate::input::Limit::kernel(),
        )?),
    }
}

/// The run timer for `system.cpu.timer`, falling back (with a warning) when
/// the host lacks a PMU.
fn timer_kind(name: &str) -> TimerKind {
    match name {
        "posix" => TimerKind::Posix,
        "perf-task-clock" => TimerKind::PerfTaskClock,
        "perf-cycles" if kvm::perf::pmu_available() => TimerKind::PerfCycles,
        "perf-cycles" => {
            tracing::warn!("system.cpu.timer = \"perf-cycles\" needs a hardware PMU, which this host lacks: using a POSIX timer");
            TimerKind::Posix
        }
        _ if kvm::perf::pmu_available() => TimerKind::PerfCycles,
        _ => TimerKind::Posix,
    }
}

impl System {
    /// Builds a single system from a whole config (its first system).
    pub fn build(cfg: &mut crate::Config, out: OutDir) -> Result<System, PlatformError> {
        let sim = cfg.sim.clone();
        let sc = cfg
            .system
            .first_mut()
            .ok_or_else(|| PlatformError::Setup("the config has no system".into()))?;
        Self::build_named("system", sc, &sim, &[], out)
    }

    /// Builds system `name` described by `sc`, with mailboxes for `links`,
    /// writing into `out`. Fills in the defaults that depend on the host
    /// (host_freq, stack, timer) in `sc`.
    pub fn build_named(
        name: &str,
        sc: &mut SystemConfig,
        sim: &SimConfig,
        links: &[LinkEnd],
        out: OutDir,
    ) -> Result<System, PlatformError> {
        Self::build_inner(name, sc, sim, links, out, None)
    }

    /// Builds system `name` from a checkpoint: `sc` is the checkpoint's
    /// resolved config of the system; its RAM is the checkpoint's RAM file
    /// mapped copy-on-write (no kernel is loaded, no boot state written),
    /// and every CPU, device, event and statistic is set as saved.
    pub fn build_restored(
        name: &str,
        sc: &mut SystemConfig,
        sim: &SimConfig,
        links: &[LinkEnd],
        out: OutDir,
        from: &Restore<'_>,
    ) -> Result<System, PlatformError> {
        let mut sys = Self::build_inner(name, sc, sim, links, out, Some(from))?;
        sys.restore(from, sim)?;
        Ok(sys)
    }

    fn build_inner(
        name: &str,
        sc: &mut SystemConfig,
        sim: &SimConfig,
        links: &[LinkEnd],
        out: OutDir,
        from: Option<&Restore<'_>>,
    ) -> Result<System, PlatformError> {
        let name = name.to_string();
        let ncpus = sc.cpus.clamp(1, crate::config::MAX_CPUS) as usize;
        let restoring = from.is_some();
        let se_mode = sc.platform == "se";
        if se_mode && restoring {
            return Err(PlatformError::Setup(format!(
                "{name}: an SE-mode process cannot be restored from a checkpoint yet"
            )));
        }
        // A restored system's kernel is in its RAM already.
        let image = if restoring {
            Vec::new()
        } else {
            read_image(&sc.kernel)?
        };
        // A Multiboot header in the first 8 KiB (and no bzImage): entered
        // in 32-bit protected mode on a PC (crate::multiboot).
        let is_multiboot = !restoring
            && !se_mode
            && !crate::linux::is_bzimage(&image)
            && crate::multiboot::is_multiboot(&image);
        let is_linux = !restoring
            && !se_mode
            && !is_multiboot
            && (crate::linux::is_bzimage(&image) || sc.initrd.is_some() || sc.append.is_some());
        if sc.platform == "auto" {
            sc.platform = if is_linux || is_multiboot {
                "pc"
            } else {
                "bare"
            }
            .into();
        }
        // Host-derived defaults: on a host that emulates kernel mode, Linux
        // gets examples/linux.toml's host_factor and trimming.
        if is_linux {
            if let Some(note) = sc.adapt_linux_to_host(crate::linux::kernel_mode_emulated()) {
                tracing::info!("{name}: {note}");
            }
        }
        let host_factor = *sc.cpu.host_factor.get_or_insert(DEFAULT_HOST_FACTOR);
        let kernel = if is_linux {
            Some(
                crate::linux::parse(&image, &sc.kernel)
                    .map_err(|e| PlatformError::Kernel(e.to_string()))?,
            )
        } else {
            None
        };
        let image = kernel.as_ref().map_or(image, |k| k.elf.clone());
        // SE mode: the program, how its paths reach the host, and its
        // interpreter if it is dynamically linked.
        let se_elf = if se_mode {
            let elf = se::elf::parse(&image, &sc.kernel)
                .map_err(|e| PlatformError::Kernel(e.to_string()))?;
            let c = sc.se.clone().unwrap_or_default();
            let paths = se::process::PathMap::from_config(&c.redirects, c.sysroot.as_deref())
                .map_err(PlatformError::Kernel)?;
            let interp = se::process::find_interp(&elf, &paths, std::path::Path::new(&sc.kernel))
                .map_err(PlatformError::Kernel)?;
            Some((elf, paths, interp))
        } else {
            None
        };
        let (info, multiboot) = if restoring || se_mode {
            (None, None)
        } else if is_multiboot {
            let k = crate::multiboot::parse(&image, &sc.kernel)?;
            (None, Some(k))
        } else {
            (Some(loader::inspect(&image, &sc.kernel)?), None)
        };

        let mut stats = Stats::new();
        let ram = match from {
            Some(r) => r.map_ram(sc.memory.0)?,
            None => {
                let map = MemoryMap::for_size(sc.memory.0).map_err(PlatformError::Ram)?;
                GuestRam::new(map).map_err(PlatformError::Ram)?
            }
        };
        let entry = match (&info, &multiboot) {
            (Some(info), _) => loader::load(&ram, &image, info, &sc.kernel)?,
            (None, Some(k)) => {
                crate::multiboot::load(&ram, &image, k, &sc.kernel)?;
                u64::from(k.entry)
            }
            // A restore: the CPUs' saved state says where they are.
            (None, None) => 0,
        };

        let mut vm = KvmVm::new()?;
        vm.map_ram(&ram)?;
        for &[base, size] in &sc.coalesced_mmio {
            vm.register_coalesced_mmio(base, size)?;
        }
        let has_lapics = sc.platform == "pc" || ncpus > 1;
        if sc.x2apic && !has_lapics {
            return Err(PlatformError::Setup(format!(
                "{name}: system.x2apic = true needs local APICs: platform \"pc\" or more than \
                 one CPU (platform is \"{}\" with 1 CPU)",
                sc.platform
            )));
        }
        // x2APIC mode: the APICs' MSRs must reach kvmsim, which only the
        // user-space MSR filter's exits can do.
        if sc.x2apic && !vm.trap_apic_msrs(true)? {
            return Err(PlatformError::Setup(format!(
                "{name}: system.x2apic = true needs a host whose KVM honours the user-space MSR \
                 filter (`kvmsim doctor`: \"user-space MSR filter (IA32_APIC_BASE)\" fails here: \
                 KVM_CAP_X86_USER_SPACE_MSR or KVM_CAP_X86_MSR_FILTER missing); set it to false"
            )));
        }
        // Local APICs (a PC, or several CPUs) learn of IA32_APIC_BASE
        // writes where the host can tell (kvmsim doctor says).
        if has_lapics
            && !sc.x2apic
            && !vm.trap_apic_base_writes()?
            && console::first_time("apic-base-filter")
        {
            tracing::warn!(
                "this host's KVM has no user-space MSR filter: a guest that disables or moves its \
                 local APIC through IA32_APIC_BASE keeps kvmsim's APIC enabled, at 0xFEE00000"
            );
        }
        let mut vcpus = Vec::with_capacity(ncpus);
        for id in 0..ncpus {
            vcpus.push(vm.create_cpu(&VcpuSpec {
                id: id as u64,
                cpus: ncpus as u8,
                coalesced_mmio: !sc.coalesced_mmio.is_empty(),
                x2apic: sc.x2apic,
            })?);
        }

        let host_freq = match sc.cpu.host_freq {
            Some(f) => f.0,
            None => {
                let khz = vcpus[0].tsc_khz().map_err(|e| {
                    PlatformError::Setup(format!(
                        "KVM_GET_TSC_KHZ failed ({e}); set system.cpu.host_freq in the config"
                    ))
                })?;
                let hz = f64::from(khz) * 1e3;
                sc.cpu.host_freq = Some(Frequency(hz));
                hz
            }
        };
        let stack = *sc.stack.get_or_insert(boot::DEFAULT_STACK_TOP);
        let timer = timer_kind(&sc.cpu.timer);
        sc.cpu.timer = match timer {
            TimerKind::Posix => "posix",
            TimerKind::PerfCycles => "perf-cycles",
            TimerKind::PerfTaskClock => "perf-task-clock",
        }
        .into();

        let mut multiboot_info = None;
        if let Some(k) = &multiboot {
            // Protected mode needs only a GDT; low memory stays the guest's.
            boot::write_gdt(ram.memory())?;
            multiboot_info = Some(crate::multiboot::setup(sc, k, &ram, ncpus as u8)?);
        } else if !restoring && !se_mode {
            boot::write_boot_structures(ram.memory())?;
        }
        // SE mode: the process image (segments, stack, page tables, the
        // kernel stub) and the device that services its system calls.
        let mut se_dev = None;
        let mut se_entry = None;
        let mut se_park_cr3 = 0;
        if let Some((elf, paths, interp)) = &se_elf {
            let cfg = sc.se.get_or_insert_with(Default::default).clone();
            let hwcap = {
                use kvm::vcpu::Vcpu as _;
                vcpus[0]
                    .cpuid_entries()
                    .ok()
                    .and_then(|t| t.iter().find(|e| e.function == 1).map(|e| u64::from(e.edx)))
                    .unwrap_or(0)
            };
            let mut argv = vec![cfg.argv0.clone().unwrap_or_else(|| sc.kernel.clone())];
            argv.extend(cfg.args.iter().cloned());
            let pcfg = se::process::ProcessConfig {
                path: sc.kernel.clone().into(),
                argv,
                envp: cfg.env.clone(),
                seed: cfg.seed,
                hwcap,
                paths: paths.clone(),
                interp: interp.clone(),
                cpus: ncpus,
            };
            let log = |f: &str| -> Result<Box<dyn std::io::Write + Send>, PlatformError> {
                Ok(Box::new(out.serial_log(f)?))
            };
            let echo_out: Option<Box<dyn std::io::Write + Send>> = sc
                .serial
                .stdout
                .then(|| Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>);
            let echo_err: Option<Box<dyn std::io::Write + Send>> = sc
                .serial
                .stdout
                .then(|| Box::new(std::io::stderr()) as Box<dyn std::io::Write + Send>);
            let files = se::sys::Files::stdio(
                sc.serial.stdin,
                se::sys::Sink {
                    echo: echo_out,
                    log: Some(log("stdout.txt")?),
                },
                se::sys::Sink {
                    echo: echo_err,
                    log: Some(log("stderr.txt")?),
                },
            );
            let regions: Vec<(u64, u64)> = ram
                .map()
                .regions()
                .iter()
                .map(|r| (r.base, r.size))
                .collect();
            let gdt = boot::gdt_with_tss(se::TSS_VA);
            let (proc, entry) =
                se::process::Process::load(ram.memory(), &regions, &image, elf, &pcfg, &gdt, files)
                    .map_err(PlatformError::Kernel)?;
            // Default: now, to the nanosecond (a file the program finds
            // written earlier in this second is not in its future).
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let realtime = cfg.realtime_start.unwrap_or(now.as_secs() as i64);
            let realtime_ns = match cfg.realtime_start {
                Some(s) => (s.max(0) as u64).saturating_mul(1_000_000_000),
                None => u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
            };
            if let Some(c) = sc.se.as_mut() {
                c.realtime_start = Some(realtime);
            }
            let timing = se::dev::Timing {
                syscall_latency: cfg.syscall_latency.0,
                fault_latency: cfg.fault_latency.0,
                realtime_base_ns: realtime_ns,
            };
            let dev = se::dev::SeDevice::new(
                proc,
                ram.memory().clone(),
                timing,
                &mut stats,
                &format!("{name}.se"),
            )?;
            se_park_cr3 = dev.process().park_cr3;
            se_dev = Some(Arc::new(Mutex::new(dev)));
            se_entry = Some(entry);
        }
        let args = match (&kernel, &info) {
            (Some(k), Some(info)) => {
                let nics = links.iter().filter(|l| l.nic.is_some()).count();
                let line = setup_linux(sc, k, info, &ram, host_freq, ncpus as u8, nics)?;
                tracing::info!("{name}: Linux command line: {line}");
                // The 64-bit boot protocol: RSI points to the zero page.
                vec![0, crate::firmware::ZERO_PAGE]
            }
            _ => sc.args.clone(),
        };
        // The repair shares the CPU's guest-debug setting with stepping
        // (max_insts, the trace) and the debugger (kvm::arch::x86_64::guest_debug).
        let broken_syscall = kvm::doctor::cached().needs_syscall_repair();
        // SE mode traps system calls itself (one MMIO write at LSTAR,
        // which works whether SYSCALL enters CPL0 or not): no repair.
        let repair = sc.cpu.syscall_repair && broken_syscall && !se_mode;
        if se_mode {
            tracing::info!(
                "SE mode: system calls reach kvmsim through the stub at LSTAR {:#x} (one MMIO write \
                 per call; kvmsim returns as sysretq does); {}; no vDSO (time calls are system calls); \
                 {} CPU(s), one thread each (no time-slicing); no fork or execve",
                se::ENTRY_VA,
                if broken_syscall {
                    "this host's SYSCALL stays at CPL3 (kvmsim doctor), so the stub runs at CPL3"
                } else {
                    "SYSCALL enters CPL0 here, so the stub runs at CPL0"
                },
                ncpus
            );
        }
        // Where this host's KVM does not exit at kernel-mode interrupt
        // windows, stepping finds them exactly; Linux does not need the exact
        // instruction, and stepping its interrupts-off sections nearly
        // doubles a boot's host time.
        // Under the GDB stub it is off too unless asked for: its steps and
        // the debugger's breakpoints and steps share the guest-debug state,
        // and with several CPUs a breakpoint hit was seen to go missing
        // (once in 14 runs of gdb.rs's tests on a busy host; none in 10
        // without the assist). The cause is not found yet.
        let debugged = sim.gdb.is_some();
        let irq_window_step = sc
            .cpu
            .irq_window_step
            .unwrap_or(kernel.is_none() && !debugged);
        if !irq_window_step
            && kvm::probe::window_assist().step
            && console::first_time("irq-window-step-off")
        {
            tracing::info!(
                "{name}: this host's KVM does not exit when kernel-mode code enables interrupts \
                 (kvmsim doctor); a waiting interrupt is taken at the next exit where the guest \
                 accepts it{} (system.cpu.irq_window_step = true steps to the exact instruction)",
                if kernel.is_some() {
                    ", as suits Linux"
                } else if debugged {
                    ", as under the GDB stub"
                } else {
                    ""
                }
            );
        }
        // PC events: symbols resolved and slots checked before anything runs.
        let pc_events = if sc.cpu.pc_event.is_empty() {
            None
        } else {
            let kernel_path = sc.kernel.clone();
            let ev = crate::pc_events::resolve(&name, sc, || {
                if !restoring {
                    return Ok(std::borrow::Cow::Borrowed(&image[..]));
                }
                // A restore loads no image: read it again for its symbols.
                let img = read_image(&kernel_path)?;
                if crate::linux::is_bzimage(&img) {
                    let k = crate::linux::parse(&img, &kernel_path)
                        .map_err(|e| PlatformError::Kernel(e.to_string()))?;
                    return Ok(k.elf.into());
                }
                Ok(img.into())
            })?;
            crate::pc_events::check_host(&name, &ev, repair)?;
            for e in &ev.events {
                tracing::info!(
                    "{name}: PC event {} at {:#x}: {:?}",
                    e.name,
                    e.addr,
                    e.action
                );
            }
            Some(ev)
        };
        let pc_addrs = pc_events.as_ref().map_or(Vec::new(), |e| e.addresses());
        let (total, avail) = stats.maybe_counter(
            &format!("{name}.totalNumInsts"),
            "Guest instructions executed by all CPUs of the system (nan: not countable here)",
            "Count",
        )?;
        stats.count_sim_insts(&total, &avail)?;

        let mut kcpus = Vec::with_capacity(ncpus);
        for (index, mut vcpu) in vcpus.into_iter().enumerate() {
            let mut arch = X86_64::new();
            // Before the repair arms its breakpoint (check_host left it a slot).
            for &a in &pc_addrs {
                arch.add_pc_event(a)?;
            }
            if kernel.is_some() || multiboot.is_some() {
                boot::set_boot_msrs(&mut vcpu)?;
            }
            if index == 0 && !restoring {
                match (multiboot_info, se_entry) {
                    (_, Some(e)) => boot::enter_user_mode(
                        &mut arch,
                        &mut vcpu,
                        &boot::UserEntry {
                            rip: e.rip,
                            rsp: e.rsp,
                            cr3: e.cr3,
                            gdt_base: se::GDT_VA,
                            idt_base: se::IDT_VA,
                            idt_limit: (se::IDT_VECTORS * 16 - 1) as u16,
                            tss_base: se::TSS_VA,
                            lstar: se::ENTRY_VA,
                        },
                    )?,
                    // The Multiboot state: EAX magic, EBX the information.
                    (Some(ebx), None) => boot::enter_protected_mode(
                        &mut arch,
                        &mut vcpu,
                        entry as u32,
                        crate::multiboot::BOOTLOADER_MAGIC,
                        ebx,
                        stack as u32,
                    )?,
                    (None, None) => {
                        boot::enter_long_mode(&mut arch, &mut vcpu, entry, stack, &args)?
                    }
                }
            }
            // SE mode: every other CPU waits on the park page, on the park
            // tables, with a TSS and kernel stack of its own, for a thread.
            if index > 0 && !restoring && se_entry.is_some() {
                boot::enter_user_mode(
                    &mut arch,
                    &mut vcpu,
                    &boot::UserEntry {
                        rip: se::PARK_VA,
                        rsp: 0,
                        cr3: se_park_cr3,
                        gdt_base: se::GDT_VA,
                        idt_base: se::IDT_VA,
                        idt_limit: (se::IDT_VECTORS * 16 - 1) as u16,
                        tss_base: se::tss_va(index),
                        lstar: se::ENTRY_VA,
                    },
                )?;
            }
            // Repairs the host's KVM needs, as kvmsim doctor's probes found.
            if repair {
                arch.enable_syscall_repair(&mut vcpu)?;
                // Once per process, not once per system.
                if console::first_time("syscall-repair") {
                    tracing::info!(
                        "repair applied: SYSCALL from user mode does not enter kernel mode \
                         on this host; kvmsim completes it from the page fault it raises"
                    );
                }
            }
            let cpu_name = if ncpus == 1 {
                format!("{name}.cpu")
            } else {
                format!("{name}.cpu{index}")
            };
            let mut cpu = KvmCpu::new(
                &cpu_name,
                vcpu,
                arch,
                KvmCpuConfig {
                    clock: ClockDomain::from_hz(sc.cpu.clock.0),
                    host_freq_hz: host_freq,
                    host_factor,
                },
                CpuOptions {
                    timer,
                    max_insts: sc.cpu.max_insts,
                    coalesced_mmio: !sc.coalesced_mmio.is_empty(),
                    index,
                    irq_window_step,
                },
                &mut stats,
            )?;
            cpu.set_total_insts(total.clone(), avail.clone());
            cpu.set_guest_memory(ram.memory().clone());
            if index > 0 && !restoring {
                // An AP waits for INIT and SIPI.
                cpu.reset_for_init();
            }
            kcpus.push(cpu);
        }
        if let Some(t) = &sc.cpu.trace {
            let file = if name == "system" {
                "trace.txt".to_string()
            } else {
                format!("trace.{name}.txt")
            };
            let path = out.file(&file);
            let f = std::fs::File::create(&path)
                .map_err(|source| crate::output::OutputError { path, source })?;
            kcpus[0].set_trace(kvm::cpu::Trace {
                from: t.from.0,
                insts: t.insts,
                out: Box::new(std::io::BufWriter::new(f)),
            });
        }

        let mut bus = IoBus::new(&mut stats, &format!("{name}.iobus"))?;
        let mut timed: Vec<TimedHandle> = Vec::new();
        let cpu_names: Vec<String> = kcpus.iter().map(|c| c.name().to_string()).collect();
        // The CPUs' controllers and where vectored device interrupts go.
        let mut vector_intc = None;
        let (intcs, lapics, vectors, ioapic, irqs): Controllers = if sc.platform == "pc" {
            let pc = build_pc(&name, &cpu_names, sc, &mut bus, &mut stats, &mut timed)?;
            let intcs = pc.lapics.iter().map(|l| l.clone() as CpuIntc).collect();
            let vectors = pc.lapics[0].clone();
            (intcs, pc.lapics, vectors, Some(pc.ioapic), Some(pc.isa))
        } else if ncpus > 1 {
            // A bare machine with several CPUs: a local APIC each (no I/O
            // APIC, no 8259), so that the BSP can start the others.
            let lapics = build_lapics(&name, &cpu_names, None, &mut bus, &mut stats)?;
            let intcs = lapics.iter().map(|l| l.clone() as CpuIntc).collect();
            let vectors = lapics[0].clone();
            (intcs, lapics, vectors, None, None)
        } else {
            let v = Arc::new(Mutex::new(VectorIntc::new()));
            vector_intc = Some(v.clone());
            (vec![v.clone()], Vec::new(), v, None, None)
        };
        for l in &lapics {
            mem::lock(l).offer_x2apic(sc.x2apic);
        }
        for (cpu, intc) in kcpus.iter_mut().zip(&intcs) {
            cpu.set_interrupt_controller(intc.clone());
        }
        if let Some(dev) = &se_dev {
            bus.insert(
                Space::Mmio,
                se::SE_MMIO_BASE,
                se::SE_MMIO_SIZE,
                "se",
                dev.clone(),
            )?;
            // Timer signals, thread wakes and starts, TLB shootdowns: an
            // interrupt at the thread's CPU (its local APIC with several
            // CPUs, which then also takes the EOI).
            // No kernel enables the APICs: kvmsim does (SVR's enable bit,
            // spurious vector 0xff), as a kernel would at boot.
            for l in &lapics {
                let mut reqs = Vec::new();
                let mut ctx = AccessCtx::new(0, &mut reqs);
                mem::BusDevice::write(
                    &mut *mem::lock(l),
                    Space::Mmio,
                    0xf0,
                    &0x1ffu32.to_le_bytes(),
                    &mut ctx,
                );
            }
            mem::lock(dev).set_link(Box::new(SeCpus {
                vectors: vectors.clone(),
                lapics: lapics.clone(),
            }));
            timed.push(dev.clone());
        }
        // In SE mode stdin is the program's, not the console's.
        let input = if sc.serial.stdin && !se_mode {
            console::spawn_stdin_reader()
        } else {
            None
        };
        let (log, prefix) = if name == "system" {
            ("serial.log".to_string(), None)
        } else {
            (format!("serial.{name}.log"), Some(format!("[{name}] ")))
        };
        let sink = SerialSink::new(out.serial_log(&log)?, sc.serial.stdout, prefix);
        let mut uart = Uart16550::new(Box::new(sink), input, &mut stats, &format!("{name}.uart"))?;
        if let Some(isa) = &irqs {
            uart.set_irq_line(isa[4].clone());
        }
        bus.insert(
            Space::Pio,
            COM1_BASE,
            UART_PORTS,
            "uart",
            Arc::new(Mutex::new(uart)),
        )?;
        crate::qemu_compat::attach(
            &name,
            sc,
            is_multiboot,
            &mut bus,
            &mut stats,
            irqs.as_deref(),
            ioapic.as_ref(),
        )?;
        let mut simops = SimOps::new(&mut stats, &format!("{name}.simops"))?;
        simops.set_readfile(sc.readfile.as_ref().map(std::path::PathBuf::from));
        if ncpus > 1 {
            simops.count_per_cpu(&mut stats, &format!("{name}.simops"), ncpus)?;
        }
        bus.insert(
            Space::Mmio,
            SIMOPS_BASE,
            SIMOPS_SIZE,
            "simops",
            Arc::new(Mutex::new(simops)),
        )?;
        let timer_dev = Arc::new(Mutex::new(IntervalTimer::new(
            vectors.clone(),
            &mut stats,
            &format!("{name}.timer"),
        )?));
        bus.insert(
            Space::Mmio,
            TIMER_BASE,
            TIMER_SIZE,
            "timer",
            timer_dev.clone(),
        )?;
        timed.push(timer_dev);
        let disks = match &ioapic {
            Some(io) => {
                // A restore: the images as the checkpoint saw them, and each
                // overlay disk's saved sectors under a new overlay.
                let layers = match from {
                    Some(r) => crate::disks::prepare_restore(
                        &name,
                        &mut sc.disk,
                        r.dir,
                        &r.state.disks,
                        &out,
                    )?,
                    None => Vec::new(),
                };
                crate::disks::attach(
                    &name, &sc.disk, &layers, &ram, io, &mut bus, &mut stats, &mut timed,
                )?
            }
            None if !sc.disk.is_empty() => {
                return Err(PlatformError::Setup(format!(
                    "{name}.disk: disks need the pc platform (a Linux kernel, or platform = \"pc\")"
                )))
            }
            None if from.is_some_and(|r| !r.state.disks.is_empty()) => {
                return Err(PlatformError::Checkpoint(format!(
                    "{name}: the checkpoint holds disks, but the system is not on the pc platform"
                )))
            }
            None => Vec::new(),
        };
        let nic_ends: Vec<(u32, crate::nics::NicEnd)> = links
            .iter()
            .filter_map(|l| Some((l.port, l.nic?)))
            .collect();
        let nics = match &ioapic {
            Some(io) => crate::nics::attach(
                &name,
                sc.disk.len(),
                &nic_ends,
                &ram,
                io,
                &mut bus,
                &mut stats,
                &mut timed,
            )?,
            None if !nic_ends.is_empty() => {
                return Err(PlatformError::Setup(format!(
                    "{name}: an Ethernet link needs the pc platform (a Linux kernel, or \
                     platform = \"pc\")"
                )))
            }
            None => Vec::new(),
        };
        let timed: Vec<Timed> = timed
            .into_iter()
            .map(|dev| Timed { dev, event: None })
            .collect();
        let mut mailboxes = Vec::new();
        for l in links.iter().filter(|l| l.nic.is_none()) {
            let mb = Arc::new(Mutex::new(Mailbox::new(
                l.port,
                l.latency,
                vectors.clone(),
                &mut stats,
                &format!("{name}.link{}", l.port),
            )?));
            bus.insert(
                Space::Mmio,
                MAILBOX_BASE + MAILBOX_SIZE * u64::from(l.port),
                MAILBOX_SIZE,
                &format!("link{}", l.port),
                mb.clone(),
            )?;
            mailboxes.push(mb);
        }

        let drains = stats.counter(
            &format!("{name}.numDrains"),
            "Completed drains (every CPU consistent)",
            "Count",
        )?;
        let ipis_sent = stats.counter(
            &format!("{name}.numIpis"),
            "Inter-processor interrupts sent (one per target CPU)",
            "Count",
        )?;

        let mut queue = EventQueue::new();
        if let Some(max) = sim.max_time {
            queue.schedule(max.0, SIM_EXIT_PRI, SysEvent::MaxTick)?;
        }
        if let Some(p) = sim.drain_period {
            queue.schedule(p.0, DEFAULT_PRI, SysEvent::Drain { period: p.0 })?;
        }
        if let Some(t) = sim.checkpoint_at {
            queue.schedule(t.0, DEFAULT_PRI, SysEvent::Checkpoint { period: 0 })?;
        }
        let mut slots = Vec::with_capacity(ncpus);
        let mut inboxes = Vec::with_capacity(ncpus);
        for (index, (cpu, intc)) in kcpus.into_iter().zip(intcs).enumerate() {
            let mut q = EventQueue::new();
            q.schedule(0, STARTUP_PRI, CpuEvent::Startup)?;
            if let Some(p) = sim.sample_period {
                q.schedule(p.0, DEFAULT_PRI, CpuEvent::Sample { period: p.0 })?;
            }
            let tick_event = if index == 0 {
                Some(q.schedule(0, CPU_TICK_PRI, CpuEvent::Tick)?)
            } else {
                None
            };
            let progress = (index == 0
                && name == "system"
                && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .then(|| Progress::new(cpu.exit_counter(), cpu.kick_handle()));
            inboxes.push(Inbox {
                items: Mutex::new(Vec::new()),
                full: AtomicBool::new(false),
                kick: cpu.kick_handle(),
            });
            let ipis_received = stats.counter(
                &format!("{}.numIpisReceived", cpu.name()),
                "Inter-processor interrupts that arrived at this CPU",
                "Count",
            )?;
            let windows = stats.counter(
                &format!("{}.numWindows", cpu.name()),
                "Lock-step windows of sim.quantum this CPU's thread ran (runs of several \
                 CPUs or systems; 0 when it ran alone)",
                "Count",
            )?;
            let window_wait = stats.value(
                &format!("{}.windowWaitSeconds", cpu.name()),
                "Host time this CPU's thread spent at window ends (waiting for the other threads; servicing switches)",
                "Second",
            )?;
            let pc = match &pc_events {
                Some(ev) => Some(PcSlot {
                    counts: stats.vector(
                        &format!("{}.pcEvents", cpu.name()),
                        "Times this CPU reached each PC event (system.cpu.pc_event)",
                        "Count",
                        &ev.names(),
                    )?,
                    events: ev.clone(),
                }),
                None => None,
            };
            slots.push(CpuSlot {
                index,
                queue: q,
                tick_event,
                next: 0,
                intc,
                lapic: lapics.get(index).cloned(),
                timer_event: None,
                requests: Vec::new(),
                // SE mode's other CPUs are idle, not waiting for SIPI.
                waiting_sipi: index > 0 && !se_mode,
                drain_stopped: false,
                // cpu-samples[.SYSTEM][.cpuK].txt
                samples: format!(
                    "cpu-samples{}{}.txt",
                    if name == "system" {
                        String::new()
                    } else {
                        format!(".{name}")
                    },
                    if ncpus == 1 {
                        String::new()
                    } else {
                        format!(".cpu{index}")
                    }
                ),
                progress,
                ipis_received,
                windows,
                window_wait,
                posted: Tick::MAX,
                debug: crate::gdb::DebugHook::default(),
                pc,
                cpu,
            });
        }
        tracing::debug!(
            "{name}: {ncpus} CPU(s), entry {entry:#x}, stack {stack:#x}, host_freq {host_freq} Hz, \
             timer {timer:?}"
        );
        Ok(System {
            cpus: slots,
            shared: Shared {
                name,
                bus,
                out,
                core: Mutex::new(Core {
                    queue,
                    timed,
                    stats,
                    ioapic,
                    periodic_dump: None,
                    periodic_reset: None,
                    draining: false,
                    checkpoint_pending: false,
                    drains,
                    mailboxes,
                    outgoing: Vec::new(),
                    nics,
                }),
                inboxes,
                lapics,
                vector_intc,
                ipi_latency: sc.ipi_latency.0,
                exited: AtomicBool::new(false),
                drained: std::sync::atomic::AtomicUsize::new(0),
                ckpt_ready: AtomicBool::new(false),
                ipis_sent,
                net_stats: None,
                disks,
            },
            _vm: vm,
            _ram: ram,
        })
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        mem::lock(&self.shared.core)
    }

    /// Takes the values sent on links since the last call.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.core().outgoing)
    }

    /// Schedules the arrival of `data` on link port `port` at `at`, which
    /// must not lie before the current tick.
    pub fn schedule_delivery(
        &mut self,
        port: u32,
        at: Tick,
        data: u64,
    ) -> Result<(), PlatformError> {
        self.core()
            .queue
            .schedule(at, DEFAULT_PRI, SysEvent::LinkDeliver { port, data })?;
        Ok(())
    }

    /// The system's statistics at `now`.
    pub fn stats_dump(&self, now: Tick) -> sim::stats::Dump {
        self.core().stats.dump(now)
    }

    /// Every device on this system's bus whose state a checkpoint holds,
    /// once each, with its name ([`mem::IoBus::state_owners`]).
    pub fn state_owners(&self) -> Vec<(String, mem::DeviceHandle)> {
        self.shared.bus.state_owners()
    }

    /// The system's dotted name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The number of CPUs.
    pub fn cpu_count(&self) -> usize {
        self.cpus.len()
    }

    /// The current simulated tick: the furthest any of the system's queues
    /// has come.
    pub fn cur_tick(&self) -> Tick {
        self.cpus
            .iter()
            .map(|s| s.queue.cur_tick())
            .chain([self.core().queue.cur_tick(), self.shared.bus.device_time()])
            .max()
            .unwrap_or(0)
    }

    /// The output folder.
    pub fn out(&self) -> &OutDir {
        &self.shared.out
    }

    /// A dump of the whole state of every CPU.
    pub fn dump_cpu(&mut self) -> String {
        let many = self.cpus.len() > 1;
        let mut s = String::new();
        for slot in &mut self.cpus {
            if many {
                s.push_str(&format!("{}:\n", slot.cpu.name()));
            }
            s.push_str(&slot.cpu.dump());
        }
        s
    }

    /// One line of CPU 0's state: RIP, RSP, CPL, RFLAGS, CR2, the first
    /// argument registers, the top of the stack, KVM's pending events and
    /// the interrupt controller's state.
    pub fn cpu_sample(&mut self) -> String {
        self.cpus[0].sample()
    }

    /// A handle that forces CPU 0 out of KVM from any thread.
    pub fn kick_handle(&self) -> KickHandle {
        self.cpus[0].cpu.kick_handle()
    }

    /// Handles that force each CPU out of KVM from any thread.
    pub fn kick_handles(&self) -> Vec<KickHandle> {
        self.cpus.iter().map(|s| s.cpu.kick_handle()).collect()
    }

    /// Holds CPU `i` (`true`: its thread runs none of its events, see
    /// [`crate::gdb`]) or lets it run.
    pub fn set_debug_held(&mut self, i: usize, held: bool) {
        if let Some(s) = self.cpus.get_mut(i) {
            s.debug.held = held;
        }
    }

    /// Before the CPUs run in new threads again (after a debugger's stop):
    /// each thread binds its CPU's run timer to itself, as at the start.
    pub fn startup_threads(&mut self) -> Result<(), PlatformError> {
        for slot in &mut self.cpus {
            let at = slot.queue.cur_tick();
            slot.queue.schedule(at, STARTUP_PRI, CpuEvent::Startup)?;
        }
        Ok(())
    }

    /// Asks for a checkpoint of this system at its current tick (every CPU
    /// drains; the run stops when all have).
    pub fn request_checkpoint(&mut self) -> Result<(), PlatformError> {
        let cpu0 = self.cpus[0].queue.cur_tick();
        let mut core = self.core();
        if !core.checkpoint_pending && !self.shared.ckpt_ready.load(Ordering::Acquire) {
            // CPU 0's thread runs the system's queue: now, in its time.
            let at = cpu0.max(core.queue.cur_tick());
            core.queue
                .schedule(at, DEFAULT_PRI, SysEvent::Checkpoint { period: 0 })?;
        }
        Ok(())
    }

    /// The simulated time CPU `i`'s queue has reached.
    pub fn cpu_tick(&self, i: usize) -> Option<Tick> {
        self.cpus.get(i).map(|s| s.queue.cur_tick())
    }

    /// CPU `i` (a debugger reads and changes its state between windows).
    pub fn cpu_mut(&mut self, i: usize) -> Option<&mut KvmCpu<X86_64>> {
        self.cpus.get_mut(i).map(|s| &mut s.cpu)
    }

    /// The guest's RAM.
    pub fn guest_memory(&self) -> &vm_memory::GuestMemoryMmap {
        self._ram.memory()
    }

    /// Gives a debugger a flag that, once set (from any thread, with a
    /// kick), stops CPU `i` at its next consistent point.
    pub fn set_debug_interrupt(&mut self, i: usize, flag: Arc<AtomicBool>) {
        if let Some(s) = self.cpus.get_mut(i) {
            s.debug.interrupt = Some(flag);
        }
    }

    /// Why CPU `i` stopped for the debugger, if it did (taken).
    pub fn take_debug_halt(&mut self, i: usize) -> Option<crate::gdb::DebugHalt> {
        self.cpus.get_mut(i).and_then(|s| s.debug.stopped.take())
    }

    /// Resets the statistics at `now` (as the guest's reset request does).
    pub fn reset_stats(&mut self, now: Tick) {
        self.core().stats.reset(now);
    }

    /// True once the system has ended (its exit is recorded).
    pub fn has_ended(&self) -> bool {
        self.shared.exited.load(Ordering::Acquire)
    }

    /// Runs until something ends the simulation (one CPU: on this thread;
    /// several: one thread each, in windows of `quantum`).
    /// A checkpoint asked for here is not written (that takes a
    /// [`crate::Simulation`]): the CPUs drain and go on.
    pub fn run(&mut self) -> Result<ExitEvent, PlatformError> {
        loop {
            let end = if self.cpus.len() > 1 {
                let q = crate::config::DEFAULT_SMP_QUANTUM;
                match crate::simulation::run_threads(
                    std::slice::from_mut(self),
                    q,
                    false,
                    None,
                    &mut [None],
                )? {
                    crate::simulation::RunEnd::Exits(mut v) => v.pop(),
                    crate::simulation::RunEnd::Checkpoint => None,
                    // No debugger here: nothing stops for one.
                    crate::simulation::RunEnd::Debug => continue,
                }
            } else {
                self.run_until_checkpoint()?
            };
            match end {
                Some(exit) => return Ok(exit),
                None => {
                    tracing::warn!(
                        "{}: a checkpoint was asked for, but this run writes none",
                        self.shared.name
                    );
                    self.resume_after_checkpoint()?;
                }
            }
        }
    }

    /// Runs a single-CPU system on this thread until it exits (`Some`) or
    /// stops for a checkpoint (`None`: every CPU drained; write it, then
    /// [`System::resume_after_checkpoint`]).
    pub fn run_until_checkpoint(&mut self) -> Result<Option<ExitEvent>, PlatformError> {
        loop {
            if let Some(exit) = self.run_window(None)? {
                return Ok(Some(exit));
            }
            if self.checkpoint_ready() {
                return Ok(None);
            }
        }
    }

    /// Runs the events before `end` (all of them if `None`) on this thread;
    /// returns the exit if the system exits in that window. Only for a
    /// single-CPU system (several CPUs run through [`System::threads`]).
    pub fn run_window(&mut self, end: Option<Tick>) -> Result<Option<ExitEvent>, PlatformError> {
        let mut threads = self.threads();
        threads[0].run_window(end)
    }

    /// One handle per CPU, each to be driven by a thread of its own.
    pub fn threads(&mut self) -> Vec<CpuThread<'_>> {
        let shared = &self.shared;
        self.cpus
            .iter_mut()
            .map(|slot| CpuThread {
                shared,
                slot,
                sys_next: None,
                seen_accesses: u64::MAX,
            })
            .collect()
    }

    /// Adds the links' and switches' statistics (as of the last window
    /// boundary) to this system's dumps during the run.
    pub fn attach_net_stats(&mut self, s: crate::simulation::NetSnapshot) {
        self.shared.net_stats = Some(s);
    }

    /// Appends a stats dump at `now` to stats.txt and stats.json.
    pub fn dump_stats(&mut self, now: Tick) -> Result<(), PlatformError> {
        let dump = self.shared.dump_with_net(&self.core().stats, now);
        self.shared.out.write_dump(&dump)?;
        Ok(())
    }

    /// Final statistics and exit.json after `exit` (a single-system run).
    pub fn finish(&mut self, exit: &ExitEvent, status: i32) -> Result<(), PlatformError> {
        self.dump_stats(exit.tick)?;
        crate::report::write_exit_json(
            &self.shared.out,
            &[(self.shared.name.clone(), exit.clone())],
            status,
        )
    }
}

impl CpuSlot {
    fn sample(&mut self) -> String {
        let intc = mem::lock(&self.intc).describe();
        let state = self.cpu.state();
        let (arch, vcpu) = self.cpu.arch_mut();
        match arch.sample(vcpu) {
            Ok(s) => format!("{s} state={state:?} {intc}"),
            Err(e) => format!("(registers unavailable: {e})"),
        }
    }
}

/// One CPU of a system, with what it shares with the others: what a host
/// thread drives through the windows of a run.
pub struct CpuThread<'a> {
    shared: &'a Shared,
    slot: &'a mut CpuSlot,
    /// CPU 0: the tick of the system queue's next event, as last seen
    /// (what bounds the CPU's run; other threads only add events later
    /// than their own time, which the window bounds anyway).
    sys_next: Option<Tick>,
    /// The bus's count of shared-device accesses when this thread last
    /// refreshed the shared devices' deadlines.
    seen_accesses: u64,
}

/// Which queue the next event comes from.
enum Next {
    Cpu,
    Sys,
}

impl CpuThread<'_> {
    /// The CPU's index in its system.
    pub fn index(&self) -> usize {
        self.slot.index
    }

    /// Counts a lock-step window this thread ran, and the host time it
    /// then waited for the other threads.
    pub fn count_window(&self, waited: std::time::Duration) {
        self.slot.windows.inc();
        self.slot.window_wait.add(waited.as_secs_f64());
    }

    /// The system's name.
    pub fn system_name(&self) -> &str {
        &self.shared.name
    }

    /// True if the CPU stopped for the debugger in its last window.
    pub fn debug_stopped(&self) -> bool {
        self.slot.debug.stopped.is_some()
    }

    /// True while the debugger holds this CPU (it runs nothing while
    /// another CPU of the system steps or continues alone).
    pub fn debug_held(&self) -> bool {
        self.slot.debug.held
    }

    /// True once some thread of this system ended the run.
    pub fn system_exited(&self) -> bool {
        self.shared.exited.load(Ordering::Acquire)
    }

    /// True once every CPU of the system drained for a checkpoint: the
    /// thread runs nothing until the system is resumed.
    pub fn checkpoint_ready(&self) -> bool {
        self.shared.ckpt_ready.load(Ordering::Acquire)
    }

    /// True while a checkpoint has been asked for and not yet taken.
    pub fn checkpoint_pending(&self) -> bool {
        self.checkpoint_ready() || mem::lock(&self.shared.core).checkpoint_pending
    }

    /// Asks for a checkpoint now (another system of the run asked for one:
    /// every system drains for it).
    pub fn request_checkpoint(&self) -> Result<(), PlatformError> {
        let mut core = mem::lock(&self.shared.core);
        if !core.checkpoint_pending && !self.checkpoint_ready() {
            let now = core.queue.cur_tick().max(self.slot.queue.cur_tick());
            core.queue
                .schedule(now, DEFAULT_PRI, SysEvent::Checkpoint { period: 0 })?;
        }
        Ok(())
    }

    /// Marks the system as ended (returns false if it already was).
    pub fn mark_exited(&self) -> bool {
        !self.shared.exited.swap(true, Ordering::AcqRel)
    }

    /// Takes the values sent on links since the last call.
    pub fn take_outgoing(&self) -> Vec<Outgoing> {
        std::mem::take(&mut mem::lock(&self.shared.core).outgoing)
    }

    /// Takes the frames the NICs sent since the last call, with their
    /// link ports, NIC by NIC in port order.
    pub fn take_frames(&self) -> Vec<(u32, devices::virtio::net::SentFrame)> {
        take_frames(&mem::lock(&self.shared.core).nics)
    }

    /// Schedules the arrival of `frame` at the NIC of link port `port` at
    /// `at`.
    pub fn schedule_frame(
        &self,
        port: u32,
        at: Tick,
        frame: Arc<[u8]>,
    ) -> Result<(), PlatformError> {
        mem::lock(&self.shared.core).queue.schedule(
            at,
            DEFAULT_PRI,
            SysEvent::FrameDeliver { port, frame },
        )?;
        Ok(())
    }

    /// Schedules the arrival of `data` on link port `port` at `at`.
    pub fn schedule_delivery(&self, port: u32, at: Tick, data: u64) -> Result<(), PlatformError> {
        mem::lock(&self.shared.core).queue.schedule(
            at,
            DEFAULT_PRI,
            SysEvent::LinkDeliver { port, data },
        )?;
        Ok(())
    }

    /// The tick of the next thing this thread has to do (its CPU's queue
    /// and, for CPU 0, the system's), or `None` if nothing is scheduled:
    /// between windows, when nothing can happen before it, the windows up
    /// to it can be skipped, and a system none of whose threads has
    /// anything left has halted for good.
    pub fn next_activity(&mut self) -> Option<Tick> {
        if self.shared.inboxes[self.slot.index]
            .full
            .load(Ordering::Acquire)
        {
            return Some(self.cur_tick());
        }
        let posted = std::mem::replace(&mut self.slot.posted, Tick::MAX);
        let own = match self.slot.queue.next_tick() {
            Some(t) => Some(t.min(posted)),
            None => (posted != Tick::MAX).then_some(posted),
        };
        let sys = if self.slot.index == 0 {
            mem::lock(&self.shared.core).queue.next_tick()
        } else {
            None
        };
        match (own, sys) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The simulated time this thread has reached.
    pub fn cur_tick(&self) -> Tick {
        let own = self.slot.queue.cur_tick();
        if self.slot.index == 0 {
            own.max(mem::lock(&self.shared.core).queue.cur_tick())
        } else {
            own
        }
    }

    /// Runs this CPU's events (and, for CPU 0, the system's) before `end`
    /// (all of them if `None`); returns the exit if the run ends here. Stops
    /// early, with `Ok(None)`, once another thread of the system ended it.
    pub fn run_window(&mut self, end: Option<Tick>) -> Result<Option<ExitEvent>, PlatformError> {
        if end.is_some_and(|end| end <= self.cur_tick()) {
            // This thread is past the window already (a run resumed after a
            // checkpoint starts with the window of the system furthest behind).
            return Ok(None);
        }
        let window = match end {
            Some(end) => Some(
                self.slot
                    .queue
                    .schedule(end, WINDOW_PRI, CpuEvent::WindowEnd)?,
            ),
            None => None,
        };
        let r = self.run_events();
        if !matches!(r, Ok(None)) || self.system_exited() || self.checkpoint_ready() {
            if let Some(id) = window {
                let _ = self.slot.queue.deschedule(id);
            }
            if let Some(p) = &mut self.slot.progress {
                p.finish();
            }
        } else if self.slot.debug.stopped.is_some() {
            // Stopped mid-window for the debugger: the window is run again
            // when GDB resumes, with a window end of its own.
            if let Some(id) = window {
                let _ = self.slot.queue.deschedule(id);
            }
        }
        r
    }

    fn run_events(&mut self) -> Result<Option<ExitEvent>, PlatformError> {
        loop {
            if let Some(p) = &mut self.slot.progress {
                p.update(self.slot.queue.cur_tick());
            }
            if console::interrupted() {
                // The CPU may have run past the last event: its time counts.
                let at = self.cur_tick().max(self.slot.next);
                return Ok(Some(ExitEvent::new(
                    ExitCause::UserInterrupt,
                    0,
                    at,
                    "interrupted by the user (SIGINT/SIGTERM)",
                )));
            }
            if self.system_exited() || self.checkpoint_ready() {
                return Ok(None);
            }
            // A debugger stopped the CPU: the window ends here (crate::gdb).
            if self.slot.debug.should_stop(self.slot.cpu.state()) {
                return Ok(None);
            }
            self.take_inbox()?;
            let own = self.slot.queue.peek_key();
            let sys = if self.slot.index == 0 {
                mem::lock(&self.shared.core).queue.peek_key()
            } else {
                None
            };
            self.sys_next = sys.map(|(t, _, _)| t);
            let next = match (own, sys) {
                (None, None) => {
                    return Ok(Some(ExitEvent::new(
                        ExitCause::GuestHalted,
                        0,
                        self.cur_tick(),
                        "the CPU halted and no event is left that could wake it",
                    )))
                }
                (Some(_), None) => Next::Cpu,
                (None, Some(_)) => Next::Sys,
                (Some((ct, cp, _)), Some((st, sp, _))) => {
                    if (st, sp) <= (ct, cp) {
                        Next::Sys
                    } else {
                        Next::Cpu
                    }
                }
            };
            let exit = match next {
                Next::Sys => {
                    let mut core = mem::lock(&self.shared.core);
                    let Some((tick, id, ev)) = core.queue.pop() else {
                        continue;
                    };
                    self.handle_sys(&mut core, tick, id, ev)?
                }
                Next::Cpu => {
                    let Some((tick, _, ev)) = self.slot.queue.pop() else {
                        continue;
                    };
                    if ev == CpuEvent::WindowEnd {
                        return Ok(None);
                    }
                    self.handle_cpu(tick, ev)?
                }
            };
            if let Some(exit) = exit {
                return Ok(Some(exit));
            }
        }
    }

    /// Moves what other threads posted into this CPU's queue, each at its
    /// arrival tick or now if that has passed.
    fn take_inbox(&mut self) -> Result<(), PlatformError> {
        let inbox = &self.shared.inboxes[self.slot.index];
        if !inbox.full.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let items = std::mem::take(&mut *mem::lock(&inbox.items));
        let now = self.cur_tick();
        for (at, a) in items {
            self.slot
                .queue
                .schedule(at.max(now), DEFAULT_PRI, CpuEvent::Arrive(a))?;
        }
        Ok(())
    }

    fn handle_cpu(&mut self, tick: Tick, ev: CpuEvent) -> Result<Option<ExitEvent>, PlatformError> {
        match ev {
            CpuEvent::Startup => self.slot.cpu.startup_thread()?,
            CpuEvent::WindowEnd => {}
            // A drained CPU does not run until the drain ends.
            CpuEvent::Tick if self.slot.drain_stopped => self.slot.tick_event = None,
            CpuEvent::Tick => return self.cpu_tick(tick),
            CpuEvent::ApicTimer => {
                self.slot.timer_event = None;
                if let Some(l) = &self.slot.lapic {
                    let mut ctx = AccessCtx::new(tick, &mut self.slot.requests);
                    ctx.cpu_index = self.slot.index;
                    mem::lock(l).on_deadline(&mut ctx);
                }
                self.after_activity(tick)?;
                self.wake_if_pending(tick)?;
            }
            CpuEvent::Sample { period } => {
                self.slot.queue.schedule(
                    tick.saturating_add(period),
                    DEFAULT_PRI,
                    CpuEvent::Sample { period },
                )?;
                let line = format!("{tick} {}\n", self.slot.sample());
                let path = self.shared.out.file(&self.slot.samples);
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(line.as_bytes()))
                    .map_err(|source| crate::output::OutputError { path, source })?;
            }
            CpuEvent::Arrive(Arrival::Wake) => self.wake_if_pending(tick)?,
            CpuEvent::Arrive(Arrival::Drain) => self.drain_cpu(tick)?,
            CpuEvent::Arrive(Arrival::Resume) => self.resume(tick)?,
            CpuEvent::Arrive(Arrival::Ipi { mode, vector }) => {
                self.slot.ipis_received.inc();
                self.ipi_arrives(tick, mode, vector)?;
            }
        }
        Ok(None)
    }

    /// An IPI reaches this CPU's local APIC.
    fn ipi_arrives(&mut self, now: Tick, mode: u8, vector: u8) -> Result<(), PlatformError> {
        let Some(l) = self.slot.lapic.clone() else {
            return Ok(());
        };
        match mode {
            0 | 1 => mem::lock(&l).deliver(vector, false),
            4 => mem::lock(&l).deliver_nmi(),
            5 if self.slot.index == 0 && console::first_time("init-to-bsp") => {
                tracing::warn!(
                    "{}: INIT to the bootstrap processor is ignored (there is no firmware \
                     to restart it)",
                    self.slot.cpu.name()
                );
            }
            5 if self.slot.index == 0 => {}
            5 => {
                // INIT: the CPU stops and waits for a startup IPI.
                mem::lock(&l).init_reset();
                self.slot.cpu.reset_for_init();
                if let Some(id) = self.slot.tick_event.take() {
                    let _ = self.slot.queue.deschedule(id);
                }
                self.slot.waiting_sipi = true;
                tracing::debug!("{}: INIT at {now}", self.slot.cpu.name());
            }
            6 if self.slot.waiting_sipi => {
                let (arch, vcpu) = self.slot.cpu.arch_mut();
                boot::enter_sipi(arch, vcpu, vector)?;
                self.slot.waiting_sipi = false;
                self.slot.cpu.wake();
                // A CPU stopped by a drain (it counted itself drained while
                // it waited) runs when the drain ends: running now would
                // count it drained a second time.
                if !self.slot.drain_stopped {
                    self.schedule_cpu(now)?;
                }
                tracing::debug!(
                    "{}: started by SIPI at {now} in real mode at {:#x}",
                    self.slot.cpu.name(),
                    u64::from(vector) << 12
                );
            }
            // A SIPI to a running CPU, and other modes, do nothing.
            _ => {}
        }
        self.after_activity(now)?;
        self.wake_if_pending(now)
    }

    fn cpu_tick(&mut self, tick: Tick) -> Result<Option<ExitEvent>, PlatformError> {
        self.slot.tick_event = None;
        let own = self.slot.queue.next_tick();
        let next = match (own, self.sys_next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let outcome = self
            .slot
            .cpu
            .tick(tick, next, &self.shared.bus, &mut self.slot.requests)?;
        if let Some(addr) = self.slot.cpu.take_pc_hit() {
            // The guest reached the address at the end of the run: the
            // tick the CPU goes on at.
            let at = match &outcome {
                TickOutcome::Next(t) | TickOutcome::DebugStop { next: t, .. } => *t,
                _ => tick,
            };
            self.pc_event(addr, at)?;
        }
        self.after_activity(tick)?;
        match outcome {
            TickOutcome::Next(t) => self.schedule_cpu(t)?,
            // A debugger's breakpoint or step: the run loop stops for it.
            TickOutcome::DebugStop { next, stop } => {
                self.schedule_cpu(next)?;
                self.slot.debug.stopped = Some(crate::gdb::DebugHalt::Stop(stop));
                // Every CPU of the system stops with it (all-stop): the
                // others see the debugger's flag at their next consistent
                // point.
                if let Some(flag) = &self.slot.debug.interrupt {
                    flag.store(true, Ordering::Release);
                    for (j, inbox) in self.shared.inboxes.iter().enumerate() {
                        if j != self.slot.index {
                            inbox.kick.kick();
                        }
                    }
                }
            }
            TickOutcome::Idle => self.wake_if_pending(tick)?,
            TickOutcome::Drained => self.cpu_drained(tick),
            TickOutcome::InstLimit(n, dump) => {
                let who = if self.shared.inboxes.len() > 1 {
                    format!("{} ", self.slot.cpu.name())
                } else {
                    String::new()
                };
                return Ok(Some(ExitEvent::new(
                    ExitCause::MaxInsts,
                    0,
                    tick,
                    format!(
                        "{who}stopped after {n} guest instructions (system.cpu.max_insts)\n{dump}"
                    ),
                )));
            }
            TickOutcome::Unsupported(msg) => {
                let msg = if self.shared.inboxes.len() > 1 {
                    format!("{}: {msg}", self.slot.cpu.name())
                } else {
                    msg
                };
                return Ok(Some(ExitEvent::new(ExitCause::Unsupported, 0, tick, msg)));
            }
            TickOutcome::Fault(report) => {
                let report = if self.shared.inboxes.len() > 1 {
                    format!("{}: {report}", self.slot.cpu.name())
                } else {
                    report
                };
                return Ok(Some(ExitEvent::new(ExitCause::GuestFault, 0, tick, report)));
            }
        }
        Ok(None)
    }

    /// The CPU reached PC events' address `addr` at tick `at`: counts
    /// them and schedules their actions there (on the system's queue, as a
    /// sim-op's; never before the queue's current tick).
    fn pc_event(&mut self, addr: u64, at: Tick) -> Result<(), PlatformError> {
        use crate::config::PcAction;
        let Some(pc) = &self.slot.pc else {
            return Ok(());
        };
        let mut core = mem::lock(&self.shared.core);
        let at = at.max(core.queue.cur_tick());
        for (i, e) in pc.events.at(addr) {
            pc.counts.add(i, 1);
            tracing::debug!(
                "{}: PC event {} at {addr:#x}, tick {at}: {:?}",
                self.slot.cpu.name(),
                e.name,
                e.action
            );
            let (pri, ev) = match e.action {
                PcAction::Count => continue,
                PcAction::DumpStats => (
                    STAT_EVENT_PRI,
                    SysEvent::DumpStats {
                        reset: false,
                        period: 0,
                    },
                ),
                PcAction::DumpResetStats => (
                    STAT_EVENT_PRI,
                    SysEvent::DumpStats {
                        reset: true,
                        period: 0,
                    },
                ),
                PcAction::ResetStats => (STAT_EVENT_PRI, SysEvent::ResetStats { period: 0 }),
                PcAction::Checkpoint => (DEFAULT_PRI, SysEvent::Checkpoint { period: 0 }),
                PcAction::Exit => (
                    SIM_EXIT_PRI,
                    SysEvent::PcExit {
                        name: e.name.clone(),
                        addr,
                        cpu: self.slot.cpu.name().to_string(),
                    },
                ),
            };
            core.queue.schedule(at, pri, ev)?;
        }
        Ok(())
    }

    /// After anything that may have touched devices at `now`: the
    /// requests the devices left, their new deadlines, IPIs sent by this
    /// CPU's APIC, and interrupts delivered to other CPUs' APICs.
    fn after_activity(&mut self, now: Tick) -> Result<(), PlatformError> {
        // Shared devices change their deadlines only when accessed.
        let accesses = self.shared.bus.shared_accesses();
        if !self.slot.requests.is_empty() || accesses != self.seen_accesses {
            let reqs = std::mem::take(&mut self.slot.requests);
            let mut core = mem::lock(&self.shared.core);
            let at = now.max(core.queue.cur_tick());
            service_requests(&mut core, at, reqs)?;
            refresh_deadlines(&mut core)?;
            self.seen_accesses = accesses;
        }
        self.refresh_apic_timer()?;
        if let Some(l) = self.slot.lapic.clone() {
            let ipis = {
                let mut a = mem::lock(&l);
                // This CPU sees its own APIC before every entry.
                a.take_doorbell();
                a.take_ipis()
            };
            for ipi in ipis {
                self.send_ipi(now, &ipi);
            }
        }
        self.ring_doorbells(now);
        Ok(())
    }

    /// Posts `ipi` to every CPU it is for, to arrive after the IPI latency.
    fn send_ipi(&mut self, now: Tick, ipi: &Ipi) {
        let targets = ipi_targets(&self.shared.lapics, self.slot.index, ipi);
        let at = now.saturating_add(self.shared.ipi_latency);
        for j in targets {
            self.shared.ipis_sent.inc();
            self.slot.posted = self.slot.posted.min(at);
            post(
                &self.shared.inboxes[j],
                at,
                Arrival::Ipi {
                    mode: ipi.mode,
                    vector: ipi.vector,
                },
                j != self.slot.index,
            );
        }
    }

    /// Tells every other CPU whose APIC got something that it should look.
    fn ring_doorbells(&mut self, now: Tick) {
        for (j, l) in self.shared.lapics.iter().enumerate() {
            if j != self.slot.index && mem::lock(l).take_doorbell() {
                self.slot.posted = self.slot.posted.min(now);
                post(&self.shared.inboxes[j], now, Arrival::Wake, true);
            }
        }
    }

    fn refresh_apic_timer(&mut self) -> Result<(), PlatformError> {
        let Some(l) = &self.slot.lapic else {
            return Ok(());
        };
        let now = self.slot.queue.cur_tick();
        let want = mem::service_tick(mem::lock(l).next_deadline(), now);
        if self.slot.timer_event.map(|(_, at)| at) == want {
            return Ok(());
        }
        if let Some((old, _)) = self.slot.timer_event.take() {
            let _ = self.slot.queue.deschedule(old);
        }
        if let Some(at) = want {
            let id = self
                .slot
                .queue
                .schedule(at, DEFAULT_PRI, CpuEvent::ApicTimer)?;
            self.slot.timer_event = Some((id, at));
        }
        Ok(())
    }

    fn schedule_cpu(&mut self, at: Tick) -> Result<(), PlatformError> {
        if let Some(old) = self.slot.tick_event.take() {
            let _ = self.slot.queue.deschedule(old);
        }
        let at = at.max(self.slot.queue.cur_tick());
        self.slot.tick_event = Some(self.slot.queue.schedule(at, CPU_TICK_PRI, CpuEvent::Tick)?);
        self.slot.next = at;
        Ok(())
    }

    /// Wakes the CPU if it is idle and its interrupt controller has
    /// something pending.
    fn wake_if_pending(&mut self, now: Tick) -> Result<(), PlatformError> {
        if !self.slot.waiting_sipi
            && !self.slot.drain_stopped
            && self.slot.cpu.state() == kvm::CpuState::Idle
            && mem::lock(&self.slot.intc).pending() != Pending::None
            && self.slot.cpu.wake()
        {
            self.schedule_cpu(now)?;
        }
        Ok(())
    }

    /// This CPU is consistent (nothing in flight): it stops until every
    /// CPU of the system is. The last one counts the drain and resumes
    /// them all (through their inboxes, this one's included).
    fn cpu_drained(&mut self, now: Tick) {
        self.slot.drain_stopped = true;
        // A CPU that drained at once still has its tick scheduled: it runs
        // again when the drain ends (a tick now would count it twice).
        if let Some(id) = self.slot.tick_event.take() {
            let _ = self.slot.queue.deschedule(id);
        }
        let n = self.shared.inboxes.len();
        if self.shared.drained.fetch_add(1, Ordering::AcqRel) + 1 == n {
            self.shared.drained.store(0, Ordering::Release);
            let checkpoint = {
                let mut core = mem::lock(&self.shared.core);
                core.drains.inc();
                core.draining = false;
                std::mem::take(&mut core.checkpoint_pending)
            };
            if checkpoint {
                // Every CPU stays stopped; the run stops for the checkpoint
                // and resumes them afterwards (System::resume).
                self.shared.ckpt_ready.store(true, Ordering::Release);
                return;
            }
            for (j, inbox) in self.shared.inboxes.iter().enumerate() {
                post(inbox, now, Arrival::Resume, j != self.slot.index);
            }
            self.slot.posted = self.slot.posted.min(now);
        }
    }

    /// A drain was asked for: drain this CPU.
    fn drain_cpu(&mut self, now: Tick) -> Result<(), PlatformError> {
        if self.slot.cpu.drain()? {
            self.cpu_drained(now);
        } else if self.slot.tick_event.is_none() {
            // Something is in flight: the CPU runs on (briefly) to finish it.
            self.schedule_cpu(now)?;
        }
        Ok(())
    }

    /// Every CPU of the system drained: this one goes on.
    fn resume(&mut self, now: Tick) -> Result<(), PlatformError> {
        self.slot.drain_stopped = false;
        self.slot.cpu.drain_resume();
        if self.slot.waiting_sipi {
            return Ok(());
        }
        if self.slot.cpu.state() != kvm::CpuState::Idle {
            self.schedule_cpu(now)?;
        } else {
            self.wake_if_pending(now)?;
        }
        Ok(())
    }

    fn handle_sys(
        &mut self,
        core: &mut Core,
        tick: Tick,
        id: EventId,
        ev: SysEvent,
    ) -> Result<Option<ExitEvent>, PlatformError> {
        match ev {
            SysEvent::Device(i) => {
                let mut reqs = Vec::new();
                if let Some(t) = core.timed.get_mut(i) {
                    t.event = None;
                    let dev = t.dev.clone();
                    self.shared.bus.with_device_clock(tick, |now| {
                        let mut ctx = AccessCtx::new(now, &mut reqs);
                        mem::lock(&dev).on_deadline(&mut ctx);
                    });
                }
                service_requests(core, tick, reqs)?;
                refresh_deadlines(core)?;
                self.ring_doorbells(tick);
                self.wake_if_pending(tick)?;
            }
            SysEvent::Exit { code } => {
                return Ok(Some(ExitEvent::new(ExitCause::GuestExit, code, tick, "")));
            }
            SysEvent::ProcessExit { code, message } => {
                return Ok(Some(ExitEvent::new(
                    ExitCause::ProcessExit,
                    code,
                    tick,
                    message,
                )));
            }
            SysEvent::DebugExit { value } => {
                let status = devices::qemu::debug_exit_status(value);
                return Ok(Some(ExitEvent::new(
                    ExitCause::DebugExit,
                    status,
                    tick,
                    format!(
                        "isa-debug-exit: the guest wrote {value:#x} to port {:#x}; status \
                         {value:#x} * 2 + 1 = {status} (QEMU's rule)",
                        devices::qemu::DEBUG_EXIT_BASE
                    ),
                )));
            }
            SysEvent::PcExit { name, addr, cpu } => {
                return Ok(Some(ExitEvent::new(
                    ExitCause::PcEvent,
                    0,
                    tick,
                    format!("{cpu} reached PC event {name} at {addr:#x} (action exit)"),
                )));
            }
            SysEvent::Reset => {
                return Ok(Some(ExitEvent::new(
                    ExitCause::GuestReset,
                    0,
                    tick,
                    "the guest reset the machine (keyboard-controller reset line)",
                )));
            }
            SysEvent::LinkDeliver { port, data } => {
                if let Some(mb) = core.mailboxes.get(port as usize) {
                    let mb = mb.clone();
                    self.shared.bus.with_device_clock(tick, |_| {
                        mem::lock(&mb).deliver(data);
                    });
                }
                self.ring_doorbells(tick);
                self.wake_if_pending(tick)?;
            }
            SysEvent::FrameDeliver { port, frame } => {
                if let Some((_, nic)) = core.nics.iter().find(|(p, _)| *p == port) {
                    let nic = nic.clone();
                    self.shared.bus.with_device_clock(tick, |_| {
                        mem::lock(&nic).act(|d, q, m, live| d.deliver(frame, q, m, live));
                    });
                }
                self.ring_doorbells(tick);
                self.wake_if_pending(tick)?;
            }
            SysEvent::MaxTick => {
                return Ok(Some(ExitEvent::new(
                    ExitCause::MaxTick,
                    0,
                    tick,
                    "the simulated-time limit (sim.max_time) was reached",
                )));
            }
            SysEvent::DumpStats { reset, period } => {
                let dump = self.shared.dump_with_net(&core.stats, tick);
                self.shared.out.write_dump(&dump)?;
                if reset {
                    core.stats.reset(tick);
                }
                if period > 0 {
                    let next = core.queue.schedule(
                        tick.saturating_add(period),
                        STAT_EVENT_PRI,
                        SysEvent::DumpStats { reset, period },
                    )?;
                    if core.periodic_dump == Some(id) {
                        core.periodic_dump = Some(next);
                    }
                }
            }
            SysEvent::ResetStats { period } => {
                core.stats.reset(tick);
                if period > 0 {
                    let next = core.queue.schedule(
                        tick.saturating_add(period),
                        STAT_EVENT_PRI,
                        SysEvent::ResetStats { period },
                    )?;
                    if core.periodic_reset == Some(id) {
                        core.periodic_reset = Some(next);
                    }
                }
            }
            SysEvent::Checkpoint { period } => {
                if period > 0 {
                    core.queue.schedule(
                        tick.saturating_add(period),
                        DEFAULT_PRI,
                        SysEvent::Checkpoint { period },
                    )?;
                }
                core.checkpoint_pending = true;
                if !core.draining {
                    core.draining = true;
                    for (j, inbox) in self.shared.inboxes.iter().enumerate() {
                        post(inbox, tick, Arrival::Drain, j != self.slot.index);
                    }
                    self.slot.posted = self.slot.posted.min(tick);
                }
            }
            SysEvent::Drain { period } => {
                core.queue.schedule(
                    tick.saturating_add(period),
                    DEFAULT_PRI,
                    SysEvent::Drain { period },
                )?;
                if !core.draining {
                    core.draining = true;
                    // Every CPU drains on its own thread (this one's too,
                    // through its inbox: the core stays unlocked there).
                    for (j, inbox) in self.shared.inboxes.iter().enumerate() {
                        post(inbox, tick, Arrival::Drain, j != self.slot.index);
                    }
                    self.slot.posted = self.slot.posted.min(tick);
                }
            }
        }
        Ok(None)
    }
}

/// Posts `a` to a CPU's inbox, to arrive at `at`, and (for another
/// thread's CPU: `kick`) kicks the CPU out of KVM so that it looks (a kick
/// to a CPU outside KVM ends its next entry at once; a thread posting to
/// itself looks before its next entry anyway).
fn post(inbox: &Inbox, at: Tick, a: Arrival, kick: bool) {
    mem::lock(&inbox.items).push((at, a));
    inbox.full.store(true, Ordering::Release);
    if kick {
        inbox.kick.kick();
    }
}

/// Schedules each shared timed device's next deadline (devices change
/// theirs when the guest programs them).
fn refresh_deadlines(core: &mut Core) -> Result<(), PlatformError> {
    let now = core.queue.cur_tick();
    for (i, t) in core.timed.iter_mut().enumerate() {
        let want = mem::service_tick(mem::lock(&t.dev).next_deadline(), now);
        if t.event.map(|(_, at)| at) == want {
            continue;
        }
        if let Some((old, _)) = t.event.take() {
            let _ = core.queue.deschedule(old);
        }
        if let Some(at) = want {
            t.event = Some((
                core.queue.schedule(at, DEFAULT_PRI, SysEvent::Device(i))?,
                at,
            ));
        }
    }
    Ok(())
}

/// Acts on the guest's requests made during an access at `now`.
fn service_requests(core: &mut Core, now: Tick, reqs: Vec<Request>) -> Result<(), PlatformError> {
    for req in reqs {
        match req {
            Request::Exit { delay, code } => {
                core.queue.schedule(
                    now.saturating_add(delay),
                    SIM_EXIT_PRI,
                    SysEvent::Exit { code },
                )?;
            }
            Request::DumpStats {
                delay,
                period,
                reset,
            } => {
                let id = core.queue.schedule(
                    now.saturating_add(delay),
                    STAT_EVENT_PRI,
                    SysEvent::DumpStats { reset, period },
                )?;
                // One periodic dump stream at a time: a new one replaces the old.
                if period > 0 {
                    if let Some(old) = core.periodic_dump.replace(id) {
                        let _ = core.queue.deschedule(old);
                    }
                }
            }
            Request::Eoi { vector } => {
                if let Some(io) = &core.ioapic {
                    mem::lock(io).eoi(vector);
                }
            }
            Request::Reset => {
                core.queue.schedule(now, SIM_EXIT_PRI, SysEvent::Reset)?;
            }
            Request::ProcessExit {
                delay,
                code,
                message,
            } => {
                core.queue.schedule(
                    now.saturating_add(delay),
                    SIM_EXIT_PRI,
                    SysEvent::ProcessExit { code, message },
                )?;
            }
            Request::DebugExit { value } => {
                core.queue
                    .schedule(now, SIM_EXIT_PRI, SysEvent::DebugExit { value })?;
            }
            Request::LinkSend { port, delay, data } => {
                core.outgoing.push(Outgoing {
                    port,
                    at: now.saturating_add(delay),
                    data,
                });
            }
            Request::Checkpoint { delay, period } => {
                core.queue.schedule(
                    now.saturating_add(delay),
                    DEFAULT_PRI,
                    SysEvent::Checkpoint { period },
                )?;
            }
            Request::ResetStats { delay, period } => {
                let id = core.queue.schedule(
                    now.saturating_add(delay),
                    STAT_EVENT_PRI,
                    SysEvent::ResetStats { period },
                )?;
                if period > 0 {
                    if let Some(old) = core.periodic_reset.replace(id) {
                        let _ = core.queue.deschedule(old);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The PC devices of a system.
struct Pc {
    lapics: Vec<Arc<Mutex<Lapic>>>,
    ioapic: Arc<Mutex<IoApic>>,
    /// ISA IRQ lines 0..16, each wired to the 8259 pair and the I/O APIC.
    isa: Vec<IrqLine>,
}

/// The CPUs (indexes into `lapics`) that `ipi`, sent by CPU `me`'s APIC,
/// goes to from the platform: the APIC delivered its own copy already,
/// except for lowest priority, arbitrated here among every APIC that
/// accepts it (this one included). Destinations are matched by each
/// target ([`Lapic::accepts`]: 8-bit xAPIC or 32-bit x2APIC).
fn ipi_targets(lapics: &[Arc<Mutex<Lapic>>], me: usize, ipi: &Ipi) -> Vec<usize> {
    let mut targets: Vec<usize> = match ipi.shorthand {
        // Self only: the APIC delivered it.
        1 => Vec::new(),
        // All, or all but self: the APIC delivered to itself already.
        2 | 3 => (0..lapics.len()).filter(|&j| j != me).collect(),
        _ => (0..lapics.len())
            .filter(|&j| mem::lock(&lapics[j]).accepts(ipi.dest, ipi.logical))
            // A fixed or NMI message to self was delivered by the APIC;
            // lowest priority is arbitrated here, self included.
            .filter(|&j| j != me || ipi.mode == 1)
            .collect(),
    };
    if ipi.mode == 1 && ipi.shorthand == 0 && targets.len() > 1 {
        let best = targets
            .iter()
            .copied()
            .min_by_key(|&j| mem::lock(&lapics[j]).arbitration_priority());
        targets = best.into_iter().collect();
    }
    targets
}

/// The local APIC timer's input clock.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;

/// A local APIC per CPU (IDs 0..), all at 0xFEE00000, each CPU reaching its
/// own (at the address its IA32_APIC_BASE names, once the guest moves it):
/// CPU 0's has `pic` behind LINT0. Statistics go under `{cpu}.apic`
/// (`{system}.apic` with one CPU).
fn build_lapics(
    name: &str,
    cpu_names: &[String],
    pic: Option<Arc<Mutex<PicPair>>>,
    bus: &mut IoBus,
    stats: &mut Stats,
) -> Result<Vec<Arc<Mutex<Lapic>>>, PlatformError> {
    let mut lapics = Vec::with_capacity(cpu_names.len());
    for (id, cpu) in cpu_names.iter().enumerate() {
        let prefix = if cpu_names.len() == 1 {
            format!("{name}.apic")
        } else {
            format!("{cpu}.apic")
        };
        lapics.push(Arc::new(Mutex::new(Lapic::new(
            id as u8,
            APIC_BUS_HZ,
            if id == 0 { pic.clone() } else { None },
            stats,
            &prefix,
        )?)));
    }
    let banks: Vec<mem::DeviceHandle> = lapics
        .iter()
        .map(|l| l.clone() as mem::DeviceHandle)
        .collect();
    // Each APIC moves its own registers when its CPU writes another
    // address to IA32_APIC_BASE.
    let bases: Vec<mem::MovableBase> = lapics
        .iter()
        .map(|l| {
            let w = mem::MovableBase::new(LAPIC_BASE);
            mem::lock(l).set_window(w.clone());
            w
        })
        .collect();
    bus.insert_banked_movable(Space::Mmio, LAPIC_BASE, LAPIC_SIZE, "lapic", banks, bases)?;
    Ok(lapics)
}

/// Builds and wires the PC devices: the 8259 pair, I/O APIC and a local
/// APIC per CPU, the PIT (IRQ0 -> PIC input 0 and I/O APIC pin 2), the RTC
/// (IRQ8), the i8042 (IRQ1) and the POST port. The local APICs' timers are
/// not in `timed`: each runs on its CPU's queue.
fn build_pc(
    name: &str,
    cpu_names: &[String],
    sc: &mut SystemConfig,
    bus: &mut IoBus,
    stats: &mut Stats,
    timed: &mut Vec<TimedHandle>,
) -> Result<Pc, PlatformError> {
    let pic = Arc::new(Mutex::new(PicPair::new()));
    for (base, len, what) in [
        (MASTER_BASE, 2, "pic-master"),
        (SLAVE_BASE, 2, "pic-slave"),
        (ELCR_BASE, 2, "elcr"),
    ] {
        // The pair takes absolute port numbers as offsets.
        let ports = Rebased {
            dev: pic.clone(),
            add: base,
        };
        bus.insert(Space::Pio, base, len, what, Arc::new(Mutex::new(ports)))?;
    }
    let lapics = build_lapics(name, cpu_names, Some(pic.clone()), bus, stats)?;
    // The I/O APIC's ID follows the CPUs' (the firmware tables say so).
    let ioapic = Arc::new(Mutex::new(IoApic::new(
        cpu_names.len() as u8,
        lapics.clone(),
        stats,
        &format!("{name}.ioapic"),
    )?));
    bus.insert(
        Space::Mmio,
        IOAPIC_BASE,
        IOAPIC_SIZE,
        "ioapic",
        ioapic.clone(),
    )?;

    // ISA IRQ n -> PIC input n and I/O APIC pin n, except IRQ0 -> pin 2.
    let isa: Vec<IrqLine> = (0..16u32)
        .map(|n| {
            let pin = if n == 0 { 2 } else { n };
            IrqLine::none().to(pic.clone(), n).to(ioapic.clone(), pin)
        })
        .collect();

    let pit = Arc::new(Mutex::new(Pit::new(
        isa[0].clone(),
        stats,
        &format!("{name}.pit"),
    )?));
    bus.insert(Space::Pio, PIT_BASE, 4, "pit", pit.clone())?;
    let port_b = Rebased {
        dev: pit.clone(),
        add: PORT_B_OFFSET,
    };
    bus.insert(
        Space::Pio,
        PORT_B,
        1,
        "port61",
        Arc::new(Mutex::new(port_b)),
    )?;
    timed.push(pit);

    let start = *sc.rtc_start.get_or_insert_with(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    });
    let rtc = Arc::new(Mutex::new(Rtc::new(
        start,
        isa[8].clone(),
        stats,
        &format!("{name}.rtc"),
    )?));
    bus.insert(Space::Pio, RTC_BASE, 2, "rtc", rtc.clone())?;
    timed.push(rtc);

    let kbd: mem::DeviceHandle = Arc::new(Mutex::new(I8042::new(isa[1].clone())));
    bus.insert(Space::Pio, I8042_DATA, 1, "i8042", kbd.clone())?;
    bus.insert(
        Space::Pio,
        I8042_DATA + 4,
        1,
        "i8042-cmd",
        Arc::new(Mutex::new(Rebased { dev: kbd, add: 4 })),
    )?;
    let post = PostPort::new(stats, &format!("{name}.post"))?;
    bus.insert(Space::Pio, POST_PORT, 1, "post", Arc::new(Mutex::new(post)))?;
    Ok(Pc {
        lapics,
        ioapic,
        isa,
    })
}

/// The Linux command line kvmsim gives every kernel on a PC: the platform as
/// it is (ACPI tables but no PCI, no x2APIC, the TSC rate known, the serial
/// console, reboot through the keyboard controller), no slow probing, the
/// flags `host` says this host's KVM needs (from `kvmsim doctor`'s probes),
/// then the user's `append`.
pub fn linux_cmdline(tsc_khz: u64, initrd: bool, host: &[String], append: Option<&str>) -> String {
    let mut c = format!(
        "console=ttyS0 reboot=k panic=-1 pci=off nox2apic no_timer_check \
         tsc_early_khz={tsc_khz} tsc=reliable io_delay=none i8042.noaux i8042.nomux \
         i8042.dumbkbd nokaslr"
    );
    if initrd {
        c.push_str(" rdinit=/init");
    }
    for f in host {
        c.push(' ');
        c.push_str(f);
    }
    if let Some(a) = append.filter(|a| !a.trim().is_empty()) {
        c.push(' ');
        c.push_str(a.trim());
    }
    c
}

/// The frames `nics` sent, with their link ports.
fn take_frames(
    nics: &[(u32, crate::nics::NicHandle)],
) -> Vec<(u32, devices::virtio::net::SentFrame)> {
    nics.iter()
        .flat_map(|(port, nic)| {
            let sent = mem::lock(nic).device_mut().take_sent();
            sent.into_iter().map(move |f| (*port, f))
        })
        .collect()
}

/// Writes everything a Linux kernel needs besides itself: initrd, command
/// line, zero page (with E820) and MP table. Returns the command line.
fn setup_linux(
    sc: &mut SystemConfig,
    k: &crate::linux::KernelImage,
    info: &loader::ElfInfo,
    ram: &GuestRam,
    host_freq: f64,
    cpus: u8,
    nics: usize,
) -> Result<String, PlatformError> {
    use crate::firmware as fw;
    let fwerr = |e: fw::FirmwareError| PlatformError::Kernel(format!("{}: {e}", sc.kernel));
    let hdr_u32 = |off: usize| {
        k.setup_header
            .as_ref()
            .and_then(|h| h.get(off - 0x1f1..off - 0x1f1 + 4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let kernel_end = info
        .segments
        .iter()
        .map(|s| s.paddr.saturating_add(s.memsz))
        .max()
        .unwrap_or(0);
    let initrd = match &sc.initrd {
        None => None,
        Some(path) => {
            let data = crate::input::read_file(
                path,
                "initrd",
                &crate::input::Limit::initrd(ram.map().total()),
            )?;
            let limit = u64::from(hdr_u32(0x22c).filter(|&v| v != 0).unwrap_or(0x37ff_ffff));
            let addr = fw::initrd_address(ram.map(), data.len() as u64, kernel_end, limit)
                .map_err(|e| PlatformError::Kernel(format!("initrd {path}: {e}")))?;
            ram.memory()
                .write_slice(&data, vm_memory::GuestAddress(addr))
                .map_err(|e| PlatformError::Kernel(format!("initrd {path}: {e}")))?;
            Some((addr, data.len() as u64))
        }
    };
    let host = &kvm::doctor::cached().linux_flags;
    if !host.is_empty() && console::first_time("linux-flags") {
        tracing::info!(
            "this host's KVM needs Linux flags (from kvmsim doctor's probes): {}",
            host.join(" ")
        );
    }
    // The guest's TSC counts host cycles; inside KVM a host second is
    // host_factor simulated seconds, so per simulated second the TSC
    // advances host_freq / host_factor: that is the rate the kernel is told.
    let line = linux_cmdline(
        (host_freq / sc.cpu.resolved_host_factor().max(1e-9) / 1e3) as u64,
        initrd.is_some(),
        host,
        sc.append.as_deref(),
    );
    let max = hdr_u32(0x238).filter(|&v| v != 0).unwrap_or(2048) as usize + 1;
    fw::write_cmdline(ram.memory(), &line, max).map_err(fwerr)?;
    fw::write_zero_page(ram.memory(), k, initrd, &fw::e820(ram.map())).map_err(fwerr)?;
    // APIC IDs 0..cpus, then the I/O APIC's.
    fw::write_mp_table(ram.memory(), cpus, cpus).map_err(fwerr)?;
    let virtio = crate::disks::layout(sc.disk.len() + nics);
    fw::write_acpi_with_devices(ram.memory(), cpus, cpus, &virtio).map_err(fwerr)?;
    sc.cmdline = Some(line.clone());
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::intr::{InterruptController, MsrWrite};

    /// `n` APICs (IDs 0..n), software-enabled, the first `x2` of them
    /// switched to x2APIC mode through IA32_APIC_BASE.
    fn apics(n: u8, x2: u8, stats: &mut Stats) -> Vec<Arc<Mutex<Lapic>>> {
        (0..n)
            .map(|id| {
                let mut a = Lapic::new(id, APIC_BUS_HZ, None, stats, &format!("cpu{id}")).unwrap();
                a.offer_x2apic(true);
                let mut reqs = Vec::new();
                if id < x2 {
                    let base = a.apic_base() | devices::lapic::APIC_BASE_EXTD;
                    let msr = devices::lapic::APIC_BASE_MSR;
                    assert_eq!(a.msr_write(msr, base, 0, &mut reqs), MsrWrite::ToCpu);
                    a.msr_written(msr, base);
                    assert!(a.x2apic_write(0x80f, 0x1ff, 0, &mut reqs));
                } else {
                    mem::BusDevice::write(
                        &mut a,
                        Space::Mmio,
                        0xf0,
                        &0x1ffu32.to_le_bytes(),
                        &mut AccessCtx::new(0, &mut reqs),
                    );
                }
                Arc::new(Mutex::new(a))
            })
            .collect()
    }

    /// The message CPU `me` sends by writing `icr` to its x2APIC ICR.
    fn x2apic_ipi(lapics: &[Arc<Mutex<Lapic>>], me: usize, icr: u64) -> Ipi {
        let mut a = mem::lock(&lapics[me]);
        assert!(a.x2apic_write(0x830, icr, 0, &mut Vec::new()));
        let mut sent = a.take_ipis();
        assert_eq!(sent.len(), 1);
        sent.remove(0)
    }

    #[test]
    fn x2apic_cluster_ipis_reach_the_named_cpus() {
        let mut stats = Stats::new();
        let lapics = apics(4, 4, &mut stats);
        // Logical cluster 0, bits 0, 2 and 3 from CPU 1: CPUs 0, 2 and 3.
        let ipi = x2apic_ipi(&lapics, 1, (0xd << 32) | 0x0850);
        assert_eq!(ipi_targets(&lapics, 1, &ipi), vec![0, 2, 3]);
        // The same from CPU 0: it took its own copy.
        let ipi = x2apic_ipi(&lapics, 0, (0xd << 32) | 0x0850);
        assert_eq!(ipi_targets(&lapics, 0, &ipi), vec![2, 3]);
        assert_eq!(mem::lock(&lapics[0]).acknowledge(), Some(0x50));
        // Cluster 1 has nobody here; physical 0xFFFFFFFF is everyone else.
        let ipi = x2apic_ipi(&lapics, 1, (0x1_000f << 32) | 0x0850);
        assert!(ipi_targets(&lapics, 1, &ipi).is_empty());
        let ipi = x2apic_ipi(&lapics, 1, (0xffff_ffff << 32) | 0x51);
        assert_eq!(ipi_targets(&lapics, 1, &ipi), vec![0, 2, 3]);
        // Physical ID 3, and 0xFF, which in x2APIC mode is an ID nobody has.
        let ipi = x2apic_ipi(&lapics, 1, (3 << 32) | 0x52);
        assert_eq!(ipi_targets(&lapics, 1, &ipi), vec![3]);
        let ipi = x2apic_ipi(&lapics, 1, (0xff << 32) | 0x52);
        assert!(ipi_targets(&lapics, 1, &ipi).is_empty());
    }

    #[test]
    fn mixed_xapic_and_x2apic_cpus_match_as_kvm_does() {
        let mut stats = Stats::new();
        // CPUs 0 and 1 in x2APIC mode, 2 and 3 in xAPIC mode (flat model,
        // logical ID bit `id`).
        let lapics = apics(4, 2, &mut stats);
        for (id, l) in lapics.iter().enumerate().skip(2) {
            mem::BusDevice::write(
                &mut *mem::lock(l),
                Space::Mmio,
                0xd0,
                &(1u32 << (24 + id)).to_le_bytes(),
                &mut AccessCtx::new(0, &mut Vec::new()),
            );
        }
        // An x2APIC broadcast reaches the x2APIC CPUs only; physical 2 is
        // CPU 2 whatever its mode; logical 0xd: bits 0 of cluster 0 (CPU 0,
        // x2APIC) and, for the flat xAPIC CPUs, bits 2 and 3.
        let ipi = x2apic_ipi(&lapics, 1, (0xffff_ffff << 32) | 0x60);
        assert_eq!(ipi_targets(&lapics, 1, &ipi), vec![0]);
        let ipi = x2apic_ipi(&lapics, 1, (2 << 32) | 0x60);
        assert_eq!(ipi_targets(&lapics, 1, &ipi), vec![2]);
        let ipi = x2apic_ipi(&lapics, 1, (0xd << 32) | 0x0860);
        assert_eq!(ipi_targets(&lapics, 1, &ipi), vec![0, 2, 3]);
    }
}
