//! kvmsim's checkpoint folder: what it holds and how it is written and read.
//!
//! A checkpoint is a folder:
//!
//! * `state.ckpt`: a 32-byte header, then the body.
//!   - bytes 0..8: the magic `KVMSIMCP`;
//!   - 8..12: the format version ([`FORMAT_VERSION`], little-endian u32);
//!   - 12..16: zero (reserved);
//!   - 16..24: the body's length in bytes (u64);
//!   - 24..28: the body's CRC-32 (IEEE, crc32fast);
//!   - 28..32: the CRC-32 of bytes 0..28 (a damaged header is told apart
//!     from a damaged body);
//!   - then the body: [`CheckpointState`] as JSON (serde). JSON because the
//!     body is small (tens of KiB per CPU: registers, a 4 KiB XSAVE area,
//!     MSRs, CPUID, device state; guest RAM is a file of its own) and
//!     self-describing: every field is named, an unknown or missing field is
//!     an error that names it, and the body can be read with any JSON tool.
//!     A binary encoding (bincode, postcard) would save parsing time that is
//!     below a millisecond here, and would misread a body of another layout
//!     instead of naming the field.
//! * one RAM file per system (`ram.N.bin`): the guest's RAM regions one
//!   after the other (offsets in [`RamImage`]), written as a sparse file:
//!   only pages with a non-zero byte are written, the rest are holes that
//!   take no disk space and read as zeros. [`map_ram`] maps it back
//!   privately (copy-on-write, `MAP_PRIVATE`): pages load on first touch,
//!   the guest's writes never reach the file, and any number of restores
//!   can map one checkpoint at once.
//!
//! * one sector file per copy-on-write disk (`SYSTEM.diskN.sectors`):
//!   every sector of the disk that is not its base image's (what the guest
//!   wrote, through this run's overlay and any checkpoint it was restored
//!   from) at its own offset in a sparse file of the disk's size; which
//!   sectors it holds is [`SavedSectors::extents`]. A restore reads it,
//!   never writes it, so restores of one checkpoint share it. Each disk's
//!   image is identified ([`DiskImage`]: path, size, modification time, a
//!   sampled CRC-32) so a restore can tell whether it changed.
//!
//! The state file is written last, through a temporary name and a rename,
//! so a folder with a state file holds a whole checkpoint.
//!
//! Reading never panics and never trusts the file: a foreign file, an
//! older or newer format version, a truncated or corrupted file, a body
//! that does not parse or describes an impossible machine (RAM regions
//! that overlap, a RAM file name that leaves the folder, ...) is an error
//! naming the file and what is wrong ([`CkptError`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sim::Tick;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// The first bytes of a state file.
pub const MAGIC: [u8; 8] = *b"KVMSIMCP";
/// The format this kvmsim writes and the only one it reads. Raise it with
/// every change of [`CheckpointState`] or of the folder's layout.
///
/// 3: disks ([`SystemState::disks`], sector files) and the network
/// ([`CheckpointState::network`]: links' and switches' state).
/// 4: the local APIC's `timer_stopped` (an expired one-shot timer switched
/// to periodic mode).
pub const FORMAT_VERSION: u32 = 4;
/// The state file's name in the folder.
pub const STATE_FILE: &str = "state.ckpt";
/// The state file's header length.
pub const HEADER_LEN: usize = 32;
/// The largest body read (far above any real one: a body is tens of KiB
/// per CPU).
pub const MAX_BODY: u64 = 256 << 20;
/// RAM files are written and mapped in pages of this size.
pub const PAGE: u64 = 4096;

/// What can go wrong with a checkpoint folder.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    #[error("{}: not a kvmsim checkpoint (the state file does not start with kvmsim's magic bytes)", .0.display())]
    Foreign(PathBuf),
    #[error("{}: written in checkpoint format version {found}, older than the version {supported} this kvmsim reads; take the checkpoint again with this kvmsim", path.display())]
    OlderVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: written in checkpoint format version {found} by a newer kvmsim; this one reads version {supported} only", path.display())]
    NewerVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{}: truncated: {what}", path.display())]
    Truncated { path: PathBuf, what: String },
    #[error("{}: corrupted: {what}", path.display())]
    Corrupted { path: PathBuf, what: String },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: already holds a checkpoint ({STATE_FILE}); choose another folder or remove it", .0.display())]
    Exists(PathBuf),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, CkptError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CkptError + '_ {
    move |source| CkptError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything a checkpoint holds besides the RAM contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointState {
    /// The kvmsim version that wrote it (for information; the format
    /// version decides what can be read).
    pub kvmsim_version: String,
    /// The simulated time of the checkpoint (every system is there).
    pub tick: Tick,
    /// The resolved configuration of the run (config.json's content).
    pub config: serde_json::Value,
    /// Every system, in the config's order.
    pub systems: Vec<SystemState>,
    /// What lives between the systems (the links' and switches'
    /// statistics, each switch's tables, queues and frames in flight), as
    /// the platform layer describes it.
    pub network: serde_json::Value,
}

