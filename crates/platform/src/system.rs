//! A simulated system: RAM, a KVM VM and CPU, the IO bus with its devices,
//! statistics and one event queue that drives them all.

use std::sync::{Arc, Mutex};

use devices::i8042::{PostPort, I8042, I8042_DATA, POST_PORT};
use devices::intc::{IntcHandle, VectorIntc};
use devices::ioapic::{IoApic, IOAPIC_BASE, IOAPIC_SIZE};
use devices::irq::IrqLine;
use devices::lapic::{Lapic, LAPIC_BASE, LAPIC_SIZE};
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
use kvm::timer::TimerKind;
use kvm::{CpuConfig as KvmCpuConfig, KvmCpu, KvmVm, TickOutcome, VcpuSpec};
use mem::{AccessCtx, GuestRam, IoBus, MemoryMap, Rebased, Space, TimedHandle};
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

/// The CPU's interrupt controller, as the system holds it.
type CpuIntc = Arc<Mutex<dyn InterruptController>>;

/// Priority of the CPU's startup event: before anything else at tick 0.
const STARTUP_PRI: i32 = i32::MIN;
/// Priority of a window's end: first in its tick (that tick belongs to the
/// next window).
const WINDOW_PRI: i32 = i32::MIN + 1;

/// Events of a system's queue.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// Per-thread CPU setup, on the thread that runs this queue.
    CpuStartup,
    CpuTick,
    /// A timed device's deadline (index into `timed`).
    Device(usize),
    Exit {
        code: i64,
    },
    /// The guest reset the machine.
    Reset,
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
    /// The end of a lock-step window (multi-system runs).
    WindowEnd,
    /// Record a CPU sample (sim.sample_period).
    Sample {
        period: Tick,
    },
    /// A value arrives on link port `port`.
    LinkDeliver {
        port: u32,
        data: u64,
    },
}

/// One end of a link in a system: its mailbox port and the link's latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkEnd {
    pub port: u32,
    pub latency: Tick,
}

