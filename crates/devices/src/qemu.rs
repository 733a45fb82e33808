//! QEMU's test devices, as a compatibility layer for kernels written for
//! QEMU (Multiboot test kernels, kvm-unit-tests). They are QEMU's ABI, not
//! kvmsim's own (kvmsim's guest interface is sim-ops): each sits behind a
//! config switch (`system.qemu`) that is on for Multiboot kernels.
//!
//! * [`DebugExit`] (`isa-debug-exit`, ports 0xf4-0xf7): a write of v ends
//!   the run with status `v * 2 + 1`, as QEMU ends its process.
//! * [`TestDev`] (`pc-testdev`): 0xe0-0xe3 a scratch register, 0xe4-0xe7
//!   QEMU's page flush, 0x2000 + n the level of interrupt line n.
//! * [`FwCfg`] (`fw_cfg`, ports 0x510/0x511): the selector and the data
//!   port of QEMU's firmware configuration, with the signature, the ID,
//!   the RAM size, the CPU counts and an empty file directory.

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space};
use serde::{Deserialize, Serialize};
use sim::{Counter, Request, Stats, Tick};

use crate::irq::IrqLine;
use crate::state::check;
use crate::{le_value, put_le_value};

/// The latency of every access to these devices.
pub const QEMU_DEV_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;

/// isa-debug-exit's ports (kvm-unit-tests: `iobase=0xf4,iosize=0x4`).
pub const DEBUG_EXIT_BASE: u64 = 0xf4;
pub const DEBUG_EXIT_SIZE: u64 = 4;

/// The status QEMU exits with after the guest wrote `value` to
/// isa-debug-exit: `(value << 1) | 1` (the process status keeps its low 8
/// bits, so it is never 0).
pub fn debug_exit_status(value: u64) -> i64 {
    ((value << 1) | 1) as i64
}

/// QEMU's `isa-debug-exit`: any write ends the run (a
/// [`Request::DebugExit`]); reads return 0.
pub struct DebugExit {
    writes: Counter,
}

impl DebugExit {
    pub fn new(stats: &mut Stats, prefix: &str) -> Result<Self, sim::stats::StatsError> {
        Ok(DebugExit {
            writes: stats.counter(
                &format!("{prefix}.writes"),
                "Writes to isa-debug-exit (each ends the run)",
                "Count",
            )?,
        })
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _: Space, _: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        data.fill(0);
        QEMU_DEV_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        // QEMU takes the value written whatever the port within the range.
        let _ = offset;
        self.writes.inc();
        ctx.requests.push(Request::DebugExit {
            value: le_value(&data[..data.len().min(4)]),
        });
        QEMU_DEV_LATENCY
    }

    /// No state: a write ends the run at once.
    fn save(&self) -> SavedState {
        SavedState::Null
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        mem::null_state(state)
    }
}

/// pc-testdev's ports.
pub const TESTDEV_BASE: u64 = 0xe0;
/// 0xe0 scratch (4 bytes) and 0xe4 page flush (4 bytes).
pub const TESTDEV_SIZE: u64 = 8;
/// The interrupt-line ports: 0x2000 + n.
pub const TESTDEV_IRQ_BASE: u64 = 0x2000;
/// As many ports as QEMU's device has (one per I/O APIC input).
pub const TESTDEV_IRQ_PORTS: u64 = 24;

/// QEMU's `pc-testdev`. The scratch register keeps the last value written
/// (zero-extended from the access size, whatever the port within it, as
/// QEMU does) and returns it truncated to the read's size. A write to the
/// page-flush port names a guest page that QEMU remaps to exercise KVM's
/// MMU notifiers; kvmsim never remaps guest RAM under a running guest, so
/// there is nothing to flush: the write is counted and the page keeps its
/// contents, which is what the guest checks. A write of v to 0x2000 + n
/// drives interrupt line n to level v != 0; lines beyond those the device
/// was given (the I/O APIC's inputs) are ignored and counted.
pub struct TestDev {
    scratch: u64,
    lines: Vec<IrqLine>,
    /// Which of `lines` the device drives high.
    levels: Vec<bool>,
    flushes: Counter,
    irq_writes: Counter,
    ignored: Counter,
}

