//! The SE device: the doorbells the kernel stub writes, in kvmsim's bus.

use std::collections::BTreeSet;

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space, UserContext};
use sim::stats::StatsError;
use sim::{Counter, Request, Stats, Tick, Vector};
use vm_memory::GuestMemoryMmap;

use crate::mm::{PhysMem, PAGE, PROT_EXEC, PROT_READ, PROT_WRITE};
use crate::process::Process;
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
    reported: BTreeSet<u64>,
    last_fault: (u64, u64, u32),
    ended: bool,
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
            reported: BTreeSet::new(),
            last_fault: (0, 0, 0),
            ended: false,
        })
    }

    fn end(&mut self, ctx: &mut AccessCtx, status: i32, message: String) {
        self.ended = true;
        ctx.requests.push(Request::ProcessExit {
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
        let Some(mut uc) = ctx.user_context() else {
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
        let done = match self.proc.syscall(&self.mem, nr, args, clock) {
            Some(d) => d,
            None => {
                self.unsupported.inc();
                if self.reported.insert(nr) {
                    tracing::warn!(
                        "SE: unsupported system call {} ({nr}): it returns ENOSYS",
                        call_name(nr)
                    );
                }
                Done {
                    flow: Flow::Return(-crate::sys::ENOSYS),
                    sleep: 0,
                }
            }
        };
        let took = self.timing.syscall_latency.saturating_add(done.sleep);
        self.calls.add(cell(nr), 1);
        self.ticks.add(cell(nr), took);
        match done.flow {
            Flow::Exit { status, message } => {
                self.end(ctx, status, message);
            }
            Flow::Return(v) => {
                let back = g[UserContext::RCX];
                if back >= USER_TOP {
                    self.end(ctx, 128 + 11, format!("SIGSEGV: system call {} returns to {back:#x}, outside user space (RCX was not set by syscall)", call_name(nr)));
                    return took;
                }
                // sysretq: RIP = RCX, RFLAGS = R11 (RF and VM cleared).
                uc.gprs[UserContext::RAX] = v as u64;
                uc.rip = back;
                uc.rflags = (g[UserContext::R11] & 0x3c_7fd7) | 0x2;
                uc.fs_base = self.proc.fs_base;
                uc.cr3 = self.cr3();
                if !ctx.set_user_context(&uc) {
                    self.end(
                        ctx,
                        128 + 11,
                        "SE mode: the CPU cannot return from a system call".into(),
                    );
                }
            }
        }
        took
    }

    fn fault(&mut self, vector: u64, ctx: &mut AccessCtx) -> Tick {
        let Some(mut uc) = ctx.user_context() else {
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
                            return self.signal(ctx, 11, format!("page fault at address {addr:#x} that repeats although the page is mapped, at rip {rip:#x}"));
                        }
                    }
                    Err(_) => {
                        return self.signal(ctx, 7, format!("out of guest memory mapping address {addr:#x} at rip {rip:#x} (raise --memory)"));
                    }
                }
                uc.rip = rip;
                uc.gprs[UserContext::RSP] = rsp;
                uc.rflags = (rflags & 0x3c_7fd7) | 0x2;
                uc.fs_base = self.proc.fs_base;
                uc.cr3 = self.cr3();
                if !ctx.set_user_context(&uc) {
                    self.end(
                        ctx,
                        128 + 11,
                        "SE mode: the CPU cannot return from a page fault".into(),
                    );
                }
                return latency;
            }
            let what = if fetch {
                "execute"
            } else if write {
                "write"
            } else {
                "read"
            };
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
            return self.signal(
                ctx,
                11,
                format!("invalid {what} at address {addr:#x} ({why}) at rip {rip:#x}"),
            );
        }
        let (sig, what) = match vector {
            0 => (8, "divide error (#DE)"),
            1 => (5, "debug exception (#DB)"),
            3 => (5, "breakpoint (int3)"),
            4 => (11, "overflow (#OF)"),
            5 => (11, "bound range exceeded (#BR)"),
            6 => (4, "invalid opcode (#UD)"),
            7 => (8, "device not available (#NM)"),
            12 => (7, "stack-segment fault (#SS)"),
            13 => (11, "general protection fault (#GP: a privileged instruction or a non-canonical address)"),
            16 => (8, "x87 floating-point exception (#MF)"),
            17 => (7, "alignment check (#AC)"),
            19 => (8, "SIMD floating-point exception (#XM)"),
            _ => (11, "exception"),
        };
        self.signal(
            ctx,
            sig,
            format!("{what}, vector {vector}, error code {err:#x}, at rip {rip:#x}"),
        )
    }

    fn signal(&mut self, ctx: &mut AccessCtx, sig: i32, detail: String) -> Tick {
        self.end(
            ctx,
            128 + sig,
            format!(
                "the program was killed by {} ({sig}): {detail}; exit status {} (signal delivery to handlers is not supported yet)",
                signal_name(sig),
                128 + sig
            ),
        );
        0
    }

    /// The process (tests, reports).
    pub fn process(&self) -> &Process {
        &self.proc
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
