//! The I/O APIC (82093AA, MMIO at 0xFEC00000): 24 input pins, each routed by
//! its redirection entry to local APICs.
//!
//! Modelled: IOREGSEL/IOWIN and the EOI register, ID, version (0x11, 24
//! entries), arbitration ID, the redirection table (vector, delivery mode
//! fixed/lowest-priority/NMI/INIT/ExtINT, physical or logical destination,
//! polarity, edge or level trigger, mask, remote IRR, delivery status),
//! edge detection, and for level-triggered pins remote IRR cleared by the
//! local APIC's EOI broadcast, re-delivering a pin still asserted.

use std::sync::{Arc, Mutex};

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space};
use serde::{Deserialize, Serialize};
use sim::{Counter, Stats, Tick};

use crate::irq::InterruptSink;
use crate::lapic::Lapic;
use crate::state::check;

/// Default MMIO base.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the register window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Number of pins.
pub const IOAPIC_PINS: usize = 24;
/// Version register: version 0x11, 24 redirection entries.
pub const IOAPIC_VERSION: u32 = 0x0017_0011;
/// Access latency.
pub const IOAPIC_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const ACTIVE_LOW: u64 = 1 << 13;

/// Delivery status: always idle (a read-only bit kvmsim never sets).
const DELIVERY_STATUS: u64 = 1 << 12;

/// The I/O APIC's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoApicState {
    pub id: u8,
    /// IOREGSEL.
    pub sel: u8,
    /// The redirection table, remote IRR (bit 14) included.
    pub redir: [u64; IOAPIC_PINS],
    /// Pin levels as driven (bit n: pin n), before polarity.
    pub levels: u32,
    /// Interrupts that found no destination.
    pub undeliverable: u64,
}

/// The I/O APIC.
pub struct IoApic {
    id: u8,
    sel: u8,
    redir: [u64; IOAPIC_PINS],
    /// Pin levels as driven (before polarity).
    levels: u32,
    lapics: Vec<Arc<Mutex<Lapic>>>,
    /// Interrupts that found no destination.
    pub undeliverable: u64,
    delivered: Counter,
}

impl IoApic {
    /// An I/O APIC with ID `id` delivering to `lapics`.
    pub fn new(
        id: u8,
        lapics: Vec<Arc<Mutex<Lapic>>>,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        Ok(IoApic {
            id,
            sel: 0,
            redir: [MASKED; IOAPIC_PINS],
            levels: 0,
            lapics,
            undeliverable: 0,
            delivered: stats.counter(
                &format!("{prefix}.interrupts"),
                "Interrupts the I/O APIC delivered",
                "Count",
            )?,
        })
    }

    fn asserted(&self, pin: usize) -> bool {
        let level = self.levels & (1 << pin) != 0;
        level != (self.redir[pin] & ACTIVE_LOW != 0)
    }

    /// Sends pin `pin`'s interrupt to its destination(s).
    fn deliver(&mut self, pin: usize) {
        let e = self.redir[pin];
        let vector = e as u8;
        let mode = (e >> 8) & 7;
        let logical = e & (1 << 11) != 0;
        let dest = (e >> 56) as u8;
        let level = e & LEVEL != 0;
        let mut hit = false;
        if mode == 1 {
            // Lowest priority: the accepting APIC with the lowest processor
            // priority (the first of equals).
            let target = self
                .lapics
                .iter()
                .filter_map(|l| {
                    let a = mem::lock(l);
                    a.accepts_from_ioapic(dest, logical)
                        .then(|| (a.arbitration_priority(), l.clone()))
                })
                .min_by_key(|(p, _)| *p);
            if let Some((_, l)) = target {
                mem::lock(&l).deliver(vector, level);
                hit = true;
            }
        } else {
            for lapic in &self.lapics {
                let mut a = mem::lock(lapic);
                if !a.accepts_from_ioapic(dest, logical) {
                    continue;
                }
                hit = true;
                match mode {
                    0 => a.deliver(vector, level),
                    4 => a.deliver_nmi(),
                    5 => a.deliver_init(),
                    // ExtINT: the 8259 behind it answers INTA; the local
                    // APIC's LINT0 path models that, so nothing is queued.
                    _ => {}
                }
            }
        }
        if hit {
            self.delivered.inc();
            if level {
                self.redir[pin] |= REMOTE_IRR;
            }
        } else {
            self.undeliverable += 1;
        }
    }

