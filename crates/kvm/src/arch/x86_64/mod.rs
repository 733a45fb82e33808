//! x86-64 architecture support: thread context with lazy synchronisation,
//! direct 64-bit boot, filtered CPUID and the register dump.

pub mod boot;
pub mod cpuid;
pub mod emulate;
pub mod guest_debug;
pub mod paging;
pub mod syscall_repair;

use std::fmt::Write as _;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs};
use sim::intr::{InterruptController, Pending};

use super::{Arch, BreakKind, DebugOutcome, DebugStop, Delivery, Stepper};
use crate::probe::WindowAssist;
use crate::vcpu::{DebugExit, Vcpu, XsaveArea};
use crate::{KvmError, Result};

/// The most entries single-stepped in one wait for an interrupt window
/// ([`X86_64::assist_window`]; a handler that prints with IF clear, as
/// kvm-unit-tests' do, takes thousands): a guest that keeps interrupts off longer
/// (early boot, a long critical section) runs at full speed again, and the
/// interrupt waits for the next exit with IF set, as without the assist.
pub const WINDOW_STEP_LIMIT: u64 = 20_000;

/// The MSRs kept in the thread context (those a bare-metal or Linux guest
/// sets up; KVM holds the rest).
pub const CONTEXT_MSRS: &[(u32, &str)] = &[
    (0x10, "TSC"),
    (0x174, "SYSENTER_CS"),
    (0x175, "SYSENTER_ESP"),
    (0x176, "SYSENTER_EIP"),
    (0x277, "PAT"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0xc000_0103, "TSC_AUX"),
];

/// One cached part of the context.
#[derive(Debug, Default)]
struct Part<T> {
    value: T,
    /// The cached value matches KVM's (or is newer).
    valid: bool,
    /// The cached value is newer than KVM's and must be pushed.
    dirty: bool,
}

impl<T> Part<T> {
    fn get(&mut self, pull: impl FnOnce() -> Result<T>) -> Result<&mut T> {
        if !self.valid {
            self.value = pull()?;
            self.valid = true;
        }
        Ok(&mut self.value)
    }
}

/// The x86-64 side of a KVM CPU: the thread context, cached part by part.
#[derive(Default)]
pub struct X86_64 {
    regs: Part<kvm_regs>,
    sregs: Part<kvm_sregs>,
    xsave: Part<Option<XsaveArea>>,
    xcrs: Part<kvm_xcrs>,
    events: Part<kvm_vcpu_events>,
    msrs: Part<Vec<(u32, u64)>>,
    /// CR8 as given to KVM at the last entry.
    cr8_entry: u64,
    /// The SYSCALL-entry repair, when enabled.
    repair: Option<syscall_repair::Repair>,
    /// Every user's guest-debug wishes, merged (written before each entry).
    debug: guest_debug::GuestDebug,
    /// Stepping over a PC event's instruction: its slot (suspended) and
    /// address. No interrupt is injected meanwhile (a handler entered
    /// before the instruction ran would return to it and fire it again).
    pc_step: Option<(usize, u64)>,
    /// CR2 at the previous trace line (a change marks a page fault).
    trace_cr2: Option<u64>,
    /// Guest memory, for reading what the guest's registers point at.
    mem: Option<vm_memory::GuestMemoryMmap>,
    /// The host's KVM ignores guest TSC writes (found, and said, once).
    tsc_writes_ignored: bool,
    /// How to find the guest's interrupt window on a host whose KVM does
    /// not exit there (see [`X86_64::assist_window`]).
    window_assist: WindowAssist,
    /// Entries single-stepped in the current wait for a window.
    window_steps: u64,
}

impl std::fmt::Debug for X86_64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X86_64")
            .field("repair", &self.repair)
            .finish_non_exhaustive()
    }
}

macro_rules! part_accessors {
    ($get:ident, $get_mut:ident, $field:ident, $ty:ty, $pull:expr) => {
        #[doc = concat!("The `", stringify!($field), "` part of the context, pulled from KVM if stale.")]
        pub fn $get(&mut self, vcpu: &mut dyn Vcpu) -> Result<&$ty> {
            self.$field.get(|| $pull(&*vcpu)).map(|r| &*r)
        }

        #[doc = concat!("The `", stringify!($field), "` part for modification; pushed before the next entry.")]
        pub fn $get_mut(&mut self, vcpu: &mut dyn Vcpu) -> Result<&mut $ty> {
            self.$get(vcpu)?;
            self.$field.dirty = true;
            Ok(&mut self.$field.value)
        }
    };
}

fn pull_xsave(vcpu: &dyn Vcpu) -> Result<Option<XsaveArea>> {
    vcpu.xsave()
}

fn pull_xcrs(vcpu: &dyn Vcpu) -> Result<kvm_xcrs> {
    vcpu.xcrs()
}

fn pull_events(vcpu: &dyn Vcpu) -> Result<kvm_vcpu_events> {
    vcpu.events()
}

fn pull_msrs(vcpu: &dyn Vcpu) -> Result<Vec<(u32, u64)>> {
    let indices: Vec<u32> = CONTEXT_MSRS.iter().map(|&(i, _)| i).collect();
    vcpu.msrs(&indices)
}

/// Reads one MSR of the vCPU.
fn get_msr(vcpu: &dyn Vcpu, index: u32) -> Result<u64> {
    vcpu.msrs(&[index])?
        .first()
        .map(|&(_, v)| v)
        .ok_or_else(|| KvmError::Setup(format!("KVM does not know MSR {index:#x}")))
}

/// Writes one MSR of the vCPU.
fn set_msr(vcpu: &mut dyn Vcpu, index: u32, data: u64) -> Result<()> {
    vcpu.set_msrs(&[(index, data)]).map(|_| ())
}

