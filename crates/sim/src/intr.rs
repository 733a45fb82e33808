//! The interface between a CPU and its interrupt controller.
//!
//! The CPU asks before every entry into the guest: is something pending? If
//! a maskable interrupt is pending and the guest can take it, the CPU
//! acknowledges it (the controller moves it into service and returns its
//! vector) and injects it; otherwise it asks to be told when the guest can.
//! NMIs are taken regardless of the guest's interrupt flag.

/// The highest-priority thing a controller has for its CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    None,
    /// A maskable (external) interrupt.
    Maskable,
    /// A non-maskable interrupt.
    Nmi,
}

/// What a controller does with the guest's write of a model-specific
/// register ([`InterruptController::msr_write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsrWrite {
    /// The write is refused: the guest gets #GP, nothing changed.
    Fault,
    /// The controller took the write, which cost `latency` ticks.
    Done { latency: crate::Tick },
    /// The write is legal as far as the controller is concerned; the CPU
    /// hands it on (x86: to KVM, which checks it too) and, if the CPU
    /// accepts it, tells the controller with
    /// [`InterruptController::msr_written`].
    ToCpu,
}

/// An interrupt controller as a CPU sees it.
pub trait InterruptController: Send {
    /// What is pending, without changing anything.
    fn pending(&mut self) -> Pending;
    /// Takes the highest-priority maskable interrupt and returns its vector.
    fn acknowledge(&mut self) -> Option<u8>;
    /// Takes a pending NMI; true if there was one.
    fn take_nmi(&mut self) -> bool;

    /// The CPU is in its NMI handler and the NMIs wait here for its end:
    /// as the CPU latches one NMI during a handler, at most one stays
    /// pending (the others merge into it). Controllers without NMIs need
    /// nothing.
    fn merge_nmis(&mut self) {}

    /// The task priority (x86: the local APIC's TPR, mirrored in CR8 as
    /// TPR >> 4). Controllers without one report 0.
    fn task_priority(&self) -> u8 {
        0
    }

    /// The guest changed the task priority behind the controller's back
    /// (x86: `mov %reg, %cr8`).
    fn set_task_priority(&mut self, _tpr: u8) {}

    /// The guest writes model-specific register `index` (one the CPU
    /// traps: x86's IA32_APIC_BASE, and the x2APIC registers 0x800-0x8FF
    /// when x2APIC is offered) at `now`; requests for the simulator go to
    /// `requests`. The default leaves every write to the CPU.
    fn msr_write(
        &mut self,
        _index: u32,
        _value: u64,
        _now: crate::Tick,
        _requests: &mut Vec<crate::Request>,
    ) -> MsrWrite {
        MsrWrite::ToCpu
    }

    /// The guest reads model-specific register `index`, one the CPU could
    /// not read itself (x86: an x2APIC register): its value and the
    /// latency in ticks, or None for #GP (the default).
    fn msr_read(&mut self, _index: u32, _now: crate::Tick) -> Option<(u64, crate::Tick)> {
        None
    }

    /// The guest wrote a model-specific register the controller owns (x86:
    /// IA32_APIC_BASE, 0x1B), the controller let it through
    /// ([`MsrWrite::ToCpu`]) and the CPU accepted the value.
    fn msr_written(&mut self, _index: u32, _value: u64) {}

    /// A one-line description of the controller's state (for samples and dumps).
    fn describe(&self) -> String {
        String::new()
    }
}
