//! A scripted vCPU for testing the CPU model without `/dev/kvm`.
//!
//! [`FakeVcpu`] plays a script of [`Step`]s (host cycles of guest execution
//! and the exit that ends them) on a host clock of its own, shared with a
//! run timer ([`FakeTimer`]) that cuts a step short when it fires. It keeps
//! a register file and models what matters of KVM's injection semantics:
//! an interrupt given with KVM_INTERRUPT is delivered at the next entry
//! unless a later KVM_SET_VCPU_EVENTS replaced it (the defect the CPU model
//! must avoid), and a pending read must be completed before the next entry.
//! It records what happened ([`Record`]) for tests to check.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_mp_state, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs,
};
use sim::Tick;

use crate::time::CpuConfig;
use crate::timer::{ExitTimer, KickHandle, TimerKind};
use crate::vcpu::{Vcpu, VmExit, XsaveArea};
use crate::{KvmError, Result};

/// One scripted stretch of guest execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Host cycles the guest runs before `exit`.
    pub cycles: u64,
    /// How the stretch ends.
    pub exit: VmExit,
    /// The stretch is one instruction the host needs `cycles` for: a timer
    /// that fires earlier cuts it off with nothing done (the program
    /// counter stays, the step is retried whole). Otherwise a cut-off
    /// stretch keeps its remaining cycles and counts as progress.
    pub atomic: bool,
    /// The host clock reads this at the exit (to model a counter that
    /// goes back), instead of advancing by `cycles`.
    pub clock_at_exit: Option<u64>,
}

impl Step {
    /// `cycles` of execution ending in `exit`.
    pub fn new(cycles: u64, exit: VmExit) -> Self {
        Step {
            cycles,
            exit,
            atomic: false,
            clock_at_exit: None,
        }
    }

    /// A stretch after which the host clock reads `clock`.
    pub fn clock_at_exit(exit: VmExit, clock: u64) -> Self {
        Step {
            cycles: 0,
            exit,
            atomic: false,
            clock_at_exit: Some(clock),
        }
    }

    /// One instruction that needs `cycles` uninterrupted host cycles.
    pub fn atomic(cycles: u64, exit: VmExit) -> Self {
        Step {
            cycles,
            exit,
            atomic: true,
            clock_at_exit: None,
        }
    }
}

/// What the fake saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Record {
    /// Entries (KVM_RUN), half entries included.
    pub entries: u64,
    pub half_entries: u64,
    /// Vectors given with KVM_INTERRUPT.
    pub injected: Vec<u8>,
    /// Vectors the guest took (delivered at an entry).
    pub taken: Vec<u8>,
    /// Injected vectors a KVM_SET_VCPU_EVENTS discarded before delivery.
    pub discarded: Vec<u8>,
    /// Interrupts injected while an exception was being injected.
    pub injected_beside_exception: u64,
    /// Exceptions delivered to the guest (vector numbers).
    pub exceptions: Vec<u32>,
    /// Their error codes (none where the exception has none).
    pub error_codes: Vec<Option<u32>>,
    pub nmis: u64,
    /// Reads completed (bytes given), in order.
    pub completions: Vec<Vec<u8>>,
    /// MSR accesses completed: (#GP, the value a read returns; 0 for a
    /// write), in order.
    pub msr_completions: Vec<(bool, u64)>,
    /// Entries made while a read was still waiting for its data.
    pub uncompleted_entries: u64,
    /// Completions attempted with no read pending.
    pub stray_completions: u64,
    /// Timer exits (the run timer cut a step short).
    pub timer_exits: u64,
    /// KVM_SET_VCPU_EVENTS calls.
    pub set_events: u64,
    /// KVM_SET_GUEST_DEBUG calls.
    pub set_guest_debug: u64,
}

/// The run timer's state, shared by the fake vCPU and its timer.
#[derive(Debug, Default)]
struct TimerState {
    /// Host cycle at which the armed timer fires.
    deadline: Option<u64>,
    arms: u64,
}