impl TestDev {
    /// A test device driving `lines` (index n: the line of port 0x2000 + n).
    pub fn new(
        lines: Vec<IrqLine>,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        let n = lines.len();
        Ok(TestDev {
            scratch: 0,
            lines,
            levels: vec![false; n],
            flushes: stats.counter(
                &format!("{prefix}.pageFlushes"),
                "Writes to the page-flush port 0xe4 (nothing to flush in kvmsim)",
                "Count",
            )?,
            irq_writes: stats.counter(
                &format!("{prefix}.irqWrites"),
                "Writes to the interrupt-line ports 0x2000 + n",
                "Count",
            )?,
            ignored: stats.counter(
                &format!("{prefix}.irqIgnored"),
                "Writes to interrupt-line ports with no line behind them",
                "Count",
            )?,
        })
    }

    /// The level the device drives on line `n`.
    pub fn level(&self, n: usize) -> bool {
        self.levels.get(n).copied().unwrap_or(false)
    }

    /// The scratch register.
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// A write to interrupt port `n` (offset from [`TESTDEV_IRQ_BASE`]).
    fn set_irq(&mut self, n: u64, value: u64) {
        self.irq_writes.inc();
        let Some(line) = usize::try_from(n).ok().and_then(|i| self.lines.get(i)) else {
            self.ignored.inc();
            return;
        };
        let level = value != 0;
        line.set(level);
        self.levels[n as usize] = level;
    }
}

/// pc-testdev's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestDevState {
    /// The scratch register (32 bits).
    pub scratch: u64,
    /// The level driven on each line (one per line the device has).
    pub levels: Vec<bool>,
}

/// fw_cfg's saved state: the selected key and the read position in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FwCfgState {
    pub key: u16,
    pub pos: usize,
}

/// Offsets at and above this select the interrupt ports (the platform
/// maps 0x2000.. with this added, see [`mem::Rebased`]).
pub const TESTDEV_IRQ_OFFSET: u64 = 0x1000;

impl BusDevice for TestDev {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        if offset < 4 {
            put_le_value(data, self.scratch);
        } else {
            data.fill(0);
        }
        QEMU_DEV_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], _: &mut AccessCtx) -> Tick {
        let value = le_value(&data[..data.len().min(4)]);
        match offset {
            0..=3 => self.scratch = value,
            4..=7 => self.flushes.inc(),
            o if o >= TESTDEV_IRQ_OFFSET => {
                // A wider write reaches consecutive ports, one byte each.
                for (i, &b) in data.iter().enumerate() {
                    self.set_irq(o - TESTDEV_IRQ_OFFSET + i as u64, u64::from(b));
                }
            }
            _ => {}
        }
        QEMU_DEV_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&TestDevState {
            scratch: self.scratch,
            levels: self.levels.clone(),
        })
    }

    /// The levels are what the device drives; the controllers behind the
    /// lines restore their own view of them.
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: TestDevState = crate::state::parse(state)?;
        check(
            s.scratch <= u64::from(u32::MAX),
            "scratch",
            format_args!("{:#x} does not fit the 32-bit register", s.scratch),
        )?;
        check(
            s.levels.len() == self.lines.len(),
            "levels",
            format_args!("{} levels for {} lines", s.levels.len(), self.lines.len()),
        )?;
        self.scratch = s.scratch;
        self.levels = s.levels;
        Ok(())
    }
}

/// fw_cfg's selector port; the data port follows it.
pub const FW_CFG_BASE: u64 = 0x510;
pub const FW_CFG_SIZE: u64 = 2;

