//! The one owner of a vCPU's guest debugging (KVM_SET_GUEST_DEBUG).
//!
//! Several users want KVM's debug exits at once: single-stepping to count
//! instructions (`max_insts` without a PMU) and for the instruction trace,
//! the SYSCALL repair (a hardware breakpoint on the page-fault handler and
//! a step over its first instruction), and a debugger (steps, software
//! breakpoints, hardware breakpoints and watchpoints). KVM takes one
//! setting per vCPU, so each user records what it wants here and
//! [`GuestDebug::apply`] merges them: the step flag while anyone steps,
//! `KVM_GUESTDBG_USE_SW_BP` while the debugger has a software breakpoint
//! planted, and the four debug-register slots (DR0-3, DR7) shared out
//! first come, first served. The setting is written only when it changed.
//! [`GuestDebug::classify`] tells after a debug exit whose it was.
//!
//! PC events (`[[system.cpu.pc_event]]`) hold a slot each for the whole
//! run, taken when the CPU is built (before the repair arms its own, which
//! the platform leaves room for). After one fires, its slot is *suspended*
//! (kept, but left out of DR7) while the CPU single-steps the instruction
//! there, then armed again: execution breakpoints fire again at the same
//! instruction, and RF does not prevent that on the hosts we measured.

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};

use crate::arch::{BreakKind, Stepper};
use crate::vcpu::{DebugExit, Vcpu};
use crate::{KvmError, Result};

/// Who holds a hardware breakpoint slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotOwner {
    /// The SYSCALL repair's breakpoint on the page-fault handler.
    Repair,
    /// A debugger's breakpoint or watchpoint.
    Debugger,
    /// A PC event's execution breakpoint (held for the whole run).
    PcEvent,
    /// The return address of an `iret` the CPU steps over while an
    /// interrupt waits (held for one entry).
    IrqWindow,
}

/// One hardware breakpoint or watchpoint (a debug-register slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HwBreakpoint {
    pub addr: u64,
    pub kind: BreakKind,
    /// Bytes watched: 1 for an execution breakpoint; 1, 2, 4 or 8 for a
    /// watchpoint, whose address must be aligned to it.
    pub len: u8,
    pub owner: SlotOwner,
}

/// The number of debug-register slots (DR0-DR3).
pub const HW_SLOTS: usize = 4;

/// Single-step trap bit of DR6.
const DR6_BS: u64 = 1 << 14;

/// What a debug exit was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugHit {
    /// A single-step trap: one instruction completed.
    pub step: bool,
    /// An `int3` (#BP) that KVM intercepted.
    pub sw_breakpoint: bool,
    /// The slots whose breakpoint or watchpoint fired (bit n = DRn).
    pub slots: u8,
}

/// Every user's wishes and what KVM was last given.
#[derive(Debug, Default)]
pub struct GuestDebug {
    /// Bit per [`Stepper`].
    steppers: u8,
    /// Addresses where the debugger planted an `int3`.
    sw: Vec<u64>,
    slots: [Option<HwBreakpoint>; HW_SLOTS],
    /// Slots held but left out of the setting (bit n = DRn): a PC event's
    /// breakpoint while the CPU steps over its instruction.
    suspended: u8,
    /// The setting last written (control, DR0-3, DR7).
    applied: Option<(u32, [u64; 4], u64)>,
    /// KVM_SET_GUEST_DEBUG calls made.
    writes: u64,
}

impl GuestDebug {
    /// Turns single-stepping on or off for `who` (it stays on while anyone wants it).
    pub fn set_step(&mut self, who: Stepper, on: bool) {
        if on {
            self.steppers |= who as u8;
        } else {
            self.steppers &= !(who as u8);
        }
    }

    /// True if `who` asked for single-stepping.
    pub fn is_stepping(&self, who: Stepper) -> bool {
        self.steppers & who as u8 != 0
    }

    /// True if `who` is the only one single-stepping.
    pub fn only_stepper(&self, who: Stepper) -> bool {
        self.steppers == who as u8
    }

    /// True if anyone single-steps.
    pub fn stepping(&self) -> bool {
        self.steppers != 0
    }

    /// Records a software breakpoint the debugger planted at `addr` (an
    /// `int3` it wrote there): `int3` exits to kvmsim from now on.
    pub fn add_sw(&mut self, addr: u64) {
        if !self.sw.contains(&addr) {
            self.sw.push(addr);
        }
    }

    /// Forgets the software breakpoint at `addr`; false if there was none.
    pub fn remove_sw(&mut self, addr: u64) -> bool {
        let n = self.sw.len();
        self.sw.retain(|&a| a != addr);
        self.sw.len() != n
    }

    /// True if the debugger has any software breakpoint planted.
    pub fn has_any_sw(&self) -> bool {
        !self.sw.is_empty()
    }

