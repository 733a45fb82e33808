//! A GDB remote stub (the `gdbstub` crate): `--gdb HOST:PORT` or
//! `sim.gdb`.
//!
//! The run waits for GDB before the first guest instruction. While GDB
//! holds the machine, the simulation's main thread is inside the stub: no
//! event runs, so simulated time does not move. When GDB resumes, the stub
//! runs the simulation ([`Simulation::run_debug`]: one CPU on this thread,
//! several in their window threads) until one of:
//!
//! * a CPU stops for the debugger ([`DebugHalt::Stop`]: a software or
//!   hardware breakpoint, a watchpoint, the end of a single step), which
//!   the KVM CPU reports through its one guest-debug owner
//!   (`kvm::arch::x86_64::guest_debug`); it raises the system's debug flag
//!   and kicks the other CPUs, which stop at their next consistent point
//!   (all-stop), and every thread leaves at the window's boundary;
//! * GDB sends something (Ctrl-C, or it went away): a watcher thread sees
//!   the socket readable, raises the flag and kicks every CPU out of KVM;
//! * every system drained for a checkpoint (written, then the run goes on);
//! * the run ends (GDB is told the debugged system's exit code).
//!
//! Each CPU of the debugged system (`sim.gdb_system`, default 0) is a GDB
//! thread. Resume actions are per thread: a step arms single-stepping on
//! that CPU; CPUs without an action in a packet that has no default one
//! (scheduler locking) are held: their threads run nothing.
//!
//! Registers: x86-64 with SSE and the segment bases (fs_base, gs_base) in
//! the target description; memory by guest virtual address through the
//! thread's page tables (the software page walk), physical memory through
//! `monitor phys`; `monitor checkpoint [DIR]` writes a checkpoint.
//!
//! A malformed packet gets an error reply from gdbstub; a connection that
//! fails mid-command ends the session and the run continues without the
//! debugger, or ends, as `sim.gdb_on_disconnect` says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::outputln;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use kvm::arch::x86_64::guest_debug::{HwBreakpoint as KvmHwBreakpoint, SlotOwner};
use kvm::arch::{Arch as _, BreakKind, DebugStop, Stepper};
use kvm::CpuState;
use sim::{ExitCause, ExitEvent, Tick};

use crate::simulation::{RunEnd, Simulation};
use crate::system::System;
use crate::PlatformError;

/// Why a CPU stopped for the debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugHalt {
    /// Its breakpoint, watchpoint or step.
    Stop(DebugStop),
    /// GDB sent something while the guest ran (Ctrl-C, or it went away).
    Interrupt,
}

/// A debugger's hold on one CPU of the run loop.
#[derive(Debug, Default)]
pub struct DebugHook {
    /// Set from another thread (with a kick) to stop the CPU.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Why the CPU stopped (the run loop returned for it).
    pub stopped: Option<DebugHalt>,
    /// The debugger holds the CPU while others run (scheduler locking):
    /// its thread runs none of its events.
    pub held: bool,
}

impl DebugHook {
    /// True if the run loop must return to the debugger now: the CPU
    /// stopped, or an interrupt is asked for and the CPU has no exit in
    /// flight (its registers are then the guest's whole state).
    pub fn should_stop(&mut self, state: CpuState) -> bool {
        if self.stopped.is_some() {
            return true;
        }
        let Some(flag) = &self.interrupt else {
            return false;
        };
        // The flag stays raised for every CPU of the system (all-stop);
        // the stub lowers it before it lets them run again.
        if matches!(state, CpuState::Running | CpuState::Idle) && flag.load(Ordering::Acquire) {
            self.stopped = Some(DebugHalt::Interrupt);
            return true;
        }
        false
    }
}

/// What happens to the run when the debugger's connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// The run goes on without the debugger (its breakpoints removed).
    Continue,
    /// The run ends (cause "user interrupt").
    Exit,
}

/// The debugger's listening socket, bound while the system is built (a bad
/// address fails before anything runs).
#[derive(Debug)]
pub struct GdbListener {
    listener: TcpListener,
    addr: SocketAddr,
    on_disconnect: OnDisconnect,
}

impl GdbListener {
    /// Listens on `addr` (HOST:PORT; port 0 picks a free one).
    pub fn bind(addr: &str, on_disconnect: OnDisconnect) -> Result<Self, PlatformError> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            PlatformError::Setup(format!("sim.gdb: cannot listen on {addr:?}: {e}"))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| PlatformError::Setup(format!("sim.gdb: {addr:?}: {e}")))?;
        Ok(GdbListener {
            listener,
            addr,
            on_disconnect,
        })
    }

    /// The address GDB connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Waits for GDB, then runs the simulation under its control to the end
