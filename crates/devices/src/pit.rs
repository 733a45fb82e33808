//! The 8254 programmable interval timer (ports 0x40-0x43) and system control
//! port B (0x61: channel 2 gate and output, speaker enable).
//!
//! The counters run at 1.193182 MHz of simulated time and are evaluated
//! lazily from the ticks elapsed since they were loaded. Channel 0 drives
//! IRQ0: the device's only event is the next rising edge of its output.
//! Modes 0 (interrupt on terminal count), 2 (rate generator) and 3 (square
//! wave) are modelled; 1, 4 and 5 count like 0, and 6/7 alias 2/3. BCD
//! counting is not modelled (counts are binary).

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space, TimedDevice};
use serde::{Deserialize, Serialize};
use sim::tick::TICKS_PER_SECOND;
use sim::{Counter, Stats, Tick};

use crate::irq::IrqLine;
use crate::state::check;

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;
/// Base port.
pub const PIT_BASE: u64 = 0x40;
/// System control port B.
pub const PORT_B: u64 = 0x61;
/// Port B as an offset from [`PIT_BASE`]: attach 0x61 through
/// [`mem::Rebased`] with this added.
pub const PORT_B_OFFSET: u64 = PORT_B - PIT_BASE;
/// Access latency.
pub const PIT_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;

/// PIT clocks elapsed in `ticks` of simulated time.
fn clocks_in(ticks: Tick) -> u64 {
    (u128::from(ticks) * u128::from(PIT_HZ) / u128::from(TICKS_PER_SECOND)) as u64
}

/// The tick at which PIT clock `n` (counted from `start`) begins.
fn tick_of_clock(start: Tick, n: u64) -> Tick {
    let t = (u128::from(n) * u128::from(TICKS_PER_SECOND)).div_ceil(u128::from(PIT_HZ));
    start.saturating_add(t.min(u128::from(u64::MAX)) as u64)
}

/// One counter's state, as it is saved (ticks are absolute).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    mode: u8,
    access: u8,
    /// The count loaded (0 means 65536).
    reload: u32,
    /// When counting (re)started; `None` until a count is written.
    #[serde(deserialize_with = "Option::deserialize")]
    start: Option<Tick>,
    /// Clocks counted before a pause (gate low) in mode 0.
    #[serde(deserialize_with = "Option::deserialize")]
    paused_at: Option<u64>,
    gate: bool,
    /// Latched count and how many bytes of it remain to read.
    #[serde(deserialize_with = "Option::deserialize")]
    latch: Option<(u16, u8)>,
    #[serde(deserialize_with = "Option::deserialize")]
    status_latch: Option<u8>,
    /// Low byte written, waiting for the high byte (access mode 3).
    #[serde(deserialize_with = "Option::deserialize")]
    write_low: Option<u8>,
    /// Next byte to read is the high byte (access mode 3, unlatched).
    read_high: bool,
    null_count: bool,
}

impl Channel {
    fn period(&self) -> u64 {
        if self.reload == 0 {
            65536
        } else {
            u64::from(self.reload)
        }
    }

    fn mode(&self) -> u8 {
        match self.mode {
            6 => 2,
            7 => 3,
            m => m,
        }
    }

    /// Clocks counted since the count was loaded.
    fn elapsed(&self, now: Tick) -> Option<u64> {
        if let Some(p) = self.paused_at {
            return Some(p);
        }
        self.start.map(|s| clocks_in(now.saturating_sub(s)))
    }

    fn count(&self, now: Tick) -> u16 {
        let Some(n) = self.elapsed(now) else {
            return 0;
        };
        let p = self.period();
        match self.mode() {
            2 => (p - n % p) as u16,
            3 => {
                // Decrements by two, twice per period.
                let half = p.div_ceil(2).max(1);
                (p - 2 * (n % half)).max(2) as u16
            }
            // Modes 0, 1, 4, 5: down from the reload, wrapping after 0.
            _ => (p.wrapping_sub(n) & 0xffff) as u16,
        }
    }

