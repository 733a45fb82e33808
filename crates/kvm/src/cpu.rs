//! The KVM CPU: runs the guest natively and lives in simulated time.
//!
//! State machine (gem5's BaseKvmCPU):
//!
//! * **Running**: the CPU's tick delivers pending interrupts, arms the run
//!   timer for the span until the next event in its own queue, and enters
//!   KVM. When KVM returns, the host cycles spent inside become simulated
//!   ticks (`cycles * host_factor / host_freq`). The exit is *not* serviced
//!   now but on the next tick, after that simulated time has passed
//!   (**RunningService**), so that devices see the access at the simulated
//!   time the guest made it. A signal exit (run timer, kick) needs no
//!   service and stays Running; if the run timer expired, time moves just
//!   past the next pending event.
//! * **RunningService**: the exit is serviced (port IO and MMIO go through
//!   the bus, whose devices return a latency); the next tick comes after
//!   that latency. A read leaves **RunningServiceCompletion**: KVM completes
//!   the instruction with the device's value on the next entry.
//! * **Idle**: the guest halted. The CPU is not ticked until woken;
//!   simulated time jumps to the next event without the host waiting.
//!
//! While draining, a pending read is completed with a *half entry*
//! (`immediate_exit`: KVM finishes the instruction and returns without
//! running the guest), and the CPU refuses to report drained while KVM
//! holds an injected or pending event (it requests an interrupt window and
//! runs briefly instead).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use mem::{AccessCtx, CallArgs, IoBus, Space};
use sim::intr::InterruptController;
use sim::{Availability, ClockDomain, Counter, Request, Stats, Tick, Value};

use crate::arch::Arch;
use crate::perf::{self, InstCounter, PerfEvent};
use crate::timer::{kick_signal, KickHandle, ThreadSignals, TimerKind};
use crate::{sys, KvmError, Result};

/// How a KVM CPU converts between host and simulated time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuConfig {
    /// The CPU's clock (cycle counts, tick alignment).
    pub clock: ClockDomain,
    /// Rate of the counter the architecture's `host_cycles()` reads (x86: TSC), in Hz.
    pub host_freq_hz: f64,
    /// Simulated time per host time: above 1 when the simulated machine is
    /// slower than the host (target CPI / host CPI).
    pub host_factor: f64,
}

impl CpuConfig {
    /// Host cycles (of `host_freq`) to simulated ticks.
    pub fn host_cycles_to_ticks(&self, cycles: u64) -> Tick {
        sim::tick::seconds_to_ticks(cycles as f64 * self.host_factor / self.host_freq_hz)
    }

    /// Simulated ticks to host nanoseconds (for host timers).
    pub fn ticks_to_host_ns(&self, ticks: Tick) -> u64 {
        (ticks as f64 / (sim::tick::TICKS_PER_NS as f64 * self.host_factor)) as u64
    }

    /// Simulated ticks to host cycles (of `host_freq`).
    pub fn ticks_to_host_cycles(&self, ticks: Tick) -> u64 {
        (sim::tick::ticks_to_seconds(ticks) * self.host_freq_hz / self.host_factor) as u64
    }
}

/// Options of a KVM CPU beyond time conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// What forces exits at the end of each run.
    pub timer: TimerKind,
    /// Stop after this many guest instructions.
    pub max_insts: Option<u64>,
    /// Drain the coalesced-MMIO ring after every run.
    pub coalesced_mmio: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            timer: TimerKind::Posix,
            max_insts: None,
            coalesced_mmio: false,
        }
    }
}

/// An instruction trace: from tick `from`, the next `insts` instructions
/// the CPU executes, one line each, by single-stepping.
pub struct Trace {
    pub from: Tick,
    pub insts: u64,
    pub out: Box<dyn std::io::Write + Send>,
}

/// A trace in progress.
struct Tracer {
    trace: Trace,
    active: bool,
}

/// How guest instructions are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstMethod {
    /// Not counted (no PMU, no exact stop requested): stats say `nan`.
    Unavailable = 0,
    /// A hardware performance counter (guest only).
    PerfCounter = 1,
    /// KVM single-stepping: exact, one exit per instruction.
    SingleStep = 2,
}

/// The CPU's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuState {
    Idle,
    Running,
    RunningService,
    RunningServiceCompletion,
}

/// What the owner of the CPU should do after a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOutcome {
    /// Tick the CPU again at this (absolute) tick.
    Next(Tick),
    /// The CPU is idle (halted) until [`KvmCpu::wake`].
    Idle,
    /// Draining is complete: the CPU is consistent and not ticked until
    /// [`KvmCpu::drain_resume`].
    Drained,
    /// The instruction limit was reached: the count and a register dump.
    InstLimit(u64, String),
    /// Something this host cannot do was required (explained).
    Unsupported(String),
    /// The guest cannot continue: a description and register dump.
    Fault(String),
}