/// of the run (one exit per system). GDB debugs system
/// [`Simulation::gdb_system`]; every other system runs in the same windows
/// and stands still with it.
pub fn run(sim: &mut Simulation, l: &GdbListener) -> Result<Vec<ExitEvent>, PlatformError> {
    eprintln!(
        "kvmsim: waiting for GDB on {} (in GDB: target remote {})",
        l.addr, l.addr
    );
    let at = sim.gdb_system();
    let Some(stream) = accept(l)? else {
        let n = sim.names().len();
        return Ok((0..n)
            .map(|i| {
                ExitEvent::new(
                    ExitCause::UserInterrupt,
                    0,
                    sim.system_mut(i).cur_tick(),
                    "interrupted by the user while waiting for GDB",
                )
            })
            .collect());
    };
    tracing::info!("GDB connected from {:?}", stream.peer_addr().ok());
    if sim.names().len() > 1 {
        tracing::info!(
            "GDB debugs {} (sim.gdb_system = {at}); the other systems stand still with it",
            sim.names()[at]
        );
    }
    let io = |e: std::io::Error| PlatformError::Setup(format!("the GDB connection: {e}"));
    stream.set_nodelay(true).map_err(io)?;
    // Reads wake up now and then (Ctrl-C at kvmsim's terminal, the watcher).
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(io)?;
    let flag = Arc::new(AtomicBool::new(false));
    let cpus = sim.system_mut(at).cpu_count();
    for i in 0..cpus {
        sim.system_mut(at).set_debug_interrupt(i, flag.clone());
    }
    let watch = Arc::new(Watch {
        running: Mutex::new(false),
        cv: Condvar::new(),
        quit: AtomicBool::new(false),
        flag,
    });
    let watcher = {
        let w = watch.clone();
        let peer = stream.try_clone().map_err(io)?;
        let kicks = sim.system_mut(at).kick_handles();
        std::thread::Builder::new()
            .name("kvmsim-gdb-watch".into())
            .spawn(move || w.watch(peer, kicks))
            .map_err(io)?
    };
    let mut target = SimTarget {
        sim,
        at,
        watch: watch.clone(),
        actions: vec![Resume::Default; cpus],
        locked: false,
        sw: Vec::new(),
        hw: Vec::new(),
        exits: None,
    };
    let result = GdbStub::new(Conn(stream)).run_blocking::<EventLoop<'_>>(&mut target);
    watch.stop();
    let _ = watcher.join();
    let exits = target.exits.take();
    let now = target.sys().cur_tick();
    let go_on = match result {
        Ok(DisconnectReason::TargetExited(_)) | Ok(DisconnectReason::TargetTerminated(_)) => {
            if let Some(e) = exits {
                return Ok(e);
            }
            true
        }
        Ok(DisconnectReason::Kill) => {
            return Ok(target.all_end(
                ExitCause::UserInterrupt,
                "killed by the debugger (GDB kill)",
            ))
        }
        Ok(DisconnectReason::Disconnect) => {
            tracing::info!("GDB detached at tick {now}: the run goes on");
            true
        }
        Err(e) => {
            if let Some(e) = exits {
                return Ok(e);
            }
            tracing::warn!("the GDB connection ended at tick {now}: {e}");
            l.on_disconnect == OnDisconnect::Continue
        }
    };
    target.release();
    if !go_on {
        return Ok(target.all_end(
            ExitCause::UserInterrupt,
            "the debugger went away (sim.gdb_on_disconnect = \"exit\")",
        ));
    }
    let sys = target.sys();
    for i in 0..cpus {
        sys.set_debug_interrupt(i, Arc::new(AtomicBool::new(false)));
        sys.set_debug_held(i, false);
        let _ = sys.take_debug_halt(i);
    }
    target.sim.run_free()
}

/// Accepts GDB's connection; `None` if the user interrupted the wait.
fn accept(l: &GdbListener) -> Result<Option<TcpStream>, PlatformError> {
    let err =
        |e: std::io::Error| PlatformError::Setup(format!("sim.gdb: accepting on {}: {e}", l.addr));
    l.listener.set_nonblocking(true).map_err(err)?;
    loop {
        match l.listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(err)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if crate::console::interrupted() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err(e)),
        }
    }
}

/// Watches the socket while the guest runs: data from GDB (or its end)
/// raises the CPUs' debug flag and kicks every CPU out of KVM.
struct Watch {
    running: Mutex<bool>,
    cv: Condvar,
    quit: AtomicBool,
    flag: Arc<AtomicBool>,
}

impl Watch {
    fn set_running(&self, on: bool) {
        *mem::lock(&self.running) = on;
        self.cv.notify_all();
    }

    fn stop(&self) {
        self.quit.store(true, Ordering::Release);
        self.set_running(false);
    }

    fn watch(&self, peer: TcpStream, kicks: Vec<kvm::timer::KickHandle>) {
        let mut byte = [0u8; 1];
        loop {
            {
                let mut running = mem::lock(&self.running);
                while !*running && !self.quit.load(Ordering::Acquire) {
                    running = match self.cv.wait(running) {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                }
            }
            if self.quit.load(Ordering::Acquire) {
                return;
            }
            match peer.peek(&mut byte) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                // Data, the end of the stream, or an error: the stub looks.
                _ => {
                    *mem::lock(&self.running) = false;
                    self.flag.store(true, Ordering::Release);
                    for k in &kicks {
                        k.kick();
                    }
                }
            }
        }
    }
}

/// The connection: blocking reads that wake up to check for Ctrl-C at
/// kvmsim's terminal (the socket has a read timeout).
struct Conn(TcpStream);

fn retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

impl Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        Write::write_all(&mut self.0, &[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        Write::write_all(&mut self.0, buf)
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        Write::flush(&mut self.0)
    }

    fn on_session_start(&mut self) -> Result<(), Self::Error> {
        self.0.set_nodelay(true)
    }
}