impl X86_64 {
    /// Puts `ctx` in the CPU with code selector `cs` and stack selector
    /// `ds` (kvmsim's user or kernel pair), before the next entry.
    fn set_context(
        &mut self,
        vcpu: &mut dyn Vcpu,
        ctx: &mem::UserContext,
        cs: u16,
        ds: u16,
    ) -> Result<bool> {
        let g = ctx.gprs;
        let regs = self.regs_mut(vcpu)?;
        (regs.rax, regs.rbx, regs.rcx, regs.rdx) = (g[0], g[1], g[2], g[3]);
        (regs.rsi, regs.rdi, regs.rbp, regs.rsp) = (g[4], g[5], g[6], g[7]);
        (regs.r8, regs.r9, regs.r10, regs.r11) = (g[8], g[9], g[10], g[11]);
        (regs.r12, regs.r13, regs.r14, regs.r15) = (g[12], g[13], g[14], g[15]);
        regs.rip = ctx.rip;
        regs.rflags = ctx.rflags;
        let sr = self.sregs(vcpu)?;
        let user = sr.cs.selector == cs
            && sr.ss.selector == ds
            && sr.fs.base == ctx.fs_base
            && sr.gs.base == ctx.gs_base
            && sr.cr3 == ctx.cr3;
        // The special registers are pushed (KVM_SET_SREGS) only when they
        // change: a system call that leaves them alone costs no extra ioctl.
        if !user {
            let gdt = boot::gdt();
            let sr = self.sregs_mut(vcpu)?;
            sr.cs = boot::segment_from_entry(cs, gdt[usize::from(cs / 8)]);
            sr.ss = boot::segment_from_entry(ds, gdt[usize::from(ds / 8)]);
            sr.fs.base = ctx.fs_base;
            sr.gs.base = ctx.gs_base;
            sr.cr3 = ctx.cr3;
        }
        Ok(true)
    }

    pub fn new() -> Self {
        Self::default()
    }

    /// General registers, pulled from KVM if stale.
    pub fn regs(&mut self, vcpu: &mut dyn Vcpu) -> Result<&kvm_regs> {
        self.regs.get(|| vcpu.regs()).map(|r| &*r)
    }

    /// General registers for modification; pushed before the next entry.
    pub fn regs_mut(&mut self, vcpu: &mut dyn Vcpu) -> Result<&mut kvm_regs> {
        self.regs(vcpu)?;
        self.regs.dirty = true;
        Ok(&mut self.regs.value)
    }

    /// Special registers (segments, control registers, EFER), pulled if stale.
    pub fn sregs(&mut self, vcpu: &mut dyn Vcpu) -> Result<&kvm_sregs> {
        self.sregs.get(|| vcpu.sregs()).map(|r| &*r)
    }

    /// Special registers for modification; pushed before the next entry.
    pub fn sregs_mut(&mut self, vcpu: &mut dyn Vcpu) -> Result<&mut kvm_sregs> {
        self.sregs(vcpu)?;
        self.sregs.dirty = true;
        Ok(&mut self.sregs.value)
    }

    part_accessors!(xsave, xsave_mut, xsave, Option<XsaveArea>, pull_xsave);
    part_accessors!(xcrs, xcrs_mut, xcrs, kvm_xcrs, pull_xcrs);
    part_accessors!(events, events_mut, events, kvm_vcpu_events, pull_events);
    part_accessors!(msrs, msrs_mut, msrs, Vec<(u32, u64)>, pull_msrs);

    /// The guest-debug setting every user shares.
    pub fn debug(&self) -> &guest_debug::GuestDebug {
        &self.debug
    }

    /// The guest-debug setting, to change (applied before the next entry).
    pub fn debug_mut(&mut self) -> &mut guest_debug::GuestDebug {
        &mut self.debug
    }

    /// Arms a PC event's execution breakpoint at `addr` for the rest of the
    /// run; returns its slot. Fails, saying why, if no slot is free.
    pub fn add_pc_event(&mut self, addr: u64) -> Result<usize> {
        self.debug.add_hw(guest_debug::HwBreakpoint {
            addr,
            kind: BreakKind::Exec,
            len: 1,
            owner: guest_debug::SlotOwner::PcEvent,
        })
    }

    /// True while the CPU steps over a PC event's instruction.
    pub fn pc_event_stepping(&self) -> bool {
        self.pc_step.is_some()
    }

    /// Ends the step over a PC event's instruction: its breakpoint is armed
    /// again.
    fn end_pc_step(&mut self) {
        if let Some((slot, _)) = self.pc_step.take() {
            self.debug.resume_slot(slot);
            self.debug.set_step(Stepper::PcEvent, false);
        }
    }