/// An exit, copied out of `kvm_run` so it can be serviced later.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Exit {
    IoIn {
        port: u16,
        size: u8,
        count: u32,
    },
    /// The data is in the CPU's `io_buf`.
    IoOut {
        port: u16,
        size: u8,
        count: u32,
    },
    MmioRead {
        addr: u64,
        len: usize,
    },
    MmioWrite {
        addr: u64,
        len: usize,
        data: [u8; 8],
    },
    Hlt,
    /// A signal interrupted KVM_RUN (run timer, kick, or immediate_exit).
    Intr,
    /// KVM_RUN asked to be retried (EAGAIN).
    Retry,
    IrqWindowOpen,
    /// A single-step (or other debug) exit.
    Debug,
    /// KVM could not emulate an instruction (its bytes, when KVM gave them).
    EmulationFailure(Option<Vec<u8>>),
    Hypercall(u64),
    /// Anything the CPU cannot continue from.
    Fatal(String),
}

/// The CPU's statistics (gem5's names).
struct CpuStats {
    num_vm_exits: Counter,
    num_vm_half_entries: Counter,
    num_exit_signal: Counter,
    num_io: Counter,
    num_mmio: Counter,
    num_coalesced_mmio: Counter,
    num_halt: Counter,
    num_interrupts: Counter,
    num_hypercalls: Counter,
    num_cycles: Counter,
    num_insts: Counter,
    insts_available: Availability,
    inst_method: Value,
    kvm_host_seconds: Value,
    completed: sim::Vector,
}

impl CpuStats {
    fn new(
        stats: &mut Stats,
        p: &str,
        completable: &[&str],
    ) -> std::result::Result<Self, sim::stats::StatsError> {
        let exits = stats.counter(
            &format!("{p}.numVMExits"),
            "Number of VM exits (returns from KVM_RUN, half entries included)",
            "Count",
        )?;
        let e = exits.clone();
        stats.formula(
            &format!("{p}.exitsPerHostSecond"),
            "VM exits per host second",
            "Count/Second",
            move |ctx| e.get() as f64 / ctx.host_seconds,
        )?;
        let c =
            |stats: &mut Stats, n: &str, d: &str| stats.counter(&format!("{p}.{n}"), d, "Count");
        let (num_insts, insts_available) = stats.maybe_counter(
            &format!("{p}.numInsts"),
            "Guest instructions executed (nan: not countable here; see instCountMethod)",
            "Count",
        )?;
        Ok(CpuStats {
            num_vm_exits: exits,
            num_vm_half_entries: c(
                stats,
                "numVMHalfEntries",
                "Entries that only completed pending IO without running guest code",
            )?,
            num_exit_signal: c(
                stats,
                "numExitSignal",
                "Exits forced by a signal (run timer, kick, user interrupt)",
            )?,
            num_io: c(stats, "numIO", "Port-IO exits")?,
            num_mmio: c(stats, "numMMIO", "MMIO exits")?,
            num_coalesced_mmio: c(
                stats,
                "numCoalescedMMIO",
                "MMIO writes taken from the coalesced-MMIO ring",
            )?,
            num_halt: c(stats, "numHalt", "HLT exits")?,
            num_interrupts: c(stats, "numInterrupts", "Interrupts and NMIs injected")?,
            num_hypercalls: c(stats, "numHypercalls", "Hypercall exits")?,
            num_cycles: stats.counter(
                &format!("{p}.numCycles"),
                "Simulated CPU cycles spent in the guest (host time x host_factor, in CPU clock cycles)",
                "Cycle",
            )?,
            num_insts,
            insts_available,
            inst_method: stats.value(
                &format!("{p}.instCountMethod"),
                "How instructions are counted: 0 unavailable (no PMU), 1 hardware perf counter, 2 KVM single-step (exact)",
                "Unspecified",
            )?,
            kvm_host_seconds: stats.value(
                &format!("{p}.kvmHostSeconds"),
                "Host time spent inside KVM_RUN",
                "Second",
            )?,
            completed: stats.vector(
                &format!("{p}.completedInstructions"),
                "Instructions the host's KVM could not emulate and kvmsim completed",
                "Count",
                completable,
            )?,
        })
    }
}

/// Gives devices the calling CPU's argument registers, through the lazy context.
struct ArgsView<'a, A: Arch> {
    arch: &'a mut A,
    vcpu: &'a VcpuFd,
}

impl<A: Arch> CallArgs for ArgsView<'_, A> {
    fn call_args(&mut self) -> [u64; 6] {
        self.arch.call_args(self.vcpu).unwrap_or_else(|e| {
            tracing::error!("cannot read the guest's argument registers: {e}");
            [0; 6]
        })
    }
}