impl ConnectionExt for Conn {
    fn read(&mut self) -> Result<u8, Self::Error> {
        let mut b = [0u8; 1];
        loop {
            if crate::console::interrupted() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "interrupted by the user (SIGINT/SIGTERM)",
                ));
            }
            match Read::read(&mut self.0, &mut b) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "GDB closed the connection",
                    ))
                }
                Ok(_) => return Ok(b[0]),
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        let mut b = [0u8; 1];
        match self.0.peek(&mut b) {
            Ok(0) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "GDB closed the connection",
            )),
            Ok(_) => Ok(Some(b[0])),
            Err(e) if retry(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// x86-64 with SSE and the segment bases, as GDB's target description
/// names them (features org.gnu.gdb.i386.core, .sse, .segments).
pub enum X86_64Kvmsim {}

/// The registers GDB sees: core and SSE (gdbstub_arch's layout), then
/// fs_base and gs_base.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Regs {
    pub core: X86_64CoreRegs,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// Bytes of the core and SSE registers in GDB's `g` packet.
const CORE_SSE_BYTES: usize = 0x218;

impl gdbstub::arch::Registers for Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.core.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for b in self
            .fs_base
            .to_le_bytes()
            .iter()
            .chain(&self.gs_base.to_le_bytes())
        {
            write_byte(Some(*b));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        if bytes.len() < CORE_SSE_BYTES + 16 {
            return Err(());
        }
        self.core.gdb_deserialize(&bytes[..CORE_SSE_BYTES])?;
        let word = |at: usize| -> Result<u64, ()> {
            Ok(u64::from_le_bytes(
                bytes[at..at + 8].try_into().map_err(|_| ())?,
            ))
        };
        self.fs_base = word(CORE_SSE_BYTES)?;
        self.gs_base = word(CORE_SSE_BYTES + 8)?;
        Ok(())
    }
}

impl gdbstub::arch::Arch for X86_64Kvmsim {
    type Usize = u64;
    type Registers = Regs;
    type RegId = gdbstub_arch::x86::reg::id::X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// The target description: GDB's i386 features, registers in the order of
/// [`Regs`].
const TARGET_XML: &str = concat!(
    r#"<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">"#,
    r#"<architecture>i386:x86-64</architecture>"#,
    r#"<feature name="org.gnu.gdb.i386.core">"#,
    r#"<flags id="i386_eflags" size="4"><field name="CF" start="0" end="0"/><field name="" start="1" end="1"/><field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/><field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/><field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/><field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/><field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/><field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/><field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/><field name="ID" start="21" end="21"/></flags>"#,
    r#"<reg name="rax" bitsize="64" type="int64" regnum="0"/><reg name="rbx" bitsize="64" type="int64"/><reg name="rcx" bitsize="64" type="int64"/><reg name="rdx" bitsize="64" type="int64"/><reg name="rsi" bitsize="64" type="int64"/><reg name="rdi" bitsize="64" type="int64"/><reg name="rbp" bitsize="64" type="data_ptr"/><reg name="rsp" bitsize="64" type="data_ptr"/>"#,
    r#"<reg name="r8" bitsize="64" type="int64"/><reg name="r9" bitsize="64" type="int64"/><reg name="r10" bitsize="64" type="int64"/><reg name="r11" bitsize="64" type="int64"/><reg name="r12" bitsize="64" type="int64"/><reg name="r13" bitsize="64" type="int64"/><reg name="r14" bitsize="64" type="int64"/><reg name="r15" bitsize="64" type="int64"/>"#,
    r#"<reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="i386_eflags"/>"#,
    r#"<reg name="cs" bitsize="32" type="int32"/><reg name="ss" bitsize="32" type="int32"/><reg name="ds" bitsize="32" type="int32"/><reg name="es" bitsize="32" type="int32"/><reg name="fs" bitsize="32" type="int32"/><reg name="gs" bitsize="32" type="int32"/>"#,
    r#"<reg name="st0" bitsize="80" type="i387_ext"/><reg name="st1" bitsize="80" type="i387_ext"/><reg name="st2" bitsize="80" type="i387_ext"/><reg name="st3" bitsize="80" type="i387_ext"/><reg name="st4" bitsize="80" type="i387_ext"/><reg name="st5" bitsize="80" type="i387_ext"/><reg name="st6" bitsize="80" type="i387_ext"/><reg name="st7" bitsize="80" type="i387_ext"/>"#,
    r#"<reg name="fctrl" bitsize="32" type="int" group="float"/><reg name="fstat" bitsize="32" type="int" group="float"/><reg name="ftag" bitsize="32" type="int" group="float"/><reg name="fiseg" bitsize="32" type="int" group="float"/><reg name="fioff" bitsize="32" type="int" group="float"/><reg name="foseg" bitsize="32" type="int" group="float"/><reg name="fooff" bitsize="32" type="int" group="float"/><reg name="fop" bitsize="32" type="int" group="float"/>"#,
    r#"</feature><feature name="org.gnu.gdb.i386.sse">"#,
    r#"<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/><vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>"#,
    r#"<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/><field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/><field name="uint128" type="uint128"/></union>"#,
    r#"<reg name="xmm0" bitsize="128" type="vec128" regnum="40"/><reg name="xmm1" bitsize="128" type="vec128"/><reg name="xmm2" bitsize="128" type="vec128"/><reg name="xmm3" bitsize="128" type="vec128"/><reg name="xmm4" bitsize="128" type="vec128"/><reg name="xmm5" bitsize="128" type="vec128"/><reg name="xmm6" bitsize="128" type="vec128"/><reg name="xmm7" bitsize="128" type="vec128"/>"#,
    r#"<reg name="xmm8" bitsize="128" type="vec128"/><reg name="xmm9" bitsize="128" type="vec128"/><reg name="xmm10" bitsize="128" type="vec128"/><reg name="xmm11" bitsize="128" type="vec128"/><reg name="xmm12" bitsize="128" type="vec128"/><reg name="xmm13" bitsize="128" type="vec128"/><reg name="xmm14" bitsize="128" type="vec128"/><reg name="xmm15" bitsize="128" type="vec128"/>"#,
    r#"<reg name="mxcsr" bitsize="32" type="int" group="vector"/>"#,
    r#"</feature><feature name="org.gnu.gdb.i386.segments">"#,
    r#"<reg name="fs_base" bitsize="64" type="int"/><reg name="gs_base" bitsize="64" type="int"/>"#,
    r#"</feature></target>"#
);

/// What GDB asked one thread (CPU) to do at the next resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// No action of its own: the default (continue), or held if the
    /// packet had no default action (scheduler locking).
    Default,
    Continue,
    Step,
}

