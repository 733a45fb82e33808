//! Disk images on the host: what a block device reads and writes.
//!
//! * [`RawDisk`]: a raw image file, read-only or writable. Writes go to the
//!   file with `pwrite` as the device completes them (no user-space cache),
//!   so they survive any end of kvmsim (exit, fault, Ctrl-C, even a crash);
//!   a flush is `fdatasync`, which also makes them survive the host.
//! * [`CowDisk`]: a read-only base image and a new overlay file that takes
//!   every write (gem5's `CowDiskImage`): the base is opened read-only and
//!   is never written. The overlay is created at the first write (a run
//!   that writes nothing, or fails to start, leaves none) as a sparse file
//!   of the base's size holding the written sectors at their own offsets;
//!   which sectors were written is kept in memory (one bit per 512-byte
//!   sector), for this run. A checkpoint copies every sector that is not
//!   the base's into a sparse file of its own ([`Disk::save_written`], with
//!   the extents that say which); a disk restored from it
//!   ([`open_restored`]) has three layers: the base, the checkpoint's
//!   sectors (read-only, shared by every restore of the checkpoint), and a
//!   new overlay for the restored run's writes. A sector is read from the
//!   topmost layer that holds it; nothing is copied at restore time.
//!
//! [`open`] checks an image before the guest starts and names the file and
//! what is wrong: missing, not a regular file, empty or not a multiple of
//! 512 bytes, not writable when a writable disk was asked for, an overlay
//! path that already exists.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The sector size of the block device.
pub const SECTOR_SIZE: u64 = 512;

/// How a disk image is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskMode {
    /// The guest may read and write the image.
    Writable,
    /// The guest may only read (the device offers VIRTIO_BLK_F_RO).
    ReadOnly,
    /// The image is never written; the guest's writes go to this new file.
    Overlay(PathBuf),
}

/// A disk image the block device reads and writes.
pub trait Disk: Send {
    /// Size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;
    /// True if the guest may not write.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset` (inside the disk).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `buf` at `offset` (inside the disk).
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable on the host.
    fn flush(&mut self) -> io::Result<()>;
    /// The image file on the host (the base of a copy-on-write disk), for
    /// a checkpoint to identify it; none for a disk in memory.
    fn image(&self) -> Option<&File> {
        None
    }
    /// A copy-on-write disk: writes every sector that is not the base's
    /// into `to` (made the disk's size) at its own offset, all-zero runs
    /// left as holes, and returns them as extents in ascending order. None
    /// for a disk that keeps no such layer (a raw image).
    fn save_written(&mut self, to: &File) -> io::Result<Option<Vec<Extent>>> {
        let _ = to;
        Ok(None)
    }
}

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn invalid(path: &Path, message: impl Into<String>) -> DiskError {
    DiskError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// Checks the image at `path` for `mode` without opening it for writing:
/// a regular file, not empty, a whole number of sectors; writable if asked;
/// an overlay path that does not exist yet. Returns its size.
pub fn check(path: &Path, mode: &DiskMode) -> Result<u64, DiskError> {
    let meta = std::fs::metadata(path).map_err(|source| DiskError::Io {
        path: path.into(),
        source,
    })?;
    if meta.is_dir() {
        return Err(invalid(path, "is a directory, not a disk image"));
    }
    if !meta.is_file() {
        return Err(invalid(
            path,
            "is not a regular file (a raw disk image file is needed)",
        ));
    }
    let len = meta.len();
    if len == 0 {
        return Err(invalid(path, "is empty"));
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(invalid(
            path,
            format!("its size, {len} bytes, is not a multiple of {SECTOR_SIZE} (the sector size)"),
        ));
    }
    match mode {
        DiskMode::Writable if meta.permissions().mode() & 0o222 == 0 => {
            return Err(invalid(
                path,
                "is read-only but was given as writable (use readonly = true, or an overlay)",
            ));
        }
        DiskMode::Overlay(o) => {
            if std::fs::symlink_metadata(o).is_ok() {
                return Err(invalid(
                    o,
                    format!(
                        "the overlay for {} already exists (an overlay is always a new file; \
                         remove it or name another)",
                        path.display()
                    ),
                ));
            }
            if o == path {
                return Err(invalid(o, "the overlay cannot be the image itself"));
            }
            let parent = o.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) {
                return Err(invalid(
                    o,
                    "the overlay's folder does not exist (the overlay file is created, its folder is not)",
                ));
            }
        }
        _ => {}
    }
    Ok(len)
}

