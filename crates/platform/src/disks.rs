//! Disks: virtio-mmio block devices on the PC platform, one per
//! `[[system.disk]]` entry.
//!
//! Disk `i` has its register window at [`VIRTIO_MMIO_BASE`] + `i` * 4 KiB
//! and its interrupt on I/O APIC pin (GSI) 16 + `i` (edge-triggered, active
//! high; pins 16-23 have no ISA device), and appears in the DSDT as a
//! `LNRO0005` device (Linux's virtio_mmio driver binds to it through ACPI).
//! The layout depends only on the number of disks, so the firmware tables
//! are written before the devices exist.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::ioapic::IoApic;
use devices::irq::IrqLine;
use devices::virtio::blk::{BlkTiming, Block};
use devices::virtio::{VirtioMmio, VIRTIO_MMIO_SIZE};
use mem::{GuestRam, IoBus, Space, TimedHandle};
use sim::Stats;

use crate::config::{DiskConfig, SystemConfig};
use crate::PlatformError;

/// Base of the first virtio-mmio window (in the device hole below 4 GiB).
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// Distance between two devices' windows.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// GSI of the first device.
pub const VIRTIO_FIRST_GSI: u32 = 16;

/// Where a virtio-mmio device lives, for the firmware tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The windows and interrupts of `n` disks.
pub fn layout(n: usize) -> Vec<MmioDevice> {
    (0..n)
        .map(|i| MmioDevice {
            base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_STRIDE,
            size: VIRTIO_MMIO_SIZE,
            gsi: VIRTIO_FIRST_GSI + i as u32,
        })
        .collect()
}

/// The resources of the PC platform that a virtio-mmio device is wired to.
pub struct VirtioBoard<'a> {
    pub ram: &'a GuestRam,
    pub ioapic: &'a Arc<Mutex<IoApic>>,
    pub bus: &'a mut IoBus,
    pub stats: &'a mut Stats,
    pub timed: &'a mut Vec<TimedHandle>,
}

impl VirtioBoard<'_> {
    /// Puts `dev` behind a virtio-mmio transport at `at` on the bus as
    /// `name` (interrupting on `at.gsi`, statistics under `prefix`), and
    /// on the list of timed devices; returns the transport.
    pub fn attach<D: devices::virtio::VirtioDevice + 'static>(
        &mut self,
        dev: D,
        at: MmioDevice,
        name: &str,
        prefix: &str,
    ) -> Result<Arc<Mutex<VirtioMmio<D>>>, PlatformError> {
        let line = IrqLine::none().to(self.ioapic.clone(), at.gsi);
        let dev = Arc::new(Mutex::new(VirtioMmio::new(
            dev,
            self.ram.memory().clone(),
            line,
            self.stats,
            prefix,
        )?));
        self.bus
            .insert(Space::Mmio, at.base, at.size, name, dev.clone())?;
        self.timed.push(dev.clone());
        Ok(dev)
    }
}

fn disk_error(field: &str, e: devices::disk::DiskError) -> PlatformError {
    PlatformError::Setup(format!("{field}: {e}"))
}

/// Checks every disk's image (and overlay path) of system `name` before
/// anything is built; the error names the config field and the file.
pub fn check(name: &str, sc: &SystemConfig) -> Result<(), PlatformError> {
    for (i, d) in sc.disk.iter().enumerate() {
        devices::disk::check(Path::new(&d.path), &d.mode())
            .map_err(|e| disk_error(&format!("{name}.disk[{i}]"), e))?;
    }
    Ok(())
}

/// Opens the disks of `sc` and puts their devices on `bus`, interrupting
/// through `ioapic`; statistics under `{name}.disk{i}`. (Overlay files are
/// created at the guest's first write.)
pub fn attach(
    name: &str,
    disks: &[DiskConfig],
    ram: &GuestRam,
    ioapic: &Arc<Mutex<IoApic>>,
    bus: &mut IoBus,
    stats: &mut Stats,
    timed: &mut Vec<TimedHandle>,
) -> Result<(), PlatformError> {
    let mut opened = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let disk = devices::disk::open(Path::new(&d.path), &d.mode())
            .map_err(|e| disk_error(&format!("{name}.disk[{i}]"), e))?;
        opened.push(disk);
    }
    let mut board = VirtioBoard {
        ram,
        ioapic,
        bus,
        stats,
        timed,
    };
    for ((i, (d, disk)), at) in disks
        .iter()
        .zip(opened)
        .enumerate()
        .zip(layout(disks.len()))
    {
        let prefix = format!("{name}.disk{i}");
        let blk = Block::new(
            disk,
            BlkTiming {
                latency: d.latency.0,
                bandwidth: d.bandwidth.0,
            },
            &format!("kvmsim-disk{i}"),
            board.stats,
            &prefix,
        )?;
        board.attach(blk, at, &format!("disk{i}"), &prefix)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_uses_free_pins_and_windows() {
        let l = layout(crate::config::MAX_DISKS);
        assert_eq!(l[0].base, 0xD000_0000);
        assert_eq!(l[7].gsi, 23, "the I/O APIC's last pin");
        assert!(l
            .iter()
            .all(|d| (d.gsi as usize) < devices::ioapic::IOAPIC_PINS));
        assert!(l.windows(2).all(|w| w[0].base + w[0].size <= w[1].base));
        assert!(l.iter().all(|d| d.base >= mem::ram::MMIO_HOLE_START
            && d.base + d.size <= devices::ioapic::IOAPIC_BASE));
    }
}