/// The debugged system (and the simulation around it) as GDB sees it.
struct SimTarget<'a> {
    sim: &'a mut Simulation,
    /// The system GDB debugs.
    at: usize,
    watch: Arc<Watch>,
    /// Per CPU, what the next resume does with it.
    actions: Vec<Resume>,
    /// The resume packet had no default action: CPUs without one of their
    /// own are held.
    locked: bool,
    /// Software breakpoints: address and the byte the int3 replaced.
    sw: Vec<(u64, u8)>,
    /// Hardware breakpoints and watchpoints (on every CPU).
    hw: Vec<(u64, BreakKind, u8)>,
    /// How the run ended while GDB was attached (one exit per system).
    exits: Option<Vec<ExitEvent>>,
}

/// The GDB thread of CPU `i`.
fn tid(i: usize) -> Tid {
    NonZeroUsize::MIN.saturating_add(i)
}

impl SimTarget<'_> {
    fn sys(&mut self) -> &mut System {
        self.sim.system_mut(self.at)
    }

    fn cpus(&mut self) -> usize {
        self.sys().cpu_count()
    }

    fn cpu(
        &mut self,
        tid: Tid,
    ) -> Result<&mut kvm::KvmCpu<kvm::arch::x86_64::X86_64>, TargetError<String>> {
        self.sys()
            .cpu_mut(tid.get() - 1)
            .ok_or(TargetError::NonFatal)
    }

    /// Every system's end: its kept exit if it ended before, else one of
    /// `cause` now.
    fn all_end(&mut self, cause: ExitCause, msg: &str) -> Vec<ExitEvent> {
        let ended = self.sim.ended().to_vec();
        ended
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                e.unwrap_or_else(|| {
                    ExitEvent::new(cause, 0, self.sim.system_mut(i).cur_tick(), msg)
                })
            })
            .collect()
    }

    /// Reads the byte at guest virtual address `addr` through the first
    /// CPU whose page tables map it.
    fn peek(&mut self, addr: u64) -> Option<u8> {
        let sys = self.sim.system_mut(self.at);
        (0..sys.cpu_count()).find_map(|i| {
            let (arch, vcpu) = sys.cpu_mut(i)?.arch_mut();
            let mut b = [0u8; 1];
            (arch.read_virt(vcpu, addr, &mut b) == 1).then_some(b[0])
        })
    }

    /// Writes `byte` at guest virtual address `addr` (RAM is shared: one
    /// CPU's mapping does).
    fn poke(&mut self, addr: u64, byte: u8) -> bool {
        let sys = self.sim.system_mut(self.at);
        (0..sys.cpu_count()).any(|i| {
            sys.cpu_mut(i).is_some_and(|c| {
                let (arch, vcpu) = c.arch_mut();
                arch.write_virt(vcpu, addr, &[byte]) == 1
            })
        })
    }

    /// Takes the debugger's breakpoints and steps out of the guest for
    /// good.
    fn release(&mut self) {
        self.lift();
        self.sw.clear();
        self.hw.clear();
        let sys = self.sys();
        for i in 0..sys.cpu_count() {
            if let Some(cpu) = sys.cpu_mut(i) {
                cpu.arch_mut()
                    .0
                    .debug_mut()
                    .set_step(Stepper::Debugger, false);
            }
        }
    }

    /// Takes the debugger's breakpoints out of the guest (memory and debug
    /// registers), keeping the list: a checkpoint must not hold GDB's
    /// int3 bytes, and a drain must not stop at a breakpoint.
    fn lift(&mut self) {
        for (addr, orig) in self.sw.clone() {
            self.poke(addr, orig);
        }
        let sw: Vec<u64> = self.sw.iter().map(|&(a, _)| a).collect();
        self.for_each_cpu(|d| {
            for &addr in &sw {
                d.remove_sw(addr);
            }
            d.clear_owner(SlotOwner::Debugger);
        });
    }

    /// Puts lifted breakpoints back.
    fn replant(&mut self) {
        for (addr, _) in self.sw.clone() {
            if self.poke(addr, 0xcc) {
                self.for_each_cpu(|d| d.add_sw(addr));
            }
        }
        for (addr, kind, len) in self.hw.clone() {
            self.for_each_cpu(|d| {
                let _ = d.add_hw(KvmHwBreakpoint {
                    addr,
                    kind,
                    len,
                    owner: SlotOwner::Debugger,
                });
            });
        }
    }

    fn for_each_cpu(&mut self, mut f: impl FnMut(&mut kvm::arch::x86_64::guest_debug::GuestDebug)) {
        let sys = self.sys();
        for i in 0..sys.cpu_count() {
            if let Some(cpu) = sys.cpu_mut(i) {
                f(cpu.arch_mut().0.debug_mut());
            }
        }
    }

    /// Adds or removes a hardware breakpoint or watchpoint on every CPU
    /// (all or none).
    fn hw(&mut self, add: bool, addr: u64, kind: BreakKind, len: u8) -> TargetResult<bool, Self> {
        let n = self.cpus();
        if !add {
            let mut found = false;
            self.for_each_cpu(|d| found |= d.remove_hw(SlotOwner::Debugger, addr, kind, Some(len)));
            self.hw.retain(|&h| h != (addr, kind, len));
            return Ok(found);
        }
        let bp = KvmHwBreakpoint {
            addr,
            kind,
            len,
            owner: SlotOwner::Debugger,
        };
        for i in 0..n {
            let cpu = self.cpu(tid(i))?;
            if let Err(e) = cpu.arch_mut().0.debug_mut().add_hw(bp) {
                tracing::warn!("GDB: {e}");
                for j in 0..i {
                    let cpu = self.cpu(tid(j))?;
                    cpu.arch_mut().0.debug_mut().remove_hw(
                        SlotOwner::Debugger,
                        addr,
                        kind,
                        Some(len),
                    );
                }
                return Ok(false);
            }
        }
        self.hw.push((addr, kind, len));
        Ok(true)
    }

    /// `monitor checkpoint [DIR]`: every CPU of every system drains (no
    /// breakpoint of GDB's in the guest meanwhile, none in the saved RAM),
    /// the checkpoint is written, and the machine stays stopped.
    ///
    /// Progress lines go to GDB as they happen: each one restarts GDB's
    /// wait for the reply (`set remotetimeout`, 2 s by default), which a
    /// drain and a write on a loaded host can exceed.
    fn checkpoint(
        &mut self,
        dir: Option<std::path::PathBuf>,
        out: &mut ConsoleOutput<'_>,
    ) -> Result<String, String> {
        if let Some(d) = &dir {
            if d.join(ckpt::STATE_FILE).exists() {
                return Err(format!("{} already holds a checkpoint", d.display()));
            }
        }
        if self.exits.is_some() {
            return Err("the run has ended".into());
        }
        let before = self.sys().cur_tick();
        self.lift();
        let n = self.cpus();
        for i in 0..n {
            let sys = self.sys();
            sys.set_debug_held(i, false);
            if let Some(cpu) = sys.cpu_mut(i) {
                cpu.arch_mut()
                    .0
                    .debug_mut()
                    .set_step(Stepper::Debugger, false);
            }
        }
        outputln!(out, "draining every CPU for a checkpoint (tick {before})");
        out.flush();
        let r = self.drain_and_save(dir, out);
        self.replant();
        let (dir, at) = r?;
        let moved = if at > before {
            format!(" (draining ran the guest from tick {before})")
        } else {
            String::new()
        };
        Ok(match dir {
            Some(d) => format!("checkpoint at tick {at}{moved} written to {}", d.display()),
            None => format!("no checkpoint taken at tick {at}: see kvmsim's log"),
        })
    }

    fn drain_and_save(
        &mut self,
        dir: Option<std::path::PathBuf>,
        out: &mut ConsoleOutput<'_>,
    ) -> Result<(Option<std::path::PathBuf>, Tick), String> {
        self.sim.request_checkpoint().map_err(|e| e.to_string())?;
        // Nothing of GDB's can stop a CPU now (breakpoints lifted, no step,
        // the flag lowered): the loop ends when every CPU drained.
        for _ in 0..1000 {
            self.watch.flag.store(false, Ordering::Release);
            match self.sim.run_debug().map_err(|e| e.to_string())? {
                RunEnd::Checkpoint => {
                    let at = self.sys().cur_tick();
                    outputln!(out, "drained at tick {at}: writing the checkpoint");
                    out.flush();
                    let taken = self.sim.checkpoints().len();
                    self.sim
                        .checkpoint_now(dir, false)
                        .map_err(|e| e.to_string())?;
                    return Ok((self.sim.checkpoints().get(taken).cloned(), at));
                }
                RunEnd::Exits(e) => {
                    self.exits = Some(e);
                    return Err("the run ended before every CPU drained".into());
                }
                RunEnd::Debug => {
                    for i in 0..self.cpus() {
                        let _ = self.sys().take_debug_halt(i);
                    }
                }
            }
        }
        Err("the CPUs did not drain".into())
    }
}

