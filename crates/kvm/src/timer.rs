//! Forcing exits from KVM: the kick signal, its masks, and the run timer.
//!
//! Each CPU's thread (the thread that executes its event queue) sets up, from
//! a startup event on that queue ([`ThreadSignals::setup`]):
//!
//! * a no-op handler for the kick signal (SIGRTMIN);
//! * KVM's run mask = the thread's mask minus the control signals, so the
//!   kick interrupts KVM_RUN even if the thread inherited it blocked;
//! * the kick signal blocked outside KVM (pthread_sigmask), so a kick that
//!   arrives in user space waits, pending, for the next entry, where KVM
//!   exits at once;
//! * the run timer, which signals exactly this thread.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use kvm_ioctls::VcpuFd;
use sim::Tick;

use crate::cpu::CpuConfig;
use crate::perf::{PerfCounter, PerfEvent};
use crate::sys::{self, PosixTimer};

/// The signal that forces a vCPU out of KVM.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Which run timer forces exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// A POSIX timer on CLOCK_MONOTONIC signalling the CPU's thread.
    Posix,
    /// A perf counter overflow: host cycles in the guest (needs a PMU).
    PerfCycles,
    /// A perf counter overflow on the thread's task clock (software; for
    /// hosts without a PMU and for testing the perf path).
    PerfTaskClock,
}

/// The run timer of one CPU.
pub enum RunTimer {
    Posix(PosixTimer),
    /// A perf counter, with the count and span of the current arming
    /// (expiry is read from the counter: the overflow signal itself is
    /// consumed by its handler inside KVM_RUN).
    Perf(PerfCounter, std::cell::Cell<(u64, u64)>),
}

/// Fewest host cycles (of `host_freq`) a run is armed for (gem5: 1000).
pub const MIN_HOST_CYCLES: u64 = 1000;

impl RunTimer {
    /// Creates the timer for the calling thread.
    pub fn new(kind: TimerKind) -> io::Result<Self> {
        let tid = sys::gettid();
        Ok(match kind {
            TimerKind::Posix => RunTimer::Posix(PosixTimer::new(kick_signal(), tid)?),
            TimerKind::PerfCycles | TimerKind::PerfTaskClock => {
                let event = if kind == TimerKind::PerfCycles {
                    PerfEvent::GuestCycles
                } else {
                    PerfEvent::TaskClock
                };
                let c = PerfCounter::open(event, tid, Some(u64::MAX / 2))?;
                c.signal_overflow_to(kick_signal(), tid)?;
                RunTimer::Perf(c, Default::default())
            }
        })
    }

    /// The shortest span the timer is armed for, in ticks.
    pub fn resolution(&self, cfg: &CpuConfig) -> Tick {
        let min = cfg.host_cycles_to_ticks(MIN_HOST_CYCLES);
        match self {
            RunTimer::Posix(_) => min.max(
                (sys::monotonic_resolution_ns() as f64
                    * sim::tick::TICKS_PER_NS as f64
                    * cfg.host_factor) as Tick,
            ),
            RunTimer::Perf(..) => min,
        }
    }

    /// Arms the timer to fire after `ticks` of simulated time.
    pub fn arm(&self, ticks: Tick, cfg: &CpuConfig) -> io::Result<()> {
        match self {
            RunTimer::Posix(t) => t.arm(cfg.ticks_to_host_ns(ticks)),
            RunTimer::Perf(c, armed) => {
                let units = match c.event() {
                    // Task clock counts nanoseconds.
                    PerfEvent::TaskClock => cfg.ticks_to_host_ns(ticks),
                    _ => cfg.ticks_to_host_cycles(ticks),
                }
                .max(1);
                armed.set((c.read()?, units));
                c.arm_overflow(units)
            }
        }
    }

    /// Disarms; returns true if the timer expired.
    pub fn disarm(&self) -> io::Result<bool> {
        match self {
            RunTimer::Posix(t) => t.disarm(),
            RunTimer::Perf(c, armed) => {
                c.disable()?;
                let (start, units) = armed.get();
                Ok(c.read()?.saturating_sub(start) >= units)
            }
        }
    }
}

/// A handle that kicks a CPU out of KVM from any thread.
#[derive(Debug, Clone, Default)]
pub struct KickHandle {
    thread: Arc<AtomicU64>,
}

impl KickHandle {
    /// Forces the CPU out of KVM (or makes its next entry return at once).
    /// Does nothing before the CPU's thread has started.
    pub fn kick(&self) {
        let t = self.thread.load(Ordering::Acquire);
        if t != 0 {
            if let Err(e) = sys::pthread_kill(t, kick_signal()) {
                tracing::warn!("kick failed: {e}");
            }
        }
    }

    fn set(&self, t: Option<libc::pthread_t>) {
        self.thread.store(t.unwrap_or(0), Ordering::Release);
    }
}

/// The per-thread signal state of a CPU.
pub struct ThreadSignals {
    pub timer: RunTimer,
    kick: KickHandle,
}

impl ThreadSignals {
    /// Sets up kick handling and the run timer on the calling thread (see
    /// the module documentation). Must run on the thread that will call KVM_RUN.
    pub fn setup(vcpu: &VcpuFd, kind: TimerKind, kick: &KickHandle) -> io::Result<Self> {
        install_kick_handler()?;
        let sig = kick_signal();
        // The mask KVM uses inside KVM_RUN: the thread's current mask with
        // the control signal removed, even if the thread inherited it blocked.
        let current = sys::thread_sigmask(libc::SIG_BLOCK, None)?;
        let mut run_mask = current;
        sys::sigset_change(&mut run_mask, sig, false);
        sys::set_kvm_signal_mask(vcpu, &run_mask)?;
        // Outside KVM the kick waits, blocked.
        let mut block = sys::empty_sigset();
        sys::sigset_change(&mut block, sig, true);
        sys::thread_sigmask(libc::SIG_BLOCK, Some(&block))?;
        sys::discard_pending(sig);
        let timer = RunTimer::new(kind)?;
        kick.set(Some(sys::pthread_self()));
        Ok(ThreadSignals {
            timer,
            kick: kick.clone(),
        })
    }
}

impl ThreadSignals {
    /// Arms the run timer for `ns` host units (nanoseconds, or events of a
    /// perf timer), bypassing the CPU model (for benchmarks).
    pub fn arm_timer_ns(&self, ns: u64) -> io::Result<()> {
        match &self.timer {
            RunTimer::Posix(t) => t.arm(ns),
            RunTimer::Perf(c, armed) => {
                armed.set((c.read()?, ns.max(1)));
                c.arm_overflow(ns.max(1))
            }
        }
    }

    /// Disarms the run timer; true if it expired.
    pub fn disarm_timer(&self) -> io::Result<bool> {
        self.timer.disarm()
    }
}

impl Drop for ThreadSignals {
    fn drop(&mut self) {
        // Nobody may signal this thread through the handle any more.
        self.kick.set(None);
    }
}
