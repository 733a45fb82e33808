//! The CMOS real-time clock (MC146818 at ports 0x70/0x71).
//!
//! The date and time are a configurable start (Unix seconds) plus simulated
//! time, so the guest's wall clock follows simulated time. Modelled: time
//! and date registers in BCD or binary and 12/24-hour formats, setting the
//! clock (register B.SET), update-in-progress (register A.UIP in the 244 us
//! before each second), the periodic interrupt (rates from register A), the
//! update-ended and alarm interrupts, register C flags (cleared on read,
//! which also lowers IRQ8), and 114 bytes of CMOS RAM.

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space, TimedDevice};
use serde::{Deserialize, Serialize};
use sim::tick::TICKS_PER_SECOND;
use sim::{Counter, Stats, Tick};

use crate::irq::IrqLine;
use crate::state::check;

/// Index port.
pub const RTC_BASE: u64 = 0x70;
/// Access latency.
pub const RTC_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;
/// How long before each second update-in-progress is shown.
const UIP_TICKS: Tick = 244 * sim::tick::TICKS_PER_US;

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

/// Days since 1970-01-01 to (year, month 1-12, day 1-31) (proleptic Gregorian).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

/// Bytes of CMOS (registers and RAM) behind the index port.
const CMOS_BYTES: usize = 128;

/// The RTC's saved state. The clock is `base` plus simulated time, so a
/// restore shows the time the checkpoint's run would have shown, whatever
/// the restored configuration's start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtcState {
    /// Unix time at tick 0 (as the guest last set it).
    pub base: i64,
    /// The selected register (0-127).
    pub index: u8,
    pub nmi_disabled: bool,
    /// The 128 bytes of CMOS: registers A-D and RAM.
    pub ram: Vec<u8>,
    /// The time registers written while register B.SET was on.
    #[serde(deserialize_with = "Option::deserialize")]
    pub set_fields: Option<[u8; 10]>,
    /// The tick of the next periodic interrupt, once armed.
    #[serde(deserialize_with = "Option::deserialize")]
    pub next_periodic: Option<Tick>,
    /// The second whose update was last signalled.
    #[serde(deserialize_with = "Option::deserialize")]
    pub last_second: Option<u64>,
}

impl RtcState {
    fn validate(&self) -> Result<(), RestoreError> {
        check(
            self.index <= 0x7f,
            "index",
            format_args!("{:#x} is no register 0-0x7f", self.index),
        )?;
        check(
            self.ram.len() == CMOS_BYTES,
            "ram",
            format_args!("{} bytes, CMOS has {CMOS_BYTES}", self.ram.len()),
        )?;
        check(
            self.ram[REG_A] & 0x80 == 0,
            "ram[10]",
            "register A's update-in-progress bit is computed, never stored",
        )?;
        let last = u64::MAX / TICKS_PER_SECOND;
        check(
            self.last_second.is_none_or(|s| s <= last),
            "last_second",
            format_args!(
                "{:?} is past the last second of simulated time ({last})",
                self.last_second
            ),
        )
    }
}

/// The RTC.
pub struct Rtc {
    /// Unix time at tick 0, adjusted when the guest sets the clock.
    base: i64,
    index: u8,
    nmi_disabled: bool,
    ram: [u8; 128],
    irq8: IrqLine,
    /// Fields written while SET was on: applied when it goes off.
    set_fields: Option<[u8; 10]>,
    /// The next periodic interrupt and the second whose update was signalled.
    next_periodic: Option<Tick>,
    last_second: Option<u64>,
    interrupts: Counter,
}

impl Rtc {
    /// An RTC showing Unix time `start` at tick 0, raising `irq8`.
    pub fn new(
        start: i64,
        irq8: IrqLine,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        ram[REG_B] = B_24H;
        ram[REG_D] = 0x80; // valid RAM and time
        Ok(Rtc {
            base: start,
            index: 0,
            nmi_disabled: false,
            ram,
            irq8,
            set_fields: None,
            next_periodic: None,
            last_second: None,
            interrupts: stats.counter(
                &format!("{prefix}.interrupts"),
                "RTC interrupts raised (IRQ8)",
                "Count",
            )?,
        })
    }

