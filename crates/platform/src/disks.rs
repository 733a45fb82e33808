//! Disks: virtio-mmio block devices on the PC platform, one per
//! `[[system.disk]]` entry.
//!
//! Disk `i` has its register window at [`VIRTIO_MMIO_BASE`] + `i` * 4 KiB
//! and its interrupt on I/O APIC pin (GSI) 16 + `i` (edge-triggered, active
//! high; pins 16-23 have no ISA device), and appears in the DSDT as a
//! `LNRO0005` device (Linux's virtio_mmio driver binds to it through ACPI).
//! The layout depends only on the number of disks, so the firmware tables
//! are written before the devices exist.
//!
//! Checkpoints ([`save`], [`prepare_restore`]): every disk's image is
//! identified (path, size, modification time, sampled CRC-32); an overlay
//! disk's sectors that are not its base's go into the checkpoint folder
//! (`SYSTEM.diskN.sectors`) with their extents. A restore checks each
//! image against the checkpoint (a different size is refused; for a
//! read-only or overlay disk, so is a changed modification time with
//! changed samples; the same samples with another time is a warning), and
//! opens an overlay disk as three layers: the base, the checkpoint's
//! sectors, and a new overlay `OUTDIR/SYSTEM.diskN.cow`. A writable image
//! is reopened as it is, with a warning at checkpoint and at restore time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::disk::Extent;
use devices::ioapic::IoApic;
use devices::irq::IrqLine;
use devices::virtio::blk::{BlkTiming, Block};
use devices::virtio::{VirtioMmio, VIRTIO_MMIO_SIZE};
use mem::{GuestRam, IoBus, Space, TimedHandle};
use sim::Stats;

use crate::config::{DiskConfig, SystemConfig};
use crate::output::OutDir;
use crate::PlatformError;

/// A disk as attached to a system: its device, and what a checkpoint
/// records of it.
pub struct AttachedDisk {
    pub dev: Arc<Mutex<VirtioMmio<Block>>>,
    /// The image's absolute path (an overlay disk's base).
    pub image: PathBuf,
    pub mode: ckpt::DiskUse,
}

/// A restored overlay disk's middle layer: the checkpoint's sector file
/// and the sectors it holds.
#[derive(Debug, Clone)]
pub struct SavedLayer {
    pub file: PathBuf,
    pub extents: Vec<Extent>,
}

fn use_of(d: &DiskConfig) -> ckpt::DiskUse {
    match (&d.overlay, d.readonly) {
        (Some(_), _) => ckpt::DiskUse::Overlay,
        (None, true) => ckpt::DiskUse::Readonly,
        (None, false) => ckpt::DiskUse::Writable,
    }
}

/// The file name of a restored run's overlay for disk `i` of system `name`
/// (in its output folder).
pub fn restored_overlay_name(name: &str, i: usize) -> String {
    format!("{name}.disk{i}.cow")
}

fn ckpt_err(what: String) -> PlatformError {
    PlatformError::Checkpoint(what)
}

/// Saves system `name`'s disks into checkpoint folder `dir`: each image's
/// identity, and each overlay disk's sectors that are not its base's.
/// Every CPU is drained: no request is being served.
pub fn save(
    name: &str,
    disks: &[AttachedDisk],
    dir: &Path,
) -> Result<Vec<ckpt::DiskState>, PlatformError> {
    let mut out = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let field = format!("{name}.disk{i}");
        let io = |what: &str, e: std::io::Error| {
            ckpt_err(format!("{field}: {what} {}: {e}", d.image.display()))
        };
        let mut dev = mem::lock(&d.dev);
        let disk = dev.device_mut().disk_mut();
        let id = match disk.image() {
            Some(f) => devices::disk::identify(f).map_err(|e| io("identifying", e))?,
            None => return Err(ckpt_err(format!("{field}: no image file to identify"))),
        };
        let saved = match d.mode {
            ckpt::DiskUse::Overlay => {
                let file = format!("{field}.sectors");
                let (f, path) = ckpt::create_sector_file(dir, &file)?;
                let extents = disk
                    .save_written(&f)
                    .map_err(|e| {
                        ckpt_err(format!(
                            "{field}: saving its sectors to {}: {e}",
                            path.display()
                        ))
                    })?
                    .unwrap_or_default();
                Some(ckpt::SavedSectors {
                    file,
                    extents: extents.iter().map(|&(a, n)| [a, n]).collect(),
                })
            }
            ckpt::DiskUse::Writable => {
                tracing::warn!(
                    "{field}: {} is a writable image: the checkpoint does not hold its contents, \
                     and a restore opens the image as it is then (which the guest's page cache \
                     may disagree with); use an overlay (overlay = FILE) for runs restored many \
                     times",
                    d.image.display()
                );
                None
            }
            ckpt::DiskUse::Readonly => None,
        };
        out.push(ckpt::DiskState {
            name: format!("disk{i}"),
            mode: d.mode,
            image: ckpt::DiskImage {
                path: d.image.to_string_lossy().into_owned(),
                size: id.size,
                mtime_sec: id.mtime_sec,
                mtime_nsec: id.mtime_nsec,
                fingerprint: id.fingerprint,
            },
            saved,
        });
    }
    Ok(out)
}

