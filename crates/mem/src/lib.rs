//! Memory and IO of a simulated system.
//!
//! * [`ram`]: guest RAM backed by vm-memory, laid out by a [`MemoryMap`]
//!   with holes for device windows.
//! * [`bus`]: an IO bus routing port-IO and MMIO accesses by address range to
//!   devices. Each access returns its latency in ticks. Unclaimed ports read as
//!   all-ones and writes to them are dropped, both counted in statistics.

pub mod bus;
pub mod ram;

pub use bus::{
    lock, null_state, service_tick, AccessCtx, BusDevice, BusError, CallArgs, DeviceHandle, IoBus,
    MovableBase, Rebased, RestoreError, SavedState, Space, TimedDevice, TimedHandle, UserContext,
};
pub use ram::{GuestRam, MemoryMap, RamError, Region};