    /// True while NMIs are disabled through bit 7 of the index port.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    fn unix_time(&self, now: Tick) -> i64 {
        // The start is the user's (config rtc_start): any i64.
        self.base.saturating_add((now / TICKS_PER_SECOND) as i64)
    }

    fn binary(&self) -> bool {
        self.ram[REG_B] & B_DM_BINARY != 0
    }

    fn enc(&self, v: u32) -> u8 {
        if self.binary() {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn dec(&self, v: u8) -> u32 {
        if self.binary() {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    /// The time registers 0..=9 at `now`.
    fn fields(&self, now: Tick) -> [u8; 10] {
        if let Some(f) = self.set_fields {
            return f;
        }
        let t = self.unix_time(now);
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        let (h, min, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
        let hour = if self.ram[REG_B] & B_24H != 0 {
            self.enc(h)
        } else {
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            self.enc(h12) | if h >= 12 { 0x80 } else { 0 }
        };
        let wday = ((days + 4).rem_euclid(7) + 1) as u32; // 1970-01-01 was a Thursday; Sunday = 1
        [
            self.enc(s),
            self.ram[1],
            self.enc(min),
            self.ram[3],
            hour,
            self.ram[5],
            self.enc(wday),
            self.enc(d),
            self.enc(m),
            self.enc((y.rem_euclid(100)) as u32),
        ]
    }

    /// Makes the clock show `f` (registers 0..=9) at `now`.
    fn apply_fields(&mut self, f: [u8; 10], now: Tick) {
        let s = self.dec(f[0]).min(59);
        let min = self.dec(f[2]).min(59);
        let mut h = self.dec(f[4] & 0x7f).min(23);
        if self.ram[REG_B] & B_24H == 0 {
            h %= 12;
            if f[4] & 0x80 != 0 {
                h += 12;
            }
        }
        let d = self.dec(f[7]).clamp(1, 31);
        let m = self.dec(f[8]).clamp(1, 12);
        let century = from_bcd(self.ram[0x32]).max(19);
        let y = i64::from(century) * 100 + i64::from(self.dec(f[9]) % 100);
        let t = days_from_civil(y, m, d) * 86_400 + i64::from(h * 3600 + min * 60 + s);
        self.base = t - (now / TICKS_PER_SECOND) as i64;
    }

    fn periodic_period(&self) -> Option<Tick> {
        let rate = self.ram[REG_A] & 0x0f;
        if self.ram[REG_B] & B_PIE == 0 || rate == 0 {
            return None;
        }
        let rate = if rate <= 2 { rate + 7 } else { rate };
        // 32768 Hz >> (rate - 1).
        Some(TICKS_PER_SECOND * (1u64 << (rate - 1)) / 32_768)
    }

    fn raise(&mut self, flags: u8) {
        self.ram[REG_C] |= flags | C_IRQF;
        self.interrupts.inc();
        self.irq8.set(true);
    }

    fn read_reg(&mut self, reg: usize, now: Tick) -> u8 {
        match reg {
            0..=9 => self.fields(now)[reg],
            REG_A => {
                let frac = now % TICKS_PER_SECOND;
                let uip = self.ram[REG_B] & B_SET == 0 && frac >= TICKS_PER_SECOND - UIP_TICKS;
                self.ram[REG_A] & 0x7f | if uip { 0x80 } else { 0 }
            }
            REG_C => {
                let v = self.ram[REG_C];
                self.ram[REG_C] = 0;
                self.irq8.set(false);
                v
            }
            _ => self.ram[reg & 0x7f],
        }
    }

    fn write_reg(&mut self, reg: usize, v: u8, now: Tick) {
        match reg {
            0..=9 => {
                let mut f = self.set_fields.unwrap_or_else(|| self.fields(now));
                f[reg] = v;
                match reg {
                    1 | 3 | 5 => self.ram[reg] = v,
                    _ => {}
                }
                if self.ram[REG_B] & B_SET != 0 {
                    self.set_fields = Some(f);
                } else {
                    self.apply_fields(f, now);
                }
            }
            REG_A => {
                self.ram[REG_A] = v & 0x7f;
                self.next_periodic = None;
            }
            REG_B => {
                let was_set = self.ram[REG_B] & B_SET != 0;
                self.ram[REG_B] = v;
                if v & B_SET != 0 && !was_set {
                    self.set_fields = Some(self.fields(now));
                } else if v & B_SET == 0 && was_set {
                    if let Some(f) = self.set_fields.take() {
                        self.apply_fields(f, now);
                    }
                }
                self.next_periodic = None;
            }
            REG_C | REG_D => {} // read-only
            _ => self.ram[reg & 0x7f] = v,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset + i as u64 {
                0 => 0xff, // the index register is write-only
                1 => self.read_reg(usize::from(self.index), ctx.now),
                _ => 0xff,
            };
        }
        RTC_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        for (i, &v) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => {
                    self.index = v & 0x7f;
                    self.nmi_disabled = v & 0x80 != 0;
                }
                1 => self.write_reg(usize::from(self.index), v, ctx.now),
                _ => {}
            }
        }
        RTC_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&RtcState {
            base: self.base,
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            ram: self.ram.to_vec(),
            set_fields: self.set_fields,
            next_periodic: self.next_periodic,
            last_second: self.last_second,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: RtcState = crate::state::parse(state)?;
        s.validate()?;
        let mut ram = [0u8; CMOS_BYTES];
        ram.copy_from_slice(&s.ram);
        self.base = s.base;
        self.index = s.index;
        self.nmi_disabled = s.nmi_disabled;
        self.ram = ram;
        self.set_fields = s.set_fields;
        self.next_periodic = s.next_periodic;
        self.last_second = s.last_second;
        Ok(())
    }
}

impl TimedDevice for Rtc {
    fn next_deadline(&self) -> Option<Tick> {
        let periodic = self
            .next_periodic
            .or_else(|| self.periodic_period().map(|_| 0));
        let second =
            (self.ram[REG_B] & (B_UIE | B_AIE) != 0 && self.ram[REG_B] & B_SET == 0).then(|| {
                self.last_second
                    .map_or(0, |s| (s + 1).saturating_mul(TICKS_PER_SECOND))
            });
        match (periodic, second) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        let now = ctx.now;
        if let Some(period) = self.periodic_period() {
            // Saturates at the end of time (MAX_TICK: never).
            let next = (now / period + 1).saturating_mul(period);
            match self.next_periodic {
                None => self.next_periodic = Some(next),
                Some(t) if t <= now => {
                    self.raise(C_PF);
                    self.next_periodic = Some(next);
                }
                _ => {}
            }
        } else {
            self.next_periodic = None;
        }
        let second = now / TICKS_PER_SECOND;
        if self.ram[REG_B] & (B_UIE | B_AIE) != 0 && self.last_second != Some(second) {
            let first = self.last_second.is_none();
            self.last_second = Some(second);
            if !first {
                let mut flags = 0;
                if self.ram[REG_B] & B_UIE != 0 {
                    flags |= C_UF;
                }
                let f = self.fields(now);
                let dont_care = |a: u8| a & 0xc0 == 0xc0;
                let alarm = [(1, 0), (3, 2), (5, 4)]
                    .iter()
                    .all(|&(a, t)| dont_care(self.ram[a]) || self.ram[a] == f[t]);
                if self.ram[REG_B] & B_AIE != 0 && alarm {
                    flags |= C_AF;
                }
                if flags != 0 {
                    self.raise(flags);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::tests::Recorder;
    use std::sync::{Arc, Mutex};

    // 2026-11-25 12:34:56 UTC, a Wednesday.
    const START: i64 = 1_795_610_096;

    fn rtc() -> (Rtc, Arc<Mutex<Recorder>>) {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut stats = Stats::new();
        (
            Rtc::new(START, IrqLine::none().to(rec.clone(), 8), &mut stats, "rtc").unwrap(),
            rec,
        )
    }

    fn rd(r: &mut Rtc, now: Tick, reg: u8) -> u8 {
        let mut q = vec![];
        r.write(Space::Pio, 0, &[reg], &mut AccessCtx::new(now, &mut q));
        let mut d = [0u8];
        r.read(Space::Pio, 1, &mut d, &mut AccessCtx::new(now, &mut q));
        d[0]
    }

    fn wr(r: &mut Rtc, now: Tick, reg: u8, v: u8) {
        let mut q = vec![];
        r.write(Space::Pio, 0, &[reg], &mut AccessCtx::new(now, &mut q));
        r.write(Space::Pio, 1, &[v], &mut AccessCtx::new(now, &mut q));
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let (mut r, _) = rtc();
        wr(&mut r, 0, 0x0a, 0x2f); // 2 Hz periodic rate
        wr(&mut r, 0, 0x0b, B_24H | B_PIE | B_UIE | B_DM_BINARY);
        wr(&mut r, 0, 0x40, 0x77); // CMOS RAM
        let mut reqs = vec![];
        let mut now = 0;
        for _ in 0..4 {
            now = r.next_deadline().unwrap();
            r.on_deadline(&mut AccessCtx::new(now, &mut reqs));
        }
        wr(&mut r, now, 0x02, 59); // set the minutes: base moves
        rd(&mut r, now, 0x0c); // index left at register C
                               // Restored into an RTC that started at another time: the saved
                               // clock wins.
        let rec2 = Arc::new(Mutex::new(Recorder::default()));
        let mut stats = Stats::new();
        let mut q = Rtc::new(
            START + 5000,
            IrqLine::none().to(rec2.clone(), 8),
            &mut stats,
            "q",
        )
        .unwrap();
        round_trip(&r, &mut q);
        assert_eq!(q.next_deadline(), r.next_deadline());
        for reg in [0, 2, 4, 6, 7, 8, 9, 0x0a, 0x0b, 0x40] {
            assert_eq!(
                rd(&mut q, now, reg),
                rd(&mut r, now, reg),
                "register {reg:#x}"
            );
        }
        for _ in 0..5 {
            let at = r.next_deadline().unwrap();
            assert_eq!(q.next_deadline(), Some(at));
            q.on_deadline(&mut AccessCtx::new(at, &mut reqs));
            r.on_deadline(&mut AccessCtx::new(at, &mut reqs));
            assert_eq!(rd(&mut q, at, 0x0c), rd(&mut r, at, 0x0c));
        }
        assert!(rec2.lock().unwrap().0.contains(&(8, true)));
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let (mut r, _) = rtc();
        refuses_garbage(&mut r);
        refused_edit(&mut r, &["index"], json!(0x80), "index");
        refused_edit(&mut r, &["ram"], json!(vec![0u8; 127]), "ram");
        refused_edit(&mut r, &["ram", "10"], json!(0xa6), "ram[10]");
        refused_edit(&mut r, &["set_fields"], json!([1, 2, 3]), "set_fields");
        refused_edit(&mut r, &["base"], json!(1.5), "base");
        // The update interrupt's next second is computed from it.
        refused_edit(&mut r, &["last_second"], json!(u64::MAX), "last_second");
        let last = u64::MAX / TICKS_PER_SECOND;
        r.restore(&edited(&r, &["last_second"], json!(last)))
            .unwrap();
        wr(&mut r, 0, 0x0b, B_24H | B_UIE);
        assert_eq!(r.next_deadline(), Some(Tick::MAX));
        // A missing optional field is missing, not "none".
        let mut s = r.save();
        s.as_object_mut().unwrap().remove("last_second");
        refused(&mut r, s, "last_second");
    }

    #[test]
    fn calendar_arithmetic() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(START.div_euclid(86_400)), (2026, 11, 25));
        for d in [-1000, 0, 59, 10_957, 20_000, 50_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn time_follows_simulated_time_in_bcd() {
        let (mut r, _) = rtc();
        assert_eq!(rd(&mut r, 0, 0), 0x56);
        assert_eq!(rd(&mut r, 0, 2), 0x34);
        assert_eq!(rd(&mut r, 0, 4), 0x12);
        assert_eq!(rd(&mut r, 0, 6), 4, "Wednesday (Sunday = 1)");
        assert_eq!(
            (rd(&mut r, 0, 7), rd(&mut r, 0, 8), rd(&mut r, 0, 9)),
            (0x25, 0x11, 0x26)
        );
        // Four simulated seconds later.
        assert_eq!(rd(&mut r, 4 * TICKS_PER_SECOND, 0), 0x00);
        assert_eq!(rd(&mut r, 4 * TICKS_PER_SECOND, 2), 0x35);
        // Binary mode, 12-hour mode.
        wr(&mut r, 0, 0x0b, B_DM_BINARY);
        assert_eq!(rd(&mut r, 0, 0), 56);
        assert_eq!(rd(&mut r, 0, 4), 0x80 | 12, "12 PM");
    }

    #[test]
    fn update_in_progress_before_each_second() {
        let (mut r, _) = rtc();
        assert_eq!(rd(&mut r, 500 * sim::tick::TICKS_PER_MS, 0x0a) & 0x80, 0);
        assert_eq!(
            rd(
                &mut r,
                TICKS_PER_SECOND - 100 * sim::tick::TICKS_PER_US,
                0x0a
            ) & 0x80,
            0x80
        );
        assert_eq!(rd(&mut r, TICKS_PER_SECOND, 0x0a) & 0x7f, 0x26);
    }

    #[test]
    fn setting_the_clock() {
        let (mut r, _) = rtc();
        wr(&mut r, 0, 0x0b, B_SET | B_24H);
        wr(&mut r, 0, 4, 0x08); // 08:00:00
        wr(&mut r, 0, 2, 0x00);
        wr(&mut r, 0, 0, 0x00);
        assert_eq!(
            rd(&mut r, 5 * TICKS_PER_SECOND, 0),
            0x00,
            "frozen while SET"
        );
        wr(&mut r, 10 * TICKS_PER_SECOND, 0x0b, B_24H);
        assert_eq!(rd(&mut r, 12 * TICKS_PER_SECOND, 0), 0x02);
        assert_eq!(rd(&mut r, 12 * TICKS_PER_SECOND, 4), 0x08);
        assert_eq!(rd(&mut r, 12 * TICKS_PER_SECOND, 7), 0x25, "date kept");
    }

    #[test]
    fn periodic_interrupt_and_register_c() {
        let (mut r, rec) = rtc();
        assert_eq!(r.next_deadline(), None);
        wr(&mut r, 0, 0x0a, 0x26); // 1024 Hz
        wr(&mut r, 0, 0x0b, B_24H | B_PIE);
        let mut q = vec![];
        // First deadline arms the period.
        let d = r.next_deadline().unwrap();
        r.on_deadline(&mut AccessCtx::new(d, &mut q));
        let first = r.next_deadline().unwrap();
        assert_eq!(first, TICKS_PER_SECOND / 1024);
        r.on_deadline(&mut AccessCtx::new(first, &mut q));
        assert_eq!(rec.lock().unwrap().0, vec![(8, true)]);
        assert_eq!(rd(&mut r, first, 0x0c), C_IRQF | C_PF);
        assert_eq!(rec.lock().unwrap().0, vec![(8, true), (8, false)]);
        assert_eq!(rd(&mut r, first, 0x0c), 0, "reading C clears it");
        assert_eq!(r.next_deadline(), Some(2 * TICKS_PER_SECOND / 1024));
    }

    #[test]
    fn update_ended_interrupt_each_second() {
        let (mut r, _) = rtc();
        wr(&mut r, 0, 0x0b, B_24H | B_UIE);
        let mut q = vec![];
        r.on_deadline(&mut AccessCtx::new(0, &mut q));
        assert_eq!(r.next_deadline(), Some(TICKS_PER_SECOND));
        r.on_deadline(&mut AccessCtx::new(TICKS_PER_SECOND, &mut q));
        assert_eq!(rd(&mut r, TICKS_PER_SECOND, 0x0c), C_IRQF | C_UF);
    }

    #[test]
    fn deadlines_saturate_at_the_end_of_time() {
        // Found by fuzzing (fuzz/, target dev_rtc): near the last tick the
        // next periodic interrupt and the next second overflowed.
        let (mut r, _) = rtc();
        wr(&mut r, 0, 0x0b, B_PIE | B_UIE | B_24H);
        let late = Tick::MAX - 1000;
        let mut q = vec![];
        r.on_deadline(&mut AccessCtx::new(late, &mut q));
        assert_eq!(r.next_deadline(), Some(Tick::MAX));
        assert_eq!(
            mem::service_tick(r.next_deadline(), late),
            None,
            "never due"
        );
    }

    #[test]
    fn any_start_time_reads() {
        // Found by fuzzing (fuzz/, target dev_rtc): a start near i64::MAX
        // (system.rtc_start) overflowed when simulated time was added.
        let mut stats = Stats::new();
        for (i, start) in [i64::MAX, i64::MIN].into_iter().enumerate() {
            let mut r = Rtc::new(start, IrqLine::none(), &mut stats, &format!("rtc{i}")).unwrap();
            for reg in 0..10 {
                rd(&mut r, 5 * TICKS_PER_SECOND, reg);
            }
        }
    }

    #[test]
    fn cmos_ram_and_nmi_bit() {
        let (mut r, _) = rtc();
        wr(&mut r, 0, 0x40, 0xab);
        assert_eq!(rd(&mut r, 0, 0x40), 0xab);
        let mut q = vec![];
        r.write(Space::Pio, 0, &[0x8f], &mut AccessCtx::new(0, &mut q));
        assert!(r.nmi_disabled());
        assert_eq!(rd(&mut r, 0, 0x0d), 0x80);
    }

    proptest::proptest! {
        #[test]
        fn any_access_sequence_is_safe(ops in proptest::collection::vec((0u64..3, proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>(), 0u64..2_000_000_000_000), 0..100)) {
            let (mut r, _) = rtc();
            let mut now = 0;
            let mut q = vec![];
            for (port, v, w, dt) in ops {
                now += dt;
                let mut ctx = AccessCtx::new(now, &mut q);
                if w { r.write(Space::Pio, port, &[v], &mut ctx); } else { let mut d = [0u8]; r.read(Space::Pio, port, &mut d, &mut ctx); }
                if let Some(d) = r.next_deadline() {
                    if d <= now { r.on_deadline(&mut AccessCtx::new(now, &mut q)); }
                    if let Some(n) = r.next_deadline() { proptest::prop_assert!(n > now || n == 0 || r.next_periodic.is_none()); }
                }
            }
        }
    }
}