impl ThreadExtraInfo for SimTarget<'_> {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let text = format!("CPU {}", tid.get() - 1);
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

fn fatal(e: kvm::KvmError) -> TargetError<String> {
    TargetError::Fatal(e.to_string())
}

impl Target for SimTarget<'_> {
    type Arch = X86_64Kvmsim;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for SimTarget<'_> {
    fn read_registers(&mut self, regs: &mut Regs, tid: Tid) -> TargetResult<(), Self> {
        let cpu = self.cpu(tid)?;
        let (arch, vcpu) = cpu.arch_mut();
        let r = *arch.regs(vcpu).map_err(fatal)?;
        let s = *arch.sregs(vcpu).map_err(fatal)?;
        let c = &mut regs.core;
        c.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        c.rip = r.rip;
        c.eflags = r.rflags as u32;
        c.segments.cs = u32::from(s.cs.selector);
        c.segments.ss = u32::from(s.ss.selector);
        c.segments.ds = u32::from(s.ds.selector);
        c.segments.es = u32::from(s.es.selector);
        c.segments.fs = u32::from(s.fs.selector);
        c.segments.gs = u32::from(s.gs.selector);
        regs.fs_base = s.fs.base;
        regs.gs_base = s.gs.base;
        if let Some(x) = arch.xsave(vcpu).map_err(fatal)? {
            let w = x.region();
            // The FXSAVE layout: FCW/FSW, FTW (abridged)/FOP, FIP, FCS,
            // FDP, FDS, MXCSR, then ST0-7 (16 bytes each), XMM0-15.
            c.fpu.fctrl = w[0] & 0xffff;
            c.fpu.fstat = w[0] >> 16;
            c.fpu.ftag = full_tag(w[1] & 0xff);
            c.fpu.fop = w[1] >> 16;
            c.fpu.fioff = w[2];
            c.fpu.fiseg = w[3] & 0xffff;
            c.fpu.fooff = w[4];
            c.fpu.foseg = w[5] & 0xffff;
            c.mxcsr = w[6];
            for (i, st) in c.st.iter_mut().enumerate() {
                let mut b = [0u8; 16];
                for (k, word) in w[8 + 4 * i..12 + 4 * i].iter().enumerate() {
                    b[4 * k..4 * k + 4].copy_from_slice(&word.to_le_bytes());
                }
                st.copy_from_slice(&b[..10]);
            }
            for (i, xmm) in c.xmm.iter_mut().enumerate() {
                let base = 40 + 4 * i;
                *xmm = (0..4).fold(0u128, |v, k| v | (u128::from(w[base + k]) << (32 * k)));
            }
        }
        Ok(())
    }

    fn write_registers(&mut self, regs: &Regs, tid: Tid) -> TargetResult<(), Self> {
        let cpu = self.cpu(tid)?;
        let (arch, vcpu) = cpu.arch_mut();
        let c = &regs.core;
        {
            let r = arch.regs_mut(vcpu).map_err(fatal)?;
            [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ] = c.regs;
            r.rip = c.rip;
            // The upper half of RFLAGS is reserved (zero).
            r.rflags = u64::from(c.eflags) | 0x2;
        }
        let s = *arch.sregs(vcpu).map_err(fatal)?;
        if s.fs.base != regs.fs_base || s.gs.base != regs.gs_base {
            let s = arch.sregs_mut(vcpu).map_err(fatal)?;
            s.fs.base = regs.fs_base;
            s.gs.base = regs.gs_base;
        }
        let selectors = [
            (s.cs.selector, c.segments.cs),
            (s.ss.selector, c.segments.ss),
            (s.ds.selector, c.segments.ds),
            (s.es.selector, c.segments.es),
            (s.fs.selector, c.segments.fs),
            (s.gs.selector, c.segments.gs),
        ];
        if selectors.iter().any(|&(a, b)| u32::from(a) != b) {
            // A selector means a descriptor load, which a register write
            // cannot do soundly: refused, nothing else is lost.
            tracing::warn!("GDB: segment selectors cannot be changed (the write is ignored)");
        }
        let Some(x) = arch.xsave(vcpu).map_err(fatal)? else {
            return Ok(());
        };
        let mut w: Vec<u32> = x.region()[..168].to_vec();
        let before = w.clone();
        w[0] = (c.fpu.fctrl & 0xffff) | (c.fpu.fstat << 16);
        w[6] = c.mxcsr;
        for (i, st) in c.st.iter().enumerate() {
            let mut b = [0u8; 16];
            for (k, word) in w[8 + 4 * i..12 + 4 * i].iter().enumerate() {
                b[4 * k..4 * k + 4].copy_from_slice(&word.to_le_bytes());
            }
            b[..10].copy_from_slice(st);
            for k in 0..4 {
                w[8 + 4 * i + k] =
                    u32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]);
            }
        }
        for (i, xmm) in c.xmm.iter().enumerate() {
            for k in 0..4 {
                w[40 + 4 * i + k] = (xmm >> (32 * k)) as u32;
            }
        }
        if w != before {
            if let Some(x) = arch.xsave_mut(vcpu).map_err(fatal)? {
                x.region_mut()[..168].copy_from_slice(&w);
            }
        }
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let cpu = self.cpu(tid)?;
        let (arch, vcpu) = cpu.arch_mut();
        let n = arch.read_virt(vcpu, start, data);
        if n == 0 && !data.is_empty() {
            return Err(TargetError::Errno(14));
        }
        Ok(n)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let cpu = self.cpu(tid)?;
        let (arch, vcpu) = cpu.arch_mut();
        if arch.write_virt(vcpu, start, data) != data.len() {
            return Err(TargetError::Errno(14));
        }
        Ok(())
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for i in 0..self.cpus() {
            active(tid(i));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

/// The full x87 tag word from FXSAVE's abridged one (1 = valid, else
/// empty; a valid register is reported as holding a number).
fn full_tag(abridged: u32) -> u32 {
    (0..8).fold(0, |t, i| {
        let tag = if abridged & (1 << i) != 0 { 0b00 } else { 0b11 };
        t | (tag << (2 * i))
    })
}

impl MultiThreadResume for SimTarget<'_> {
    /// Each CPU steps, continues or is held as the packet says: a step
    /// arms the debugger's single-step on that CPU; a held CPU's thread
    /// runs none of its events (with CPU 0 that includes the system's
    /// devices) until a later resume lets it go.
    fn resume(&mut self) -> Result<(), Self::Error> {
        let n = self.cpus();
        if self.locked && !self.actions.iter().any(|&a| a != Resume::Default) {
            // Every CPU held (the packet named only threads that do not
            // exist): nothing could run, nor stop again.
            return Err(format!(
                "a resume that names none of the {n} threads (1 to {n}) of the system"
            ));
        }
        for i in 0..n {
            let a = self.actions.get(i).copied().unwrap_or(Resume::Default);
            let held = self.locked && a == Resume::Default;
            let sys = self.sys();
            sys.set_debug_held(i, held);
            let cpu = sys.cpu_mut(i).ok_or("no such CPU")?;
            let (arch, vcpu) = cpu.arch_mut();
            arch.set_step(vcpu, Stepper::Debugger, a == Resume::Step)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        let n = self.cpus();
        self.actions = vec![Resume::Default; n];
        self.locked = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        if let Some(a) = self.actions.get_mut(tid.get() - 1) {
            *a = Resume::Continue;
        }
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSchedulerLocking for SimTarget<'_> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        // The CPUs without an action of their own stay where they are.
        self.locked = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for SimTarget<'_> {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        if let Some(a) = self.actions.get_mut(tid.get() - 1) {
            *a = Resume::Step;
        }
        Ok(())
    }
}

