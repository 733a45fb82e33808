//! A barrier for the threads of a simulation that meet at every window end.
//!
//! `std::sync::Barrier` parks every waiter on a condition variable: about
//! 13 us per barrier on our hosts, which at one barrier per 10 us window
//! would more than double a run. [`SpinBarrier`] spins first (the other
//! threads usually arrive within microseconds, since every thread runs the
//! same simulated window) and parks only if the wait drags on, so a barrier
//! costs well under a microsecond when the threads arrive together, and an
//! idle thread does not burn a core for long when they do not.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Spins this many times (yielding now and then) before parking, when
/// every thread has a core of its own.
const SPINS: u32 = 4_000;
/// With more threads than cores a spinning waiter takes the core a late
/// thread needs: it only yields this many times before parking.
const SPINS_OVERSUBSCRIBED: u32 = 64;

/// A reusable barrier for `n` threads.
#[derive(Debug)]
pub struct SpinBarrier {
    n: usize,
    spins: u32,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// A thread left for good ([`SpinBarrier::abandon`]): nobody waits.
    broken: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl SpinBarrier {
    /// A barrier for `n` threads (at least one).
    pub fn new(n: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        SpinBarrier {
            n: n.max(1),
            spins: if n <= cores {
                SPINS
            } else {
                SPINS_OVERSUBSCRIBED
            },
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Waits until all `n` threads have called `wait`; returns true in
    /// exactly one of them (the last to arrive).
    pub fn wait(&self) -> bool {
        self.wait_then(|| ())
    }

    /// Like [`wait`](Self::wait), but the last thread to arrive runs `last`
    /// before any thread leaves: what it does there happens-before every
    /// thread's return, and sees everything every thread did before it
    /// arrived (the decision of a round, taken once for all).
    ///
    /// Once the barrier is [abandoned](Self::abandon) every wait returns
    /// false at once, without running `last`.
    pub fn wait_then(&self, last: impl FnOnce()) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if self.is_broken() {
            return false;
        }
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            last();
            // Nobody can arrive again before the generation moves on.
            self.arrived.store(0, Ordering::Release);
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.cv.notify_all();
            return true;
        }
        let oversubscribed = self.spins == SPINS_OVERSUBSCRIBED;
        for i in 0..self.spins {
            if self.generation.load(Ordering::Acquire) != generation {
                return false;
            }
            if oversubscribed || i % 16 == 15 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.generation.load(Ordering::Acquire) == generation {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        false
    }

    /// Breaks the barrier for good, for a thread that will never arrive
    /// again (it panicked): every thread waiting now is released, and
    /// every later wait returns at once; callers check
    /// [`is_broken`](Self::is_broken) after a wait and stop.
    pub fn abandon(&self) {
        self.broken.store(true, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cv.notify_all();
    }

    /// Whether [`abandon`](Self::abandon) was called.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn an_abandoned_barrier_releases_every_waiter_and_holds_nobody_again() {
        // Three of four threads wait (spinning, then parked); the fourth
        // never comes and abandons the barrier instead.
        let b = SpinBarrier::new(4);
        let released = AtomicUsize::new(0);
        let ran_last = AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let last = b.wait_then(|| ran_last.store(true, Ordering::SeqCst));
                    assert!(!last, "nobody is last at a broken barrier");
                    assert!(b.is_broken());
                    // Later rounds do not wait for anyone.
                    for _ in 0..100 {
                        assert!(!b.wait());
                    }
                    released.fetch_add(1, Ordering::SeqCst);
                });
            }
            // Let them park (past the spins) before abandoning.
            while b.arrived.load(Ordering::SeqCst) < 3 {
                std::thread::yield_now();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            b.abandon();
        });
        assert_eq!(released.load(Ordering::SeqCst), 3);
        assert!(!ran_last.load(Ordering::SeqCst));
    }

    #[test]
    fn no_thread_passes_before_all_arrive() {
        // Each round, every thread adds 1 before the barrier and checks
        // after it that all n additions of that round are there.
        let n = 4;
        let rounds = 300;
        let b = SpinBarrier::new(n);
        let sum = AtomicU64::new(0);
        let leaders = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| {
                    for r in 1..=rounds {
                        sum.fetch_add(1, Ordering::SeqCst);
                        if b.wait() {
                            leaders.fetch_add(1, Ordering::SeqCst);
                        }
                        assert!(sum.load(Ordering::SeqCst) >= (r * n) as u64);
                        // Nobody starts round r+1 before everyone checked.
                        b.wait();
                    }
                });
            }
        });
        assert_eq!(sum.load(Ordering::SeqCst), (rounds * n) as u64);
        assert_eq!(leaders.load(Ordering::SeqCst), rounds as u64);
    }

    #[test]
    fn the_last_arrivals_decision_holds_for_the_whole_round() {
        // One barrier per round: every thread publishes its value, the last
        // to arrive sums them, and every thread reads that round's sum after
        // the barrier, while faster threads already publish the next round's
        // values (into the other half: rounds alternate).
        let n = 3;
        let rounds = 500u64;
        let b = SpinBarrier::new(n);
        let values: Vec<[AtomicU64; 2]> = (0..n).map(|_| Default::default()).collect();
        let sum = AtomicU64::new(0);
        std::thread::scope(|s| {
            for (i, v) in values.iter().enumerate() {
                let (b, values, sum) = (&b, &values, &sum);
                s.spawn(move || {
                    for r in 0..rounds {
                        let half = (r % 2) as usize;
                        v[half].store(r * 10 + i as u64, Ordering::SeqCst);
                        b.wait_then(|| {
                            let total = values.iter().map(|v| v[half].load(Ordering::SeqCst)).sum();
                            sum.store(total, Ordering::SeqCst);
                        });
                        let want: u64 = (0..n as u64).map(|j| r * 10 + j).sum();
                        assert_eq!(sum.load(Ordering::SeqCst), want, "round {r}");
                    }
                });
            }
        });
    }

    #[test]
    fn a_late_thread_is_waited_for_after_parking() {
        let b = SpinBarrier::new(2);
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis(50));
                b.wait();
            });
            b.wait();
        });
        assert!(t.elapsed() >= std::time::Duration::from_millis(50));
    }

    #[test]
    fn one_thread_never_waits() {
        let b = SpinBarrier::new(1);
        assert!(b.wait());
        assert!(b.wait());
    }
}
