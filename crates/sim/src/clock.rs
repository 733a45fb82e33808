//! Clock domains: a period in ticks and the arithmetic that goes with it.

use crate::tick::{Tick, TICKS_PER_SECOND};

/// A clock with a fixed period. Objects that work in cycles (a CPU, a
/// device clock) convert between cycles and ticks through their domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockDomain {
    period: Tick,
}

impl ClockDomain {
    /// A domain with the given period in ticks. A zero period is raised to one tick.
    pub fn from_period(period: Tick) -> Self {
        ClockDomain {
            period: period.max(1),
        }
    }

    /// A domain running at `hz` cycles per simulated second (rounded to whole ticks).
    pub fn from_hz(hz: f64) -> Self {
        let period = if hz > 0.0 {
            (TICKS_PER_SECOND as f64 / hz).round() as Tick
        } else {
            1
        };
        Self::from_period(period)
    }

    /// The period in ticks.
    pub fn period(&self) -> Tick {
        self.period
    }

    /// The frequency in Hz.
    pub fn frequency(&self) -> f64 {
        TICKS_PER_SECOND as f64 / self.period as f64
    }

    /// Cycles to ticks (saturating).
    pub fn cycles_to_ticks(&self, cycles: u64) -> Tick {
        cycles.saturating_mul(self.period)
    }

    /// Ticks to whole cycles, rounding up: the number of cycles needed to cover `ticks`.
    pub fn ticks_to_cycles(&self, ticks: Tick) -> u64 {
        ticks.div_ceil(self.period)
    }

    /// The tick of the clock edge `cycles` cycles after the first edge at or after `now`
    /// (gem5's `clockEdge`). With `cycles == 0` this is `now` rounded up to an edge.
    pub fn clock_edge(&self, now: Tick, cycles: u64) -> Tick {
        let edge = now.div_ceil(self.period).saturating_mul(self.period);
        edge.saturating_add(self.cycles_to_ticks(cycles))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_ghz() {
        let c = ClockDomain::from_hz(2e9);
        assert_eq!(c.period(), 500);
        assert_eq!(c.frequency(), 2e9);
        assert_eq!(c.cycles_to_ticks(3), 1500);
        assert_eq!(c.ticks_to_cycles(1), 1);
        assert_eq!(c.ticks_to_cycles(500), 1);
        assert_eq!(c.ticks_to_cycles(501), 2);
        assert_eq!(c.clock_edge(0, 0), 0);
        assert_eq!(c.clock_edge(1, 0), 500);
        assert_eq!(c.clock_edge(500, 0), 500);
        assert_eq!(c.clock_edge(501, 2), 2000);
    }

    #[test]
    fn degenerate_inputs() {
        assert_eq!(ClockDomain::from_hz(0.0).period(), 1);
        assert_eq!(ClockDomain::from_period(0).period(), 1);
        let c = ClockDomain::from_period(7);
        assert_eq!(c.clock_edge(u64::MAX - 3, 5), u64::MAX);
    }
}
