//! Loads a bare-metal static x86-64 ELF into guest RAM.
//!
//! The image is checked first (it comes from the user and may be anything):
//! an x86-64 ELF executable whose loadable segments all lie in RAM at or
//! above 1 MiB (below is the boot area). Then linux-loader copies it in.

use std::io::Cursor;

use linux_loader::loader::{Elf, KernelLoader};
use mem::GuestRam;
use vm_memory::GuestAddress;

/// Why an image cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("{source_name}: not an ELF file (it starts with {magic:02x?}, not 7f 45 4c 46)")]
    NotElf { source_name: String, magic: Vec<u8> },
    #[error("{source_name}: {message}")]
    Unsupported {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: truncated or corrupt ELF ({message})")]
    Corrupt {
        source_name: String,
        message: String,
    },
    #[error(
        "{source_name}: segment {index} at [{start:#x}, {end:#x}) is outside guest RAM ({ram})"
    )]
    OutsideRam {
        source_name: String,
        index: usize,
        start: u64,
        end: u64,
        ram: String,
    },
    #[error("{source_name}: segment {index} at {start:#x} is below 1 MiB, where kvmsim keeps the boot GDT, page tables and stack; link the image at 0x100000 or above")]
    InBootArea {
        source_name: String,
        index: usize,
        start: u64,
    },
    #[error("{source_name}: entry point {entry:#x} is not inside a loaded segment")]
    BadEntry { source_name: String, entry: u64 },
    #[error("{source_name}: loading failed: {message}")]
    Load {
        source_name: String,
        message: String,
    },
}

/// A loadable segment: (file offset, file size, physical address, memory size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub filesz: u64,
    pub paddr: u64,
    pub memsz: u64,
}

/// What the ELF header and program headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

const PT_LOAD: u32 = 1;

/// Parses and checks the headers of `image`. Never panics, whatever the bytes.
pub fn inspect(image: &[u8], source_name: &str) -> Result<ElfInfo, LoadError> {
    let corrupt = |m: &str| LoadError::Corrupt {
        source_name: source_name.into(),
        message: m.into(),
    };
    let unsupported = |m: String| LoadError::Unsupported {
        source_name: source_name.into(),
        message: m,
    };
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(LoadError::NotElf {
            source_name: source_name.into(),
            magic: image.iter().take(4).copied().collect(),
        });
    }
    if image.get(4) != Some(&2) {
        return Err(unsupported(
            "a 32-bit ELF; kvmsim loads 64-bit x86-64 images".into(),
        ));
    }
    if image.get(5) != Some(&1) {
        return Err(unsupported(
            "a big-endian ELF; x86-64 images are little-endian".into(),
        ));
    }
    let e_type = u16_at(image, 16).ok_or_else(|| corrupt("ELF header cut short"))?;
    let machine = u16_at(image, 18).ok_or_else(|| corrupt("ELF header cut short"))?;
    if machine != 62 {
        return Err(unsupported(format!(
            "ELF machine {machine}, not x86-64 (62)"
        )));
    }
    if e_type != 2 {
        return Err(unsupported(format!(
            "ELF type {e_type} is not an executable (2); link a static, non-PIE image"
        )));
    }
    let entry = u64_at(image, 24).ok_or_else(|| corrupt("ELF header cut short"))?;
    let phoff = u64_at(image, 32).ok_or_else(|| corrupt("ELF header cut short"))?;
    let phentsize = u16_at(image, 54).ok_or_else(|| corrupt("ELF header cut short"))?;
    let phnum = u16_at(image, 56).ok_or_else(|| corrupt("ELF header cut short"))?;
    if phentsize < 56 {
        return Err(corrupt("program header entries are too small"));
    }
    let mut segments = Vec::new();
    for i in 0..u64::from(phnum) {
        let off = i
            .checked_mul(u64::from(phentsize))
            .and_then(|o| o.checked_add(phoff))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(|| corrupt("program header offset overflows"))?;
        let ph = image
            .get(off..off.saturating_add(56))
            .filter(|s| s.len() == 56)
            .ok_or_else(|| corrupt("program headers lie past the end of the file"))?;
        if u32_at(ph, 0) != Some(PT_LOAD) {
            continue;
        }
        let seg = Segment {
            offset: u64_at(ph, 8).unwrap_or(0),
            paddr: u64_at(ph, 24).unwrap_or(0),
            filesz: u64_at(ph, 32).unwrap_or(0),
            memsz: u64_at(ph, 40).unwrap_or(0),
        };
        if seg.filesz > seg.memsz {
            return Err(corrupt("a segment's file size exceeds its memory size"));
        }
        if seg
            .offset
            .checked_add(seg.filesz)
            .is_none_or(|end| end > image.len() as u64)
        {
            return Err(corrupt("a segment's data lies past the end of the file"));
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(unsupported("no loadable segments".into()));
    }
    Ok(ElfInfo { entry, segments })
}

