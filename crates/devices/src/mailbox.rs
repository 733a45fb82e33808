//! A link endpoint: a small MMIO mailbox through which two simulated
//! systems exchange 64-bit values with a latency in simulated time.
//!
//! Registers (64-bit) at [`MAILBOX_BASE`]:
//!
//! | offset | name | |
//! |---|---|---|
//! | 0x00 | TX | write: send the value to the other end |
//! | 0x08 | RX | read: take the oldest received value (0 if none) |
//! | 0x10 | RX_COUNT | values waiting |
//! | 0x18 | VECTOR | interrupt vector raised when a value arrives (0: none) |
//! | 0x20 | LATENCY_NS | the link's latency |
//! | 0x28 | SENT | values sent |
//! | 0x30 | RECEIVED | values received |
//!
//! Sending leaves a [`sim::Request::LinkSend`]; the simulation carries it to
//! the other system as an event at send time + latency and calls
//! [`Mailbox::deliver`] there.

use std::collections::VecDeque;

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space};
use serde::{Deserialize, Serialize};
use sim::tick::TICKS_PER_NS;
use sim::{Counter, Request, Stats, Tick};

use crate::intc::IntcHandle;

/// Default MMIO base of the mailbox.
pub const MAILBOX_BASE: u64 = 0xFEB0_1000;
/// Size of the register window.
pub const MAILBOX_SIZE: u64 = 0x1000;
/// Access latency.
pub const MAILBOX_LATENCY: Tick = 100 * TICKS_PER_NS;
/// Values kept waiting at most; more are dropped (and counted).
pub const RX_CAPACITY: usize = 4096;

/// A mailbox's saved state: the values received and not yet read (values
/// still on the link are events of the simulation, saved with it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxState {
    pub vector: u8,
    /// Values waiting, oldest first (at most [`RX_CAPACITY`]).
    pub rx: Vec<u64>,
}

/// One end of a link.
pub struct Mailbox {
    port: u32,
    latency: Tick,
    intc: IntcHandle,
    vector: u8,
    rx: VecDeque<u64>,
    sent: Counter,
    received: Counter,
    dropped: Counter,
}

impl Mailbox {
    /// Link port `port` with `latency`, statistics under `prefix`.
    pub fn new(
        port: u32,
        latency: Tick,
        intc: IntcHandle,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        Ok(Mailbox {
            port,
            latency,
            intc,
            vector: 0,
            rx: VecDeque::new(),
            sent: stats.counter(
                &format!("{prefix}.sent"),
                "Values sent on the link",
                "Count",
            )?,
            received: stats.counter(
                &format!("{prefix}.received"),
                "Values received from the link",
                "Count",
            )?,
            dropped: stats.counter(
                &format!("{prefix}.dropped"),
                "Values dropped because the receive queue was full",
                "Count",
            )?,
        })
    }

    /// A value arrives from the other end.
    pub fn deliver(&mut self, value: u64) {
        if self.rx.len() >= RX_CAPACITY {
            self.dropped.inc();
            return;
        }
        self.rx.push_back(value);
        self.received.inc();
        if self.vector >= 16 {
            mem::lock(&self.intc).raise_vector(self.vector);
        }
    }

    fn reg(&mut self, off: u64) -> u64 {
        match off {
            0x08 => self.rx.pop_front().unwrap_or(0),
            0x10 => self.rx.len() as u64,
            0x18 => u64::from(self.vector),
            0x20 => self.latency / TICKS_PER_NS,
            0x28 => self.sent.get(),
            0x30 => self.received.get(),
            _ => 0,
        }
    }
}