/// Opens the image at `path` for `mode` (see [`check`]).
pub fn open(path: &Path, mode: &DiskMode) -> Result<Box<dyn Disk>, DiskError> {
    check(path, mode)?;
    let io = |source| DiskError::Io {
        path: path.into(),
        source,
    };
    let writable = *mode == DiskMode::Writable;
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    // Re-checked on what was opened: the name may have changed meanwhile.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() || !meta.len().is_multiple_of(SECTOR_SIZE) || meta.len() == 0 {
        return Err(invalid(path, "changed while it was being opened"));
    }
    let len = meta.len();
    Ok(match mode {
        DiskMode::Writable => Box::new(RawDisk {
            file,
            len,
            read_only: false,
        }),
        DiskMode::ReadOnly => Box::new(RawDisk {
            file,
            len,
            read_only: true,
        }),
        DiskMode::Overlay(o) => Box::new(CowDisk::new(file, o.clone(), len)),
    })
}

fn past_end(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "access past the end of the disk",
        )),
    }
}

/// A raw image file.
pub struct RawDisk {
    file: File,
    len: u64,
    read_only: bool,
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        past_end(offset, buf.len(), self.len)?;
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ));
        }
        past_end(offset, buf.len(), self.len)?;
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
    fn image(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// One bit per sector.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SectorMap {
    words: Vec<u64>,
    sectors: u64,
}

impl SectorMap {
    fn new(sectors: u64) -> Self {
        SectorMap {
            words: vec![0; sectors.div_ceil(64) as usize],
            sectors,
        }
    }

    fn get(&self, sector: u64) -> bool {
        self.words
            .get((sector / 64) as usize)
            .is_some_and(|w| w & (1 << (sector % 64)) != 0)
    }

    fn set(&mut self, sector: u64) {
        if let Some(w) = self.words.get_mut((sector / 64) as usize) {
            *w |= 1 << (sector % 64);
        }
    }

    /// The runs of set sectors as extents (first sector, count), in order.
    fn extents(&self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (i, &w) in self.words.iter().enumerate() {
            if w == 0 {
                continue;
            }
            for b in 0..64 {
                if w & (1 << b) == 0 {
                    continue;
                }
                let s = i as u64 * 64 + b;
                match out.last_mut() {
                    Some(e) if e.0 + e.1 == s => e.1 += 1,
                    _ => out.push((s, 1)),
                }
            }
        }
        out
    }
}

/// A run of sectors: (first sector, number of sectors).
pub type Extent = (u64, u64);

/// Checks that `extents` lie inside a disk of `sectors` sectors, in
/// ascending order without overlapping; the error names the extent
/// (`extents[K]`) and what is wrong.
pub fn check_extents(extents: &[Extent], sectors: u64) -> Result<(), String> {
    let mut end = 0u64;
    for (k, &(first, count)) in extents.iter().enumerate() {
        if count == 0 {
            return Err(format!("extents[{k}]: {count} sectors at {first} (empty)"));
        }
        let last = first.checked_add(count).filter(|&e| e <= sectors);
        let Some(last) = last else {
            return Err(format!(
                "extents[{k}]: {count} sectors at {first} run past the disk's {sectors} sectors"
            ));
        };
        if first < end {
            return Err(format!(
                "extents[{k}]: sector {first} lies before the end of the previous extent \
                 ({end}): extents overlap or are out of order"
            ));
        }
        end = last;
    }
    Ok(())
}

/// A checkpoint's copy of a copy-on-write disk's written sectors,
/// between the base and the overlay. Only ever read.
struct SavedLayer {
    file: File,
    map: SectorMap,
}

/// Which layer holds a sector of a [`CowDisk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    Base,
    Saved,
    Overlay,
}