/// Checks `info` against `ram` and loads `image`. Returns the entry point.
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    info: &ElfInfo,
    source_name: &str,
) -> Result<u64, LoadError> {
    let describe_ram = || {
        ram.map()
            .regions()
            .iter()
            .map(|r| format!("[{:#x}, {:#x})", r.base, r.end()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (index, s) in info.segments.iter().enumerate() {
        if s.memsz == 0 {
            continue;
        }
        if s.paddr < kvm::arch::x86_64::boot::MIN_LOAD_ADDR {
            return Err(LoadError::InBootArea {
                source_name: source_name.into(),
                index,
                start: s.paddr,
            });
        }
        if !ram.map().is_ram(s.paddr, s.memsz) {
            return Err(LoadError::OutsideRam {
                source_name: source_name.into(),
                index,
                start: s.paddr,
                end: s.paddr.saturating_add(s.memsz),
                ram: describe_ram(),
            });
        }
    }
    if !info
        .segments
        .iter()
        .any(|s| info.entry >= s.paddr && info.entry - s.paddr < s.memsz)
    {
        return Err(LoadError::BadEntry {
            source_name: source_name.into(),
            entry: info.entry,
        });
    }
    Elf::load(
        ram.memory(),
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(kvm::arch::x86_64::boot::MIN_LOAD_ADDR)),
    )
    .map_err(|e| LoadError::Load {
        source_name: source_name.into(),
        message: e.to_string(),
    })?;
    Ok(info.entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mem::MemoryMap;
    use vm_memory::Bytes;

    fn hello() -> &'static [u8] {
        guests::builtin("hello").unwrap()
    }

    #[test]
    fn loads_a_builtin_guest() {
        let ram = GuestRam::new(MemoryMap::for_size(4 << 20).unwrap()).unwrap();
        let info = inspect(hello(), "hello").unwrap();
        assert_eq!(load(&ram, hello(), &info, "hello"), Ok(0x100000));
        let s = info.segments[0];
        let mut first = [0u8; 4];
        ram.memory()
            .read_slice(&mut first, GuestAddress(s.paddr))
            .unwrap();
        assert_eq!(&first, &hello()[s.offset as usize..s.offset as usize + 4]);
    }

    #[test]
    fn rejects_non_elf_and_wrong_machine() {
        assert!(matches!(
            inspect(b"MZ\x90\x00", "x"),
            Err(LoadError::NotElf { .. })
        ));
        assert!(matches!(inspect(b"", "x"), Err(LoadError::NotElf { .. })));
        let mut img = hello().to_vec();
        img[18] = 3; // i386
        let e = inspect(&img, "x").unwrap_err().to_string();
        assert!(e.contains("not x86-64"), "{e}");
        let mut img = hello().to_vec();
        img[4] = 1;
        assert!(inspect(&img, "x")
            .unwrap_err()
            .to_string()
            .contains("32-bit"));
    }

    #[test]
    fn rejects_segments_outside_ram() {
        let ram = GuestRam::new(MemoryMap::for_size(1 << 20).unwrap()).unwrap();
        let info = inspect(hello(), "hello").unwrap();
        let e = load(&ram, hello(), &info, "hello").unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::OutsideRam {
                    index: 0,
                    start: 0x100000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("outside guest RAM ([0x0, 0x100000))"),
            "{e}"
        );
    }

    #[test]
    fn rejects_segments_in_the_boot_area() {
        let ram = GuestRam::new(MemoryMap::for_size(4 << 20).unwrap()).unwrap();
        let mut info = inspect(hello(), "hello").unwrap();
        info.segments[0].paddr = 0x1000;
        assert!(matches!(
            load(&ram, hello(), &info, "hello"),
            Err(LoadError::InBootArea { .. })
        ));
    }

    #[test]
    fn rejects_truncated_images() {
        let img = hello();
        for cut in [20, 40, 63, 64, 100] {
            assert!(inspect(&img[..cut], "x").is_err(), "cut at {cut}");
        }
    }

    proptest::proptest! {
        #[test]
        fn inspect_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), flip in 0usize..512, v: u8) {
            let _ = inspect(&bytes, "fuzz");
            let mut img = hello().to_vec();
            let i = flip % img.len();
            img[i] = v;
            let _ = inspect(&img, "fuzz");
        }
    }
}
