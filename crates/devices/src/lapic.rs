//! The local APIC in xAPIC mode (MMIO at 0xFEE00000), in simulated time.
//!
//! Modelled: ID, version, TPR (mirrored in CR8 by the CPU), APR/PPR, EOI
//! (with EOI broadcast of level-triggered vectors to the I/O APIC through
//! [`Request::Eoi`]), LDR/DFR, spurious vector and software enable, ISR,
//! TMR and IRR, ESR, the LVT (timer, thermal, performance, LINT0, LINT1,
//! error), the timer in one-shot and periodic mode with its divider, LINT0
//! in ExtINT mode (the 8259 pair behind it), LINT1 as NMI, and the ICR for
//! fixed, NMI, INIT and SIPI messages with shorthands. Messages for other
//! CPUs are queued for the platform ([`Lapic::take_ipis`]); this APIC
//! handles those addressed to itself. TSC-deadline mode is not offered
//! (the CPUID bit is cleared). IA32_APIC_BASE writes (when the platform
//! learns of them) disable and re-enable the APIC globally and move its
//! registers to another address ([`Lapic::set_apic_base`], with the bus
//! range of [`Lapic::set_window`]); up to two NMIs wait for the CPU.
//!
//! x2APIC mode, when the platform offers it ([`Lapic::offer_x2apic`]):
//! IA32_APIC_BASE's EXTD bit switches the APIC to its MSR interface
//! (0x800 + register offset / 16, [`Lapic::x2apic_read`] and
//! [`Lapic::x2apic_write`]) with the transitions the Intel SDM (vol. 3,
//! 11.12.5) allows; the register page is then not decoded, the APIC ID is
//! the CPU's 32-bit one, LDR is derived from it (cluster and bit), there
//! is no DFR, the ICR is one 64-bit register with a 32-bit destination,
//! and SELF IPI sends a fixed interrupt to itself. Destinations follow
//! KVM's matching (`kvm_apic_match_dest`): 32-bit in x2APIC mode, with
//! 0xFFFFFFFF the broadcast; an I/O APIC's broadcast 0xFF reaches x2APIC
//! targets too ([`Lapic::accepts_from_ioapic`]).
//!
//! The APIC is the CPU's [`InterruptController`].

use std::sync::{Arc, Mutex};

use mem::{AccessCtx, BusDevice, MovableBase, RestoreError, SavedState, Space, TimedDevice};
use serde::{Deserialize, Serialize};
use sim::intr::{InterruptController, MsrWrite, Pending};
use sim::tick::TICKS_PER_SECOND;
use sim::{Counter, Request, Stats, Tick};

use crate::pic::PicPair;
use crate::state::check;

/// Default MMIO base.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// Size of the register page.
pub const LAPIC_SIZE: u64 = 0x1000;
/// Access latency.
pub const LAPIC_LATENCY: Tick = 20 * sim::tick::TICKS_PER_NS;
/// Version register: version 0x14, six LVT entries (max LVT index 5).
pub const LAPIC_VERSION: u32 = 0x0005_0014;

const LVT_MASKED: u32 = 1 << 16;
/// The most NMIs that wait for the CPU: one to run and one latched behind
/// it. KVM keeps the same limit for the NMIs it is handed (KVM_NMI).
pub const MAX_PENDING_NMIS: u8 = 2;
const SVR_ENABLE: u32 = 1 << 8;

/// LVT indexes.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;

/// An inter-processor message addressed to other CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipi {
    /// 0 fixed, 1 lowest priority, 4 NMI, 5 INIT, 6 SIPI.
    pub mode: u8,
    pub vector: u8,
    /// Destination APIC ID (physical) or logical mask, per `logical`:
    /// 8 bits from an xAPIC, 32 from an x2APIC.
    pub dest: u32,
    pub logical: bool,
    /// Shorthand: 0 none, 2 all including self, 3 all excluding self.
    pub shorthand: u8,
    /// Level: assert (true) or de-assert (an INIT level de-assert is a
    /// synchronization message that starts no CPU).
    pub assert: bool,
    /// Trigger mode: level (true) or edge.
    pub level_triggered: bool,
}

impl Ipi {
    /// An INIT level de-assert: delivered to nobody.
    pub fn is_init_deassert(&self) -> bool {
        self.mode == 5 && !self.assert && self.level_triggered
    }
}

/// IA32_APIC_BASE (MSR 0x1B) bits.
pub const APIC_BASE_MSR: u32 = 0x1b;
/// IA32_APIC_BASE: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: the APIC is enabled (globally).
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: x2APIC mode (EXTD; with the enable bit).
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// The first x2APIC register MSR (0x800 + register offset / 16).
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// The x2APIC MSR range, inclusive.
pub const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;
/// The physical broadcast destination in x2APIC mode.
pub const X2APIC_BROADCAST: u32 = 0xffff_ffff;
/// Reserved bits of the x2APIC ICR (a write with any set is #GP; bit 12,
/// delivery status, is ignored as Intel does).
const X2APIC_ICR_RESERVED: u64 = 0xfff0_0000 | (3 << 16) | (1 << 13);
/// IA32_APIC_BASE: the register page's physical address (bits 12-51).
pub const APIC_BASE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// IPIs an APIC holds for the platform at most.
const MAX_HELD_IPIS: usize = 256;

/// A local APIC's saved state: its registers, the timer (started at an
/// absolute tick, with the periods already delivered), the NMIs waiting
/// for the CPU, the messages for other CPUs it holds and INIT/SIPI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LapicState {
    pub id: u8,
    pub apic_base: u64,
    pub tpr: u8,
    pub ldr: u32,
    pub dfr: u32,
    pub svr: u32,
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub irr: [u32; 8],
    pub esr: u32,
    pub icr_lo: u32,
    pub icr_hi: u32,
    /// Timer, thermal, performance, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    pub timer_initial: u32,
    pub timer_divide: u32,
    /// The tick at which the timer (re)started.
    pub timer_start: Tick,
    /// Periods of the timer already delivered.
    pub timer_fired: u64,
    /// An expired one-shot timer switched to periodic mode: the count
    /// stays 0 until the initial count is written (checkpoint format 4).
    pub timer_stopped: bool,
    /// NMIs waiting for the CPU (at most 2).
    pub nmis: u8,
    /// Messages for other CPUs not yet taken by the platform.
    pub ipis: Vec<Ipi>,
    pub init_received: bool,
    #[serde(deserialize_with = "Option::deserialize")]
    pub sipi_vector: Option<u8>,
    /// Something was delivered since the platform last looked.
    pub doorbell: bool,
}

impl LapicState {
    fn validate(&self) -> Result<(), RestoreError> {
        check(
            self.nmis <= MAX_PENDING_NMIS,
            "nmis",
            format_args!("{} waiting, at most {MAX_PENDING_NMIS}", self.nmis),
        )?;
        check(
            self.ipis.len() <= MAX_HELD_IPIS,
            "ipis",
            format_args!("{} held, at most {MAX_HELD_IPIS}", self.ipis.len()),
        )?;
        for (i, ipi) in self.ipis.iter().enumerate() {
            check(
                ipi.mode <= 7,
                &format!("ipis[{i}].mode"),
                format_args!("{} is no delivery mode 0-7", ipi.mode),
            )?;
            check(
                ipi.shorthand <= 3,
                &format!("ipis[{i}].shorthand"),
                format_args!("{} is no shorthand 0-3", ipi.shorthand),
            )?;
        }
        let bits = |ok: bool, field: &str, v: u32| {
            check(
                ok,
                field,
                format_args!("{v:#x} has bits the register cannot hold"),
            )
        };
        check(
            self.apic_base & (APIC_BASE_EXTD | APIC_BASE_ENABLE) != APIC_BASE_EXTD,
            "apic_base",
            format_args!(
                "{:#x} has x2APIC mode (bit 10) without the enable bit (11)",
                self.apic_base
            ),
        )?;
        bits(self.svr & !0x13ff == 0, "svr", self.svr)?;
        bits(self.ldr & 0x00ff_ffff == 0, "ldr", self.ldr)?;
        bits(self.dfr & 0x0fff_ffff == 0x0fff_ffff, "dfr", self.dfr)?;
        bits(
            self.timer_divide & !0xb == 0,
            "timer_divide",
            self.timer_divide,
        )
    }
}

/// One CPU's local APIC.
pub struct Lapic {
    id: u8,
    /// The APIC ID the CPU was built with (CPUID's initial APIC ID): the
    /// one a global re-enable restores. Configuration, not saved state.
    initial_id: u8,
    /// IA32_APIC_BASE as the guest last wrote it (kvmsim learns of writes
    /// through [`InterruptController::msr_written`]).
    apic_base: u64,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    esr: u32,
    icr_lo: u32,
    icr_hi: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    timer_start: Tick,
    /// Periods of a periodic timer already delivered.
    timer_fired: u64,
    /// The count is held at 0 until TMICT is written (see `LapicState`).
    timer_stopped: bool,
    /// The timer's input clock (before the divider).
    bus_hz: u64,
    /// The CPU offers x2APIC mode (CPUID.1:ECX bit 21): IA32_APIC_BASE may
    /// set EXTD. Configuration, not saved state.
    x2apic_offered: bool,
    pic: Option<Arc<Mutex<PicPair>>>,
    /// NMIs waiting for the CPU (at most [`MAX_PENDING_NMIS`]).
    nmis: u8,
    ipis: Vec<Ipi>,
    /// INIT and SIPI addressed to this CPU.
    init_received: bool,
    sipi_vector: Option<u8>,
    /// Something was delivered since the last [`Lapic::take_doorbell`].
    doorbell: bool,
    /// Where the bus reaches the registers, if the platform mapped them
    /// movable ([`Lapic::set_window`]).
    window: Option<MovableBase>,
    interrupts: Counter,
    timer_irqs: Counter,
    nmis_received: Counter,
    nmis_collapsed: Counter,
    nmis_taken: Counter,
}

fn bit(regs: &[u32; 8], v: u8) -> bool {
    regs[usize::from(v / 32)] & (1 << (v % 32)) != 0
}