/// A scripted vCPU (see the module documentation).
pub struct FakeVcpu {
    /// What is left to run.
    pub script: VecDeque<Step>,
    /// Host cycles between the timer's expiry and the exit it causes.
    pub timer_latency: u64,
    /// The host clock (cycles).
    pub clock: u64,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub msrs: Vec<(u32, u64)>,
    /// MSRs KVM refuses to read or write (a bulk access stops at the
    /// first of them, as KVM_GET_MSRS and KVM_SET_MSRS do).
    pub refused_msrs: Vec<u32>,
    /// MSRs whose writes succeed and change nothing (as some hosts' KVM
    /// does with IA32_TSC).
    pub ignored_msrs: Vec<u32>,
    /// KVM's MSR save list as this fake reports it.
    pub msr_list: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest-debug setting last given (KVM_SET_GUEST_DEBUG).
    pub guest_debug: kvm_guest_debug,
    /// What the CPU is told this host needs (no window exits: steps).
    pub window_assist: crate::probe::WindowAssist,
    events: kvm_vcpu_events,
    record: Record,
    timer: Arc<Mutex<TimerState>>,
    /// The read waiting for its data.
    pending_read: Option<VmExit>,
    ready: bool,
    window_requested: bool,
    cr8: u64,
}

impl Default for FakeVcpu {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl FakeVcpu {
    /// A vCPU that will play `script` (and halt when it ends).
    pub fn new(script: Vec<Step>) -> Self {
        let mut regs = kvm_regs {
            rip: 0x10_0000,
            rflags: 0x202,
            ..Default::default()
        };
        regs.rsp = 0x8_0000;
        FakeVcpu {
            script: script.into(),
            timer_latency: 0,
            clock: 1_000_000,
            regs,
            sregs: kvm_sregs::default(),
            fpu: kvm_fpu::default(),
            msrs: Vec::new(),
            refused_msrs: Vec::new(),
            ignored_msrs: Vec::new(),
            msr_list: Vec::new(),
            xcrs: kvm_xcrs::default(),
            debug_regs: kvm_debugregs::default(),
            mp_state: kvm_mp_state::default(),
            cpuid: Vec::new(),
            guest_debug: kvm_guest_debug::default(),
            window_assist: crate::probe::WindowAssist::default(),
            events: kvm_vcpu_events::default(),
            record: Record::default(),
            timer: Arc::default(),
            pending_read: None,
            ready: true,
            window_requested: false,
            cr8: 0,
        }
    }

    /// What the fake saw so far.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Times the run timer was (re-)armed.
    pub fn timer_arms(&self) -> u64 {
        self.lock_timer().arms
    }

    /// Whether the guest had asked for an interrupt window at the last entry.
    /// Puts the guest in its NMI handler (NMIs masked) or out of it (its
    /// `iret`: an NMI KVM held is then taken).
    pub fn set_in_nmi_handler(&mut self, inside: bool) {
        self.events.nmi.masked = u8::from(inside);
        if !inside {
            self.events.nmi.pending = 0;
        }
    }

    /// An NMI KVM holds for the end of the guest's handler.
    pub fn nmi_held(&self) -> bool {
        self.events.nmi.pending != 0
    }

    pub fn window_requested(&self) -> bool {
        self.window_requested
    }

    fn lock_timer(&self) -> std::sync::MutexGuard<'_, TimerState> {
        self.timer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivers what is injected, as KVM does on entry.
    fn deliver(&mut self) {
        if self.events.exception.injected != 0 {
            self.record
                .exceptions
                .push(u32::from(self.events.exception.nr));
            self.record.error_codes.push(
                (self.events.exception.has_error_code != 0)
                    .then_some(self.events.exception.error_code),
            );
            self.events.exception.injected = 0;
        }
        if self.events.interrupt.injected != 0 {
            self.record.taken.push(self.events.interrupt.nr);
            self.events.interrupt.injected = 0;
        }
    }
}

impl Vcpu for FakeVcpu {
    fn run(&mut self, io_out: &mut Vec<u8>) -> VmExit {
        io_out.clear();
        self.record.entries += 1;
        if self.pending_read.take().is_some() {
            self.record.uncompleted_entries += 1;
        }
        self.deliver();
        let Some(step) = self.script.front().cloned() else {
            return VmExit::Hlt;
        };
        let deadline = self.lock_timer().deadline;
        if let Some(d) = deadline.filter(|&d| d < self.clock.saturating_add(step.cycles)) {
            // The timer fires first.
            let ran = d.saturating_sub(self.clock);
            self.clock = d.max(self.clock).saturating_add(self.timer_latency);
            self.record.timer_exits += 1;
            if !step.atomic {
                if let Some(s) = self.script.front_mut() {
                    s.cycles -= ran.min(s.cycles);
                }
                if ran > 0 {
                    self.regs.rip += 1;
                }
            }
            return VmExit::Intr;
        }
        self.script.pop_front();
        self.clock = step
            .clock_at_exit
            .unwrap_or(self.clock.saturating_add(step.cycles));
        self.regs.rip += 1;
        match &step.exit {
            VmExit::IoOut { size, count, .. } => {
                io_out.resize(usize::from(*size) * *count as usize, 0xab);
            }
            VmExit::IoIn { .. }
            | VmExit::MmioRead { .. }
            | VmExit::MsrRead { .. }
            | VmExit::MsrWrite { .. } => {
                self.pending_read = Some(step.exit.clone());
            }
            _ => {}
        }
        step.exit
    }