    /// True if the debugger has a software breakpoint at `addr`.
    pub fn has_sw(&self, addr: u64) -> bool {
        self.sw.contains(&addr)
    }

    /// Takes a free slot for `bp`; returns its number. Fails, saying why,
    /// if the breakpoint is malformed or every slot is taken.
    pub fn add_hw(&mut self, bp: HwBreakpoint) -> Result<usize> {
        let len_ok = match bp.kind {
            BreakKind::Exec => bp.len == 1,
            _ => matches!(bp.len, 1 | 2 | 4 | 8) && bp.addr.is_multiple_of(u64::from(bp.len)),
        };
        if !len_ok {
            return Err(KvmError::Setup(format!(
                "a hardware {:?} breakpoint of {} bytes at {:#x}: execution breakpoints \
                 cover 1 byte, watchpoints 1, 2, 4 or 8 bytes at an address aligned to that",
                bp.kind, bp.len, bp.addr
            )));
        }
        let free = self.slots.iter().position(Option::is_none).ok_or_else(|| {
            KvmError::Setup(format!(
                "no free debug register for a hardware breakpoint at {:#x}: all {HW_SLOTS} are in use ({})",
                bp.addr,
                self.describe_slots()
            ))
        })?;
        self.slots[free] = Some(bp);
        Ok(free)
    }

    /// Frees the slot holding `owner`'s breakpoint of `kind` at `addr`
    /// (and `len`, if given); false if there was none.
    pub fn remove_hw(
        &mut self,
        owner: SlotOwner,
        addr: u64,
        kind: BreakKind,
        len: Option<u8>,
    ) -> bool {
        let found = self.slots.iter().position(|s| {
            s.is_some_and(|b| {
                b.owner == owner
                    && b.addr == addr
                    && b.kind == kind
                    && len.is_none_or(|l| l == b.len)
            })
        });
        if let Some(i) = found {
            self.slots[i] = None;
            self.suspended &= !(1 << i);
        }
        found.is_some()
    }

