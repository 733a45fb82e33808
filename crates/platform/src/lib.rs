//! The platform layer: turns a [`Config`] into a running [`System`] (memory
//! map, KVM VM and CPU, devices on the IO bus, the guest image) and writes
//! the results into an output folder.

pub mod acpi;
pub mod config;
pub mod console;
pub mod disks;
pub mod distributed;
pub mod firmware;
pub mod gdb;
pub mod input;
pub mod linux;
pub mod loader;
pub mod multiboot;
pub mod nics;
pub mod output;
pub mod pc_events;
pub mod pcap;
pub mod qemu_compat;
pub mod report;
pub mod simulation;
pub mod switch;
pub mod system;
pub mod units;

pub use config::{Config, ConfigError};
pub use output::OutDir;
pub use simulation::Simulation;
pub use system::System;

use sim::ExitCause;

/// Errors building or running a system (everything that is not the guest's fault).
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error("guest memory: {0}")]
    Ram(#[source] mem::RamError),
    #[error("{0}")]
    Kernel(String),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Multiboot(#[from] multiboot::MultibootError),
    #[error(transparent)]
    Output(#[from] output::OutputError),
    #[error(transparent)]
    OutDir(#[from] output::OutDirError),
    #[error(transparent)]
    Input(input::InputError),
    /// The user interrupted the run (SIGINT/SIGTERM) while it was being set up.
    #[error("interrupted by the user during set-up")]
    Interrupted,
    #[error("device setup: {0}")]
    Bus(#[from] mem::BusError),
    #[error("statistics: {0}")]
    Stats(#[from] sim::stats::StatsError),
    #[error("event queue: {0}")]
    Schedule(#[from] sim::ScheduleError),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Ckpt(#[from] ckpt::CkptError),
    /// A checkpoint could not be taken, or does not fit what it is
    /// restored into.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

impl From<input::InputError> for PlatformError {
    fn from(e: input::InputError) -> Self {
        match e {
            input::InputError::Interrupted { .. } => PlatformError::Interrupted,
            e => PlatformError::Input(e),
        }
    }
}

/// Process exit statuses (documented in README.md).
pub mod status {
    /// The guest called sim-ops exit.
    pub const OK: i32 = 0;
    /// The host cannot do what the run needs (e.g. an exact instruction stop).
    pub const UNSUPPORTED: i32 = 249;
    /// The simulated-time or instruction limit was reached before the guest exited.
    pub const MAX_TICK: i32 = 250;
    /// The guest halted with nothing left to wake it.
    pub const HALTED: i32 = 251;
    /// The guest faulted (triple fault, failed entry, emulation failure, ...).
    pub const GUEST_FAULT: i32 = 252;
    /// The guest reset the machine (keyboard-controller reset).
    pub const GUEST_RESET: i32 = 253;
    /// kvmsim itself failed: bad config or image, no KVM, I/O error.
    pub const SIM_ERROR: i32 = 254;
    /// The user interrupted the run (128 + SIGINT).
    pub const USER_INTERRUPT: i32 = 130;
}

/// The process exit status for an exit cause and code. A guest's fail code
/// is passed through modulo 256, except that a non-zero code never becomes 0.
pub fn exit_status(cause: ExitCause, code: i64) -> i32 {
    match cause {
        ExitCause::GuestExit if code == 0 => status::OK,
        ExitCause::GuestExit => match (code & 0xff) as i32 {
            0 => 1,
            s => s,
        },
        ExitCause::MaxTick | ExitCause::MaxInsts => status::MAX_TICK,
        ExitCause::Unsupported => status::UNSUPPORTED,
        ExitCause::GuestHalted => status::HALTED,
        ExitCause::GuestFault => status::GUEST_FAULT,
        ExitCause::GuestReset => status::GUEST_RESET,
        // QEMU's status, v * 2 + 1: odd, so never 0.
        ExitCause::DebugExit => (code & 0xff) as i32,
        ExitCause::UserInterrupt => status::USER_INTERRUPT,
        // The system that ended the run decides the status.
        ExitCause::Stopped => status::OK,
        ExitCause::Checkpoint | ExitCause::PcEvent => status::OK,
        // The program's own status, as a shell would report it.
        ExitCause::ProcessExit => (code & 0xff) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(exit_status(ExitCause::GuestExit, 0), 0);
        assert_eq!(exit_status(ExitCause::GuestExit, 3), 3);
        assert_eq!(exit_status(ExitCause::GuestExit, 256), 1);
        assert_eq!(exit_status(ExitCause::GuestExit, -1), 255);
        assert_eq!(exit_status(ExitCause::GuestFault, 0), 252);
        assert_eq!(exit_status(ExitCause::MaxTick, 0), 250);
        assert_eq!(exit_status(ExitCause::DebugExit, 1), 1);
        assert_eq!(exit_status(ExitCause::DebugExit, 0x1ff), 255);
    }
}