/// Checks the image of saved disk `d` (field `field`) against what the
/// checkpoint recorded.
fn check_image(field: &str, d: &ckpt::DiskState) -> Result<(), PlatformError> {
    let path = Path::new(&d.image.path);
    let f = std::fs::File::open(path).map_err(|e| {
        ckpt_err(format!(
            "{field}: the checkpoint's image {}: {e}",
            path.display()
        ))
    })?;
    let id = devices::disk::identify(&f)
        .map_err(|e| ckpt_err(format!("{field}: reading {}: {e}", path.display())))?;
    if id.size != d.image.size {
        return Err(ckpt_err(format!(
            "{field}: {} has {} bytes, {} at the checkpoint: it is not the disk the checkpoint \
             was taken with",
            path.display(),
            id.size,
            d.image.size
        )));
    }
    let same_time = id.mtime_sec == d.image.mtime_sec && id.mtime_nsec == d.image.mtime_nsec;
    let same_samples = id.fingerprint == d.image.fingerprint;
    match d.mode {
        ckpt::DiskUse::Writable => {
            let changed = if same_time && same_samples {
                ""
            } else {
                " (it changed since the checkpoint)"
            };
            tracing::warn!(
                "{field}: {} is a writable image the checkpoint does not hold: it is opened as \
                 it is now{changed}, which may not be what the guest had at the checkpoint (its \
                 page cache); use an overlay (overlay = FILE) for runs restored many times",
                path.display()
            );
        }
        _ if !same_samples => {
            return Err(ckpt_err(format!(
                "{field}: {} changed since the checkpoint (its sampled contents differ{}): the \
                 guest's view of the disk would not be what it was; restore with the image the \
                 checkpoint was taken with",
                path.display(),
                if same_time {
                    ", though its modification time does not"
                } else {
                    " and so does its modification time"
                }
            )));
        }
        _ if !same_time => {
            tracing::warn!(
                "{field}: {} has another modification time than at the checkpoint, but the same \
                 size and sampled contents: restoring on it (a change the samples miss would \
                 show as damage in the guest's file system)",
                path.display()
            );
        }
        _ => {}
    }
    Ok(())
}

/// Before a restored system attaches its disks: checks each image against
/// checkpoint `dir`'s `saved` disks and points each overlay disk at the
/// image and at a new overlay in `out`'s folder (`sc_disks` is the
/// checkpoint's config, changed accordingly). Returns each disk's middle
/// layer (overlay disks only).
pub fn prepare_restore(
    name: &str,
    sc_disks: &mut [DiskConfig],
    dir: &Path,
    saved: &[ckpt::DiskState],
    out: &OutDir,
) -> Result<Vec<Option<SavedLayer>>, PlatformError> {
    let whose = format!("{}: system {name}", dir.display());
    if saved.len() != sc_disks.len() {
        return Err(ckpt_err(format!(
            "{whose}: {} disks in the checkpoint, {} in its config",
            saved.len(),
            sc_disks.len()
        )));
    }
    let mut layers = Vec::with_capacity(saved.len());
    for (i, (d, c)) in saved.iter().zip(sc_disks.iter_mut()).enumerate() {
        let field = format!("{name}.disk{i}");
        if d.name != format!("disk{i}") || d.mode != use_of(c) {
            return Err(ckpt_err(format!(
                "{whose}: disks[{i}] is {} ({}) in the checkpoint, but the config's disk {i} is \
                 {}",
                d.name,
                d.mode.as_str(),
                use_of(c).as_str()
            )));
        }
        check_image(&field, d)?;
        c.path = d.image.path.clone();
        let layer = match &d.saved {
            Some(s) => {
                let overlay = out.dir().join(restored_overlay_name(name, i));
                let n = s.sectors();
                tracing::info!(
                    "{field}: restored as {} with the checkpoint's {n} written sectors ({} \
                     bytes, read-only) over it; this run's writes go to {}",
                    d.image.path,
                    n.saturating_mul(ckpt::SECTOR),
                    overlay.display()
                );
                c.overlay = Some(overlay.to_string_lossy().into_owned());
                Some(SavedLayer {
                    file: dir.join(&s.file),
                    extents: s.extents.iter().map(|e| (e[0], e[1])).collect(),
                })
            }
            None => None,
        };
        layers.push(layer);
    }
    Ok(layers)
}

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
/// created at the guest's first write.) `layers` (a restore, see
/// [`prepare_restore`]) gives overlay disks the checkpoint's sectors.
#[allow(clippy::too_many_arguments)]
pub fn attach(
    name: &str,
    disks: &[DiskConfig],
    layers: &[Option<SavedLayer>],
    ram: &GuestRam,
    ioapic: &Arc<Mutex<IoApic>>,
    bus: &mut IoBus,
    stats: &mut Stats,
    timed: &mut Vec<TimedHandle>,
) -> Result<Vec<AttachedDisk>, PlatformError> {
    let mut opened = Vec::new();
    let mut attached = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let path = Path::new(&d.path);
        let field = format!("{name}.disk[{i}]");
        let disk = match (layers.get(i).and_then(|l| l.as_ref()), &d.overlay) {
            (Some(l), Some(o)) => {
                devices::disk::open_restored(path, &l.file, &l.extents, Path::new(o))
            }
            _ => devices::disk::open(path, &d.mode()),
        }
        .map_err(|e| disk_error(&field, e))?;
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
        let dev = board.attach(blk, at, &format!("disk{i}"), &prefix)?;
        attached.push(AttachedDisk {
            dev,
            image: std::fs::canonicalize(&d.path).unwrap_or_else(|_| PathBuf::from(&d.path)),
            mode: use_of(d),
        });
    }
    Ok(attached)
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
