//! The SE device: the doorbells the kernel stub writes, in kvmsim's bus.

use std::collections::BTreeSet;

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space, UserContext};
use sim::stats::StatsError;
use sim::{Counter, Request, Stats, Tick, Vector};
use vm_memory::GuestMemoryMmap;

use crate::mm::{PhysMem, PAGE, PROT_EXEC, PROT_READ, PROT_WRITE};
use crate::process::Process;
use crate::signal::{self as sig, bit, Action, Info, Trap};
use crate::sys::{signal_name, Clock, Done, Flow};
use crate::*;

/// Consecutive faults at one (RIP, address) that find the page present
/// before the program is taken to be stuck.
const MAX_SPURIOUS: u32 = 4;

/// Timing of the emulated kernel.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Simulated time every system call costs.
    pub syscall_latency: Tick,
    /// Simulated time a page fault that maps a page costs.
    pub fault_latency: Tick,
    /// CLOCK_REALTIME at tick 0 (ns since the Unix epoch).
    pub realtime_base_ns: u64,
}

/// The device that services the process's system calls and exceptions.
pub struct SeDevice {
    proc: Process,
    mem: GuestMemoryMmap,
    timing: Timing,
    calls: Vector,
    ticks: Vector,
    unsupported: Counter,
    faults: Counter,
    flushes: Counter,
    delivered: Counter,
    reported: BTreeSet<u64>,
    last_fault: (u64, u64, u32),
    ended: bool,
    /// Raises [`SIGNAL_VECTOR`] at the CPU (set by the platform).
    kick: Option<Box<dyn FnMut() + Send>>,
    /// The simulated time of the call being serviced: a process that ends
    /// in it ends that much later (a sleep cut short by a fatal SIGALRM).
    end_delay: Tick,
}

/// What became of a signal.
enum Outcome {
    /// A handler will run (the context now enters it).
    Delivered,
    /// Ignored (SIG_IGN, or a default action of ignoring).
    Ignored,
    /// The process ended.
    Ended,
}

/// The stats cell of call `nr`: its number, or the last ("unknown") for
/// numbers beyond the table.
fn cell(nr: u64) -> usize {
    usize::try_from(nr)
        .ok()
        .filter(|&n| n < names::NAMES.len())
        .unwrap_or(names::NAMES.len())
}

/// The name of call `nr` for messages.
pub fn call_name(nr: u64) -> String {
    names::name(nr).map_or_else(|| format!("#{nr}"), str::to_string)
}

