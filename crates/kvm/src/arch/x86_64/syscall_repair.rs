//! Repairing a broken SYSCALL entry (seen on software-assisted KVMs).
//!
//! There, `syscall` from CPL3 jumps to LSTAR and sets RCX/R11 but leaves
//! CS/SS at the user selectors: the kernel's entry code is fetched at CPL3,
//! and since it lies on a supervisor page the fetch raises a page fault,
//! delivered to the guest's #PF handler (at CPL0, where this KVM emulates
//! and where hardware breakpoints fire). The repair watches that handler:
//! an execution breakpoint (DR0) on the address IDT entry 14 names. When it
//! fires, kvmsim reads the exception frame; a fault on an instruction fetch
//! from user mode at RIP = LSTAR is the broken entry, and kvmsim turns it
//! into the system call it should have been: RSP and RFLAGS (masked by
//! SFMASK) from the frame, CS/SS from STAR[47:32] (SS = CS + 8), RIP =
//! LSTAR; RCX and R11 already hold what `syscall` put there. Any other page
//! fault goes on to the handler: kvmsim single-steps its first instruction
//! with the breakpoint off, then re-arms it (RF does not stop the
//! breakpoint re-firing here). The IDT entry is re-read as the guest
//! changes its IDT. Cost: one exit per system call, two per other page
//! fault. Enabled only where `kvmsim doctor`'s probe finds the broken
//! entry; on a host with VMX/SVM none of this runs.

use super::guest_debug::{DebugHit, HwBreakpoint, SlotOwner};
use super::{boot, X86_64};
use crate::arch::{BreakKind, Stepper};
use crate::vcpu::Vcpu;
use crate::Result;

/// IA32_STAR and IA32_LSTAR.
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;

/// The repair's state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    /// The guest's page-fault handler the breakpoint is on (0: none yet).
    pub handler: u64,
    /// Stepping over the handler's first instruction with the breakpoint off.
    pub stepping: bool,
    /// Exits since IDT entry 14 was last read.
    pub since_check: u32,
    /// Exits since the repair was enabled.
    pub exits: u64,
}

/// Until the guest has a page-fault handler, IDT entry 14 is read after
/// each of the first `EARLY_EXITS` exits, then every `CHECK_UNKNOWN` exits;
/// once it has one, every `CHECK_KNOWN` exits (a guest moves its handler
/// rarely, and each check costs KVM_GET_SREGS).
pub const EARLY_EXITS: u64 = 64;
pub const CHECK_UNKNOWN: u32 = 64;
pub const CHECK_KNOWN: u32 = 1024;

impl Repair {
    /// True if IDT entry 14 should be read after this exit.
    pub fn check_due(&self) -> bool {
        if self.handler == 0 {
            self.exits <= EARLY_EXITS || self.since_check >= CHECK_UNKNOWN
        } else {
            self.since_check >= CHECK_KNOWN
        }
    }
}

/// IA32_SFMASK.
pub const MSR_SFMASK: u32 = 0xc000_0084;

/// Page-fault error code bits: write access, user mode.
const PF_WRITE: u64 = 1 << 1;
const PF_USER: u64 = 1 << 2;

/// Arms the execution breakpoint on `addr` (none if 0) in the CPU's
/// shared guest-debug setting (applied before the next entry).
pub fn arm(arch: &mut X86_64, addr: u64) {
    arch.debug.clear_owner(SlotOwner::Repair);
    if addr == 0 {
        return;
    }
    tracing::debug!("SYSCALL repair: breakpoint on the page-fault handler {addr:#x}");
    let bp = HwBreakpoint {
        addr,
        kind: BreakKind::Exec,
        len: 1,
        owner: SlotOwner::Repair,
    };
    if let Err(e) = arch.debug.add_hw(bp) {
        tracing::warn!("SYSCALL repair: cannot watch the page-fault handler: {e}");
    }
}

/// The handler address in a 16-byte long-mode IDT gate.
pub fn gate_offset(gate: &[u8; 16]) -> u64 {
    let lo = u64::from(u16::from_le_bytes([gate[0], gate[1]]));
    let mid = u64::from(u16::from_le_bytes([gate[6], gate[7]]));
    let hi = u64::from(u32::from_le_bytes([gate[8], gate[9], gate[10], gate[11]]));
    lo | (mid << 16) | (hi << 32)
}

/// True if the exception frame `[error code, RIP, CS, RFLAGS, RSP, SS]`
/// of a page fault is the broken entry of a system call to `lstar`: a
/// user-mode read fault with RIP = LSTAR, i.e. the fetch of the kernel's
/// entry code at CPL3 (the error code marks fetches only with NX or SMEP
/// on, so the fetch bit is not required).
pub fn is_broken_entry(frame: &[u64; 6], lstar: u64) -> bool {
    let [code, rip, cs, ..] = *frame;
    lstar != 0 && rip == lstar && cs & 3 == 3 && code & PF_USER != 0 && code & PF_WRITE == 0
}

