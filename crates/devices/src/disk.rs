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
//!   sector), for this run.
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
}

/// A read-only base and an overlay that takes the writes.
pub struct CowDisk {
    base: File,
    /// Created at the first write.
    overlay: Option<File>,
    overlay_path: PathBuf,
    len: u64,
    /// One bit per sector: written to the overlay.
    written: Vec<u64>,
}

impl CowDisk {
    fn new(base: File, overlay_path: PathBuf, len: u64) -> Self {
        let sectors = len / SECTOR_SIZE;
        CowDisk {
            base,
            overlay: None,
            overlay_path,
            len,
            written: vec![0; sectors.div_ceil(64) as usize],
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

    fn is_written(&self, sector: u64) -> bool {
        self.written
            .get((sector / 64) as usize)
            .is_some_and(|w| w & (1 << (sector % 64)) != 0)
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
        // Runs of sectors from the same file.
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let sector = pos / SECTOR_SIZE;
            let from_overlay = self.is_written(sector);
            let mut end = ((sector + 1) * SECTOR_SIZE - offset).min(buf.len() as u64) as usize;
            while end < buf.len()
                && self.is_written((offset + end as u64) / SECTOR_SIZE) == from_overlay
            {
                end = (end + SECTOR_SIZE as usize).min(buf.len());
            }
            let file = match (&self.overlay, from_overlay) {
                (Some(o), true) => o,
                _ => &self.base,
            };
            file.read_exact_at(&mut buf[done..end], pos)?;
            done = end;
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        past_end(offset, buf.len(), self.len)?;
        if buf.is_empty() {
            return Ok(());
        }
        // A partly written sector takes the rest of its bytes from the base.
        let first = offset / SECTOR_SIZE;
        let last = (offset + buf.len() as u64 - 1) / SECTOR_SIZE;
        self.overlay()?;
        for s in [first, last] {
            if !self.is_written(s) {
                let start = s * SECTOR_SIZE;
                let end = start + SECTOR_SIZE;
                if offset > start || offset + (buf.len() as u64) < end {
                    let mut sec = [0u8; SECTOR_SIZE as usize];
                    self.base.read_exact_at(&mut sec, start)?;
                    self.overlay()?.write_all_at(&sec, start)?;
                }
            }
        }
        self.overlay()?.write_all_at(buf, offset)?;
        for s in first..=last {
            if let Some(w) = self.written.get_mut((s / 64) as usize) {
                *w |= 1 << (s % 64);
            }
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        match &self.overlay {
            Some(o) => o.sync_data(),
            None => Ok(()),
        }
    }
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
}
