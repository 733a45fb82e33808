//! Wires QEMU's test devices ([`devices::qemu`]) into a system, each
//! behind its `system.qemu` switch. A compatibility layer for kernels
//! written for QEMU (kvm-unit-tests, Multiboot test kernels); not part of
//! kvmsim's own guest interface.

use std::sync::{Arc, Mutex};

use devices::ioapic::{IoApic, IOAPIC_PINS};
use devices::irq::IrqLine;
use devices::qemu::{
    DebugExit, FwCfg, TestDev, DEBUG_EXIT_BASE, DEBUG_EXIT_SIZE, FW_CFG_BASE, FW_CFG_SIZE,
    TESTDEV_BASE, TESTDEV_IRQ_BASE, TESTDEV_IRQ_OFFSET, TESTDEV_IRQ_PORTS, TESTDEV_SIZE,
};
use mem::{IoBus, Rebased, Space};
use sim::Stats;

use crate::config::SystemConfig;
use crate::PlatformError;

/// The interrupt lines pc-testdev drives: ISA IRQs 0-15 as the PC wires
/// them (8259 pair and I/O APIC; IRQ0 reaches pin 2, as in QEMU), then
/// I/O APIC pins 16 up to its last. Empty without an I/O APIC.
fn testdev_lines(isa: Option<&[IrqLine]>, ioapic: Option<&Arc<Mutex<IoApic>>>) -> Vec<IrqLine> {
    let (Some(isa), Some(ioapic)) = (isa, ioapic) else {
        return Vec::new();
    };
    let mut lines: Vec<IrqLine> = isa.to_vec();
    for pin in lines.len()..IOAPIC_PINS {
        lines.push(IrqLine::none().to(ioapic.clone(), pin as u32));
    }
    lines.truncate(IOAPIC_PINS);
    lines
}

/// Attaches the devices `sc.qemu` switches on (unset switches take
/// `default`, on for a Multiboot kernel; the values used are written back
/// so that config.json shows them).
pub fn attach(
    name: &str,
    sc: &mut SystemConfig,
    default: bool,
    bus: &mut IoBus,
    stats: &mut Stats,
    isa: Option<&[IrqLine]>,
    ioapic: Option<&Arc<Mutex<IoApic>>>,
) -> Result<(), PlatformError> {
    sc.qemu.resolve(default);
    if sc.qemu.debug_exit == Some(true) {
        let d = DebugExit::new(stats, &format!("{name}.debugexit"))?;
        bus.insert(
            Space::Pio,
            DEBUG_EXIT_BASE,
            DEBUG_EXIT_SIZE,
            "isa-debug-exit",
            Arc::new(Mutex::new(d)),
        )?;
    }
    if sc.qemu.testdev == Some(true) {
        let lines = testdev_lines(isa, ioapic);
        if lines.is_empty() {
            tracing::warn!(
                "{name}: pc-testdev's interrupt ports drive nothing without an I/O APIC \
                 (system.platform = \"pc\")"
            );
        }
        let t: mem::DeviceHandle = Arc::new(Mutex::new(TestDev::new(
            lines,
            stats,
            &format!("{name}.testdev"),
        )?));
        bus.insert(
            Space::Pio,
            TESTDEV_BASE,
            TESTDEV_SIZE,
            "pc-testdev",
            t.clone(),
        )?;
        bus.insert(
            Space::Pio,
            TESTDEV_IRQ_BASE,
            TESTDEV_IRQ_PORTS,
            "pc-testdev-irq",
            Arc::new(Mutex::new(Rebased {
                dev: t,
                add: TESTDEV_IRQ_OFFSET,
            })),
        )?;
    }
    if sc.qemu.fw_cfg == Some(true) {
        let f = FwCfg::new(
            sc.memory.0,
            sc.cpus.min(u32::from(u16::MAX)) as u16,
            stats,
            &format!("{name}.fwcfg"),
        )?;
        bus.insert(
            Space::Pio,
            FW_CFG_BASE,
            FW_CFG_SIZE,
            "fw_cfg",
            Arc::new(Mutex::new(f)),
        )?;
    }
    Ok(())
}
