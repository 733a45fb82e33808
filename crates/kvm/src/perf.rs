//! perf_event counters: the guest instruction counter, the cycle counter, and
//! the overflow-driven run timer (gem5's PerfKvmCounter / PerfKvmTimer).
//!
//! Hardware events need a PMU. Where there is none (our development
//! machines), [`pmu_available`] says so once and callers fall back; the same
//! code paths are exercised with software events (task clock) so that they
//! run everywhere.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use perf_event_open_sys::bindings as pb;

use crate::sys::{self, PerfIoctl};

/// What a counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerfEvent {
    /// Host CPU cycles spent in the guest (hardware).
    GuestCycles,
    /// Instructions retired by the guest only (hardware, `exclude_host`).
    GuestInstructions,
    /// Nanoseconds of CPU time of the thread (software; works without a PMU).
    TaskClock,
}

/// One perf counter on one thread.
#[derive(Debug)]
pub struct PerfCounter {
    fd: OwnedFd,
    event: PerfEvent,
}

impl PerfCounter {
    /// Opens a disabled counter for thread `tid`. With `sample_period`, the
    /// counter overflows every that many events (see [`Self::signal_overflow_to`]).
    pub fn open(
        event: PerfEvent,
        tid: libc::pid_t,
        sample_period: Option<u64>,
    ) -> io::Result<Self> {
        let mut attr = pb::perf_event_attr::default();
        match event {
            PerfEvent::GuestCycles | PerfEvent::GuestInstructions => {
                attr.type_ = pb::PERF_TYPE_HARDWARE;
                attr.config = if event == PerfEvent::GuestCycles {
                    pb::PERF_COUNT_HW_CPU_CYCLES as u64
                } else {
                    pb::PERF_COUNT_HW_INSTRUCTIONS as u64
                };
                attr.set_exclude_host(1);
                attr.set_exclude_hv(1);
                attr.set_pinned(1);
            }
            PerfEvent::TaskClock => {
                attr.type_ = pb::PERF_TYPE_SOFTWARE;
                attr.config = pb::PERF_COUNT_SW_TASK_CLOCK as u64;
            }
        }
        attr.set_disabled(1);
        if let Some(p) = sample_period {
            attr.__bindgen_anon_1.sample_period = p.max(1);
            attr.__bindgen_anon_2.wakeup_events = 1;
        }
        Ok(PerfCounter {
            fd: sys::perf_open(&mut attr, tid, -1)?,
            event,
        })
    }

    pub fn event(&self) -> PerfEvent {
        self.event
    }

    /// Sends `sig` to thread `tid` on each overflow.
    pub fn signal_overflow_to(&self, sig: libc::c_int, tid: libc::pid_t) -> io::Result<()> {
        sys::perf_signal_to_thread(&self.fd, sig, tid)
    }

    pub fn enable(&self) -> io::Result<()> {
        sys::perf_ioctl(&self.fd, PerfIoctl::Enable)
    }

    pub fn disable(&self) -> io::Result<()> {
        sys::perf_ioctl(&self.fd, PerfIoctl::Disable)
    }

    /// The current count.
    pub fn read(&self) -> io::Result<u64> {
        sys::perf_read(&self.fd)
    }

    /// Overflow after `period` more events, once (PERIOD then REFRESH(1),
    /// which also enables the counter).
    pub fn arm_overflow(&self, period: u64) -> io::Result<()> {
        sys::perf_ioctl(&self.fd, PerfIoctl::Period(period))?;
        sys::perf_ioctl(&self.fd, PerfIoctl::Refresh(1))
    }
}

/// Whether this host has a hardware PMU usable for guest counting. Probed
/// once; the answer and the reason are logged once.
pub fn pmu_available() -> bool {
    static PMU: OnceLock<bool> = OnceLock::new();
    *PMU.get_or_init(
        || match PerfCounter::open(PerfEvent::GuestInstructions, 0, None) {
            Ok(_) => {
                tracing::info!(
                    "hardware PMU found: guest instructions are counted by a perf counter"
                );
                true
            }
            Err(e) => {
                tracing::info!(
                "no hardware PMU ({e}): guest instruction counts are unavailable (nan in stats), \
                 the run timer is a POSIX timer, and max_insts needs single-stepping"
            );
                false
            }
        },
    )
}

