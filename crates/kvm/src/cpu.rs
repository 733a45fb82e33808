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

use mem::{AccessCtx, CallArgs, IoBus, Space};
use sim::intr::InterruptController;
use sim::{Availability, Counter, Request, Stats, Tick, Value};

use crate::arch::{Arch, DebugStop, Stepper};
use crate::perf::{InstCounter, PerfEvent};
use crate::timer::{kick_signal, ExitTimer, KickHandle, TimerKind};
use crate::vcpu::{KvmVcpu, Vcpu, VmExit};
use crate::{sys, KvmError, Result};

pub use crate::time::CpuConfig;

/// Options of a KVM CPU beyond time conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuOptions {
    /// What forces exits at the end of each run.
    pub timer: TimerKind,
    /// Stop after this many guest instructions.
    pub max_insts: Option<u64>,
    /// Drain the coalesced-MMIO ring after every run.
    pub coalesced_mmio: bool,
    /// The CPU's index in its system (selects per-CPU devices on the bus).
    pub index: usize,
    /// Single-step kernel-mode code to find the guest's interrupt window on
    /// a host whose KVM does not exit there ([`crate::probe::window_assist`]);
    /// without it a waiting interrupt is taken at the next exit where the
    /// guest accepts it.
    pub irq_window_step: bool,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            timer: TimerKind::Posix,
            max_insts: None,
            coalesced_mmio: false,
            index: 0,
            irq_window_step: true,
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
    /// Started, but the guest runs at a privilege level this host's KVM
    /// does not single-step (stepping would hand the guest a debug
    /// exception it never asked for): waiting for one it does.
    paused: bool,
}

/// A KVM CPU's saved state ([`KvmCpu::save_state`]): the vCPU's and the
/// simulator's side of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuSaved {
    /// The CPU's name (its statistics prefix), e.g. `system.cpu0`.
    pub name: String,
    pub vcpu: crate::state::VcpuState,
    /// The CPU was halted (Idle): it runs again when woken.
    pub halted: bool,
    /// When it halted (the simulated time skipped since is added to the
    /// guest's clock when it runs again); none for a CPU waiting for SIPI.
    pub idle_since: Option<Tick>,
    /// Guest instructions executed so far (0 where they are not counted).
    pub insts: u64,
    /// The minimum run span the forward-progress rule had reached.
    pub min_span: Tick,
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
    /// A debugger's breakpoint, watchpoint or step stopped the CPU. It is
    /// ticked again, at `next`, only when the debugger lets it go on.
    DebugStop { next: Tick, stop: DebugStop },
    /// The guest cannot continue: a description and register dump.
    Fault(String),
}

type Exit = VmExit;

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
    irq_window_steps: Counter,
    num_hypercalls: Counter,
    num_cycles: Counter,
    num_insts: Counter,
    insts_available: Availability,
    inst_method: Value,
    kvm_host_seconds: Value,
    completed: sim::Vector,
    tsc_backwards: Counter,
    progress_stalls: Counter,
    host_syscalls: Counter,
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
            irq_window_steps: c(
                stats,
                "irqWindowSteps",
                "Entries single-stepped to find the guest's interrupt window (hosts whose KVM \
                 does not exit there; see kvmsim doctor)",
            )?,
            num_hypercalls: c(stats, "numHypercalls", "Hypercall exits")?,
            num_cycles: stats.counter(
                &format!("{p}.numCycles"),
                "Simulated CPU cycles spent in the guest (host time x host_factor, in CPU clock cycles)",
                "Cycle",
            )?,
            num_insts,
            insts_available,
            inst_method: stats.labelled_value(
                &format!("{p}.instCountMethod"),
                "How guest instructions are counted",
                "Unspecified",
                &["unavailable", "perf-counter", "single-step"],
            )?,
            kvm_host_seconds: stats.value(
                &format!("{p}.kvmHostSeconds"),
                "Host time spent inside KVM_RUN (by the host's TSC: simulated time is this times host_factor, unless an event cut a run short)",
                "Second",
            )?,
            completed: stats.vector(
                &format!("{p}.completedInstructions"),
                "Instructions the host's KVM could not emulate and kvmsim completed",
                "Count",
                completable,
            )?,
            tsc_backwards: c(
                stats,
                "numHostClockBackwards",
                "Runs whose host cycle counter read lower at the exit than at the entry (counted as 0 cycles)",
            )?,
            progress_stalls: c(
                stats,
                "numProgressStalls",
                "Timer exits at the instruction of the previous one (no progress); each doubles the minimum run span",
            )?,
            host_syscalls: c(
                stats,
                "hostSyscalls",
                "System calls the CPU's thread made for it (KVM ioctls, run timer, signals)",
            )?,
        })
    }
}