impl SeDevice {
    /// Statistics go under `{prefix}.` (e.g. `system.se`).
    pub fn new(
        proc: Process,
        mem: GuestMemoryMmap,
        timing: Timing,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, StatsError> {
        let mut subs: Vec<String> = names::NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                if n.is_empty() {
                    format!("nr{i}")
                } else {
                    n.to_string()
                }
            })
            .collect();
        subs.push("unknown".into());
        let subs: Vec<&str> = subs.iter().map(String::as_str).collect();
        Ok(SeDevice {
            proc,
            mem,
            timing,
            calls: stats.sparse_vector(
                &format!("{prefix}.syscalls"),
                "System calls made by the program, by name",
                "Count",
                &subs,
            )?,
            ticks: stats.sparse_vector(
                &format!("{prefix}.syscallTicks"),
                "Simulated time spent in each system call (per-call latency plus sleeps)",
                "Tick",
                &subs,
            )?,
            unsupported: stats.counter(
                &format!("{prefix}.unsupportedSyscalls"),
                "System calls answered ENOSYS because SE mode does not support them",
                "Count",
            )?,
            faults: stats.counter(
                &format!("{prefix}.pageFaults"),
                "Page faults that mapped a page (first touch of a page)",
                "Count",
            )?,
            flushes: stats.counter(
                &format!("{prefix}.tlbFlushes"),
                "Page-table changes that needed a TLB flush (a CR3 switch)",
                "Count",
            )?,
            delivered: stats.counter(
                &format!("{prefix}.signalsDelivered"),
                "Signals delivered to a handler of the program",
                "Count",
            )?,
            reported: BTreeSet::new(),
            last_fault: (0, 0, 0),
            ended: false,
            kick: None,
            end_delay: 0,
        })
    }

    /// How the device interrupts the running program when a timer signal
    /// is due: `kick` raises [`SIGNAL_VECTOR`] at its CPU.
    pub fn set_kick(&mut self, kick: Box<dyn FnMut() + Send>) {
        self.kick = Some(kick);
    }

    /// Returns to the program with `uc` (CPL3, the process's FS base and
    /// page tables).
    fn resume(&mut self, ctx: &mut AccessCtx, mut uc: UserContext, from: &str) {
        uc.fs_base = self.proc.fs_base;
        uc.cr3 = self.cr3();
        if !ctx.set_user_context(&uc) {
            self.end(
                ctx,
                128 + 11,
                format!("SE mode: the CPU cannot return from {from}"),
            );
        }
    }

    /// Ends the run as `signal`'s default action would.
    fn kill(&mut self, ctx: &mut AccessCtx, signal: i32, detail: &str) {
        self.end(
            ctx,
            128 + signal,
            format!(
                "the program was killed by {} ({signal}): {detail}; exit status {}",
                signal_name(signal),
                128 + signal
            ),
        );
    }

    /// Acts on signal `info.signo` for the program whose context is `uc`:
    /// runs its handler (a frame on its stack, `uc` entering the handler),
    /// ignores it, or ends the process. A synchronous one (`forced`: a
    /// fault) that is blocked or not handled ends the process, as in Linux.
    fn deliver(
        &mut self,
        ctx: &mut AccessCtx,
        uc: &mut UserContext,
        info: Info,
        trap: Trap,
        forced: bool,
        detail: &str,
    ) -> Outcome {
        let signo = info.signo;
        let act: Action = self.proc.action(signo);
        let blocked = self.proc.sigmask & bit(signo) != 0;
        let handled = act.handler > sig::SIG_IGN;
        if forced && (blocked || !handled) {
            let why = if handled {
                " (its handler is blocked)"
            } else {
                ""
            };
            self.kill(ctx, signo, &format!("{detail}{why}"));
            return Outcome::Ended;
        }
        if !handled {
            if act.ignores(signo) {
                return Outcome::Ignored;
            }
            self.kill(ctx, signo, detail);
            return Outcome::Ended;
        }
        if act.handler >= USER_TOP || act.flags & sig::SA_RESTORER == 0 {
            self.kill(
                ctx,
                sig::SIGSEGV,
                &format!(
                    "its {} handler at {:#x} cannot be entered (outside user space, or no SA_RESTORER: x86-64 Linux needs one)",
                    signal_name(signo),
                    act.handler
                ),
            );
            return Outcome::Ended;
        }
        let fpu = ctx.fpu_state();
        let rsp = uc.gprs[UserContext::RSP];
        let on_alt = self.proc.on_altstack(rsp);
        let stack_flags = match self.proc.altstack {
            None => sig::SS_DISABLE,
            Some(_) if on_alt => sig::SS_ONSTACK,
            Some(_) => 0,
        };
        let alt = if act.flags & sig::SA_ONSTACK != 0 && !on_alt {
            self.proc.altstack
        } else {
            None
        };
        let old_mask = self.proc.suspend_mask.take().unwrap_or(self.proc.sigmask);
        let frame = sig::build_frame(
            uc,
            fpu.as_deref(),
            &info,
            &act,
            old_mask,
            alt,
            stack_flags,
            trap,
        );
        if self
            .proc
            .space
            .write_user(&self.mem, frame.base, &frame.bytes)
            .is_err()
        {
            self.kill(
                ctx,
                sig::SIGSEGV,
                &format!(
                    "the frame for its {} handler does not fit at {:#x} (stack pointer {rsp:#x})",
                    signal_name(signo),
                    frame.base
                ),
            );
            return Outcome::Ended;
        }
        let defer = if act.flags & sig::SA_NODEFER != 0 {
            0
        } else {
            bit(signo)
        };
        self.proc.sigmask = (self.proc.sigmask | act.mask | defer) & !sig::UNBLOCKABLE;
        if act.flags & sig::SA_RESETHAND != 0 {
            self.proc.sigactions.remove(&(signo as u64));
        }
        *uc = frame.regs;
        self.delivered.inc();
        Outcome::Delivered
    }

    /// Delivers the pending signals that are not blocked (the first with a
    /// handler enters it); false if the process ended.
    fn deliver_pending(&mut self, ctx: &mut AccessCtx, uc: &mut UserContext) -> bool {
        while let Some(signo) = self.proc.next_signal() {
            self.proc.pending &= !bit(signo);
            let info = if signo == sig::SIGALRM {
                Info {
                    signo,
                    code: sig::SI_KERNEL,
                    field: 0,
                }
            } else {
                Info {
                    signo,
                    code: sig::SI_TKILL,
                    field: u64::from(crate::sys::PID) | (u64::from(crate::sys::UID) << 32),
                }
            };
            let detail = if signo == sig::SIGALRM {
                "its timer (alarm or setitimer) expired".to_string()
            } else {
                format!("it sent itself {}", signal_name(signo))
            };
            match self.deliver(ctx, uc, info, Trap::default(), false, &detail) {
                Outcome::Delivered => return true,
                Outcome::Ignored => continue,
                Outcome::Ended => return false,
            }
        }
        true
    }

    /// rt_sigreturn: the registers, mask and FP state from the frame whose
    /// `ucontext` is at RSP (where the handler's return popped the
    /// restorer's address).
    fn sigreturn(&mut self, ctx: &mut AccessCtx, uc: UserContext) {
        let at = uc.gprs[UserContext::RSP];
        let mut b = [0u8; sig::UCONTEXT_SIZE as usize];
        if self.proc.space.read_user(&self.mem, at, &mut b).is_err() {
            self.kill(
                ctx,
                sig::SIGSEGV,
                &format!("rt_sigreturn finds no signal frame at {at:#x}"),
            );
            return;
        }
        let r = sig::restore(&b, &uc);
        if r.regs.rip >= USER_TOP {
            self.kill(
                ctx,
                sig::SIGSEGV,
                &format!("rt_sigreturn to {:#x}, outside user space", r.regs.rip),
            );
            return;
        }
        if r.fpstate != 0 {
            let len = ctx.fpu_state().map_or(0, |f| f.len());
            let mut area = vec![0u8; len];
            let ok = len > 0
                && self
                    .proc
                    .space
                    .read_user(&self.mem, r.fpstate, &mut area)
                    .is_ok()
                && ctx.set_fpu_state(&area);
            if !ok {
                self.kill(
                    ctx,
                    sig::SIGSEGV,
                    &format!("rt_sigreturn finds no valid FP state at {:#x}", r.fpstate),
                );
                return;
            }
        }
        self.proc.sigmask = r.mask;
        let mut back = r.regs;
        if self.deliver_pending(ctx, &mut back) {
            self.resume(ctx, back, "a signal handler");
        }
    }

    fn end(&mut self, ctx: &mut AccessCtx, status: i32, message: String) {
        self.ended = true;
        ctx.requests.push(Request::ProcessExit {
            delay: self.end_delay,
            code: i64::from(status),
            message,
        });
    }

    fn cr3(&mut self) -> u64 {
        if self.proc.space.flush_needed {
            self.flushes.inc();
            self.proc.space.flush(&self.mem)
        } else {
            self.proc.space.cr3()
        }
    }

    fn syscall(&mut self, ctx: &mut AccessCtx) -> Tick {
        let Some(uc) = ctx.user_context() else {
            self.end(
                ctx,
                128 + 11,
                "SE mode: the CPU gives no register access".into(),
            );
            return 0;
        };
        let g = uc.gprs;
        let nr = g[UserContext::RAX];
        let args = [
            g[UserContext::RDI],
            g[UserContext::RSI],
            g[UserContext::RDX],
            g[UserContext::R10],
            g[UserContext::R8],
            g[UserContext::R9],
        ];
        let clock = Clock {
            now: ctx.now,
            realtime_base_ns: self.timing.realtime_base_ns,
        };
        self.proc.user_rsp = g[UserContext::RSP];
        self.proc.expire(ctx.now);
        let done = match self.proc.syscall(&self.mem, nr, args, clock) {
            Some(d) => d,
            None => {
                self.unsupported.inc();
                // New processes and threads: EAGAIN (as when a limit is
                // reached, which callers report and survive) for the ones
                // that create them, ENOSYS for exec; said once, by name.
                let (errno, why) = match nr {
                    56 | 57 | 58 | 435 => (
                        crate::sys::EAGAIN,
                        " (SE mode runs one thread of one process: no fork, vfork or clone)",
                    ),
                    59 | 322 => (crate::sys::ENOSYS, " (SE mode runs one program: no execve)"),
                    _ => (crate::sys::ENOSYS, ""),
                };
                if self.reported.insert(nr) {
                    tracing::warn!(
                        "SE: unsupported system call {} ({nr}){why}: it returns {}",
                        call_name(nr),
                        if errno == crate::sys::EAGAIN {
                            "EAGAIN"
                        } else {
                            "ENOSYS"
                        }
                    );
                }
                Done {
                    flow: Flow::Return(-errno),
                    sleep: 0,
                }
            }
        };
        let took = self.timing.syscall_latency.saturating_add(done.sleep);
        self.calls.add(cell(nr), 1);
        self.ticks.add(cell(nr), took);
        self.end_delay = took;
        self.handle_flow(ctx, nr, done.flow, uc, took);
        self.end_delay = 0;
        took
    }

    fn handle_flow(
        &mut self,
        ctx: &mut AccessCtx,
        nr: u64,
        flow: Flow,
        mut uc: UserContext,
        took: Tick,
    ) {
        let g = uc.gprs;
        match flow {
            Flow::Exit { status, message } => {
                self.end(ctx, status, message);
            }
            Flow::SigReturn => {
                // The program's flags are in R11 (SYSCALL may have masked IF).
                uc.rflags = g[UserContext::R11];
                self.sigreturn(ctx, uc)
            }
            Flow::Return(v) => {
                let back = g[UserContext::RCX];
                if back >= USER_TOP {
                    self.end(ctx, 128 + 11, format!("SIGSEGV: system call {} returns to {back:#x}, outside user space (RCX was not set by syscall)", call_name(nr)));
                    return;
                }
                // sysretq: RIP = RCX, RFLAGS = R11 (RF and VM cleared).
                uc.gprs[UserContext::RAX] = v as u64;
                uc.rip = back;
                uc.rflags = (g[UserContext::R11] & 0x3c_7fd7) | 0x2;
                // Signals due by the end of the call are acted on as it returns.
                self.proc.expire(ctx.now.saturating_add(took));
                if self.deliver_pending(ctx, &mut uc) {
                    self.resume(ctx, uc, "a system call");
                }
            }
        }
    }

    fn fault(&mut self, vector: u64, ctx: &mut AccessCtx) -> Tick {
        let Some(uc) = ctx.user_context() else {
            self.end(
                ctx,
                128 + 11,
                "SE mode: the CPU gives no register access".into(),
            );
            return 0;
        };
        // The frame the stub left: [error, RIP, CS, RFLAGS, RSP, SS].
        let mut frame = [0u64; 6];
        let sp = uc.gprs[UserContext::RSP];
        for (i, w) in frame.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            match self
                .proc
                .space
                .translate(&self.mem, sp.wrapping_add(8 * i as u64))
            {
                Some(pa) if PhysMem::read(&self.mem, pa, &mut b) => *w = u64::from_le_bytes(b),
                _ => {
                    self.end(ctx, 128 + 11, format!("SE mode: exception {vector} with a kernel stack pointer {sp:#x} outside the stub's stack"));
                    return 0;
                }
            }
        }
        let [err, rip, cs, rflags, rsp, _ss] = frame;
        if cs & 3 != 3 {
            self.end(ctx, 128 + 11, format!("SE mode: the kernel stub itself faulted (vector {vector}, error {err:#x}) at {rip:#x}"));
            return 0;
        }
        // The user context the exception interrupted (the stubs change no
        // general register).
        let mut user = uc;
        user.rip = rip;
        user.gprs[UserContext::RSP] = rsp;
        user.rflags = (rflags & 0x3c_7fd7) | 0x2;
        if vector == SIGNAL_VECTOR {
            // A timer signal is due: delivered here unless the program was
            // inside the system-call entry (then at the call's return).
            self.proc.expire(ctx.now);
            if rip >= USER_TOP || self.deliver_pending(ctx, &mut user) {
                self.resume(ctx, user, "an interrupt");
            }
            return 0;
        }
        let mut latency = 0;
        if vector == 14 {
            let addr = uc.cr2;
            let write = err & 2 != 0;
            let fetch = err & 16 != 0;
            let need = if fetch {
                PROT_EXEC
            } else if write {
                PROT_WRITE
            } else {
                PROT_READ
            };
            let allowed = self
                .proc
                .space
                .vma_at(addr)
                .filter(|(_, v)| !v.kernel && v.prot & need != 0)
                .is_some();
            if allowed {
                let key = (rip, addr & !(PAGE - 1));
                let again = (self.last_fault.0, self.last_fault.1) == key;
                match self.proc.space.populate(&self.mem, addr) {
                    Ok(true) => {
                        self.faults.inc();
                        self.last_fault = (key.0, key.1, 0);
                        latency = self.timing.fault_latency;
                    }
                    Ok(false) => {
                        // Present already: a stale translation. Flush and retry.
                        let n = if again { self.last_fault.2 + 1 } else { 1 };
                        self.last_fault = (key.0, key.1, n);
                        self.proc.space.flush_needed = true;
                        if n > MAX_SPURIOUS {
                            self.kill(ctx, 11, &format!("page fault at address {addr:#x} that repeats although the page is mapped, at rip {rip:#x}"));
                            return 0;
                        }
                    }
                    Err(_) => {
                        self.kill(ctx, 7, &format!("out of guest memory mapping address {addr:#x} at rip {rip:#x} (raise --memory)"));
                        return 0;
                    }
                }
                self.resume(ctx, user, "a page fault");
                return latency;
            }
            let what = if fetch {
                "execute"
            } else if write {
                "write"
            } else {
                "read"
            };
            let mapped = self.proc.space.vma_at(addr).is_some();
            let why = match self.proc.space.vma_at(addr) {
                None => "not mapped".to_string(),
                Some((_, v)) if v.kernel => "kernel memory".to_string(),
                Some((_, v)) => format!(
                    "mapping {} is {}{}{}",
                    v.name,
                    if v.prot & PROT_READ != 0 { 'r' } else { '-' },
                    if v.prot & PROT_WRITE != 0 { 'w' } else { '-' },
                    if v.prot & PROT_EXEC != 0 { 'x' } else { '-' }
                ),
            };
            let info = Info {
                signo: sig::SIGSEGV,
                code: if mapped {
                    sig::SEGV_ACCERR
                } else {
                    sig::SEGV_MAPERR
                },
                field: addr,
            };
            let trap = Trap {
                err,
                trapno: vector,
                cr2: addr,
            };
            let detail = format!("invalid {what} at address {addr:#x} ({why}) at rip {rip:#x}");
            return self.fault_signal(ctx, user, info, trap, &detail);
        }
        // (signal, si_code, si_addr is RIP, what happened), as Linux's traps.
        let (signo, code, at_rip, what) = match vector {
            0 => (8, sig::FPE_INTDIV, true, "divide error (#DE)"),
            1 => (5, sig::SI_KERNEL, false, "debug exception (#DB)"),
            3 => (5, sig::SI_KERNEL, false, "breakpoint (int3)"),
            4 => (11, sig::SI_KERNEL, false, "overflow (#OF)"),
            5 => (11, sig::SI_KERNEL, false, "bound range exceeded (#BR)"),
            6 => (4, sig::ILL_ILLOPN, true, "invalid opcode (#UD)"),
            7 => (8, sig::SI_KERNEL, false, "device not available (#NM)"),
            12 => (7, sig::SI_KERNEL, false, "stack-segment fault (#SS)"),
            13 => (11, sig::SI_KERNEL, false, "general protection fault (#GP: a privileged instruction or a non-canonical address)"),
            16 => (8, sig::SI_KERNEL, true, "x87 floating-point exception (#MF)"),
            17 => (7, sig::BUS_ADRERR, false, "alignment check (#AC)"),
            19 => (8, sig::FPE_FLTINV, true, "SIMD floating-point exception (#XM)"),
            _ => (11, sig::SI_KERNEL, false, "exception"),
        };
        let info = Info {
            signo,
            code,
            field: if at_rip { rip } else { 0 },
        };
        let trap = Trap {
            err,
            trapno: vector,
            cr2: uc.cr2,
        };
        let detail = format!("{what}, vector {vector}, error code {err:#x}, at rip {rip:#x}");
        self.fault_signal(ctx, user, info, trap, &detail)
    }

    /// A synchronous signal from an exception: its handler runs, or the
    /// process ends (no handler, or the signal blocked).
    fn fault_signal(
        &mut self,
        ctx: &mut AccessCtx,
        mut user: UserContext,
        info: Info,
        trap: Trap,
        detail: &str,
    ) -> Tick {
        if let Outcome::Delivered = self.deliver(ctx, &mut user, info, trap, true, detail) {
            self.resume(ctx, user, "an exception");
        }
        0
    }

    /// The process (tests, reports).
    pub fn process(&self) -> &Process {
        &self.proc
    }
}

