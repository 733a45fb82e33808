//! Requests the guest makes of the simulator through sim-ops.
//!
//! Devices never act on the simulation themselves: they push requests that
//! the system services after the access, in simulated time.

use crate::tick::Tick;

/// A guest's request to the simulator. Delays and periods are in ticks,
/// counted from the tick at which the request was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// End the simulation after `delay` with the guest's `code` (0 = success).
    Exit { delay: Tick, code: i64 },
    /// Dump statistics after `delay`, then every `period` if it is non-zero;
    /// reset them after each dump if `reset`.
    DumpStats {
        delay: Tick,
        period: Tick,
        reset: bool,
    },
    /// Reset statistics after `delay`, then every `period` if it is non-zero.
    ResetStats { delay: Tick, period: Tick },
    /// End of interrupt for a level-triggered `vector`: the I/O APIC may
    /// deliver again from the pins that carry it (EOI broadcast).
    Eoi { vector: u8 },
    /// The guest reset the machine (keyboard controller, reset register).
    /// kvmsim ends the run with cause "guest reset".
    Reset,
    /// QEMU's isa-debug-exit was written `value`: end the run now with
    /// status `value * 2 + 1`, as QEMU does (a compatibility device).
    DebugExit { value: u64 },
    /// Send `data` out of link port `port`; it arrives at the other end
    /// `delay` later.
    LinkSend { port: u32, delay: Tick, data: u64 },
    /// The emulated process ended (SE mode): end the run after `delay`
    /// (the simulated time of the call that ended it) with status `code`
    /// (its exit status, or 128 + the signal that killed it) and a message
    /// saying why, if it did not exit by itself.
    ProcessExit {
        delay: Tick,
        code: i64,
        message: String,
    },
    /// Take a checkpoint after `delay`, then every `period` if it is
    /// non-zero (gem5's `m5 checkpoint`).
    Checkpoint { delay: Tick, period: Tick },
}