impl BusDevice for Mailbox {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        let v = if offset & 7 == 0 { self.reg(offset) } else { 0 };
        crate::put_le_value(data, v);
        MAILBOX_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        let v = crate::le_value(data);
        match offset {
            0x00 => {
                self.sent.inc();
                ctx.requests.push(Request::LinkSend {
                    port: self.port,
                    delay: self.latency,
                    data: v,
                });
            }
            0x18 => self.vector = v as u8,
            _ => {}
        }
        MAILBOX_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&MailboxState {
            vector: self.vector,
            rx: self.rx.iter().copied().collect(),
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: MailboxState = crate::state::parse(state)?;
        crate::state::check(
            s.rx.len() <= RX_CAPACITY,
            "rx",
            format_args!("{} values, at most {RX_CAPACITY}", s.rx.len()),
        )?;
        self.vector = s.vector;
        self.rx = s.rx.into();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intc::VectorIntc;
    use sim::intr::InterruptController;
    use std::sync::{Arc, Mutex};

    #[test]
    fn send_receive_and_interrupt() {
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let mut stats = Stats::new();
        let mut m = Mailbox::new(3, 5_000, intc.clone(), &mut stats, "m").unwrap();
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        m.write(Space::Mmio, 0x18, &0x50u64.to_le_bytes(), &mut ctx);
        m.write(Space::Mmio, 0x00, &42u64.to_le_bytes(), &mut ctx);
        assert_eq!(
            reqs,
            vec![Request::LinkSend {
                port: 3,
                delay: 5_000,
                data: 42
            }]
        );
        m.deliver(7);
        m.deliver(8);
        assert_eq!(intc.lock().unwrap().acknowledge(), Some(0x50));
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        let mut d = [0u8; 8];
        m.read(Space::Mmio, 0x10, &mut d, &mut ctx);
        assert_eq!(u64::from_le_bytes(d), 2);
        m.read(Space::Mmio, 0x08, &mut d, &mut ctx);
        assert_eq!(u64::from_le_bytes(d), 7);
        m.read(Space::Mmio, 0x08, &mut d, &mut ctx);
        assert_eq!(u64::from_le_bytes(d), 8);
        m.read(Space::Mmio, 0x08, &mut d, &mut ctx);
        assert_eq!(u64::from_le_bytes(d), 0);
        m.read(Space::Mmio, 0x20, &mut d, &mut ctx);
        assert_eq!(u64::from_le_bytes(d), 5);
    }

    #[test]
    fn receive_queue_is_bounded() {
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let mut stats = Stats::new();
        let mut m = Mailbox::new(0, 1, intc, &mut stats, "m").unwrap();
        for i in 0..(RX_CAPACITY as u64 + 10) {
            m.deliver(i);
        }
        assert_eq!(m.rx.len(), RX_CAPACITY);
        assert_eq!(stats.dump(0).get("m.dropped").unwrap().as_f64(), 10.0);
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let mut stats = Stats::new();
        let mut m = Mailbox::new(1, 5_000, intc, &mut stats, "m").unwrap();
        let mut reqs = vec![];
        m.write(
            Space::Mmio,
            0x18,
            &0x50u64.to_le_bytes(),
            &mut AccessCtx::new(0, &mut reqs),
        );
        for v in [7, 8, u64::MAX] {
            m.deliver(v);
        }
        let intc2 = Arc::new(Mutex::new(VectorIntc::new()));
        let mut n = Mailbox::new(1, 5_000, intc2.clone(), &mut stats, "n").unwrap();
        round_trip(&m, &mut n);
        assert_eq!(intc2.lock().unwrap().pending(), sim::intr::Pending::None);
        let mut rd = |b: &mut Mailbox, off: u64| {
            let mut d = [0u8; 8];
            b.read(Space::Mmio, off, &mut d, &mut AccessCtx::new(0, &mut reqs));
            u64::from_le_bytes(d)
        };
        for off in [0x10, 0x18, 0x08, 0x08, 0x08, 0x08, 0x10] {
            assert_eq!(rd(&mut n, off), rd(&mut m, off), "offset {off:#x}");
        }
        n.deliver(9);
        assert_eq!(intc2.lock().unwrap().acknowledge(), Some(0x50));
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let mut stats = Stats::new();
        let mut m = Mailbox::new(1, 5_000, intc, &mut stats, "m").unwrap();
        m.deliver(3);
        refuses_garbage(&mut m);
        refused_edit(&mut m, &["rx"], json!(vec![0u64; RX_CAPACITY + 1]), "rx");
        refused_edit(&mut m, &["rx", "0"], json!(-3), "rx[0]");
        refused_edit(&mut m, &["vector"], json!(256), "vector");
    }

    proptest::proptest! {
        #[test]
        fn any_access_is_safe(ops in proptest::collection::vec((0u64..0x1000, proptest::prelude::any::<u64>(), 0usize..9, proptest::prelude::any::<bool>()), 0..64)) {
            let intc = Arc::new(Mutex::new(VectorIntc::new()));
            let mut stats = Stats::new();
            let mut m = Mailbox::new(0, 1, intc, &mut stats, "m").unwrap();
            let mut reqs = vec![];
            for (off, v, len, w) in ops {
                let mut ctx = AccessCtx::new(0, &mut reqs);
                if w { m.write(Space::Mmio, off, &v.to_le_bytes()[..len.min(8)], &mut ctx); }
                else { let mut d = vec![0u8; len]; m.read(Space::Mmio, off, &mut d, &mut ctx); }
            }
            proptest::prop_assert!(reqs.len() <= 64);
        }
    }
}