/// One system of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemState {
    /// The system's name (`system`, `system0`, ...).
    pub name: String,
    /// Where its RAM is.
    pub ram: RamImage,
    /// Every CPU, in index order.
    pub cpus: Vec<kvm::CpuSaved>,
    /// Each device's saved state, by the device's name.
    pub devices: BTreeMap<String, serde_json::Value>,
    /// The simulator's side of the system (its event queues with every
    /// pending event, each CPU's place in simulated time, the statistics),
    /// as the platform layer describes it.
    pub sim: serde_json::Value,
    /// Every disk, in the config's order.
    pub disks: Vec<DiskState>,
}

/// One disk of a system in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    /// The device's name (`disk0`, ...; statistics under `SYSTEM.disk0`).
    pub name: String,
    /// How the run used the image.
    pub mode: DiskUse,
    /// The image (an overlay disk's base) as it was at the checkpoint.
    pub image: DiskImage,
    /// An overlay disk's sectors that are not the base's; none for a
    /// read-only or writable image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<SavedSectors>,
}

/// How a run used a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskUse {
    /// The guest wrote the image itself: the checkpoint holds none of it.
    Writable,
    /// The guest could only read.
    Readonly,
    /// Copy-on-write: the image was never written; the checkpoint holds the
    /// written sectors.
    Overlay,
}

impl DiskUse {
    /// The config's word for it.
    pub fn as_str(&self) -> &'static str {
        match self {
            DiskUse::Writable => "writable",
            DiskUse::Readonly => "readonly",
            DiskUse::Overlay => "overlay",
        }
    }
}

/// What identifies a disk image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskImage {
    /// Its absolute path at the checkpoint (a restore opens it there).
    pub path: String,
    /// Its size in bytes (a whole number of 512-byte sectors).
    pub size: u64,
    /// Its modification time (seconds and nanoseconds since 1970).
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// CRC-32 of its size, first 64 KiB and 15 evenly spaced 4 KiB samples.
    pub fingerprint: u32,
}

/// A copy-on-write disk's sectors in the folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedSectors {
    /// The sector file's name in the folder (a plain name, no path): a
    /// sparse file of the disk's size, each saved sector at its own offset.
    pub file: String,
    /// The sectors it holds: `[first sector, number of sectors]`, in
    /// ascending order, not overlapping, inside the disk.
    pub extents: Vec<[u64; 2]>,
}

impl SavedSectors {
    /// Sectors held.
    pub fn sectors(&self) -> u64 {
        self.extents
            .iter()
            .fold(0u64, |a, e| a.saturating_add(e[1]))
    }
}

/// Disk sectors are this many bytes.
pub const SECTOR: u64 = 512;

/// A system's RAM in the folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamImage {
    /// The RAM file's name in the folder (a plain name, no path).
    pub file: String,
    /// The RAM regions (guest-physical base and size) and where each
    /// starts in the file.
    pub regions: Vec<RamRegion>,
}

/// One RAM region in a RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamRegion {
    pub base: u64,
    pub size: u64,
    /// Offset of the region's first byte in the RAM file.
    pub offset: u64,
}

impl RamImage {
    /// The guest RAM's size (all regions).
    pub fn size(&self) -> u64 {
        self.regions
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.size))
    }

    /// The length the RAM file must have at least.
    pub fn file_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.offset.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }
}

