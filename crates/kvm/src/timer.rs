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
use std::sync::{Arc, Mutex, Once};

use kvm_ioctls::VcpuFd;
use sim::Tick;

use crate::perf::{PerfCounter, PerfEvent};
use crate::sys::{self, PosixTimer};
use crate::time::CpuConfig;

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

/// The resolution of CLOCK_MONOTONIC, read once per process.
fn monotonic_resolution_ns() -> u64 {
    static RES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *RES.get_or_init(sys::monotonic_resolution_ns)
}

/// The run timer as the CPU uses it: armed before an entry, asked after it.
/// Implementations avoid system calls that cannot change the outcome.
pub trait ExitTimer: Send {
    /// The shortest span the timer can be armed for, in ticks.
    fn resolution(&self, cfg: &CpuConfig) -> Tick;
    /// Before an entry at host cycles `now`: the timer must fire no later
    /// than `ticks` of simulated time from now (`None`: no bound needed; a
    /// timer still armed from before may fire, which only costs an exit).
    fn arm(&mut self, ticks: Option<Tick>, cfg: &CpuConfig, now: u64) -> io::Result<()>;
    /// After a run that ended at host cycles `now` (`signal_exit`: KVM_RUN
    /// returned EINTR): true if the timer expired. A pending timer signal or
    /// kick that would end the next entry at once is discarded.
    fn after_run(&mut self, now: u64, signal_exit: bool) -> io::Result<bool>;
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
                (monotonic_resolution_ns() as f64
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
///
/// Sound by construction: the target thread is named under a lock, and the
/// CPU's thread clears it under the same lock before it can end (from a
/// thread-local guard that runs when the thread exits, and when its
/// [`ThreadSignals`] are dropped), so a kick never signals a thread that
/// has gone.
#[derive(Debug, Clone, Default)]
pub struct KickHandle {
    inner: Arc<KickInner>,
}

#[derive(Debug, Default)]
struct KickInner {
    thread: Mutex<Option<libc::pthread_t>>,
    /// Kicks sent so far (the CPU's thread compares it across a run to
    /// know whether a late kick may be pending).
    sent: AtomicU64,
}

impl KickHandle {
    /// Forces the CPU out of KVM (or makes its next entry return at once).
    /// Does nothing before the CPU's thread has started or after it ended.
    pub fn kick(&self) {
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = *thread {
            self.inner.sent.fetch_add(1, Ordering::AcqRel);
            // SAFETY: `t` is alive: the CPU's thread clears the slot under
            // this lock before it ends (KickGuard), and we hold the lock.
            if let Err(e) = unsafe { sys::pthread_kill(t, kick_signal()) } {
                tracing::warn!("kick failed: {e}");
            }
        }
    }

    /// Kicks sent so far.
    pub fn sent(&self) -> u64 {
        self.inner.sent.load(Ordering::Acquire)
    }

    fn set(&self, t: Option<libc::pthread_t>) {
        *self
            .inner
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = t;
    }
}

/// Clears the kick handles of the CPUs set up on a thread when the thread
/// ends (thread-local destructors run before the thread is gone).
#[derive(Default)]
struct KickGuard(Vec<KickHandle>);

impl Drop for KickGuard {
    fn drop(&mut self) {
        for k in &self.0 {
            k.set(None);
        }
    }
}

thread_local! {
    static KICK_GUARD: std::cell::RefCell<KickGuard> = std::cell::RefCell::default();
}

/// The per-thread signal state of a CPU.
pub struct ThreadSignals {
    pub timer: RunTimer,
    kick: KickHandle,
    /// A POSIX run timer still armed: when it fires (host cycles).
    deadline: Option<u64>,
    /// `kick.sent()` when the last run ended.
    kicks_seen: u64,
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
        KICK_GUARD.with(|g| g.borrow_mut().0.push(kick.clone()));
        Ok(ThreadSignals {
            timer,
            kick: kick.clone(),
            deadline: None,
            kicks_seen: kick.sent(),
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

impl ExitTimer for ThreadSignals {
    fn resolution(&self, cfg: &CpuConfig) -> Tick {
        self.timer.resolution(cfg)
    }

    fn arm(&mut self, ticks: Option<Tick>, cfg: &CpuConfig, now: u64) -> io::Result<()> {
        let Some(ticks) = ticks else {
            return Ok(());
        };
        if let RunTimer::Perf(..) = self.timer {
            return self.timer.arm(ticks, cfg);
        }
        // A POSIX timer still armed from an earlier entry is kept if it
        // fires no later than wanted and not much earlier (an early expiry
        // costs one exit; re-arming costs a system call on every entry).
        let want = now.saturating_add(cfg.ticks_to_host_cycles(ticks));
        if let Some(d) = self.deadline {
            if d > now && d <= want && want - d <= (want - now) / 4 {
                return Ok(());
            }
        }
        self.timer.arm(ticks, cfg)?;
        self.deadline = Some(want);
        Ok(())
    }

    fn after_run(&mut self, now: u64, signal_exit: bool) -> io::Result<bool> {
        let kicks = self.kick.sent();
        let kicked = kicks != self.kicks_seen;
        self.kicks_seen = kicks;
        let expired = match &self.timer {
            RunTimer::Perf(..) => self.timer.disarm()?,
            // A signal exit that no kick explains is the timer's, even if the
            // TSC says its deadline has not come (a host_freq set above the
            // real TSC rate): forgetting the deadline re-arms it, so a timer
            // that fired is never taken for one still armed.
            RunTimer::Posix(_) => {
                let fired = (signal_exit && !kicked) || self.deadline.is_some_and(|d| now >= d);
                if fired {
                    self.deadline = None;
                }
                fired
            }
        };
        // A signal that ended KVM_RUN is not consumed there: KVM restores the
        // thread's mask on the way out, so it stays pending (blocked) and
        // would end the next entry at once. So does the signal of an expiry
        // or kick that came after KVM_RUN returned. Without any of these,
        // nothing can be pending: no system call.
        let perf = matches!(self.timer, RunTimer::Perf(..));
        if perf || signal_exit || expired || kicked {
            sys::discard_pending(kick_signal());
        }
        Ok(expired)
    }
}

impl Drop for ThreadSignals {
    fn drop(&mut self) {
        // Nobody may signal this thread through the handle any more.
        self.kick.set(None);
    }
}