/// A read-only base, optionally a checkpoint's saved sectors over it (read
/// only), and an overlay that takes the writes: a sector is read from the
/// topmost layer that holds it.
pub struct CowDisk {
    base: File,
    /// The sectors of the checkpoint this disk was restored from.
    saved: Option<SavedLayer>,
    /// Created at the first write.
    overlay: Option<File>,
    overlay_path: PathBuf,
    len: u64,
    /// One bit per sector: written to the overlay.
    written: SectorMap,
}

impl CowDisk {
    fn new(base: File, overlay_path: PathBuf, len: u64) -> Self {
        CowDisk {
            base,
            saved: None,
            overlay: None,
            overlay_path,
            len,
            written: SectorMap::new(len / SECTOR_SIZE),
        }
    }

    /// The overlay, created (new, never an existing file) on first use.
    fn overlay(&mut self) -> io::Result<&File> {
        if self.overlay.is_none() {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&self.overlay_path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("overlay {}: {e}", self.overlay_path.display()),
                    )
                })?;
            f.set_len(self.len)?;
            self.overlay = Some(f);
        }
        self.overlay
            .as_ref()
            .ok_or_else(|| io::Error::other("no overlay"))
    }

    fn layer(&self, sector: u64) -> Layer {
        if self.overlay.is_some() && self.written.get(sector) {
            Layer::Overlay
        } else if self.saved.as_ref().is_some_and(|s| s.map.get(sector)) {
            Layer::Saved
        } else {
            Layer::Base
        }
    }

    fn file(&self, layer: Layer) -> &File {
        match (layer, &self.overlay, &self.saved) {
            (Layer::Overlay, Some(o), _) => o,
            (Layer::Saved, _, Some(s)) => &s.file,
            _ => &self.base,
        }
    }

    /// The path the overlay is (or will be) created at.
    pub fn overlay_path(&self) -> &Path {
        &self.overlay_path
    }
}

impl Disk for CowDisk {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        past_end(offset, buf.len(), self.len)?;
        // Runs of sectors from the same layer.
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECTOR_SIZE;
            let layer = self.layer(sector);
            let mut end = ((sector + 1) * SECTOR_SIZE - offset).min(buf.len() as u64) as usize;
            while end < buf.len() && self.layer((offset + end as u64) / SECTOR_SIZE) == layer {
                end = (end + SECTOR_SIZE as usize).min(buf.len());
            }
            self.file(layer).read_exact_at(&mut buf[done..end], pos)?;
            done = end;
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        past_end(offset, buf.len(), self.len)?;
        if buf.is_empty() {
            return Ok(());
        }
        // A partly written sector takes the rest of its bytes from the
        // layers below (the checkpoint's sectors, else the base).
        let first = offset / SECTOR_SIZE;
        let last = (offset + buf.len() as u64 - 1) / SECTOR_SIZE;
        self.overlay()?;
        for s in [first, last] {
            let layer = self.layer(s);
            if layer != Layer::Overlay {
                let start = s * SECTOR_SIZE;
                let end = start + SECTOR_SIZE;
                if offset > start || offset + (buf.len() as u64) < end {
                    let mut sec = [0u8; SECTOR_SIZE as usize];
                    self.file(layer).read_exact_at(&mut sec, start)?;
                    self.overlay()?.write_all_at(&sec, start)?;
                    self.written.set(s);
                }
            }
        }
        self.overlay()?.write_all_at(buf, offset)?;
        for s in first..=last {
            self.written.set(s);
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        match &self.overlay {
            Some(o) => o.sync_data(),
            None => Ok(()),
        }
    }
    fn image(&self) -> Option<&File> {
        Some(&self.base)
    }
    fn save_written(&mut self, to: &File) -> io::Result<Option<Vec<Extent>>> {
        // Every sector that is not the base's: the checkpoint's (if this
        // disk was restored from one) and the overlay's.
        let mut map = self.written.clone();
        if let Some(s) = &self.saved {
            for (w, sw) in map.words.iter_mut().zip(&s.map.words) {
                *w |= sw;
            }
        }
        let extents = map.extents();
        to.set_len(self.len)?;
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK as usize];
        for &(first, count) in &extents {
            let mut at = first * SECTOR_SIZE;
            let end = (first + count) * SECTOR_SIZE;
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                self.read_at(at, &mut buf[..n])?;
                // Zeros stay a hole: they read back as zeros.
                if buf[..n].iter().any(|&b| b != 0) {
                    to.write_all_at(&buf[..n], at)?;
                }
                at += n as u64;
            }
        }
        to.sync_all()?;
        Ok(Some(extents))
    }
}