/// fw_cfg keys kvmsim answers.
pub const FW_CFG_SIGNATURE: u16 = 0x00;
pub const FW_CFG_ID: u16 = 0x01;
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
pub const FW_CFG_NB_CPUS: u16 = 0x05;
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
pub const FW_CFG_FILE_DIR: u16 = 0x19;

/// A minimal fw_cfg (the traditional port interface, no DMA): write a key
/// (16 bits) to 0x510, read its bytes one after the other from 0x511
/// (0 past the end; a wider read takes that many bytes). Keys: 0x00
/// "QEMU", 0x01 the interface ID (1: traditional, no DMA), 0x03 the RAM
/// size (u64), 0x05 and 0x0f the CPU count (u16), 0x19 an empty file
/// directory (a big-endian count of 0). Other keys read as 0, as an
/// unknown key does in QEMU.
pub struct FwCfg {
    ram_size: u64,
    cpus: u16,
    key: u16,
    pos: usize,
    reads: Counter,
}

impl FwCfg {
    pub fn new(
        ram_size: u64,
        cpus: u16,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        Ok(FwCfg {
            ram_size,
            cpus,
            key: 0,
            pos: 0,
            reads: stats.counter(
                &format!("{prefix}.dataReads"),
                "Bytes read from the fw_cfg data port",
                "Count",
            )?,
        })
    }

