//! Interrupt lines between devices and interrupt controllers.
//!
//! A line has a level. Controllers (the 8259 pair, the IOAPIC) implement
//! [`InterruptSink`] and see every level change on their inputs; an ISA
//! device's line usually goes to both (IRQ n -> PIC input n and IOAPIC pin
//! n, IRQ0 -> IOAPIC pin 2).

use std::sync::{Arc, Mutex};

/// Something with interrupt input lines.
pub trait InterruptSink: Send {
    /// Input `line` is now at `level`.
    fn set_line(&mut self, line: u32, level: bool);
}

/// A shared handle to a sink.
pub type SinkHandle = Arc<Mutex<dyn InterruptSink>>;

/// One interrupt line, wired to inputs of zero or more sinks.
#[derive(Clone, Default)]
pub struct IrqLine {
    inputs: Vec<(SinkHandle, u32)>,
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<u32> = self.inputs.iter().map(|(_, l)| *l).collect();
        f.debug_struct("IrqLine").field("inputs", &lines).finish()
    }
}

impl IrqLine {
    /// A line wired to nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds input `line` of `sink` to this line.
    pub fn to(mut self, sink: SinkHandle, line: u32) -> Self {
        self.inputs.push((sink, line));
        self
    }

    /// Drives the line to `level`.
    pub fn set(&self, level: bool) {
        for (sink, line) in &self.inputs {
            mem::lock(sink).set_line(*line, level);
        }
    }

    /// A rising then falling edge (an edge-triggered interrupt).
    pub fn pulse(&self) {
        self.set(true);
        self.set(false);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records every level change.
    #[derive(Default)]
    pub struct Recorder(pub Vec<(u32, bool)>);
    impl InterruptSink for Recorder {
        fn set_line(&mut self, line: u32, level: bool) {
            self.0.push((line, level));
        }
    }

    #[test]
    fn a_line_drives_every_input() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let line = IrqLine::none().to(a.clone(), 0).to(b.clone(), 2);
        line.pulse();
        assert_eq!(a.lock().unwrap().0, vec![(0, true), (0, false)]);
        assert_eq!(b.lock().unwrap().0, vec![(2, true), (2, false)]);
    }
}