    /// EOI for `vector` from a local APIC: clears remote IRR of the level
    /// pins that carry it and re-delivers those still asserted.
    pub fn eoi(&mut self, vector: u8) {
        for pin in 0..IOAPIC_PINS {
            let e = self.redir[pin];
            if e as u8 == vector && e & REMOTE_IRR != 0 {
                self.redir[pin] &= !REMOTE_IRR;
                if e & LEVEL != 0 && e & MASKED == 0 && self.asserted(pin) {
                    self.deliver(pin);
                }
            }
        }
    }

    fn read_reg(&self) -> u32 {
        match self.sel {
            0x00 => u32::from(self.id & 0xf) << 24,
            0x01 => IOAPIC_VERSION,
            0x02 => u32::from(self.id & 0xf) << 24,
            r @ 0x10..=0x3f => {
                let pin = usize::from((r - 0x10) / 2);
                let e = self.redir[pin];
                if r % 2 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_reg(&mut self, v: u32) {
        match self.sel {
            0x00 => self.id = ((v >> 24) & 0xf) as u8,
            r @ 0x10..=0x3f => {
                let pin = usize::from((r - 0x10) / 2);
                let old = self.redir[pin];
                // Delivery status (12) and remote IRR (14) are read-only.
                let ro = (1 << 12) | REMOTE_IRR;
                let new = if r % 2 == 0 {
                    (old & !0xffff_ffff) | (u64::from(v) & !ro) | (old & ro)
                } else {
                    (old & 0xffff_ffff) | (u64::from(v) << 32)
                };
                self.redir[pin] = new;
                // Unmasking a level pin that is asserted delivers it.
                if new & MASKED == 0
                    && new & LEVEL != 0
                    && new & REMOTE_IRR == 0
                    && self.asserted(pin)
                {
                    self.deliver(pin);
                }
            }
            _ => {}
        }
    }
}

impl InterruptSink for IoApic {
    fn set_line(&mut self, line: u32, level: bool) {
        let pin = line as usize;
        if pin >= IOAPIC_PINS {
            return;
        }
        let was = self.asserted(pin);
        if level {
            self.levels |= 1 << pin;
        } else {
            self.levels &= !(1 << pin);
        }
        let now = self.asserted(pin);
        let e = self.redir[pin];
        if e & MASKED != 0 || !now {
            return;
        }
        if e & LEVEL != 0 {
            if e & REMOTE_IRR == 0 {
                self.deliver(pin);
            }
        } else if !was {
            self.deliver(pin);
        }
    }
}

impl BusDevice for IoApic {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        let v = match offset {
            0x00 => u32::from(self.sel),
            0x10 => self.read_reg(),
            _ => 0,
        };
        crate::put_le_value(data, u64::from(v));
        IOAPIC_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], _: &mut AccessCtx) -> Tick {
        let v = crate::le_value(&data[..data.len().min(4)]) as u32;
        match offset {
            0x00 => self.sel = v as u8,
            0x10 => self.write_reg(v),
            0x40 => self.eoi(v as u8),
            _ => {}
        }
        IOAPIC_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&IoApicState {
            id: self.id,
            sel: self.sel,
            redir: self.redir,
            levels: self.levels,
            undeliverable: self.undeliverable,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: IoApicState = crate::state::parse(state)?;
        check(
            s.levels >> IOAPIC_PINS == 0,
            "levels",
            format_args!("{:#x} drives pins beyond {IOAPIC_PINS}", s.levels),
        )?;
        if let Some(pin) = s.redir.iter().position(|e| e & DELIVERY_STATUS != 0) {
            check(
                false,
                &format!("redir[{pin}]"),
                "delivery status (bit 12) is never set",
            )?;
        }
        self.id = s.id;
        self.sel = s.sel;
        self.redir = s.redir;
        self.levels = s.levels;
        self.undeliverable = s.undeliverable;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sim::intr::{InterruptController, Pending};
    use sim::Request;

    fn setup() -> (IoApic, Arc<Mutex<Lapic>>) {
        let mut stats = Stats::new();
        let lapic = Arc::new(Mutex::new(
            Lapic::new(0, 1_000_000_000, None, &mut stats, "apic").unwrap(),
        ));
        {
            let mut a = mem::lock(&lapic);
            let mut reqs = vec![];
            a.write(
                Space::Mmio,
                0xf0,
                &0x1ffu32.to_le_bytes(),
                &mut AccessCtx::new(0, &mut reqs),
            );
        }
        (
            IoApic::new(1, vec![lapic.clone()], &mut stats, "ioapic").unwrap(),
            lapic,
        )
    }

    fn reg(io: &mut IoApic, sel: u8, v: Option<u32>) -> u32 {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        io.write(Space::Mmio, 0, &[sel], &mut ctx);
        match v {
            Some(v) => {
                io.write(Space::Mmio, 0x10, &v.to_le_bytes(), &mut ctx);
                0
            }
            None => {
                let mut d = [0u8; 4];
                io.read(Space::Mmio, 0x10, &mut d, &mut ctx);
                u32::from_le_bytes(d)
            }
        }
    }

    /// Writes APIC register `reg` of `a`.
    fn apic_w(a: &Arc<Mutex<Lapic>>, reg: u64, v: u32) {
        let mut reqs = vec![];
        mem::lock(a).write(
            Space::Mmio,
            reg,
            &v.to_le_bytes(),
            &mut AccessCtx::new(0, &mut reqs),
        );
    }

    #[test]
    fn routes_to_any_cpu_and_arbitrates_lowest_priority() {
        let mut stats = Stats::new();
        let lapics: Vec<Arc<Mutex<Lapic>>> = (0..3u8)
            .map(|id| {
                let a = Arc::new(Mutex::new(
                    Lapic::new(id, 1_000_000_000, None, &mut stats, &format!("apic{id}")).unwrap(),
                ));
                apic_w(&a, 0xf0, 0x1ff);
                // Flat logical IDs: bit `id`.
                apic_w(&a, 0xd0, 1 << (24 + u32::from(id)));
                a
            })
            .collect();
        let mut io = IoApic::new(3, lapics.clone(), &mut stats, "ioapic").unwrap();
        // Pin 3: physical destination APIC 2, vector 0x33.
        reg(&mut io, 0x16, Some(0x33));
        reg(&mut io, 0x17, Some(2 << 24));
        io.set_line(3, true);
        let pending: Vec<Pending> = lapics.iter().map(|a| mem::lock(a).pending()).collect();
        assert_eq!(pending, [Pending::None, Pending::None, Pending::Maskable]);
        assert_eq!(mem::lock(&lapics[2]).acknowledge(), Some(0x33));
        // Pin 4: lowest priority to logical CPUs 0 and 1; CPU 0's task
        // priority is higher, so CPU 1 takes it.
        apic_w(&lapics[0], 0x80, 0x40);
        reg(&mut io, 0x18, Some(0x100 | 0x800 | 0x34));
        reg(&mut io, 0x19, Some(0b011 << 24));
        io.set_line(4, true);
        assert_eq!(mem::lock(&lapics[0]).pending(), Pending::None);
        assert_eq!(mem::lock(&lapics[1]).acknowledge(), Some(0x34));
        assert_eq!(mem::lock(&lapics[2]).pending(), Pending::None);
    }

    #[test]
    fn identification() {
        let (mut io, _) = setup();
        assert_eq!(reg(&mut io, 1, None), IOAPIC_VERSION);
        assert_eq!(reg(&mut io, 0, None), 1 << 24);
        assert_eq!(reg(&mut io, 0x10, None), 1 << 16, "masked at reset");
    }

    #[test]
    fn edge_pin_delivers_on_rising_edges() {
        let (mut io, lapic) = setup();
        reg(&mut io, 0x14, Some(0x31)); // pin 2: vector 0x31, edge, unmasked
        reg(&mut io, 0x15, Some(0));
        io.set_line(2, true);
        io.set_line(2, true); // no new edge
        io.set_line(2, false);
        let mut a = mem::lock(&lapic);
        assert_eq!(a.acknowledge(), Some(0x31));
        assert_eq!(a.pending(), Pending::None);
    }

    #[test]
    fn level_pin_remote_irr_and_eoi() {
        let (mut io, lapic) = setup();
        reg(&mut io, 0x20, Some(0x8000 | 0x2000 | 0x41)); // pin 8: level, active low
        io.set_line(8, false); // active low: asserted
        assert_eq!(reg(&mut io, 0x20, None) & (1 << 14), 1 << 14, "remote IRR");
        assert_eq!(mem::lock(&lapic).acknowledge(), Some(0x41));
        // Still asserted: EOI re-delivers.
        io.eoi(0x41);
        assert_eq!(reg(&mut io, 0x20, None) & (1 << 14), 1 << 14);
        // Deassert, EOI: quiet.
        io.set_line(8, true);
        io.eoi(0x41);
        assert_eq!(reg(&mut io, 0x20, None) & (1 << 14), 0);
        let mut a = mem::lock(&lapic);
        let mut reqs = vec![];
        a.write(
            Space::Mmio,
            0xb0,
            &0u32.to_le_bytes(),
            &mut AccessCtx::new(0, &mut reqs),
        );
        assert_eq!(a.acknowledge(), Some(0x41), "the re-delivered one");
    }

    #[test]
    fn masked_pins_and_unmasking_asserted_level_pins() {
        let (mut io, lapic) = setup();
        reg(&mut io, 0x12, Some(0x1_8000 | 0x51)); // pin 1: level, masked
        io.set_line(1, true);
        assert_eq!(mem::lock(&lapic).pending(), Pending::None);
        reg(&mut io, 0x12, Some(0x8000 | 0x51));
        assert_eq!(mem::lock(&lapic).acknowledge(), Some(0x51));
        // A destination nobody has.
        reg(&mut io, 0x17, Some(0x5 << 24));
        reg(&mut io, 0x16, Some(0x52));
        io.set_line(3, true);
        assert_eq!(io.undeliverable, 1);
    }

    #[test]
    fn nmi_delivery_mode() {
        let (mut io, lapic) = setup();
        reg(&mut io, 0x10, Some(0x400));
        io.set_line(0, true);
        assert_eq!(mem::lock(&lapic).pending(), Pending::Nmi);
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let (mut io, lapic) = setup();
        // Pin 9: level-triggered, vector 0x39, asserted and delivered
        // (remote IRR set); pin 5: edge, masked, asserted.
        reg(&mut io, 0x22, Some(0x8000 | 0x39));
        reg(&mut io, 0x1a, Some(0x1_0000 | 0x35));
        io.set_line(9, true);
        io.set_line(5, true);
        reg(&mut io, 0x22, None); // IOREGSEL left at pin 9's low word
        assert_eq!(mem::lock(&lapic).acknowledge(), Some(0x39));
        let (mut r, lapic2) = setup();
        round_trip(&io, &mut r);
        assert_eq!(
            mem::lock(&lapic2).pending(),
            Pending::None,
            "a restore delivers nothing"
        );
        let mut d = [[0u8; 4]; 2];
        let mut reqs = vec![];
        io.read(
            Space::Mmio,
            0x10,
            &mut d[0],
            &mut AccessCtx::new(0, &mut reqs),
        );
        r.read(
            Space::Mmio,
            0x10,
            &mut d[1],
            &mut AccessCtx::new(0, &mut reqs),
        );
        assert_eq!(d[0], d[1]);
        assert_ne!(u32::from_le_bytes(d[1]) & (1 << 14), 0, "remote IRR kept");
        // The EOI re-delivers the pin still asserted, in both; unmasking
        // pin 5 does not (edge, no new edge).
        // (The original's APIC has the vector in service: its EOI first.)
        apic_w(&lapic, 0xb0, 0);
        io.eoi(0x39);
        r.eoi(0x39);
        assert_eq!(mem::lock(&lapic2).acknowledge(), Some(0x39));
        assert_eq!(mem::lock(&lapic).acknowledge(), Some(0x39));
        apic_w(&lapic2, 0xb0, 0);
        reg(&mut r, 0x1a, Some(0x35));
        assert_eq!(mem::lock(&lapic2).pending(), Pending::None);
        r.set_line(5, false);
        r.set_line(5, true);
        assert_eq!(mem::lock(&lapic2).acknowledge(), Some(0x35));
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let (mut io, _) = setup();
        io.set_line(2, true);
        refuses_garbage(&mut io);
        refused_edit(&mut io, &["levels"], json!(1u32 << 24), "levels");
        refused_edit(&mut io, &["redir", "3"], json!(1u64 << 12), "redir[3]");
        let mut short = io.save();
        short["redir"].as_array_mut().unwrap().pop();
        refused(&mut io, short, "redir");
        refused_edit(&mut io, &["redir", "0"], json!(-1), "redir[0]");
    }

    proptest::proptest! {
        #[test]
        fn any_access_sequence_is_safe(ops in proptest::collection::vec((0u64..0x100, proptest::prelude::any::<u32>(), 0usize..6, proptest::prelude::any::<bool>(), 0u32..30), 0..100)) {
            let (mut io, lapic) = setup();
            let mut reqs = vec![];
            for (off, v, len, w, pin) in ops {
                let mut ctx = AccessCtx::new(0, &mut reqs);
                if w { io.write(Space::Mmio, off, &v.to_le_bytes()[..len.min(4)], &mut ctx); }
                else { let mut d = vec![0u8; len]; io.read(Space::Mmio, off, &mut d, &mut ctx); }
                io.set_line(pin, v & 1 != 0);
                if let Some(v) = mem::lock(&lapic).acknowledge() { io.eoi(v); }
            }
        }
    }

    /// `n` enabled APICs (IDs 0..n) with flat logical IDs 1 << id, or in
    /// the cluster model (cluster id / 4, member bit id % 4) if `cluster`.
    fn apics(n: u8, cluster: bool, stats: &mut Stats) -> Vec<Arc<Mutex<Lapic>>> {
        (0..n)
            .map(|id| {
                let a = Arc::new(Mutex::new(
                    Lapic::new(id, 1_000_000_000, None, stats, &format!("apic{id}")).unwrap(),
                ));
                apic_w(&a, 0xf0, 0x1ff);
                if cluster {
                    apic_w(&a, 0xe0, 0x0fff_ffff);
                    apic_w(&a, 0xd0, u32::from(((id / 4) << 4) | (1 << (id % 4))) << 24);
                } else {
                    apic_w(&a, 0xd0, (1u32 << id) << 24);
                }
                a
            })
            .collect()
    }

    #[test]
    fn logical_destinations_reach_every_named_cpu_of_more_than_three() {
        let mut stats = Stats::new();
        // Flat model, 8 CPUs: destination 0x0d names CPUs 0, 2 and 3.
        let lapics = apics(8, false, &mut stats);
        let mut io = IoApic::new(8, lapics.clone(), &mut stats, "ioapic").unwrap();
        reg(&mut io, 0x10 + 2 * 14, Some(0x0000_0886)); // logical, edge, vector 0x86
        reg(&mut io, 0x11 + 2 * 14, Some(0x0d00_0000));
        io.set_line(14, true);
        let got: Vec<bool> = lapics
            .iter()
            .map(|l| mem::lock(l).acknowledge() == Some(0x86))
            .collect();
        assert_eq!(got, [true, false, true, true, false, false, false, false]);
        io.set_line(14, false);
        // 0x80 names only CPU 7; 0xff all eight.
        reg(&mut io, 0x11 + 2 * 14, Some(0x8000_0000));
        io.set_line(14, true);
        io.set_line(14, false);
        assert_eq!(mem::lock(&lapics[7]).acknowledge(), Some(0x86));
        assert_eq!(mem::lock(&lapics[6]).acknowledge(), None);
        // Cluster model, 12 CPUs in three clusters: 0x23 names cluster 2's
        // first two members (CPUs 8 and 9).
        let mut stats = Stats::new();
        let lapics = apics(12, true, &mut stats);
        let mut io = IoApic::new(12, lapics.clone(), &mut stats, "ioapic2").unwrap();
        reg(&mut io, 0x10 + 2 * 5, Some(0x0000_0890));
        reg(&mut io, 0x11 + 2 * 5, Some(0x2300_0000));
        io.set_line(5, true);
        let got: Vec<usize> = (0..12)
            .filter(|&i| mem::lock(&lapics[i]).acknowledge() == Some(0x90))
            .collect();
        assert_eq!(got, vec![8, 9]);
        // Lowest priority among 4 named CPUs: the one with the lowest TPR.
        let mut stats = Stats::new();
        let lapics = apics(5, false, &mut stats);
        for (i, l) in lapics.iter().enumerate() {
            apic_w(l, 0x80, if i == 3 { 0x10 } else { 0x40 });
        }
        let mut io = IoApic::new(5, lapics.clone(), &mut stats, "ioapic3").unwrap();
        reg(&mut io, 0x10 + 2 * 6, Some(0x0000_0991)); // logical, lowest priority
        reg(&mut io, 0x11 + 2 * 6, Some(0x1e00_0000)); // CPUs 1-4
        io.set_line(6, true);
        let got: Vec<usize> = (0..5)
            .filter(|&i| mem::lock(&lapics[i]).acknowledge() == Some(0x91))
            .collect();
        assert_eq!(got, vec![3]);
    }

    #[test]
    fn logical_and_broadcast_messages_reach_x2apic_targets() {
        // kvm-unit-tests' ioapic test with x2APIC: 4 CPUs in x2APIC mode,
        // logical destination 0xd (cluster 0, bits 0, 2, 3), level-triggered.
        use sim::intr::InterruptController;
        let mut stats = Stats::new();
        let lapics: Vec<Arc<Mutex<Lapic>>> = (0..4u8)
            .map(|id| {
                let mut a =
                    Lapic::new(id, 1_000_000_000, None, &mut stats, &format!("apic{id}")).unwrap();
                a.offer_x2apic(true);
                let base = a.apic_base() | crate::lapic::APIC_BASE_EXTD;
                a.msr_written(crate::lapic::APIC_BASE_MSR, base);
                assert!(a.x2apic_write(0x80f, 0x1ff, 0, &mut vec![]));
                Arc::new(Mutex::new(a))
            })
            .collect();
        let mut io = IoApic::new(4, lapics.clone(), &mut stats, "ioapic").unwrap();
        reg(&mut io, 0x10 + 2 * 14, Some(0x0000_8886)); // logical, level, 0x86
        reg(&mut io, 0x11 + 2 * 14, Some(0x0d00_0000));
        io.set_line(14, true);
        let got: Vec<bool> = lapics
            .iter()
            .map(|l| mem::lock(l).acknowledge() == Some(0x86))
            .collect();
        assert_eq!(got, [true, false, true, true]);
        io.set_line(14, false);
        // Physical 0xFF from the I/O APIC is the broadcast for x2APIC
        // targets too; physical 2 is the CPU with x2APIC ID 2.
        reg(&mut io, 0x10 + 2 * 5, Some(0x0000_0095));
        reg(&mut io, 0x11 + 2 * 5, Some(0xff00_0000));
        io.set_line(5, true);
        io.set_line(5, false);
        for l in &lapics {
            let mut a = mem::lock(l);
            assert_eq!(a.acknowledge(), Some(0x95));
            assert!(a.x2apic_write(0x80b, 0, 0, &mut vec![]), "EOI");
        }
        reg(&mut io, 0x11 + 2 * 5, Some(0x0200_0000));
        io.set_line(5, true);
        let got: Vec<bool> = lapics
            .iter()
            .map(|l| mem::lock(l).acknowledge() == Some(0x95))
            .collect();
        assert_eq!(got, [false, false, true, false]);
    }

    #[test]
    fn level_lines_set_tmr_irr_isr_and_remote_irr() {
        let (mut io, lapic) = setup();
        // Pin 9 level-triggered, vector 0x59; pin 10 edge, vector 0x5a.
        reg(&mut io, 0x10 + 2 * 9, Some(0x0000_8059));
        reg(&mut io, 0x10 + 2 * 10, Some(0x0000_005a));
        let apic = |reg: u64| {
            let mut reqs = vec![];
            let mut d = [0u8; 4];
            mem::lock(&lapic).read(Space::Mmio, reg, &mut d, &mut AccessCtx::new(0, &mut reqs));
            u32::from_le_bytes(d)
        };
        // 0x59 and 0x5a live in the third 32-bit word of IRR/ISR/TMR.
        let (irr, isr, tmr) = (0x220, 0x120, 0x1a0);
        io.set_line(9, true);
        io.set_line(10, true);
        assert_eq!(apic(irr), (1 << 0x19) | (1 << 0x1a));
        assert_eq!(apic(tmr), 1 << 0x19, "TMR: only the level vector");
        assert_ne!(
            reg(&mut io, 0x10 + 2 * 9, None) & (1 << 14),
            0,
            "remote IRR set"
        );
        assert_eq!(
            reg(&mut io, 0x10 + 2 * 10, None) & (1 << 14),
            0,
            "edge: no remote IRR"
        );
        // The CPU takes 0x5a first (higher), then 0x59 after its EOI.
        assert_eq!(mem::lock(&lapic).acknowledge(), Some(0x5a));
        assert_eq!(apic(isr), 1 << 0x1a);
        let mut reqs = vec![];
        mem::lock(&lapic).write(
            Space::Mmio,
            0xb0,
            &0u32.to_le_bytes(),
            &mut AccessCtx::new(0, &mut reqs),
        );
        assert!(reqs.is_empty(), "an edge vector's EOI is not broadcast");
        assert_eq!(mem::lock(&lapic).acknowledge(), Some(0x59));
        assert_eq!((apic(irr), apic(isr)), (0, 1 << 0x19));
        // While remote IRR is set, the still-asserted line delivers nothing.
        io.set_line(9, true);
        assert_eq!(apic(irr), 0);
        let mut reqs = vec![];
        mem::lock(&lapic).write(
            Space::Mmio,
            0xb0,
            &0u32.to_le_bytes(),
            &mut AccessCtx::new(0, &mut reqs),
        );
        assert_eq!(reqs, vec![Request::Eoi { vector: 0x59 }]);
        assert_eq!(apic(isr), 0);
        // The EOI broadcast clears remote IRR; the line is still high, so
        // the interrupt comes again, level-triggered once more.
        io.eoi(0x59);
        assert_eq!(apic(irr), 1 << 0x19);
        assert_eq!(apic(tmr), 1 << 0x19);
        assert_ne!(reg(&mut io, 0x10 + 2 * 9, None) & (1 << 14), 0);
        // Lowered, taken and EOIed: remote IRR clears and stays clear.
        io.set_line(9, false);
        assert_eq!(mem::lock(&lapic).acknowledge(), Some(0x59));
        io.eoi(0x59);
        assert_eq!(reg(&mut io, 0x10 + 2 * 9, None) & (1 << 14), 0);
        assert_eq!(apic(irr), 0);
        // An edge delivery of the same vector clears its TMR bit.
        reg(&mut io, 0x10 + 2 * 9, Some(0x0000_0059));
        io.set_line(9, true);
        assert_eq!(apic(tmr), 0);
    }
}
