//! The i8042 keyboard controller (ports 0x60 and 0x64), enough for a kernel
//! to probe it and to reset the machine through it (Linux's `reboot=k`
//! writes 0xFE to port 0x64, or clears bit 0 of the output port).
//!
//! There is no keyboard behind it: keyboard commands are acknowledged
//! (0xFA) and reset answers its self-test (0xAA).

use std::collections::VecDeque;

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space};
use serde::{Deserialize, Serialize};
use sim::{Request, Tick};

use crate::state::check;

use crate::irq::IrqLine;

/// Data port.
pub const I8042_DATA: u64 = 0x60;
/// Status/command port.
pub const I8042_CMD: u64 = 0x64;
/// Access latency.
pub const I8042_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;

const ST_OBF: u8 = 0x01;
const ST_SYS: u8 = 0x04;
const ST_CMD: u8 = 0x08;
const ST_UNLOCKED: u8 = 0x10;
const CFG_KBD_INT: u8 = 0x01;

/// Bytes the output buffer holds at most.
const OUT_CAPACITY: usize = 16;

/// The controller's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// Bytes waiting for the guest on port 0x60, oldest first (at most 16).
    pub out: Vec<u8>,
    /// The controller configuration byte (bit 0: keyboard interrupt).
    pub config: u8,
    /// A controller command waiting for its data byte.
    #[serde(deserialize_with = "Option::deserialize")]
    pub pending: Option<u8>,
    /// The last write went to the command port.
    pub last_was_cmd: bool,
    pub output_port: u8,
}

/// The controller.
pub struct I8042 {
    out: VecDeque<u8>,
    config: u8,
    /// A controller command waiting for its data byte.
    pending: Option<u8>,
    last_was_cmd: bool,
    output_port: u8,
    irq1: IrqLine,
}

impl I8042 {
    pub fn new(irq1: IrqLine) -> Self {
        I8042 {
            out: VecDeque::new(),
            config: 0x45, // keyboard interrupt, system flag, translation
            pending: None,
            last_was_cmd: false,
            output_port: 0x01,
            irq1,
        }
    }

    fn push(&mut self, v: u8) {
        if self.out.len() < OUT_CAPACITY {
            self.out.push_back(v);
        }
        self.update_irq();
    }

    fn update_irq(&self) {
        self.irq1
            .set(!self.out.is_empty() && self.config & CFG_KBD_INT != 0);
    }

    fn status(&self) -> u8 {
        let mut s = ST_SYS | ST_UNLOCKED;
        if !self.out.is_empty() {
            s |= ST_OBF;
        }
        if self.last_was_cmd {
            s |= ST_CMD;
        }
        s
    }

    fn command(&mut self, v: u8, requests: &mut Vec<Request>) {
        match v {
            0x20 => self.push(self.config),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(v),
            0xa7 | 0xa8 | 0xad | 0xae => {}
            0xa9 | 0xab => self.push(0x00),
            0xaa => self.push(0x55),
            0xd0 => self.push(self.output_port),
            // Pulse output lines: bit 0 low pulses the reset line.
            0xf0..=0xff if v & 1 == 0 => requests.push(Request::Reset),
            _ => {}
        }
    }