impl Breakpoints for SimTarget<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for SimTarget<'_> {
    /// An int3 in the (shared) guest memory, known as the debugger's to
    /// every CPU's guest-debug owner.
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.sw.iter().any(|&(a, _)| a == addr) {
            return Ok(true);
        }
        let Some(orig) = self.peek(addr) else {
            return Ok(false);
        };
        if !self.poke(addr, 0xcc) {
            return Ok(false);
        }
        self.for_each_cpu(|d| d.add_sw(addr));
        self.sw.push((addr, orig));
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(i) = self.sw.iter().position(|&(a, _)| a == addr) else {
            return Ok(false);
        };
        let (_, orig) = self.sw.remove(i);
        self.for_each_cpu(|d| {
            d.remove_sw(addr);
        });
        Ok(self.poke(addr, orig))
    }
}

impl HwBreakpoint for SimTarget<'_> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.hw(true, addr, BreakKind::Exec, 1)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.hw(false, addr, BreakKind::Exec, 1)
    }
}

impl HwWatchpoint for SimTarget<'_> {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let kind = match kind {
            WatchKind::Write => BreakKind::Write,
            WatchKind::ReadWrite => BreakKind::ReadWrite,
            // x86 debug registers have no read-only watchpoint.
            WatchKind::Read => return Ok(false),
        };
        let Ok(len) = u8::try_from(len) else {
            return Ok(false);
        };
        self.hw(true, addr, kind, len)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let kind = match kind {
            WatchKind::Write => BreakKind::Write,
            WatchKind::ReadWrite => BreakKind::ReadWrite,
            WatchKind::Read => return Ok(false),
        };
        let Ok(len) = u8::try_from(len) else {
            return Ok(false);
        };
        self.hw(false, addr, kind, len)
    }
}