    /// Before an entry on a host without interrupt-window exits
    /// ([`WindowAssist`]): while an interrupt waits for the guest to accept
    /// it (`waiting`) and the guest runs at CPL0, single-step it, so that
    /// the CPU comes back at the first instruction boundary where IF is set
    /// and no shadow blocks (after `sti` and the instruction after it,
    /// `popf`, `iret`) and injects there, as hardware takes it. KVM would
    /// otherwise run on past the window (a `sti; nop; cli` hides it
    /// completely) and the interrupt would wait for the next exit where IF
    /// happens to be set. This host's step after an `iret` stops one
    /// instruction late (after the instruction at the return address), so
    /// an `iret` is not stepped over blind: an execution breakpoint on its
    /// return address stops the CPU there. Returns true if this entry
    /// steps. Stepping ends when the wait does, at CPL3 (which this host
    /// does not step), and after [`WINDOW_STEP_LIMIT`] steps in one wait
    /// (the interrupt then waits for the next exit with IF set).
    fn assist_window(&mut self, vcpu: &mut dyn Vcpu, waiting: bool) -> Result<bool> {
        self.debug.clear_owner(guest_debug::SlotOwner::IrqWindow);
        if !waiting {
            self.window_steps = 0;
        }
        let mut step = waiting
            && self.window_assist.step
            && self.window_steps < WINDOW_STEP_LIMIT
            && self.sregs(vcpu)?.cs.dpl == 0;
        let bytes = if step {
            self.instruction_bytes(vcpu)?
        } else {
            Vec::new()
        };
        // `hlt` is not stepped: this host's step over it returns with the
        // vCPU halted inside KVM, which then exits with HLT at the next
        // entry instead of taking what was injected. Run, KVM exits at the
        // `hlt`, and the waiting interrupt wakes the CPU as any would.
        if bytes.first() == Some(&0xf4) {
            step = false;
        }
        self.debug.set_step(Stepper::IrqWindow, step);
        if step {
            self.window_steps += 1;
            if self.window_assist.iret_breakpoint {
                if let Some(target) = self.iret_return_address(vcpu, &bytes)? {
                    // No free slot (a debugger's or PC events' breakpoints
                    // fill them): the step alone, one instruction late.
                    let _ = self.debug.add_hw(guest_debug::HwBreakpoint {
                        addr: target,
                        kind: BreakKind::Exec,
                        len: 1,
                        owner: guest_debug::SlotOwner::IrqWindow,
                    });
                }
            }
        }
        self.debug.apply(vcpu)?;
        Ok(step)
    }

    /// If the instruction at RIP (`bytes`) is an `iret`, the linear address it
    /// returns to (the instruction pointer on top of the stack, in the
    /// current code segment; a return to another segment's base is not
    /// foreseen), else none. Unreadable memory gives none.
    fn iret_return_address(&mut self, vcpu: &mut dyn Vcpu, bytes: &[u8]) -> Result<Option<u64>> {
        let sr = *self.sregs(vcpu)?;
        let r = *self.regs(vcpu)?;
        let long = sr.cs.l != 0;
        let wide = long || sr.cs.db != 0;
        let mut size: usize = if wide { 4 } else { 2 };
        let mut iret = false;
        for &b in bytes {
            match b {
                0x66 => size = if wide { 2 } else { 4 },
                0x40..=0x4f if long => {
                    if b & 8 != 0 {
                        size = 8;
                    }
                }
                0xcf => {
                    iret = true;
                    break;
                }
                _ => break,
            }
        }
        if !iret {
            return Ok(None);
        }
        let sp = if long {
            r.rsp
        } else if sr.ss.db != 0 {
            sr.ss.base.wrapping_add(r.rsp & 0xffff_ffff)
        } else {
            sr.ss.base.wrapping_add(r.rsp & 0xffff)
        };
        let mut buf = [0u8; 8];
        if self.read_virt(vcpu, sp, &mut buf[..size]) != size {
            return Ok(None);
        }
        let ip = u64::from_le_bytes(buf);
        Ok(Some(if long {
            ip
        } else {
            sr.cs.base.wrapping_add(ip)
        }))
    }

    /// Enables the SYSCALL-entry repair (see [`syscall_repair`]); needs
    /// guest memory ([`Arch::attach_memory`]) to read the IDT and frames.
    pub fn enable_syscall_repair(&mut self, vcpu: &mut dyn Vcpu) -> Result<()> {
        self.repair = Some(syscall_repair::Repair::default());
        syscall_repair::refresh(self, vcpu)
    }
}

impl Arch for X86_64 {
    fn kvm_state_changed(&mut self) {
        debug_assert!(!self.regs.dirty && !self.sregs.dirty, "unpushed context");
        self.regs.valid = false;
        self.sregs.valid = false;
        self.xsave.valid = false;
        self.xcrs.valid = false;
        self.events.valid = false;
        self.msrs.valid = false;
    }

    fn update_kvm_state(&mut self, vcpu: &mut dyn Vcpu) -> Result<()> {
        if self.sregs.dirty {
            vcpu.set_sregs(&self.sregs.value)?;
            self.sregs.dirty = false;
        }
        if self.regs.dirty {
            vcpu.set_regs(&self.regs.value)?;
            self.regs.dirty = false;
        }
        if self.xcrs.dirty {
            vcpu.set_xcrs(&self.xcrs.value)?;
            self.xcrs.dirty = false;
        }
        if self.xsave.dirty {
            if let Some(x) = &self.xsave.value {
                vcpu.set_xsave(x)?;
            }
            self.xsave.dirty = false;
        }
        if self.msrs.dirty {
            vcpu.set_msrs(&self.msrs.value)?;
            self.msrs.dirty = false;
        }
        if self.events.dirty {
            vcpu.set_events(&self.events.value)?;
            self.events.dirty = false;
        }
        self.debug.apply(vcpu)
    }

    fn context_replaced(&mut self, vcpu: &mut dyn Vcpu) -> Result<()> {
        self.regs = Part::default();
        self.sregs = Part::default();
        self.xsave = Part::default();
        self.xcrs = Part::default();
        self.events = Part::default();
        self.msrs = Part::default();
        self.trace_cr2 = None;
        // CR8 as KVM now holds it (the TPR mirror compares against it).
        self.cr8_entry = self.sregs(vcpu)?.cr8;
        // A fresh vCPU has KVM's default debug setting: write ours again.
        self.debug.forget_applied();
        // A state is saved only after a PC event's step ended (see
        // is_drained); whatever was in flight belongs to the old state.
        self.end_pc_step();
        // The guest's IDT may differ: watch its page-fault handler anew.
        if self.repair.is_some() {
            self.debug.clear_owner(guest_debug::SlotOwner::Repair);
            self.debug.set_step(Stepper::Repair, false);
            self.repair = Some(syscall_repair::Repair::default());
            syscall_repair::refresh(self, vcpu)?;
        }
        Ok(())
    }