    fn half_entry(&mut self) -> Result<()> {
        self.record.entries += 1;
        self.record.half_entries += 1;
        if self.pending_read.take().is_some() {
            self.record.uncompleted_entries += 1;
        }
        Ok(())
    }

    fn host_cycles(&self) -> u64 {
        self.clock
    }

    fn thread_setup(&mut self, _kind: TimerKind, _kick: &KickHandle) -> Result<Box<dyn ExitTimer>> {
        Ok(Box::new(FakeTimer {
            state: self.timer.clone(),
        }))
    }

    fn has_pmu(&self) -> bool {
        false
    }

    fn window_assist(&self) -> crate::probe::WindowAssist {
        self.window_assist
    }

    fn regs(&self) -> Result<kvm_regs> {
        Ok(self.regs)
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        self.regs = *regs;
        Ok(())
    }
    fn sregs(&self) -> Result<kvm_sregs> {
        Ok(self.sregs)
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<()> {
        self.sregs = *sregs;
        Ok(())
    }
    fn fpu(&self) -> Result<kvm_fpu> {
        Ok(self.fpu)
    }
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<()> {
        self.fpu = *fpu;
        Ok(())
    }
    fn xsave(&self) -> Result<Option<XsaveArea>> {
        Ok(None)
    }
    fn set_xsave(&mut self, _xsave: &XsaveArea) -> Result<()> {
        Ok(())
    }
    fn xcrs(&self) -> Result<kvm_xcrs> {
        Ok(self.xcrs)
    }
    fn set_xcrs(&mut self, xcrs: &kvm_xcrs) -> Result<()> {
        self.xcrs = *xcrs;
        Ok(())
    }
    fn events(&self) -> Result<kvm_vcpu_events> {
        Ok(self.events)
    }
    fn set_events(&mut self, events: &kvm_vcpu_events) -> Result<()> {
        self.record.set_events += 1;
        // KVM takes the block as given: an interrupt injected since the
        // block was read, and absent from it, is gone.
        if self.events.interrupt.injected != 0
            && (events.interrupt.injected == 0 || events.interrupt.nr != self.events.interrupt.nr)
        {
            self.record.discarded.push(self.events.interrupt.nr);
        }
        self.events = *events;
        Ok(())
    }
    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        Ok(indices
            .iter()
            .take_while(|i| !self.refused_msrs.contains(i))
            .map(|i| {
                let v = self
                    .msrs
                    .iter()
                    .find(|(n, _)| n == i)
                    .map_or(0, |&(_, v)| v);
                (*i, v)
            })
            .collect())
    }
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<usize> {
        let mut done = 0;
        for &(i, v) in msrs {
            if self.refused_msrs.contains(&i) {
                break;
            }
            if self.ignored_msrs.contains(&i) {
                done += 1;
                continue;
            }
            match self.msrs.iter_mut().find(|(n, _)| *n == i) {
                Some(e) => e.1 = v,
                None => self.msrs.push((i, v)),
            }
            done += 1;
        }
        Ok(done)
    }
    fn debug_regs(&self) -> Result<kvm_debugregs> {
        Ok(self.debug_regs)
    }
    fn set_debug_regs(&mut self, dr: &kvm_debugregs) -> Result<()> {
        self.debug_regs = *dr;
        Ok(())
    }
    fn mp_state(&self) -> Result<kvm_mp_state> {
        Ok(self.mp_state)
    }
    fn set_mp_state(&mut self, mp: kvm_mp_state) -> Result<()> {
        self.mp_state = mp;
        Ok(())
    }
    fn cpuid_entries(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        Ok(self.cpuid.clone())
    }
    fn set_cpuid_entries(&mut self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        self.cpuid = entries.to_vec();
        Ok(())
    }
    fn saved_msr_indices(&self) -> Result<Vec<u32>> {
        Ok(self.msr_list.clone())
    }
    fn set_guest_debug(&mut self, dbg: &kvm_guest_debug) -> Result<()> {
        self.guest_debug = *dbg;
        self.record.set_guest_debug += 1;
        Ok(())
    }
    fn nmi(&mut self) -> Result<()> {
        self.record.nmis += 1;
        // KVM holds an NMI that arrives during the guest's NMI handler.
        if self.events.nmi.masked != 0 {
            self.events.nmi.pending = 1;
        }
        Ok(())
    }
    fn interrupt(&mut self, vector: u8) -> Result<()> {
        if self.events.interrupt.injected != 0 {
            return Err(KvmError::Completion(format!(
                "KVM_INTERRUPT (vector {vector:#x}) with vector {:#x} still injected",
                self.events.interrupt.nr
            )));
        }
        if self.events.exception.injected != 0 {
            self.record.injected_beside_exception += 1;
        }
        self.record.injected.push(vector);
        self.events.interrupt.injected = 1;
        self.events.interrupt.nr = vector;
        Ok(())
    }
    fn interrupt_window(&mut self) -> (bool, bool) {
        (
            self.ready && self.events.interrupt.injected == 0,
            self.regs.rflags & 0x200 != 0,
        )
    }
    fn request_interrupt_window(&mut self, on: bool) {
        self.window_requested = on;
    }
    fn cr8(&mut self) -> u64 {
        self.cr8
    }
    fn set_cr8(&mut self, cr8: u64) {
        self.cr8 = cr8;
    }
    fn complete_io_in(&mut self, data: &[u8]) -> bool {
        match &self.pending_read {
            Some(VmExit::IoIn { size, count, .. })
                if usize::from(*size) * *count as usize == data.len() =>
            {
                self.pending_read = None;
                self.record.completions.push(data.to_vec());
                true
            }
            _ => {
                self.record.stray_completions += 1;
                false
            }
        }
    }
    fn complete_msr(&mut self, failed: bool, data: u64) -> bool {
        match &self.pending_read {
            Some(VmExit::MsrRead { .. } | VmExit::MsrWrite { .. }) => {
                self.pending_read = None;
                self.record.msr_completions.push((failed, data));
                true
            }
            _ => {
                self.record.stray_completions += 1;
                false
            }
        }
    }
    fn complete_mmio_read(&mut self, data: &[u8]) -> bool {
        match &self.pending_read {
            Some(VmExit::MmioRead { len, .. }) if *len == data.len() => {
                self.pending_read = None;
                self.record.completions.push(data.to_vec());
                true
            }
            _ => {
                self.record.stray_completions += 1;
                false
            }
        }
    }
    fn coalesced_mmio_read(&mut self) -> Option<(u64, [u8; 8], usize)> {
        None
    }
}

/// The fake vCPU's run timer.
pub struct FakeTimer {
    state: Arc<Mutex<TimerState>>,
}

impl ExitTimer for FakeTimer {
    fn resolution(&self, cfg: &CpuConfig) -> Tick {
        cfg.host_cycles_to_ticks(crate::timer::MIN_HOST_CYCLES)
    }

    fn arm(&mut self, ticks: Option<Tick>, cfg: &CpuConfig, now: u64) -> std::io::Result<()> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.deadline = ticks.map(|t| now.saturating_add(cfg.ticks_to_host_cycles(t).max(1)));
        s.arms += 1;
        Ok(())
    }

    fn after_run(&mut self, now: u64, _signal_exit: bool) -> std::io::Result<bool> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expired = s.deadline.is_some_and(|d| now >= d);
        s.deadline = None;
        Ok(expired)
    }
}