/// The most `monitor phys` shows at once.
const PHYS_MAX: u64 = 4096;

impl MonitorCmd for SimTarget<'_> {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let cmd = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let now = self.sys().cur_tick();
        match words.as_slice() {
            ["checkpoint", rest @ ..] if rest.len() <= 1 => {
                match self.checkpoint(rest.first().map(std::path::PathBuf::from), &mut out) {
                    Ok(msg) => outputln!(out, "{msg}"),
                    Err(e) => outputln!(out, "no checkpoint: {e}"),
                }
            }
            ["time"] => {
                outputln!(
                    out,
                    "simulated time: tick {now} ({:.9} s)",
                    sim::tick::ticks_to_seconds(now)
                );
                // Each CPU's own time (they differ by up to a quantum, and
                // a held CPU stays behind).
                let n = self.cpus();
                for i in (0..n).filter(|_| n > 1) {
                    if let Some(t) = self.sys().cpu_tick(i) {
                        outputln!(out, "  CPU {i}: tick {t}");
                    }
                }
            }
            ["stats", "dump"] => match self.sys().dump_stats(now) {
                Ok(()) => outputln!(out, "statistics dumped at tick {now} (stats.txt)"),
                Err(e) => outputln!(out, "cannot dump the statistics: {e}"),
            },
            ["stats", "reset"] => {
                self.sys().reset_stats(now);
                outputln!(out, "statistics reset at tick {now}");
            }
            ["phys", addr, rest @ ..] if rest.len() <= 1 => {
                let parse = |s: &str| match s.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16).ok(),
                    None => s.parse().ok(),
                };
                let (Some(addr), Some(len)) =
                    (parse(addr), rest.first().map_or(Some(64), |s| parse(s)))
                else {
                    outputln!(
                        out,
                        "usage: monitor phys ADDR [LEN] (numbers in decimal or 0x hex)"
                    );
                    return Ok(());
                };
                let len = len.min(PHYS_MAX) as usize;
                let mut buf = vec![0u8; len];
                let mem = self.sim.system_mut(self.at).guest_memory();
                if vm_memory::Bytes::read_slice(mem, &mut buf, vm_memory::GuestAddress(addr))
                    .is_err()
                {
                    outputln!(out, "physical {addr:#x}..+{len:#x} is not all guest RAM");
                    return Ok(());
                }
                for (i, chunk) in buf.chunks(16).enumerate() {
                    let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                    outputln!(out, "{:#012x}: {}", addr + 16 * i as u64, hex.join(" "));
                }
            }
            _ => {
                outputln!(out, "kvmsim monitor commands:");
                outputln!(
                    out,
                    "  time             the simulated time (and each CPU's)"
                );
                outputln!(
                    out,
                    "  stats dump       append a statistics dump (stats.txt)"
                );
                outputln!(out, "  stats reset      reset the statistics");
                outputln!(
                    out,
                    "  checkpoint [DIR] drain every CPU and write a checkpoint (default OUTDIR/cpt.TICK)"
                );
                outputln!(
                    out,
                    "  phys ADDR [LEN]  guest physical memory (at most {PHYS_MAX} bytes)"
                );
            }
        }
        Ok(())
    }
}