fn set_bit(regs: &mut [u32; 8], v: u8, on: bool) {
    let w = &mut regs[usize::from(v / 32)];
    if on {
        *w |= 1 << (v % 32);
    } else {
        *w &= !(1 << (v % 32));
    }
}

/// Ticks per count of a timer whose divide configuration register is
/// `divide`, with input clock `bus_hz`.
fn count_ticks(divide: u32, bus_hz: u64) -> u128 {
    let d = (divide & 3) | ((divide & 8) >> 1);
    let divisor: u128 = if d == 7 { 1 } else { 2 << d };
    u128::from(TICKS_PER_SECOND) * divisor / u128::from(bus_hz.max(1))
}

fn highest(regs: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&w| regs[w] != 0)
        .map(|w| (w * 32 + 31 - regs[w].leading_zeros() as usize) as u8)
}

impl Lapic {
    /// The APIC of CPU `id`, whose timer counts `bus_hz` before the divider.
    /// `pic` is the 8259 pair behind LINT0, if any.
    pub fn new(
        id: u8,
        bus_hz: u64,
        pic: Option<Arc<Mutex<PicPair>>>,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        let mut a = Lapic {
            id,
            initial_id: id,
            apic_base: LAPIC_BASE | APIC_BASE_ENABLE | if id == 0 { APIC_BASE_BSP } else { 0 },
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            icr_lo: 0,
            icr_hi: 0,
            lvt: [LVT_MASKED; 6],
            timer_initial: 0,
            timer_divide: 0,
            timer_start: 0,
            timer_fired: 0,
            timer_stopped: false,
            bus_hz: bus_hz.max(1),
            x2apic_offered: false,
            pic,
            nmis: 0,
            ipis: Vec::new(),
            init_received: false,
            sipi_vector: None,
            doorbell: false,
            window: None,
            interrupts: stats.counter(
                &format!("{prefix}.interrupts"),
                "Interrupts delivered to the CPU by the local APIC",
                "Count",
            )?,
            nmis_received: stats.counter(
                &format!("{prefix}.nmisReceived"),
                "NMIs that reached the local APIC (IPIs, LINT1, its own LVT entries)",
                "Count",
            )?,
            nmis_collapsed: stats.counter(
                &format!("{prefix}.nmisCollapsed"),
                "NMIs merged into others, as hardware merges them: arrived with two already \
                 waiting for the CPU, or one while the CPU is in its NMI handler",
                "Count",
            )?,
            nmis_taken: stats.counter(
                &format!("{prefix}.nmisTaken"),
                "NMIs the CPU took from the local APIC (handed to KVM, which runs one and holds \
                 at most one more behind a running handler)",
                "Count",
            )?,
            timer_irqs: stats.counter(
                &format!("{prefix}.timerInterrupts"),
                "Local APIC timer interrupts",
                "Count",
            )?,
        };
        // The BSP's reset state of a PC: LINT0 ExtINT (virtual wire), LINT1
        // NMI. An AP's (no 8259 behind it) stays masked until its OS sets it.
        if a.pic.is_some() {
            a.lvt[LVT_LINT0] = 0x700;
            a.lvt[LVT_LINT1] = 0x400;
        }
        Ok(a)
    }

    /// INIT: back to the power-on state, keeping the APIC ID (and the 8259
    /// behind a BSP's LINT0).
    pub fn init_reset(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.icr_lo = 0;
        self.icr_hi = 0;
        self.lvt = [LVT_MASKED; 6];
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer_fired = 0;
        self.timer_stopped = false;
        self.nmis = 0;
        self.ipis.clear();
        self.init_received = false;
        self.sipi_vector = None;
    }

    /// True once after anything was delivered (an interrupt, NMI, INIT or
    /// SIPI): the platform's cue to wake or kick this APIC's CPU when the
    /// delivery came from another thread.
    pub fn take_doorbell(&mut self) -> bool {
        std::mem::take(&mut self.doorbell)
    }

    /// The priority lowest-priority arbitration compares: the processor
    /// priority (the lowest wins).
    pub fn arbitration_priority(&self) -> u8 {
        self.ppr()
    }

    /// The APIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The 32-bit x2APIC ID: the CPU's initial APIC ID.
    pub fn x2apic_id(&self) -> u32 {
        u32::from(self.initial_id)
    }