/// Runs `f` with an access context for `now` whose calling CPU is `arch`.
fn with_ctx<A: Arch, R>(
    arch: &mut A,
    vcpu: &VcpuFd,
    now: Tick,
    requests: &mut Vec<Request>,
    f: impl FnOnce(&mut AccessCtx) -> R,
) -> R {
    let mut view = ArgsView { arch, vcpu };
    let mut ctx = AccessCtx {
        now,
        cpu: Some(&mut view),
        requests,
    };
    f(&mut ctx)
}

/// A shared interrupt controller, as the CPU holds it.
pub type IntcHandle = Arc<Mutex<dyn InterruptController>>;

/// Longest a draining CPU runs while waiting for KVM to deliver an event.
const DRAIN_RUN_LIMIT: Tick = sim::tick::TICKS_PER_MS;
/// Longest one single-step entry may run (a step that did not stop).
const STEP_SAFETY_SPAN: Tick = 10 * sim::tick::TICKS_PER_MS;

/// A CPU backed by a KVM vCPU.
pub struct KvmCpu<A: Arch> {
    name: String,
    vcpu: VcpuFd,
    arch: A,
    mmap_size: usize,
    cfg: CpuConfig,
    opts: CpuOptions,
    state: CpuState,
    pending: Option<Exit>,
    io_buf: Vec<u8>,
    stats: CpuStats,
    kick: KickHandle,
    signals: Option<ThreadSignals>,
    intc: Option<IntcHandle>,
    draining: bool,
    /// Guest instructions executed so far (absolute, never reset).
    insts: u64,
    inst_counter: Option<InstCounter>,
    inst_method: InstMethod,
    stepping: bool,
    /// The system-wide instruction count, updated on every exit.
    total_insts: Option<(Counter, Availability)>,
    /// An instruction trace, waiting for its start or in progress.
    tracer: Option<Tracer>,
    /// When the CPU halted: simulated time skipped while idle is added to
    /// the guest's clock before it runs again.
    idle_since: Option<Tick>,
}

impl<A: Arch> KvmCpu<A> {
    /// Wraps `vcpu`; statistics go under `name` (e.g. `system.cpu`).
    pub fn new(
        name: &str,
        vcpu: VcpuFd,
        arch: A,
        mmap_size: usize,
        cfg: CpuConfig,
        opts: CpuOptions,
        stats: &mut Stats,
    ) -> Result<Self> {
        let cpu_stats = CpuStats::new(stats, name, arch.completable())
            .map_err(|e| KvmError::Setup(e.to_string()))?;
        let mut vcpu = vcpu;
        if opts.coalesced_mmio {
            vcpu.map_coalesced_mmio_ring()
                .map_err(KvmError::ioctl("mapping the coalesced-MMIO ring"))?;
        }
        Ok(KvmCpu {
            name: name.into(),
            vcpu,
            arch,
            mmap_size,
            cfg,
            opts,
            state: CpuState::Running,
            pending: None,
            io_buf: Vec::new(),
            stats: cpu_stats,
            kick: KickHandle::default(),
            signals: None,
            intc: None,
            draining: false,
            insts: 0,
            inst_counter: None,
            inst_method: InstMethod::Unavailable,
            stepping: false,
            total_insts: None,
            tracer: None,
            idle_since: None,
        })
    }

    /// Gives the CPU read access to guest memory (instructions KVM could not
    /// emulate, traces, dumps).
    pub fn set_guest_memory(&mut self, mem: vm_memory::GuestMemoryMmap) {
        self.arch.attach_memory(mem);
    }

    /// Traces `trace.insts` instructions from tick `trace.from` on.
    pub fn set_trace(&mut self, trace: Trace) {
        self.tracer = Some(Tracer {
            trace,
            active: false,
        });
    }

    /// Connects the interrupt controller asked before each entry.
    pub fn set_interrupt_controller(&mut self, intc: IntcHandle) {
        self.intc = Some(intc);
    }

