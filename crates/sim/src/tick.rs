//! Simulated time. One tick is one picosecond.

/// Simulated time in picoseconds.
pub type Tick = u64;

/// Ticks in one simulated second (the tick rate, `simFreq` in stats.txt).
pub const TICKS_PER_SECOND: Tick = 1_000_000_000_000;
/// Ticks in one simulated nanosecond.
pub const TICKS_PER_NS: Tick = 1_000;
/// Ticks in one simulated microsecond.
pub const TICKS_PER_US: Tick = 1_000_000;
/// Ticks in one simulated millisecond.
pub const TICKS_PER_MS: Tick = 1_000_000_000;
/// The end of time: nothing can be scheduled after it.
pub const MAX_TICK: Tick = Tick::MAX;

/// Nanoseconds to ticks, saturating at [`MAX_TICK`].
pub fn ns_to_ticks(ns: u64) -> Tick {
    ns.saturating_mul(TICKS_PER_NS)
}

/// Ticks to (fractional) seconds.
pub fn ticks_to_seconds(ticks: Tick) -> f64 {
    ticks as f64 / TICKS_PER_SECOND as f64
}

/// Seconds to ticks, rounded to the nearest tick and saturating.
pub fn seconds_to_ticks(seconds: f64) -> Tick {
    let t = (seconds * TICKS_PER_SECOND as f64).round();
    if t.is_nan() || t <= 0.0 {
        0
    } else if t >= MAX_TICK as f64 {
        MAX_TICK
    } else {
        t as Tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(ns_to_ticks(3), 3_000);
        assert_eq!(ns_to_ticks(u64::MAX), MAX_TICK);
        assert_eq!(ticks_to_seconds(TICKS_PER_SECOND / 2), 0.5);
        assert_eq!(seconds_to_ticks(1.5), 1_500_000_000_000);
        assert_eq!(seconds_to_ticks(-1.0), 0);
        assert_eq!(seconds_to_ticks(1e30), MAX_TICK);
    }
}