    /// True if an inter-processor message for `dest` (logical or physical)
    /// reaches this APIC. The destination is compared as KVM does: in
    /// x2APIC mode as 32 bits (0xFFFFFFFF the broadcast, logical: cluster
    /// in bits 31-16, a bitmap in 15-0, against the derived LDR); in xAPIC
    /// mode as 8 bits (0xFF the broadcast), a wider physical destination
    /// naming nobody.
    pub fn accepts(&self, dest: u32, logical: bool) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        if self.x2apic_mode() {
            if dest == X2APIC_BROADCAST {
                return true;
            }
            return if logical {
                let ldr = self.x2apic_ldr();
                ldr >> 16 == dest >> 16 && ldr & dest & 0xffff != 0
            } else {
                dest == self.x2apic_id()
            };
        }
        if logical {
            let id = self.ldr >> 24;
            if dest == 0xff || self.dfr >> 28 == 0xf {
                // Flat model: a bit per APIC.
                dest & id != 0
            } else {
                // Cluster model: the high nibble names the cluster.
                dest >> 4 == id >> 4 && dest & id & 0xf != 0
            }
        } else {
            dest == u32::from(self.id) || dest == 0xff
        }
    }

    /// True if an I/O APIC message for the 8-bit `dest` reaches this APIC:
    /// as KVM does without interrupt remapping, 0xFF is the broadcast for
    /// x2APIC targets too; any other value is taken as the 32-bit
    /// destination ([`Lapic::accepts`]).
    pub fn accepts_from_ioapic(&self, dest: u8, logical: bool) -> bool {
        let dest = if dest == 0xff && self.x2apic_mode() {
            X2APIC_BROADCAST
        } else {
            u32::from(dest)
        };
        self.accepts(dest, logical)
    }

    /// Offers x2APIC mode to the guest (or not, the default): the CPU
    /// says so in CPUID and traps the x2APIC MSRs.
    pub fn offer_x2apic(&mut self, on: bool) {
        self.x2apic_offered = on;
    }

    /// True in x2APIC mode (IA32_APIC_BASE's enable and EXTD bits set).
    pub fn x2apic_mode(&self) -> bool {
        self.apic_base & (APIC_BASE_ENABLE | APIC_BASE_EXTD) == APIC_BASE_ENABLE | APIC_BASE_EXTD
    }

    /// The logical ID in x2APIC mode, derived from the x2APIC ID: the
    /// cluster (ID / 16) in bits 31-16 and bit ID % 16 of the bitmap.
    pub fn x2apic_ldr(&self) -> u32 {
        let id = self.x2apic_id();
        ((id >> 4) << 16) | (1 << (id & 0xf))
    }

    /// True if the guest may write `value` to IA32_APIC_BASE: the Intel
    /// SDM's legal transitions (vol. 3, 11.12.5). EXTD needs the CPU to
    /// offer x2APIC and the enable bit with it; x2APIC mode leaves only to
    /// disabled (not straight to xAPIC), and disabled goes to xAPIC first.
    pub fn apic_base_write_allowed(&self, value: u64) -> bool {
        let extd = value & APIC_BASE_EXTD != 0;
        let en = value & APIC_BASE_ENABLE != 0;
        if extd && (!self.x2apic_offered || !en) {
            return false;
        }
        match (self.hw_enabled(), self.x2apic_mode(), en, extd) {
            // x2APIC -> xAPIC.
            (_, true, true, false) => false,
            // Disabled -> x2APIC.
            (false, _, true, true) => false,
            _ => true,
        }
    }

    fn enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// True unless the guest disabled the APIC globally (IA32_APIC_BASE
    /// bit 11 clear).
    pub fn hw_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    /// The guest wrote IA32_APIC_BASE (KVM checked the value). Clearing the
    /// enable bit disables the APIC globally: its registers disappear from
    /// the bus (reads return all-ones, writes are dropped, as for memory
    /// that is not there), it accepts no interrupt messages and delivers
    /// nothing but NMIs and, with an 8259 behind LINT0, the 8259's INTR
    /// (the pins then reach the CPU directly). Setting it again brings the
    /// APIC back in its power-on state, its APIC ID the initial one (a
    /// guest-written xAPIC ID is lost, as KVM does).
    /// A new address moves the registers there (with a window from
    /// [`Lapic::set_window`]; the old address then reaches nothing of this
    /// APIC).
    pub fn set_apic_base(&mut self, value: u64) {
        let was = self.hw_enabled();
        self.apic_base = value;
        if let Some(w) = &self.window {
            w.set(value & APIC_BASE_ADDR);
        }
        if was && !self.hw_enabled() {
            let id = self.id;
            self.init_reset();
            self.id = id;
        } else if !was && self.hw_enabled() {
            self.init_reset();
            self.id = self.initial_id;
            if self.pic.is_some() {
                self.lvt[LVT_LINT0] = 0x700;
                self.lvt[LVT_LINT1] = 0x400;
            }
        }
    }

    /// Hands the APIC the base of its bus range (mapped with
    /// [`mem::IoBus::insert_banked_movable`]): a write of IA32_APIC_BASE
    /// with another address moves the registers there.
    pub fn set_window(&mut self, window: MovableBase) {
        window.set(self.apic_base & APIC_BASE_ADDR);
        self.window = Some(window);
    }

    /// IA32_APIC_BASE as last written.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// The processor priority: the higher of TPR and the in-service class.
    fn ppr(&self) -> u8 {
        let isrv = highest(&self.isr).unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    /// A fixed interrupt arrives (from the I/O APIC, an IPI or the timer).
    pub fn deliver(&mut self, vector: u8, level_triggered: bool) {
        if !self.hw_enabled() {
            return;
        }
        if vector < 16 {
            self.esr |= 0x40; // received illegal vector
            return;
        }
        set_bit(&mut self.irr, vector, true);
        set_bit(&mut self.tmr, vector, level_triggered);
        self.doorbell = true;
    }

    /// An NMI arrives. Up to [`MAX_PENDING_NMIS`] wait for the CPU: two
    /// NMIs that arrive before the CPU takes the first are both taken (one
    /// runs, the other waits behind it, as on hardware, where an NMI that
    /// arrives while one is being serviced is latched); more collapse.
    pub fn deliver_nmi(&mut self) {
        self.nmis_received.inc();
        if self.nmis >= MAX_PENDING_NMIS {
            self.nmis_collapsed.inc();
        }
        self.nmis = (self.nmis + 1).min(MAX_PENDING_NMIS);
        self.doorbell = true;
    }

    /// NMIs waiting for the CPU.
    pub fn pending_nmis(&self) -> u8 {
        self.nmis
    }

    /// INIT arrives: the CPU must be reset and wait for SIPI.
    pub fn deliver_init(&mut self) {
        self.init_received = true;
        self.sipi_vector = None;
        self.doorbell = true;
    }

    /// SIPI arrives (after INIT): the CPU starts in real mode at vector << 12.
    pub fn deliver_sipi(&mut self, vector: u8) {
        if self.init_received {
            self.sipi_vector = Some(vector);
        }
        self.doorbell = true;
    }

    /// INIT/SIPI state: (INIT seen, SIPI vector).
    pub fn startup_state(&self) -> (bool, Option<u8>) {
        (self.init_received, self.sipi_vector)
    }

    /// Messages for other CPUs since the last call.
    pub fn take_ipis(&mut self) -> Vec<Ipi> {
        std::mem::take(&mut self.ipis)
    }

    /// Ticks per timer count.
    fn count_ticks(&self) -> u128 {
        count_ticks(self.timer_divide, self.bus_hz)
    }

    fn timer_periodic(&self) -> bool {
        (self.lvt[LVT_TIMER] >> 17) & 3 == 1
    }

    fn timer_current(&self, now: Tick) -> u32 {
        if self.timer_initial == 0 || self.timer_stopped {
            return 0;
        }
        let per = self.count_ticks().max(1);
        let counts = u128::from(now.saturating_sub(self.timer_start)) / per;
        let init = u128::from(self.timer_initial);
        if self.timer_periodic() {
            (init - counts % init) as u32
        } else {
            init.saturating_sub(counts) as u32
        }
    }

    /// Ticks per timer period (initial count x ticks per count).
    fn timer_period(&self) -> u128 {
        self.count_ticks().max(1) * u128::from(self.timer_initial)
    }

    fn timer_expiry(&self, n: u64) -> Option<Tick> {
        if self.timer_initial == 0 {
            return None;
        }
        let t = self.timer_period() * u128::from(n);
        Some(
            self.timer_start
                .saturating_add(t.min(u128::from(u64::MAX)) as u64),
        )
    }

    fn send_ipi(&mut self) {
        let lo = self.icr_lo;
        let dest = if self.x2apic_mode() {
            self.icr_hi
        } else {
            self.icr_hi >> 24
        };
        let ipi = Ipi {
            mode: ((lo >> 8) & 7) as u8,
            vector: lo as u8,
            dest,
            logical: lo & (1 << 11) != 0,
            shorthand: ((lo >> 18) & 3) as u8,
            assert: lo & (1 << 14) != 0,
            level_triggered: lo & (1 << 15) != 0,
        };
        if ipi.is_init_deassert() {
            return;
        }
        let to_self = match ipi.shorthand {
            1 | 2 => true,
            3 => false,
            _ => self.accepts(ipi.dest, ipi.logical),
        };
        // Without a shorthand the platform finds every other APIC the
        // message is for: in physical mode too, since the guest may have
        // given several APICs the same xAPIC ID (they all accept it).
        let to_others = ipi.shorthand != 1;
        // Lowest priority without a shorthand is arbitrated by the platform
        // among every APIC that accepts it, this one included.
        if ipi.mode == 1 && ipi.shorthand == 0 {
            if self.ipis.len() < 256 {
                self.ipis.push(ipi);
            }
            return;
        }
        if to_self {
            match ipi.mode {
                0 | 1 => self.deliver(ipi.vector, false),
                4 => self.deliver_nmi(),
                5 => {} // INIT to ourselves: a BSP ignores it here
                _ => {}
            }
        }
        if to_others && self.ipis.len() < 256 {
            self.ipis.push(ipi);
        }
    }

    /// An EOI from something other than the guest's write (a device that
    /// services the interrupt for it, as SE mode's does): the highest
    /// in-service vector ends (an edge-triggered one: no I/O APIC EOI).
    pub fn end_of_interrupt(&mut self) {
        let mut ignored = Vec::new();
        self.eoi(&mut ignored);
    }

    fn eoi(&mut self, requests: &mut Vec<Request>) {
        if let Some(v) = highest(&self.isr) {
            set_bit(&mut self.isr, v, false);
            if bit(&self.tmr, v) {
                requests.push(Request::Eoi { vector: v });
            }
        }
    }

    fn read_reg(&self, reg: u64, now: Tick) -> u32 {
        match reg {
            0x20 => u32::from(self.id) << 24,
            0x30 => LAPIC_VERSION,
            0x80 => u32::from(self.tpr),
            0x90 => u32::from(self.tpr), // APR: arbitration priority
            0xa0 => u32::from(self.ppr()),
            0xd0 => self.ldr,
            0xe0 => self.dfr,
            0xf0 => self.svr,
            0x100..=0x170 => self.isr[((reg - 0x100) / 0x10) as usize],
            0x180..=0x1f0 => self.tmr[((reg - 0x180) / 0x10) as usize],
            0x200..=0x270 => self.irr[((reg - 0x200) / 0x10) as usize],
            0x280 => self.esr,
            0x300 => self.icr_lo & !(1 << 12), // delivery status: idle
            0x310 => self.icr_hi,
            0x320..=0x370 => self.lvt[((reg - 0x320) / 0x10) as usize],
            0x380 => self.timer_initial,
            0x390 => self.timer_current(now),
            0x3e0 => self.timer_divide,
            _ => 0,
        }
    }

    fn write_reg(&mut self, reg: u64, v: u32, now: Tick, requests: &mut Vec<Request>) {
        match reg {
            0x20 => self.id = (v >> 24) as u8,
            0x80 => self.tpr = v as u8,
            0xb0 => self.eoi(requests),
            0xd0 => self.ldr = v & 0xff00_0000,
            0xe0 => self.dfr = v | 0x0fff_ffff,
            0xf0 => {
                self.svr = v & 0x13ff;
                if !self.enabled() {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            0x280 => self.esr = 0,
            0x300 => {
                self.icr_lo = v;
                self.send_ipi();
            }
            0x310 => self.icr_hi = v,
            0x320..=0x370 => {
                let i = ((reg - 0x320) / 0x10) as usize;
                let mut v = v;
                if !self.enabled() {
                    v |= LVT_MASKED;
                }
                if i == LVT_TIMER {
                    // Periods that ended before this write are delivered
                    // under the entry they ended with.
                    self.timer_catch_up(now);
                }
                let was_periodic = self.timer_periodic();
                self.lvt[i] = v;
                if i == LVT_TIMER && was_periodic != self.timer_periodic() {
                    self.timer_mode_changed(now);
                }
            }
            0x380 => {
                self.timer_initial = v;
                self.timer_start = now;
                self.timer_fired = 0;
                self.timer_stopped = false;
            }
            0x3e0 => self.timer_divide = v & 0xb,
            _ => {}
        }
    }

    /// The guest reads x2APIC register MSR `index` at `now`: its value,
    /// or None for #GP (not in x2APIC mode, a write-only or reserved
    /// register).
    pub fn x2apic_read(&mut self, index: u32, now: Tick) -> Option<u64> {
        if !self.x2apic_mode() || !X2APIC_MSRS.contains(&index) {
            return None;
        }
        let reg = u64::from(index - X2APIC_MSR_BASE) << 4;
        let v = match reg {
            0x20 => self.x2apic_id(),
            0xd0 => self.x2apic_ldr(),
            0x300 => {
                return Some((u64::from(self.icr_hi) << 32) | u64::from(self.icr_lo & !(1 << 12)))
            }
            0x30
            | 0x80
            | 0xa0
            | 0xf0
            | 0x100..=0x270
            | 0x280
            | 0x320..=0x370
            | 0x380
            | 0x390
            | 0x3e0 => self.read_reg(reg, now),
            // APR, EOI, RRD, DFR, ICR high, SELF IPI, CMCI and the
            // reserved ones.
            _ => return None,
        };
        Some(u64::from(v))
    }

    /// The guest writes `value` to x2APIC register MSR `index` at `now`;
    /// false for #GP (nothing changes): not in x2APIC mode, a read-only or
    /// reserved register, bits 63-32 set outside the ICR, a non-zero EOI
    /// or ESR write, reserved ICR bits.
    pub fn x2apic_write(
        &mut self,
        index: u32,
        value: u64,
        now: Tick,
        requests: &mut Vec<Request>,
    ) -> bool {
        if !self.x2apic_mode() || !X2APIC_MSRS.contains(&index) {
            return false;
        }
        let reg = u64::from(index - X2APIC_MSR_BASE) << 4;
        if reg == 0x300 {
            if value & X2APIC_ICR_RESERVED != 0 {
                return false;
            }
            self.icr_hi = (value >> 32) as u32;
            self.icr_lo = value as u32;
            self.send_ipi();
            return true;
        }
        if value >> 32 != 0 {
            return false;
        }
        let v = value as u32;
        match reg {
            0xb0 | 0x280 if v != 0 => false,
            0x80 | 0xb0 | 0xf0 | 0x280 | 0x320..=0x370 | 0x380 | 0x3e0 => {
                self.write_reg(reg, v, now, requests);
                true
            }
            0x3f0 => {
                // SELF IPI: a fixed, edge-triggered interrupt to itself.
                self.deliver(v as u8, false);
                true
            }
            _ => false,
        }
    }

    fn extint_pending(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        // A globally disabled APIC passes the 8259's INTR straight on.
        (!self.hw_enabled() || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == 7))
            && self.pic.as_ref().is_some_and(|p| mem::lock(p).intr())
    }

    fn fixed_pending(&self) -> Option<u8> {
        if !self.enabled() || !self.hw_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }
}

impl InterruptController for Lapic {
    fn pending(&mut self) -> Pending {
        if self.nmis > 0 {
            Pending::Nmi
        } else if self.fixed_pending().is_some() || self.extint_pending() {
            Pending::Maskable
        } else {
            Pending::None
        }
    }

    fn acknowledge(&mut self) -> Option<u8> {
        if let Some(v) = self.fixed_pending() {
            set_bit(&mut self.irr, v, false);
            set_bit(&mut self.isr, v, true);
            self.interrupts.inc();
            return Some(v);
        }
        if self.extint_pending() {
            self.interrupts.inc();
            return self.pic.as_ref().map(|p| mem::lock(p).acknowledge_vector());
        }
        None
    }

    fn take_nmi(&mut self) -> bool {
        let had = self.nmis > 0;
        self.nmis = self.nmis.saturating_sub(1);
        if had {
            self.nmis_taken.inc();
        }
        had
    }

    fn merge_nmis(&mut self) {
        if self.nmis > 1 {
            self.nmis_collapsed.add(u64::from(self.nmis - 1));
            self.nmis = 1;
        }
    }

    fn task_priority(&self) -> u8 {
        self.tpr
    }

    fn set_task_priority(&mut self, tpr: u8) {
        self.tpr = tpr;
    }

    fn msr_write(
        &mut self,
        index: u32,
        value: u64,
        now: Tick,
        requests: &mut Vec<Request>,
    ) -> MsrWrite {
        if index == APIC_BASE_MSR {
            return if self.apic_base_write_allowed(value) {
                MsrWrite::ToCpu
            } else {
                MsrWrite::Fault
            };
        }
        if X2APIC_MSRS.contains(&index) {
            return if self.x2apic_write(index, value, now, requests) {
                MsrWrite::Done {
                    latency: LAPIC_LATENCY,
                }
            } else {
                MsrWrite::Fault
            };
        }
        MsrWrite::ToCpu
    }

    fn msr_read(&mut self, index: u32, now: Tick) -> Option<(u64, Tick)> {
        self.x2apic_read(index, now).map(|v| (v, LAPIC_LATENCY))
    }

    fn msr_written(&mut self, index: u32, value: u64) {
        if index == APIC_BASE_MSR {
            self.set_apic_base(value);
        }
    }

    fn describe(&self) -> String {
        format!(
            "apic svr={:#x} tpr={:#x} ppr={:#x} irr_top={:?} isr_top={:?} lvt_timer={:#x} lint0={:#x} init_count={}",
            self.svr,
            self.tpr,
            self.ppr(),
            highest(&self.irr),
            highest(&self.isr),
            self.lvt[LVT_TIMER],
            self.lvt[LVT_LINT0],
            self.timer_initial
        )
    }
}

impl BusDevice for Lapic {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
        // Globally disabled, or in x2APIC mode: the page is not decoded.
        if !self.hw_enabled() || self.x2apic_mode() {
            data.fill(0xff);
            return LAPIC_LATENCY;
        }
        let v = self.read_reg(offset & 0xff0, ctx.now);
        let shifted = u64::from(v) >> (8 * (offset & 3));
        crate::put_le_value(data, shifted);
        LAPIC_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        if !self.hw_enabled() || self.x2apic_mode() {
            return LAPIC_LATENCY;
        }
        // Registers are 32-bit at 16-byte boundaries; other writes are ignored.
        if offset & 0xf == 0 && data.len() >= 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset & 0xff0, v, ctx.now, ctx.requests);
        } else {
            self.esr |= 0x80; // illegal register address
        }
        LAPIC_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&LapicState {
            id: self.id,
            apic_base: self.apic_base,
            tpr: self.tpr,
            ldr: self.ldr,
            dfr: self.dfr,
            svr: self.svr,
            isr: self.isr,
            tmr: self.tmr,
            irr: self.irr,
            esr: self.esr,
            icr_lo: self.icr_lo,
            icr_hi: self.icr_hi,
            lvt: self.lvt,
            timer_initial: self.timer_initial,
            timer_divide: self.timer_divide,
            timer_start: self.timer_start,
            timer_fired: self.timer_fired,
            timer_stopped: self.timer_stopped,
            nmis: self.nmis,
            ipis: self.ipis.clone(),
            init_received: self.init_received,
            sipi_vector: self.sipi_vector,
            doorbell: self.doorbell,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: LapicState = crate::state::parse(state)?;
        s.validate()?;
        // Expiries are computed as period x (fired + 1): periods delivered
        // stay within simulated time.
        let period = count_ticks(s.timer_divide, self.bus_hz).max(1) * u128::from(s.timer_initial);
        check(
            period == 0 || u128::from(s.timer_fired) <= u128::from(u64::MAX) / period + 1,
            "timer_fired",
            format_args!(
                "{} periods of {period} ticks end past the end of simulated time",
                s.timer_fired
            ),
        )?;
        check(
            s.apic_base & APIC_BASE_EXTD == 0 || self.x2apic_offered,
            "apic_base",
            format_args!(
                "{:#x} is in x2APIC mode, which this system does not offer (system.x2apic)",
                s.apic_base
            ),
        )?;
        self.id = s.id;
        self.apic_base = s.apic_base;
        if let Some(w) = &self.window {
            w.set(s.apic_base & APIC_BASE_ADDR);
        }
        self.tpr = s.tpr;
        self.ldr = s.ldr;
        self.dfr = s.dfr;
        self.svr = s.svr;
        self.isr = s.isr;
        self.tmr = s.tmr;
        self.irr = s.irr;
        self.esr = s.esr;
        self.icr_lo = s.icr_lo;
        self.icr_hi = s.icr_hi;
        self.lvt = s.lvt;
        self.timer_initial = s.timer_initial;
        self.timer_divide = s.timer_divide;
        self.timer_start = s.timer_start;
        self.timer_fired = s.timer_fired;
        self.timer_stopped = s.timer_stopped;
        self.nmis = s.nmis;
        self.ipis = s.ipis;
        self.init_received = s.init_received;
        self.sipi_vector = s.sipi_vector;
        self.doorbell = s.doorbell;
        Ok(())
    }
}