    fn update_thread_context(&mut self, vcpu: &mut dyn Vcpu) -> Result<()> {
        self.regs(vcpu)?;
        self.sregs(vcpu)?;
        self.xsave(vcpu)?;
        self.xcrs(vcpu)?;
        self.events(vcpu)?;
        self.msrs(vcpu)?;
        Ok(())
    }

    fn deliver_interrupts(
        &mut self,
        vcpu: &mut dyn Vcpu,
        intc: &mut dyn InterruptController,
    ) -> Result<Delivery> {
        debug_assert!(!self.events.dirty, "deliver after update_kvm_state");
        let mut d = Delivery::default();
        // KVM loads CR8 from kvm_run on entry: keep it equal to TPR >> 4.
        let cr8 = u64::from(intc.task_priority() >> 4);
        vcpu.set_cr8(cr8);
        self.cr8_entry = cr8;
        // An exception kvmsim completed (pushed just now) is being injected:
        // an interrupt injected beside it would be lost or reordered.
        let exception = self.events.valid
            && (self.events.value.exception.injected != 0
                || self.events.value.interrupt.injected != 0);
        if self.pc_step.is_some() {
            // Stepping over a PC event's instruction: whatever is pending
            // waits in the controller for the entry after the step (an
            // injected interrupt would run its handler first, which returns
            // to the instruction and fires the event again).
            vcpu.request_interrupt_window(false);
            d.waiting = intc.pending() != Pending::None;
            self.assist_window(vcpu, false)?;
            return Ok(d);
        }
        match intc.pending() {
            Pending::None => vcpu.request_interrupt_window(false),
            Pending::Nmi => {
                if exception {
                    vcpu.request_interrupt_window(true);
                    d.waiting = true;
                } else if self.window_assist.step {
                    // A host without window exits: KVM, holding an NMI
                    // for the end of the guest's NMI handler, would not
                    // end the run at its `iret`, and delivering it inside
                    // a stepped run pushes the step's TF into the NMI's
                    // frame. So the NMI waits here while the guest is in
                    // its handler (stepped to the `iret`, as an interrupt
                    // waits for IF), and goes to KVM one at a time.
                    if self.events(vcpu)?.nmi.masked != 0 {
                        // One NMI is latched during a handler; more merge.
                        intc.merge_nmis();
                        d.waiting = true;
                    } else if intc.take_nmi() {
                        vcpu.nmi()?;
                        d.injected += 1;
                        // KVM's NMI state changed under the cached block.
                        self.events.valid = false;
                    }
                } else {
                    // Every NMI waiting goes to KVM now (the controller
                    // keeps at most two): KVM injects one and holds the
                    // other until the guest's handler returns, as hardware
                    // latches an NMI that arrives during one.
                    while intc.take_nmi() {
                        vcpu.nmi()?;
                        d.injected += 1;
                    }
                    self.events.valid = false;
                }
            }
            Pending::Maskable => {
                let (ready, if_flag) = vcpu.interrupt_window();
                if ready && if_flag && !exception {
                    vcpu.request_interrupt_window(false);
                    if let Some(v) = intc.acknowledge() {
                        vcpu.interrupt(v)?;
                        d.injected += 1;
                    }
                } else {
                    vcpu.request_interrupt_window(true);
                    d.waiting = true;
                }
            }
        }
        d.window_step = self.assist_window(vcpu, d.waiting)?;
        Ok(d)
    }

    fn set_window_assist(&mut self, assist: WindowAssist) {
        self.window_assist = assist;
    }

    fn after_run(&mut self, vcpu: &mut dyn Vcpu, intc: &mut dyn InterruptController) {
        // The guest left a PC event's instruction without a step exit (code
        // this host does not step: the next exit ends the step-over).
        if let Some((_, addr)) = self.pc_step {
            match self.regs(vcpu) {
                Ok(r) if r.rip != addr => self.end_pc_step(),
                Ok(_) => {}
                Err(e) => tracing::warn!("PC events: cannot read RIP: {e}"),
            }
        }
        // The guest may have moved its page-fault handler (a new IDT).
        if let Some(r) = &mut self.repair {
            r.exits = r.exits.saturating_add(1);
            r.since_check += 1;
            if r.check_due() {
                if let Err(e) = syscall_repair::refresh(self, vcpu) {
                    tracing::warn!("SYSCALL repair: cannot watch the page-fault handler: {e}");
                }
            }
        }
        let cr8 = vcpu.cr8() & 0xf;
        if cr8 != self.cr8_entry {
            // The guest wrote CR8 natively: that is a TPR write.
            intc.set_task_priority((cr8 << 4) as u8);
            self.cr8_entry = cr8;
        }
    }

    fn is_drained(&mut self, vcpu: &mut dyn Vcpu) -> Result<bool> {
        // A step over a PC event's instruction finishes first: saved in
        // the middle, a restored CPU would fire the event again.
        if self.pc_step.is_some() {
            return Ok(false);
        }
        let e = self.events(vcpu)?;
        Ok(e.exception.injected == 0
            && e.interrupt.injected == 0
            && e.nmi.injected == 0
            && e.nmi.pending == 0)
    }

    fn program_counter(&mut self, vcpu: &mut dyn Vcpu) -> Result<u64> {
        Ok(self.regs(vcpu)?.rip)
    }

    fn privilege_level(&mut self, vcpu: &mut dyn Vcpu) -> Result<u8> {
        Ok(self.sregs(vcpu)?.cs.dpl)
    }

