//! Architecture hooks of the KVM CPU (gem5's `updateKvmState`,
//! `updateThreadContext`, `dump`, `getHostCycles`).

pub mod x86_64;

use sim::intr::InterruptController;

use crate::vcpu::{DebugExit, Vcpu};
use crate::Result;

/// Who wants the CPU single-stepped (it steps while anyone does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stepper {
    /// Counting instructions exactly (`max_insts` without a PMU).
    Insts = 1,
    /// The instruction trace.
    Trace = 2,
    /// A repair stepping over one guest instruction.
    Repair = 4,
    /// A debugger's step.
    Debugger = 8,
    /// Stepping over the instruction at a PC event's address with its
    /// breakpoint off (so that it does not fire again there).
    PcEvent = 16,
    /// Waiting for the guest to accept an interrupt on a host whose KVM
    /// does not exit when it can ([`crate::probe::WindowAssist`]).
    IrqWindow = 32,
}

/// What a hardware breakpoint watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// Executing the instruction at the address.
    Exec,
    /// Writes to the bytes.
    Write,
    /// Reads or writes of the bytes (x86 has no read-only watchpoint).
    ReadWrite,
}

/// Why a debug exit stops the CPU for a debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugStop {
    /// The debugger's single step completed.
    Step,
    /// The debugger's software breakpoint at the program counter.
    SwBreak,
    /// The debugger's hardware execution breakpoint at this address.
    HwBreak(u64),
    /// The debugger's watchpoint of this kind at this address fired.
    Watch(BreakKind, u64),
}

/// What became of a debug exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugOutcome {
    /// A single-step trap: one guest instruction completed (counted, traced).
    pub stepped: bool,
    /// Something was completed: entry `n` of [`Arch::completable`].
    pub completed: Option<usize>,
    /// The debugger's breakpoint, watchpoint or step: the CPU stops.
    pub stop: Option<DebugStop>,
    /// A PC event's breakpoint at this address fired: the guest reached it
    /// (the instruction there has not run yet; it runs at the next entry).
    pub pc_event: Option<u64>,
}

/// What [`Arch::deliver_interrupts`] did before an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Interrupts injected (maskable and NMI).
    pub injected: u32,
    /// An interrupt waits for the guest to accept it (window requested).
    pub waiting: bool,
    /// The entry single-steps to find the guest's interrupt window (a host
    /// without window exits, [`crate::probe::WindowAssist`]).
    pub window_step: bool,
}

/// What the generic KVM CPU needs from an architecture.
///
/// The architecture keeps the *thread context* (the CPU state as the
/// simulator sees it) and synchronises it with KVM lazily: after a run the
/// context is stale and is pulled only when someone reads it; changes are
/// pushed only before the next entry, and only if someone made them.
pub trait Arch: Send {
    /// KVM ran: every cached part of the context is stale.
    fn kvm_state_changed(&mut self);

    /// Pushes every part of the context that the simulator changed to KVM
    /// (gem5's `updateKvmState`). Called before each entry.
    fn update_kvm_state(&mut self, vcpu: &mut dyn Vcpu) -> Result<()>;

    /// KVM's state was replaced wholesale (a saved state was restored into
    /// the vCPU): every cached part, dirty ones included, is dropped, and
    /// whatever the architecture derived from the old state is found again.
    fn context_replaced(&mut self, vcpu: &mut dyn Vcpu) -> Result<()>;

    /// Pulls the whole context from KVM (gem5's `updateThreadContext`).
    fn update_thread_context(&mut self, vcpu: &mut dyn Vcpu) -> Result<()>;

    /// The first six integer argument registers of the guest's calling
    /// convention, read through the lazy context.
    fn call_args(&mut self, vcpu: &mut dyn Vcpu) -> Result<[u64; 6]>;

    /// The guest's user-mode context (syscall emulation); `None` where the
    /// architecture does not give it.
    fn user_context(&mut self, _vcpu: &mut dyn Vcpu) -> Result<Option<mem::UserContext>> {
        Ok(None)
    }

    /// Sets the guest's context to `ctx` in user mode (as a return from a
    /// system call would), pushed before the next entry; false where the
    /// architecture cannot.
    fn set_user_context(&mut self, _vcpu: &mut dyn Vcpu, _ctx: &mem::UserContext) -> Result<bool> {
        Ok(false)
    }

    /// As [`Arch::set_user_context`], in kernel mode.
    fn set_kernel_context(
        &mut self,
        _vcpu: &mut dyn Vcpu,
        _ctx: &mem::UserContext,
    ) -> Result<bool> {
        Ok(false)
    }

