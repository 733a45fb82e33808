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

/// How the device reaches the process's CPUs (the platform wires it to
/// their interrupt controllers).
pub trait CpuLink: Send {
    /// Raises interrupt `vector` at CPU `cpu` (waking it if it is idle).
    fn raise(&mut self, cpu: usize, vector: u8);
    /// Ends the interrupt CPU `cpu` is servicing (a local APIC's EOI;
    /// nothing where the controller keeps no in-service state).
    fn eoi(&mut self, cpu: usize);
}

/// What a CPU's thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// No thread: the CPU is parked (see `SeDevice::park`).
    Free,
    /// The thread's context is in the CPU.
    Running,
    /// The thread waits on a futex (or for a signal); the CPU is parked.
    Waiting(Wait),
    /// The thread may run: its context (`Slot::saved`) goes into the CPU
    /// at its next wake interrupt.
    Ready,
}

/// A futex wait (or, keyed [`SIGNAL_KEY`], a wait for a signal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wait {
    /// The futex word's address (one process, one address space: private
    /// and shared futexes are keyed alike).
    key: u64,
    bitset: u32,
    /// The timeout, in simulated time.
    deadline: Option<Tick>,
    /// When the wait began (per-CPU wait time in stats).
    since: Tick,
    /// Waiters are woken in the order they came (FIFO).
    seq: u64,
    /// A call that would block (a pipe read or write; `key` is the pipe's,
    /// `crate::pipe::key`): woken, it is made again from the start; the
    /// saved context is the call as it was made.
    restart: bool,
    /// The descriptor of a restarting call (messages).
    fd: u32,
}

/// A CPU and the thread on it.
#[derive(Debug, Clone)]
struct Slot {
    /// The thread's own state while another thread's is in `Process::t`.
    t: crate::process::ThreadState,
    run: Run,
    /// The context to resume (Ready; Waiting: the call's return, RAX set
    /// when woken).
    saved: UserContext,
    /// The FP state a new thread starts with (its parent's).
    fpu: Option<Vec<u8>>,
    /// The page-table generation the CPU last loaded.
    gen: u64,
    /// The Ready context makes a blocked call again (at [`ENTRY_VA`]).
    restart: bool,
    /// The call being made is one made again: not counted twice.
    again: bool,
}

/// What a thread call did.
enum Threaded {
    /// Returns this value to the caller.
    Ret(i64),
    /// The caller's CPU parks (a futex wait, a thread exit) or the
    /// process ended: nothing to return.
    Away,
}

