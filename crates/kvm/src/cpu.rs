//! The KVM CPU: runs the guest natively and lives in simulated time.
//!
//! State machine (gem5's BaseKvmCPU):
//!
//! * **Running**: the CPU's tick enters KVM. When KVM returns, the host
//!   cycles spent inside become simulated ticks
//!   (`cycles * host_factor / host_freq`); the exit is *not* serviced now but
//!   on the next tick, after that simulated time has passed
//!   (**RunningService**), so that devices see the access at the simulated
//!   time the guest made it. An exit forced by a signal needs no service and
//!   stays Running.
//! * **RunningService**: the exit is serviced (port IO and MMIO go through
//!   the bus, whose devices return a latency). The next tick comes after that
//!   latency. A read leaves **RunningServiceCompletion**: KVM completes the
//!   instruction with the device's value on the next entry.
//! * **Idle**: the guest halted. The CPU is not ticked until woken; simulated
//!   time jumps to the next event without the host waiting.
//!
//! A fatal exit (triple fault, failed entry, internal error, ...) ends in
//! [`TickOutcome::Fault`] with a register dump.

use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use mem::{AccessCtx, CallArgs, IoBus, Space};
use sim::{ClockDomain, Counter, Request, Stats, Tick, Value};

use crate::arch::Arch;
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
    /// A signal interrupted KVM_RUN.
    Intr,
    /// KVM_RUN asked to be retried (EAGAIN).
    Retry,
    IrqWindowOpen,
    Hypercall(u64),
    /// Anything the CPU cannot continue from.
    Fatal(String),
}

/// The CPU's statistics (gem5's names).
struct CpuStats {
    num_vm_exits: Counter,
    num_exit_signal: Counter,
    num_io: Counter,
    num_mmio: Counter,
    num_halt: Counter,
    num_hypercalls: Counter,
    num_cycles: Counter,
    kvm_host_seconds: Value,
}

