//! Time conversion of a KVM CPU: host cycles and nanoseconds to simulated
//! ticks and back. A module of its own so that the CPU, its run timers and
//! the probes share it without depending on each other.

use sim::{ClockDomain, Tick};

/// How a KVM CPU converts between host and simulated time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuConfig {
    /// The CPU's clock (cycle counts, tick alignment).
    pub clock: ClockDomain,
    /// Rate of the counter the architecture's `host_cycles()` reads (x86: TSC), in Hz.
    pub host_freq_hz: f64,
    /// Simulated time per host time: above 1 when the simulated machine is
    /// slower than the host (target CPI / host CPI).
    pub host_factor: f64,
}

impl CpuConfig {
    /// Host cycles (of `host_freq`) to simulated ticks.
    pub fn host_cycles_to_ticks(&self, cycles: u64) -> Tick {
        sim::tick::seconds_to_ticks(cycles as f64 * self.host_factor / self.host_freq_hz)
    }

    /// Simulated ticks to host nanoseconds (for host timers).
    pub fn ticks_to_host_ns(&self, ticks: Tick) -> u64 {
        (ticks as f64 / (sim::tick::TICKS_PER_NS as f64 * self.host_factor)) as u64
    }

    /// Simulated ticks to host cycles (of `host_freq`).
    pub fn ticks_to_host_cycles(&self, ticks: Tick) -> u64 {
        (sim::tick::ticks_to_seconds(ticks) * self.host_freq_hz / self.host_factor) as u64
    }
}
