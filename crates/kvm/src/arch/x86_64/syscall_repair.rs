//! Repairing a broken SYSCALL entry (seen on software-assisted KVMs).
//!
//! There, `syscall` from CPL3 jumps to LSTAR and sets RCX/R11 but leaves
//! CS/SS at the user selectors, so the kernel's entry code would run at
//! CPL3 and fault. The repair: a hardware execution breakpoint on LSTAR
//! (DR0, DR7.L0). When it fires with a user CS, kvmsim loads the kernel
//! CS/SS from STAR[47:32] (SS = CS + 8), single-steps one instruction (RF
//! does not stop the breakpoint re-firing here), then re-arms it. LSTAR is
//! tracked as the guest writes it: an MSR filter makes those writes exit
//! where the host's KVM honours it, and kvmsim re-reads LSTAR after every
//! exit where it does not (a system call made before any exit following
//! the LSTAR write would not be repaired; a kernel makes many exits first).
//! Cost: two extra exits per system call. Enabled only where `kvmsim
//! doctor`'s probe finds the broken entry, and only on request
//! (`system.cpu.syscall_repair`): on our development hosts the breakpoint
//! does not fire when the CPL3 `syscall` lands at LSTAR (not on a user page,
//! which runs natively; not on a supervisor page, where the fetch #PF is
//! delivered first), so the recipe is not working there yet.

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;

use super::{boot, X86_64};
use crate::arch::DebugOutcome;
use crate::{KvmError, Result};

/// IA32_STAR and IA32_LSTAR.
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;

/// The repair's state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    /// The guest's LSTAR (0 until it writes one).
    pub lstar: u64,
    /// Stepping over the instruction at LSTAR; the breakpoint is off.
    pub stepping: bool,
}

fn set_debug(vcpu: &VcpuFd, control: u32, dr0: u64, dr7: u64) -> Result<()> {
    let mut dbg = kvm_guest_debug {
        control,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = dr7;
    vcpu.set_guest_debug(&dbg)
        .map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"))
}

/// Arms the execution breakpoint on `lstar` (none if 0).
pub fn arm(vcpu: &VcpuFd, lstar: u64) -> Result<()> {
    if lstar == 0 {
        return set_debug(vcpu, 0, 0, 0);
    }
    // DR7: L0 enabled, RW0 = 00 (execute), LEN0 = 00.
    tracing::debug!("SYSCALL repair: breakpoint on LSTAR {lstar:#x}");
    set_debug(
        vcpu,
        KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        lstar,
        0x1,
    )
}

/// The guest wrote `data` to LSTAR (its write exited to user space).
pub fn lstar_written(arch: &mut X86_64, vcpu: &VcpuFd, data: u64) -> Result<()> {
    if let Some(r) = &mut arch.repair {
        r.lstar = data;
        if !r.stepping {
            arm(vcpu, data)?;
        }
    }
    Ok(())
}

/// A debug exit with the repair enabled.
pub fn debug_exit(arch: &mut X86_64, vcpu: &VcpuFd) -> Result<DebugOutcome> {
    let Some(r) = arch.repair else {
        return Ok(DebugOutcome::NotMine);
    };
    if r.stepping {
        // The instruction at LSTAR ran: re-arm the breakpoint.
        arm(vcpu, r.lstar)?;
        if let Some(r) = &mut arch.repair {
            r.stepping = false;
        }
        return Ok(DebugOutcome::Handled);
    }
    let rip = arch.regs(vcpu)?.rip;
    if r.lstar == 0 || rip != r.lstar {
        return Ok(DebugOutcome::NotMine);
    }
    let mut outcome = DebugOutcome::Handled;
    if arch.sregs(vcpu)?.cs.dpl == 3 {
        let star = arch
            .msrs(vcpu)?
            .iter()
            .find(|(i, _)| *i == MSR_STAR)
            .map_or(0, |(_, v)| *v);
        let kcs = ((star >> 32) & 0xfffc) as u16;
        let gdt = boot::gdt();
        let sregs = arch.sregs_mut(vcpu)?;
        sregs.cs = boot::segment_from_entry(kcs, gdt[usize::from(boot::KERNEL_CS / 8)]);
        sregs.ss = boot::segment_from_entry(kcs + 8, gdt[usize::from(boot::KERNEL_DS / 8)]);
        outcome = DebugOutcome::Completed(super::emulate::SYSCALL_ENTRY);
    }
    // Step over the instruction at LSTAR with the breakpoint off.
    set_debug(vcpu, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0)?;
    if let Some(r) = &mut arch.repair {
        r.stepping = true;
    }
    Ok(outcome)
}