/// Linux's clone flags.
const CLONE_VM: u64 = 0x100;
const CLONE_SIGHAND: u64 = 0x800;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_SETTLS: u64 = 0x8_0000;
const CLONE_PARENT_SETTID: u64 = 0x10_0000;
const CLONE_CHILD_CLEARTID: u64 = 0x20_0000;
const CLONE_CHILD_SETTID: u64 = 0x100_0000;
const ETIMEDOUT: i64 = 110;
/// The key of a wait for a signal (pause, rt_sigsuspend with other
/// threads running): no futex word has it (they are 4-byte aligned).
const SIGNAL_KEY: u64 = u64::MAX;

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
    /// Raises interrupts at the CPUs (set by the platform).
    link: Option<Box<dyn CpuLink>>,
    /// One per CPU; the thread being serviced is `cur`'s.
    slots: Vec<Slot>,
    cur: usize,
    next_tid: u32,
    wait_seq: u64,
    threads: Counter,
    futex_waits: Counter,
    futex_wakes: Counter,
    pipe_waits: Counter,
    poll_waits: Counter,
    eventfd_waits: Counter,
    cpu_calls: Vector,
    cpu_wait_ticks: Vector,
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
        let ncpus = proc.cpus.clamp(1, MAX_SE_CPUS);
        let cpu_names: Vec<String> = (0..ncpus).map(|i| format!("cpu{i}")).collect();
        let cpu_names: Vec<&str> = cpu_names.iter().map(String::as_str).collect();
        let mut proc = proc;
        proc.space.frames.set_hold(ncpus > 1);
        let mut slots = vec![
            Slot {
                t: Default::default(),
                run: Run::Free,
                saved: UserContext::default(),
                fpu: None,
                gen: 0,
                restart: false,
                again: false,
            };
            ncpus
        ];
        slots[0].run = Run::Running;
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
            link: None,
            slots,
            cur: 0,
            next_tid: crate::sys::PID + 1,
            wait_seq: 0,
            threads: stats.counter(
                &format!("{prefix}.threadsCreated"),
                "Threads the program created (clone, clone3)",
                "Count",
            )?,
            futex_waits: stats.counter(
                &format!("{prefix}.futexWaits"),
                "futex waits that put a thread to sleep",
                "Count",
            )?,
            futex_wakes: stats.counter(
                &format!("{prefix}.futexWakes"),
                "Threads woken from a futex wait by another thread",
                "Count",
            )?,
            pipe_waits: stats.counter(
                &format!("{prefix}.pipeWaits"),
                "Pipe reads and writes that put a thread to sleep (an empty or full pipe)",
                "Count",
            )?,
            poll_waits: stats.counter(
                &format!("{prefix}.pollWaits"),
                "poll, ppoll, select, pselect6 and epoll_wait/epoll_pwait calls that put a thread to \
                 sleep (nothing ready; each sleep counts, also after a wake that found nothing)",
                "Count",
            )?,
            eventfd_waits: stats.counter(
                &format!("{prefix}.eventfdWaits"),
                "eventfd reads and writes that put a thread to sleep (a counter of 0, or one a \
                 write would overflow)",
                "Count",
            )?,
            cpu_calls: stats.vector(
                &format!("{prefix}.cpuSyscalls"),
                "System calls by CPU (the thread on it)",
                "Count",
                &cpu_names,
            )?,
            cpu_wait_ticks: stats.vector(
                &format!("{prefix}.cpuFutexWaitTicks"),
                "Simulated time the CPU's thread spent waiting on futexes",
                "Tick",
                &cpu_names,
            )?,
            end_delay: 0,
        })
    }

    /// How the device interrupts the process's CPUs: a timer signal due
    /// ([`SIGNAL_VECTOR`]), a thread to wake or start, page tables to
    /// reload ([`WAKE_VECTOR`]).
    pub fn set_link(&mut self, link: Box<dyn CpuLink>) {
        self.link = Some(link);
    }

    fn raise(&mut self, cpu: usize, vector: u64) {
        if let Some(l) = &mut self.link {
            l.raise(cpu, vector as u8);
        }
    }

    /// Makes CPU `k`'s thread the one being serviced (its state in
    /// `Process::t`).
    fn switch(&mut self, k: usize) {
        let k = k.min(self.slots.len() - 1);
        if k != self.cur {
            std::mem::swap(&mut self.proc.t, &mut self.slots[self.cur].t);
            std::mem::swap(&mut self.proc.t, &mut self.slots[k].t);
            self.cur = k;
        }
    }

    /// CPU `k`'s thread's state.
    fn ts(&mut self, k: usize) -> &mut crate::process::ThreadState {
        if k == self.cur {
            &mut self.proc.t
        } else {
            &mut self.slots[k].t
        }
    }

    /// Threads that exist.
    fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.run != Run::Free).count()
    }

    /// Returns to the program with `uc` (CPL3, the process's FS base and
    /// page tables).
    fn resume(&mut self, ctx: &mut AccessCtx, mut uc: UserContext, from: &str) {
        uc.fs_base = self.proc.t.fs_base;
        uc.cr3 = self.cr3();
        if !ctx.set_user_context(&uc) {
            self.end(
                ctx,
                128 + 11,
                format!("SE mode: the CPU cannot return from {from}"),
            );
            return;
        }
        self.loaded();
    }

    /// The current CPU now runs on the current tables: frames that no
    /// CPU running a thread can reach any more are handed out again
    /// (parked CPUs run on tables of their own).
    fn loaded(&mut self) {
        let gen = self.proc.space.frames.epoch;
        self.slots[self.cur].gen = gen;
        let min = self
            .slots
            .iter()
            .filter(|s| s.run == Run::Running)
            .map(|s| s.gen)
            .min()
            .unwrap_or(gen);
        self.proc.space.frames.release(min);
    }

    /// Parks the current CPU: kernel mode at [`IDLE_VA`] (`hlt` with
    /// interrupts enabled) on its own kernel stack and the park tables,
    /// until a wake interrupt.
    fn park(&mut self, ctx: &mut AccessCtx) {
        let mut uc = UserContext {
            rip: IDLE_VA,
            rflags: 0x202,
            cr3: self.proc.park_cr3,
            ..Default::default()
        };
        uc.gprs[UserContext::RSP] = kstack_top(self.cur);
        if !ctx.set_kernel_context(&uc) {
            self.end(ctx, 128 + 11, "SE mode: the CPU cannot be parked".into());
        }
    }

    /// The context `sysretq` would return to from the call `uc` made,
    /// with `v` in RAX; `None` if RCX is outside user space.
    fn return_ctx(uc: &UserContext, v: i64) -> Option<UserContext> {
        let g = uc.gprs;
        let back = g[UserContext::RCX];
        if back >= USER_TOP {
            return None;
        }
        let mut r = *uc;
        r.gprs[UserContext::RAX] = v as u64;
        r.rip = back;
        r.rflags = (g[UserContext::R11] & 0x3c_7fd7) | 0x2;
        Some(r)
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
        let blocked = self.proc.t.sigmask & bit(signo) != 0;
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
        let stack_flags = match self.proc.t.altstack {
            None => sig::SS_DISABLE,
            Some(_) if on_alt => sig::SS_ONSTACK,
            Some(_) => 0,
        };
        let alt = if act.flags & sig::SA_ONSTACK != 0 && !on_alt {
            self.proc.t.altstack
        } else {
            None
        };
        let old_mask = self
            .proc
            .t
            .suspend_mask
            .take()
            .unwrap_or(self.proc.t.sigmask);
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
        self.proc.t.sigmask = (self.proc.t.sigmask | act.mask | defer) & !sig::UNBLOCKABLE;
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
            self.proc.take_signal(signo);
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
            } else if signo == sig::SIGPIPE && std::mem::take(&mut self.proc.t.sigpipe) {
                "it wrote to a pipe whose read ends are all closed".to_string()
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
        self.proc.t.sigmask = r.mask;
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
            let root = self.proc.space.flush(&self.mem);
            // The other CPUs load the new tables at a wake interrupt (a
            // TLB shootdown); frames they may still reach wait for it.
            let gen = self.proc.space.frames.epoch;
            for j in 0..self.slots.len() {
                if j != self.cur && self.slots[j].run == Run::Running && self.slots[j].gen < gen {
                    self.raise(j, WAKE_VECTOR);
                }
            }
            root
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
        self.proc.t.user_rsp = g[UserContext::RSP];
        self.proc.expire(ctx.now);
        // A call made again after a wait (a pipe) counts once.
        let count = u64::from(!std::mem::take(&mut self.slots[self.cur].again));
        self.cpu_calls.add(self.cur, count);
        let threaded = match self.thread_call(ctx, nr, args, &uc) {
            Some(Threaded::Away) => {
                let took = self.timing.syscall_latency;
                self.calls.add(cell(nr), count);
                self.ticks.add(cell(nr), took);
                return took;
            }
            Some(Threaded::Ret(v)) => Some(Done {
                flow: Flow::Return(v),
                sleep: 0,
            }),
            None => None,
        };
        let done = threaded.or_else(|| self.proc.syscall(&self.mem, nr, args, clock));
        // Pipes that changed wake their waiters (who make their call again).
        let keys: Vec<u64> = mem::lock(&self.proc.pipe_events).drain(..).collect();
        if !keys.is_empty() {
            self.wake(ctx.now, crate::pipe::POLL_KEY, u64::MAX, u32::MAX);
        }
        for key in keys {
            self.wake(ctx.now, key, u64::MAX, u32::MAX);
        }
        let done = match done {
            Some(d) => d,
            None => {
                self.unsupported.inc();
                // New processes and threads: EAGAIN (as when a limit is
                // reached, which callers report and survive) for the ones
                // that create them, ENOSYS for exec; said once, by name.
                let (errno, why) = match nr {
                    57 | 58 => (
                        crate::sys::EAGAIN,
                        " (SE mode runs threads of one process: no fork or vfork)",
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
        self.calls.add(cell(nr), count);
        self.ticks.add(cell(nr), took);
        if self.slots.len() > 1 {
            self.route_process_signals();
        }
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
            Flow::Block { key, fd, deadline } => {
                // A signal that would be delivered ends the wait at once:
                // EINTR, or what a write already wrote.
                if self.proc.next_signal().is_some() || Self::return_ctx(&uc, 0).is_none() {
                    let v = Self::interrupted(&mut self.proc.t);
                    return self.handle_flow(ctx, nr, Flow::Return(v), uc, took);
                }
                // A wait whose timeout ends with the call: the call is made
                // again at once (it keeps its deadline, now past, and
                // returns what it returns then: select's emptied sets,
                // the time left written back).
                let end = ctx.now.saturating_add(took);
                if deadline.is_some_and(|d| d <= end) {
                    // Due now: made again at any later time, it returns.
                    self.proc.t.poll_deadline = Some(ctx.now);
                    self.slots[self.cur].again = true;
                    uc.rip = ENTRY_VA;
                    self.resume(ctx, uc, "a wait");
                    return;
                }
                self.wait_seq += 1;
                let k = self.cur;
                // The call as it was made (RAX = its number): made again
                // at the entry when the pipe changes.
                self.slots[k].saved = uc;
                self.slots[k].run = Run::Waiting(Wait {
                    key,
                    bitset: u32::MAX,
                    deadline,
                    since: end,
                    seq: self.wait_seq,
                    restart: true,
                    fd,
                });
                if key == crate::pipe::POLL_KEY {
                    self.poll_waits.inc();
                } else if crate::eventfd::parse_key(key).is_some() {
                    self.eventfd_waits.inc();
                } else {
                    self.pipe_waits.inc();
                }
                self.park(ctx);
                self.check_deadlock(ctx);
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

    // ---- Threads ----

    /// The calls that concern other threads (clone, exit, futex, signals
    /// to another thread); `None` for the others.
    fn thread_call(
        &mut self,
        ctx: &mut AccessCtx,
        nr: u64,
        a: [u64; 6],
        uc: &UserContext,
    ) -> Option<Threaded> {
        use crate::sys::nr::*;
        Some(match nr {
            CLONE => Threaded::Ret(self.clone_thread(ctx, uc, a[0], a[1], a[2], a[3], a[4])),
            CLONE3 => Threaded::Ret(self.clone3(ctx, uc, a[0], a[1])),
            EXIT if self.live() > 1 => {
                self.thread_exit(ctx);
                Threaded::Away
            }
            FUTEX => self.futex(ctx, uc, a),
            PAUSE | RT_SIGSUSPEND if self.live() > 1 => self.wait_signal(ctx, uc, nr, a),
            TGKILL | TKILL => {
                let (tgid, tid, signo) = if nr == TGKILL {
                    (a[0], a[1], a[2])
                } else {
                    (u64::from(crate::sys::PID), a[0], a[1])
                };
                if tgid != u64::from(crate::sys::PID) || tid == u64::from(self.proc.t.tid) {
                    return None;
                }
                Threaded::Ret(self.kill_thread(tid, signo))
            }
            _ => return None,
        })
    }

    /// clone for a thread: the flags glibc's and musl's pthread_create
    /// give (CLONE_VM | CLONE_THREAD | CLONE_SIGHAND at least). The new
    /// thread goes to a free CPU and starts at its next wake interrupt.
    #[allow(clippy::too_many_arguments)]
    fn clone_thread(
        &mut self,
        ctx: &mut AccessCtx,
        uc: &UserContext,
        flags: u64,
        stack: u64,
        ptid: u64,
        ctid: u64,
        tls: u64,
    ) -> i64 {
        let need = CLONE_VM | CLONE_THREAD | CLONE_SIGHAND;
        if flags & need != need || flags & CLONE_VFORK != 0 {
            self.unsupported.inc();
            if self.reported.insert(u64::MAX - 1) {
                tracing::warn!(
                    "SE: clone with flags {flags:#x} makes a new process (not CLONE_VM | \
                     CLONE_THREAD | CLONE_SIGHAND): SE mode runs threads of one process only; \
                     it returns EAGAIN"
                );
            }
            return -crate::sys::EAGAIN;
        }
        let Some(j) = (0..self.slots.len()).find(|&j| self.slots[j].run == Run::Free) else {
            if self.reported.insert(u64::MAX - 2) {
                tracing::warn!(
                    "SE: the program creates more threads than it has CPUs (se.cpus = {}, one \
                     thread per CPU, no time-slicing): clone returns EAGAIN (said once)",
                    self.slots.len()
                );
            }
            return -crate::sys::EAGAIN;
        };
        let Some(mut child) = Self::return_ctx(uc, 0) else {
            return -crate::mm::EINVAL;
        };
        if stack != 0 {
            child.gprs[UserContext::RSP] = stack;
        }
        let fs_base = if flags & CLONE_SETTLS != 0 {
            if tls >= USER_TOP {
                return -crate::sys::EPERM;
            }
            tls
        } else {
            self.proc.t.fs_base
        };
        let tid = self.next_tid;
        if tid == u32::MAX {
            // Thread ids are never reused: after 4 billion threads, none.
            return -crate::sys::EAGAIN;
        }
        let tid_bytes = tid.to_le_bytes();
        for (flag, at) in [(CLONE_PARENT_SETTID, ptid), (CLONE_CHILD_SETTID, ctid)] {
            if flags & flag != 0
                && self
                    .proc
                    .space
                    .write_user(&self.mem, at, &tid_bytes)
                    .is_err()
            {
                return -crate::mm::EFAULT;
            }
        }
        self.next_tid += 1;
        let parent = &self.proc.t;
        let t = crate::process::ThreadState {
            tid,
            fs_base,
            sigmask: parent.sigmask,
            comm: parent.comm,
            tid_address: if flags & CLONE_CHILD_CLEARTID != 0 {
                ctid
            } else {
                0
            },
            ..Default::default()
        };
        let fpu = ctx.fpu_state();
        let slot = &mut self.slots[j];
        slot.t = t;
        slot.saved = child;
        slot.fpu = fpu;
        slot.run = Run::Ready;
        self.threads.inc();
        self.raise(j, WAKE_VECTOR);
        i64::from(tid)
    }

    /// clone3: `struct clone_args` (at least its first 64 bytes) as clone.
    fn clone3(&mut self, ctx: &mut AccessCtx, uc: &UserContext, at: u64, size: u64) -> i64 {
        if !(64..=4096).contains(&size) {
            return -crate::mm::EINVAL;
        }
        let mut b = [0u8; 64];
        if let Err(e) = self.proc.space.read_user(&self.mem, at, &mut b) {
            return -e;
        }
        let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap_or_default());
        let (flags, child_tid, parent_tid, stack, stack_size, tls) =
            (w(0), w(2), w(3), w(5), w(6), w(7));
        let top = if stack == 0 {
            0
        } else {
            stack.wrapping_add(stack_size)
        };
        self.clone_thread(ctx, uc, flags, top, parent_tid, child_tid, tls)
    }

    /// exit of one thread while others run: its clear-child-tid word is
    /// zeroed and woken (pthread_join), its CPU parks and is free again.
    fn thread_exit(&mut self, ctx: &mut AccessCtx) {
        let at = self.proc.t.tid_address;
        if at != 0
            && self
                .proc
                .space
                .write_user(&self.mem, at, &0u32.to_le_bytes())
                .is_ok()
        {
            self.wake(ctx.now, at, 1, u32::MAX);
        }
        self.slots[self.cur].run = Run::Free;
        self.proc.t = Default::default();
        self.park(ctx);
        self.check_deadlock(ctx);
    }

    /// Wakes up to `n` threads waiting on `key` whose bitset meets
    /// `bitset`, oldest first; returns how many.
    fn wake(&mut self, now: Tick, key: u64, n: u64, bitset: u32) -> i64 {
        let mut waiting: Vec<(u64, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(j, s)| match s.run {
                Run::Waiting(w) if w.key == key && w.bitset & bitset != 0 => Some((w.seq, j)),
                _ => None,
            })
            .collect();
        waiting.sort_unstable();
        let mut woken = 0;
        for (_, j) in waiting
            .into_iter()
            .take(usize::try_from(n).unwrap_or(usize::MAX))
        {
            self.end_wait(j, now, 0);
            if key < USER_TOP {
                self.futex_wakes.inc();
            }
            woken += 1;
        }
        woken
    }

    /// Ends thread `j`'s wait with result `v` (0, -ETIMEDOUT, -EINTR): it
    /// runs at its CPU's next wake interrupt.
    fn end_wait(&mut self, j: usize, now: Tick, v: i64) {
        if let Run::Waiting(w) = self.slots[j].run {
            if w.restart {
                if v == 0 || v == -ETIMEDOUT {
                    // Woken, or poll's timeout: the call is made again
                    // from the entry (a poll past its deadline returns).
                    self.slots[j].saved.rip = ENTRY_VA;
                    self.slots[j].restart = true;
                } else {
                    let carry = std::mem::take(&mut self.ts(j).pipe_done);
                    let v = if carry > 0 { carry as i64 } else { v };
                    let saved = self.slots[j].saved;
                    self.slots[j].saved = Self::return_ctx(&saved, v).unwrap_or(saved);
                }
            } else {
                self.cpu_wait_ticks.add(j, now.saturating_sub(w.since));
                self.slots[j].saved.gprs[UserContext::RAX] = v as u64;
            }
            self.slots[j].run = Run::Ready;
            self.raise(j, WAKE_VECTOR);
        }
    }

    /// What a blocked pipe call returns when a signal ends its wait: the
    /// bytes a write already wrote, or EINTR.
    fn interrupted(t: &mut crate::process::ThreadState) -> i64 {
        t.poll_deadline = None;
        match std::mem::take(&mut t.pipe_done) {
            0 => -crate::sys::EINTR,
            n => n as i64,
        }
    }

    /// futex: WAIT, WAKE, their bitset forms, REQUEUE and CMP_REQUEUE
    /// (private or shared alike); a wait parks the CPU in simulated time.
    fn futex(&mut self, ctx: &mut AccessCtx, uc: &UserContext, a: [u64; 6]) -> Threaded {
        let (uaddr, op, val) = (a[0], a[1], a[2] as u32);
        let cmd = op & 0x7f;
        let realtime = op & 256 != 0;
        let read = |this: &mut Self, at: u64| -> Result<u32, i64> {
            let mut b = [0u8; 4];
            this.proc.space.read_user(&this.mem, at, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        if uaddr % 4 != 0 {
            return Threaded::Ret(-crate::mm::EINVAL);
        }
        // Keys above user space are kvmsim's own (pipes, signal waits).
        if uaddr >= USER_TOP || (matches!(cmd, 3 | 4) && a[4] >= USER_TOP) {
            return Threaded::Ret(-crate::mm::EFAULT);
        }
        match cmd {
            // WAIT, WAIT_BITSET
            0 | 9 => {
                let bitset = if cmd == 9 { a[5] as u32 } else { u32::MAX };
                if bitset == 0 || (realtime && cmd == 0) {
                    return Threaded::Ret(-crate::mm::EINVAL);
                }
                match read(self, uaddr) {
                    Err(e) => return Threaded::Ret(-e),
                    Ok(v) if v != val => return Threaded::Ret(-crate::sys::EAGAIN),
                    Ok(_) => {}
                }
                let deadline = if a[3] == 0 {
                    None
                } else {
                    let mut b = [0u8; 16];
                    if let Err(e) = self.proc.space.read_user(&self.mem, a[3], &mut b) {
                        return Threaded::Ret(-e);
                    }
                    let sec = i64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                    let nsec = i64::from_le_bytes(b[8..].try_into().unwrap_or_default());
                    if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
                        return Threaded::Ret(-crate::mm::EINVAL);
                    }
                    let ns = (sec as u64)
                        .saturating_mul(1_000_000_000)
                        .saturating_add(nsec as u64);
                    // WAIT: relative; WAIT_BITSET: absolute, on
                    // CLOCK_MONOTONIC (simulated time) or CLOCK_REALTIME.
                    Some(if cmd == 0 {
                        ctx.now.saturating_add(ns.saturating_mul(1000))
                    } else if realtime {
                        ns.saturating_sub(self.timing.realtime_base_ns)
                            .saturating_mul(1000)
                    } else {
                        ns.saturating_mul(1000)
                    })
                };
                let end = ctx.now.saturating_add(self.timing.syscall_latency);
                if deadline.is_some_and(|d| d <= end) {
                    return Threaded::Ret(-ETIMEDOUT);
                }
                // A signal that would be delivered ends the wait at once.
                if self.proc.next_signal().is_some() {
                    return Threaded::Ret(-crate::sys::EINTR);
                }
                let Some(back) = Self::return_ctx(uc, 0) else {
                    return Threaded::Ret(-crate::mm::EFAULT);
                };
                self.wait_seq += 1;
                let k = self.cur;
                self.slots[k].saved = back;
                self.slots[k].run = Run::Waiting(Wait {
                    key: uaddr,
                    bitset,
                    deadline,
                    since: end,
                    seq: self.wait_seq,
                    restart: false,
                    fd: 0,
                });
                self.futex_waits.inc();
                self.park(ctx);
                self.check_deadlock(ctx);
                Threaded::Away
            }
            // WAKE, WAKE_BITSET
            1 | 10 => {
                let bitset = if cmd == 10 { a[5] as u32 } else { u32::MAX };
                if bitset == 0 {
                    return Threaded::Ret(-crate::mm::EINVAL);
                }
                Threaded::Ret(self.wake(ctx.now, uaddr, u64::from(val), bitset))
            }
            // REQUEUE, CMP_REQUEUE: wake `val`, move up to `val2` (the
            // timeout argument) to `uaddr2`.
            3 | 4 => {
                let (uaddr2, val2) = (a[4], a[3] as u32);
                if uaddr2 % 4 != 0 {
                    return Threaded::Ret(-crate::mm::EINVAL);
                }
                if cmd == 4 {
                    match read(self, uaddr) {
                        Err(e) => return Threaded::Ret(-e),
                        Ok(v) if v != a[5] as u32 => return Threaded::Ret(-crate::sys::EAGAIN),
                        Ok(_) => {}
                    }
                }
                let woken = self.wake(ctx.now, uaddr, u64::from(val), u32::MAX);
                let mut moved = 0;
                let mut rest: Vec<(u64, usize)> = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(j, s)| match s.run {
                        Run::Waiting(w) if w.key == uaddr => Some((w.seq, j)),
                        _ => None,
                    })
                    .collect();
                rest.sort_unstable();
                for (_, j) in rest.into_iter().take(val2 as usize) {
                    if let Run::Waiting(w) = &mut self.slots[j].run {
                        w.key = uaddr2;
                        moved += 1;
                    }
                }
                Threaded::Ret(woken + if cmd == 4 { moved } else { 0 })
            }
            _ => {
                if self.reported.insert(u64::MAX - 3 - cmd) {
                    tracing::warn!(
                        "SE: futex operation {cmd} is not supported (WAIT, WAKE, their BITSET \
                         forms, REQUEUE and CMP_REQUEUE are): it returns ENOSYS"
                    );
                }
                Threaded::Ret(-crate::sys::ENOSYS)
            }
        }
    }

    /// pause / rt_sigsuspend while other threads run (one of them may
    /// send the signal): the thread waits, its CPU parked, until a signal
    /// it does not block arrives; the call returns EINTR as the handler
    /// runs (rt_sigsuspend's mask in force until the handler returns).
    fn wait_signal(
        &mut self,
        ctx: &mut AccessCtx,
        uc: &UserContext,
        nr: u64,
        a: [u64; 6],
    ) -> Threaded {
        let old = self.proc.t.sigmask;
        let mask = if nr == crate::sys::nr::RT_SIGSUSPEND {
            if a[1] != 8 {
                return Threaded::Ret(-crate::mm::EINVAL);
            }
            let mut b = [0u8; 8];
            if let Err(e) = self.proc.space.read_user(&self.mem, a[0], &mut b) {
                return Threaded::Ret(-e);
            }
            self.proc.t.suspend_mask = Some(old);
            u64::from_le_bytes(b) & !sig::UNBLOCKABLE
        } else {
            old
        };
        self.proc.t.sigmask = mask;
        if self.proc.next_signal().is_some() {
            return Threaded::Ret(-crate::sys::EINTR);
        }
        let Some(back) = Self::return_ctx(uc, -crate::sys::EINTR) else {
            return Threaded::Ret(-crate::mm::EFAULT);
        };
        self.wait_seq += 1;
        let k = self.cur;
        self.slots[k].saved = back;
        self.slots[k].run = Run::Waiting(Wait {
            key: SIGNAL_KEY,
            bitset: 0,
            deadline: None,
            since: ctx.now.saturating_add(self.timing.syscall_latency),
            seq: self.wait_seq,
            restart: false,
            fd: 0,
        });
        self.park(ctx);
        self.check_deadlock(ctx);
        Threaded::Away
    }

    /// Signals sent to the process go to a thread that does not block
    /// them: the one being serviced takes them as its call returns; another
    /// running one is interrupted, a waiting one's wait ends with EINTR.
    fn route_process_signals(&mut self) {
        let pending = self.proc.pending;
        if pending == 0 {
            return;
        }
        let n = self.slots.len();
        for i in 0..n {
            let j = (self.cur + i) % n;
            if self.slots[j].run == Run::Free {
                continue;
            }
            let mask = self.ts(j).sigmask;
            if pending & (!mask | sig::UNBLOCKABLE) != 0 {
                if j != self.cur || self.slots[j].run != Run::Running {
                    self.interrupt(j);
                }
                return;
            }
        }
    }

    /// tgkill/tkill to another thread of the process.
    fn kill_thread(&mut self, tid: u64, signo: u64) -> i64 {
        let Some(j) = (0..self.slots.len()).find(|&j| {
            j != self.cur && self.slots[j].run != Run::Free && u64::from(self.slots[j].t.tid) == tid
        }) else {
            return -crate::sys::ESRCH;
        };
        if signo > 64 {
            return -crate::mm::EINVAL;
        }
        if signo == 0 {
            return 0;
        }
        let signo = signo as i32;
        let act = self.proc.action(signo);
        let t = self.ts(j);
        if act.ignores(signo) && t.sigmask & bit(signo) == 0 {
            return 0;
        }
        t.pending |= bit(signo);
        if t.sigmask & bit(signo) == 0 {
            self.interrupt(j);
        }
        0
    }

    /// Thread `j` has a signal to take: a waiting thread's wait ends with
    /// EINTR, a running one is interrupted.
    fn interrupt(&mut self, j: usize) {
        match self.slots[j].run {
            Run::Waiting(w) => self.end_wait(j, w.since, -crate::sys::EINTR),
            Run::Running => self.raise(j, SIGNAL_VECTOR),
            Run::Ready | Run::Free => {}
        }
    }

    /// Every thread waits on a futex with no timeout and no timer can
    /// send a signal: nothing can ever wake them. The run ends, saying
    /// so, instead of idling to its time limit.
    fn check_deadlock(&mut self, ctx: &mut AccessCtx) {
        if self.ended || self.proc.itimer.is_some() {
            return;
        }
        let mut waits = Vec::new();
        for (j, s) in self.slots.iter().enumerate() {
            match s.run {
                Run::Free => {}
                Run::Waiting(w) if w.deadline.is_none() => {
                    let tid = if j == self.cur {
                        self.proc.t.tid
                    } else {
                        s.t.tid
                    };
                    let pipe = crate::pipe::parse_key(w.key);
                    let efd = crate::eventfd::parse_key(w.key);
                    // A restarting call's saved context is the call as made.
                    let call = s.saved.gprs[UserContext::RAX];
                    waits.push(if w.key == SIGNAL_KEY {
                        format!("thread {tid} waits for a signal")
                    } else if w.key == crate::pipe::POLL_KEY {
                        use crate::sys::nr;
                        match call {
                            nr::SELECT | nr::PSELECT6 => format!(
                                "thread {tid} waits in {} on descriptors below {} with no timeout",
                                call_name(call),
                                w.fd
                            ),
                            nr::EPOLL_WAIT | nr::EPOLL_PWAIT | nr::EPOLL_PWAIT2 => format!(
                                "thread {tid} waits in {} on the epoll instance at fd {} with no \
                                 timeout",
                                call_name(call),
                                w.fd
                            ),
                            _ => {
                                format!("thread {tid} polls {} descriptor(s) with no timeout", w.fd)
                            }
                        }
                    } else if let Some((_, writer)) = efd {
                        if writer {
                            format!(
                                "thread {tid} writes to the eventfd at fd {} (its counter would \
                                 pass 0xfffffffffffffffe)",
                                w.fd
                            )
                        } else {
                            format!(
                                "thread {tid} reads the eventfd at fd {} (its counter is 0)",
                                w.fd
                            )
                        }
                    } else if let Some((_, writer)) = pipe {
                        if writer {
                            format!("thread {tid} writes to the full pipe at fd {}", w.fd)
                        } else {
                            format!(
                                "thread {tid} reads from the empty pipe at fd {} (a write end is \
                                 open)",
                                w.fd
                            )
                        }
                    } else {
                        format!("thread {tid} on the futex at {:#x}", w.key)
                    });
                }
                _ => return,
            }
        }
        if waits.is_empty() {
            return;
        }
        self.end(
            ctx,
            128 + sig::SIGKILL,
            format!(
                "deadlock: every thread of the program waits with no timeout ({}), and no \
                 timer is armed: nothing can wake them; ended as SIGKILL would",
                waits.join(", ")
            ),
        );
    }

    /// A wake, signal or park interrupt reached CPU `self.cur` (its stub
    /// wrote `vector` to the fault doorbell): run what the CPU's thread
    /// should run next.
    fn kicked(&mut self, vector: u64, ctx: &mut AccessCtx) -> Tick {
        let k = self.cur;
        if matches!(vector, SIGNAL_VECTOR | WAKE_VECTOR) {
            if let Some(l) = &mut self.link {
                l.eoi(k);
            }
        }
        match self.slots[k].run {
            Run::Running => self.fault(vector, ctx),
            Run::Ready => {
                let mut uc = self.slots[k].saved;
                self.slots[k].run = Run::Running;
                if std::mem::take(&mut self.slots[k].restart) {
                    self.proc.expire(ctx.now);
                    if self.proc.next_signal().is_some() {
                        // A signal came with the wake: the call returns
                        // (EINTR or what it wrote) and the handler runs.
                        let v = Self::interrupted(&mut self.proc.t);
                        uc = Self::return_ctx(&uc, v).unwrap_or(uc);
                    } else {
                        self.slots[k].again = true;
                    }
                }
                if let Some(area) = self.slots[k].fpu.take() {
                    // A new thread starts with its parent's FP state; one
                    // this CPU refuses leaves the CPU's own.
                    let _ = ctx.set_fpu_state(&area);
                }
                self.proc.expire(ctx.now);
                if self.deliver_pending(ctx, &mut uc) {
                    self.resume(ctx, uc, "a wait");
                }
                0
            }
            Run::Free | Run::Waiting(_) => {
                // Back to idling (this interrupt's stub would halt with
                // interrupts off; the kernel stack starts over).
                self.park(ctx);
                0
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
        if vector == SIGNAL_VECTOR || vector == WAKE_VECTOR {
            // A signal is due (or the tables changed: resume reloads
            // them): delivered here unless the program was inside the
            // system-call entry (then at the call's return).
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
        let waits = self.slots.iter().filter_map(|s| match s.run {
            Run::Waiting(w) => w.deadline,
            _ => None,
        });
        self.proc
            .itimer
            .map(|(d, _)| d)
            .into_iter()
            .chain(waits)
            .min()
    }

    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        // Futex waits that timed out.
        for j in 0..self.slots.len() {
            if let Run::Waiting(w) = self.slots[j].run {
                if w.deadline.is_some_and(|d| d <= ctx.now) {
                    self.end_wait(j, ctx.now, -ETIMEDOUT);
                }
            }
        }
        self.proc.expire(ctx.now);
        // The timer's signal goes to a thread that does not block it: a
        // running one is interrupted and its CPU reports SIGNAL_VECTOR, a
        // waiting one's wait ends with EINTR; a signal every thread blocks
        // waits for the call that unblocks it.
        if self.live() == 1 && self.slots[self.cur].run == Run::Running {
            // One thread: as before threads, its CPU is interrupted.
            if self.proc.next_signal().is_some() {
                let k = self.cur;
                self.raise(k, SIGNAL_VECTOR);
            }
            return;
        }
        let pending = self.proc.pending;
        if pending == 0 {
            return;
        }
        let n = self.slots.len();
        for i in 0..n {
            let j = (self.cur + i) % n;
            if self.slots[j].run == Run::Free {
                continue;
            }
            let mask = self.ts(j).sigmask;
            if pending & (!mask | sig::UNBLOCKABLE) != 0 {
                self.interrupt(j);
                return;
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
        self.switch(ctx.cpu_index);
        match offset {
            SYSCALL_DOORBELL => self.syscall(ctx),
            FAULT_DOORBELL => {
                let v = data.first().copied().map_or(255, u64::from);
                // A CPU without a running thread: whatever it reports
                // (a wake, or the park page's #UD) is a wake.
                let idle = self.slots[self.cur].run != Run::Running;
                if idle || matches!(v, SIGNAL_VECTOR | WAKE_VECTOR) {
                    self.kicked(v, ctx)
                } else {
                    self.fault(v, ctx)
                }
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

#[cfg(test)]
mod tests {
    //! The thread machinery against a fake CPU and a fake interrupt link:
    //! clone, wake interrupts, futex wait/wake/timeout, exit with
    //! clear-child-tid, more threads than CPUs, deadlock.
    use super::*;
    use crate::elf::{self, ET_EXEC};
    use crate::process::ProcessConfig;
    use crate::sys::{nr, Files, Sink};
    use mem::CallArgs;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestAddress;

    const RAM: usize = 16 << 20;
    const RET: u64 = 0x40_0010;

    #[derive(Default)]
    struct Cpu {
        uc: UserContext,
        kernel: bool,
    }

    impl CallArgs for Cpu {
        fn call_args(&mut self) -> [u64; 6] {
            [0; 6]
        }
        fn user_context(&mut self) -> Option<UserContext> {
            Some(self.uc)
        }
        fn set_user_context(&mut self, c: &UserContext) -> bool {
            self.uc = *c;
            self.kernel = false;
            true
        }
        fn set_kernel_context(&mut self, c: &UserContext) -> bool {
            self.uc = *c;
            self.kernel = true;
            true
        }
        fn fpu_state(&mut self) -> Option<Vec<u8>> {
            Some(vec![0; 512])
        }
        fn set_fpu_state(&mut self, _: &[u8]) -> bool {
            true
        }
    }

    type Raised = Arc<Mutex<Vec<(usize, u8)>>>;

    struct Link(Raised);

    impl CpuLink for Link {
        fn raise(&mut self, cpu: usize, vector: u8) {
            self.0.lock().unwrap().push((cpu, vector));
        }
        fn eoi(&mut self, _cpu: usize) {}
    }

    fn device(cpus: usize) -> (SeDevice, Raised) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest RAM");
        let image = elf::tests::tiny(ET_EXEC, 0x40_0000, &[0xf4; 64], &[]);
        let e = elf::parse(&image, "tiny").unwrap();
        let cfg = ProcessConfig {
            path: "/tiny".into(),
            argv: vec!["tiny".into()],
            envp: vec![],
            seed: 1,
            hwcap: 0,
            paths: Default::default(),
            interp: None,
            cpus,
        };
        let sink = || Sink {
            echo: None,
            log: None,
        };
        let files = Files::stdio(false, sink(), sink());
        let (p, _) =
            Process::load(&mem, &[(0, RAM as u64)], &image, &e, &cfg, &[0; 10], files).unwrap();
        let timing = Timing {
            syscall_latency: 1_000_000,
            fault_latency: 1_000_000,
            realtime_base_ns: 0,
        };
        let mut stats = Stats::new();
        let mut d = SeDevice::new(p, mem, timing, &mut stats, "system.se").unwrap();
        let raised = Raised::default();
        d.set_link(Box::new(Link(raised.clone())));
        (d, raised)
    }

    /// Writes `vector` to the fault doorbell (or, with `call`, makes the
    /// system call in the CPU's registers) from CPU `index` at `now`.
    fn bell(d: &mut SeDevice, cpu: &mut Cpu, index: usize, now: Tick, call: bool) -> Vec<Request> {
        let mut reqs = Vec::new();
        let mut ctx = AccessCtx {
            now,
            cpu: Some(cpu),
            requests: &mut reqs,
            cpu_index: index,
        };
        if call {
            d.write(Space::Mmio, SYSCALL_DOORBELL, &[0; 4], &mut ctx);
        } else {
            d.write(Space::Mmio, FAULT_DOORBELL, &[WAKE_VECTOR as u8], &mut ctx);
        }
        reqs
    }

    /// System call `n` with `args` from CPU `index`; the context after it.
    fn call(
        d: &mut SeDevice,
        cpu: &mut Cpu,
        index: usize,
        now: Tick,
        n: u64,
        a: &[u64],
    ) -> Vec<Request> {
        let mut g = [0u64; 16];
        g[UserContext::RAX] = n;
        for (i, r) in [
            UserContext::RDI,
            UserContext::RSI,
            UserContext::RDX,
            UserContext::R10,
            UserContext::R8,
            UserContext::R9,
        ]
        .iter()
        .enumerate()
        {
            g[*r] = a.get(i).copied().unwrap_or(0);
        }
        g[UserContext::RCX] = RET;
        g[UserContext::R11] = 0x202;
        g[UserContext::RSP] = STACK_TOP - 0x100;
        cpu.uc = UserContext {
            gprs: g,
            rip: ENTRY_VA + 6,
            rflags: 0x2,
            cpl: 3,
            ..Default::default()
        };
        bell(d, cpu, index, now, true)
    }

    fn rax(cpu: &Cpu) -> i64 {
        cpu.uc.gprs[UserContext::RAX] as i64
    }

    fn word(d: &mut SeDevice, at: u64) -> u32 {
        let mut b = [0u8; 4];
        d.proc.space.read_user(&d.mem, at, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn set_word(d: &mut SeDevice, at: u64, v: u32) {
        d.proc
            .space
            .write_user(&d.mem, at, &v.to_le_bytes())
            .unwrap();
    }

    const PTHREAD_FLAGS: u64 = 0x3d0f00; // glibc's pthread_create

    #[test]
    fn threads_wait_and_wake_across_cpus() {
        let (mut d, raised) = device(2);
        let (mut c0, mut c1) = (Cpu::default(), Cpu::default());
        let data = STACK_TOP - 0x2000;
        let (ptid, ctid, futex) = (data, data + 8, data + 16);
        let stack = STACK_TOP - 0x10_0000;
        // clone: the child's id back in the parent and at ptid, a wake
        // interrupt raised at CPU 1.
        call(
            &mut d,
            &mut c0,
            0,
            1000,
            nr::CLONE,
            &[PTHREAD_FLAGS, stack, ptid, ctid, 0x7000_0000],
        );
        assert_eq!(rax(&c0), 1001);
        assert_eq!(c0.uc.rip, RET);
        assert_eq!(word(&mut d, ptid), 1001);
        assert_eq!(raised.lock().unwrap().as_slice(), &[(1, WAKE_VECTOR as u8)]);
        // CPU 1's wake starts the child: the call's return with RAX 0, its
        // own stack and TLS.
        bell(&mut d, &mut c1, 1, 2000, false);
        assert!(!c1.kernel);
        assert_eq!((rax(&c1), c1.uc.rip), (0, RET));
        assert_eq!(c1.uc.gprs[UserContext::RSP], stack);
        assert_eq!(c1.uc.fs_base, 0x7000_0000);
        call(&mut d, &mut c1, 1, 3000, nr::GETTID, &[]);
        assert_eq!(rax(&c1), 1001);
        call(&mut d, &mut c0, 0, 3000, nr::GETTID, &[]);
        assert_eq!(rax(&c0), 1000);

        // WAIT on a word that changed: EAGAIN; on the expected value: the
        // CPU parks (kernel mode, idle loop, its own kernel stack).
        set_word(&mut d, futex, 5);
        call(&mut d, &mut c0, 0, 4000, nr::FUTEX, &[futex, 128, 4]);
        assert_eq!(rax(&c0), -crate::sys::EAGAIN);
        call(&mut d, &mut c0, 0, 5000, nr::FUTEX, &[futex, 128, 5]);
        assert!(c0.kernel);
        assert_eq!(c0.uc.rip, IDLE_VA);
        assert_eq!(c0.uc.gprs[UserContext::RSP], kstack_top(0));
        assert_eq!(c0.uc.rflags & 0x200, 0x200, "interrupts enabled");
        // A wake interrupt with nothing to run parks it again.
        bell(&mut d, &mut c0, 0, 5500, false);
        assert!(c0.kernel);
        // WAKE_BITSET with a disjoint bitset wakes nobody; WAKE wakes it.
        raised.lock().unwrap().clear();
        call(
            &mut d,
            &mut c1,
            1,
            6000,
            nr::FUTEX,
            &[futex, 128 | 10, 1, 0, 0, 0],
        );
        assert_eq!(rax(&c1), -crate::mm::EINVAL, "bitset 0");
        call(
            &mut d,
            &mut c1,
            1,
            6000,
            nr::FUTEX,
            &[futex, 128 | 10, 1, 0, 0, 2],
        );
        assert_eq!(rax(&c1), 1, "WAIT is WAIT_BITSET with every bit");
        // ... so that one woke it: wait again and wake with WAKE.
        bell(&mut d, &mut c0, 0, 6500, false);
        assert_eq!(rax(&c0), 0);
        call(
            &mut d,
            &mut c0,
            0,
            7000,
            nr::FUTEX,
            &[futex, 128 | 9, 5, 0, 0, 1],
        );
        assert!(c0.kernel);
        call(
            &mut d,
            &mut c1,
            1,
            8000,
            nr::FUTEX,
            &[futex, 128 | 10, 1, 0, 0, 2],
        );
        assert_eq!(rax(&c1), 0, "disjoint bitsets");
        raised.lock().unwrap().clear();
        call(
            &mut d,
            &mut c1,
            1,
            3_000_000,
            nr::FUTEX,
            &[futex, 128 | 1, 10],
        );
        assert_eq!(rax(&c1), 1);
        assert_eq!(raised.lock().unwrap().as_slice(), &[(0, WAKE_VECTOR as u8)]);
        bell(&mut d, &mut c0, 0, 3_100_000, false);
        assert!(!c0.kernel);
        assert_eq!((rax(&c0), c0.uc.rip), (0, RET));
        // Waits from each call's end to its wake.
        let first = 6000u64.saturating_sub(5000 + 1_000_000);
        let second = 3_000_000 - (7000 + 1_000_000);
        assert_eq!(d.cpu_wait_ticks.get(0), first + second);

        // A relative timeout of 1 ms: the deadline is the device's; at it
        // the wait ends with ETIMEDOUT.
        let ts = data + 64;
        d.proc
            .space
            .write_user(
                &d.mem,
                ts,
                &[0u64.to_le_bytes(), 1_000_000u64.to_le_bytes()].concat(),
            )
            .unwrap();
        let now = 10_000_000;
        call(&mut d, &mut c0, 0, now, nr::FUTEX, &[futex, 0, 5, ts]);
        assert!(c0.kernel);
        let due = now + 1_000_000_000;
        assert_eq!(mem::TimedDevice::next_deadline(&d), Some(due));
        let mut reqs = Vec::new();
        mem::TimedDevice::on_deadline(&mut d, &mut AccessCtx::new(due, &mut reqs));
        bell(&mut d, &mut c0, 0, due + 10, false);
        assert_eq!(rax(&c0), -ETIMEDOUT);
        assert_eq!(mem::TimedDevice::next_deadline(&d), None);

        // pthread_join: CPU 0 waits on the child's tid word; the child's
        // exit zeroes it and wakes CPU 0; CPU 1 parks, free again.
        set_word(&mut d, ctid, 1001);
        call(&mut d, &mut c0, 0, due + 20, nr::FUTEX, &[ctid, 0, 1001]);
        assert!(c0.kernel);
        let reqs = call(&mut d, &mut c1, 1, due + 30, nr::EXIT, &[0]);
        assert!(reqs.is_empty(), "one thread's exit ends nothing: {reqs:?}");
        assert!(c1.kernel);
        assert_eq!(word(&mut d, ctid), 0);
        bell(&mut d, &mut c0, 0, due + 40, false);
        assert_eq!(rax(&c0), 0);
        assert_eq!(d.live(), 1);

        // A new thread takes the free CPU; one more finds none: EAGAIN.
        call(
            &mut d,
            &mut c0,
            0,
            due + 50,
            nr::CLONE,
            &[PTHREAD_FLAGS, stack, ptid, ctid, 0],
        );
        assert_eq!(rax(&c0), 1002);
        call(
            &mut d,
            &mut c0,
            0,
            due + 60,
            nr::CLONE,
            &[PTHREAD_FLAGS, stack, ptid, ctid, 0],
        );
        assert_eq!(rax(&c0), -crate::sys::EAGAIN);
        // fork (no CLONE_VM) is not a thread: EAGAIN too.
        call(
            &mut d,
            &mut c0,
            0,
            due + 60,
            nr::CLONE,
            &[0x1200011, 0, 0, ctid, 0],
        );
        assert_eq!(rax(&c0), -crate::sys::EAGAIN);
        bell(&mut d, &mut c1, 1, due + 70, false);
        call(&mut d, &mut c1, 1, due + 80, nr::GETTID, &[]);
        assert_eq!(rax(&c1), 1002);

        // Both threads wait forever: the run ends, naming the waits.
        let reqs = call(&mut d, &mut c0, 0, due + 90, nr::FUTEX, &[futex, 128, 5]);
        assert!(reqs.is_empty());
        let reqs = call(&mut d, &mut c1, 1, due + 100, nr::FUTEX, &[futex, 128, 5]);
        match reqs.as_slice() {
            [Request::ProcessExit {
                code: 137, message, ..
            }] => {
                assert!(message.contains("deadlock"), "{message}");
                assert!(message.contains("thread 1002 on the futex at"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A pipe between two threads on two CPUs: a read of the empty pipe
    /// parks its CPU, a write from the other CPU wakes it and the read is
    /// made again from the entry; a write larger than the pipe waits for
    /// the reader and returns all of it; two threads waiting on empty
    /// pipes are a deadlock, named.
    #[test]
    fn pipe_waits_park_and_are_made_again() {
        let (mut d, raised) = device(2);
        let (mut c0, mut c1) = (Cpu::default(), Cpu::default());
        let data = STACK_TOP - 0x4_0000;
        let stack = STACK_TOP - 0x10_0000;
        call(
            &mut d,
            &mut c0,
            0,
            1000,
            nr::CLONE,
            &[PTHREAD_FLAGS, stack, data, data + 8, 0],
        );
        bell(&mut d, &mut c1, 1, 2000, false);
        call(&mut d, &mut c0, 0, 3000, nr::PIPE2, &[data + 16, 0]);
        assert_eq!(rax(&c0), 0);
        let (r, w) = (
            u64::from(word(&mut d, data + 16)),
            u64::from(word(&mut d, data + 20)),
        );
        let buf = data + 0x1000;
        call(&mut d, &mut c0, 0, 4000, nr::READ, &[r, buf, 100]);
        assert!(c0.kernel, "the reader's CPU parks");
        assert_eq!(c0.uc.rip, IDLE_VA);
        raised.lock().unwrap().clear();
        d.proc
            .space
            .write_user(&d.mem, buf + 0x100, b"hello")
            .unwrap();
        call(&mut d, &mut c1, 1, 5000, nr::WRITE, &[w, buf + 0x100, 5]);
        assert_eq!(rax(&c1), 5);
        assert_eq!(raised.lock().unwrap().as_slice(), &[(0, WAKE_VECTOR as u8)]);
        // The wake puts the call back at the entry, as it was made.
        bell(&mut d, &mut c0, 0, 6000, false);
        assert!(!c0.kernel);
        assert_eq!(c0.uc.rip, ENTRY_VA);
        assert_eq!(c0.uc.gprs[UserContext::RAX], nr::READ);
        assert_eq!(c0.uc.gprs[UserContext::RDI], r);
        bell(&mut d, &mut c0, 0, 6500, true);
        assert_eq!((rax(&c0), c0.uc.rip), (5, RET));
        let mut b = [0u8; 5];
        d.proc.space.read_user(&d.mem, buf, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert!(!d.slots[0].again);
        // 100 KiB into a 64 KiB pipe: the writer waits with 64 KiB in;
        // a read of 64 KiB wakes it, and its call, made again, writes the
        // rest and returns the whole count.
        let big = 100 << 10;
        call(&mut d, &mut c1, 1, 7000, nr::WRITE, &[w, buf, big]);
        assert!(c1.kernel, "the writer's CPU parks");
        assert_eq!(d.ts(1).pipe_done, 64 << 10);
        call(&mut d, &mut c0, 0, 8000, nr::READ, &[r, buf, 1 << 20]);
        assert_eq!(rax(&c0), 64 << 10);
        bell(&mut d, &mut c1, 1, 9000, false);
        assert_eq!(c1.uc.rip, ENTRY_VA);
        bell(&mut d, &mut c1, 1, 9500, true);
        assert_eq!(rax(&c1), big as i64);
        assert_eq!(d.ts(1).pipe_done, 0);
        call(&mut d, &mut c0, 0, 10_000, nr::READ, &[r, buf, 1 << 20]);
        assert_eq!(rax(&c0), (36 << 10) as i64);
        // A signal for a waiting reader ends its wait with EINTR.
        call(&mut d, &mut c0, 0, 11_000, nr::READ, &[r, buf, 1]);
        assert!(c0.kernel);
        call(
            &mut d,
            &mut c1,
            1,
            12_000,
            nr::TGKILL,
            &[u64::from(crate::sys::PID), 1000, 10],
        );
        assert_eq!(d.slots[0].run, Run::Ready);
        assert_eq!(
            d.slots[0].saved.gprs[UserContext::RAX] as i64,
            -crate::sys::EINTR
        );
        assert_eq!(d.slots[0].saved.rip, RET);
        d.proc.t.pending = 0;
        d.slots[0].t.pending = 0;
        bell(&mut d, &mut c0, 0, 12_500, false);
        // Both threads read empty pipes: nothing can wake them.
        call(&mut d, &mut c0, 0, 13_000, nr::READ, &[r, buf, 1]);
        assert!(!d.ended);
        let reqs = call(&mut d, &mut c1, 1, 14_000, nr::READ, &[r, buf, 1]);
        assert!(d.ended);
        let msg = reqs
            .iter()
            .find_map(|q| match q {
                Request::ProcessExit {
                    code: 137, message, ..
                } => Some(message.clone()),
                _ => None,
            })
            .expect("ended as SIGKILL");
        assert!(
            msg.contains(&format!("thread 1000 reads from the empty pipe at fd {r}"))
                && msg.contains("thread 1001 reads from the empty pipe"),
            "{msg}"
        );
    }

    /// An eventfd read and an epoll_wait park their CPU and are made again
    /// when the other CPU writes the eventfd; a select whose timeout ends
    /// within the call is made again at once and empties its sets; the
    /// waits are counted apart from pipe waits and named in a deadlock.
    #[test]
    fn eventfd_epoll_and_select_waits_park_and_are_made_again() {
        let (mut d, raised) = device(2);
        let (mut c0, mut c1) = (Cpu::default(), Cpu::default());
        let data = STACK_TOP - 0x4_0000;
        let stack = STACK_TOP - 0x10_0000;
        call(
            &mut d,
            &mut c0,
            0,
            1000,
            nr::CLONE,
            &[PTHREAD_FLAGS, stack, data, data + 8, 0],
        );
        bell(&mut d, &mut c1, 1, 2000, false);
        call(&mut d, &mut c0, 0, 3000, nr::EVENTFD2, &[0, 0]);
        let efd = rax(&c0) as u64;
        call(&mut d, &mut c0, 0, 3100, nr::EPOLL_CREATE1, &[0]);
        let ep = rax(&c0) as u64;
        assert_eq!((efd, ep), (3, 4));
        let (ev, buf, out) = (data + 0x100, data + 0x200, data + 0x300);
        let mut e = crate::epoll::EPOLLIN.to_le_bytes().to_vec();
        e.extend_from_slice(&7u64.to_le_bytes());
        d.proc.space.write_user(&d.mem, ev, &e).unwrap();
        call(&mut d, &mut c0, 0, 3200, nr::EPOLL_CTL, &[ep, 1, efd, ev]);
        assert_eq!(rax(&c0), 0);
        // A read of 0 parks; a write from CPU 1 wakes it; made again, it
        // reads what was written.
        call(&mut d, &mut c0, 0, 4000, nr::READ, &[efd, buf, 8]);
        assert!(c0.kernel, "the reader's CPU parks");
        assert_eq!(d.eventfd_waits.get(), 1);
        raised.lock().unwrap().clear();
        d.proc
            .space
            .write_user(&d.mem, buf + 8, &2u64.to_le_bytes())
            .unwrap();
        call(&mut d, &mut c1, 1, 5000, nr::WRITE, &[efd, buf + 8, 8]);
        assert_eq!(rax(&c1), 8);
        assert_eq!(raised.lock().unwrap().as_slice(), &[(0, WAKE_VECTOR as u8)]);
        bell(&mut d, &mut c0, 0, 6000, false);
        assert_eq!(
            (c0.uc.rip, c0.uc.gprs[UserContext::RAX]),
            (ENTRY_VA, nr::READ)
        );
        bell(&mut d, &mut c0, 0, 6500, true);
        assert_eq!((rax(&c0), c0.uc.rip), (8, RET));
        assert_eq!(u64::from(word(&mut d, buf)), 2);
        // epoll_wait with no timeout parks on the poll key; the eventfd's
        // write wakes it.
        call(
            &mut d,
            &mut c0,
            0,
            7000,
            nr::EPOLL_WAIT,
            &[ep, out, 4, u64::MAX],
        );
        assert!(c0.kernel);
        assert_eq!(d.poll_waits.get(), 1);
        raised.lock().unwrap().clear();
        call(&mut d, &mut c1, 1, 8000, nr::WRITE, &[efd, buf + 8, 8]);
        assert_eq!(raised.lock().unwrap().as_slice(), &[(0, WAKE_VECTOR as u8)]);
        bell(&mut d, &mut c0, 0, 9000, false);
        bell(&mut d, &mut c0, 0, 9500, true);
        assert_eq!(rax(&c0), 1);
        assert_eq!(word(&mut d, out), crate::epoll::EPOLLIN);
        assert_eq!(word(&mut d, out + 4), 7);
        call(&mut d, &mut c0, 0, 10_000, nr::READ, &[efd, buf, 8]);
        assert_eq!(rax(&c0), 8);
        // select for 1 us, the call's own latency: not parked, made again
        // at once; then it returns 0 with its set emptied and no time left.
        let (rs, tv) = (data + 0x400, data + 0x500);
        set_word(&mut d, rs, 1 << efd);
        d.proc
            .space
            .write_user(
                &d.mem,
                tv,
                &[0u64.to_le_bytes(), 1u64.to_le_bytes()].concat(),
            )
            .unwrap();
        call(
            &mut d,
            &mut c0,
            0,
            11_000,
            nr::SELECT,
            &[efd + 1, rs, 0, 0, tv],
        );
        assert!(!c0.kernel, "not parked");
        assert_eq!(
            (c0.uc.rip, c0.uc.gprs[UserContext::RAX]),
            (ENTRY_VA, nr::SELECT)
        );
        assert_eq!(word(&mut d, rs), 1 << efd, "the set as given");
        bell(&mut d, &mut c0, 0, 11_000 + 1_000_000, true);
        assert_eq!((rax(&c0), c0.uc.rip), (0, RET));
        assert_eq!((word(&mut d, rs), word(&mut d, tv + 8)), (0, 0));
        assert_eq!(d.pipe_waits.get(), 0, "no pipe waited");
        // Both threads wait with no timeout: the eventfd read and the
        // epoll wait are named.
        call(&mut d, &mut c0, 0, 2_000_000, nr::READ, &[efd, buf, 8]);
        assert!(!d.ended);
        let reqs = call(
            &mut d,
            &mut c1,
            1,
            2_100_000,
            nr::EPOLL_WAIT,
            &[ep, out, 4, u64::MAX],
        );
        assert!(d.ended);
        let msg = reqs
            .iter()
            .find_map(|q| match q {
                Request::ProcessExit {
                    code: 137, message, ..
                } => Some(message.clone()),
                _ => None,
            })
            .expect("ended as SIGKILL");
        assert!(
            msg.contains("thread 1000 reads the eventfd at fd 3 (its counter is 0)")
                && msg.contains(
                    "thread 1001 waits in epoll_wait on the epoll instance at fd 4 with no timeout"
                ),
            "{msg}"
        );
        // One thread in select with nothing to wait for.
        let (mut d, _) = device(1);
        let mut c0 = Cpu::default();
        let reqs = call(&mut d, &mut c0, 0, 1000, nr::SELECT, &[0, 0, 0, 0, 0]);
        assert!(
            reqs.iter().any(|q| matches!(q, Request::ProcessExit { message, .. }
                if message.contains("thread 1000 waits in select on descriptors below 0 with no timeout"))),
            "{reqs:?}"
        );
    }

    #[test]
    fn tgkill_to_a_waiting_thread_ends_its_wait_with_eintr() {
        let (mut d, _raised) = device(2);
        let (mut c0, mut c1) = (Cpu::default(), Cpu::default());
        let futex = STACK_TOP - 0x2000;
        let tids = futex + 64;
        call(
            &mut d,
            &mut c0,
            0,
            1000,
            nr::CLONE,
            &[PTHREAD_FLAGS, STACK_TOP - 0x10_0000, tids, tids, 0],
        );
        assert_eq!(rax(&c0), 1001);
        bell(&mut d, &mut c1, 1, 2000, false);
        call(&mut d, &mut c1, 1, 3000, nr::FUTEX, &[futex, 128, 0]);
        assert!(c1.kernel);
        // No such thread: ESRCH. A signal the thread blocks leaves its
        // wait alone; one it does not block ends it with EINTR.
        call(
            &mut d,
            &mut c0,
            0,
            4000,
            nr::TGKILL,
            &[u64::from(crate::sys::PID), 4242, 10],
        );
        assert_eq!(rax(&c0), -crate::sys::ESRCH);
        d.slots[1].t.sigmask = bit(sig::SIGUSR1);
        call(
            &mut d,
            &mut c0,
            0,
            4000,
            nr::TGKILL,
            &[u64::from(crate::sys::PID), 1001, 10],
        );
        assert_eq!(rax(&c0), 0);
        assert!(
            matches!(d.slots[1].run, Run::Waiting(_)),
            "blocked: still waiting"
        );
        d.slots[1].t.sigmask = 0;
        d.slots[1].t.pending = 0;
        call(
            &mut d,
            &mut c0,
            0,
            5000,
            nr::TGKILL,
            &[u64::from(crate::sys::PID), 1001, 10],
        );
        assert_eq!(d.slots[1].run, Run::Ready);
        assert_eq!(
            d.slots[1].saved.gprs[UserContext::RAX] as i64,
            -crate::sys::EINTR
        );
    }
}