impl mem::TimedDevice for SeDevice {
    /// ITIMER_REAL's expiry: SIGALRM is due then.
    fn next_deadline(&self) -> Option<Tick> {
        if self.ended {
            return None;
        }
        self.proc.itimer.map(|(d, _)| d)
    }

    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.proc.expire(ctx.now);
        // Interrupt the program, whose CPU then reports SIGNAL_VECTOR; a
        // blocked signal waits for the call that unblocks it.
        if self.proc.next_signal().is_some() {
            if let Some(k) = &mut self.kick {
                k();
            }
        }
    }
}

impl BusDevice for SeDevice {
    fn read(&mut self, _space: Space, _offset: u64, data: &mut [u8], _ctx: &mut AccessCtx) -> Tick {
        data.fill(0);
        0
    }

    fn write(&mut self, _space: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        if self.ended {
            return 0;
        }
        match offset {
            SYSCALL_DOORBELL => self.syscall(ctx),
            FAULT_DOORBELL => {
                let v = data.first().copied().map_or(255, u64::from);
                self.fault(v, ctx)
            }
            _ => 0,
        }
    }

    fn save(&self) -> SavedState {
        // A process (host files, page tables) is not checkpointable yet;
        // the config refuses checkpoints in SE mode.
        serde_json::json!({"se": "not checkpointable"})
    }

    fn restore(&mut self, _state: &SavedState) -> Result<(), RestoreError> {
        Err(RestoreError(
            "an SE-mode process cannot be restored from a checkpoint yet".into(),
        ))
    }
}
