//! The kvmsim interval timer: a small MMIO device that raises a periodic
//! interrupt in simulated time, and reads out the simulated time.
//!
//! Registers (64-bit, little-endian; narrower accesses read or write the low
//! bytes) at [`TIMER_BASE`]:
//!
//! | offset | name | |
//! |---|---|---|
//! | 0x00 | PERIOD_NS | period in simulated ns (write restarts the timer) |
//! | 0x08 | CTRL | bit 0: run, bit 1: interrupt enable, bit 2: deliver as NMI (write restarts) |
//! | 0x10 | VECTOR | interrupt vector (16..255) |
//! | 0x18 | COUNT | periods elapsed since the last restart (read-only) |
//! | 0x20 | NOW_NS | the current simulated time in ns (read-only) |
//!
//! The device keeps time lazily: COUNT is computed from elapsed ticks, and
//! the only event it needs is the next period's end, when the interrupt is due.

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space, TimedDevice};
use serde::{Deserialize, Serialize};
use sim::tick::TICKS_PER_NS;
use sim::{Counter, Stats, Tick};

use crate::intc::IntcHandle;
use crate::state::check;

/// Default MMIO base of the interval timer.
pub const TIMER_BASE: u64 = 0xFEB0_0000;
/// Size of the register window.
pub const TIMER_SIZE: u64 = 0x1000;
/// Access latency.
pub const TIMER_LATENCY: Tick = 100 * TICKS_PER_NS;

const CTRL_RUN: u64 = 1;
const CTRL_IRQ: u64 = 2;
const CTRL_NMI: u64 = 4;

/// The interval timer's saved state (ticks are absolute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerState {
    /// The period in ticks.
    pub period: Tick,
    pub ctrl: u64,
    pub vector: u8,
    /// When the current run started.
    pub start: Tick,
    /// Periods whose interrupt has been raised.
    pub fired: u64,
}

/// The interval timer.
pub struct IntervalTimer {
    intc: IntcHandle,
    period: Tick,
    ctrl: u64,
    vector: u8,
    /// When the current run started.
    start: Tick,
    /// Periods whose interrupt has been raised.
    fired: u64,
    interrupts: Counter,
}

impl IntervalTimer {
    pub fn new(
        intc: IntcHandle,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        Ok(IntervalTimer {
            intc,
            period: 0,
            ctrl: 0,
            vector: 0,
            start: 0,
            fired: 0,
            interrupts: stats.counter(
                &format!("{prefix}.interrupts"),
                "Interrupts raised by the interval timer",
                "Count",
            )?,
        })
    }

    fn running(&self) -> bool {
        self.ctrl & CTRL_RUN != 0 && self.period > 0
    }

    /// Periods elapsed at `now`.
    fn count(&self, now: Tick) -> u64 {
        if self.running() {
            now.saturating_sub(self.start) / self.period
        } else {
            0
        }
    }

    fn restart(&mut self, now: Tick) {
        self.start = now;
        self.fired = 0;
    }

    fn reg(&self, off: u64, now: Tick) -> u64 {
        match off {
            0x00 => self.period / TICKS_PER_NS,
            0x08 => self.ctrl,
            0x10 => u64::from(self.vector),
            0x18 => self.count(now),
            0x20 => now / TICKS_PER_NS,
            _ => 0,
        }
    }
}

impl BusDevice for IntervalTimer {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
        let v = self.reg(offset & !7, ctx.now) >> (8 * (offset & 7));
        crate::put_le_value(data, v);
        TIMER_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        if offset & 7 != 0 {
            return TIMER_LATENCY; // unaligned writes are ignored
        }
        let v = crate::le_value(data);
        match offset {
            0x00 => {
                self.period = v.saturating_mul(TICKS_PER_NS);
                self.restart(ctx.now);
            }
            0x08 => {
                self.ctrl = v & (CTRL_RUN | CTRL_IRQ | CTRL_NMI);
                self.restart(ctx.now);
            }
            0x10 => self.vector = v as u8,
            _ => {}
        }
        TIMER_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&TimerState {
            period: self.period,
            ctrl: self.ctrl,
            vector: self.vector,
            start: self.start,
            fired: self.fired,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: TimerState = crate::state::parse(state)?;
        let known = CTRL_RUN | CTRL_IRQ | CTRL_NMI;
        check(
            s.ctrl & !known == 0,
            "ctrl",
            format_args!("{:#x} sets bits outside {known:#x}", s.ctrl),
        )?;
        check(s.fired < u64::MAX, "fired", "no run has that many periods")?;
        self.period = s.period;
        self.ctrl = s.ctrl;
        self.vector = s.vector;
        self.start = s.start;
        self.fired = s.fired;
        Ok(())
    }
}

impl TimedDevice for IntervalTimer {
    fn next_deadline(&self) -> Option<Tick> {
        if !self.running() || self.ctrl & CTRL_IRQ == 0 {
            return None;
        }
        self.start
            .checked_add(self.period.checked_mul(self.fired + 1)?)
    }

    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        let due = self.count(ctx.now);
        if self.ctrl & CTRL_IRQ != 0 && due > self.fired {
            let mut intc = mem::lock(&self.intc);
            if self.ctrl & CTRL_NMI != 0 {
                intc.raise_nmi();
            } else {
                intc.raise_vector(self.vector);
            }
            self.interrupts.inc();
        }
        self.fired = due;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intc::VectorIntc;
    use sim::intr::InterruptController;
    use std::sync::{Arc, Mutex};

