//! Two cascaded 8259A programmable interrupt controllers (master at
//! 0x20/0x21, slave at 0xA0/0xA1 on master input 2) and the edge/level
//! control registers (ELCR, 0x4D0/0x4D1).
//!
//! Modelled: ICW1-4 initialisation, IMR (OCW1), specific and non-specific
//! EOI with optional rotation (OCW2), reading IRR or ISR and polling (OCW3),
//! auto-EOI, edge and level triggering (ICW1.LTIM or ELCR). The master's
//! output (INTR) is sampled by whoever delivers it to the CPU: the local
//! APIC's LINT0 in ExtINT mode, or the CPU directly (the pair implements
//! [`InterruptController`]); acknowledging returns the vector (INTA).

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space};
use serde::{Deserialize, Serialize};
use sim::intr::{InterruptController, Pending};
use sim::Tick;

use crate::irq::InterruptSink;
use crate::state::check;

/// Master command port.
pub const MASTER_BASE: u64 = 0x20;
/// Slave command port.
pub const SLAVE_BASE: u64 = 0xa0;
/// ELCR ports.
pub const ELCR_BASE: u64 = 0x4d0;
/// Access latency.
pub const PIC_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;

/// One 8259's state, as it is saved (its fields are the chip's registers
/// and modes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels, for edge detection and level triggering.
    levels: u8,
    elcr: u8,
    /// Lowest-priority input after rotation is `priority_add - 1`; input
    /// `priority_add` has the highest priority.
    priority_add: u8,
    vector_base: u8,
    /// Initialisation step waiting for ICW2 (1), ICW3 (2), ICW4 (3); 0 = ready.
    init_step: u8,
    icw4_needed: bool,
    single: bool,
    level_mode: bool,
    auto_eoi: bool,
    rotate_on_aeoi: bool,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
}

impl Chip {
    fn is_level(&self, irq: u8) -> bool {
        self.level_mode || self.elcr & (1 << irq) != 0
    }

    fn set_input(&mut self, irq: u8, level: bool) {
        let bit = 1 << irq;
        let was = self.levels & bit != 0;
        if level {
            self.levels |= bit;
            if self.is_level(irq) || !was {
                self.irr |= bit;
            }
        } else {
            self.levels &= !bit;
            if self.is_level(irq) {
                self.irr &= !bit;
            }
        }
    }

    /// The highest-priority input set in `mask`, in rotated priority order.
    fn highest(&self, mask: u8) -> Option<u8> {
        (0..8)
            .map(|i| (i + self.priority_add) & 7)
            .find(|&irq| mask & (1 << irq) != 0)
    }

    /// The input that would be delivered now, if any.
    fn pending_irq(&self) -> Option<u8> {
        let requests = self.irr & !self.imr;
        let irq = self.highest(requests)?;
        // In special mask mode, masked in-service inputs do not block.
        let isr = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        match self.highest(isr) {
            Some(busy) if priority(self, busy) <= priority(self, irq) => None,
            _ => Some(irq),
        }
    }