/// A value sent out of a link port, to arrive at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// One simulated system.
pub struct System {
    name: String,
    // Drop order: the vCPU, then the VM, then the RAM it maps.
    cpu: KvmCpu<X86_64>,
    _vm: KvmVm,
    _ram: GuestRam,
    bus: IoBus,
    /// The CPU's interrupt controller (the local APIC on a PC).
    intc: CpuIntc,
    ioapic: Option<Arc<Mutex<IoApic>>>,
    timed: Vec<Timed>,
    stats: Stats,
    queue: EventQueue<Event>,
    cpu_event: Option<EventId>,
    /// The tick of the CPU's next tick event: the simulated time the CPU
    /// has reached (it ran up to there).
    cpu_next: Tick,
    periodic_dump: Option<EventId>,
    periodic_reset: Option<EventId>,
    draining: bool,
    drains: Counter,
    requests: Vec<Request>,
    mailboxes: Vec<Arc<Mutex<Mailbox>>>,
    outgoing: Vec<Outgoing>,
    out: OutDir,
    progress: Option<Progress>,
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
        let name = name.to_string();
        let image = read_image(&sc.kernel)?;
        let is_linux =
            crate::linux::is_bzimage(&image) || sc.initrd.is_some() || sc.append.is_some();
        if sc.platform == "auto" {
            sc.platform = if is_linux { "pc" } else { "bare" }.into();
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
        let info = loader::inspect(&image, &sc.kernel)?;

        let mut stats = Stats::new();
        let map = MemoryMap::for_size(sc.memory.0).map_err(PlatformError::Ram)?;
        let ram = GuestRam::new(map).map_err(PlatformError::Ram)?;
        let entry = loader::load(&ram, &image, &info, &sc.kernel)?;

        let mut vm = KvmVm::new()?;
        vm.map_ram(&ram)?;
        for &[base, size] in &sc.coalesced_mmio {
            vm.register_coalesced_mmio(base, size)?;
        }
        let mut vcpu = vm.create_cpu(&VcpuSpec {
            id: 0,
            coalesced_mmio: !sc.coalesced_mmio.is_empty(),
        })?;

        let host_freq = match sc.cpu.host_freq {
            Some(f) => f.0,
            None => {
                let khz = vcpu.tsc_khz().map_err(|e| {
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

        let mut arch = X86_64::new();
        boot::write_boot_structures(ram.memory())?;
        let args = match &kernel {
            Some(k) => {
                let line = setup_linux(sc, k, &info, &ram, host_freq)?;
                tracing::info!("{name}: Linux command line: {line}");
                boot::set_boot_msrs(&mut vcpu)?;
                // The 64-bit boot protocol: RSI points to the zero page.
                vec![0, crate::firmware::ZERO_PAGE]
            }
            None => sc.args.clone(),
        };
        boot::enter_long_mode(&mut arch, &mut vcpu, entry, stack, &args)?;
        // Repairs the host's KVM needs, as kvmsim doctor's probes found.
        if sc.cpu.syscall_repair && kvm::doctor::cached().needs_syscall_repair() {
            if sc.cpu.max_insts.is_some() || sc.cpu.trace.is_some() {
                tracing::warn!(
                    "{name}: this host's SYSCALL entry is broken, but max_insts or the trace \
                     single-steps: the repair is not applied (user-mode system calls will fault)"
                );
            } else {
                arch.enable_syscall_repair(&mut vcpu)?;
                // Once per process, not once per system.
                if console::first_time("syscall-repair") {
                    tracing::info!(
                        "repair applied: SYSCALL from user mode does not enter kernel mode \
                         on this host; kvmsim completes it from the page fault it raises"
                    );
                }
            }
        }
        let mut cpu = KvmCpu::new(
            &format!("{name}.cpu"),
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
            },
            &mut stats,
        )?;
        let (total, avail) = stats.maybe_counter(
            &format!("{name}.totalNumInsts"),
            "Guest instructions executed by all CPUs of the system (nan: not countable here)",
            "Count",
        )?;
        stats.count_sim_insts(&total, &avail)?;
        cpu.set_total_insts(total, avail);
        cpu.set_guest_memory(ram.memory().clone());
        if let Some(t) = &sc.cpu.trace {
            let file = if name == "system" {
                "trace.txt".to_string()
            } else {
                format!("trace.{name}.txt")
            };
            let path = out.file(&file);
            let f = std::fs::File::create(&path)
                .map_err(|source| crate::output::OutputError { path, source })?;
            cpu.set_trace(kvm::cpu::Trace {
                from: t.from.0,
                insts: t.insts,
                out: Box::new(std::io::BufWriter::new(f)),
            });
        }

        let mut bus = IoBus::new(&mut stats, &format!("{name}.iobus"))?;
        let mut timed: Vec<TimedHandle> = Vec::new();
        // The CPU's controller and where vectored device interrupts go.
        let (intc, vectors, ioapic, irqs): (CpuIntc, IntcHandle, _, Option<Vec<IrqLine>>) =
            if sc.platform == "pc" {
                let pc = build_pc(&name, sc, &mut bus, &mut stats, &mut timed)?;
                (pc.lapic.clone(), pc.lapic, Some(pc.ioapic), Some(pc.isa))
            } else {
                let v = Arc::new(Mutex::new(VectorIntc::new()));
                (v.clone(), v, None, None)
            };
        cpu.set_interrupt_controller(intc.clone());
        let input = if sc.serial.stdin {
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
        let simops = SimOps::new(&mut stats, &format!("{name}.simops"))?;
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
        let timed: Vec<Timed> = timed
            .into_iter()
            .map(|dev| Timed { dev, event: None })
            .collect();
        let mut mailboxes = Vec::new();
        for l in links {
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

        let progress = (name == "system" && std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .then(|| Progress::new(cpu.exit_counter(), cpu.kick_handle()));
        let mut queue = EventQueue::new();
        queue.schedule(0, STARTUP_PRI, Event::CpuStartup)?;
        if let Some(max) = sim.max_time {
            queue.schedule(max.0, SIM_EXIT_PRI, Event::MaxTick)?;
        }
        if let Some(p) = sim.sample_period {
            queue.schedule(p.0, DEFAULT_PRI, Event::Sample { period: p.0 })?;
        }
        if let Some(p) = sim.drain_period {
            queue.schedule(p.0, DEFAULT_PRI, Event::Drain { period: p.0 })?;
        }
        let cpu_event = Some(queue.schedule(0, CPU_TICK_PRI, Event::CpuTick)?);
        tracing::debug!(
            "{name}: entry {entry:#x}, stack {stack:#x}, host_freq {host_freq} Hz, timer {timer:?}"
        );
        Ok(System {
            name,
            cpu,
            _vm: vm,
            _ram: ram,
            bus,
            intc,
            ioapic,
            timed,
            stats,
            queue,
            cpu_event,
            cpu_next: 0,
            periodic_dump: None,
            periodic_reset: None,
            draining: false,
            drains,
            requests: Vec::new(),
            mailboxes,
            outgoing: Vec::new(),
            out,
            progress,
        })
    }

    /// Takes the values sent on links since the last call.
    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outgoing)
    }

    /// Schedules the arrival of `data` on link port `port` at `at`, which
    /// must not lie before the current tick.
    pub fn schedule_delivery(
        &mut self,
        port: u32,
        at: Tick,
        data: u64,
    ) -> Result<(), PlatformError> {
        self.queue
            .schedule(at, DEFAULT_PRI, Event::LinkDeliver { port, data })?;
        Ok(())
    }

    /// The system's statistics at `now`.
    pub fn stats_dump(&self, now: Tick) -> sim::stats::Dump {
        self.stats.dump(now)
    }

    /// The system's dotted name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current simulated tick.
    pub fn cur_tick(&self) -> Tick {
        self.queue.cur_tick()
    }

    /// The output folder.
    pub fn out(&self) -> &OutDir {
        &self.out
    }

    /// A dump of the whole CPU state.
    pub fn dump_cpu(&mut self) -> String {
        self.cpu.dump()
    }

    /// One line of CPU state: RIP, RSP, CPL, RFLAGS, CR2, the first
    /// argument registers, the top of the stack, KVM's pending events and
    /// the interrupt controller's state.
    pub fn cpu_sample(&mut self) -> String {
        let intc = mem::lock(&self.intc).describe();
        let state = self.cpu.state();
        let (arch, vcpu) = self.cpu.arch_mut();
        match arch.sample(vcpu) {
            Ok(s) => format!("{s} state={state:?} {intc}"),
            Err(e) => format!("(registers unavailable: {e})"),
        }
    }

    /// A handle that forces the CPU out of KVM from any thread.
    pub fn kick_handle(&self) -> kvm::timer::KickHandle {
        self.cpu.kick_handle()
    }

    /// Runs until something ends the simulation.
    pub fn run(&mut self) -> Result<ExitEvent, PlatformError> {
        loop {
            if let Some(exit) = self.run_window(None)? {
                return Ok(exit);
            }
        }
    }

    /// Runs the events before `end` (all of them if `None`); returns the
    /// exit if the system exits in that window.
    pub fn run_window(&mut self, end: Option<Tick>) -> Result<Option<ExitEvent>, PlatformError> {
        let window = match end {
            Some(end) => Some(self.queue.schedule(end, WINDOW_PRI, Event::WindowEnd)?),
            None => None,
        };
        let exit = self.run_events();
        if let (Some(id), Ok(Some(_)) | Err(_)) = (window, &exit) {
            let _ = self.queue.deschedule(id);
        }
        exit
    }

    fn run_events(&mut self) -> Result<Option<ExitEvent>, PlatformError> {
        let r = self.run_events_inner();
        if let Some(p) = &mut self.progress {
            if !matches!(r, Ok(None)) {
                p.finish();
            }
        }
        r
    }

    fn run_events_inner(&mut self) -> Result<Option<ExitEvent>, PlatformError> {
        loop {
            if let Some(p) = &mut self.progress {
                p.update(self.queue.cur_tick());
            }
            if console::interrupted() {
                // The CPU may have run past the last event: its time counts.
                let at = self.cur_tick().max(self.cpu_next);
                return Ok(Some(ExitEvent::new(
                    ExitCause::UserInterrupt,
                    0,
                    at,
                    "interrupted by the user (SIGINT/SIGTERM)",
                )));
            }
            let Some((tick, id, ev)) = self.queue.pop() else {
                return Ok(Some(ExitEvent::new(
                    ExitCause::GuestHalted,
                    0,
                    self.cur_tick(),
                    "the CPU halted and no event is left that could wake it",
                )));
            };
            if ev == Event::WindowEnd {
                return Ok(None);
            }
            if let Some(exit) = self.handle(tick, id, ev)? {
                return Ok(Some(exit));
            }
        }
    }

    fn handle(
        &mut self,
        tick: Tick,
        id: EventId,
        ev: Event,
    ) -> Result<Option<ExitEvent>, PlatformError> {
        match ev {
            Event::CpuStartup => self.cpu.startup_thread()?,
            Event::CpuTick => {
                self.cpu_event = None;
                let next = self.queue.next_tick();
                let outcome = self.cpu.tick(tick, next, &self.bus, &mut self.requests)?;
                self.service_requests(tick)?;
                self.refresh_deadlines()?;
                match outcome {
                    TickOutcome::Next(t) => self.schedule_cpu(t)?,
                    TickOutcome::Idle => self.wake_if_pending(tick)?,
                    TickOutcome::Drained => self.drained(tick)?,
                    TickOutcome::InstLimit(n, dump) => {
                        return Ok(Some(ExitEvent::new(
                            ExitCause::MaxInsts,
                            0,
                            tick,
                            format!(
                            "stopped after {n} guest instructions (system.cpu.max_insts)\n{dump}"
                        ),
                        )))
                    }
                    TickOutcome::Unsupported(msg) => {
                        return Ok(Some(ExitEvent::new(ExitCause::Unsupported, 0, tick, msg)))
                    }
                    TickOutcome::Fault(report) => {
                        return Ok(Some(ExitEvent::new(ExitCause::GuestFault, 0, tick, report)));
                    }
                }
            }
            Event::Device(i) => {
                if let Some(t) = self.timed.get_mut(i) {
                    t.event = None;
                    let mut ctx = AccessCtx::new(tick, &mut self.requests);
                    mem::lock(&t.dev).on_deadline(&mut ctx);
                }
                self.service_requests(tick)?;
                self.refresh_deadlines()?;
                self.wake_if_pending(tick)?;
            }
            Event::Exit { code } => {
                return Ok(Some(ExitEvent::new(ExitCause::GuestExit, code, tick, "")));
            }
            Event::WindowEnd => {}
            Event::Sample { period } => {
                self.queue.schedule(
                    tick.saturating_add(period),
                    DEFAULT_PRI,
                    Event::Sample { period },
                )?;
                let line = format!("{tick} {}\n", self.cpu_sample());
                let path = self.out.file("cpu-samples.txt");
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(line.as_bytes()))
                    .map_err(|source| crate::output::OutputError { path, source })?;
            }
            Event::Reset => {
                return Ok(Some(ExitEvent::new(
                    ExitCause::GuestReset,
                    0,
                    tick,
                    "the guest reset the machine (keyboard-controller reset line)",
                )));
            }
            Event::LinkDeliver { port, data } => {
                if let Some(mb) = self.mailboxes.get(port as usize) {
                    mem::lock(mb).deliver(data);
                }
                self.wake_if_pending(tick)?;
            }
            Event::MaxTick => {
                return Ok(Some(ExitEvent::new(
                    ExitCause::MaxTick,
                    0,
                    tick,
                    "the simulated-time limit (sim.max_time) was reached",
                )));
            }
            Event::DumpStats { reset, period } => {
                self.dump_stats(tick)?;
                if reset {
                    self.stats.reset(tick);
                }
                if period > 0 {
                    let next = self.queue.schedule(
                        tick.saturating_add(period),
                        STAT_EVENT_PRI,
                        Event::DumpStats { reset, period },
                    )?;
                    if self.periodic_dump == Some(id) {
                        self.periodic_dump = Some(next);
                    }
                }
            }
            Event::ResetStats { period } => {
                self.stats.reset(tick);
                if period > 0 {
                    let next = self.queue.schedule(
                        tick.saturating_add(period),
                        STAT_EVENT_PRI,
                        Event::ResetStats { period },
                    )?;
                    if self.periodic_reset == Some(id) {
                        self.periodic_reset = Some(next);
                    }
                }
            }
            Event::Drain { period } => {
                self.queue.schedule(
                    tick.saturating_add(period),
                    DEFAULT_PRI,
                    Event::Drain { period },
                )?;
                if !self.draining {
                    self.draining = true;
                    if self.cpu.drain()? {
                        self.drained(tick)?;
                    }
                }
            }
        }
        Ok(None)
    }

    fn schedule_cpu(&mut self, at: Tick) -> Result<(), PlatformError> {
        if let Some(old) = self.cpu_event.take() {
            let _ = self.queue.deschedule(old);
        }
        self.cpu_event = Some(self.queue.schedule(at, CPU_TICK_PRI, Event::CpuTick)?);
        self.cpu_next = at;
        Ok(())
    }

    /// Every CPU is consistent: count the drain and resume.
    fn drained(&mut self, now: Tick) -> Result<(), PlatformError> {
        self.drains.inc();
        self.draining = false;
        self.cpu.drain_resume();
        if self.cpu.state() != kvm::CpuState::Idle {
            self.schedule_cpu(now)?;
        } else {
            self.wake_if_pending(now)?;
        }
        Ok(())
    }

    /// Wakes an idle CPU that has an interrupt waiting.
    fn wake_if_pending(&mut self, now: Tick) -> Result<(), PlatformError> {
        if self.cpu.state() == kvm::CpuState::Idle
            && mem::lock(&self.intc).pending() != Pending::None
            && self.cpu.wake()
        {
            self.schedule_cpu(now)?;
        }
        Ok(())
    }

    /// Schedules each timed device's next deadline (devices change theirs
    /// when the guest programs them).
    fn refresh_deadlines(&mut self) -> Result<(), PlatformError> {
        for (i, t) in self.timed.iter_mut().enumerate() {
            let want = mem::service_tick(mem::lock(&t.dev).next_deadline(), self.queue.cur_tick());
            if t.event.map(|(_, at)| at) == want {
                continue;
            }
            if let Some((old, _)) = t.event.take() {
                let _ = self.queue.deschedule(old);
            }
            if let Some(at) = want {
                t.event = Some((self.queue.schedule(at, DEFAULT_PRI, Event::Device(i))?, at));
            }
        }
        Ok(())
    }

    /// Acts on the guest's requests made during the last access.
    fn service_requests(&mut self, now: Tick) -> Result<(), PlatformError> {
        for req in std::mem::take(&mut self.requests) {
            match req {
                Request::Exit { delay, code } => {
                    self.queue.schedule(
                        now.saturating_add(delay),
                        SIM_EXIT_PRI,
                        Event::Exit { code },
                    )?;
                }
                Request::DumpStats {
                    delay,
                    period,
                    reset,
                } => {
                    let id = self.queue.schedule(
                        now.saturating_add(delay),
                        STAT_EVENT_PRI,
                        Event::DumpStats { reset, period },
                    )?;
                    // One periodic dump stream at a time: a new one replaces the old.
                    if period > 0 {
                        if let Some(old) = self.periodic_dump.replace(id) {
                            let _ = self.queue.deschedule(old);
                        }
                    }
                }
                Request::Eoi { vector } => {
                    if let Some(io) = &self.ioapic {
                        mem::lock(io).eoi(vector);
                    }
                }
                Request::Reset => {
                    self.queue.schedule(now, SIM_EXIT_PRI, Event::Reset)?;
                }
                Request::LinkSend { port, delay, data } => {
                    self.outgoing.push(Outgoing {
                        port,
                        at: now.saturating_add(delay),
                        data,
                    });
                }
                Request::ResetStats { delay, period } => {
                    let id = self.queue.schedule(
                        now.saturating_add(delay),
                        STAT_EVENT_PRI,
                        Event::ResetStats { period },
                    )?;
                    if period > 0 {
                        if let Some(old) = self.periodic_reset.replace(id) {
                            let _ = self.queue.deschedule(old);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends a stats dump at `now` to stats.txt and stats.json.
    pub fn dump_stats(&mut self, now: Tick) -> Result<(), PlatformError> {
        let dump = self.stats.dump(now);
        self.out.write_dump(&dump)?;
        Ok(())
    }

    /// Final statistics and exit.json after `exit` (a single-system run).
    pub fn finish(&mut self, exit: &ExitEvent, status: i32) -> Result<(), PlatformError> {
        self.dump_stats(exit.tick)?;
        crate::report::write_exit_json(&self.out, &[(self.name.clone(), exit.clone())], status)
    }
}

/// The PC devices of a system.
struct Pc {
    lapic: Arc<Mutex<Lapic>>,
    ioapic: Arc<Mutex<IoApic>>,
    /// ISA IRQ lines 0..16, each wired to the 8259 pair and the I/O APIC.
    isa: Vec<IrqLine>,
}

/// The local APIC timer's input clock.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;

/// Builds and wires the PC devices: the 8259 pair, I/O APIC and local APIC,
/// the PIT (IRQ0 -> PIC input 0 and I/O APIC pin 2), the RTC (IRQ8), the
/// i8042 (IRQ1) and the POST port.
fn build_pc(
    name: &str,
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
    let lapic = Arc::new(Mutex::new(Lapic::new(
        0,
        APIC_BUS_HZ,
        Some(pic.clone()),
        stats,
        &format!("{name}.apic"),
    )?));
    bus.insert(Space::Mmio, LAPIC_BASE, LAPIC_SIZE, "lapic", lapic.clone())?;
    timed.push(lapic.clone());
    let ioapic = Arc::new(Mutex::new(IoApic::new(
        1,
        vec![lapic.clone()],
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
    Ok(Pc { lapic, ioapic, isa })
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
         i8042.dumbkbd nokaslr nomodule"
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

/// Writes everything a Linux kernel needs besides itself: initrd, command
/// line, zero page (with E820) and MP table. Returns the command line.
fn setup_linux(
    sc: &mut SystemConfig,
    k: &crate::linux::KernelImage,
    info: &loader::ElfInfo,
    ram: &GuestRam,
    host_freq: f64,
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
    fw::write_mp_table(ram.memory(), 1, 1).map_err(fwerr)?;
    fw::write_acpi(ram.memory(), 1, 1).map_err(fwerr)?;
    sc.cmdline = Some(line.clone());
    Ok(line)
}