impl TimedDevice for Lapic {
    fn next_deadline(&self) -> Option<Tick> {
        // A one-shot timer fires once per start.
        if self.timer_stopped || (!self.timer_periodic() && self.timer_fired > 0) {
            return None;
        }
        self.timer_expiry(self.timer_fired.saturating_add(1))
    }

    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.timer_catch_up(ctx.now);
    }
}

impl Lapic {
    /// A write to LVTT that changed the timer's mode, after the periods
    /// that ended were delivered. As on Intel's APIC (and KVM's, which
    /// kvm-unit-tests' `apic` checks), the change neither restarts the
    /// count nor resets it: periodic to one-shot counts down from where
    /// the period was, to 0, and stops; a one-shot count still running
    /// goes on and then reloads; a one-shot count that already reached 0
    /// stays 0 in periodic mode until the guest writes TMICT.
    fn timer_mode_changed(&mut self, now: Tick) {
        if self.timer_initial == 0 || self.timer_stopped {
            return;
        }
        if self.timer_periodic() {
            // From one-shot: `timer_catch_up` delivered it if it expired.
            self.timer_stopped = self.timer_fired > 0;
        } else {
            // From periodic: the current period becomes the one-shot count.
            let phase = u128::from(now.saturating_sub(self.timer_start)) % self.timer_period();
            self.timer_start = now - phase as u64;
            self.timer_fired = 0;
        }
    }