    fn debug_exit(&mut self, vcpu: &mut dyn Vcpu, exit: &DebugExit) -> Result<DebugOutcome> {
        let hit = self.debug.classify(exit);
        let mut out = DebugOutcome::default();
        if hit.sw_breakpoint {
            let rip = self.regs(vcpu)?.rip;
            if self.debug.has_sw(exit.pc) || self.debug.has_sw(rip) {
                out.stop = Some(DebugStop::SwBreak);
            } else if let emulate::Emulated::Completed(i) = emulate::complete(self, vcpu, &[0xcc])?
            {
                // The guest's own int3 (KVM intercepts every #BP while the
                // debugger has one planted): deliver it as the guest expects.
                out.completed = Some(i);
            }
            return Ok(out);
        }
        // The step over a PC event's instruction completed: armed again.
        if hit.step && self.pc_step.is_some() {
            self.end_pc_step();
        }
        out.completed = syscall_repair::debug_exit(self, vcpu, &hit)?;
        // A step (or the breakpoint after an `iret`) that only looked for
        // an interrupt window is no one's step: the CPU enters again and
        // injects if the window is open.
        out.stepped = hit.step && !self.debug.only_stepper(Stepper::IrqWindow);
        for i in 0..guest_debug::HW_SLOTS {
            let Some(b) = self.debug.slot(i) else {
                continue;
            };
            if hit.slots & (1 << i) == 0 || b.owner != guest_debug::SlotOwner::PcEvent {
                continue;
            }
            // The guest reached the event's address: step over the
            // instruction there with the breakpoint off, then re-arm it.
            self.end_pc_step();
            self.debug.suspend_slot(i);
            self.debug.set_step(Stepper::PcEvent, true);
            self.pc_step = Some((i, b.addr));
            out.pc_event = Some(b.addr);
        }
        if hit.step && self.debug.is_stepping(Stepper::Debugger) {
            out.stop = Some(DebugStop::Step);
        }
        for i in 0..guest_debug::HW_SLOTS {
            let Some(b) = self.debug.slot(i) else {
                continue;
            };
            if hit.slots & (1 << i) == 0 || b.owner != guest_debug::SlotOwner::Debugger {
                continue;
            }
            out.stop = Some(match b.kind {
                BreakKind::Exec => DebugStop::HwBreak(b.addr),
                k => DebugStop::Watch(k, b.addr),
            });
        }
        Ok(out)
    }

    fn planted_breakpoint(
        &mut self,
        vcpu: &mut dyn Vcpu,
        bytes: Option<&[u8]>,
    ) -> Result<Option<DebugExit>> {
        if !self.debug.has_any_sw() {
            return Ok(None);
        }
        let pc = self.regs(vcpu)?.rip;
        if !self.debug.has_sw(pc) {
            return Ok(None);
        }
        let first = match bytes {
            Some(b) if !b.is_empty() => b[0],
            _ => self.instruction_bytes(vcpu)?.first().copied().unwrap_or(0),
        };
        Ok((first == 0xcc).then_some(DebugExit {
            exception: 3,
            pc,
            dr6: 0,
            dr7: 0,
        }))
    }