/// Re-reads IDT entry 14 and moves the breakpoint if the handler moved.
pub fn refresh(arch: &mut X86_64, vcpu: &mut dyn Vcpu) -> Result<()> {
    let Some(r) = arch.repair else {
        return Ok(());
    };
    if let Some(rep) = &mut arch.repair {
        rep.since_check = 0;
    }
    let idt = arch.sregs(vcpu)?.idt;
    if idt.limit < 14 * 16 + 15 {
        return Ok(());
    }
    let mut gate = [0u8; 16];
    if arch.read_virt(vcpu, idt.base + 14 * 16, &mut gate) != 16 {
        return Ok(());
    }
    let handler = gate_offset(&gate);
    if let Some(rep) = &mut arch.repair {
        if handler != r.handler {
            rep.handler = handler;
            if !rep.stepping {
                arm(arch, handler);
            }
        }
    }
    Ok(())
}

/// A debug exit (`hit`, as classified) with the repair enabled: its step
/// over the handler's first instruction ends (the breakpoint is re-armed),
/// or its breakpoint fired. Returns what was completed (the system call).
pub fn debug_exit(arch: &mut X86_64, vcpu: &mut dyn Vcpu, hit: &DebugHit) -> Result<Option<usize>> {
    let Some(r) = arch.repair else {
        return Ok(None);
    };
    if r.stepping && hit.step {
        // The handler's first instruction ran: re-arm the breakpoint.
        if let Some(rep) = &mut arch.repair {
            rep.stepping = false;
        }
        arch.debug.set_step(Stepper::Repair, false);
        arm(arch, r.handler);
        return Ok(None);
    }
    let mine = (0..super::guest_debug::HW_SLOTS).any(|i| {
        hit.slots & (1 << i) != 0
            && arch
                .debug
                .slot(i)
                .is_some_and(|b| b.owner == SlotOwner::Repair)
    });
    let regs = *arch.regs(vcpu)?;
    if !mine || r.handler == 0 || regs.rip != r.handler {
        return Ok(None);
    }
    // [error code, RIP, CS, RFLAGS, RSP, SS]; zeros if unreadable.
    let mut frame = [0u64; 6];
    for (f, w) in frame.iter_mut().zip(arch.read_u64s(vcpu, regs.rsp, 6)) {
        *f = w;
    }
    let msr = |arch: &mut X86_64, vcpu: &mut dyn Vcpu, index: u32| -> Result<u64> {
        Ok(arch
            .msrs(vcpu)?
            .iter()
            .find(|(i, _)| *i == index)
            .map_or(0, |(_, v)| *v))
    };
    let lstar = msr(arch, vcpu, MSR_LSTAR)?;
    tracing::trace!("SYSCALL repair: page fault, frame {frame:x?}, LSTAR {lstar:#x}");
    if is_broken_entry(&frame, lstar) {
        let star = msr(arch, vcpu, MSR_STAR)?;
        let sfmask = msr(arch, vcpu, MSR_SFMASK)?;
        let [_, _, _, rflags, rsp, _] = frame;
        let kcs = ((star >> 32) & 0xfffc) as u16;
        let gdt = boot::gdt();
        let sregs = arch.sregs_mut(vcpu)?;
        sregs.cs = boot::segment_from_entry(kcs, gdt[usize::from(boot::KERNEL_CS / 8)]);
        sregs.ss = boot::segment_from_entry(kcs + 8, gdt[usize::from(boot::KERNEL_DS / 8)]);
        let regs = arch.regs_mut(vcpu)?;
        regs.rip = lstar;
        regs.rsp = rsp;
        regs.rflags = (rflags & !sfmask) | 0x2;
        return Ok(Some(super::emulate::SYSCALL_ENTRY));
    }
    // An ordinary page fault: step over the handler's first instruction
    // with the breakpoint off (other users' steps and breakpoints stay).
    arch.debug.clear_owner(SlotOwner::Repair);
    arch.debug.set_step(Stepper::Repair, true);
    if let Some(rep) = &mut arch.repair {
        rep.stepping = true;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_offsets() {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&0x0be0u16.to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&0x81c0u16.to_le_bytes());
        g[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        assert_eq!(gate_offset(&g), 0xffff_ffff_81c0_0be0);
    }

    #[test]
    fn broken_entry_signature() {
        let lstar = 0xffff_ffff_81c0_0080;
        // User-mode fetch fault at LSTAR with a user CS: the broken entry.
        assert!(is_broken_entry(
            &[0x15, lstar, 0x33, 0x202, 0x7ffc_0000, 0x2b],
            lstar
        ));
        // Without NX the fetch bit is not reported.
        assert!(is_broken_entry(
            &[0x5, lstar, 0x33, 0x202, 0x7ffc_0000, 0x2b],
            lstar
        ));
        // A write fault, a kernel-mode fault, another address: not it.
        assert!(!is_broken_entry(&[0x7, lstar, 0x33, 0x202, 0, 0x2b], lstar));
        assert!(!is_broken_entry(&[0x11, lstar, 0x10, 0x2, 0, 0x18], lstar));
        assert!(!is_broken_entry(
            &[0x15, lstar + 1, 0x33, 0x2, 0, 0x2b],
            lstar
        ));
        assert!(!is_broken_entry(&[0x15, 0, 0x33, 0x2, 0, 0x2b], 0));
    }
}
