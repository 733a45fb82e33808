//! A minimal interrupt controller: a set of pending vectors and an NMI
//! line. Devices raise vectors; the CPU acknowledges the highest one. It has
//! no in-service state and needs no EOI (the LAPIC, later, does all that);
//! it is what bare-metal guests and tests need to receive interrupts.

use std::sync::{Arc, Mutex};

use sim::intr::{InterruptController, Pending};

/// Pending vectors (256 bits) and an NMI flag.
#[derive(Debug, Default)]
pub struct VectorIntc {
    pending: [u64; 4],
    nmi: bool,
    /// Raises that found their vector already pending (merged, as on hardware).
    pub merged: u64,
}

/// Where a device sends vectored interrupts: the minimal controller on a
/// bare machine, the local APIC on a PC.
pub trait VectorSink: Send {
    /// A fixed, edge-triggered interrupt with `vector`.
    fn raise_vector(&mut self, vector: u8);
    /// A non-maskable interrupt.
    fn raise_nmi(&mut self);
}

/// A shared handle, as devices hold it.
pub type IntcHandle = Arc<Mutex<dyn VectorSink>>;

impl VectorSink for VectorIntc {
    fn raise_vector(&mut self, vector: u8) {
        self.raise(vector);
    }
    fn raise_nmi(&mut self) {
        VectorIntc::raise_nmi(self);
    }
}

impl VectorSink for crate::lapic::Lapic {
    fn raise_vector(&mut self, vector: u8) {
        self.deliver(vector, false);
    }
    fn raise_nmi(&mut self) {
        self.deliver_nmi();
    }
}

impl VectorIntc {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `vector` pending. Vectors below 16 are exceptions, not
    /// interrupts, and are ignored.
    pub fn raise(&mut self, vector: u8) {
        if vector < 16 {
            return;
        }
        let (w, b) = (usize::from(vector / 64), vector % 64);
        if self.pending[w] & (1 << b) != 0 {
            self.merged += 1;
        }
        self.pending[w] |= 1 << b;
    }

    /// Raises the NMI line.
    pub fn raise_nmi(&mut self) {
        self.nmi = true;
    }

    fn highest(&self) -> Option<u8> {
        (0..4)
            .rev()
            .find(|&w| self.pending[w] != 0)
            .map(|w| (w * 64 + 63 - self.pending[w].leading_zeros() as usize) as u8)
    }
}

impl InterruptController for VectorIntc {
    fn pending(&mut self) -> Pending {
        if self.nmi {
            Pending::Nmi
        } else if self.highest().is_some() {
            Pending::Maskable
        } else {
            Pending::None
        }
    }

    fn acknowledge(&mut self) -> Option<u8> {
        let v = self.highest()?;
        self.pending[usize::from(v / 64)] &= !(1 << (v % 64));
        Some(v)
    }

    fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_vector_first() {
        let mut c = VectorIntc::new();
        assert_eq!(c.pending(), Pending::None);
        c.raise(0x30);
        c.raise(0xf0);
        c.raise(0x41);
        c.raise(0x41);
        c.raise(3); // an exception number: ignored
        assert_eq!(c.merged, 1);
        assert_eq!(c.pending(), Pending::Maskable);
        assert_eq!(c.acknowledge(), Some(0xf0));
        assert_eq!(c.acknowledge(), Some(0x41));
        assert_eq!(c.acknowledge(), Some(0x30));
        assert_eq!(c.acknowledge(), None);
        c.raise_nmi();
        assert_eq!(c.pending(), Pending::Nmi);
        assert!(c.take_nmi());
        assert!(!c.take_nmi());
    }
}