impl CpuStats {
    fn new(stats: &mut Stats, p: &str) -> std::result::Result<Self, sim::stats::StatsError> {
        let exits = stats.counter(
            &format!("{p}.numVMExits"),
            "Number of VM exits (returns from KVM_RUN)",
            "Count",
        )?;
        let kvm_host_seconds = stats.value(
            &format!("{p}.kvmHostSeconds"),
            "Host time spent inside KVM_RUN",
            "Second",
        )?;
        let e = exits.clone();
        stats.formula(
            &format!("{p}.exitsPerHostSecond"),
            "VM exits per host second",
            "Count/Second",
            move |ctx| e.get() as f64 / ctx.host_seconds,
        )?;
        Ok(CpuStats {
            num_vm_exits: exits,
            num_exit_signal: stats.counter(
                &format!("{p}.numExitSignal"),
                "Exits due to signals (timer, kick, user interrupt)",
                "Count",
            )?,
            num_io: stats.counter(&format!("{p}.numIO"), "Port-IO exits", "Count")?,
            num_mmio: stats.counter(&format!("{p}.numMMIO"), "MMIO exits", "Count")?,
            num_halt: stats.counter(&format!("{p}.numHalt"), "HLT exits", "Count")?,
            num_hypercalls: stats.counter(
                &format!("{p}.numHypercalls"),
                "Hypercall exits",
                "Count",
            )?,
            num_cycles: stats.counter(
                &format!("{p}.numCycles"),
                "Simulated CPU cycles spent in the guest (host cycles x host_factor, in CPU clock cycles)",
                "Cycle",
            )?,
            kvm_host_seconds,
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

/// A CPU backed by a KVM vCPU.
pub struct KvmCpu<A: Arch> {
    name: String,
    vcpu: VcpuFd,
    arch: A,
    mmap_size: usize,
    cfg: CpuConfig,
    state: CpuState,
    pending: Option<Exit>,
    io_buf: Vec<u8>,
    stats: CpuStats,
}

impl<A: Arch> KvmCpu<A> {
    /// Wraps `vcpu`; statistics go under `name` (e.g. `system.cpu`).
    pub fn new(
        name: &str,
        vcpu: VcpuFd,
        arch: A,
        mmap_size: usize,
        cfg: CpuConfig,
        stats: &mut Stats,
    ) -> Result<Self> {
        Ok(KvmCpu {
            name: name.into(),
            vcpu,
            arch,
            mmap_size,
            cfg,
            state: CpuState::Running,
            pending: None,
            io_buf: Vec::new(),
            stats: CpuStats::new(stats, name).map_err(|e| KvmError::Setup(e.to_string()))?,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> CpuState {
        self.state
    }

    pub fn config(&self) -> &CpuConfig {
        &self.cfg
    }

    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// The architecture state, with the vCPU to sync it through.
    pub fn arch_mut(&mut self) -> (&mut A, &VcpuFd) {
        (&mut self.arch, &self.vcpu)
    }

    /// A readable dump of the CPU state.
    pub fn dump(&mut self) -> String {
        self.arch.dump(&self.vcpu)
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

    /// One tick of the CPU at `now`. `bus` services IO; devices' requests
    /// for the simulator are appended to `requests`.
    pub fn tick(
        &mut self,
        now: Tick,
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
                let (ticks, exit) = self.run_kvm()?;
                match exit {
                    Exit::Intr => {
                        self.stats.num_exit_signal.inc();
                        self.state = CpuState::Running;
                    }
                    Exit::Retry => self.state = CpuState::Running,
                    other => {
                        self.pending = Some(other);
                        self.state = CpuState::RunningService;
                    }
                }
                // At least one cycle passes, so the next tick is in the future.
                let cycles = clock.ticks_to_cycles(ticks).max(1);
                Ok(TickOutcome::Next(clock.clock_edge(now, cycles)))
            }
        }
    }

    /// Enters KVM once; returns the simulated time used and the exit.
    fn run_kvm(&mut self) -> Result<(Tick, Exit)> {
        self.arch.update_kvm_state(&self.vcpu)?;
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
            Ok(VcpuExit::Hypercall(h)) => Exit::Hypercall(h.nr),
            Ok(VcpuExit::Shutdown) => {
                Exit::Fatal("KVM_EXIT_SHUTDOWN: the guest shut down (triple fault)".into())
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::Fatal(format!(
                "KVM_EXIT_FAIL_ENTRY: KVM could not enter the guest (hardware entry failure reason {reason:#x}, host cpu {cpu})"
            )),
            Ok(VcpuExit::InternalError) => {
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
            Ok(VcpuExit::Unknown) => {
                let hw = sys::unknown_hw_reason(self.vcpu.get_kvm_run()).unwrap_or(0);
                Exit::Fatal(format!(
                    "KVM_EXIT_UNKNOWN: hardware exit reason {hw:#x}"
                ))
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
        self.stats
            .kvm_host_seconds
            .add(host_start.elapsed().as_secs_f64());
        self.arch.kvm_state_changed();
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
        let ticks = self.cfg.host_cycles_to_ticks(cycles);
        self.stats
            .num_cycles
            .add(self.cfg.clock.ticks_to_cycles(ticks));
        Ok((ticks, exit))
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
                let mut latency: Tick = 0;
                {
                    let mut view = ArgsView {
                        arch: &mut self.arch,
                        vcpu: &self.vcpu,
                    };
                    let mut ctx = AccessCtx {
                        now,
                        cpu: Some(&mut view),
                        requests,
                    };
                    for chunk in buf.chunks_mut(size) {
                        latency = latency.saturating_add(bus.read(
                            Space::Pio,
                            u64::from(port),
                            chunk,
                            &mut ctx,
                        ));
                    }
                }
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
                let mut latency: Tick = 0;
                {
                    let mut view = ArgsView {
                        arch: &mut self.arch,
                        vcpu: &self.vcpu,
                    };
                    let mut ctx = AccessCtx {
                        now,
                        cpu: Some(&mut view),
                        requests,
                    };
                    for chunk in buf.chunks(size) {
                        latency = latency.saturating_add(bus.write(
                            Space::Pio,
                            u64::from(port),
                            chunk,
                            &mut ctx,
                        ));
                    }
                }
                self.io_buf = buf;
                latency
            }
            Exit::MmioRead { addr, len } => {
                self.stats.num_mmio.inc();
                let mut data = [0u8; 8];
                let len = len.min(8);
                let latency = {
                    let mut view = ArgsView {
                        arch: &mut self.arch,
                        vcpu: &self.vcpu,
                    };
                    let mut ctx = AccessCtx {
                        now,
                        cpu: Some(&mut view),
                        requests,
                    };
                    bus.read(Space::Mmio, addr, &mut data[..len], &mut ctx)
                };
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
                let mut view = ArgsView {
                    arch: &mut self.arch,
                    vcpu: &self.vcpu,
                };
                let mut ctx = AccessCtx {
                    now,
                    cpu: Some(&mut view),
                    requests,
                };
                bus.write(Space::Mmio, addr, &data[..len], &mut ctx)
            }
            Exit::Hlt => {
                self.stats.num_halt.inc();
                self.state = CpuState::Idle;
                return Ok(TickOutcome::Idle);
            }
            Exit::IrqWindowOpen | Exit::Intr | Exit::Retry => 0,
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
