//! A minimal interrupt controller: a set of pending vectors and an NMI
//! line. Devices raise vectors; the CPU acknowledges the highest one. It has
//! no in-service state and needs no EOI (the LAPIC, later, does all that);
//! it is what bare-metal guests and tests need to receive interrupts.

use std::sync::{Arc, Mutex};

use mem::{RestoreError, SavedState};
use serde::{Deserialize, Serialize};
use sim::intr::{InterruptController, Pending};

/// Pending vectors (256 bits) and an NMI flag.
#[derive(Debug, Default)]
pub struct VectorIntc {
    pending: [u64; 4],
    nmi: bool,
    /// Raises that found their vector already pending (merged, as on hardware).
    pub merged: u64,
}

/// The minimal controller's saved state (it is not on the bus: the system
/// that owns it as a CPU's controller saves it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorIntcState {
    /// Pending vectors, bit n of word w: vector 64w + n (none below 16).
    pub pending: [u64; 4],
    pub nmi: bool,
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

    /// The controller's saved state.
    pub fn save(&self) -> SavedState {
        crate::state::save(&VectorIntcState {
            pending: self.pending,
            nmi: self.nmi,
        })
    }

    /// Puts back what [`VectorIntc::save`] returned (unchanged on error).
    pub fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: VectorIntcState = crate::state::parse(state)?;
        crate::state::check(
            s.pending[0] & 0xffff == 0,
            "pending[0]",
            "vectors 0-15 are exceptions, never pending",
        )?;
        self.pending = s.pending;
        self.nmi = s.nmi;
        Ok(())
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

    #[test]
    fn saved_state_restores_identically() {
        let mut c = VectorIntc::new();
        for v in [0x20, 0x41, 0xff] {
            c.raise(v);
        }
        c.raise_nmi();
        let text = serde_json::to_string(&c.save()).unwrap();
        let mut d = VectorIntc::new();
        d.restore(&serde_json::from_str(&text).unwrap()).unwrap();
        assert!(d.take_nmi() && c.take_nmi());
        for _ in 0..4 {
            assert_eq!(d.acknowledge(), c.acknowledge());
        }
        for bad in [
            serde_json::json!({"pending": [1, 0, 0, 0], "nmi": false}),
            serde_json::json!({"pending": [0, 0, 0], "nmi": false}),
            serde_json::json!({"pending": [0, 0, 0, 0], "nmi": 0}),
            serde_json::json!(null),
        ] {
            d.raise(0x30);
            assert!(d.restore(&bad).is_err(), "{bad}");
            assert_eq!(d.acknowledge(), Some(0x30), "unchanged");
        }
    }
}