/// Serialises `state` into a state file's bytes (header and body).
pub fn encode_state(state: &CheckpointState) -> Vec<u8> {
    // Serialising plain data (strings, numbers, maps with string keys)
    // into memory cannot fail.
    let body = serde_json::to_vec(state).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let header_crc = crc32fast::hash(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Reads a state file's bytes (`path` names it in errors): header, format
/// version, checksums, body, and the body's consistency.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<CheckpointState> {
    let err_trunc = |what: String| CkptError::Truncated {
        path: path.to_path_buf(),
        what,
    };
    let err_corrupt = |what: String| CkptError::Corrupted {
        path: path.to_path_buf(),
        what,
    };
    let n = bytes.len().min(MAGIC.len());
    if bytes[..n] != MAGIC[..n] {
        return Err(CkptError::Foreign(path.to_path_buf()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(err_trunc(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    let header_crc = crc32fast::hash(&bytes[..28]);
    if header_crc != le32(bytes, 28) {
        return Err(err_corrupt(format!(
            "header checksum {:#010x}, computed {header_crc:#010x}",
            le32(bytes, 28)
        )));
    }
    let version = le32(bytes, 8);
    if version < FORMAT_VERSION {
        return Err(CkptError::OlderVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version > FORMAT_VERSION {
        return Err(CkptError::NewerVersion {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_len = le64(bytes, 16);
    if body_len > MAX_BODY {
        return Err(err_corrupt(format!(
            "the header gives a body of {body_len} bytes, more than the {MAX_BODY} allowed"
        )));
    }
    let body = &bytes[HEADER_LEN..];
    if (body.len() as u64) < body_len {
        return Err(err_trunc(format!(
            "the body has {} of its {body_len} bytes",
            body.len()
        )));
    }
    if body.len() as u64 > body_len {
        return Err(err_corrupt(format!(
            "{} bytes follow the {body_len}-byte body",
            body.len() as u64 - body_len
        )));
    }
    let crc = crc32fast::hash(body);
    if crc != le32(bytes, 24) {
        return Err(err_corrupt(format!(
            "body checksum {:#010x}, computed {crc:#010x}",
            le32(bytes, 24)
        )));
    }
    let state: CheckpointState = serde_json::from_slice(body).map_err(|e| CkptError::Invalid {
        path: path.to_path_buf(),
        what: format!("the body does not describe a checkpoint: {e}"),
    })?;
    validate(path, &state)?;
    Ok(state)
}

/// Checks what the body says for consistency.
fn validate(path: &Path, state: &CheckpointState) -> Result<()> {
    let bad = |what: String| CkptError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    if state.systems.is_empty() {
        return Err(bad("no systems".into()));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut files = std::collections::BTreeSet::new();
    for (i, s) in state.systems.iter().enumerate() {
        if !names.insert(s.name.as_str()) {
            return Err(bad(format!("system {i}: name {:?} used twice", s.name)));
        }
        if s.cpus.is_empty() {
            return Err(bad(format!("system {:?}: no CPUs", s.name)));
        }
        let f = &s.ram.file;
        if f.is_empty() || f == "." || f == ".." || f == STATE_FILE || f.contains(['/', '\0']) {
            return Err(bad(format!(
                "system {:?}: RAM file name {f:?} is not a plain file name in the folder",
                s.name
            )));
        }
        if !files.insert(f.as_str()) {
            return Err(bad(format!(
                "system {:?}: RAM file {f:?} used twice",
                s.name
            )));
        }
        if s.ram.regions.is_empty() {
            return Err(bad(format!("system {:?}: no RAM regions", s.name)));
        }
        let mut regions = s.ram.regions.clone();
        regions.sort_by_key(|r| r.base);
        for (k, r) in regions.iter().enumerate() {
            let aligned = r.base % PAGE == 0 && r.size % PAGE == 0 && r.offset % PAGE == 0;
            if r.size == 0
                || !aligned
                || r.base.checked_add(r.size).is_none()
                || r.offset.checked_add(r.size).is_none()
                || usize::try_from(r.size).is_err()
            {
                return Err(bad(format!(
                    "system {:?}: RAM region base {:#x} size {:#x} offset {:#x} is empty, \
                     not page-aligned or out of range",
                    s.name, r.base, r.size, r.offset
                )));
            }
            if let Some(next) = regions.get(k + 1) {
                if r.base + r.size > next.base {
                    return Err(bad(format!(
                        "system {:?}: RAM regions at {:#x} and {:#x} overlap",
                        s.name, r.base, next.base
                    )));
                }
            }
        }
        regions.sort_by_key(|r| r.offset);
        for w in regions.windows(2) {
            if w[0].offset + w[0].size > w[1].offset {
                return Err(bad(format!(
                    "system {:?}: RAM regions at {:#x} and {:#x} overlap in the file",
                    s.name, w[0].base, w[1].base
                )));
            }
        }
    }
    for s in &state.systems {
        let mut disk_names = std::collections::BTreeSet::new();
        for (i, d) in s.disks.iter().enumerate() {
            let at = |field: &str| format!("system {:?}: disks[{i}].{field}", s.name);
            if d.name.is_empty() || !disk_names.insert(d.name.as_str()) {
                return Err(bad(format!(
                    "{}: {:?} is empty or used twice",
                    at("name"),
                    d.name
                )));
            }
            if d.image.size == 0 || d.image.size % SECTOR != 0 {
                return Err(bad(format!(
                    "{}: {} bytes is not a whole, non-zero number of {SECTOR}-byte sectors",
                    at("image.size"),
                    d.image.size
                )));
            }
            if d.image.mtime_nsec >= 1_000_000_000 {
                return Err(bad(format!(
                    "{}: {} is not below a second",
                    at("image.mtime_nsec"),
                    d.image.mtime_nsec
                )));
            }
            match (&d.saved, d.mode) {
                (None, DiskUse::Overlay) => {
                    return Err(bad(format!(
                        "{}: an overlay disk without its saved sectors",
                        at("saved")
                    )))
                }
                (Some(_), DiskUse::Writable | DiskUse::Readonly) => {
                    return Err(bad(format!(
                        "{}: saved sectors for a {} disk (only overlay disks have them)",
                        at("saved"),
                        d.mode.as_str()
                    )))
                }
                _ => {}
            }
            let Some(saved) = &d.saved else {
                continue;
            };
            let f = &saved.file;
            if f.is_empty()
                || f == "."
                || f == ".."
                || f == STATE_FILE
                || f.starts_with('.')
                || f.contains(['/', '\0'])
            {
                return Err(bad(format!(
                    "{}: {f:?} is not a plain file name in the folder",
                    at("saved.file")
                )));
            }
            if !files.insert(f.as_str()) {
                return Err(bad(format!(
                    "{}: {f:?} is another file of the checkpoint",
                    at("saved.file")
                )));
            }
            let sectors = d.image.size / SECTOR;
            let mut end = 0u64;
            for (k, &[first, count]) in saved.extents.iter().enumerate() {
                let field = at(&format!("saved.extents[{k}]"));
                let last = first.checked_add(count).filter(|&e| e <= sectors);
                match last {
                    _ if count == 0 => {
                        return Err(bad(format!("{field}: no sectors at {first}")));
                    }
                    None => {
                        return Err(bad(format!(
                            "{field}: {count} sectors at {first} run past the disk's \
                             {sectors} sectors"
                        )))
                    }
                    Some(_) if first < end => {
                        return Err(bad(format!(
                            "{field}: sector {first} lies before the end of the previous \
                             extent ({end}): extents overlap or are out of order"
                        )))
                    }
                    Some(e) => end = e,
                }
            }
        }
    }
    Ok(())
}

/// Creates the checkpoint folder `dir` (or takes an existing one that holds
/// no checkpoint).
pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if dir.join(STATE_FILE).exists() {
        return Err(CkptError::Exists(dir.to_path_buf()));
    }
    Ok(())
}

/// What writing a RAM file took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamWritten {
    /// Pages holding a non-zero byte, written.
    pub pages_written: u64,
    /// Pages of zeros, left as holes.
    pub pages_skipped: u64,
}

/// Writes the guest RAM `mem` into `dir/file` as a sparse file: every
/// region after the previous one, only pages with a non-zero byte written.
/// The file must not exist yet.
pub fn write_ram(dir: &Path, file: &str, mem: &GuestMemoryMmap) -> Result<(RamImage, RamWritten)> {
    let path = dir.join(file);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for r in mem.iter() {
        let size = r.len();
        regions.push(RamRegion {
            base: r.start_addr().0,
            size,
            offset,
        });
        offset = offset.saturating_add(size.div_ceil(PAGE) * PAGE);
    }
    let f = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path))?;
    f.set_len(offset).map_err(io(&path))?;
    let mut written = RamWritten {
        pages_written: 0,
        pages_skipped: 0,
    };
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    for r in &regions {
        let mut at = 0u64;
        while at < r.size {
            let n = (r.size - at).min(CHUNK) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(r.base + at))
                .map_err(|e| CkptError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(format!(
                        "reading guest RAM at {:#x}: {e}",
                        r.base + at
                    )),
                })?;
            // Runs of non-zero pages go out in one write each.
            let mut run: Option<usize> = None;
            let pages = n.div_ceil(PAGE as usize);
            for p in 0..=pages {
                let nonzero = p < pages && {
                    let page = &chunk[p * PAGE as usize..((p + 1) * PAGE as usize).min(n)];
                    page.iter().any(|&b| b != 0)
                };
                match (nonzero, run) {
                    (true, None) => run = Some(p),
                    (false, Some(start)) => {
                        let (a, b) = (start * PAGE as usize, (p * PAGE as usize).min(n));
                        f.write_all_at(&chunk[a..b], r.offset + at + a as u64)
                            .map_err(io(&path))?;
                        written.pages_written += (p - start) as u64;
                        run = None;
                    }
                    _ => {}
                }
                if p < pages && !nonzero {
                    written.pages_skipped += 1;
                }
            }
            at += n as u64;
        }
    }
    f.sync_all().map_err(io(&path))?;
    Ok((
        RamImage {
            file: file.to_string(),
            regions,
        },
        written,
    ))
}

/// Writes the state file into `dir` (last: through a temporary name and a
/// rename, so the folder holds a state file only when it is whole).
/// Returns its size.
pub fn write_state(dir: &Path, state: &CheckpointState) -> Result<u64> {
    validate(&dir.join(STATE_FILE), state)?;
    let bytes = encode_state(state);
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let path = dir.join(STATE_FILE);
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(bytes.len() as u64)
}

/// Reads and checks `dir`'s state file, and checks that every RAM file is
/// there and long enough.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join(STATE_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let len = f.metadata().map_err(io(&path))?.len();
    if len > MAX_BODY + HEADER_LEN as u64 {
        return Err(CkptError::Corrupted {
            path,
            what: format!("{len} bytes, more than any state file"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&f, MAX_BODY + HEADER_LEN as u64 + 1),
        &mut bytes,
    )
    .map_err(io(&path))?;
    let state = decode_state(&path, &bytes)?;
    for s in &state.systems {
        ram_file(dir, &s.ram)?;
        for d in &s.disks {
            if let Some(saved) = &d.saved {
                sector_file(dir, saved, d.image.size)?;
            }
        }
    }
    Ok(state)
}

/// Checks a disk's sector file: a regular file of the disk's size.
fn sector_file(dir: &Path, saved: &SavedSectors, size: u64) -> Result<PathBuf> {
    let path = dir.join(&saved.file);
    let meta = std::fs::metadata(&path).map_err(io(&path))?;
    if !meta.is_file() {
        return Err(CkptError::Invalid {
            path,
            what: "not a regular file (a disk's saved sectors)".into(),
        });
    }
    if meta.len() != size {
        return Err(CkptError::Truncated {
            path,
            what: format!(
                "{} bytes, the disk it holds sectors of has {size} bytes",
                meta.len()
            ),
        });
    }
    Ok(path)
}

/// Creates the sector file `file` of a disk in `dir` (it must not exist).
pub fn create_sector_file(dir: &Path, file: &str) -> Result<(File, PathBuf)> {
    let path = dir.join(file);
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io(&path))?;
    Ok((f, path))
}

/// Opens a system's RAM file and checks that it holds every region.
fn ram_file(dir: &Path, ram: &RamImage) -> Result<(File, PathBuf)> {
    let path = dir.join(&ram.file);
    let f = File::open(&path).map_err(io(&path))?;
    let len = f.metadata().map_err(io(&path))?.len();
    if len < ram.file_len() {
        return Err(CkptError::Truncated {
            path,
            what: format!("{len} bytes, the RAM regions need {} bytes", ram.file_len()),
        });
    }
    Ok((f, path))
}

/// Maps a system's RAM file privately (copy-on-write): each region at its
/// guest-physical base. Pages are read from the file on first touch; the
/// guest's writes stay in this process. The file must not be shortened
/// while mapped (a page beyond its end would fault the process).
pub fn map_ram(dir: &Path, ram: &RamImage) -> Result<GuestMemoryMmap> {
    let (f, path) = ram_file(dir, ram)?;
    let mut regions = Vec::with_capacity(ram.regions.len());
    for r in &ram.regions {
        let bad = |what: String| CkptError::Invalid {
            path: path.clone(),
            what,
        };
        let file = f.try_clone().map_err(io(&path))?;
        let size = usize::try_from(r.size)
            .map_err(|_| bad(format!("RAM region of {:#x} bytes", r.size)))?;
        let mapping = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file, r.offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| bad(format!("mapping the RAM region at {:#x}: {e}", r.base)))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.base))
            .ok_or_else(|| bad(format!("RAM region at {:#x} wraps around", r.base)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| CkptError::Invalid {
        path,
        what: format!("RAM regions: {e}"),
    })
}

/// Maps a system's RAM file privately ([`map_ram`]) as kvmsim's guest RAM
/// of the same size: the regions must be kvmsim's layout for that size.
pub fn map_guest_ram(dir: &Path, ram: &RamImage) -> Result<mem::GuestRam> {
    let path = dir.join(&ram.file);
    let bad = |what: String| CkptError::Invalid {
        path: path.clone(),
        what,
    };
    let map = mem::MemoryMap::for_size(ram.size())
        .map_err(|e| bad(format!("RAM of {} bytes: {e}", ram.size())))?;
    let memory = map_ram(dir, ram)?;
    mem::GuestRam::from_memory(map, memory).map_err(|e| bad(e.to_string()))
}

/// What `kvmsim checkpoint info` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Info {
    pub format_version: u32,
    pub kvmsim_version: String,
    pub tick: Tick,
    /// The state file's size in bytes.
    pub state_bytes: u64,
    pub systems: Vec<SystemInfo>,
}

/// One system in [`Info`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SystemInfo {
    pub name: String,
    pub cpus: usize,
    /// CPUs that were halted.
    pub halted_cpus: usize,
    pub devices: usize,
    pub ram_bytes: u64,
    pub ram_file: String,
    /// Bytes the RAM file takes on disk (allocated blocks).
    pub ram_bytes_on_disk: u64,
    pub disks: Vec<DiskInfo>,
}

/// One disk in [`SystemInfo`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskInfo {
    pub name: String,
    /// writable, readonly or overlay.
    pub mode: String,
    /// The image (an overlay disk's base).
    pub image: String,
    pub image_bytes: u64,
    /// An overlay disk's sector file.
    pub saved_file: Option<String>,
    /// Bytes of the sectors it holds.
    pub saved_bytes: u64,
    /// Bytes it takes on disk (allocated blocks).
    pub saved_bytes_on_disk: u64,
}

/// Reads `dir` and sums up what it holds.
pub fn info(dir: &Path) -> Result<Info> {
    let state = read_state(dir)?;
    let path = dir.join(STATE_FILE);
    let state_bytes = std::fs::metadata(&path).map_err(io(&path))?.len();
    let mut systems = Vec::new();
    for s in &state.systems {
        let ram_path = dir.join(&s.ram.file);
        let meta = std::fs::metadata(&ram_path).map_err(io(&ram_path))?;
        let mut disks = Vec::new();
        for d in &s.disks {
            let on_disk = match &d.saved {
                Some(saved) => {
                    let p = dir.join(&saved.file);
                    std::fs::metadata(&p).map_err(io(&p))?.blocks() * 512
                }
                None => 0,
            };
            disks.push(DiskInfo {
                name: d.name.clone(),
                mode: d.mode.as_str().into(),
                image: d.image.path.clone(),
                image_bytes: d.image.size,
                saved_file: d.saved.as_ref().map(|x| x.file.clone()),
                saved_bytes: d
                    .saved
                    .as_ref()
                    .map_or(0, |x| x.sectors().saturating_mul(SECTOR)),
                saved_bytes_on_disk: on_disk,
            });
        }
        systems.push(SystemInfo {
            name: s.name.clone(),
            cpus: s.cpus.len(),
            halted_cpus: s.cpus.iter().filter(|c| c.halted).count(),
            devices: s.devices.len(),
            ram_bytes: s.ram.size(),
            ram_file: s.ram.file.clone(),
            ram_bytes_on_disk: meta.blocks().saturating_mul(512),
            disks,
        });
    }
    Ok(Info {
        format_version: FORMAT_VERSION,
        kvmsim_version: state.kvmsim_version,
        tick: state.tick,
        state_bytes,
        systems,
    })
}

#[cfg(test)]
mod tests;