    fn output(&self, now: Tick) -> bool {
        let Some(n) = self.elapsed(now) else {
            return self.mode() != 0;
        };
        let p = self.period();
        match self.mode() {
            2 => n % p != p - 1,
            3 => n % p < p.div_ceil(2),
            _ => n >= p,
        }
    }

    /// The tick of the next rising edge of the output after `now`.
    fn next_rise(&self, now: Tick) -> Option<Tick> {
        let start = self.start?;
        if self.paused_at.is_some() {
            return None;
        }
        let n = clocks_in(now.saturating_sub(start));
        let p = self.period();
        let edge = match self.mode() {
            // Once, at terminal count.
            0 | 1 | 4 | 5 => (n < p).then_some(p)?,
            // Every period (rate generator and square wave).
            _ => (n / p + 1) * p,
        };
        Some(tick_of_clock(start, edge))
    }

    fn status(&self, now: Tick) -> u8 {
        (u8::from(self.output(now)) << 7)
            | (u8::from(self.null_count) << 6)
            | (self.access << 4)
            | (self.mode << 1)
    }
}

impl Channel {
    fn validate(&self, c: usize) -> Result<(), RestoreError> {
        let f = |field: &str| format!("channels[{c}].{field}");
        check(
            self.mode <= 7,
            &f("mode"),
            format_args!("{} is no mode 0-7", self.mode),
        )?;
        check(
            self.access <= 3,
            &f("access"),
            format_args!("{} is no access mode 0-3", self.access),
        )?;
        check(
            self.reload <= 0xffff,
            &f("reload"),
            format_args!("{} does not fit the 16-bit counter", self.reload),
        )?;
        check(
            self.latch.is_none_or(|(_, left)| (1..=2).contains(&left)),
            &f("latch"),
            "the bytes left to read are 1 or 2",
        )
    }
}

/// The PIT's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PitState {
    pub channels: [Channel; 3],
    /// The tick of the last IRQ0 edge raised.
    #[serde(deserialize_with = "Option::deserialize")]
    pub last_edge: Option<Tick>,
    /// Port B's speaker enable.
    pub speaker: bool,
}

/// The PIT and port B.
pub struct Pit {
    ch: [Channel; 3],
    irq0: IrqLine,
    /// The tick of the last IRQ0 edge raised.
    last_edge: Option<Tick>,
    speaker: bool,
    irqs: Counter,
}

impl Pit {
    /// A PIT whose channel 0 drives `irq0`.
    pub fn new(
        irq0: IrqLine,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        let mut ch: [Channel; 3] = Default::default();
        ch[0].gate = true;
        ch[1].gate = true;
        Ok(Pit {
            ch,
            irq0,
            last_edge: None,
            speaker: false,
            irqs: stats.counter(
                &format!("{prefix}.irq0"),
                "IRQ0 edges raised by channel 0",
                "Count",
            )?,
        })
    }

    fn control(&mut self, v: u8, now: Tick) {
        let sel = usize::from(v >> 6);
        if sel == 3 {
            // Read-back: bit 5 clear = latch count, bit 4 clear = latch status.
            for c in 0..3 {
                if v & (2 << c) == 0 {
                    continue;
                }
                let count = self.ch[c].count(now);
                let status = self.ch[c].status(now);
                let ch = &mut self.ch[c];
                if v & 0x20 == 0 && ch.latch.is_none() {
                    ch.latch = Some((count, if ch.access == 3 { 2 } else { 1 }));
                }
                if v & 0x10 == 0 && ch.status_latch.is_none() {
                    ch.status_latch = Some(status);
                }
            }
            return;
        }
        let access = (v >> 4) & 3;
        if access == 0 {
            // Counter latch command.
            let count = self.ch[sel].count(now);
            let ch = &mut self.ch[sel];
            if ch.latch.is_none() {
                ch.latch = Some((count, if ch.access == 3 { 2 } else { 1 }));
            }
            return;
        }
        let ch = &mut self.ch[sel];
        ch.access = access;
        ch.mode = (v >> 1) & 7;
        ch.start = None;
        ch.paused_at = None;
        ch.write_low = None;
        ch.read_high = false;
        ch.latch = None;
        ch.null_count = true;
    }