/// A guest instruction counter that can force an exit after a given number
/// of instructions. Changing the period of a live overflow counter is not
/// reliable on every kernel, so each new stop re-creates the counter
/// (detach and re-attach), as gem5 does; the running total is kept here.
#[derive(Debug)]
pub struct InstCounter {
    tid: libc::pid_t,
    signal: libc::c_int,
    event: PerfEvent,
    counter: PerfCounter,
    /// Events counted by counters that were detached.
    base: u64,
}

impl InstCounter {
    /// Counts `event` (normally [`PerfEvent::GuestInstructions`]) for thread `tid`.
    pub fn new(event: PerfEvent, tid: libc::pid_t, signal: libc::c_int) -> io::Result<Self> {
        let counter = PerfCounter::open(event, tid, None)?;
        counter.enable()?;
        Ok(InstCounter {
            tid,
            signal,
            event,
            counter,
            base: 0,
        })
    }

    /// Total events counted so far.
    pub fn total(&self) -> io::Result<u64> {
        Ok(self.base + self.counter.read()?)
    }

    /// Re-creates the counter so that it overflows (sending the signal to the
    /// thread) after `remaining` more events; `None` counts without a stop.
    pub fn set_stop(&mut self, remaining: Option<u64>) -> io::Result<()> {
        let so_far = self.total()?;
        let counter = PerfCounter::open(self.event, self.tid, remaining)?;
        if remaining.is_some() {
            counter.signal_overflow_to(self.signal, self.tid)?;
            counter.arm_overflow(remaining.unwrap_or(1))?;
        } else {
            counter.enable()?;
        }
        self.counter.disable()?;
        self.counter = counter;
        self.base = so_far;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins until this thread has used `ns` of CPU time (wall time would
    /// not do: on a loaded machine the thread may wait).
    fn spin_cpu(ns: u64) {
        let t = sys::thread_cpu_time_ns();
        while sys::thread_cpu_time_ns() - t < ns {
            std::hint::black_box(0);
        }
    }

    #[test]
    fn task_clock_counts_and_overflows_to_this_thread() {
        let sig = vmm_sys_util::signal::SIGRTMIN() + 2;
        let mut set = sys::empty_sigset();
        sys::sigset_change(&mut set, sig, true);
        let old = sys::thread_sigmask(libc::SIG_BLOCK, Some(&set)).unwrap();
        let tid = sys::gettid();
        sys::discard_pending(sig);

        let mut c = InstCounter::new(PerfEvent::TaskClock, tid, sig).unwrap();
        spin_cpu(5_000_000);
        let t1 = c.total().unwrap();
        assert!(
            t1 >= 4_000_000,
            "task clock counted {t1} ns in 5 ms of CPU time"
        );
        // Stop after 2 ms more of CPU time: the overflow signal arrives.
        c.set_stop(Some(2_000_000)).unwrap();
        assert!(!sys::is_pending(sig));
        spin_cpu(20_000_000);
        assert!(
            sys::is_pending(sig),
            "overflow signal not delivered to this thread"
        );
        assert_eq!(sys::discard_pending(sig), 1, "one overflow (REFRESH(1))");
        // The total spans the re-attach; REFRESH(1) stops counting at the
        // overflow (by then a guest would have exited).
        let t2 = c.total().unwrap();
        assert!(
            t2 >= t1 + 2_000_000 && t2 < t1 + 15_000_000,
            "t1 {t1} t2 {t2}"
        );
        c.set_stop(None).unwrap();
        sys::thread_sigmask(libc::SIG_SETMASK, Some(&old)).unwrap();
    }

    #[test]
    fn pmu_probe_answers() {
        // Either answer is fine; the probe must not fail or panic.
        let a = pmu_available();
        assert_eq!(a, pmu_available());
    }
}