    fn completable(&self) -> &'static [&'static str] {
        emulate::SUPPORTED
    }

    fn complete_instruction(
        &mut self,
        vcpu: &mut dyn Vcpu,
        bytes: &[u8],
    ) -> Result<std::result::Result<usize, String>> {
        Ok(match emulate::complete(self, vcpu, bytes)? {
            emulate::Emulated::Completed(i) => Ok(i),
            emulate::Emulated::Unsupported(d) => Err(d),
        })
    }

    fn instruction_bytes(&mut self, vcpu: &mut dyn Vcpu) -> Result<Vec<u8>> {
        let r = *self.regs(vcpu)?;
        let sr = *self.sregs(vcpu)?;
        // Segment bases other than FS and GS do not apply in 64-bit mode.
        let va = if sr.cs.l != 0 {
            r.rip
        } else {
            sr.cs.base.wrapping_add(r.rip)
        };
        let mut bytes = vec![0u8; 15];
        let got = self.read_virt(vcpu, va, &mut bytes);
        bytes.truncate(got);
        Ok(bytes)
    }

    fn advance_guest_clock(&mut self, vcpu: &mut dyn Vcpu, cycles: u64) -> Result<()> {
        if cycles == 0 || self.tsc_writes_ignored {
            return Ok(());
        }
        const IA32_TSC: u32 = 0x10;
        const IA32_TSC_ADJUST: u32 = 0x3b;
        self.msrs.valid = false;
        // Write the TSC; where KVM ignores that, try IA32_TSC_ADJUST.
        let t0 = get_msr(&*vcpu, IA32_TSC)?;
        set_msr(vcpu, IA32_TSC, t0.wrapping_add(cycles))?;
        let moved = |t: u64| t.wrapping_sub(t0) >= cycles / 2;
        if moved(get_msr(&*vcpu, IA32_TSC)?) {
            return Ok(());
        }
        let adjust = get_msr(&*vcpu, IA32_TSC_ADJUST)?;
        set_msr(vcpu, IA32_TSC_ADJUST, adjust.wrapping_add(cycles))?;
        if !moved(get_msr(&*vcpu, IA32_TSC)?) {
            set_msr(vcpu, IA32_TSC_ADJUST, adjust)?;
            // Found once, said once, not tried again.
            self.tsc_writes_ignored = true;
            tracing::warn!(
                "this host's KVM ignores writes to the guest TSC (IA32_TSC, \
                 IA32_TSC_ADJUST): while the guest halts, simulated time passes but \
                 its TSC does not (a Linux guest's clock falls behind while idle)"
            );
        }
        Ok(())
    }

    fn attach_memory(&mut self, mem: vm_memory::GuestMemoryMmap) {
        self.mem = Some(mem);
    }

    fn trace_line(&mut self, vcpu: &mut dyn Vcpu, bytes: &[u8]) -> Result<String> {
        let rip = self.regs(vcpu)?.rip;
        let s = self.sregs(vcpu)?;
        let (cpl, cr2, bitness) = (s.cs.dpl, s.cr2, emulate::code_bitness(s));
        let mut line = if bytes.is_empty() {
            format!("cpl{cpl} {rip:#018x}  (instruction not readable)")
        } else {
            let len = emulate::instruction_len(bytes, rip, bitness);
            let hex: String = bytes[..len].iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "cpl{cpl} {rip:#018x}  {hex:<20} {}",
                emulate::disassemble(bytes, rip, bitness)
            )
        };
        if self.trace_cr2.is_some_and(|c| c != cr2) {
            line.push_str(&format!("    ; cr2 = {cr2:#x}"));
        }
        self.trace_cr2 = Some(cr2);
        Ok(line)
    }

    fn set_step(&mut self, vcpu: &mut dyn Vcpu, who: Stepper, on: bool) -> Result<()> {
        self.debug.set_step(who, on);
        self.debug.apply(vcpu)
    }

    fn is_stepping(&self, who: Stepper) -> bool {
        self.debug.is_stepping(who)
    }

    fn call_args(&mut self, vcpu: &mut dyn Vcpu) -> Result<[u64; 6]> {
        let r = self.regs(vcpu)?;
        Ok([r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9])
    }

    fn user_context(&mut self, vcpu: &mut dyn Vcpu) -> Result<Option<mem::UserContext>> {
        let r = *self.regs(vcpu)?;
        let sr = self.sregs(vcpu)?;
        Ok(Some(mem::UserContext {
            gprs: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
            fs_base: sr.fs.base,
            gs_base: sr.gs.base,
            cr2: sr.cr2,
            cr3: sr.cr3,
            cpl: (sr.cs.selector & 3) as u8,
        }))
    }

    fn set_user_context(&mut self, vcpu: &mut dyn Vcpu, ctx: &mem::UserContext) -> Result<bool> {
        self.set_context(vcpu, ctx, boot::USER_CS, boot::USER_DS)
    }

    fn set_kernel_context(&mut self, vcpu: &mut dyn Vcpu, ctx: &mem::UserContext) -> Result<bool> {
        self.set_context(vcpu, ctx, boot::KERNEL_CS, boot::KERNEL_DS)
    }

    fn fpu_state(&mut self, vcpu: &mut dyn Vcpu) -> Result<Option<Vec<u8>>> {
        Ok(self
            .xsave(vcpu)?
            .as_ref()
            .map(|x| x.words().iter().flat_map(|w| w.to_le_bytes()).collect()))
    }

    fn set_fpu_state(&mut self, vcpu: &mut dyn Vcpu, area: &[u8]) -> Result<bool> {
        // A fresh area of this host's size, filled and pushed at once, so
        // that an area KVM refuses (reserved MXCSR bits, a bad XSAVE
        // header: the guest wrote it) is a `false` here, not a failed entry.
        let Some(mut x) = vcpu.xsave()? else {
            return Ok(false);
        };
        if !area.len().is_multiple_of(4) {
            return Ok(false);
        }
        let words: Vec<u32> = area
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if x.load_words(&words).is_err() || vcpu.set_xsave(&x).is_err() {
            return Ok(false);
        }
        self.xsave = Part {
            value: Some(x),
            valid: true,
            dirty: false,
        };
        Ok(true)
    }

    fn read_virt(&mut self, vcpu: &mut dyn Vcpu, va: u64, buf: &mut [u8]) -> usize {
        X86_64::read_virt(self, vcpu, va, buf)
    }

    fn write_virt(&mut self, vcpu: &mut dyn Vcpu, va: u64, data: &[u8]) -> usize {
        self.write_virt_as(vcpu, va, data, true)
    }

    fn dump(&mut self, vcpu: &mut dyn Vcpu) -> String {
        let mut s = String::new();
        match self.regs(vcpu) {
            Ok(r) => {
                let r = *r;
                let rows = [
                    [
                        ("rax", r.rax),
                        ("rbx", r.rbx),
                        ("rcx", r.rcx),
                        ("rdx", r.rdx),
                    ],
                    [
                        ("rsi", r.rsi),
                        ("rdi", r.rdi),
                        ("rbp", r.rbp),
                        ("rsp", r.rsp),
                    ],
                    [("r8", r.r8), ("r9", r.r9), ("r10", r.r10), ("r11", r.r11)],
                    [
                        ("r12", r.r12),
                        ("r13", r.r13),
                        ("r14", r.r14),
                        ("r15", r.r15),
                    ],
                ];
                for row in rows {
                    for (n, v) in row {
                        let _ = write!(s, "{n:>4}={v:016x} ");
                    }
                    s.push('\n');
                }
                let _ = writeln!(
                    s,
                    " rip={:016x} rflags={:016x} [{}]",
                    r.rip,
                    r.rflags,
                    rflags_names(r.rflags)
                );
            }
            Err(e) => {
                let _ = writeln!(s, "(general registers unavailable: {e})");
            }
        }
        match self.sregs(vcpu) {
            Ok(sr) => {
                let sr = *sr;
                let _ = writeln!(
                    s,
                    " cr0={:016x} cr2={:016x} cr3={:016x} cr4={:016x} cr8={:x}",
                    sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8
                );
                let _ = writeln!(
                    s,
                    "efer={:016x} apic_base={:016x} cpl={}",
                    sr.efer, sr.apic_base, sr.cs.dpl
                );
                for (n, seg) in [
                    ("cs", &sr.cs),
                    ("ss", &sr.ss),
                    ("ds", &sr.ds),
                    ("es", &sr.es),
                    ("fs", &sr.fs),
                    ("gs", &sr.gs),
                    ("tr", &sr.tr),
                    ("ldt", &sr.ldt),
                ] {
                    let _ = writeln!(s, "{n:>4}={}", segment(seg));
                }
                let _ = writeln!(
                    s,
                    " gdt=base {:016x} limit {:04x}   idt=base {:016x} limit {:04x}",
                    sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
                );
            }
            Err(e) => {
                let _ = writeln!(s, "(special registers unavailable: {e})");
            }
        }
        if let Ok(ev) = self.events(vcpu) {
            let ev = *ev;
            let _ = writeln!(
                s,
                "events: exception injected={} nr={} has_error={} error={:#x}; interrupt injected={} nr={} shadow={}; nmi injected={} pending={} masked={}",
                ev.exception.injected,
                ev.exception.nr,
                ev.exception.has_error_code,
                ev.exception.error_code,
                ev.interrupt.injected,
                ev.interrupt.nr,
                ev.interrupt.shadow,
                ev.nmi.injected,
                ev.nmi.pending,
                ev.nmi.masked
            );
        }
        if let Ok(msrs) = self.msrs(vcpu) {
            let line: Vec<String> = msrs
                .iter()
                .map(|(i, v)| {
                    let name = CONTEXT_MSRS
                        .iter()
                        .find(|(n, _)| n == i)
                        .map_or("?", |(_, n)| n);
                    format!("{name}={v:x}")
                })
                .collect();
            let _ = writeln!(s, "msrs: {}", line.join(" "));
        }
        if let Ok(x) = self.xcrs(vcpu) {
            let x = *x;
            let n = (x.nr_xcrs as usize).min(x.xcrs.len());
            for xcr in &x.xcrs[..n] {
                let _ = write!(s, "xcr{}={:x} ", xcr.xcr, xcr.value);
            }
            if n > 0 {
                s.push('\n');
            }
        }
        if let Ok(Some(xs)) = self.xsave(vcpu) {
            // The legacy FXSAVE area: FCW, FSW, MXCSR and XMM0-15.
            let r = xs.region();
            let fcw = r[0] & 0xffff;
            let fsw = r[0] >> 16;
            let mxcsr = r[6];
            let _ = writeln!(s, "fpu: fcw={fcw:04x} fsw={fsw:04x} mxcsr={mxcsr:08x}");
            for i in 0..16 {
                let base = 40 + 4 * i;
                let _ = write!(
                    s,
                    "xmm{i:<2}={:08x}{:08x}{:08x}{:08x}{}",
                    r[base + 3],
                    r[base + 2],
                    r[base + 1],
                    r[base],
                    if i % 2 == 1 { "\n" } else { " " }
                );
            }
        }
        if let Ok(dr) = vcpu.debug_regs() {
            let _ = writeln!(s, "dr0-3={:x?} dr6={:x} dr7={:x}", dr.db, dr.dr6, dr.dr7);
        }
        if self.mem.is_some() {
            s.push_str(&self.memory_view(vcpu));
        }
        s
    }
}