/// Runs the simulation while GDB lets the guest go.
struct EventLoop<'a>(std::marker::PhantomData<&'a mut ()>);

impl<'a> BlockingEventLoop for EventLoop<'a> {
    type Target = SimTarget<'a>;
    type Connection = Conn;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut SimTarget<'a>,
        conn: &mut Conn,
    ) -> Result<Event<Self::StopReason>, WaitForStopReasonError<String, std::io::Error>> {
        if let Some(exits) = &target.exits {
            // The run ended while GDB held it (a monitor command's drain).
            let code = exits[target.at].code.clamp(0, 255) as u8;
            return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(code)));
        }
        let err = |e: PlatformError| WaitForStopReasonError::Target(e.to_string());
        loop {
            target.watch.flag.store(false, Ordering::Release);
            target.watch.set_running(true);
            let r = target.sim.run_debug();
            target.watch.set_running(false);
            match r.map_err(err)? {
                RunEnd::Exits(exits) => {
                    let code = exits[target.at].code.clamp(0, 255) as u8;
                    target.exits = Some(exits);
                    return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(code)));
                }
                RunEnd::Checkpoint => {
                    // The guest (or the config) asked for one: it is written
                    // without GDB's breakpoints in the guest's memory.
                    target.lift();
                    let r = target.sim.checkpoint_now(None, true);
                    target.replant();
                    if let Some(exits) = r.map_err(err)? {
                        let code = exits[target.at].code.clamp(0, 255) as u8;
                        target.exits = Some(exits);
                        return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(code)));
                    }
                    continue;
                }
                RunEnd::Debug => {}
            }
            // Every CPU stopped; the lowest one that stopped for a reason
            // of its own is reported (another one's breakpoint is met again
            // when it runs on: its instruction did not execute).
            let mut stop = None;
            for i in 0..target.cpus() {
                if let Some(DebugHalt::Stop(s)) = target.sys().take_debug_halt(i) {
                    stop = stop.or(Some((i, s)));
                }
            }
            if let Some((i, s)) = stop {
                return Ok(Event::TargetStopped(stop_reason(i, s)));
            }
            if conn
                .peek()
                .map_err(WaitForStopReasonError::Connection)?
                .is_some()
            {
                let b = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(b));
            }
            if crate::console::interrupted() {
                return Err(WaitForStopReasonError::Target(
                    "interrupted by the user (SIGINT/SIGTERM)".into(),
                ));
            }
        }
    }

    fn on_interrupt(target: &mut SimTarget<'a>) -> Result<Option<Self::StopReason>, String> {
        // Reported on the first CPU that was running.
        let i = target
            .actions
            .iter()
            .position(|&a| !(target.locked && a == Resume::Default))
            .unwrap_or(0);
        Ok(Some(MultiThreadStopReason::SignalWithThread {
            tid: tid(i),
            signal: Signal::SIGINT,
        }))
    }
}

/// What GDB is told when CPU `i` stopped for `s`.
fn stop_reason(i: usize, s: DebugStop) -> MultiThreadStopReason<u64> {
    let t = tid(i);
    match s {
        DebugStop::Step => MultiThreadStopReason::SignalWithThread {
            tid: t,
            signal: Signal::SIGTRAP,
        },
        DebugStop::SwBreak => MultiThreadStopReason::SwBreak(t),
        DebugStop::HwBreak(_) => MultiThreadStopReason::HwBreak(t),
        DebugStop::Watch(kind, addr) => MultiThreadStopReason::Watch {
            tid: t,
            kind: match kind {
                BreakKind::Write => WatchKind::Write,
                _ => WatchKind::ReadWrite,
            },
            addr,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gdbstub::arch::Registers as _;

    #[test]
    fn registers_round_trip_with_the_segment_bases() {
        let mut r = Regs::default();
        r.core.regs[0] = 0x1122_3344_5566_7788;
        r.core.rip = 0x10_0000;
        r.core.xmm[15] = u128::MAX - 5;
        r.fs_base = 0xffff_8880_0000_1000;
        r.gs_base = 0x7fff_0000_2000;
        let mut bytes = Vec::new();
        r.gdb_serialize(|b| bytes.push(b.unwrap_or(0)));
        assert_eq!(bytes.len(), CORE_SSE_BYTES + 16);
        let mut back = Regs::default();
        back.gdb_deserialize(&bytes).unwrap();
        assert_eq!(back, r);
        // A short packet is refused, not read past its end.
        assert!(back.gdb_deserialize(&bytes[..CORE_SSE_BYTES + 8]).is_err());
    }

    #[test]
    fn the_target_description_is_well_formed_and_numbers_the_registers() {
        let names: Vec<&str> = TARGET_XML
            .split("<reg name=\"")
            .skip(1)
            .map(|s| s.split('"').next().unwrap_or(""))
            .collect();
        // 16 GPRs, rip, eflags, 6 selectors, 8 st, 8 x87 control, 16 xmm,
        // mxcsr, fs_base, gs_base.
        assert_eq!(names.len(), 16 + 2 + 6 + 8 + 8 + 16 + 1 + 2);
        assert_eq!(names[40], "xmm0");
        assert_eq!(names[names.len() - 2..], ["fs_base", "gs_base"]);
        assert_eq!(TARGET_XML.matches("<feature").count(), 3);
        assert_eq!(TARGET_XML.matches("</feature>").count(), 3);
    }

    #[test]
    fn abridged_tags_expand() {
        assert_eq!(full_tag(0), 0xffff);
        assert_eq!(full_tag(0b1), 0xfffc);
    }
}