/// Gives devices the calling CPU's argument registers, through the lazy context.
struct ArgsView<'a, A: Arch> {
    arch: &'a mut A,
    vcpu: &'a mut dyn Vcpu,
}

impl<A: Arch> CallArgs for ArgsView<'_, A> {
    fn call_args(&mut self) -> [u64; 6] {
        self.arch.call_args(self.vcpu).unwrap_or_else(|e| {
            tracing::error!("cannot read the guest's argument registers: {e}");
            [0; 6]
        })
    }

    fn read_virt(&mut self, va: u64, buf: &mut [u8]) -> usize {
        self.arch.read_virt(self.vcpu, va, buf)
    }

    fn write_virt(&mut self, va: u64, data: &[u8]) -> usize {
        self.arch.write_virt(self.vcpu, va, data)
    }

    fn user_context(&mut self) -> Option<mem::UserContext> {
        self.arch.user_context(self.vcpu).unwrap_or_else(|e| {
            tracing::error!("cannot read the guest's registers: {e}");
            None
        })
    }

    fn set_user_context(&mut self, ctx: &mem::UserContext) -> bool {
        self.arch
            .set_user_context(self.vcpu, ctx)
            .unwrap_or_else(|e| {
                tracing::error!("cannot set the guest's registers: {e}");
                false
            })
    }

    fn set_kernel_context(&mut self, ctx: &mem::UserContext) -> bool {
        self.arch
            .set_kernel_context(self.vcpu, ctx)
            .unwrap_or_else(|e| {
                tracing::error!("cannot set the guest's registers: {e}");
                false
            })
    }

    fn fpu_state(&mut self) -> Option<Vec<u8>> {
        self.arch.fpu_state(self.vcpu).ok().flatten()
    }

    fn set_fpu_state(&mut self, area: &[u8]) -> bool {
        self.arch.set_fpu_state(self.vcpu, area).unwrap_or(false)
    }
}

/// Runs `f` with an access context for `now` whose calling CPU is `arch`.
fn with_ctx<A: Arch, R>(
    arch: &mut A,
    vcpu: &mut dyn Vcpu,
    cpu_index: usize,
    now: Tick,
    requests: &mut Vec<Request>,
    f: impl FnOnce(&mut AccessCtx) -> R,
) -> R {
    let mut view = ArgsView { arch, vcpu };
    let mut ctx = AccessCtx {
        now,
        cpu: Some(&mut view),
        requests,
        cpu_index,
    };
    f(&mut ctx)
}

/// A shared interrupt controller, as the CPU holds it.
pub type IntcHandle = Arc<Mutex<dyn InterruptController>>;

/// Longest a draining CPU runs while waiting for KVM to deliver an event.
const DRAIN_RUN_LIMIT: Tick = sim::tick::TICKS_PER_MS;
/// Longest one single-step entry may run (a step that did not stop).
const STEP_SAFETY_SPAN: Tick = 10 * sim::tick::TICKS_PER_MS;
/// The minimum run span grows up to this much host time (seconds).
const MAX_MIN_SPAN_HOST_S: f64 = 0.01;

/// A CPU backed by a KVM vCPU (or, in tests, a scripted one).
pub struct KvmCpu<A: Arch, V: Vcpu = KvmVcpu> {
    name: String,
    vcpu: V,
    arch: A,
    cfg: CpuConfig,
    opts: CpuOptions,
    state: CpuState,
    pending: Option<Exit>,
    io_buf: Vec<u8>,
    stats: CpuStats,
    kick: KickHandle,
    timer: Option<Box<dyn ExitTimer>>,
    intc: Option<IntcHandle>,
    draining: bool,
    /// Guest instructions executed so far (absolute, never reset).
    insts: u64,
    /// Instructions counted before this process's counter began (a
    /// restored CPU's count at its checkpoint).
    insts_base: u64,
    inst_counter: Option<InstCounter>,
    inst_method: InstMethod,
    stepping: bool,
    /// The debugger's stop that the last run ended with.
    debug_stop: Option<DebugStop>,
    /// The PC event the last run reached (its address), not yet taken.
    pc_hit: Option<u64>,
    /// The system-wide instruction count, updated on every exit.
    total_insts: Option<(Counter, Availability)>,
    /// An instruction trace, waiting for its start or in progress.
    tracer: Option<Tracer>,
    /// When the CPU halted: simulated time skipped while idle is added to
    /// the guest's clock before it runs again.
    idle_since: Option<Tick>,
    /// No run is armed shorter than this (grown while timer exits make no
    /// progress, so that a slow host still completes an instruction).
    min_span: Tick,
    /// The program counter at the last timer exit.
    stall_pc: Option<u64>,
    /// Timer exits in a row at `stall_pc`, after the first.
    stall_repeats: u32,
    /// An interrupt or NMI was injected since the last timer exit (the
    /// guest ran its handler: progress, even if it is back at the same PC).
    injected_since_timer_exit: bool,
}