impl X86_64 {
    /// Walks `va` through the guest's current page tables (every entry
    /// unreadable without attached memory).
    pub fn walk(&mut self, vcpu: &mut dyn Vcpu, va: u64) -> Result<paging::Walk> {
        use vm_memory::{Bytes, GuestAddress};
        let s = *self.sregs(vcpu)?;
        let mem = self.mem.as_ref();
        Ok(paging::walk(s.cr0, s.cr3, s.cr4, s.efer, va, |a| {
            mem?.read_obj::<u64>(GuestAddress(a)).ok()
        }))
    }

    /// Reads guest memory at virtual address `va` through the current page
    /// tables (physical addresses before paging is on) into `buf`; returns
    /// how many bytes could be read (fewer at an unmapped page, none without
    /// attached memory).
    pub fn read_virt(&mut self, vcpu: &mut dyn Vcpu, va: u64, buf: &mut [u8]) -> usize {
        let Some(mem) = self.mem.clone() else {
            return 0;
        };
        let Ok(paged) = self.sregs(vcpu).map(|s| s.cr0 & (1 << 31) != 0) else {
            return 0;
        };
        let mut done = 0;
        while done < buf.len() {
            let at = va.wrapping_add(done as u64);
            let pa = if paged {
                match self.walk(vcpu, at).map(|w| w.result) {
                    Ok(Ok(pa)) => pa,
                    _ => break,
                }
            } else {
                at
            };
            // Up to the end of the 4 KiB page (the smallest mapping).
            let n = ((0x1000 - (at & 0xfff)) as usize).min(buf.len() - done);
            if vm_memory::Bytes::read_slice(
                &mem,
                &mut buf[done..done + n],
                vm_memory::GuestAddress(pa),
            )
            .is_err()
            {
                break;
            }
            done += n;
        }
        done
    }

    /// Writes `buf` to guest memory at virtual address `va` through the
    /// current page tables (a debugger's memory writes); returns how many
    /// bytes were written (fewer at an unmapped page or the end of RAM).
    /// The page tables' write-protection is not applied (a debugger may
    /// plant breakpoints in read-only code).
    pub fn write_virt(&mut self, vcpu: &mut dyn Vcpu, va: u64, buf: &[u8]) -> usize {
        self.write_virt_as(vcpu, va, buf, false)
    }

