//! Life cycle of simulation objects.
//!
//! Every object has a dotted name (`system.cpu`), is initialised (`init`,
//! before anything runs, when objects may not yet look at each other), started
//! (`startup`, when the whole system exists), and can be drained (brought to a
//! consistent state, for checkpoints) and serialized. Drain and serialization
//! are hooks here; the objects that need them fill them in.

use std::collections::BTreeMap;

/// Whether an object is ready for a checkpoint or a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    /// Consistent: nothing in flight.
    Drained,
    /// Still working towards a consistent state; ask again later.
    Draining,
}

/// Serialized state of one object: named values.
pub type Section = BTreeMap<String, serde_json::Value>;

/// A simulation object.
pub trait SimObject {
    /// The object's dotted name, also the prefix of its statistics.
    fn name(&self) -> &str;

    /// Called once, before the simulation starts, in construction order.
    fn init(&mut self) {}

    /// Called once when every object exists, before the first event.
    fn startup(&mut self) {}

    /// Brings the object to a consistent state. Objects with nothing in
    /// flight are always drained.
    fn drain(&mut self) -> DrainState {
        DrainState::Drained
    }

    /// Resumes after a drain.
    fn drain_resume(&mut self) {}

    /// Writes the object's state. Stateless objects write nothing.
    fn serialize(&self, _out: &mut Section) {}

    /// Restores the object's state from `section`.
    fn unserialize(&mut self, _section: &Section) -> Result<(), String> {
        Ok(())
    }
}