    fn write(t: &mut IntervalTimer, now: Tick, off: u64, v: u64) {
        let mut reqs = vec![];
        t.write(
            Space::Mmio,
            off,
            &v.to_le_bytes(),
            &mut AccessCtx::new(now, &mut reqs),
        );
    }

    fn read(t: &mut IntervalTimer, now: Tick, off: u64) -> u64 {
        let mut reqs = vec![];
        let mut d = [0u8; 8];
        t.read(
            Space::Mmio,
            off,
            &mut d,
            &mut AccessCtx::new(now, &mut reqs),
        );
        u64::from_le_bytes(d)
    }

    #[test]
    fn periodic_interrupts_in_simulated_time() {
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let mut stats = Stats::new();
        let mut t = IntervalTimer::new(intc.clone(), &mut stats, "t").unwrap();
        assert_eq!(t.next_deadline(), None);
        write(&mut t, 1000, 0x10, 0x40);
        write(&mut t, 1000, 0x00, 1000); // 1 us
        write(&mut t, 1000, 0x08, 3);
        assert_eq!(t.next_deadline(), Some(1000 + 1_000_000));
        assert_eq!(read(&mut t, 500_000, 0x18), 0);
        assert_eq!(read(&mut t, 3_500_000, 0x20), 3500);
        // The fake clock reaches the deadline.
        let mut reqs = vec![];
        t.on_deadline(&mut AccessCtx::new(1_001_000, &mut reqs));
        assert_eq!(intc.lock().unwrap().acknowledge(), Some(0x40));
        assert_eq!(t.next_deadline(), Some(2_001_000));
        // A late deadline (the CPU was busy) raises once for the lost periods.
        t.on_deadline(&mut AccessCtx::new(5_001_000, &mut reqs));
        assert_eq!(intc.lock().unwrap().acknowledge(), Some(0x40));
        assert_eq!(intc.lock().unwrap().acknowledge(), None);
        assert_eq!(t.next_deadline(), Some(6_001_000));
        assert_eq!(read(&mut t, 5_001_000, 0x18), 5);
        assert_eq!(stats.dump(0).get("t.interrupts").unwrap().as_f64(), 2.0);
        // As NMIs.
        write(&mut t, 5_001_000, 0x08, 7);
        t.on_deadline(&mut AccessCtx::new(6_001_000, &mut reqs));
        assert_eq!(intc.lock().unwrap().pending(), sim::intr::Pending::Nmi);
        assert!(intc.lock().unwrap().take_nmi());
        // Stopping removes the deadline.
        write(&mut t, 6_000_000, 0x08, 0);
        assert_eq!(t.next_deadline(), None);
        assert_eq!(read(&mut t, 9_000_000, 0x18), 0);
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let mut stats = Stats::new();
        let mut t = IntervalTimer::new(intc.clone(), &mut stats, "t").unwrap();
        write(&mut t, 1000, 0x10, 0x41);
        write(&mut t, 1000, 0x00, 3000);
        write(&mut t, 1000, 0x08, 3);
        let mut reqs = vec![];
        t.on_deadline(&mut AccessCtx::new(7_001_000, &mut reqs));
        assert_eq!(intc.lock().unwrap().acknowledge(), Some(0x41));
        let intc2 = Arc::new(Mutex::new(VectorIntc::new()));
        let mut u = IntervalTimer::new(intc2.clone(), &mut stats, "u").unwrap();
        round_trip(&t, &mut u);
        assert_eq!(u.next_deadline(), t.next_deadline());
        for off in [0x00, 0x08, 0x10, 0x18, 0x20] {
            assert_eq!(read(&mut u, 8_000_000, off), read(&mut t, 8_000_000, off));
        }
        let at = u.next_deadline().unwrap();
        u.on_deadline(&mut AccessCtx::new(at, &mut reqs));
        t.on_deadline(&mut AccessCtx::new(at, &mut reqs));
        assert_eq!(intc2.lock().unwrap().acknowledge(), Some(0x41));
        assert_eq!(u.next_deadline(), t.next_deadline());
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let mut stats = Stats::new();
        let mut t = IntervalTimer::new(intc, &mut stats, "t").unwrap();
        write(&mut t, 0, 0x00, 5);
        refuses_garbage(&mut t);
        refused_edit(&mut t, &["ctrl"], json!(8), "ctrl");
        refused_edit(&mut t, &["fired"], json!(u64::MAX), "fired");
        refused_edit(&mut t, &["vector"], json!(256), "vector");
        refused_edit(&mut t, &["period"], json!(null), "period");
    }

    proptest::proptest! {
        #[test]
        fn any_access_is_safe(ops in proptest::collection::vec((0u64..0x1000, proptest::prelude::any::<u64>(), 0usize..9, proptest::prelude::any::<bool>()), 0..64)) {
            let intc = Arc::new(Mutex::new(VectorIntc::new()));
            let mut stats = Stats::new();
            let mut t = IntervalTimer::new(intc, &mut stats, "t").unwrap();
            let mut reqs = vec![];
            for (i, (off, v, len, w)) in ops.into_iter().enumerate() {
                let now = i as Tick * 1000;
                let mut ctx = AccessCtx::new(now, &mut reqs);
                if w { t.write(Space::Mmio, off, &v.to_le_bytes()[..len.min(8)], &mut ctx); }
                else { let mut d = vec![0u8; len]; t.read(Space::Mmio, off, &mut d, &mut ctx); }
                if let Some(d) = t.next_deadline() { proptest::prop_assert!(d > t.start); }
            }
        }
    }
}