    /// Delivers the timer's interrupt if a period ended by `now` that was
    /// not yet delivered.
    fn timer_catch_up(&mut self, now: Tick) {
        let Some(at) = self.next_deadline() else {
            return;
        };
        if at > now {
            return;
        }
        // Every period that ended by now counts: a deadline can be far in
        // the past when serviced (the guest changed the divider of a
        // running timer), and the missed interrupts merge into one.
        let ended = u128::from(now.saturating_sub(self.timer_start)) / self.timer_period();
        self.timer_fired = u64::try_from(ended)
            .unwrap_or(u64::MAX)
            .max(self.timer_fired.saturating_add(1));
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED == 0 {
            self.timer_irqs.inc();
            self.deliver(lvt as u8, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lapic() -> Lapic {
        let mut stats = Stats::new();
        Lapic::new(0, 1_000_000_000, None, &mut stats, "apic").unwrap()
    }

    fn w(a: &mut Lapic, now: Tick, reg: u64, v: u32) -> Vec<Request> {
        let mut reqs = vec![];
        a.write(
            Space::Mmio,
            reg,
            &v.to_le_bytes(),
            &mut AccessCtx::new(now, &mut reqs),
        );
        reqs
    }

    fn r(a: &mut Lapic, now: Tick, reg: u64) -> u32 {
        let mut reqs = vec![];
        let mut d = [0u8; 4];
        a.read(
            Space::Mmio,
            reg,
            &mut d,
            &mut AccessCtx::new(now, &mut reqs),
        );
        u32::from_le_bytes(d)
    }

    #[test]
    fn a_periodic_timer_stops_at_the_end_of_time() {
        // Found by fuzzing (fuzz/, target dev_lapic): the expiry after the
        // last representable one saturates to MAX_TICK; serviced there, it
        // named MAX_TICK again and the system looped at that tick forever.
        // A deadline at MAX_TICK is never serviced (mem::service_tick).
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x320, 0x2_0030); // periodic, vector 0x30
        let start = Tick::MAX - 5_000_000;
        w(&mut a, start, 0x380, 1000); // 1000 counts of 2 ns: a 2 us period
        let (mut now, mut fired) = (start, 0);
        while let Some(at) = mem::service_tick(a.next_deadline(), now) {
            assert!(at > now && fired < 3, "serviced again at {at}");
            a.on_deadline(&mut AccessCtx::new(at, &mut vec![]));
            (now, fired) = (at, fired + 1);
        }
        assert_eq!(fired, 2, "the periods that end before the end of time");
        assert_eq!(a.next_deadline(), Some(Tick::MAX));
    }

    #[test]
    fn a_late_deadline_catches_up_at_once() {
        // Found by fuzzing (fuzz/, target dev_lapic): changing the divider
        // of a running periodic timer moves its next expiry into the past;
        // each on_deadline then moved it on by one period, so the system
        // serviced the APIC at the same tick once per missed period.
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x3e0, 0xa); // divide by 128: 128 ns per count
        w(&mut a, 0, 0x320, 0x2_0030); // periodic, vector 0x30
        w(&mut a, 0, 0x380, 1000); // 128 us periods
        let p = 128_000_000;
        assert_eq!(a.next_deadline(), Some(p));
        a.on_deadline(&mut AccessCtx::new(p, &mut vec![]));
        let now = p + 10;
        w(&mut a, now, 0x3e0, 0xb); // divide by 1: 1 us periods from tick 0
        let at = mem::service_tick(a.next_deadline(), now).unwrap();
        assert_eq!(at, now, "due at once");
        a.on_deadline(&mut AccessCtx::new(at, &mut vec![]));
        assert_eq!(
            a.next_deadline(),
            Some(129_000_000),
            "the next period after now"
        );
        assert_eq!(a.acknowledge(), Some(0x30));
        w(&mut a, now, 0xb0, 0);
        assert_eq!(
            a.acknowledge(),
            None,
            "one interrupt for the missed periods"
        );
    }

    #[test]
    fn identity_and_reset_state() {
        let mut a = lapic();
        assert_eq!(r(&mut a, 0, 0x30), LAPIC_VERSION);
        assert_eq!(r(&mut a, 0, 0x20), 0);
        assert_eq!(r(&mut a, 0, 0xf0), 0xff, "software disabled at reset");
        assert_eq!(r(&mut a, 0, 0x350), LVT_MASKED, "an AP's LINT0: masked");
        let mut stats = Stats::new();
        let pic = Some(Arc::new(Mutex::new(PicPair::new())));
        let mut bsp = Lapic::new(0, 1_000_000_000, pic, &mut stats, "apic").unwrap();
        assert_eq!(r(&mut bsp, 0, 0x350), 0x700, "the BSP's LINT0: ExtINT");
        assert_eq!(r(&mut bsp, 0, 0x360), 0x400, "the BSP's LINT1: NMI");
        assert_eq!(r(&mut a, 0, 0xe0), 0xffff_ffff);
    }

    #[test]
    fn priorities_isr_and_eoi() {
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff); // enable, spurious 0xff
        a.deliver(0x41, false);
        a.deliver(0x62, true);
        assert_eq!(a.pending(), Pending::Maskable);
        assert_eq!(a.acknowledge(), Some(0x62));
        // 0x41 is in a lower class than 0x62 in service: it waits.
        assert_eq!(a.pending(), Pending::None);
        assert_eq!(r(&mut a, 0, 0xa0), 0x60, "PPR");
        let reqs = w(&mut a, 0, 0xb0, 0);
        assert_eq!(
            reqs,
            vec![Request::Eoi { vector: 0x62 }],
            "level: EOI broadcast"
        );
        assert_eq!(a.acknowledge(), Some(0x41));
        assert_eq!(w(&mut a, 0, 0xb0, 0), vec![], "edge: no broadcast");
        // TPR blocks lower classes.
        a.set_task_priority(0x50);
        a.deliver(0x45, false);
        assert_eq!(a.pending(), Pending::None);
        a.deliver(0x65, false);
        assert_eq!(a.acknowledge(), Some(0x65));
    }

