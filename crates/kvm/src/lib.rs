//! The KVM layer: a [`KvmVm`] per simulated system and a KVM-backed CPU
//! ([`KvmCpu`]) whose architecture-specific parts sit behind the [`Arch`]
//! trait ([`arch::x86_64::X86_64`] on x86-64 hosts).
//!
//! Everything unsafe and every ioctl that kvm-ioctls lacks lives in [`sys`].

pub mod arch;
pub mod bare;
pub mod cpu;
pub mod doctor;
pub mod fake;
pub mod perf;
pub mod probe;
pub mod state;
pub mod sys;
pub mod time;
pub mod timer;
pub mod vcpu;
pub mod vm;

pub use arch::Arch;
pub use cpu::{CpuConfig, CpuSaved, CpuState, KvmCpu, TickOutcome};
pub use vcpu::{KvmVcpu, Vcpu, VmExit};
pub use vm::{KvmVm, VcpuSpec};

/// Errors of the KVM layer.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("{} does not exist: this host has no KVM. Load the kvm module (modprobe kvm_intel or kvm_amd) or run on a machine with virtualization enabled", .0.display())]
    NoDevice(std::path::PathBuf),
    #[error("permission denied opening {}: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root", .0.display())]
    NoPermission(std::path::PathBuf),
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM API version {0} is not supported (12 is required)")]
    ApiVersion(i32),
    #[error("the host's KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory access failed while {what}: {source}")]
    Memory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Building or configuring a VM or vCPU failed.
    #[error("{0}")]
    Setup(String),
    /// The run timer or the kick signal failed.
    #[error("run timer: {0}")]
    Timer(String),
    /// A perf counter (instruction count, instruction stop) failed.
    #[error("perf counter: {0}")]
    PerfCounter(String),
    /// Writing the instruction trace failed.
    #[error("instruction trace: {0}")]
    Trace(String),
    /// Saving or restoring a CPU's state failed (explained).
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Completing an exit (a pending read, an injection, a half entry) failed.
    #[error("exit completion: {0}")]
    Completion(String),
}

impl KvmError {
    /// Wraps a failed ioctl.
    pub fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |source| KvmError::Ioctl { what, source }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, KvmError>;

/// For tests that need KVM: true if it is usable. Otherwise prints why the
/// test is skipped and returns false, except with `KVMSIM_REQUIRE_KVM=1`,
/// where an unusable KVM is a failure (panic).
pub fn usable_or_skip(test: &str) -> bool {
    match KvmVm::available() {
        Ok(()) => true,
        Err(e) => {
            if std::env::var("KVMSIM_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: KVM is required (KVMSIM_REQUIRE_KVM=1) but unusable: {e}");
            }
            eprintln!("SKIPPED {test}: KVM is not usable here: {e}");
            false
        }
    }
}