    fn write_counter(&mut self, c: usize, v: u8, now: Tick) {
        let ch = &mut self.ch[c];
        let value = match ch.access {
            1 => Some(u32::from(v)),
            2 => Some(u32::from(v) << 8),
            _ => match ch.write_low.take() {
                None => {
                    ch.write_low = Some(v);
                    None
                }
                Some(lo) => Some(u32::from(lo) | (u32::from(v) << 8)),
            },
        };
        if let Some(value) = value {
            ch.reload = value;
            ch.null_count = false;
            ch.paused_at = None;
            // Counting starts now if the gate is high (else at its rising edge).
            ch.start = ch.gate.then_some(now);
            if c == 0 {
                self.last_edge = None;
            }
        }
    }

    fn read_counter(&mut self, c: usize, now: Tick) -> u8 {
        let count = self.ch[c].count(now);
        let ch = &mut self.ch[c];
        if let Some(s) = ch.status_latch.take() {
            return s;
        }
        if let Some((latched, left)) = ch.latch {
            let high_next = ch.access == 2 || (ch.access == 3 && left == 1);
            ch.latch = (left > 1).then_some((latched, left - 1));
            return if high_next {
                (latched >> 8) as u8
            } else {
                latched as u8
            };
        }
        match ch.access {
            1 => count as u8,
            2 => (count >> 8) as u8,
            _ => {
                let high = ch.read_high;
                ch.read_high = !high;
                if high {
                    (count >> 8) as u8
                } else {
                    count as u8
                }
            }
        }
    }

    /// Reads port B (0x61).
    pub fn port_b_read(&self, now: Tick) -> u8 {
        // Bit 4 toggles every 15.085 us (DRAM refresh); some delay loops poll it.
        let refresh = ((now / 15_085_000) & 1) as u8;
        u8::from(self.ch[2].gate)
            | (u8::from(self.speaker) << 1)
            | (refresh << 4)
            | (u8::from(self.ch[2].output(now)) << 5)
    }

    /// Writes port B (0x61): bit 0 gates channel 2, bit 1 enables the speaker.
    pub fn port_b_write(&mut self, v: u8, now: Tick) {
        self.speaker = v & 2 != 0;
        let gate = v & 1 != 0;
        let ch = &mut self.ch[2];
        if gate == ch.gate {
            return;
        }
        ch.gate = gate;
        if gate {
            // A rising gate (re)starts the count (modes 1, 2, 3, 5 reload;
            // mode 0 resumes where it paused).
            match (ch.mode(), ch.paused_at) {
                (0 | 4, Some(n)) => {
                    ch.start = Some(now.saturating_sub(tick_of_clock(0, n)));
                    ch.paused_at = None;
                }
                _ if !ch.null_count || ch.reload != 0 => {
                    ch.start = Some(now);
                    ch.paused_at = None;
                }
                _ => {}
            }
        } else if let Some(n) = ch.elapsed(now) {
            ch.paused_at = Some(n);
        }
    }
}