    /// Writes like [`X86_64::write_virt`]; with `guest_rights`, only pages
    /// the guest itself may write (writable at every level of the walk):
    /// a sim-op's copy into a guest buffer never lands in a read-only page
    /// such as the kernel's shared zero page.
    fn write_virt_as(
        &mut self,
        vcpu: &mut dyn Vcpu,
        va: u64,
        buf: &[u8],
        guest_rights: bool,
    ) -> usize {
        let Some(mem) = self.mem.clone() else {
            return 0;
        };
        let Ok(paged) = self.sregs(vcpu).map(|s| s.cr0 & (1 << 31) != 0) else {
            return 0;
        };
        let mut done = 0;
        while done < buf.len() {
            let at = va.wrapping_add(done as u64);
            let pa = if paged {
                match self.walk(vcpu, at) {
                    Ok(w) => match w.result {
                        Ok(pa) if !guest_rights || w.permissions().0 => pa,
                        _ => break,
                    },
                    Err(_) => break,
                }
            } else {
                at
            };
            let n = ((0x1000 - (at & 0xfff)) as usize).min(buf.len() - done);
            if vm_memory::Bytes::write_slice(
                &mem,
                &buf[done..done + n],
                vm_memory::GuestAddress(pa),
            )
            .is_err()
            {
                break;
            }
            done += n;
        }
        done
    }

    /// Up to `n` little-endian 8-byte words at virtual address `va` (fewer
    /// where memory stops being readable).
    pub fn read_u64s(&mut self, vcpu: &mut dyn Vcpu, va: u64, n: usize) -> Vec<u64> {
        let mut buf = vec![0u8; 8 * n];
        let got = self.read_virt(vcpu, va, &mut buf);
        buf[..got - got % 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect()
    }

    /// One line of CPU state for samples: RIP, RSP, CPL, RFLAGS, CR2, the
    /// first argument registers, the top of the stack and KVM's events.
    pub fn sample(&mut self, vcpu: &mut dyn Vcpu) -> Result<String> {
        let r = *self.regs(vcpu)?;
        let (cpl, cr2) = {
            let s = self.sregs(vcpu)?;
            (s.cs.dpl, s.cr2)
        };
        let e = *self.events(vcpu)?;
        let stack: Vec<String> = self
            .stack_words(vcpu, 6)
            .iter()
            .map(|w| format!("{w:x}"))
            .collect();
        Ok(format!(
            "rip={:#x} rsp={:#x} cpl={cpl} rflags={:#x} cr2={cr2:#x} rdi={:#x} rsi={:#x} \
             rdx={:#x} stack=[{}] exception={}/{} interrupt={}/{}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rdi,
            r.rsi,
            r.rdx,
            stack.join(" "),
            e.exception.injected,
            e.exception.nr,
            e.interrupt.injected,
            e.interrupt.nr
        ))
    }

    /// The first `n` 8-byte words on the stack (fewer where unreadable).
    pub fn stack_words(&mut self, vcpu: &mut dyn Vcpu, n: usize) -> Vec<u64> {
        let (Ok(rsp), Ok(sr)) = (self.regs(vcpu).map(|r| r.rsp), self.sregs(vcpu).copied()) else {
            return Vec::new();
        };
        let base = if sr.cs.l != 0 { 0 } else { sr.ss.base };
        self.read_u64s(vcpu, base.wrapping_add(rsp), n)
    }

    /// What the registers point at: the instruction at RIP, the top of the
    /// stack, and the page walk of CR2.
    fn memory_view(&mut self, vcpu: &mut dyn Vcpu) -> String {
        let mut s = String::new();
        let (Ok(r), Ok(sr)) = (self.regs(vcpu).copied(), self.sregs(vcpu).copied()) else {
            return s;
        };
        let paged = sr.cr0 & (1 << 31) != 0;
        let code_va = if sr.cs.l != 0 {
            r.rip
        } else {
            sr.cs.base.wrapping_add(r.rip)
        };
        let bytes = self.instruction_bytes(vcpu).unwrap_or_default();
        if bytes.is_empty() {
            let _ = writeln!(s, "code at rip: not readable");
        } else {
            let _ = writeln!(
                s,
                "code at rip: {:02x?} = {}",
                &bytes[..emulate::instruction_len(&bytes, r.rip, emulate::code_bitness(&sr))],
                emulate::disassemble(&bytes, r.rip, emulate::code_bitness(&sr))
            );
        }
        let words = self.stack_words(vcpu, 8);
        let _ = write!(s, "stack at rsp:");
        for w in &words {
            let _ = write!(s, " {w:x}");
        }
        if words.len() < 8 {
            s.push_str(" (unreadable beyond)");
        }
        s.push('\n');
        if paged {
            let cr2 = (sr.cr2 != 0).then_some(("cr2", sr.cr2));
            for (what, va) in std::iter::once(("rip", code_va)).chain(cr2) {
                if let Ok(w) = self.walk(vcpu, va) {
                    let _ = writeln!(s, "{what}: {}", w.describe());
                }
            }
        }
        s
    }
}

fn segment(s: &kvm_segment) -> String {
    format!(
        "sel {:04x} base {:016x} limit {:08x} type {:x} s={} dpl={} p={} db={} l={} g={}{}",
        s.selector,
        s.base,
        s.limit,
        s.type_,
        s.s,
        s.dpl,
        s.present,
        s.db,
        s.l,
        s.g,
        if s.unusable != 0 { " unusable" } else { "" }
    )
}

fn rflags_names(f: u64) -> String {
    const NAMES: [(u64, &str); 10] = [
        (0, "CF"),
        (2, "PF"),
        (4, "AF"),
        (6, "ZF"),
        (7, "SF"),
        (8, "TF"),
        (9, "IF"),
        (10, "DF"),
        (11, "OF"),
        (17, "VM"),
    ];
    let mut v: Vec<String> = NAMES
        .iter()
        .filter(|(b, _)| f & (1 << b) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let iopl = (f >> 12) & 3;
    if iopl != 0 {
        v.push(format!("IOPL={iopl}"));
    }
    v.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_names() {
        assert_eq!(rflags_names(0x3246), "PF ZF IF IOPL=3");
        assert_eq!(rflags_names(0x2), "");
    }
}