    /// The contents of the selected item.
    fn item(&self) -> Vec<u8> {
        match self.key {
            FW_CFG_SIGNATURE => b"QEMU".to_vec(),
            FW_CFG_ID => 1u32.to_le_bytes().to_vec(),
            FW_CFG_RAM_SIZE => self.ram_size.to_le_bytes().to_vec(),
            FW_CFG_NB_CPUS | FW_CFG_MAX_CPUS => self.cpus.to_le_bytes().to_vec(),
            FW_CFG_FILE_DIR => 0u32.to_be_bytes().to_vec(),
            _ => Vec::new(),
        }
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        if offset == 0 {
            data.fill(0);
            return QEMU_DEV_LATENCY;
        }
        let item = self.item();
        for b in data.iter_mut() {
            *b = item.get(self.pos).copied().unwrap_or(0);
            self.pos = self.pos.saturating_add(1).min(item.len());
            self.reads.inc();
        }
        QEMU_DEV_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, data: &[u8], _: &mut AccessCtx) -> Tick {
        if offset == 0 {
            self.key = le_value(&data[..data.len().min(2)]) as u16;
            self.pos = 0;
        }
        QEMU_DEV_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&FwCfgState {
            key: self.key,
            pos: self.pos,
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: FwCfgState = crate::state::parse(state)?;
        let (key, pos) = (self.key, self.pos);
        self.key = s.key;
        let len = self.item().len();
        if s.pos > len {
            self.key = key;
            self.pos = pos;
            return check(
                false,
                "pos",
                format_args!(
                    "{} is past the end of item {:#x} ({len} bytes)",
                    s.pos, s.key
                ),
            );
        }
        self.pos = s.pos;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::tests::Recorder;
    use crate::irq::InterruptSink;
    use std::sync::{Arc, Mutex};

    fn rd(d: &mut dyn BusDevice, off: u64, n: usize) -> u64 {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        let mut b = vec![0u8; n];
        d.read(Space::Pio, off, &mut b, &mut ctx);
        le_value(&b)
    }

    fn wr(d: &mut dyn BusDevice, off: u64, v: u64, n: usize) -> Vec<Request> {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        d.write(Space::Pio, off, &v.to_le_bytes()[..n], &mut ctx);
        reqs
    }

    #[test]
    fn debug_exit_asks_for_qemus_status() {
        let mut stats = Stats::new();
        let mut d = DebugExit::new(&mut stats, "dx").unwrap();
        assert_eq!(wr(&mut d, 0, 0, 4), vec![Request::DebugExit { value: 0 }]);
        assert_eq!(
            wr(&mut d, 0, 0x12, 1),
            vec![Request::DebugExit { value: 0x12 }]
        );
        assert_eq!(rd(&mut d, 2, 2), 0);
        assert_eq!(debug_exit_status(0), 1);
        assert_eq!(debug_exit_status(0x12), 0x25);
        assert_eq!(debug_exit_status(0x7f), 0xff);
        assert_eq!(stats.dump(0).get("dx.writes").unwrap().as_f64(), 2.0);
    }

    #[test]
    fn testdev_scratch_flush_and_lines() {
        let mut stats = Stats::new();
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let lines: Vec<IrqLine> = (0..24)
            .map(|n| IrqLine::none().to(rec.clone() as Arc<Mutex<dyn InterruptSink>>, n))
            .collect();
        let mut t = TestDev::new(lines, &mut stats, "td").unwrap();
        wr(&mut t, 0, 0xdead_beef, 4);
        assert_eq!(rd(&mut t, 0, 4), 0xdead_beef);
        assert_eq!(rd(&mut t, 0, 1), 0xef);
        wr(&mut t, 0, 0x12, 1);
        assert_eq!(
            rd(&mut t, 0, 4),
            0x12,
            "QEMU keeps the value written, zero-extended"
        );
        wr(&mut t, 4, 0x20_0000, 4);
        assert_eq!(rd(&mut t, 0, 4), 0x12, "a flush leaves the scratch alone");
        wr(&mut t, TESTDEV_IRQ_OFFSET + 14, 1, 1);
        assert!(t.level(14));
        wr(&mut t, TESTDEV_IRQ_OFFSET + 14, 0, 1);
        wr(&mut t, TESTDEV_IRQ_OFFSET + 23, 1, 1);
        wr(&mut t, TESTDEV_IRQ_OFFSET + 24, 1, 1); // no line 24
        assert_eq!(
            rec.lock().unwrap().0,
            vec![(14, true), (14, false), (23, true)]
        );
        assert!(!t.level(24));
        let d = stats.dump(0);
        assert_eq!(d.get("td.pageFlushes").unwrap().as_f64(), 1.0);
        assert_eq!(d.get("td.irqWrites").unwrap().as_f64(), 4.0);
        assert_eq!(d.get("td.irqIgnored").unwrap().as_f64(), 1.0);
    }

    #[test]
    fn fw_cfg_answers_the_keys_kvm_unit_tests_reads() {
        let mut stats = Stats::new();
        let mut f = FwCfg::new(256 << 20, 4, &mut stats, "fw").unwrap();
        let read_item = |f: &mut FwCfg, key: u16, n: usize| {
            wr(f, 0, u64::from(key), 2);
            (0..n).map(|_| rd(f, 1, 1) as u8).collect::<Vec<u8>>()
        };
        assert_eq!(read_item(&mut f, FW_CFG_SIGNATURE, 5), b"QEMU\0");
        assert_eq!(read_item(&mut f, FW_CFG_NB_CPUS, 2), vec![4, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_MAX_CPUS, 2), vec![4, 0]);
        let ram = read_item(&mut f, FW_CFG_RAM_SIZE, 8);
        assert_eq!(u64::from_le_bytes(ram.try_into().unwrap()), 256 << 20);
        assert_eq!(
            read_item(&mut f, 0x11, 8),
            vec![0; 8],
            "unknown keys read as 0"
        );
        assert_eq!(read_item(&mut f, FW_CFG_ID, 4), vec![1, 0, 0, 0]);
        // Selecting again restarts the item; a wide read takes several bytes.
        wr(&mut f, 0, u64::from(FW_CFG_SIGNATURE), 2);
        assert_eq!(rd(&mut f, 1, 4), u64::from(u32::from_le_bytes(*b"QEMU")));
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let mut stats = Stats::new();
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let lines = |rec: &Arc<Mutex<Recorder>>| -> Vec<IrqLine> {
            (0..24)
                .map(|n| IrqLine::none().to(rec.clone() as Arc<Mutex<dyn InterruptSink>>, n))
                .collect()
        };
        let mut t = TestDev::new(lines(&rec), &mut stats, "td").unwrap();
        wr(&mut t, 0, 0xcafe, 4);
        wr(&mut t, TESTDEV_IRQ_OFFSET + 11, 1, 1);
        let rec2 = Arc::new(Mutex::new(Recorder::default()));
        let mut u = TestDev::new(lines(&rec2), &mut stats, "tu").unwrap();
        round_trip(&t, &mut u);
        assert!(
            rec2.lock().unwrap().0.is_empty(),
            "a restore drives no line"
        );
        assert_eq!(rd(&mut u, 0, 4), rd(&mut t, 0, 4));
        assert_eq!((u.level(11), u.level(10)), (true, false));

        let mut f = FwCfg::new(256 << 20, 4, &mut stats, "fw").unwrap();
        wr(&mut f, 0, u64::from(FW_CFG_SIGNATURE), 2);
        rd(&mut f, 1, 2);
        let mut g = FwCfg::new(256 << 20, 4, &mut stats, "fg").unwrap();
        round_trip(&f, &mut g);
        for _ in 0..3 {
            assert_eq!(rd(&mut g, 1, 1), rd(&mut f, 1, 1));
        }

        let mut d = DebugExit::new(&mut stats, "dx").unwrap();
        let mut e = DebugExit::new(&mut stats, "dy").unwrap();
        round_trip(&d, &mut e);
        assert_eq!(wr(&mut e, 0, 3, 1), wr(&mut d, 0, 3, 1));
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let mut stats = Stats::new();
        let lines: Vec<IrqLine> = (0..4).map(|_| IrqLine::none()).collect();
        let mut t = TestDev::new(lines, &mut stats, "td").unwrap();
        refuses_garbage(&mut t);
        refused_edit(&mut t, &["levels"], json!(vec![true; 3]), "levels");
        refused_edit(&mut t, &["levels"], json!(vec![true; 25]), "levels");
        refused_edit(&mut t, &["scratch"], json!(1u64 << 32), "scratch");
        let mut f = FwCfg::new(1 << 20, 1, &mut stats, "fw").unwrap();
        refuses_garbage(&mut f);
        refused(&mut f, json!({"key": FW_CFG_SIGNATURE, "pos": 5}), "pos");
        refused(&mut f, json!({"key": 0x11, "pos": 1}), "pos");
        refused(&mut f, json!({"key": 65536, "pos": 0}), "key");
        f.restore(&json!({"key": FW_CFG_SIGNATURE, "pos": 4}))
            .unwrap();
        let mut d = DebugExit::new(&mut stats, "dx").unwrap();
        refused(&mut d, json!({}), "");
    }

    proptest::proptest! {
        #[test]
        fn any_access_sequence_is_safe(ops in proptest::collection::vec((0u64..0x1020, 1usize..=8, proptest::prelude::any::<u64>(), proptest::prelude::any::<bool>()), 0..200)) {
            let mut stats = Stats::new();
            let rec = Arc::new(Mutex::new(Recorder::default()));
            let lines: Vec<IrqLine> = (0..24).map(|n| IrqLine::none().to(rec.clone() as Arc<Mutex<dyn InterruptSink>>, n)).collect();
            let mut t = TestDev::new(lines, &mut stats, "td").unwrap();
            let mut f = FwCfg::new(1 << 30, 2, &mut stats, "fw").unwrap();
            let mut d = DebugExit::new(&mut stats, "dx").unwrap();
            for (off, n, v, w) in ops {
                let devs: [&mut dyn BusDevice; 3] = [&mut t, &mut f, &mut d];
                for dev in devs {
                    if w {
                        let reqs = wr(dev, off, v, n);
                        proptest::prop_assert!(reqs.len() <= 1);
                    } else {
                        rd(dev, off, n);
                    }
                }
            }
            proptest::prop_assert!(rec.lock().unwrap().0.iter().all(|&(l, _)| l < 24));
        }
    }
}