    /// Frees every slot of `owner`.
    pub fn clear_owner(&mut self, owner: SlotOwner) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.is_some_and(|b| b.owner == owner) {
                *s = None;
                self.suspended &= !(1 << i);
            }
        }
    }

    /// How many slots are free.
    pub fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_none()).count()
    }

    /// Leaves slot `i` out of the setting while keeping it (nobody else
    /// can take it) until [`GuestDebug::resume_slot`].
    pub fn suspend_slot(&mut self, i: usize) {
        if i < HW_SLOTS {
            self.suspended |= 1 << i;
        }
    }

    /// Arms suspended slot `i` again.
    pub fn resume_slot(&mut self, i: usize) {
        if i < HW_SLOTS {
            self.suspended &= !(1 << i);
        }
    }

    /// True if slot `i` is held but suspended.
    pub fn is_suspended(&self, i: usize) -> bool {
        i < HW_SLOTS && self.suspended & (1 << i) != 0
    }

    /// Slot `i`'s breakpoint.
    pub fn slot(&self, i: usize) -> Option<HwBreakpoint> {
        self.slots.get(i).copied().flatten()
    }

    fn describe_slots(&self) -> String {
        let v: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.map(|b| format!("DR{i}: {:?} {:?} at {:#x}", b.owner, b.kind, b.addr))
            })
            .collect();
        v.join(", ")
    }

    /// The merged setting as KVM takes it.
    pub fn control(&self) -> kvm_guest_debug {
        let mut dbg = kvm_guest_debug::default();
        let mut dr7 = 0u64;
        for (i, s) in self.slots.iter().enumerate() {
            let Some(b) = s else { continue };
            if self.is_suspended(i) {
                continue;
            }
            dbg.arch.debugreg[i] = b.addr;
            let rw: u64 = match b.kind {
                BreakKind::Exec => 0b00,
                BreakKind::Write => 0b01,
                BreakKind::ReadWrite => 0b11,
            };
            let len: u64 = match b.len {
                2 => 0b01,
                8 => 0b10,
                4 => 0b11,
                _ => 0b00,
            };
            // Ln (local enable), then RWn and LENn.
            dr7 |= 1 << (2 * i);
            dr7 |= (rw | (len << 2)) << (16 + 4 * i);
        }
        let mut control = 0;
        if self.stepping() {
            control |= KVM_GUESTDBG_SINGLESTEP;
        }
        if !self.sw.is_empty() {
            control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if dr7 != 0 {
            control |= KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[7] = dr7;
        }
        if control != 0 {
            control |= KVM_GUESTDBG_ENABLE;
        }
        dbg.control = control;
        dbg
    }

    /// Gives KVM the merged setting if it differs from what it has.
    pub fn apply(&mut self, vcpu: &mut dyn Vcpu) -> Result<()> {
        let dbg = self.control();
        let a = &dbg.arch.debugreg;
        let key = (dbg.control, [a[0], a[1], a[2], a[3]], a[7]);
        if self.applied == Some(key) {
            return Ok(());
        }
        vcpu.set_guest_debug(&dbg)?;
        self.applied = Some(key);
        self.writes += 1;
        Ok(())
    }

    /// Forgets what KVM was given (its vCPU was replaced): the next
    /// [`GuestDebug::apply`] writes the setting whatever it is.
    pub fn forget_applied(&mut self) {
        self.applied = None;
    }

    /// KVM_SET_GUEST_DEBUG calls made so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// What a debug exit was. KVM reports DR6 for a #DB (single-step bit,
    /// one bit per slot); where it leaves DR6 empty, an execution
    /// breakpoint at the exit's address is taken to have fired, else the
    /// step (if anyone steps).
    pub fn classify(&self, exit: &DebugExit) -> DebugHit {
        let mut hit = DebugHit::default();
        if exit.exception == 3 {
            hit.sw_breakpoint = true;
            return hit;
        }
        let in_use: u8 = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, s)| s.is_some() && !self.is_suspended(i))
            .fold(0, |m, (i, _)| m | (1 << i));
        hit.slots = (exit.dr6 & 0xf) as u8 & in_use;
        hit.step = exit.dr6 & DR6_BS != 0 && self.stepping();
        if hit.slots == 0 && !hit.step {
            for (i, s) in self.slots.iter().enumerate() {
                if !self.is_suspended(i)
                    && s.is_some_and(|b| b.kind == BreakKind::Exec && b.addr == exit.pc)
                {
                    hit.slots |= 1 << i;
                }
            }
            hit.step = hit.slots == 0 && self.stepping();
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(addr: u64, kind: BreakKind, len: u8, owner: SlotOwner) -> HwBreakpoint {
        HwBreakpoint {
            addr,
            kind,
            len,
            owner,
        }
    }

    #[test]
    fn merges_every_user_into_one_setting() {
        let mut d = GuestDebug::default();
        assert_eq!(d.control().control, 0);
        d.set_step(Stepper::Insts, true);
        d.add_hw(bp(0x1000, BreakKind::Exec, 1, SlotOwner::Repair))
            .unwrap();
        d.add_hw(bp(0x2008, BreakKind::Write, 8, SlotOwner::Debugger))
            .unwrap();
        d.add_sw(0x3000);
        let c = d.control();
        assert_eq!(
            c.control,
            KVM_GUESTDBG_ENABLE
                | KVM_GUESTDBG_SINGLESTEP
                | KVM_GUESTDBG_USE_SW_BP
                | KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(c.arch.debugreg[0], 0x1000);
        assert_eq!(c.arch.debugreg[1], 0x2008);
        // L0, L1; RW0 = 00 LEN0 = 00; RW1 = 01 LEN1 = 10 (8 bytes).
        assert_eq!(c.arch.debugreg[7], 0b0101 | (0b1001 << 20));
        // The step stays on while another stepper wants it.
        d.set_step(Stepper::Repair, true);
        d.set_step(Stepper::Insts, false);
        assert!(d.control().control & KVM_GUESTDBG_SINGLESTEP != 0);
        d.set_step(Stepper::Repair, false);
        assert!(d.control().control & KVM_GUESTDBG_SINGLESTEP == 0);
        // Freeing the repair's slot leaves the debugger's.
        d.clear_owner(SlotOwner::Repair);
        assert_eq!(d.control().arch.debugreg[7], 0b0100 | (0b1001 << 20));
        assert!(d.remove_sw(0x3000));
        assert!(!d.remove_sw(0x3000));
        assert!(d.remove_hw(SlotOwner::Debugger, 0x2008, BreakKind::Write, None));
        assert_eq!(d.control().control, 0);
    }

    #[test]
    fn slots_run_out_and_bad_watchpoints_are_refused() {
        let mut d = GuestDebug::default();
        for i in 0..4 {
            assert_eq!(
                d.add_hw(bp(0x1000 * i, BreakKind::Exec, 1, SlotOwner::Debugger))
                    .unwrap(),
                i as usize
            );
        }
        let e = d
            .add_hw(bp(0x9000, BreakKind::Exec, 1, SlotOwner::Repair))
            .unwrap_err();
        assert!(e.to_string().contains("no free debug register"), "{e}");
        let mut d = GuestDebug::default();
        assert!(d
            .add_hw(bp(0x1001, BreakKind::Write, 4, SlotOwner::Debugger))
            .is_err());
        assert!(d
            .add_hw(bp(0x1000, BreakKind::Write, 3, SlotOwner::Debugger))
            .is_err());
        assert!(d
            .add_hw(bp(0x1000, BreakKind::Exec, 4, SlotOwner::Debugger))
            .is_err());
    }

    #[test]
    fn pc_events_hold_slots_that_others_cannot_take() {
        let mut d = GuestDebug::default();
        // Three PC events, as the platform allocates them with the
        // repair enabled (one slot left for it).
        for (i, a) in [0x1000u64, 0x2000, 0x3000].into_iter().enumerate() {
            let s = d
                .add_hw(bp(a, BreakKind::Exec, 1, SlotOwner::PcEvent))
                .unwrap();
            assert_eq!(s, i);
        }
        assert_eq!(d.free_slots(), 1);
        // The repair arms in the last one; then nothing is left for a debugger.
        assert_eq!(
            d.add_hw(bp(0x9000, BreakKind::Exec, 1, SlotOwner::Repair))
                .unwrap(),
            3
        );
        let e = d
            .add_hw(bp(0x5000, BreakKind::Exec, 1, SlotOwner::Debugger))
            .unwrap_err();
        assert!(e.to_string().contains("PcEvent Exec at 0x2000"), "{e}");
        // A suspended slot is left out of DR7 and of classification, but
        // stays held: the repair re-arming (clear, add) does not take it.
        d.suspend_slot(1);
        let c = d.control();
        assert_eq!(c.arch.debugreg[7] & 0xff, 0b0101_0001);
        assert_eq!(c.arch.debugreg[1], 0);
        let ex = |pc, dr6| DebugExit {
            exception: 1,
            pc,
            dr6,
            dr7: 0,
        };
        assert_eq!(d.classify(&ex(0x2000, 0b10)).slots, 0);
        assert_eq!(d.classify(&ex(0x2000, 0)).slots, 0);
        d.clear_owner(SlotOwner::Repair);
        assert_eq!(
            d.add_hw(bp(0x9100, BreakKind::Exec, 1, SlotOwner::Repair))
                .unwrap(),
            3
        );
        assert_eq!(d.slot(1).unwrap().addr, 0x2000);
        d.resume_slot(1);
        assert_eq!(d.control().arch.debugreg[7] & 0xff, 0b0101_0101);
        assert_eq!(d.classify(&ex(0x2000, 0)).slots, 0b10);
        // The debugger's clear leaves PC events alone; removing a
        // suspended slot forgets the suspension.
        d.clear_owner(SlotOwner::Debugger);
        assert_eq!(d.free_slots(), 0);
        d.suspend_slot(2);
        assert!(d.remove_hw(SlotOwner::PcEvent, 0x3000, BreakKind::Exec, None));
        assert!(!d.is_suspended(2));
        d.add_hw(bp(0x4000, BreakKind::Exec, 1, SlotOwner::Debugger))
            .unwrap();
        assert_eq!(d.control().arch.debugreg[2], 0x4000);
    }

    #[test]
    fn classifies_exits() {
        let mut d = GuestDebug::default();
        d.add_hw(bp(0x1000, BreakKind::Exec, 1, SlotOwner::Repair))
            .unwrap();
        let ex = |exception, pc, dr6| DebugExit {
            exception,
            pc,
            dr6,
            dr7: 0,
        };
        assert!(d.classify(&ex(3, 0x5000, 0)).sw_breakpoint);
        assert_eq!(d.classify(&ex(1, 0x1000, 1)).slots, 1);
        // DR6 empty: the execution breakpoint at the address.
        assert_eq!(d.classify(&ex(1, 0x1000, 0)).slots, 1);
        // Nobody steps: a step bit is not taken for a step.
        assert!(!d.classify(&ex(1, 0x2000, DR6_BS)).step);
        d.set_step(Stepper::Trace, true);
        let h = d.classify(&ex(1, 0x2000, DR6_BS));
        assert!(h.step && h.slots == 0);
        assert!(d.classify(&ex(1, 0x2000, 0)).step);
        // A slot bit for a free slot is ignored.
        assert_eq!(d.classify(&ex(1, 0x2000, 0b10 | DR6_BS)).slots, 0);
    }

    #[test]
    fn writes_only_on_change() {
        let mut v = crate::fake::FakeVcpu::new(vec![]);
        let mut d = GuestDebug::default();
        d.set_step(Stepper::Insts, true);
        d.apply(&mut v).unwrap();
        d.apply(&mut v).unwrap();
        assert_eq!(d.writes(), 1);
        assert_eq!(
            v.guest_debug.control,
            KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
        );
        d.set_step(Stepper::Insts, false);
        d.apply(&mut v).unwrap();
        assert_eq!(d.writes(), 2);
        assert_eq!(v.guest_debug.control, 0);
    }
}