/// Opens a copy-on-write disk restored from a checkpoint: the base image
/// at `base` (read-only), the checkpoint's sectors `extents` in the file
/// `saved` (read-only, the base's size; never written), and a new overlay
/// at `overlay` for this run's writes, created at the first write (it
/// must not exist then; it may now: it is a file of the run's output
/// folder, which the run replaces before it starts).
pub fn open_restored(
    base: &Path,
    saved: &Path,
    extents: &[Extent],
    overlay: &Path,
) -> Result<Box<dyn Disk>, DiskError> {
    let len = check(base, &DiskMode::ReadOnly)?;
    let open_ro = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .map_err(|source| DiskError::Io {
                path: p.into(),
                source,
            })
    };
    let base_file = open_ro(base)?;
    let blen = base_file
        .metadata()
        .map_err(|source| DiskError::Io {
            path: base.into(),
            source,
        })?
        .len();
    if blen != len {
        return Err(invalid(base, "changed while it was being opened"));
    }
    let saved_file = open_ro(saved)?;
    let meta = saved_file.metadata().map_err(|source| DiskError::Io {
        path: saved.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(invalid(saved, "is not a regular file"));
    }
    if meta.len() != len {
        return Err(invalid(
            saved,
            format!(
                "{} bytes, but it holds sectors of a {len}-byte disk ({}): truncated or not \
                 this disk's",
                meta.len(),
                base.display()
            ),
        ));
    }
    let sectors = len / SECTOR_SIZE;
    check_extents(extents, sectors).map_err(|m| invalid(saved, m))?;
    let mut map = SectorMap::new(sectors);
    for &(first, count) in extents {
        for s in first..first + count {
            map.set(s);
        }
    }
    let parent = overlay.parent().filter(|p| !p.as_os_str().is_empty());
    if parent.is_some_and(|p| !p.is_dir()) {
        return Err(invalid(overlay, "the overlay's folder does not exist"));
    }
    let mut disk = CowDisk::new(base_file, overlay.into(), len);
    disk.saved = Some(SavedLayer {
        file: saved_file,
        map,
    });
    Ok(Box::new(disk))
}

/// What identifies an image file: its size, its modification time and a
/// fingerprint of some of its bytes ([`fingerprint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageId {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub fingerprint: u32,
}

/// Bytes per fingerprint sample, and how many samples after the first.
const SAMPLE: u64 = 4096;
const SAMPLES: u64 = 15;
/// The fingerprint's first sample: where file systems keep their
/// superblocks (ext4's records its mount and write times, so a mount
/// changes it).
const FIRST_SAMPLE: u64 = 64 << 10;

/// A cheap fingerprint of an image: the CRC-32 of its size, its first
/// 64 KiB and 15 evenly spaced 4 KiB samples. Not a digest of every byte
/// (that would cost a read of the whole image at each checkpoint and
/// restore): a change elsewhere goes unseen.
pub fn fingerprint(file: &File) -> io::Result<u32> {
    let size = file.metadata()?.len();
    let mut h = crc32fast::Hasher::new();
    h.update(&size.to_le_bytes());
    let mut buf = vec![0u8; FIRST_SAMPLE as usize];
    let mut take = |at: u64, n: u64| -> io::Result<()> {
        let n = n.min(size.saturating_sub(at)) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        Ok(())
    };
    take(0, FIRST_SAMPLE)?;
    let span = size.saturating_sub(SAMPLE);
    for i in 1..=SAMPLES {
        take(span / SAMPLES * i / SECTOR_SIZE * SECTOR_SIZE, SAMPLE)?;
    }
    Ok(h.finalize())
}

/// Identifies the open image `file`.
pub fn identify(file: &File) -> io::Result<ImageId> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok(ImageId {
        size: m.len(),
        mtime_sec: m.mtime(),
        mtime_nsec: m.mtime_nsec().clamp(0, 999_999_999) as u32,
        fingerprint: fingerprint(file)?,
    })
}