    #[test]
    fn timer_one_shot_and_periodic_with_divider() {
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x3e0, 0x3); // divide by 16
        w(&mut a, 0, 0x320, 0x30); // one-shot, vector 0x30
        w(&mut a, 0, 0x380, 1000); // 1000 counts x 16 ns = 16 us
        assert_eq!(a.next_deadline(), Some(16_000_000));
        assert_eq!(r(&mut a, 8_000_000, 0x390), 500);
        let mut reqs = vec![];
        a.on_deadline(&mut AccessCtx::new(16_000_000, &mut reqs));
        assert_eq!(a.acknowledge(), Some(0x30));
        w(&mut a, 16_000_000, 0xb0, 0);
        assert_eq!(a.next_deadline(), None, "one-shot fires once");
        assert_eq!(r(&mut a, 20_000_000, 0x390), 0);
        // Periodic.
        w(&mut a, 30_000_000, 0x320, 0x20031);
        w(&mut a, 30_000_000, 0x380, 1000);
        assert_eq!(a.next_deadline(), Some(46_000_000));
        a.on_deadline(&mut AccessCtx::new(46_000_000, &mut reqs));
        assert_eq!(a.next_deadline(), Some(62_000_000));
        assert_eq!(r(&mut a, 54_000_000, 0x390), 500);
        assert_eq!(a.acknowledge(), Some(0x31));
        w(&mut a, 54_000_000, 0xb0, 0);
        a.on_deadline(&mut AccessCtx::new(62_000_000, &mut reqs));
        assert_eq!(a.acknowledge(), Some(0x31));
        w(&mut a, 62_000_000, 0xb0, 0);
        // Masked: counts but delivers nothing.
        w(&mut a, 70_000_000, 0x320, 0x30031);
        w(&mut a, 70_000_000, 0x380, 10);
        a.on_deadline(&mut AccessCtx::new(70_160_000, &mut reqs));
        assert_eq!(a.irr, [0; 8]);
    }

    /// The sequence of kvm-unit-tests' `apic` "change mode" test, with
    /// simulated time: a change of mode by LVTT keeps the count.
    #[test]
    fn a_timer_mode_change_keeps_the_count_and_an_expired_one_shot_stays_stopped() {
        let mut a = lapic();
        let mut reqs = vec![];
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x3e0, 0xb); // divide by 1: a count is 1 ns
        w(&mut a, 0, 0x320, 0x30); // one-shot, vector 0x30
        w(&mut a, 0, 0x380, 1000);
        // Periodic to one-shot at 2.5 periods: 500 counts left, then 0.
        w(&mut a, 0, 0x320, 0x20030);
        a.on_deadline(&mut AccessCtx::new(1_000_000, &mut reqs));
        a.on_deadline(&mut AccessCtx::new(2_000_000, &mut reqs));
        assert_eq!(r(&mut a, 2_500_000, 0x390), 500);
        w(&mut a, 2_500_000, 0x320, 0x30);
        assert_eq!(r(&mut a, 2_500_000, 0x390), 500, "not reset to TMICT");
        assert_eq!(r(&mut a, 2_900_000, 0x390), 100);
        assert_eq!(a.next_deadline(), Some(3_000_000));
        a.on_deadline(&mut AccessCtx::new(3_000_000, &mut reqs));
        assert_eq!(a.next_deadline(), None, "one-shot from then on");
        assert_eq!(r(&mut a, 3_500_000, 0x390), 0);
        // A running one-shot count to periodic: it goes on, then reloads.
        w(&mut a, 4_000_000, 0x380, 1000);
        w(&mut a, 4_600_000, 0x320, 0x20030);
        assert_eq!(r(&mut a, 4_600_000, 0x390), 400, "not reset to TMICT");
        a.on_deadline(&mut AccessCtx::new(5_000_000, &mut reqs));
        assert_eq!(r(&mut a, 5_100_000, 0x390), 900, "reloaded");
        assert_eq!(a.next_deadline(), Some(6_000_000));
        // Periodic to one-shot with a period ended but not yet serviced:
        // it is delivered first, and the count goes on from its phase.
        w(&mut a, 6_200_000, 0x320, 0x30);
        assert_eq!(a.timer_irqs.get(), 5);
        assert_eq!(r(&mut a, 6_200_000, 0x390), 800);
        // An expired one-shot to periodic: stays at 0, no interrupt, until
        // TMICT is written.
        a.on_deadline(&mut AccessCtx::new(7_000_000, &mut reqs));
        assert_eq!(a.timer_irqs.get(), 6);
        w(&mut a, 7_500_000, 0x320, 0x20030);
        assert_eq!(r(&mut a, 7_500_000, 0x390), 0, "stays at zero");
        assert_eq!(a.next_deadline(), None);
        assert_eq!(r(&mut a, 7_500_000, 0x380), 1000, "TMICT kept");
        w(&mut a, 8_000_000, 0x380, 1000);
        assert_eq!(r(&mut a, 8_500_000, 0x390), 500);
        assert_eq!(a.next_deadline(), Some(9_000_000));
        // A write that keeps the mode (unmask, vector) restarts nothing.
        w(&mut a, 8_600_000, 0x320, 0x20031);
        assert_eq!(r(&mut a, 8_600_000, 0x390), 400);
        assert_eq!(a.next_deadline(), Some(9_000_000));
    }

    #[test]
    fn a_stopped_timer_is_saved() {
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x3e0, 0xb);
        w(&mut a, 0, 0x320, 0x30);
        w(&mut a, 0, 0x380, 1000);
        a.on_deadline(&mut AccessCtx::new(1_000_000, &mut vec![]));
        w(&mut a, 2_000_000, 0x320, 0x20030);
        let saved = a.save();
        let mut b = lapic();
        b.restore(&saved).unwrap();
        assert_eq!(r(&mut b, 3_000_000, 0x390), 0);
        assert_eq!(b.next_deadline(), None);
        // A state without the field is refused (the checkpoint format
        // was raised with it), never read as a running timer.
        let mut old = saved.clone();
        old.as_object_mut().unwrap().remove("timer_stopped");
        let mut c = lapic();
        let e = c.restore(&old).unwrap_err().to_string();
        assert!(e.contains("timer_stopped"), "{e}");
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x80, 0x20); // TPR
        w(&mut a, 0, 0x3e0, 0x1); // divide by 4
        w(&mut a, 0, 0x320, 0x2_0040); // periodic, vector 0x40
        w(&mut a, 1000, 0x380, 250); // a 1 us period from tick 1000
        let mut reqs = vec![];
        a.on_deadline(&mut AccessCtx::new(1_001_000, &mut reqs));
        assert_eq!(a.acknowledge(), Some(0x40)); // in service
        a.deliver(0x61, true); // level-triggered, pending (TMR)
        a.deliver(0x30, false); // blocked behind 0x40
        a.deliver_nmi();
        a.deliver_nmi();
        w(&mut a, 0, 0x310, 3 << 24);
        w(&mut a, 0, 0x300, 0x4_4052); // fixed 0x52 to APIC 3: held
        let mut b = lapic();
        round_trip(&a, &mut b);
        let now = 1_500_000;
        assert_eq!(
            r(&mut b, now, 0x390),
            r(&mut a, now, 0x390),
            "current count"
        );
        assert_eq!(b.next_deadline(), a.next_deadline());
        assert_eq!(b.take_ipis(), a.take_ipis());
        for _ in 0..3 {
            assert_eq!(b.pending(), a.pending());
            assert_eq!(b.take_nmi(), a.take_nmi());
        }
        for _ in 0..3 {
            assert_eq!(b.acknowledge(), a.acknowledge());
            assert_eq!(w(&mut b, now, 0xb0, 0), w(&mut a, now, 0xb0, 0), "EOI");
        }
        let at = a.next_deadline().unwrap();
        b.on_deadline(&mut AccessCtx::new(at, &mut reqs));
        a.on_deadline(&mut AccessCtx::new(at, &mut reqs));
        assert_eq!(b.acknowledge(), a.acknowledge());
        assert_eq!(b.next_deadline(), a.next_deadline());
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x300, 0x8_4050); // to all others: held
        refuses_garbage(&mut a);
        refused_edit(&mut a, &["nmis"], json!(3), "nmis");
        refused_edit(&mut a, &["ipis", "0", "mode"], json!(8), "ipis[0].mode");
        refused_edit(
            &mut a,
            &["ipis", "0", "shorthand"],
            json!(4),
            "ipis[0].shorthand",
        );
        refused_edit(&mut a, &["ipis", "0", "x"], json!(4), "x");
        let many: Vec<SavedState> = vec![a.save()["ipis"][0].clone(); 257];
        refused_edit(&mut a, &["ipis"], json!(many), "ipis");
        refused_edit(&mut a, &["irr"], json!([0, 0, 0]), "irr");
        refused_edit(&mut a, &["svr"], json!(0x2000), "svr");
        refused_edit(&mut a, &["dfr"], json!(0), "dfr");
        refused_edit(&mut a, &["ldr"], json!(1), "ldr");
        refused_edit(&mut a, &["timer_divide"], json!(4), "timer_divide");
        refused_edit(&mut a, &["timer_start"], json!(-5), "timer_start");
        refused_edit(&mut a, &["sipi_vector"], json!(256), "sipi_vector");
        // A running timer's periods delivered lie within simulated time:
        // 1000 counts of 2 ns, 2 us a period.
        w(&mut a, 0, 0x320, 0x2_0030);
        w(&mut a, 0, 0x380, 1000);
        let fits = u64::MAX / 2_000_000 + 1;
        a.restore(&edited(&a, &["timer_fired"], json!(fits)))
            .unwrap();
        assert_eq!(a.next_deadline(), Some(Tick::MAX));
        refused_edit(&mut a, &["timer_fired"], json!(fits + 1), "timer_fired");
        refused_edit(&mut a, &["timer_fired"], json!(u64::MAX), "timer_fired");
    }

    #[test]
    fn self_ipis_and_messages_for_others() {
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x300, 0x4_0050); // fixed, shorthand self, vector 0x50
        assert_eq!(a.acknowledge(), Some(0x50));
        w(&mut a, 0, 0x300, 0x4_0400); // NMI to self
        assert_eq!(a.pending(), Pending::Nmi);
        assert!(a.take_nmi());
        // INIT then SIPI to APIC 1.
        w(&mut a, 0, 0x310, 1 << 24);
        w(&mut a, 0, 0x300, 0x4500);
        w(&mut a, 0, 0x300, 0x4608);
        let ipis = a.take_ipis();
        assert_eq!(ipis.len(), 2);
        assert_eq!((ipis[0].mode, ipis[0].dest), (5, 1));
        assert_eq!((ipis[1].mode, ipis[1].vector), (6, 8));
        assert_eq!(r(&mut a, 0, 0x300) & (1 << 12), 0, "delivery status idle");
        a.deliver_init();
        a.deliver_sipi(0x9a);
        assert_eq!(a.startup_state(), (true, Some(0x9a)));
    }

    #[test]
    fn logical_destinations_lowest_priority_and_init_deassert() {
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        // Flat model: logical ID 0x04.
        w(&mut a, 0, 0xd0, 0x0400_0000);
        assert!(a.accepts(0x0c, true) && !a.accepts(0x03, true));
        // Cluster model: cluster 2, member bit 1.
        w(&mut a, 0, 0xe0, 0x0fff_ffff);
        w(&mut a, 0, 0xd0, 0x2200_0000);
        assert!(a.accepts(0x23, true), "cluster 2, bits 0-1");
        assert!(!a.accepts(0x13, true), "another cluster");
        assert!(!a.accepts(0x21, true), "another member");
        assert!(a.accepts(0xff, true), "broadcast");
        // An INIT level de-assert (level 0, trigger level) goes nowhere.
        w(&mut a, 0, 0x310, 1 << 24);
        w(&mut a, 0, 0x300, 0x8500);
        assert!(a.take_ipis().is_empty());
        // Lowest priority without a shorthand is left to the platform's
        // arbitration, even if this APIC is a candidate.
        w(&mut a, 0, 0x310, 0x23 << 24);
        w(&mut a, 0, 0x300, 0x0940);
        assert_eq!(a.pending(), Pending::None);
        let ipis = a.take_ipis();
        assert_eq!((ipis.len(), ipis[0].mode, ipis[0].vector), (1, 1, 0x40));
        // Deliveries ring the doorbell once.
        assert!(!a.take_doorbell());
        a.deliver(0x50, false);
        assert!(a.take_doorbell() && !a.take_doorbell());
        // INIT resets the APIC but keeps its ID.
        w(&mut a, 0, 0x20, 3 << 24);
        a.init_reset();
        assert_eq!(r(&mut a, 0, 0x20), 3 << 24);
        assert_eq!(r(&mut a, 0, 0xf0), 0xff);
        assert_eq!(a.pending(), Pending::None);
    }

    #[test]
    fn extint_from_the_pic_through_lint0() {
        let pic = Arc::new(Mutex::new(PicPair::new()));
        {
            let mut p = mem::lock(&pic);
            for (port, v) in [
                (0x20u64, 0x11u8),
                (0x21, 0x30),
                (0x21, 0x04),
                (0x21, 0x01),
                (0x21, 0x00),
            ] {
                p.write_port_for_test(port, v);
            }
            use crate::irq::InterruptSink;
            p.set_line(0, true);
        }
        let mut stats = Stats::new();
        let mut a = Lapic::new(0, 1_000_000_000, Some(pic.clone()), &mut stats, "apic").unwrap();
        // Virtual-wire mode works even with the APIC software-disabled.
        assert_eq!(a.pending(), Pending::Maskable);
        assert_eq!(a.acknowledge(), Some(0x30));
        assert_eq!(a.pending(), Pending::None);
        // Masking LINT0 hides the PIC.
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x350, 0x10700);
        mem::lock(&pic).write_port_for_test(0x20, 0x20);
        use crate::irq::InterruptSink;
        mem::lock(&pic).set_line(1, true);
        assert_eq!(a.pending(), Pending::None);
    }

    proptest::proptest! {
        #[test]
        fn any_access_sequence_is_safe(ops in proptest::collection::vec((0u64..0x1000, proptest::prelude::any::<u32>(), 0usize..9, proptest::prelude::any::<bool>(), 0u64..1_000_000_000), 0..100)) {
            let mut a = lapic();
            let mut now = 0;
            let mut reqs = vec![];
            for (off, v, len, wr, dt) in ops {
                now += dt;
                let mut ctx = AccessCtx::new(now, &mut reqs);
                if wr { a.write(Space::Mmio, off, &v.to_le_bytes()[..len.min(4)], &mut ctx); }
                else { let mut d = vec![0u8; len]; a.read(Space::Mmio, off, &mut d, &mut ctx); }
                if let Some(d) = a.next_deadline() { if d <= now { a.on_deadline(&mut AccessCtx::new(now, &mut reqs)); } }
                if a.pending() == Pending::Maskable {
                    let v = a.acknowledge();
                    proptest::prop_assert!(v.is_some_and(|v| v >= 16));
                }
                proptest::prop_assert!(a.ipis.len() <= 256);
            }
        }
    }

    #[test]
    fn disabling_through_apic_base_hides_the_apic_and_enabling_resets_it() {
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x80, 0x20);
        w(&mut a, 0, 0xd0, 0x0100_0000);
        assert_eq!(a.apic_base(), 0xfee0_0900, "enabled, BSP");
        a.deliver(0x41, false);
        a.msr_written(APIC_BASE_MSR, 0xfee0_0100);
        assert!(!a.hw_enabled());
        // No registers: reads are all-ones, writes vanish.
        assert_eq!(r(&mut a, 0, 0x30), 0xffff_ffff);
        w(&mut a, 0, 0x80, 0x30);
        assert_eq!(r(&mut a, 0, 0x80), 0xffff_ffff);
        // Nothing is accepted or delivered; the pending vector is gone.
        assert!(!a.accepts(0, false) && !a.accepts(0x01, true));
        a.deliver(0x42, false);
        assert_eq!(a.pending(), Pending::None);
        // NMIs still reach the CPU.
        a.deliver_nmi();
        assert!(a.take_nmi());
        // Other MSRs are not the APIC's.
        a.msr_written(0x10, 0);
        assert!(!a.hw_enabled());
        // Back on: the power-on state with the same ID.
        a.msr_written(APIC_BASE_MSR, 0xfee0_0900);
        assert!(a.hw_enabled());
        assert_eq!(r(&mut a, 0, 0x30), LAPIC_VERSION);
        assert_eq!(r(&mut a, 0, 0x20), 0);
        assert_eq!(r(&mut a, 0, 0x80), 0, "TPR reset");
        assert_eq!(r(&mut a, 0, 0xd0), 0, "LDR reset");
        assert_eq!(r(&mut a, 0, 0xf0), 0xff, "software-disabled after reset");
        assert_eq!(r(&mut a, 0, 0x200 + 0x20), 0, "IRR empty");
        assert!(a.accepts(0, false));
    }

    #[test]
    fn a_disabled_apic_passes_the_8259_on() {
        use crate::irq::InterruptSink;
        let mut stats = Stats::new();
        let pic = Arc::new(Mutex::new(PicPair::new()));
        {
            let mut p = mem::lock(&pic);
            let mut reqs = vec![];
            // ICW1-4 of the master (vectors 0x30..), then unmask all.
            for (port, v) in [
                (0x20, 0x11),
                (0x21, 0x30),
                (0x21, 0x04),
                (0x21, 0x01),
                (0x21, 0x00),
            ] {
                p.write(Space::Pio, port, &[v], &mut AccessCtx::new(0, &mut reqs));
            }
            p.set_line(1, true);
            assert!(p.intr());
        }
        let mut a = Lapic::new(0, 1_000_000_000, Some(pic), &mut stats, "apic").unwrap();
        w(&mut a, 0, 0xf0, 0x1ff);
        // LINT0 masked: the 8259 is not heard while the APIC is enabled...
        w(&mut a, 0, 0x350, LVT_MASKED);
        assert_eq!(a.pending(), Pending::None);
        // ...but with the APIC off its INTR reaches the CPU directly.
        a.set_apic_base(0xfee0_0100);
        assert_eq!(a.pending(), Pending::Maskable);
        assert_eq!(a.acknowledge(), Some(0x31));
    }

    #[test]
    fn writing_another_base_moves_the_registers_on_the_bus() {
        let mut stats = Stats::new();
        let mut bus = mem::IoBus::new(&mut stats, "iobus").unwrap();
        let a = Arc::new(Mutex::new(lapic()));
        let window = MovableBase::new(LAPIC_BASE);
        a.lock().unwrap().set_window(window.clone());
        bus.insert_banked_movable(
            Space::Mmio,
            LAPIC_BASE,
            LAPIC_SIZE,
            "lapic",
            vec![a.clone() as mem::DeviceHandle],
            vec![window.clone()],
        )
        .unwrap();
        let read = |addr: u64| {
            let mut reqs = vec![];
            let mut d = [0u8; 4];
            bus.read(Space::Mmio, addr, &mut d, &mut AccessCtx::new(0, &mut reqs));
            u32::from_le_bytes(d)
        };
        assert_eq!(read(LAPIC_BASE + 0x30), LAPIC_VERSION);
        // kvm-unit-tests' "relocate apic": disable, then enable elsewhere.
        let moved = 0xfed4_0000;
        a.lock()
            .unwrap()
            .msr_written(APIC_BASE_MSR, LAPIC_BASE | APIC_BASE_BSP);
        a.lock()
            .unwrap()
            .msr_written(APIC_BASE_MSR, moved | APIC_BASE_BSP | APIC_BASE_ENABLE);
        assert_eq!(window.get(), moved);
        assert_eq!(read(moved + 0x30), LAPIC_VERSION, "the registers moved");
        assert_eq!(read(LAPIC_BASE + 0x30), u32::MAX, "nothing left behind");
        // A restored APIC puts its registers where its state says.
        let saved = a.lock().unwrap().save();
        let mut b = lapic();
        let w2 = MovableBase::new(LAPIC_BASE);
        b.set_window(w2.clone());
        b.restore(&saved).unwrap();
        assert_eq!(w2.get(), moved);
        // Moving back.
        a.lock()
            .unwrap()
            .msr_written(APIC_BASE_MSR, LAPIC_BASE | APIC_BASE_BSP | APIC_BASE_ENABLE);
        assert_eq!(read(LAPIC_BASE + 0x30), LAPIC_VERSION);
        assert_eq!(read(moved + 0x30), u32::MAX);
    }

    #[test]
    fn a_physical_ipi_to_its_own_id_also_goes_to_apics_sharing_it() {
        // kvm-unit-tests' "IPI to aliased xAPIC physical IDs": two CPUs
        // given xAPIC ID 0; a fixed IPI to ID 0 from one of them reaches
        // both (the platform routes the other copy by `accepts`).
        let mut stats = Stats::new();
        let mut a = lapic();
        let mut b = Lapic::new(1, 1_000_000_000, None, &mut stats, "apic1").unwrap();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut b, 0, 0xf0, 0x1ff);
        w(&mut b, 0, 0x20, 0);
        assert_eq!(b.id(), 0);
        w(&mut a, 0, 0x310, 0);
        w(&mut a, 0, 0x300, 0xf1);
        assert_eq!(a.acknowledge(), Some(0xf1), "to itself");
        let sent = a.take_ipis();
        assert_eq!(sent.len(), 1, "handed to the platform for the others");
        assert!(b.accepts(sent[0].dest, sent[0].logical));
    }

    #[test]
    fn a_global_re_enable_restores_the_initial_apic_id() {
        // kvm-unit-tests' "correct xapic id after reset".
        let mut stats = Stats::new();
        let mut a = Lapic::new(1, 1_000_000_000, None, &mut stats, "apic1").unwrap();
        w(&mut a, 0, 0x20, 2 << 24);
        assert_eq!(a.id(), 2);
        a.msr_written(APIC_BASE_MSR, LAPIC_BASE);
        assert_eq!(a.id(), 2, "kept while disabled");
        a.msr_written(APIC_BASE_MSR, LAPIC_BASE | APIC_BASE_ENABLE);
        assert_eq!(a.id(), 1);
    }

    #[test]
    fn two_nmis_wait_and_more_collapse() {
        let mut a = lapic();
        for _ in 0..10 {
            a.deliver_nmi();
        }
        assert_eq!(a.pending_nmis(), MAX_PENDING_NMIS);
        assert_eq!(a.nmis_received.get(), 10);
        assert_eq!(a.nmis_collapsed.get(), 8, "all but two merge");
        assert_eq!(a.pending(), Pending::Nmi);
        assert!(a.take_nmi());
        assert_eq!(a.pending(), Pending::Nmi, "the second waits");
        assert!(a.take_nmi());
        assert!(!a.take_nmi());
        assert_eq!(a.nmis_taken.get(), 2);
        assert_eq!(a.pending(), Pending::None);
        // NMI IPIs to self count the same way.
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x300, 0x4_0400);
        w(&mut a, 0, 0x300, 0x4_0400);
        assert_eq!(a.pending_nmis(), 2);
        // INIT forgets them.
        a.init_reset();
        assert_eq!(a.pending(), Pending::None);
    }

    #[test]
    fn the_current_count_moves_with_simulated_time_on_every_read() {
        let mut a = lapic();
        w(&mut a, 0, 0xf0, 0x1ff);
        w(&mut a, 0, 0x3e0, 0xb); // divide by 1: one count per ns at 1 GHz
        w(&mut a, 0, 0x320, 0x10040); // one-shot, masked
        let start = 5 * sim::tick::TICKS_PER_NS;
        w(&mut a, start, 0x380, 1000);
        let mut last = u32::MAX;
        // Every read at a later tick sees a smaller count, in exact steps.
        for ns in [0u64, 1, 2, 7, 100, 999] {
            let c = r(&mut a, start + ns * sim::tick::TICKS_PER_NS, 0x390);
            assert_eq!(c, 1000 - ns as u32, "at {ns} ns");
            assert!(c < last);
            last = c;
        }
        assert_eq!(r(&mut a, start + 1000 * sim::tick::TICKS_PER_NS, 0x390), 0);
        assert_eq!(
            r(&mut a, start + 5000 * sim::tick::TICKS_PER_NS, 0x390),
            0,
            "one-shot stays 0"
        );
        // Periodic: counts down, reloads, counts down again.
        w(&mut a, 0, 0x320, 0x30040);
        w(&mut a, start, 0x380, 100);
        assert_eq!(r(&mut a, start + 30 * sim::tick::TICKS_PER_NS, 0x390), 70);
        assert_eq!(r(&mut a, start + 130 * sim::tick::TICKS_PER_NS, 0x390), 70);
        assert_eq!(r(&mut a, start + 199 * sim::tick::TICKS_PER_NS, 0x390), 1);
        // Divide by 16: a count every 16 ns.
        w(&mut a, 0, 0x3e0, 0x3);
        w(&mut a, start, 0x380, 100);
        assert_eq!(r(&mut a, start + 15 * sim::tick::TICKS_PER_NS, 0x390), 100);
        assert_eq!(r(&mut a, start + 16 * sim::tick::TICKS_PER_NS, 0x390), 99);
    }

    /// An APIC of CPU `id` that offers x2APIC, switched to x2APIC mode
    /// (BSP if id 0) and software-enabled through SVR.
    fn x2apic(id: u8, stats: &mut Stats) -> Lapic {
        let mut a = Lapic::new(id, 1_000_000_000, None, stats, &format!("apic{id}")).unwrap();
        a.offer_x2apic(true);
        let base = a.apic_base();
        assert_eq!(
            a.msr_write(APIC_BASE_MSR, base | APIC_BASE_EXTD, 0, &mut vec![]),
            MsrWrite::ToCpu
        );
        a.msr_written(APIC_BASE_MSR, base | APIC_BASE_EXTD);
        assert!(a.x2apic_mode());
        assert!(a.x2apic_write(0x80f, 0x1ff, 0, &mut vec![]));
        a
    }

    #[test]
    fn x2apic_mode_transitions_follow_the_sdm() {
        let mut a = lapic();
        let base = a.apic_base();
        let (en, extd) = (APIC_BASE_ENABLE, APIC_BASE_EXTD);
        // Not offered: EXTD is refused.
        assert!(!a.apic_base_write_allowed(base | extd));
        assert_eq!(
            a.msr_write(APIC_BASE_MSR, base | extd, 0, &mut vec![]),
            MsrWrite::Fault
        );
        a.offer_x2apic(true);
        let off = base & !(en | extd);
        // xAPIC -> x2APIC is legal; EXTD without EN is not.
        assert!(a.apic_base_write_allowed(base | extd));
        assert!(!a.apic_base_write_allowed(off | extd));
        a.msr_written(APIC_BASE_MSR, base | extd);
        assert!(a.x2apic_mode());
        // x2APIC -> xAPIC directly is #GP (and changes nothing).
        assert_eq!(
            a.msr_write(APIC_BASE_MSR, base, 0, &mut vec![]),
            MsrWrite::Fault
        );
        assert!(a.x2apic_mode());
        assert!(
            !a.apic_base_write_allowed(off | extd),
            "to the invalid state"
        );
        // x2APIC -> disabled is legal, disabled -> x2APIC is not.
        assert!(a.apic_base_write_allowed(off));
        a.msr_written(APIC_BASE_MSR, off);
        assert!(!a.x2apic_mode() && !a.hw_enabled());
        assert!(!a.apic_base_write_allowed(off | en | extd));
        assert!(a.apic_base_write_allowed(off | en));
        a.msr_written(APIC_BASE_MSR, off | en);
        assert!(a.hw_enabled() && !a.x2apic_mode());
        assert_eq!(
            r(&mut a, 0, 0x30),
            LAPIC_VERSION,
            "xAPIC registers are back"
        );
    }

    #[test]
    fn x2apic_registers_are_msrs_and_the_page_is_not_decoded() {
        let mut stats = Stats::new();
        let mut a = x2apic(0x13, &mut stats);
        let rd = |a: &mut Lapic, i: u32| a.x2apic_read(i, 0);
        // ID: the 32-bit x2APIC ID, read-only; LDR derived, read-only.
        assert_eq!(rd(&mut a, 0x802), Some(0x13));
        assert!(!a.x2apic_write(0x802, 0x5, 0, &mut vec![]));
        assert_eq!(rd(&mut a, 0x802), Some(0x13));
        assert_eq!(rd(&mut a, 0x80d), Some((1 << 16) | (1 << 3)));
        assert!(!a.x2apic_write(0x80d, 0, 0, &mut vec![]));
        assert_eq!(rd(&mut a, 0x803), Some(u64::from(LAPIC_VERSION)));
        assert_eq!(rd(&mut a, 0x80f), Some(0x1ff));
        // No DFR, no APR, no ICR high half; EOI and SELF IPI write-only.
        for i in [
            0x80e, 0x809, 0x831, 0x80b, 0x83f, 0x80c, 0x82f, 0x840, 0x8ff,
        ] {
            assert_eq!(rd(&mut a, i), None, "read of {i:#x}");
        }
        assert!(!a.x2apic_write(0x80e, 0xffff_ffff, 0, &mut vec![]), "DFR");
        // Writes of read-only registers, or bits 63-32 outside the ICR.
        for i in [0x803, 0x80a, 0x810, 0x818, 0x820, 0x839] {
            assert!(!a.x2apic_write(i, 0, 0, &mut vec![]), "write of {i:#x}");
        }
        assert!(!a.x2apic_write(0x808, 1 << 32, 0, &mut vec![]));
        // TPR works through its MSR.
        assert!(a.x2apic_write(0x808, 0x20, 0, &mut vec![]));
        assert_eq!(rd(&mut a, 0x808), Some(0x20));
        // The MMIO page is not decoded.
        assert_eq!(r(&mut a, 0, 0x30), 0xffff_ffff);
        w(&mut a, 0, 0x80, 0x40);
        assert_eq!(rd(&mut a, 0x808), Some(0x20));
        // Not in x2APIC mode: every MSR access is #GP.
        let mut b = lapic();
        b.offer_x2apic(true);
        assert_eq!(b.x2apic_read(0x802, 0), None);
        assert!(!b.x2apic_write(0x808, 0, 0, &mut vec![]));
        assert_eq!(b.msr_read(0x803, 0), None);
    }

    #[test]
    fn x2apic_eoi_self_ipi_and_the_64_bit_icr() {
        let mut stats = Stats::new();
        let mut a = x2apic(2, &mut stats);
        // SELF IPI: a fixed interrupt to itself.
        assert!(a.x2apic_write(0x83f, 0x61, 0, &mut vec![]));
        assert_eq!(a.acknowledge(), Some(0x61));
        // EOI with a non-zero value is #GP and ends nothing.
        assert!(!a.x2apic_write(0x80b, 1, 0, &mut vec![]));
        assert_eq!(a.x2apic_read(0x810 + 3, 0), Some(1 << 1), "0x61 in service");
        assert!(a.x2apic_write(0x80b, 0, 0, &mut vec![]));
        assert_eq!(a.x2apic_read(0x813, 0), Some(0));
        // A level-triggered vector's EOI reaches the I/O APIC.
        a.deliver(0x72, true);
        assert_eq!(a.acknowledge(), Some(0x72));
        let mut reqs = vec![];
        assert_eq!(
            a.msr_write(0x80b, 0, 0, &mut reqs),
            MsrWrite::Done {
                latency: LAPIC_LATENCY
            }
        );
        assert_eq!(reqs, vec![Request::Eoi { vector: 0x72 }]);
        // ICR: one 64-bit write with a 32-bit destination.
        let icr = (0x0001_0004u64 << 32) | 0x0840; // logical, cluster 1 bit 2
        assert!(a.x2apic_write(0x830, icr, 0, &mut vec![]));
        assert_eq!(a.x2apic_read(0x830, 0), Some(icr));
        let ipis = a.take_ipis();
        assert_eq!(ipis.len(), 1);
        assert_eq!(
            (ipis[0].dest, ipis[0].logical, ipis[0].vector),
            (0x0001_0004, true, 0x40)
        );
        // Reserved ICR bits (13, 16-17, 20-31) are #GP and send nothing.
        for bit in [13, 16, 17, 20, 31] {
            assert!(
                !a.x2apic_write(0x830, 0x40 | (1 << bit), 0, &mut vec![]),
                "bit {bit}"
            );
        }
        assert!(a.take_ipis().is_empty());
        // Physical 0xFFFFFFFF with the all-but-self shorthand absent: a
        // broadcast that includes this APIC.
        assert!(a.x2apic_write(0x830, (0xffff_ffffu64 << 32) | 0x45, 0, &mut vec![]));
        assert_eq!(a.acknowledge(), Some(0x45));
        assert_eq!(a.take_ipis()[0].dest, X2APIC_BROADCAST);
    }

    #[test]
    fn x2apic_logical_destinations_name_clusters_of_sixteen() {
        let mut stats = Stats::new();
        let apics: Vec<Lapic> = (0..4).map(|i| x2apic(i, &mut stats)).collect();
        // kvm-unit-tests' ioapic logical test: 0xd names IDs 0, 2 and 3.
        let got: Vec<bool> = apics.iter().map(|a| a.accepts(0xd, true)).collect();
        assert_eq!(got, vec![true, false, true, true]);
        // Another cluster names nobody here; the broadcast names all.
        assert!(apics.iter().all(|a| !a.accepts(0x1_000f, true)));
        assert!(apics.iter().all(|a| a.accepts(X2APIC_BROADCAST, true)));
        assert!(apics.iter().all(|a| a.accepts(X2APIC_BROADCAST, false)));
        // 0xFF is no broadcast for an x2APIC IPI: physical ID 0xff only.
        assert!(apics.iter().all(|a| !a.accepts(0xff, false)));
        // From the I/O APIC (8 bits): 0xFF is the broadcast, logical 0xd
        // is cluster 0's bits 0, 2 and 3.
        assert!(apics.iter().all(|a| a.accepts_from_ioapic(0xff, false)));
        let got: Vec<bool> = apics
            .iter()
            .map(|a| a.accepts_from_ioapic(0xd, true))
            .collect();
        assert_eq!(got, vec![true, false, true, true]);
        assert!(apics[3].accepts_from_ioapic(3, false) && !apics[2].accepts_from_ioapic(3, false));
        // A mixed system: an xAPIC APIC takes 8-bit destinations only.
        let mut x = Lapic::new(4, 1_000_000_000, None, &mut stats, "x").unwrap();
        w(&mut x, 0, 0xf0, 0x1ff);
        assert!(x.accepts(4, false) && x.accepts(0xff, false));
        assert!(!x.accepts(X2APIC_BROADCAST, false));
        assert!(!x.accepts(0x104, false));
    }

    #[test]
    fn x2apic_state_is_saved_and_refused_where_not_offered() {
        use crate::state::tests::*;
        use serde_json::json;
        let mut stats = Stats::new();
        let mut a = x2apic(1, &mut stats);
        assert!(a.x2apic_write(0x808, 0x30, 0, &mut vec![]));
        let saved = a.save();
        let mut b = Lapic::new(1, 1_000_000_000, None, &mut stats, "b").unwrap();
        b.offer_x2apic(true);
        b.restore(&saved).unwrap();
        assert!(b.x2apic_mode());
        assert_eq!(b.x2apic_read(0x808, 0), Some(0x30));
        // Restored into a system without x2APIC: refused, naming the field.
        let mut c = Lapic::new(1, 1_000_000_000, None, &mut stats, "c").unwrap();
        let e = c.restore(&saved).unwrap_err().to_string();
        assert!(e.contains("apic_base") && e.contains("x2apic"), "{e}");
        // EXTD without EN is no state an APIC can be in.
        let mut d = Lapic::new(1, 1_000_000_000, None, &mut stats, "d").unwrap();
        d.offer_x2apic(true);
        refused_edit(&mut d, &["apic_base"], json!(0xfee0_0400u64), "apic_base");
        // A checkpoint from before 32-bit destinations restores.
        let mut e2 = lapic();
        w(&mut e2, 0, 0xf0, 0x1ff);
        w(&mut e2, 0, 0x310, 3 << 24);
        w(&mut e2, 0, 0x300, 0x4500);
        let old = e2.save();
        assert_eq!(old["ipis"][0]["dest"], json!(3));
        lapic().restore(&old).unwrap();
    }
}