    /// Connects the system-wide instruction count.
    pub fn set_total_insts(&mut self, total: Counter, available: Availability) {
        self.total_insts = Some((total, available));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> CpuState {
        self.state
    }

    /// Guest instructions executed so far, if they are counted.
    pub fn insts(&self) -> Option<u64> {
        (self.inst_method != InstMethod::Unavailable).then_some(self.insts)
    }

    /// How instructions are counted.
    pub fn inst_method(&self) -> InstMethod {
        self.inst_method
    }

    /// The CPU's exit counter (numVMExits), for progress reports.
    pub fn exit_counter(&self) -> Counter {
        self.stats.num_vm_exits.clone()
    }

    /// A handle that forces this CPU out of KVM from any thread.
    pub fn kick_handle(&self) -> KickHandle {
        self.kick.clone()
    }

    /// The architecture state, with the vCPU to sync it through.
    pub fn arch_mut(&mut self) -> (&mut A, &VcpuFd) {
        (&mut self.arch, &self.vcpu)
    }

    /// A readable dump of the whole CPU state.
    pub fn dump(&mut self) -> String {
        self.arch.dump(&self.vcpu)
    }

    /// Per-thread setup, run from the CPU's startup event on the thread that
    /// executes its queue: kick handling, the run timer, the instruction
    /// counter. Must run before the first tick.
    pub fn startup_thread(&mut self) -> Result<()> {
        let signals =
            ThreadSignals::setup(&self.vcpu, self.opts.timer, &self.kick).map_err(|e| {
                KvmError::Setup(format!(
                    "{}: setting up the run timer ({:?}) and kick signal: {e}",
                    self.name, self.opts.timer
                ))
            })?;
        self.signals = Some(signals);
        if perf::pmu_available() {
            let mut c =
                InstCounter::new(PerfEvent::GuestInstructions, sys::gettid(), kick_signal())
                    .map_err(|e| KvmError::Setup(format!("guest instruction counter: {e}")))?;
            if let Some(max) = self.opts.max_insts {
                c.set_stop(Some(max.max(1)))
                    .map_err(|e| KvmError::Setup(format!("instruction stop: {e}")))?;
            }
            self.inst_counter = Some(c);
            self.inst_method = InstMethod::PerfCounter;
        } else if self.opts.max_insts.is_some() {
            self.arch.set_single_step(&self.vcpu, true)?;
            self.stepping = true;
            self.inst_method = InstMethod::SingleStep;
            tracing::warn!(
                "{}: max_insts without a hardware PMU: counting by single-stepping every \
                 instruction (exact, about one exit per instruction)",
                self.name
            );
        }
        let available = self.inst_method != InstMethod::Unavailable;
        self.stats.insts_available.set(available);
        if let Some((_, a)) = &self.total_insts {
            a.set(available);
        }
        self.stats.inst_method.set(self.inst_method as u32 as f64);
        Ok(())
    }

    /// Wakes an idle CPU. Returns true if it was idle (the owner must then
    /// schedule a tick).
    pub fn wake(&mut self) -> bool {
        let was_idle = self.state == CpuState::Idle;
        if was_idle {
            self.state = CpuState::Running;
        }
        was_idle
    }

    /// Starts draining. Returns true if the CPU is drained already.
    pub fn drain(&mut self) -> Result<bool> {
        self.draining = true;
        Ok(match self.state {
            CpuState::Idle => true,
            CpuState::Running => self.arch.is_drained(&self.vcpu)?,
            CpuState::RunningService | CpuState::RunningServiceCompletion => false,
        })
    }

    /// Ends a drain; the owner schedules a tick if the CPU is not idle.
    pub fn drain_resume(&mut self) {
        self.draining = false;
    }

    /// One tick of the CPU at `now`. `next_event` is the tick of the next
    /// event in the CPU's queue (the run ends there); `bus` services IO;
    /// devices' requests for the simulator are appended to `requests`.
    pub fn tick(
        &mut self,
        now: Tick,
        next_event: Option<Tick>,
        bus: &IoBus,
        requests: &mut Vec<Request>,
    ) -> Result<TickOutcome> {
        let clock = self.cfg.clock;
        match self.state {
            CpuState::Idle => Ok(TickOutcome::Idle),
            CpuState::RunningService => {
                let Some(exit) = self.pending.take() else {
                    self.state = CpuState::Running;
                    return Ok(TickOutcome::Next(now));
                };
                self.service(now, exit, bus, requests)
            }
            CpuState::Running | CpuState::RunningServiceCompletion => {
                if self.draining {
                    if let Some(outcome) = self.drain_step(now, bus)? {
                        return Ok(outcome);
                    }
                    // Not drained: run briefly so KVM delivers its event.
                    let (ticks, exit, _) = self.run_kvm(
                        now,
                        Some(DRAIN_RUN_LIMIT.min(self.span(now, next_event))),
                        bus,
                    )?;
                    return Ok(self.after_run(now, ticks, exit, None));
                }
                if let Some(o) = self.check_step_allowed()? {
                    return Ok(o);
                }
                if let Some(since) = self.idle_since.take() {
                    // The guest did not run while idle, but its clock (x86:
                    // the TSC) must show the simulated time that passed.
                    let cycles = self.cfg.ticks_to_host_cycles(now.saturating_sub(since));
                    self.arch.advance_guest_clock(&self.vcpu, cycles)?;
                }
                let span = self.trace_begin(now, next_event.map(|t| t.saturating_sub(now)))?;
                let (ticks, exit, expired) = self.run_kvm(now, span, bus)?;
                if let Some(o) = self.check_inst_limit()? {
                    return Ok(o);
                }
                if matches!(exit, Exit::Debug) {
                    self.trace_step(now.saturating_add(ticks))?;
                }
                Ok(self.after_run(now, ticks, exit, expired))
            }
        }
        .inspect(|o| {
            if let TickOutcome::Next(t) = o {
                debug_assert!(*t >= now && *t >= clock.clock_edge(now, 0));
            }
        })
    }

    fn span(&self, now: Tick, next_event: Option<Tick>) -> Tick {
        next_event.map_or(Tick::MAX, |t| t.saturating_sub(now))
    }

    /// Decides the next tick after a run that used `ticks`.
    fn after_run(
        &mut self,
        now: Tick,
        ticks: Tick,
        exit: Exit,
        expired: Option<Tick>,
    ) -> TickOutcome {
        let clock = self.cfg.clock;
        match exit {
            Exit::Intr => {
                self.stats.num_exit_signal.inc();
                self.state = CpuState::Running;
            }
            Exit::Retry | Exit::Debug => self.state = CpuState::Running,
            other => {
                self.pending = Some(other);
                self.state = CpuState::RunningService;
            }
        }
        let cycles = match expired {
            // The run timer expired: time moves just past the end of the span
            // it was armed for (normally the next event), whatever the host
            // measured (gem5's rule).
            Some(span) => clock.ticks_to_cycles(span.saturating_add(1)),
            None => clock.ticks_to_cycles(ticks),
        };
        // At least one cycle passes, so the next tick is in the future.
        TickOutcome::Next(clock.clock_edge(now, cycles.max(1)))
    }

    /// One drain step before a run: a pending read is completed with a half
    /// entry; a CPU with no injected or pending events is drained.
    fn drain_step(&mut self, now: Tick, bus: &IoBus) -> Result<Option<TickOutcome>> {
        if !self.arch.is_drained(&self.vcpu)? {
            return Ok(None);
        }
        if self.state == CpuState::RunningServiceCompletion {
            self.half_entry(now, bus)?;
            self.state = CpuState::Running;
            let clock = self.cfg.clock;
            return Ok(Some(TickOutcome::Next(clock.clock_edge(now, 1))));
        }
        Ok(Some(TickOutcome::Drained))
    }

    /// Enters KVM only to complete a pending IO instruction (immediate_exit).
    fn half_entry(&mut self, now: Tick, bus: &IoBus) -> Result<()> {
        self.arch.update_kvm_state(&self.vcpu)?;
        self.vcpu.set_kvm_immediate_exit(1);
        let r = self.vcpu.run().map(|_| ()).map_err(|e| e.errno());
        self.vcpu.set_kvm_immediate_exit(0);
        self.arch.kvm_state_changed();
        self.stats.num_vm_exits.inc();
        self.stats.num_vm_half_entries.inc();
        self.flush_coalesced(now, bus);
        match r {
            Err(libc::EINTR) => Ok(()),
            Ok(()) => Ok(()),
            Err(e) => Err(KvmError::Setup(format!(
                "half entry (KVM_RUN with immediate_exit) failed: {}",
                std::io::Error::from_raw_os_error(e)
            ))),
        }
    }

    /// Starts a trace whose time has come (single-stepping from now on);
    /// returns the span of the next run, shortened to end where a trace
    /// waiting to start begins.
    fn trace_begin(&mut self, now: Tick, span: Option<Tick>) -> Result<Option<Tick>> {
        let Some(t) = &mut self.tracer else {
            return Ok(span);
        };
        if t.active {
            return Ok(span);
        }
        if now < t.trace.from {
            let until = t.trace.from - now;
            return Ok(Some(span.map_or(until, |s| s.min(until))));
        }
        t.active = true;
        let start = format!(
            "# {}: tracing {} instructions from tick {now} (tick, privilege level, address, bytes, instruction)",
            self.name, t.trace.insts
        );
        self.trace_write(&start)?;
        self.arch.set_single_step(&self.vcpu, true)?;
        self.trace_step(now)?;
        Ok(span)
    }

    /// Records the instruction the CPU stands at after a step; ends the
    /// trace after its last instruction.
    fn trace_step(&mut self, now: Tick) -> Result<()> {
        let Some(t) = &mut self.tracer else {
            return Ok(());
        };
        if !t.active {
            return Ok(());
        }
        if t.trace.insts == 0 {
            self.tracer = None;
            if !self.stepping {
                self.arch.set_single_step(&self.vcpu, false)?;
            }
            return Ok(());
        }
        t.trace.insts -= 1;
        let bytes = self.arch.instruction_bytes(&self.vcpu)?;
        let line = self.arch.trace_line(&self.vcpu, &bytes)?;
        self.trace_write(&format!("{now:>16} {line}"))
    }

    fn trace_write(&mut self, line: &str) -> Result<()> {
        if let Some(t) = &mut self.tracer {
            writeln!(t.trace.out, "{line}")
                .and_then(|()| t.trace.out.flush())
                .map_err(|e| KvmError::Setup(format!("{}: writing the trace: {e}", self.name)))?;
        }
        Ok(())
    }

    /// Before a single-step: refuses to step where this host cannot.
    fn check_step_allowed(&mut self) -> Result<Option<TickOutcome>> {
        if !self.stepping {
            return Ok(None);
        }
        let cpl = self.arch.privilege_level(&self.vcpu)?;
        if crate::probe::single_step_works(cpl)? {
            return Ok(None);
        }
        let dump = self.dump();
        Ok(Some(TickOutcome::Unsupported(format!(
            "max_insts: the guest entered CPL{cpl} after {} counted instructions; this host's KVM \
             does not single-step CPL{cpl} code (it runs it natively to the next exit) and there is \
             no hardware PMU, so an exact instruction stop is impossible here (the count is exact \
             only up to that point)\n{dump}",
            self.insts
        ))))
    }

    /// After a run: the instruction limit.
    fn check_inst_limit(&mut self) -> Result<Option<TickOutcome>> {
        match self.opts.max_insts {
            Some(max) if self.inst_method != InstMethod::Unavailable && self.insts >= max => {
                let dump = self.dump();
                Ok(Some(TickOutcome::InstLimit(self.insts, dump)))
            }
            _ => Ok(None),
        }
    }

    /// Enters KVM once for at most `span` ticks; returns the simulated time
    /// used, the exit, and the span the run timer expired on (if it did).
    fn run_kvm(
        &mut self,
        now: Tick,
        span: Option<Tick>,
        bus: &IoBus,
    ) -> Result<(Tick, Exit, Option<Tick>)> {
        if let Some(intc) = &self.intc {
            let mut intc = mem::lock(intc);
            let d = self.arch.deliver_interrupts(&mut self.vcpu, &mut *intc)?;
            self.stats.num_interrupts.add(u64::from(d.injected));
        }
        self.arch.update_kvm_state(&self.vcpu)?;
        let timer = self.signals.as_ref().map(|s| &s.timer);
        // While single-stepping each entry should stop after one
        // instruction; the timer still bounds it, in case KVM does not step
        // the code (native user mode on a software-assisted KVM).
        let tracing = self.tracer.as_ref().is_some_and(|t| t.active);
        let span = if self.stepping || tracing {
            Some(span.unwrap_or(STEP_SAFETY_SPAN).min(STEP_SAFETY_SPAN))
        } else {
            span
        };
        let armed = match (timer, span) {
            (Some(t), Some(span)) if span < Tick::MAX => {
                let span = span.max(t.resolution(&self.cfg));
                t.arm(span, &self.cfg)
                    .map_err(|e| KvmError::Setup(format!("arming the run timer: {e}")))?;
                Some(span)
            }
            _ => None,
        };
        let host_start = Instant::now();
        let start = self.arch.host_cycles();
        let exit = match self.vcpu.run() {
            Ok(VcpuExit::IoIn(port, _)) => Exit::IoIn {
                port,
                size: 0,
                count: 0,
            },
            Ok(VcpuExit::IoOut(port, data)) => {
                self.io_buf.clear();
                self.io_buf.extend_from_slice(data);
                Exit::IoOut {
                    port,
                    size: 0,
                    count: 0,
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => Exit::MmioRead {
                addr,
                len: data.len(),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut buf = [0u8; 8];
                let len = data.len().min(8);
                buf[..len].copy_from_slice(&data[..len]);
                Exit::MmioWrite {
                    addr,
                    len,
                    data: buf,
                }
            }
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Intr) => Exit::Intr,
            Ok(VcpuExit::IrqWindowOpen) => Exit::IrqWindowOpen,
            Ok(VcpuExit::Debug(_)) => Exit::Debug,
            Ok(VcpuExit::Hypercall(h)) => Exit::Hypercall(h.nr),
            Ok(VcpuExit::Shutdown) => {
                Exit::Fatal("KVM_EXIT_SHUTDOWN: the guest shut down (triple fault)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::Fatal(format!(
                "KVM_EXIT_FAIL_ENTRY: KVM could not enter the guest (hardware entry failure reason {reason:#x}, host cpu {cpu})"
            )),
            Ok(VcpuExit::InternalError) => {
                let run = self.vcpu.get_kvm_run();
                if sys::internal_error(run).map(|(s, _)| s)
                    == Some(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION)
                {
                    Exit::EmulationFailure(sys::emulation_failure_bytes(run))
                } else {
                let detail = sys::internal_error(self.vcpu.get_kvm_run())
                    .map(|(sub, data)| {
                        let what = match sub {
                            1 => " (emulation failure: KVM cannot emulate the instruction)",
                            2 => " (simultaneous exceptions)",
                            3 => " (delivery event)",
                            _ => "",
                        };
                        format!("suberror {sub}{what}, data {data:x?}")
                    })
                    .unwrap_or_default();
                Exit::Fatal(format!("KVM_EXIT_INTERNAL_ERROR: {detail}"))
                }
            }
            Ok(VcpuExit::Unknown) => {
                let hw = sys::unknown_hw_reason(self.vcpu.get_kvm_run()).unwrap_or(0);
                Exit::Fatal(format!("KVM_EXIT_UNKNOWN: hardware exit reason {hw:#x}"))
            }
            Ok(VcpuExit::Exception) => {
                let (nr, code) = sys::exception(self.vcpu.get_kvm_run()).unwrap_or((0, 0));
                Exit::Fatal(format!(
                    "KVM_EXIT_EXCEPTION: exception {nr} error code {code:#x}"
                ))
            }
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => Exit::Fatal(format!(
                "KVM_EXIT_MEMORY_FAULT: guest physical [{gpa:#x}, +{size:#x})"
            )),
            Ok(other) => Exit::Fatal(format!("unexpected exit from KVM: {other:?}")),
            Err(e) if e.errno() == libc::EINTR => Exit::Intr,
            Err(e) if e.errno() == libc::EAGAIN => Exit::Retry,
            Err(e) => Exit::Fatal(format!("KVM_RUN failed: {e}")),
        };
        let cycles = self.arch.host_cycles().wrapping_sub(start);
        let elapsed = host_start.elapsed();
        // The span the timer ran out on, if it expired.
        let expired = match (armed, timer) {
            (Some(span), Some(t)) => t
                .disarm()
                .map_err(|e| KvmError::Setup(format!("disarming the run timer: {e}")))?
                .then_some(span),
            _ => None,
        };
        // A kick or timer signal that arrived late must not end the next run.
        sys::discard_pending(kick_signal());
        self.arch.kvm_state_changed();
        if let Some(intc) = &self.intc {
            self.arch.after_run(&mut self.vcpu, &mut *mem::lock(intc));
        }
        self.stats.kvm_host_seconds.add(elapsed.as_secs_f64());
        self.stats.num_vm_exits.inc();

        // Port IO: size and count are in kvm_run, not in VcpuExit.
        let exit = match exit {
            Exit::IoIn { port, .. } | Exit::IoOut { port, .. } => {
                let (size, count) = sys::pio_geometry(self.vcpu.get_kvm_run()).unwrap_or((1, 1));
                if matches!(exit, Exit::IoIn { .. }) {
                    Exit::IoIn { port, size, count }
                } else {
                    Exit::IoOut { port, size, count }
                }
            }
            e => e,
        };
        // A debug exit may be a repair's breakpoint or step, not ours.
        let exit = match exit {
            Exit::Debug => match self.arch.debug_exit(&self.vcpu)? {
                crate::arch::DebugOutcome::NotMine => Exit::Debug,
                crate::arch::DebugOutcome::Handled => Exit::Retry,
                crate::arch::DebugOutcome::Completed(i) => {
                    self.stats.completed.add(i, 1);
                    Exit::Retry
                }
            },
            e => e,
        };
        self.account_insts(&exit)?;
        let ticks = self
            .cfg
            .host_cycles_to_ticks(cycles)
            .saturating_add(self.flush_coalesced(now, bus));
        self.stats
            .num_cycles
            .add(self.cfg.clock.ticks_to_cycles(ticks));
        Ok((ticks, exit, expired))
    }

    /// Updates the instruction counts after a run.
    fn account_insts(&mut self, exit: &Exit) -> Result<()> {
        let before = self.insts;
        match self.inst_method {
            InstMethod::PerfCounter => {
                if let Some(c) = &self.inst_counter {
                    self.insts = c.total().map_err(|e| {
                        KvmError::Setup(format!("reading the instruction counter: {e}"))
                    })?;
                }
            }
            InstMethod::SingleStep => {
                // One instruction per debug exit; HLT completes without one.
                if matches!(exit, Exit::Debug | Exit::Hlt) {
                    self.insts += 1;
                }
            }
            InstMethod::Unavailable => return Ok(()),
        }
        let delta = self.insts.saturating_sub(before);
        self.stats.num_insts.add(delta);
        if let Some((total, _)) = &self.total_insts {
            total.add(delta);
        }
        Ok(())
    }

    /// Replays the writes buffered in the coalesced-MMIO ring through the
    /// bus at `now` (the tick the run started); returns their summed latency.
    fn flush_coalesced(&mut self, now: Tick, bus: &IoBus) -> Tick {
        if !self.opts.coalesced_mmio {
            return 0;
        }
        let mut latency: Tick = 0;
        let mut reqs = Vec::new();
        while let Ok(Some(e)) = self.vcpu.coalesced_mmio_read() {
            self.stats.num_coalesced_mmio.inc();
            let len = (e.len as usize).min(e.data.len());
            let mut ctx = AccessCtx::new(now, &mut reqs);
            latency = latency.saturating_add(bus.write(
                Space::Mmio,
                e.phys_addr,
                &e.data[..len],
                &mut ctx,
            ));
        }
        if !reqs.is_empty() {
            tracing::warn!(
                "{}: requests from coalesced MMIO writes are ignored",
                self.name
            );
        }
        latency
    }

    /// Services an exit at `now`.
    fn service(
        &mut self,
        now: Tick,
        exit: Exit,
        bus: &IoBus,
        requests: &mut Vec<Request>,
    ) -> Result<TickOutcome> {
        let clock = self.cfg.clock;
        let mut completion = false;
        let latency = match exit {
            Exit::IoIn { port, size, count } => {
                self.stats.num_io.inc();
                let size = usize::from(size.max(1));
                let mut buf = std::mem::take(&mut self.io_buf);
                buf.clear();
                buf.resize(size * count.max(1) as usize, 0);
                let port = u64::from(port);
                let latency = with_ctx(&mut self.arch, &self.vcpu, now, requests, |ctx| {
                    buf.chunks_mut(size).fold(0, |lat: Tick, chunk| {
                        lat.saturating_add(bus.read(Space::Pio, port, chunk, ctx))
                    })
                });
                if !sys::complete_pio_in(&mut self.vcpu, self.mmap_size, &buf) {
                    return Err(KvmError::Setup(format!(
                        "cannot complete the port read of {} bytes at port {port:#x}",
                        buf.len()
                    )));
                }
                self.io_buf = buf;
                completion = true;
                latency
            }
            Exit::IoOut { port, size, .. } => {
                self.stats.num_io.inc();
                let size = usize::from(size.max(1));
                let buf = std::mem::take(&mut self.io_buf);
                let port = u64::from(port);
                let latency = with_ctx(&mut self.arch, &self.vcpu, now, requests, |ctx| {
                    buf.chunks(size).fold(0, |lat: Tick, chunk| {
                        lat.saturating_add(bus.write(Space::Pio, port, chunk, ctx))
                    })
                });
                self.io_buf = buf;
                latency
            }
            Exit::MmioRead { addr, len } => {
                self.stats.num_mmio.inc();
                let mut data = [0u8; 8];
                let len = len.min(8);
                let latency = with_ctx(&mut self.arch, &self.vcpu, now, requests, |ctx| {
                    bus.read(Space::Mmio, addr, &mut data[..len], ctx)
                });
                if !sys::complete_mmio_read(&mut self.vcpu, &data[..len]) {
                    return Err(KvmError::Setup(format!(
                        "cannot complete the MMIO read of {len} bytes at {addr:#x}"
                    )));
                }
                completion = true;
                latency
            }
            Exit::MmioWrite { addr, len, data } => {
                self.stats.num_mmio.inc();
                with_ctx(&mut self.arch, &self.vcpu, now, requests, |ctx| {
                    bus.write(Space::Mmio, addr, &data[..len], ctx)
                })
            }
            Exit::Hlt => {
                self.stats.num_halt.inc();
                self.state = CpuState::Idle;
                self.idle_since = Some(now);
                return Ok(if self.draining {
                    TickOutcome::Drained
                } else {
                    TickOutcome::Idle
                });
            }
            Exit::IrqWindowOpen | Exit::Intr | Exit::Retry | Exit::Debug => 0,
            Exit::EmulationFailure(bytes) => {
                let bytes = match bytes {
                    Some(b) if !b.is_empty() => b,
                    _ => self.arch.instruction_bytes(&self.vcpu)?,
                };
                match self.arch.complete_instruction(&self.vcpu, &bytes)? {
                    Ok(i) => {
                        self.stats.completed.add(i, 1);
                        0
                    }
                    Err(disasm) => {
                        return Ok(self.fault(format!(
                            "KVM_EXIT_INTERNAL_ERROR (emulation failure): the host's KVM cannot emulate \
                             `{disasm}` (bytes {bytes:02x?}) and kvmsim does not complete it (it completes: {})",
                            self.arch.completable().join(", ")
                        )));
                    }
                }
            }
            Exit::Hypercall(nr) => {
                self.stats.num_hypercalls.inc();
                return Ok(self.fault(format!(
                    "KVM_EXIT_HYPERCALL: hypercall {nr} is not supported"
                )));
            }
            Exit::Fatal(msg) => return Ok(self.fault(msg)),
        };
        self.state = if completion {
            CpuState::RunningServiceCompletion
        } else {
            CpuState::Running
        };
        Ok(TickOutcome::Next(
            clock.clock_edge(now, clock.ticks_to_cycles(latency)),
        ))
    }

    fn fault(&mut self, what: String) -> TickOutcome {
        self.state = CpuState::Idle;
        let dump = self.dump();
        TickOutcome::Fault(format!("{what}\n{dump}"))
    }
}