impl BusDevice for Pit {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset + i as u64 {
                o @ 0..=2 => self.read_counter(o as usize, ctx.now),
                PORT_B_OFFSET => self.port_b_read(ctx.now),
                _ => 0xff, // the control word cannot be read
            };
        }
        PIT_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        for (i, &v) in data.iter().enumerate() {
            match offset + i as u64 {
                o @ 0..=2 => self.write_counter(o as usize, v, ctx.now),
                3 => self.control(v, ctx.now),
                PORT_B_OFFSET => self.port_b_write(v, ctx.now),
                _ => {}
            }
        }
        PIT_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&PitState {
            channels: self.ch.clone(),
            last_edge: self.last_edge,
            speaker: self.speaker,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: PitState = crate::state::parse(state)?;
        for (c, ch) in s.channels.iter().enumerate() {
            ch.validate(c)?;
        }
        self.ch = s.channels;
        self.last_edge = s.last_edge;
        self.speaker = s.speaker;
        Ok(())
    }
}

impl TimedDevice for Pit {
    fn next_deadline(&self) -> Option<Tick> {
        let ch = &self.ch[0];
        let from = self.last_edge.unwrap_or(ch.start?);
        ch.next_rise(from)
    }

    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        if let Some(at) = self.next_deadline() {
            if at <= ctx.now {
                self.last_edge = Some(at);
                self.irqs.inc();
                self.irq0.pulse();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::tests::Recorder;
    use std::sync::{Arc, Mutex};

    const CLOCK: Tick = 838_096; // one PIT clock, rounded up, in ticks

    fn pit() -> (Pit, Arc<Mutex<Recorder>>) {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut stats = Stats::new();
        (
            Pit::new(IrqLine::none().to(rec.clone(), 0), &mut stats, "pit").unwrap(),
            rec,
        )
    }

    fn out(p: &mut Pit, now: Tick, port: u64, v: u8) {
        let mut r = vec![];
        p.write(Space::Pio, port, &[v], &mut AccessCtx::new(now, &mut r));
    }

    fn inb(p: &mut Pit, now: Tick, port: u64) -> u8 {
        let mut r = vec![];
        let mut d = [0u8];
        p.read(Space::Pio, port, &mut d, &mut AccessCtx::new(now, &mut r));
        d[0]
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let (mut p, _) = pit();
        // Channel 0: mode 2, one edge already raised; channel 2: square
        // wave, gated; channel 1: a latched count half read.
        out(&mut p, 0, 3, 0x34);
        out(&mut p, 0, 0, 0xa9);
        out(&mut p, 0, 0, 0x04);
        let first = p.next_deadline().unwrap();
        p.on_deadline(&mut AccessCtx::new(first, &mut vec![]));
        out(&mut p, 0, 3, 0x76);
        out(&mut p, 100, 1, 0x00);
        out(&mut p, 100, 1, 0x10);
        out(&mut p, 5_000_000, 3, 0x40); // latch channel 1
        inb(&mut p, 5_000_000, 1);
        out(&mut p, 0, PORT_B_OFFSET, 0x03);
        out(&mut p, 0, 3, 0xb6);
        out(&mut p, 0, 2, 0x20);
        out(&mut p, 0, 2, 0x00);
        let (mut q, rec2) = pit();
        round_trip(&p, &mut q);
        assert_eq!(q.next_deadline(), p.next_deadline());
        let now = first + 7_777_777;
        for port in [1, 1, 1, 2, 2, 0, 0, PORT_B_OFFSET] {
            assert_eq!(
                inb(&mut q, now, port),
                inb(&mut p, now, port),
                "port {port}"
            );
        }
        let at = q.next_deadline().unwrap();
        q.on_deadline(&mut AccessCtx::new(at, &mut vec![]));
        p.on_deadline(&mut AccessCtx::new(at, &mut vec![]));
        assert_eq!(rec2.lock().unwrap().0, vec![(0, true), (0, false)]);
        assert_eq!(q.next_deadline(), p.next_deadline());
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let (mut p, _) = pit();
        out(&mut p, 0, 3, 0x34);
        refuses_garbage(&mut p);
        refused_edit(
            &mut p,
            &["channels", "1", "mode"],
            json!(8),
            "channels[1].mode",
        );
        refused_edit(
            &mut p,
            &["channels", "0", "access"],
            json!(4),
            "channels[0].access",
        );
        refused_edit(
            &mut p,
            &["channels", "2", "reload"],
            json!(65536),
            "channels[2].reload",
        );
        refused_edit(
            &mut p,
            &["channels", "2", "latch"],
            json!([5, 0]),
            "channels[2].latch",
        );
        refused_edit(
            &mut p,
            &["channels", "2", "latch"],
            json!([5]),
            "channels[2].latch",
        );
        let mut two = p.save();
        two["channels"].as_array_mut().unwrap().pop();
        refused(&mut p, two, "channels");
        refused_edit(&mut p, &["last_edge"], json!("soon"), "last_edge");
    }

    #[test]
    fn mode2_rate_generator_interrupts_every_period() {
        let (mut p, rec) = pit();
        // Channel 0, lobyte/hibyte, mode 2, divisor 1193 (about 1 kHz).
        out(&mut p, 0, 3, 0x34);
        out(&mut p, 0, 0, (1193 & 0xff) as u8);
        out(&mut p, 0, 0, (1193 >> 8) as u8);
        let first = p.next_deadline().unwrap();
        assert!(
            (first as i64 - 999_847_000).abs() < 1_000,
            "first edge at {first}"
        );
        let mut reqs = vec![];
        p.on_deadline(&mut AccessCtx::new(first, &mut reqs));
        assert_eq!(rec.lock().unwrap().0, vec![(0, true), (0, false)]);
        let second = p.next_deadline().unwrap();
        assert!(
            (second - first).abs_diff(999_847_000) < CLOCK,
            "{}",
            second - first
        );
        // Not yet due: nothing happens.
        p.on_deadline(&mut AccessCtx::new(first + 10, &mut reqs));
        assert_eq!(rec.lock().unwrap().0.len(), 2);
    }

    #[test]
    fn edges_stop_at_the_end_of_time() {
        // Found by fuzzing (fuzz/, target dev_pit): the edge after the last
        // representable one saturates to MAX_TICK; serviced there, it named
        // MAX_TICK again and the system looped at that tick forever. A
        // deadline at MAX_TICK is never serviced (mem::service_tick).
        let (mut p, rec) = pit();
        let start = Tick::MAX - 2_500 * CLOCK;
        out(&mut p, start, 3, 0x34); // ch0 lohi mode 2
        out(&mut p, start, 0, 0xe8);
        out(&mut p, start, 0, 0x03); // 1000 clocks
        let (mut now, mut edges) = (start, 0);
        while let Some(at) = mem::service_tick(p.next_deadline(), now) {
            assert!(at > now && edges < 3, "serviced again at {at}");
            p.on_deadline(&mut AccessCtx::new(at, &mut vec![]));
            (now, edges) = (at, edges + 1);
        }
        assert_eq!(edges, 2, "the edges before the end of time");
        assert_eq!(rec.lock().unwrap().0.len(), 4, "two pulses");
        assert_eq!(p.next_deadline(), Some(Tick::MAX));
    }

    #[test]
    fn counts_down_and_latches() {
        let (mut p, _) = pit();
        out(&mut p, 0, 3, 0x34); // ch0 lohi mode 2
        out(&mut p, 0, 0, 0x00);
        out(&mut p, 0, 0, 0x10); // 4096
                                 // 100 clocks later: count 3996.
        let t = tick_of_clock(0, 100);
        out(&mut p, t, 3, 0x00); // latch ch0
        let lo = inb(&mut p, t + 50 * CLOCK, 0);
        let hi = inb(&mut p, t + 60 * CLOCK, 0);
        assert_eq!(u16::from(lo) | (u16::from(hi) << 8), 3996);
        // Unlatched reads follow time.
        let lo = inb(&mut p, tick_of_clock(0, 200), 0);
        let hi = inb(&mut p, tick_of_clock(0, 200), 0);
        assert_eq!(u16::from(lo) | (u16::from(hi) << 8), 3896);
    }

    #[test]
    fn read_back_status_and_mode0_output() {
        let (mut p, _) = pit();
        out(&mut p, 0, 3, 0x30); // ch0 lohi mode 0
        out(&mut p, 0, 0, 100);
        out(&mut p, 0, 0, 0);
        out(&mut p, 10, 3, 0xe2); // read-back status of ch0
        let st = inb(&mut p, 10, 0);
        assert_eq!(st & 0x80, 0, "output low before terminal count");
        assert_eq!((st >> 1) & 7, 0, "mode 0");
        assert_eq!((st >> 4) & 3, 3, "lohi");
        let t = tick_of_clock(0, 101);
        out(&mut p, t, 3, 0xe2);
        assert_eq!(
            inb(&mut p, t, 0) & 0x80,
            0x80,
            "output high after terminal count"
        );
        // Mode 0 interrupts once.
        assert_eq!(p.next_deadline(), Some(tick_of_clock(0, 100)));
        let mut reqs = vec![];
        p.on_deadline(&mut AccessCtx::new(tick_of_clock(0, 100), &mut reqs));
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn channel2_gate_and_output_on_port_b() {
        let (mut p, _) = pit();
        // Linux's PIT calibration: gate high, ch2 mode 0, count 0xffff, poll bit 5.
        p.port_b_write(0x01, 0);
        out(&mut p, 0, 3, 0xb0);
        out(&mut p, 0, 2, 0xff);
        out(&mut p, 0, 2, 0xff);
        assert_eq!(p.port_b_read(1000) & 0x21, 0x01, "gate high, output low");
        assert_eq!(p.port_b_read(tick_of_clock(0, 0x10000)) & 0x20, 0x20);
        // Gate low pauses mode 0.
        let (mut p, _) = pit();
        p.port_b_write(0x01, 0);
        out(&mut p, 0, 3, 0xb0);
        out(&mut p, 0, 2, 0x00);
        out(&mut p, 0, 2, 0x10);
        p.port_b_write(0x00, tick_of_clock(0, 100));
        out(&mut p, tick_of_clock(0, 5000), 3, 0x80); // latch ch2
        let lo = inb(&mut p, 0, 2);
        let hi = inb(&mut p, 0, 2);
        assert_eq!(u16::from(lo) | (u16::from(hi) << 8), 4096 - 100);
    }

    #[test]
    fn square_wave_output() {
        let (mut p, _) = pit();
        out(&mut p, 0, 3, 0x36); // ch0 lohi mode 3
        out(&mut p, 0, 0, 100);
        out(&mut p, 0, 0, 0);
        out(&mut p, tick_of_clock(0, 10), 3, 0xe2);
        assert_eq!(inb(&mut p, 0, 0) & 0x80, 0x80, "high in the first half");
        out(&mut p, tick_of_clock(0, 60), 3, 0xe2);
        assert_eq!(inb(&mut p, 0, 0) & 0x80, 0, "low in the second half");
        assert_eq!(p.next_deadline(), Some(tick_of_clock(0, 100)));
    }

    proptest::proptest! {
        #[test]
        fn any_access_sequence_is_safe(ops in proptest::collection::vec((0u64..5, proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>(), 0u64..1_000_000_000), 0..100)) {
            let (mut p, _) = pit();
            let mut now = 0;
            let mut reqs = vec![];
            for (port, v, w, dt) in ops {
                now += dt;
                if port == 4 {
                    if w { p.port_b_write(v, now) } else { p.port_b_read(now); }
                } else if w { out(&mut p, now, port, v) } else { inb(&mut p, now, port); }
                if let Some(d) = p.next_deadline() {
                    // A deadline never lies before the count started.
                    proptest::prop_assert!(d >= p.ch[0].start.unwrap_or(0));
                    if d <= now { p.on_deadline(&mut AccessCtx::new(now, &mut reqs)); }
                }
            }
        }
    }
}