/// A disk in memory, for tests and fuzzing.
pub struct MemDisk {
    pub data: Vec<u8>,
    pub read_only: bool,
    pub flushes: u64,
}

impl MemDisk {
    /// `sectors` zeroed sectors.
    pub fn new(sectors: u64) -> Self {
        MemDisk {
            data: vec![0; (sectors * SECTOR_SIZE) as usize],
            read_only: false,
            flushes: 0,
        }
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        past_end(offset, buf.len(), self.size())?;
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        past_end(offset, buf.len(), self.size())?;
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only"));
        }
        self.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvmsim-disk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn msg(r: Result<Box<dyn Disk>, DiskError>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        let d = tmp("bad");
        let missing = d.join("missing.img");
        assert!(msg(open(&missing, &DiskMode::Writable)).contains("missing.img"));
        assert!(msg(open(&d, &DiskMode::ReadOnly)).contains("is a directory"));
        let odd = d.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let m = msg(open(&odd, &DiskMode::ReadOnly));
        assert!(
            m.contains("odd.img") && m.contains("1000 bytes") && m.contains("512"),
            "{m}"
        );
        let empty = d.join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(msg(open(&empty, &DiskMode::ReadOnly)).contains("is empty"));
        let ro = d.join("ro.img");
        std::fs::write(&ro, vec![0u8; 1024]).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
        let m = msg(open(&ro, &DiskMode::Writable));
        assert!(m.contains("ro.img") && m.contains("read-only"), "{m}");
        assert!(open(&ro, &DiskMode::ReadOnly).is_ok());
        let existing = d.join("exists.cow");
        std::fs::write(&existing, b"x").unwrap();
        let m = msg(open(&ro, &DiskMode::Overlay(existing.clone())));
        assert!(
            m.contains("exists.cow") && m.contains("already exists"),
            "{m}"
        );
        assert_eq!(std::fs::read(&existing).unwrap(), b"x", "left alone");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn raw_disk_writes_reach_the_file_and_stay_in_bounds() {
        let d = tmp("raw");
        let p = d.join("a.img");
        std::fs::write(&p, vec![0u8; 2048]).unwrap();
        let mut disk = open(&p, &DiskMode::Writable).unwrap();
        assert_eq!(disk.size(), 2048);
        disk.write_at(512, &[7u8; 512]).unwrap();
        assert!(disk.write_at(2047, &[1, 2]).is_err());
        assert!(disk.write_at(u64::MAX, &[1]).is_err());
        disk.flush().unwrap();
        let f = std::fs::read(&p).unwrap();
        assert_eq!(f.len(), 2048, "never grown");
        assert_eq!(&f[512..1024], &[7u8; 512]);
        assert_eq!(f[2047], 0);
        let mut ro = open(&p, &DiskMode::ReadOnly).unwrap();
        assert!(ro.write_at(0, &[1]).is_err());
        let mut b = [0u8; 4];
        ro.read_at(1020, &mut b).unwrap();
        assert_eq!(b, [7, 7, 7, 7]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overlay_takes_writes_and_the_base_is_untouched() {
        let d = tmp("cow");
        let base = d.join("base.img");
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &data).unwrap();
        let cow = d.join("over.cow");
        let mut disk = open(&base, &DiskMode::Overlay(cow.clone())).unwrap();
        let mut first = vec![0u8; 512];
        disk.read_at(512, &mut first).unwrap();
        assert_eq!(first, data[512..1024]);
        assert!(!cow.exists(), "created at the first write");
        // A write inside one sector keeps the sector's other bytes.
        disk.write_at(1000, &[0xAA; 100]).unwrap();
        disk.write_at(2048, &[0xBB; 1024]).unwrap();
        let mut all = vec![0u8; 4096];
        disk.read_at(0, &mut all).unwrap();
        let mut want = data.clone();
        want[1000..1100].fill(0xAA);
        want[2048..3072].fill(0xBB);
        assert_eq!(all, want);
        disk.flush().unwrap();
        drop(disk);
        assert_eq!(std::fs::read(&base).unwrap(), data, "base unchanged");
        let over = std::fs::read(&cow).unwrap();
        assert_eq!(over.len(), 4096);
        assert_eq!(over[2048..3072], [0xBB; 1024]);
        assert_eq!(over[1000..1100], [0xAA; 100]);
        assert_eq!(over[512..1000], data[512..1000], "the sector's other bytes");
        // An overlay that appeared meanwhile is never taken over.
        let cow2 = d.join("over2.cow");
        let mut disk = open(&base, &DiskMode::Overlay(cow2.clone())).unwrap();
        std::fs::write(&cow2, b"someone else's").unwrap();
        assert!(disk.write_at(0, &[1; 512]).is_err());
        assert_eq!(std::fs::read(&cow2).unwrap(), b"someone else's");
        // An overlay in a missing folder is refused up front.
        let m = msg(open(&base, &DiskMode::Overlay(d.join("no/such/x.cow"))));
        assert!(m.contains("folder does not exist"), "{m}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// A checkpoint of a copy-on-write disk restores as three layers: each
    /// sector comes from the right one, partial writes take the rest of
    /// their sector from the layers below, the checkpoint's file and the
    /// base are never written, and a second checkpoint holds both layers.
    #[test]
    fn restored_overlay_reads_each_sector_from_its_layer() {
        let d = tmp("layers");
        let base = d.join("base.img");
        let data = pattern(64 * 512, 0);
        std::fs::write(&base, &data).unwrap();
        // The first run writes sectors 2-3 and 9, and zeros over sector 12.
        let mut first = open(&base, &DiskMode::Overlay(d.join("first.cow"))).unwrap();
        first.write_at(2 * 512, &[0xA1; 1024]).unwrap();
        first.write_at(9 * 512 + 100, &[0xA2; 10]).unwrap();
        first.write_at(12 * 512, &[0; 512]).unwrap();
        let saved = d.join("saved.sectors");
        let f = File::create_new(&saved).unwrap();
        let extents = first.save_written(&f).unwrap().unwrap();
        drop(f);
        assert_eq!(extents, vec![(2, 2), (9, 1), (12, 1)]);
        let mut at_checkpoint = vec![0u8; data.len()];
        first.read_at(0, &mut at_checkpoint).unwrap();
        // The first run goes on after its checkpoint: the checkpoint is a copy.
        first.write_at(2 * 512, &[0xEE; 512]).unwrap();
        drop(first);
        let saved_bytes = std::fs::read(&saved).unwrap();
        assert_eq!(saved_bytes.len(), data.len(), "the disk's size");
        assert_eq!(saved_bytes[2 * 512..4 * 512], [0xA1; 1024]);
        assert_eq!(saved_bytes[9 * 512 + 100..9 * 512 + 110], [0xA2; 10]);
        assert_eq!(
            saved_bytes[9 * 512..9 * 512 + 100],
            data[9 * 512..9 * 512 + 100],
            "the rest of a partly written sector came from the base"
        );
        let zeros = std::fs::metadata(&saved).unwrap();
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&zeros) * 512 < data.len() as u64,
            "sparse"
        );

        // Restored: base <- saved <- a new overlay.
        let cow = d.join("out/system.disk0.cow");
        std::fs::create_dir_all(d.join("out")).unwrap();
        std::fs::write(&cow, b"an earlier run's").unwrap();
        let m = match open_restored(&base, &saved, &extents, &cow) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(
            m.is_empty(),
            "an earlier run's overlay is not in the way: {m}"
        );
        std::fs::remove_file(&cow).unwrap();
        let mut disk = open_restored(&base, &saved, &extents, &cow).unwrap();
        let mut all = vec![0u8; data.len()];
        disk.read_at(0, &mut all).unwrap();
        assert_eq!(all, at_checkpoint, "what the disk held at the checkpoint");
        assert!(!cow.exists(), "the overlay is created at the first write");
        // Writes: one inside a saved sector, one across a saved and a base
        // sector, one inside a base sector.
        disk.write_at(2 * 512 + 10, &[0xB1; 4]).unwrap();
        disk.write_at(3 * 512 + 500, &[0xB2; 20]).unwrap();
        disk.write_at(6 * 512 + 7, &[0xB3; 3]).unwrap();
        let mut want = at_checkpoint.clone();
        want[2 * 512 + 10..2 * 512 + 14].fill(0xB1);
        want[3 * 512 + 500..3 * 512 + 520].fill(0xB2);
        want[6 * 512 + 7..6 * 512 + 10].fill(0xB3);
        disk.read_at(0, &mut all).unwrap();
        assert_eq!(all, want);
        // Reads that start and end inside sectors of different layers.
        let mut part = vec![0u8; 1500];
        disk.read_at(512 + 77, &mut part).unwrap();
        assert_eq!(part, want[512 + 77..512 + 77 + 1500]);
        disk.flush().unwrap();
        assert_eq!(std::fs::read(&saved).unwrap(), saved_bytes, "never written");
        assert_eq!(std::fs::read(&base).unwrap(), data, "never written");
        let over = std::fs::read(&cow).unwrap();
        assert_eq!(over[2 * 512..3 * 512], want[2 * 512..3 * 512]);
        assert_eq!(over[6 * 512..7 * 512], want[6 * 512..7 * 512]);
        assert_eq!(
            over[9 * 512..10 * 512],
            [0; 512],
            "untouched sectors stay holes"
        );

        // A checkpoint of the restored run holds both upper layers.
        let saved2 = d.join("saved2.sectors");
        let f = File::create_new(&saved2).unwrap();
        let extents2 = disk.save_written(&f).unwrap().unwrap();
        assert_eq!(extents2, vec![(2, 3), (6, 1), (9, 1), (12, 1)]);
        let mut again = open_restored(&base, &saved2, &extents2, &d.join("out/x.cow")).unwrap();
        again.read_at(0, &mut all).unwrap();
        assert_eq!(all, want);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn restored_overlay_refuses_bad_saved_files_and_extents() {
        let d = tmp("badsaved");
        let base = d.join("base.img");
        std::fs::write(&base, vec![1u8; 8 * 512]).unwrap();
        let saved = d.join("s.sectors");
        std::fs::write(&saved, vec![0u8; 8 * 512]).unwrap();
        let cow = d.join("o.cow");
        let err = |e: &[Extent], s: &Path| match open_restored(&base, s, e, &cow) {
            Ok(_) => panic!("accepted {e:?}"),
            Err(e) => e.to_string(),
        };
        assert!(open_restored(&base, &saved, &[(0, 8)], &cow).is_ok());
        let m = err(&[(7, 2)], &saved);
        assert!(
            m.contains("s.sectors") && m.contains("extents[0]") && m.contains("past"),
            "{m}"
        );
        let m = err(&[(1, 3), (2, 1)], &saved);
        assert!(m.contains("extents[1]") && m.contains("overlap"), "{m}");
        let m = err(&[(3, 1), (1, 1)], &saved);
        assert!(m.contains("extents[1]"), "{m}");
        let m = err(&[(0, 0)], &saved);
        assert!(m.contains("extents[0]") && m.contains("empty"), "{m}");
        let m = err(&[(u64::MAX, 2)], &saved);
        assert!(m.contains("extents[0]"), "{m}");
        let short = d.join("short.sectors");
        std::fs::write(&short, vec![0u8; 3 * 512]).unwrap();
        let m = err(&[(0, 1)], &short);
        assert!(
            m.contains("short.sectors") && m.contains("1536 bytes") && m.contains("truncated"),
            "{m}"
        );
        let m = err(&[(0, 1)], &d.join("missing.sectors"));
        assert!(m.contains("missing.sectors"), "{m}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn identity_sees_size_and_content_changes() {
        let d = tmp("ident");
        let p = d.join("a.img");
        std::fs::write(&p, pattern(1 << 20, 3)).unwrap();
        let id = identify(&File::open(&p).unwrap()).unwrap();
        assert_eq!(id.size, 1 << 20);
        assert_eq!(identify(&File::open(&p).unwrap()).unwrap(), id, "stable");
        // The superblock area changes (a mount would change it).
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0; 4], 1024).unwrap();
        let changed = identify(&File::open(&p).unwrap()).unwrap();
        assert_ne!(changed.fingerprint, id.fingerprint);
        // A small image is sampled without reading past its end.
        let small = d.join("small.img");
        std::fs::write(&small, [5u8; 512]).unwrap();
        assert_eq!(identify(&File::open(&small).unwrap()).unwrap().size, 512);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