impl<A: Arch, V: Vcpu> KvmCpu<A, V> {
    /// Wraps `vcpu`; statistics go under `name` (e.g. `system.cpu`).
    pub fn new(
        name: &str,
        vcpu: V,
        arch: A,
        cfg: CpuConfig,
        opts: CpuOptions,
        stats: &mut Stats,
    ) -> Result<Self> {
        let cpu_stats = CpuStats::new(stats, name, arch.completable())
            .map_err(|e| KvmError::Setup(e.to_string()))?;
        Ok(KvmCpu {
            name: name.into(),
            vcpu,
            arch,
            cfg,
            opts,
            state: CpuState::Running,
            pending: None,
            io_buf: Vec::new(),
            stats: cpu_stats,
            kick: KickHandle::default(),
            timer: None,
            intc: None,
            draining: false,
            insts: 0,
            insts_base: 0,
            inst_counter: None,
            inst_method: InstMethod::Unavailable,
            stepping: false,
            debug_stop: None,
            pc_hit: None,
            total_insts: None,
            tracer: None,
            idle_since: None,
            min_span: 0,
            stall_pc: None,
            stall_repeats: 0,
            injected_since_timer_exit: false,
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
            paused: false,
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

    /// The address of the PC event the last tick's run reached, if any
    /// (taken: each hit is reported once). The guest reached it at the
    /// tick the CPU is next ticked at (`TickOutcome::Next`).
    pub fn take_pc_hit(&mut self) -> Option<u64> {
        self.pc_hit.take()
    }

    /// A handle that forces this CPU out of KVM from any thread.
    pub fn kick_handle(&self) -> KickHandle {
        self.kick.clone()
    }

    /// The architecture state, with the vCPU to sync it through.
    pub fn arch_mut(&mut self) -> (&mut A, &mut dyn Vcpu) {
        (&mut self.arch, &mut self.vcpu)
    }

    /// The vCPU (tests read a scripted vCPU's record through it).
    pub fn vcpu(&self) -> &V {
        &self.vcpu
    }

    /// The vCPU, mutable (tests adjust a scripted vCPU).
    pub fn vcpu_mut(&mut self) -> &mut V {
        &mut self.vcpu
    }

    /// A readable dump of the whole CPU state.
    pub fn dump(&mut self) -> String {
        self.arch.dump(&mut self.vcpu)
    }

    /// Per-thread setup, run from the CPU's startup event on the thread that
    /// executes its queue: kick handling, the run timer, the instruction
    /// counter. Must run before the first tick.
    pub fn startup_thread(&mut self) -> Result<()> {
        let timer = self
            .vcpu
            .thread_setup(self.opts.timer, &self.kick)
            .map_err(|e| KvmError::Timer(format!("{}: {e}", self.name)))?;
        self.timer = Some(timer);
        // Where KVM does not exit when the guest opens an interrupt window
        // (this host's emulated CPL0), the architecture steps to find it.
        let assist = if self.opts.irq_window_step {
            self.vcpu.window_assist()
        } else {
            crate::probe::WindowAssist::default()
        };
        self.arch.set_window_assist(assist);
        if self.vcpu.has_pmu() {
            let mut c =
                InstCounter::new(PerfEvent::GuestInstructions, sys::gettid(), kick_signal())
                    .map_err(|e| KvmError::PerfCounter(format!("guest instructions: {e}")))?;
            if let Some(max) = self.opts.max_insts {
                c.set_stop(Some(max.max(1)))
                    .map_err(|e| KvmError::PerfCounter(format!("instruction stop: {e}")))?;
            }
            self.inst_counter = Some(c);
            self.inst_method = InstMethod::PerfCounter;
        } else if self.opts.max_insts.is_some() {
            self.arch.set_step(&mut self.vcpu, Stepper::Insts, true)?;
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

    /// INIT: forgets any exit in flight and stops the CPU; it runs again
    /// only after its owner has given it a start state (a SIPI) and woken it
    /// with [`KvmCpu::wake`]. Simulated time spent waiting is not added to
    /// the guest's clock (the CPU restarts from reset).
    pub fn reset_for_init(&mut self) {
        self.state = CpuState::Idle;
        self.pending = None;
        self.idle_since = None;
        self.stall_pc = None;
        self.stall_repeats = 0;
        self.injected_since_timer_exit = false;
    }

    /// Starts draining. Returns true if the CPU is drained already.
    pub fn drain(&mut self) -> Result<bool> {
        self.draining = true;
        Ok(match self.state {
            CpuState::Idle => true,
            CpuState::Running => self.drained_now()?,
            CpuState::RunningService | CpuState::RunningServiceCompletion => false,
        })
    }

    /// True if nothing is in flight: no event injected or pending in KVM,
    /// and no event the simulator completed waiting to be pushed.
    fn drained_now(&mut self) -> Result<bool> {
        self.arch.update_kvm_state(&mut self.vcpu)?;
        self.arch.is_drained(&mut self.vcpu)
    }

    /// Ends a drain; the owner schedules a tick if the CPU is not idle.
    pub fn drain_resume(&mut self) {
        self.draining = false;
    }

    /// The CPU's whole state for a checkpoint: the vCPU as KVM holds it
    /// ([`crate::state::save`]) and the simulator's side worth keeping.
    /// Taken at a drained point: the CPU must be Running or Idle with no
    /// exit in flight, and KVM must hold no injected or pending event;
    /// otherwise this is an error that says so (nothing is changed).
    pub fn save_state(&mut self) -> Result<CpuSaved> {
        let halted = match self.state {
            CpuState::Running if self.pending.is_none() => false,
            CpuState::Idle if self.pending.is_none() => true,
            s => {
                return Err(KvmError::Checkpoint(format!(
                    "{}: cannot save the CPU in state {s:?} (an exit is in flight); \
                     save it at a drained point",
                    self.name
                )))
            }
        };
        // What the simulator changed goes to KVM first, so KVM's state is
        // the whole state.
        self.arch.update_kvm_state(&mut self.vcpu)?;
        if !self.arch.is_drained(&mut self.vcpu)? {
            return Err(KvmError::Checkpoint(format!(
                "{}: KVM holds an injected or pending exception, interrupt or NMI; \
                 save the CPU at a drained point",
                self.name
            )));
        }
        let vcpu = crate::state::save(&self.vcpu)?;
        Ok(CpuSaved {
            name: self.name.clone(),
            vcpu,
            halted,
            idle_since: self.idle_since,
            insts: self.insts,
            min_span: self.min_span,
        })
    }

    /// Puts a saved state into this CPU, whose vCPU must be fresh (never
    /// run) in a VM holding the checkpoint's RAM. The architecture's cached
    /// context is dropped (KVM holds the new state); the CPU is Running, or
    /// Idle if it was halted (then it waits for [`KvmCpu::wake`]). Returns
    /// what KVM refused (MSRs it does not take, also logged).
    pub fn restore_state(&mut self, saved: &CpuSaved) -> Result<crate::state::RestoreReport> {
        if self.pending.is_some() || self.draining {
            return Err(KvmError::Checkpoint(format!(
                "{}: cannot restore into a CPU with an exit in flight or a drain under way",
                self.name
            )));
        }
        let report = crate::state::restore(&mut self.vcpu, &saved.vcpu)
            .map_err(|e| KvmError::Checkpoint(format!("{}: restoring the vCPU: {e}", self.name)))?;
        self.arch.context_replaced(&mut self.vcpu)?;
        static REFUSED_SAID: std::sync::atomic::AtomicBool =
            std::sync::atomic::AtomicBool::new(false);
        if !report.msrs_refused.is_empty()
            && !REFUSED_SAID.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "{}: this host's KVM refused {} saved MSRs: {:x?} (said once per run)",
                self.name,
                report.msrs_refused.len(),
                report.msrs_refused
            );
        }
        static TSC_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Some(now) = report.tsc_not_kept {
            if !TSC_SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "{}: this host's KVM ignored the restored TSC: the guest's TSC reads {now} \
                     instead of going on from {} (guest code timing itself with rdtsc across the \
                     restore sees a jump; Linux keeps simulated time from its other clocks; said \
                     once per run)",
                    self.name,
                    saved.vcpu.tsc
                );
            }
        }
        self.state = if saved.halted {
            CpuState::Idle
        } else {
            CpuState::Running
        };
        self.pending = None;
        self.idle_since = saved.idle_since;
        self.insts = saved.insts;
        self.insts_base = saved.insts;
        self.min_span = saved.min_span;
        self.stall_pc = None;
        self.stall_repeats = 0;
        self.injected_since_timer_exit = false;
        Ok(report)
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
        let calls = sys::syscalls();
        let outcome = self.tick_inner(now, next_event, bus, requests);
        self.stats
            .host_syscalls
            .add(sys::syscalls().saturating_sub(calls));
        if let Ok(TickOutcome::Next(t)) = &outcome {
            debug_assert!(*t >= now && *t >= self.cfg.clock.clock_edge(now, 0));
        }
        outcome
    }

    fn tick_inner(
        &mut self,
        now: Tick,
        next_event: Option<Tick>,
        bus: &IoBus,
        requests: &mut Vec<Request>,
    ) -> Result<TickOutcome> {
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
                    let span = DRAIN_RUN_LIMIT.min(self.span(now, next_event));
                    let (ticks, exit) = self.run_kvm(now, Some(span), bus)?;
                    return Ok(self.after_run(now, ticks, exit));
                }
                if let Some(o) = self.check_step_allowed()? {
                    return Ok(o);
                }
                if let Some(since) = self.idle_since.take() {
                    // The guest did not run while idle, but its clock (x86:
                    // the TSC) must show the simulated time that passed.
                    let cycles = self.cfg.ticks_to_host_cycles(now.saturating_sub(since));
                    self.arch.advance_guest_clock(&mut self.vcpu, cycles)?;
                }
                let span = self.trace_begin(now, next_event.map(|t| t.saturating_sub(now)))?;
                let (ticks, exit) = self.run_kvm(now, span, bus)?;
                if let Some(o) = self.check_inst_limit()? {
                    return Ok(o);
                }
                let at = now.saturating_add(ticks);
                match self.tracer.as_ref().map(|t| (t.active, t.paused)) {
                    Some((true, false)) if matches!(exit, Exit::Debug(_)) => {
                        self.trace_step(at)?;
                        // The step may have entered a level that cannot be stepped.
                        if self.tracer.is_some() {
                            self.trace_can_step(at)?;
                        }
                    }
                    Some((true, true)) if self.trace_can_step(at)? => self.trace_step(at)?,
                    _ => {}
                }
                let outcome = self.after_run(now, ticks, exit);
                Ok(match (self.debug_stop.take(), outcome) {
                    (Some(stop), TickOutcome::Next(next)) => TickOutcome::DebugStop { next, stop },
                    (_, o) => o,
                })
            }
        }
    }

    fn span(&self, now: Tick, next_event: Option<Tick>) -> Tick {
        next_event.map_or(Tick::MAX, |t| t.saturating_sub(now))
    }

    /// Decides the next tick after a run that was charged `ticks`.
    fn after_run(&mut self, now: Tick, ticks: Tick, exit: Exit) -> TickOutcome {
        let clock = self.cfg.clock;
        match exit {
            Exit::Intr => {
                self.stats.num_exit_signal.inc();
                self.state = CpuState::Running;
            }
            Exit::Retry | Exit::Debug(_) => self.state = CpuState::Running,
            other => {
                self.pending = Some(other);
                self.state = CpuState::RunningService;
            }
        }
        // At least one cycle passes, so the next tick is in the future.
        TickOutcome::Next(clock.clock_edge(now, clock.ticks_to_cycles(ticks).max(1)))
    }

    /// One drain step before a run: a pending read is completed with a half
    /// entry; a CPU with no injected or pending events is drained.
    fn drain_step(&mut self, now: Tick, bus: &IoBus) -> Result<Option<TickOutcome>> {
        if !self.drained_now()? {
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
        self.arch.update_kvm_state(&mut self.vcpu)?;
        let r = self.vcpu.half_entry();
        self.arch.kvm_state_changed();
        self.stats.num_vm_exits.inc();
        self.stats.num_vm_half_entries.inc();
        self.flush_coalesced(now, bus);
        r
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
        if self.trace_can_step(now)? {
            self.arch.set_step(&mut self.vcpu, Stepper::Trace, true)?;
            self.trace_step(now)?;
        }
        Ok(span)
    }

    /// Whether the guest's current privilege level can be single-stepped
    /// here; pauses or resumes the trace accordingly (with a note in the
    /// trace and, the first time, a warning).
    fn trace_can_step(&mut self, now: Tick) -> Result<bool> {
        let cpl = self.arch.privilege_level(&mut self.vcpu)?;
        let can = crate::probe::single_step_works(cpl)?;
        let Some(t) = &mut self.tracer else {
            return Ok(false);
        };
        if can != t.paused {
            return Ok(can);
        }
        t.paused = !can;
        let note = if can {
            format!("# {now}: resumed at CPL{cpl}")
        } else {
            tracing::warn!(
                "{}: the trace pauses while the guest runs at CPL{cpl}: this host's KVM does \
                 not single-step CPL{cpl} code (see kvmsim doctor)",
                self.name
            );
            format!(
                "# {now}: paused: the guest runs at CPL{cpl}, which this host's KVM does not \
                 single-step; tracing resumes when it returns to a level it does"
            )
        };
        self.trace_write(&note)?;
        self.arch.set_step(&mut self.vcpu, Stepper::Trace, can)?;
        Ok(can)
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
            self.arch.set_step(&mut self.vcpu, Stepper::Trace, false)?;
            return Ok(());
        }
        t.trace.insts -= 1;
        let bytes = self.arch.instruction_bytes(&mut self.vcpu)?;
        let line = self.arch.trace_line(&mut self.vcpu, &bytes)?;
        self.trace_write(&format!("{now:>16} {line}"))
    }

    fn trace_write(&mut self, line: &str) -> Result<()> {
        if let Some(t) = &mut self.tracer {
            writeln!(t.trace.out, "{line}")
                .and_then(|()| t.trace.out.flush())
                .map_err(|e| KvmError::Trace(format!("{}: writing the trace: {e}", self.name)))?;
        }
        Ok(())
    }

    /// Before a single-step: refuses to step where this host cannot.
    fn check_step_allowed(&mut self) -> Result<Option<TickOutcome>> {
        if !self.stepping {
            return Ok(None);
        }
        let cpl = self.arch.privilege_level(&mut self.vcpu)?;
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

    /// Enters KVM once for at most `span` ticks (the span to the CPU's next
    /// event); returns the simulated time the run is charged and the exit.
    ///
    /// The charge is the host time measured inside KVM, in simulated time,
    /// but never more than `span + 1`: whatever the host measured, the CPU
    /// does not pass its next event (gem5's rule, applied to every exit, and
    /// never charging more than was measured).
    fn run_kvm(&mut self, now: Tick, span: Option<Tick>, bus: &IoBus) -> Result<(Tick, Exit)> {
        // What the simulator changed goes to KVM first: a completed
        // instruction's exception, pushed after an injection, would discard
        // the injected interrupt.
        self.arch.update_kvm_state(&mut self.vcpu)?;
        let mut window_step = false;
        if let Some(intc) = &self.intc {
            let mut intc = mem::lock(intc);
            let d = self.arch.deliver_interrupts(&mut self.vcpu, &mut *intc)?;
            self.stats.num_interrupts.add(u64::from(d.injected));
            if d.window_step {
                self.stats.irq_window_steps.inc();
                window_step = true;
            }
            self.injected_since_timer_exit |= d.injected > 0;
        }
        // While single-stepping each entry should stop after one
        // instruction; the timer still bounds it, in case KVM does not step
        // the code (native user mode on a software-assisted KVM).
        let tracing = self.tracer.as_ref().is_some_and(|t| t.active && !t.paused);
        let span = if self.stepping || tracing {
            Some(span.unwrap_or(STEP_SAFETY_SPAN).min(STEP_SAFETY_SPAN))
        } else {
            span.filter(|&s| s < Tick::MAX)
        };
        let start = self.vcpu.host_cycles();
        if let Some(t) = &mut self.timer {
            let armed = span.map(|s| s.max(self.min_span).max(t.resolution(&self.cfg)));
            t.arm(armed, &self.cfg, start)
                .map_err(|e| KvmError::Timer(format!("{}: arming: {e}", self.name)))?;
        }
        let exit = self.vcpu.run(&mut self.io_buf);
        let end = self.vcpu.host_cycles();
        let cycles = match end.checked_sub(start) {
            Some(c) => c,
            None => {
                // The counter went back (a host that moved the thread to a
                // CPU whose TSC lags): count nothing rather than ~2^64.
                self.stats.tsc_backwards.inc();
                0
            }
        };
        let expired = match &mut self.timer {
            Some(t) => t
                .after_run(end, exit == Exit::Intr)
                .map_err(|e| KvmError::Timer(format!("{}: after a run: {e}", self.name)))?,
            None => false,
        };
        tracing::trace!(
            "{}: run at {now}: span {span:?}, min span {}, {cycles} host cycles, {exit:?}, timer expired {expired}",
            self.name,
            self.min_span
        );
        self.arch.kvm_state_changed();
        if let Some(intc) = &self.intc {
            self.arch.after_run(&mut self.vcpu, &mut *mem::lock(intc));
        }
        // The same interval simulated time is charged for (the host's
        // TSC, not a second clock read a preemption apart).
        self.stats
            .kvm_host_seconds
            .add(cycles as f64 / self.cfg.host_freq_hz);
        self.stats.num_vm_exits.inc();

        // A debugger's int3 that this host's emulator fails on.
        let exit = match exit {
            Exit::EmulationFailure(b) => {
                match self.arch.planted_breakpoint(&mut self.vcpu, b.as_deref())? {
                    Some(d) => Exit::Debug(d),
                    None => Exit::EmulationFailure(b),
                }
            }
            e => e,
        };
        // A debug exit may be a step (an instruction completed: counted,
        // traced), a repair's breakpoint, or a debugger's stop.
        let exit = match exit {
            Exit::Debug(d) => {
                let o = self.arch.debug_exit(&mut self.vcpu, &d)?;
                if let Some(i) = o.completed {
                    self.stats.completed.add(i, 1);
                }
                if o.stop.is_some() {
                    self.debug_stop = o.stop;
                }
                if o.pc_event.is_some() {
                    self.pc_hit = o.pc_event;
                }
                if o.stepped {
                    Exit::Debug(d)
                } else {
                    Exit::Retry
                }
            }
            e => e,
        };
        self.account_insts(&exit)?;
        self.check_progress(&exit, expired)?;
        let measured = self
            .cfg
            .host_cycles_to_ticks(cycles)
            .saturating_add(self.flush_coalesced(now, bus));
        let ticks = match span {
            Some(s) => measured.min(s.saturating_add(1)),
            None => measured,
        };
        // A step that only looks for the guest's interrupt window (a host
        // without window exits) runs one instruction, and its host time is
        // nearly all the exit, which the guest would not have paid running
        // on: it is charged one CPU cycle, so that kernel code stepped while
        // an interrupt waits does not look slower in simulated time.
        let ticks = if window_step {
            ticks.min(self.cfg.clock.period())
        } else {
            ticks
        };
        self.stats
            .num_cycles
            .add(self.cfg.clock.ticks_to_cycles(ticks));
        Ok((ticks, exit))
    }

    /// Forward progress on a host that needs more time per entry than the
    /// next event leaves: the third timer exit in a row at the same program
    /// counter, with nothing else between (no other exit, no interrupt
    /// injected), doubles the minimum run span; a timer exit elsewhere
    /// halves it. A tight loop also meets its own PC now and then (a
    /// two-instruction loop: every other exit), and a guest that waits in
    /// a loop for interrupts meets it after each handler; a stuck
    /// instruction repeats every time with nothing between.
    fn check_progress(&mut self, exit: &Exit, expired: bool) -> Result<()> {
        if !(expired && *exit == Exit::Intr) {
            if *exit != Exit::Intr {
                self.stall_pc = None;
                self.stall_repeats = 0;
            }
            return Ok(());
        }
        let pc = self.arch.program_counter(&mut self.vcpu)?;
        let injected = std::mem::take(&mut self.injected_since_timer_exit);
        let floor = self
            .timer
            .as_ref()
            .map_or(1, |t| t.resolution(&self.cfg).max(1));
        if self.stall_pc == Some(pc) && !injected {
            self.stall_repeats += 1;
        } else {
            self.stall_repeats = 0;
            self.min_span /= 2;
            if self.min_span < floor {
                self.min_span = 0;
            }
        }
        if self.stall_repeats >= 2 {
            self.stats.progress_stalls.inc();
            let cap = self
                .cfg
                .host_cycles_to_ticks((self.cfg.host_freq_hz * MAX_MIN_SPAN_HOST_S) as u64);
            self.min_span = self
                .min_span
                .max(floor)
                .saturating_mul(2)
                .min(cap.max(floor));
        }
        self.stall_pc = Some(pc);
        Ok(())
    }

    /// Updates the instruction counts after a run.
    fn account_insts(&mut self, exit: &Exit) -> Result<()> {
        let before = self.insts;
        match self.inst_method {
            InstMethod::PerfCounter => {
                if let Some(c) = &self.inst_counter {
                    self.insts = self.insts_base.saturating_add(c.total().map_err(|e| {
                        KvmError::PerfCounter(format!("reading the instruction counter: {e}"))
                    })?);
                }
            }
            InstMethod::SingleStep => {
                // One instruction per debug exit; HLT completes without one.
                if matches!(exit, Exit::Debug(_) | Exit::Hlt) {
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
        while let Some((addr, data, len)) = self.vcpu.coalesced_mmio_read() {
            self.stats.num_coalesced_mmio.inc();
            let mut ctx = AccessCtx::new(now, &mut reqs);
            ctx.cpu_index = self.opts.index;
            latency = latency.saturating_add(bus.write(Space::Mmio, addr, &data[..len], &mut ctx));
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
                let latency = with_ctx(
                    &mut self.arch,
                    &mut self.vcpu,
                    self.opts.index,
                    now,
                    requests,
                    |ctx| {
                        buf.chunks_mut(size).fold(0, |lat: Tick, chunk| {
                            lat.saturating_add(bus.read(Space::Pio, port, chunk, ctx))
                        })
                    },
                );
                let done = self.vcpu.complete_io_in(&buf);
                self.io_buf = buf;
                if !done {
                    return Err(KvmError::Completion(format!(
                        "{}: cannot complete the port read of {} bytes at port {port:#x}",
                        self.name,
                        self.io_buf.len()
                    )));
                }
                completion = true;
                latency
            }
            Exit::IoOut { port, size, .. } => {
                self.stats.num_io.inc();
                let size = usize::from(size.max(1));
                let buf = std::mem::take(&mut self.io_buf);
                let port = u64::from(port);
                let latency = with_ctx(
                    &mut self.arch,
                    &mut self.vcpu,
                    self.opts.index,
                    now,
                    requests,
                    |ctx| {
                        buf.chunks(size).fold(0, |lat: Tick, chunk| {
                            lat.saturating_add(bus.write(Space::Pio, port, chunk, ctx))
                        })
                    },
                );
                self.io_buf = buf;
                latency
            }
            Exit::MmioRead { addr, len } => {
                self.stats.num_mmio.inc();
                let mut data = [0u8; 8];
                let len = len.min(8);
                let latency = with_ctx(
                    &mut self.arch,
                    &mut self.vcpu,
                    self.opts.index,
                    now,
                    requests,
                    |ctx| bus.read(Space::Mmio, addr, &mut data[..len], ctx),
                );
                if !self.vcpu.complete_mmio_read(&data[..len]) {
                    return Err(KvmError::Completion(format!(
                        "{}: cannot complete the MMIO read of {len} bytes at {addr:#x}",
                        self.name
                    )));
                }
                completion = true;
                latency
            }
            Exit::MmioWrite { addr, len, data } => {
                self.stats.num_mmio.inc();
                with_ctx(
                    &mut self.arch,
                    &mut self.vcpu,
                    self.opts.index,
                    now,
                    requests,
                    |ctx| bus.write(Space::Mmio, addr, &data[..len.min(8)], ctx),
                )
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
            Exit::IrqWindowOpen | Exit::Intr | Exit::Retry | Exit::Debug(_) => 0,
            Exit::EmulationFailure(bytes) => {
                let bytes = match bytes {
                    Some(b) if !b.is_empty() => b,
                    _ => self.arch.instruction_bytes(&mut self.vcpu)?,
                };
                match self.arch.complete_instruction(&mut self.vcpu, &bytes)? {
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
            Exit::MsrWrite { index, value } => {
                use sim::intr::MsrWrite;
                let verdict = match &self.intc {
                    Some(intc) => mem::lock(intc).msr_write(index, value, now, requests),
                    None => MsrWrite::ToCpu,
                };
                let (failed, latency) = match verdict {
                    MsrWrite::Fault => (true, 0),
                    MsrWrite::Done { latency } => (false, latency),
                    MsrWrite::ToCpu => {
                        // KVM keeps its own copy (IA32_APIC_BASE drives the
                        // CPUID APIC bit): a host-initiated write, which the
                        // filter does not stop, checks and stores the value.
                        let accepted = self.vcpu.set_msrs(&[(index, value)]).is_ok_and(|n| n == 1);
                        if accepted {
                            if let Some(intc) = &self.intc {
                                mem::lock(intc).msr_written(index, value);
                            }
                        }
                        (!accepted, 0)
                    }
                };
                if !self.vcpu.complete_msr(failed, 0) {
                    return Err(KvmError::Completion(format!(
                        "{}: cannot complete the guest's write of MSR {index:#x}",
                        self.name
                    )));
                }
                completion = true;
                latency
            }
            Exit::MsrRead { index } => {
                let got = self
                    .intc
                    .as_ref()
                    .and_then(|intc| mem::lock(intc).msr_read(index, now));
                let (value, latency) = got.unwrap_or((0, 0));
                if !self.vcpu.complete_msr(got.is_none(), value) {
                    return Err(KvmError::Completion(format!(
                        "{}: cannot complete the guest's read of MSR {index:#x}",
                        self.name
                    )));
                }
                completion = true;
                latency
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