    /// INTA: moves `irq` from IRR to ISR (unless auto-EOI).
    fn ack(&mut self, irq: u8) {
        let bit = 1 << irq;
        if self.auto_eoi {
            if self.rotate_on_aeoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if !self.is_level(irq) {
            self.irr &= !bit;
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1.
            self.init_step = 1;
            self.icw4_needed = v & 1 != 0;
            self.single = v & 2 != 0;
            self.level_mode = v & 8 != 0;
            self.imr = 0;
            self.isr = 0;
            self.irr = 0;
            self.priority_add = 0;
            self.auto_eoi = false;
            self.rotate_on_aeoi = false;
            self.read_isr = false;
            self.poll = false;
            self.special_mask = false;
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 1 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2.
            let irq = v & 7;
            match v >> 5 {
                0 => self.rotate_on_aeoi = false,
                4 => self.rotate_on_aeoi = true,
                1 | 5 => {
                    // Non-specific EOI (5: and rotate).
                    if let Some(top) = self.highest(self.isr) {
                        self.isr &= !(1 << top);
                        if v >> 5 == 5 {
                            self.priority_add = (top + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << irq),
                6 => self.priority_add = (irq + 1) & 7,
                7 => {
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                _ => {}
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init_step {
            1 => {
                self.vector_base = v & 0xf8;
                self.init_step = if !self.single {
                    2
                } else if self.icw4_needed {
                    3
                } else {
                    0
                };
            }
            2 => self.init_step = if self.icw4_needed { 3 } else { 0 },
            3 => {
                self.auto_eoi = v & 2 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }

    /// Reads the command port: poll result, ISR or IRR.
    fn read_command(&mut self) -> (u8, Option<u8>) {
        if std::mem::take(&mut self.poll) {
            return match self.pending_irq() {
                Some(irq) => (0x80 | irq, Some(irq)),
                None => (0, None),
            };
        }
        (if self.read_isr { self.isr } else { self.irr }, None)
    }
}

impl Chip {
    /// The invariants the chip's registers keep (`elcr_mask`: the ELCR
    /// bits this chip has).
    fn validate(&self, name: &str, elcr_mask: u8) -> Result<(), RestoreError> {
        let f = |field: &str| format!("{name}.{field}");
        check(
            self.priority_add <= 7,
            &f("priority_add"),
            format_args!("{} is not an input 0-7", self.priority_add),
        )?;
        check(
            self.vector_base & 7 == 0,
            &f("vector_base"),
            format_args!("{:#x} is not a multiple of 8", self.vector_base),
        )?;
        check(
            self.init_step <= 3,
            &f("init_step"),
            format_args!("{} is not a step 0-3", self.init_step),
        )?;
        check(
            self.elcr & !elcr_mask == 0,
            &f("elcr"),
            format_args!("{:#x} sets bits outside {elcr_mask:#x}", self.elcr),
        )
    }
}

/// The pair's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PicState {
    pub master: Chip,
    pub slave: Chip,
    /// Acknowledges that found nothing pending.
    pub spurious: u64,
}

fn priority(c: &Chip, irq: u8) -> u8 {
    irq.wrapping_sub(c.priority_add) & 7
}

/// The ELCR bits of each chip (IRQ0, 1, 2, 8 and 13 are always edge-triggered).
const MASTER_ELCR: u8 = 0xf8;
const SLAVE_ELCR: u8 = 0xde;

/// The master/slave pair.
#[derive(Debug, Clone, Default)]
pub struct PicPair {
    chips: [Chip; 2],
    /// Acknowledged interrupts that found nothing pending (IRQ7/15).
    pub spurious: u64,
}

impl PicPair {
    /// A pair in its reset state (everything masked until initialised).
    pub fn new() -> Self {
        let mut p = PicPair::default();
        p.chips[0].imr = 0xff;
        p.chips[1].imr = 0xff;
        p
    }

    fn cascade(&mut self) {
        let slave_intr = self.chips[1].pending_irq().is_some();
        self.chips[0].set_input(2, slave_intr);
    }

    /// True while the master drives INTR.
    pub fn intr(&self) -> bool {
        self.chips[0].pending_irq().is_some()
    }

    /// INTA: takes the highest-priority interrupt and returns its vector.
    pub fn acknowledge_vector(&mut self) -> u8 {
        let vector = match self.chips[0].pending_irq() {
            Some(2) if !self.chips[0].single => {
                self.chips[0].ack(2);
                match self.chips[1].pending_irq() {
                    Some(irq) => {
                        self.chips[1].ack(irq);
                        self.chips[1].vector_base + irq
                    }
                    None => {
                        self.spurious += 1;
                        self.chips[1].vector_base + 7
                    }
                }
            }
            Some(irq) => {
                self.chips[0].ack(irq);
                self.chips[0].vector_base + irq
            }
            None => {
                self.spurious += 1;
                self.chips[0].vector_base + 7
            }
        };
        self.cascade();
        vector
    }

    /// The interrupt request register of both chips (slave in the high byte).
    pub fn irr(&self) -> u16 {
        u16::from(self.chips[0].irr) | (u16::from(self.chips[1].irr) << 8)
    }

    /// The in-service register of both chips.
    pub fn isr(&self) -> u16 {
        u16::from(self.chips[0].isr) | (u16::from(self.chips[1].isr) << 8)
    }

    /// Writes a port directly (tests and firmware set-up).
    pub fn write_port_for_test(&mut self, port: u64, v: u8) {
        self.port_write(port, v);
    }

    fn port_read(&mut self, port: u64) -> u8 {
        let v = match port {
            0x20 | 0xa0 => {
                let c = usize::from(port == 0xa0);
                let (v, polled) = self.chips[c].read_command();
                if let Some(irq) = polled {
                    self.chips[c].ack(irq);
                }
                v
            }
            0x21 => self.chips[0].imr,
            0xa1 => self.chips[1].imr,
            0x4d0 => self.chips[0].elcr,
            0x4d1 => self.chips[1].elcr,
            _ => 0xff,
        };
        self.cascade();
        v
    }

    fn port_write(&mut self, port: u64, v: u8) {
        match port {
            0x20 => self.chips[0].write_command(v),
            0xa0 => self.chips[1].write_command(v),
            0x21 => self.chips[0].write_data(v),
            0xa1 => self.chips[1].write_data(v),
            // IRQ0, 1, 2, 8 and 13 are always edge-triggered on a PC.
            0x4d0 => self.chips[0].elcr = v & MASTER_ELCR,
            0x4d1 => self.chips[1].elcr = v & SLAVE_ELCR,
            _ => {}
        }
        self.cascade();
    }
}

impl InterruptSink for PicPair {
    fn set_line(&mut self, line: u32, level: bool) {
        match line {
            0..=7 => self.chips[0].set_input(line as u8, level),
            8..=15 => self.chips[1].set_input((line - 8) as u8, level),
            _ => return,
        }
        self.cascade();
    }
}

impl InterruptController for PicPair {
    fn pending(&mut self) -> Pending {
        if self.intr() {
            Pending::Maskable
        } else {
            Pending::None
        }
    }

    fn acknowledge(&mut self) -> Option<u8> {
        self.intr().then(|| self.acknowledge_vector())
    }

    fn take_nmi(&mut self) -> bool {
        false
    }
}

/// On the bus the pair takes absolute port numbers as offsets: each of its
/// ranges is attached through [`mem::Rebased`] with the range's base added.
impl BusDevice for PicPair {
    fn read(&mut self, _: Space, port: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.port_read(port + i as u64);
        }
        PIC_LATENCY
    }

    fn write(&mut self, _: Space, port: u64, data: &[u8], _: &mut AccessCtx) -> Tick {
        for (i, &v) in data.iter().enumerate() {
            self.port_write(port + i as u64, v);
        }
        PIC_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&PicState {
            master: self.chips[0].clone(),
            slave: self.chips[1].clone(),
            spurious: self.spurious,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: PicState = crate::state::parse(state)?;
        s.master.validate("master", MASTER_ELCR)?;
        s.slave.validate("slave", SLAVE_ELCR)?;
        self.chips = [s.master, s.slave];
        self.spurious = s.spurious;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's init_8259A: ICW1 0x11, vectors 0x30/0x38, cascade, 8086 mode.
    fn linux_init() -> PicPair {
        let mut p = PicPair::new();
        for (port, v) in [
            (0x21, 0xff),
            (0xa1, 0xff),
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            p.port_write(port, v);
        }
        p
    }

    #[test]
    fn edge_interrupt_ack_and_eoi() {
        let mut p = linux_init();
        assert!(!p.intr());
        p.set_line(0, true);
        p.set_line(0, false);
        assert!(p.intr());
        assert_eq!(p.acknowledge(), Some(0x30));
        assert!(!p.intr());
        assert_eq!(p.isr(), 1);
        // A lower-priority request waits while IRQ0 is in service.
        p.set_line(1, true);
        assert!(!p.intr());
        p.port_write(0x20, 0x20); // non-specific EOI
        assert_eq!(p.isr(), 0);
        assert_eq!(p.acknowledge(), Some(0x31));
    }

    #[test]
    fn slave_interrupts_cascade_through_irq2() {
        let mut p = linux_init();
        p.set_line(8, true); // RTC
        assert!(p.intr());
        assert_eq!(p.acknowledge(), Some(0x38));
        assert_eq!(p.isr(), 0x0104, "IRQ2 on the master, IRQ8 on the slave");
        p.port_write(0xa0, 0x20);
        p.port_write(0x20, 0x20);
        assert_eq!(p.isr(), 0);
    }

    #[test]
    fn masks_levels_and_elcr() {
        let mut p = linux_init();
        p.port_write(0x21, 0x01); // mask IRQ0
        p.set_line(0, true);
        assert!(!p.intr());
        p.port_write(0x21, 0x00);
        assert!(p.intr());
        // Level-triggered IRQ10 (ELCR): IRR follows the line.
        p.port_write(0x4d1, 0x04);
        assert_eq!(p.port_read(0x4d1), 0x04);
        p.set_line(10, true);
        assert_eq!(p.irr() & 0x0400, 0x0400);
        p.set_line(10, false);
        assert_eq!(p.irr() & 0x0400, 0);
    }

    #[test]
    fn read_isr_irr_and_poll() {
        let mut p = linux_init();
        p.set_line(3, true);
        p.port_write(0x20, 0x0a); // OCW3: read IRR
        assert_eq!(p.port_read(0x20), 0x08);
        p.port_write(0x20, 0x0c); // OCW3: poll
        assert_eq!(p.port_read(0x20), 0x83);
        p.port_write(0x20, 0x0b); // OCW3: read ISR
        assert_eq!(p.port_read(0x20), 0x08);
        p.port_write(0x20, 0x63); // specific EOI for IRQ3
        assert_eq!(p.port_read(0x20), 0);
        assert_eq!(p.port_read(0x21), 0, "data port reads the IMR");
    }

    #[test]
    fn spurious_acknowledge_gives_irq7() {
        let mut p = linux_init();
        assert_eq!(p.acknowledge_vector(), 0x37);
        assert_eq!(p.spurious, 1);
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let mut p = linux_init();
        p.port_write(0x4d1, 0x04); // IRQ10 level-triggered
        p.set_line(10, true);
        p.set_line(1, true);
        p.set_line(3, true);
        p.port_write(0x20, 0xc4); // rotate: IRQ5 lowest
        assert_eq!(p.acknowledge(), Some(0x31));
        p.port_write(0x20, 0x0b); // read ISR next
        let mut r = PicPair::new();
        round_trip(&p, &mut r);
        assert_eq!((r.irr(), r.isr(), r.intr()), (p.irr(), p.isr(), p.intr()));
        assert_eq!(r.port_read(0x20), p.port_read(0x20));
        p.port_write(0x20, 0x20);
        r.port_write(0x20, 0x20);
        for _ in 0..3 {
            assert_eq!(r.acknowledge(), p.acknowledge());
        }
        r.set_line(10, false);
        p.set_line(10, false);
        assert_eq!((r.irr(), r.isr()), (p.irr(), p.isr()));
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let mut p = linux_init();
        refuses_garbage(&mut p);
        refused_edit(
            &mut p,
            &["master", "priority_add"],
            json!(250),
            "master.priority_add",
        );
        refused_edit(
            &mut p,
            &["slave", "vector_base"],
            json!(0xfb),
            "slave.vector_base",
        );
        refused_edit(
            &mut p,
            &["master", "init_step"],
            json!(4),
            "master.init_step",
        );
        refused_edit(&mut p, &["master", "elcr"], json!(1), "master.elcr");
        refused_edit(&mut p, &["slave", "imr"], json!(true), "slave.imr");
        refused_edit(&mut p, &["slave", "extra"], json!(0), "extra");
    }

    proptest::proptest! {
        #[test]
        fn any_port_and_line_sequence_is_safe(ops in proptest::collection::vec((0usize..7, proptest::prelude::any::<u8>(), 0u32..20), 0..200)) {
            let mut p = PicPair::new();
            let ports = [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1];
            for (which, v, line) in ops {
                match which {
                    6 => p.set_line(line, v & 1 != 0),
                    i if v & 0x80 != 0 => { p.port_read(ports[i]); }
                    i => p.port_write(ports[i], v),
                }
                // A fully masked master never drives INTR.
                if p.chips[0].imr == 0xff {
                    proptest::prop_assert!(!p.intr());
                }
                if p.intr() {
                    let vector = p.acknowledge_vector();
                    let bases = [p.chips[0].vector_base, p.chips[1].vector_base];
                    proptest::prop_assert!(bases.contains(&(vector & 0xf8)), "vector {vector:#x}");
                }
            }
        }
    }
}
