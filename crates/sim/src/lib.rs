//! The discrete-event kernel of kvmsim.
//!
//! Everything in this crate is independent of KVM: simulated time ([`Tick`]),
//! event queues ordered by (tick, priority, insertion order), clock domains,
//! the life cycle of simulation objects, exit events, statistics and the
//! requests a guest can make of the simulator (sim-ops). It is unit- and
//! property-tested without `/dev/kvm`.

pub mod barrier;
pub mod clock;
pub mod eventq;
pub mod exit;
pub mod intr;
pub mod object;
pub mod request;
pub mod stats;
pub mod tick;

pub use clock::ClockDomain;
pub use eventq::{EventId, EventQueue, Priority, ScheduleError};
pub use exit::{ExitCause, ExitEvent};
pub use object::{DrainState, SimObject};
pub use request::Request;
pub use stats::{Availability, Counter, Stats, Value, Vector};
pub use tick::Tick;