    /// The guest's floating-point and vector state as bytes (x86-64: the
    /// XSAVE area), for a signal frame; `None` where not available.
    fn fpu_state(&mut self, _vcpu: &mut dyn Vcpu) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Replaces the floating-point state with `area` (as `fpu_state` gave
    /// it, possibly changed by the guest), at once; false if the
    /// architecture cannot or KVM refuses the area.
    fn set_fpu_state(&mut self, _vcpu: &mut dyn Vcpu, _area: &[u8]) -> Result<bool> {
        Ok(false)
    }

    /// Reads guest memory at virtual address `va` through the guest's
    /// current page tables; returns how many bytes could be read (none
    /// without attached memory).
    fn read_virt(&mut self, _vcpu: &mut dyn Vcpu, _va: u64, _buf: &mut [u8]) -> usize {
        0
    }

    /// Writes guest memory at virtual address `va` through the guest's
    /// current page tables, as the guest could: the copy stops at the
    /// first page that is not mapped writable. Returns how many bytes were
    /// written.
    fn write_virt(&mut self, _vcpu: &mut dyn Vcpu, _va: u64, _data: &[u8]) -> usize {
        0
    }

    /// A readable dump of the CPU state; with guest memory attached, also
    /// what the state points at (x86: the code at RIP, the stack, the page
    /// walk of the last page-fault address).
    fn dump(&mut self, vcpu: &mut dyn Vcpu) -> String;

    /// Before an entry, after [`Arch::update_kvm_state`]: injects what
    /// `intc` has pending if the guest can take it now, otherwise asks KVM
    /// to exit as soon as it can. Never injects a maskable interrupt while
    /// an exception the simulator completed is being injected (the vector
    /// waits in the controller for the next window instead).
    fn deliver_interrupts(
        &mut self,
        vcpu: &mut dyn Vcpu,
        intc: &mut dyn InterruptController,
    ) -> Result<Delivery>;

    /// How to find the guest's interrupt window on this host (nothing to
    /// do where KVM exits there); set once, before the first entry.
    fn set_window_assist(&mut self, _assist: crate::probe::WindowAssist) {}

    /// After an exit: picks up what the guest changed that the interrupt
    /// controller mirrors (x86: CR8 = TPR >> 4).
    fn after_run(&mut self, _vcpu: &mut dyn Vcpu, _intc: &mut dyn InterruptController) {}

    /// True when KVM holds no injected or pending event (exception,
    /// interrupt, NMI), so the state can be saved or handed over.
    fn is_drained(&mut self, vcpu: &mut dyn Vcpu) -> Result<bool>;

    /// The guest's program counter (x86: RIP), through the lazy context.
    fn program_counter(&mut self, vcpu: &mut dyn Vcpu) -> Result<u64>;

    /// The current privilege level (0 = kernel, 3 = user).
    fn privilege_level(&mut self, vcpu: &mut dyn Vcpu) -> Result<u8>;

    /// Turns single-stepping (one exit per instruction) on or off for
    /// `who`; the CPU steps while anyone wants it. Takes effect at once.
    fn set_step(&mut self, vcpu: &mut dyn Vcpu, who: Stepper, on: bool) -> Result<()>;

    /// True if `who` asked for single-stepping.
    fn is_stepping(&self, who: Stepper) -> bool;

    /// A debug exit: whose it was (a repair's breakpoint or step, a step
    /// that completed an instruction, a debugger's stop) and what it did.
    fn debug_exit(&mut self, vcpu: &mut dyn Vcpu, exit: &DebugExit) -> Result<DebugOutcome>;

    /// KVM could not emulate the instruction at the program counter
    /// (`bytes`, when KVM gave them): if it is a debugger's software
    /// breakpoint (a host whose emulator fails on `int3` instead of
    /// exiting with #BP), the debug exit it stands for.
    fn planted_breakpoint(
        &mut self,
        vcpu: &mut dyn Vcpu,
        bytes: Option<&[u8]>,
    ) -> Result<Option<DebugExit>>;

    /// The names of the instructions [`Arch::complete_instruction`] can complete.
    fn completable(&self) -> &'static [&'static str];

    /// KVM could not emulate the instruction `bytes` at the current RIP:
    /// completes it if kvmsim knows how (returns its index in
    /// [`Arch::completable`]), else returns its disassembly as the error.
    fn complete_instruction(
        &mut self,
        vcpu: &mut dyn Vcpu,
        bytes: &[u8],
    ) -> Result<std::result::Result<usize, String>>;

    /// The bytes of the current instruction (x86: up to 15 at RIP, read
    /// through the guest's page tables; fewer where memory ends, none
    /// without attached memory).
    fn instruction_bytes(&mut self, vcpu: &mut dyn Vcpu) -> Result<Vec<u8>>;

    /// One line of an instruction trace: where the CPU is (privilege level,
    /// program counter), the disassembly of `bytes` (the instruction there,
    /// empty if unreadable) and any fault-related state that changed since
    /// the previous line (x86: CR2).
    fn trace_line(&mut self, vcpu: &mut dyn Vcpu, bytes: &[u8]) -> Result<String>;

    /// Moves the guest's clock counter (x86: the TSC) forward by `cycles`:
    /// simulated time passed without the guest running (it was idle).
    fn advance_guest_clock(&mut self, vcpu: &mut dyn Vcpu, cycles: u64) -> Result<()>;

    /// Gives the architecture read access to guest memory (instruction
    /// bytes, dumps, repairs that read what the registers point at).
    fn attach_memory(&mut self, mem: vm_memory::GuestMemoryMmap);
}