    fn data(&mut self, v: u8, requests: &mut Vec<Request>) {
        match self.pending.take() {
            Some(0x60) => {
                self.config = v;
                self.update_irq();
            }
            Some(0xd1) => {
                self.output_port = v;
                if v & 1 == 0 {
                    requests.push(Request::Reset);
                }
            }
            Some(0xd2) => self.push(v),
            Some(0xd3) | Some(0xd4) => {} // no mouse
            _ => {
                // A keyboard command.
                self.push(0xfa);
                match v {
                    0xff => self.push(0xaa),
                    0xf2 => {
                        self.push(0xab);
                        self.push(0x83);
                    }
                    0xee => {
                        self.out.pop_back();
                        self.push(0xee);
                    }
                    _ => {}
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        for b in data.iter_mut() {
            *b = match offset {
                0 => {
                    let v = self.out.pop_front().unwrap_or(0);
                    self.update_irq();
                    v
                }
                4 => self.status(),
                _ => 0xff,
            };
        }
        I8042_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        for &v in data {
            match offset {
                0 => {
                    self.last_was_cmd = false;
                    self.data(v, ctx.requests);
                }
                4 => {
                    self.last_was_cmd = true;
                    self.command(v, ctx.requests);
                }
                _ => {}
            }
        }
        I8042_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&I8042State {
            out: self.out.iter().copied().collect(),
            config: self.config,
            pending: self.pending,
            last_was_cmd: self.last_was_cmd,
            output_port: self.output_port,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: I8042State = crate::state::parse(state)?;
        check(
            s.out.len() <= OUT_CAPACITY,
            "out",
            format_args!("{} bytes, the buffer holds {OUT_CAPACITY}", s.out.len()),
        )?;
        check(
            s.pending.is_none_or(|c| matches!(c, 0x60 | 0xd1..=0xd4)),
            "pending",
            format_args!("{:?} is no command that takes a data byte", s.pending),
        )?;
        self.out = s.out.into();
        self.config = s.config;
        self.pending = s.pending;
        self.last_was_cmd = s.last_was_cmd;
        self.output_port = s.output_port;
        Ok(())
    }
}

/// The POST-code port (0x80): firmware and kernels write progress codes or
/// use it as a delay. kvmsim keeps the last code and counts the writes.
pub struct PostPort {
    last: u8,
    writes: sim::Counter,
}

/// Port of the POST-code sink.
pub const POST_PORT: u64 = 0x80;

impl PostPort {
    pub fn new(stats: &mut sim::Stats, prefix: &str) -> Result<Self, sim::stats::StatsError> {
        Ok(PostPort {
            last: 0,
            writes: stats.counter(
                &format!("{prefix}.writes"),
                "Writes to the POST-code port 0x80",
                "Count",
            )?,
        })
    }

    /// The last code written.
    pub fn last(&self) -> u8 {
        self.last
    }
}

impl BusDevice for PostPort {
    fn read(&mut self, _: Space, _: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        data.fill(self.last);
        I8042_LATENCY
    }

    fn write(&mut self, _: Space, _: u64, data: &[u8], _: &mut AccessCtx) -> Tick {
        if let Some(&v) = data.last() {
            self.last = v;
            self.writes.inc();
        }
        I8042_LATENCY
    }

    /// The last code written (the write count is a statistic).
    fn save(&self) -> SavedState {
        crate::state::save(&PostState { last: self.last })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: PostState = crate::state::parse(state)?;
        self.last = s.last;
        Ok(())
    }
}

/// The POST port's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostState {
    /// The last code written.
    pub last: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::tests::Recorder;
    use std::sync::{Arc, Mutex};

    fn io(k: &mut I8042, port: u64, w: Option<u8>) -> (u8, Vec<Request>) {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        let mut d = [0u8];
        match w {
            Some(v) => {
                k.write(Space::Pio, port, &[v], &mut ctx);
            }
            None => {
                k.read(Space::Pio, port, &mut d, &mut ctx);
            }
        }
        (d[0], reqs)
    }

    #[test]
    fn reset_through_0xfe_and_output_port() {
        let mut k = I8042::new(IrqLine::none());
        assert_eq!(io(&mut k, 4, Some(0xfe)).1, vec![Request::Reset]);
        assert_eq!(io(&mut k, 4, Some(0xff)).1, vec![], "0xFF pulses nothing");
        io(&mut k, 4, Some(0xd1));
        assert_eq!(io(&mut k, 0, Some(0xfe)).1, vec![Request::Reset]);
    }

    #[test]
    fn probe_sequence() {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut k = I8042::new(IrqLine::none().to(rec.clone(), 1));
        assert_eq!(io(&mut k, 4, None).0 & ST_OBF, 0);
        io(&mut k, 4, Some(0xaa));
        assert_eq!(io(&mut k, 4, None).0 & ST_OBF, ST_OBF);
        assert_eq!(io(&mut k, 0, None).0, 0x55);
        io(&mut k, 4, Some(0x20));
        assert_eq!(io(&mut k, 0, None).0, 0x45);
        io(&mut k, 4, Some(0x60));
        io(&mut k, 0, Some(0x44)); // keyboard interrupt off
        rec.lock().unwrap().0.clear();
        io(&mut k, 0, Some(0xff)); // keyboard reset
        assert_eq!((io(&mut k, 0, None).0, io(&mut k, 0, None).0), (0xfa, 0xaa));
        assert!(
            rec.lock().unwrap().0.iter().all(|&(_, l)| !l),
            "no IRQ1 with interrupts off"
        );
        io(&mut k, 4, Some(0x60));
        io(&mut k, 0, Some(0x45));
        io(&mut k, 0, Some(0xf4));
        assert_eq!(rec.lock().unwrap().0.last(), Some(&(1, true)));
        io(&mut k, 0, None);
        assert_eq!(rec.lock().unwrap().0.last(), Some(&(1, false)));
    }

    #[test]
    fn post_port_keeps_the_last_code() {
        let mut stats = sim::Stats::new();
        let mut p = PostPort::new(&mut stats, "post").unwrap();
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        p.write(Space::Pio, 0, &[0x12], &mut ctx);
        p.write(Space::Pio, 0, &[0x34], &mut ctx);
        assert_eq!(p.last(), 0x34);
        assert_eq!(stats.dump(0).get("post.writes").unwrap().as_f64(), 2.0);
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut k = I8042::new(IrqLine::none().to(rec.clone(), 1));
        io(&mut k, 0, Some(0xf2)); // identify: three bytes queued
        io(&mut k, 4, Some(0xd1)); // waiting for the output port byte
        let rec2 = Arc::new(Mutex::new(Recorder::default()));
        let mut r = I8042::new(IrqLine::none().to(rec2.clone(), 1));
        round_trip(&k, &mut r);
        assert!(
            rec2.lock().unwrap().0.is_empty(),
            "a restore drives no line"
        );
        assert_eq!(io(&mut r, 4, None).0, io(&mut k, 4, None).0);
        // The pending command takes the next data byte in both.
        assert_eq!(io(&mut r, 0, Some(0xfe)).1, vec![Request::Reset]);
        assert_eq!(io(&mut k, 0, Some(0xfe)).1, vec![Request::Reset]);
        for _ in 0..4 {
            assert_eq!(io(&mut r, 0, None).0, io(&mut k, 0, None).0);
        }
        assert_eq!(rec2.lock().unwrap().0.last(), Some(&(1, false)));

        let mut stats = sim::Stats::new();
        let mut p = PostPort::new(&mut stats, "p").unwrap();
        let mut q = PostPort::new(&mut stats, "q").unwrap();
        let mut reqs = vec![];
        p.write(Space::Pio, 0, &[0x42], &mut AccessCtx::new(0, &mut reqs));
        round_trip(&p, &mut q);
        assert_eq!(q.last(), 0x42);
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let mut k = I8042::new(IrqLine::none());
        io(&mut k, 4, Some(0xaa));
        refuses_garbage(&mut k);
        refused_edit(&mut k, &["out"], json!(vec![0u8; 17]), "out");
        refused_edit(&mut k, &["pending"], json!(0x20), "pending");
        refused_edit(&mut k, &["config"], json!("x"), "config");
        let mut stats = sim::Stats::new();
        let mut p = PostPort::new(&mut stats, "p").unwrap();
        refuses_garbage(&mut p);
        refused(&mut p, json!({"last": 256}), "last");
        refused(&mut p, json!(null), "");
    }

    proptest::proptest! {
        #[test]
        fn any_access_sequence_is_safe(ops in proptest::collection::vec((proptest::prelude::any::<bool>(), proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()), 0..200)) {
            let mut k = I8042::new(IrqLine::none());
            for (cmd, v, w) in ops {
                let port = if cmd { 4 } else { 0 };
                let (_, reqs) = io(&mut k, port, w.then_some(v));
                proptest::prop_assert!(reqs.len() <= 1);
                proptest::prop_assert!(k.out.len() <= 16);
            }
        }
    }
}
