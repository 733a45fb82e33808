//! Why a simulation stopped.

use serde::{Deserialize, Serialize};

use crate::tick::Tick;

/// The cause of a simulation exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitCause {
    /// The guest asked to stop (sim-ops exit or fail); the code is the guest's.
    GuestExit,
    /// The configured simulated-time limit was reached.
    MaxTick,
    /// The configured guest-instruction limit was reached.
    MaxInsts,
    /// The run needed something this host cannot do (explained in the message).
    Unsupported,
    /// The guest did something the CPU cannot continue from (triple fault,
    /// failed entry, emulation failure, ...).
    GuestFault,
    /// The CPU halted and nothing was left that could wake it.
    GuestHalted,
    /// The user interrupted the run (SIGINT / SIGTERM).
    UserInterrupt,
    /// Another system of the same run ended it (`sim.stop_on_fault`).
    Stopped,
    /// The guest reset the machine (e.g. Linux's `reboot=k`).
    GuestReset,
    /// The guest wrote v to QEMU's isa-debug-exit port; the code is QEMU's
    /// status for it, v * 2 + 1.
    DebugExit,
    /// A checkpoint was taken and the run was configured to end there
    /// (`sim.checkpoint_exit`).
    Checkpoint,
    /// The guest reached a PC event whose action is `exit`
    /// (`[[system.cpu.pc_event]]`).
    PcEvent,
    /// The emulated process exited or was killed (SE mode); the code is its
    /// exit status (128 + the signal when killed).
    ProcessExit,
}

impl ExitCause {
    /// A short human-readable description (as printed at the end of a run).
    pub fn describe(&self) -> &'static str {
        match self {
            ExitCause::GuestExit => "the guest called sim-ops exit/fail",
            ExitCause::MaxTick => "the simulated-time limit was reached",
            ExitCause::MaxInsts => "the instruction limit was reached",
            ExitCause::Unsupported => "the host cannot do what the run needs",
            ExitCause::GuestFault => "guest fault",
            ExitCause::GuestHalted => "the guest halted with nothing left to wake it",
            ExitCause::UserInterrupt => "user interrupt",
            ExitCause::Stopped => "another system ended the run",
            ExitCause::GuestReset => "the guest reset the machine",
            ExitCause::DebugExit => "the guest wrote to isa-debug-exit (QEMU's status v*2+1)",
            ExitCause::Checkpoint => "a checkpoint was taken (sim.checkpoint_exit)",
            ExitCause::PcEvent => "the guest reached a PC event whose action is exit",
            ExitCause::ProcessExit => "the program exited",
        }
    }
}

/// A simulation exit: cause, code and the tick at which it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitEvent {
    pub cause: ExitCause,
    /// The guest's exit code for [`ExitCause::GuestExit`]; 0 otherwise.
    pub code: i64,
    pub tick: Tick,
    /// Details (for example a register dump for a guest fault).
    pub message: String,
}

impl ExitEvent {
    pub fn new(cause: ExitCause, code: i64, tick: Tick, message: impl Into<String>) -> Self {
        ExitEvent {
            cause,
            code,
            tick,
            message: message.into(),
        }
    }
}
