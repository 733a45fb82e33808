//! Bounds-checked parsing of the few ELF fields a process image needs.

/// Why a program cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("{0}: not an ELF file (no \\x7fELF magic)")]
    NotElf(String),
    #[error("{0}: a 32-bit ELF; SE mode runs x86-64 (64-bit) programs only")]
    Elf32(String),
    #[error("{path}: {what} is {value:#x}; SE mode runs little-endian x86-64 Linux executables")]
    Foreign {
        path: String,
        what: &'static str,
        value: u64,
    },
    #[error("{path}: ELF type {kind} ({name}); SE mode runs executables (ET_EXEC) and position-independent ones (ET_DYN)")]
    BadType {
        path: String,
        kind: u16,
        name: &'static str,
    },
    #[error("{path}: {what}")]
    Malformed { path: String, what: String },
}

pub const PT_LOAD: u32 = 1;
pub const PT_INTERP: u32 = 3;
pub const PT_PHDR: u32 = 6;
pub const PT_GNU_STACK: u32 = 0x6474_e551;
pub const PF_X: u32 = 1;
pub const PF_W: u32 = 2;
pub const PF_R: u32 = 4;
pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;

/// A program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phdr {
    pub kind: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub align: u64,
}

/// What the loader needs of an executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elf {
    /// ET_EXEC or ET_DYN (static-pie: loaded at a base of kvmsim's choice).
    pub kind: u16,
    pub entry: u64,
    pub phoff: u64,
    pub phentsize: u16,
    pub phdrs: Vec<Phdr>,
    /// PT_INTERP's path (a dynamically linked program's loader, e.g.
    /// `/lib64/ld-linux-x86-64.so.2`).
    pub interp: Option<String>,
}

/// The most program headers accepted (Linux allows 64 KiB of them).
const MAX_PHDRS: usize = 1024;

fn field<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    field(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    field(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    field(b, off).map(u64::from_le_bytes)
}

/// Parses `image` (the file `path`) as an x86-64 Linux executable (static,
/// or naming its interpreter in PT_INTERP).
pub fn parse(image: &[u8], path: &str) -> Result<Elf, ElfError> {
    let bad = |what: String| ElfError::Malformed {
        path: path.into(),
        what,
    };
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotElf(path.into()));
    }
    let foreign = |what, value| ElfError::Foreign {
        path: path.into(),
        what,
        value,
    };
    match image.get(4) {
        Some(2) => {}
        Some(1) => return Err(ElfError::Elf32(path.into())),
        v => return Err(foreign("EI_CLASS", u64::from(v.copied().unwrap_or(0)))),
    }
    if image.get(5) != Some(&1) {
        return Err(foreign(
            "EI_DATA",
            u64::from(image.get(5).copied().unwrap_or(0)),
        ));
    }
    if image.len() < 64 {
        return Err(bad(format!(
            "the ELF header needs 64 bytes, the file has {}",
            image.len()
        )));
    }
    let machine = u16_at(image, 18).unwrap_or(0);
    if machine != 62 {
        return Err(foreign("e_machine", u64::from(machine)));
    }
    let kind = u16_at(image, 16).unwrap_or(0);
    if kind != ET_EXEC && kind != ET_DYN {
        let name = match kind {
            0 => "ET_NONE",
            1 => "ET_REL, an object file",
            4 => "ET_CORE, a core dump",
            _ => "unknown",
        };
        return Err(ElfError::BadType {
            path: path.into(),
            kind,
            name,
        });
    }
    let entry = u64_at(image, 24).unwrap_or(0);
    let phoff = u64_at(image, 32).unwrap_or(0);
    let phentsize = u16_at(image, 54).unwrap_or(0);
    let phnum = usize::from(u16_at(image, 56).unwrap_or(0));
    if phentsize != 56 {
        return Err(bad(format!("e_phentsize is {phentsize}, expected 56")));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(bad(format!(
            "e_phnum is {phnum} (1..={MAX_PHDRS} accepted)"
        )));
    }
    let mut phdrs = Vec::with_capacity(phnum);
    let mut interp = None;
    for i in 0..phnum {
        let at = usize::try_from(phoff)
            .ok()
            .and_then(|o| o.checked_add(i * 56))
            .filter(|&a| a.checked_add(56).is_some_and(|e| e <= image.len()))
            .ok_or_else(|| {
                bad(format!(
                    "program header {i} at e_phoff {phoff:#x} lies outside the file ({} bytes)",
                    image.len()
                ))
            })?;
        let p = Phdr {
            kind: u32_at(image, at).unwrap_or(0),
            flags: u32_at(image, at + 4).unwrap_or(0),
            offset: u64_at(image, at + 8).unwrap_or(0),
            vaddr: u64_at(image, at + 16).unwrap_or(0),
            filesz: u64_at(image, at + 32).unwrap_or(0),
            memsz: u64_at(image, at + 40).unwrap_or(0),
            align: u64_at(image, at + 48).unwrap_or(0),
        };
        if p.kind == PT_INTERP {
            let bytes = usize::try_from(p.offset)
                .ok()
                .and_then(|o| image.get(o..o.checked_add(usize::try_from(p.filesz).ok()?)?))
                .ok_or_else(|| {
                    bad(format!(
                        "PT_INTERP at offset {:#x}+{:#x} lies outside the file ({} bytes)",
                        p.offset,
                        p.filesz,
                        image.len()
                    ))
                })?;
            let name = bytes.strip_suffix(b"\0").unwrap_or(bytes);
            if name.is_empty() || name.len() > 4095 || name.contains(&0) || interp.is_some() {
                return Err(bad(format!(
                    "PT_INTERP is not one path of 1 to 4095 bytes ({:?})",
                    String::from_utf8_lossy(&name[..name.len().min(80)])
                )));
            }
            interp = Some(String::from_utf8_lossy(name).into_owned());
        }
        if p.kind == PT_LOAD {
            if p.filesz > p.memsz {
                return Err(bad(format!(
                    "segment {i}: p_filesz {:#x} exceeds p_memsz {:#x}",
                    p.filesz, p.memsz
                )));
            }
            let in_file = p
                .offset
                .checked_add(p.filesz)
                .is_some_and(|e| e <= image.len() as u64);
            if !in_file {
                return Err(bad(format!(
                    "segment {i}: file range {:#x}+{:#x} lies outside the file ({} bytes)",
                    p.offset,
                    p.filesz,
                    image.len()
                )));
            }
            if p.vaddr
                .checked_add(p.memsz)
                .is_none_or(|e| e > crate::USER_TOP)
            {
                return Err(bad(format!(
                    "segment {i}: {:#x}+{:#x} lies outside user space (below {:#x})",
                    p.vaddr,
                    p.memsz,
                    crate::USER_TOP
                )));
            }
            if p.offset % 4096 != p.vaddr % 4096 {
                return Err(bad(format!(
                    "segment {i}: p_offset {:#x} and p_vaddr {:#x} differ within a page",
                    p.offset, p.vaddr
                )));
            }
        }
        phdrs.push(p);
    }
    if !phdrs.iter().any(|p| p.kind == PT_LOAD) {
        return Err(bad("no loadable segment (PT_LOAD)".into()));
    }
    let elf = Elf {
        kind,
        entry,
        phoff,
        phentsize,
        phdrs,
        interp,
    };
    let (lo, hi) = elf.span();
    if !(lo..hi).contains(&entry) && kind == ET_EXEC {
        return Err(bad(format!(
            "entry {entry:#x} lies outside the loadable segments [{lo:#x}, {hi:#x})"
        )));
    }
    if kind == ET_DYN && entry >= hi - lo {
        return Err(bad(format!(
            "entry {entry:#x} lies outside the loadable segments (size {:#x})",
            hi - lo
        )));
    }
    Ok(elf)
}

impl Elf {
    /// The lowest and highest address (page-rounded) of the loadable
    /// segments, before relocation.
    pub fn span(&self) -> (u64, u64) {
        let loads = self.phdrs.iter().filter(|p| p.kind == PT_LOAD);
        let lo = loads.clone().map(|p| p.vaddr & !0xfff).min().unwrap_or(0);
        let hi = loads
            .map(|p| (p.vaddr + p.memsz + 0xfff) & !0xfff)
            .max()
            .unwrap_or(0);
        (lo, hi)
    }

    /// The virtual address of the program headers once loaded at `bias`:
    /// PT_PHDR's, else the segment holding e_phoff's bytes.
    pub fn phdr_addr(&self, bias: u64) -> u64 {
        if let Some(p) = self.phdrs.iter().find(|p| p.kind == PT_PHDR) {
            return p.vaddr.wrapping_add(bias);
        }
        self.phdrs
            .iter()
            .filter(|p| p.kind == PT_LOAD)
            .find(|p| self.phoff >= p.offset && self.phoff < p.offset + p.filesz)
            .map_or(0, |p| (self.phoff - p.offset + p.vaddr).wrapping_add(bias))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 executable: one PT_LOAD of `code` at `vaddr`.
    pub fn tiny(kind: u16, vaddr: u64, code: &[u8], extra: &[Phdr]) -> Vec<u8> {
        let phnum = 1 + extra.len();
        let data_off = 64 + 56 * phnum as u64;
        let mut b = vec![0u8; data_off as usize];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&kind.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&(vaddr + data_off).to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let load = Phdr {
            kind: PT_LOAD,
            flags: PF_R | PF_X,
            offset: 0,
            vaddr,
            filesz: data_off + code.len() as u64,
            memsz: data_off + code.len() as u64,
            align: 4096,
        };
        for (i, p) in std::iter::once(&load).chain(extra).enumerate() {
            let at = 64 + 56 * i;
            b[at..at + 4].copy_from_slice(&p.kind.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&p.flags.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&p.offset.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&p.vaddr.to_le_bytes());
            b[at + 24..at + 32].copy_from_slice(&p.vaddr.to_le_bytes());
            b[at + 32..at + 40].copy_from_slice(&p.filesz.to_le_bytes());
            b[at + 40..at + 48].copy_from_slice(&p.memsz.to_le_bytes());
            b[at + 48..at + 56].copy_from_slice(&p.align.to_le_bytes());
        }
        b.extend_from_slice(code);
        b
    }

    #[test]
    fn accepts_a_static_executable() {
        let img = tiny(ET_EXEC, 0x40_0000, &[0xf4], &[]);
        let e = parse(&img, "t").unwrap();
        assert_eq!(e.entry, 0x40_0000 + 120);
        assert_eq!(e.span(), (0x40_0000, 0x40_1000));
        assert_eq!(e.phdr_addr(0), 0x40_0040);
    }

    #[test]
    fn refuses_what_it_cannot_run_by_name() {
        assert_eq!(
            parse(b"#!/bin/sh\n", "s"),
            Err(ElfError::NotElf("s".into()))
        );
        let mut img = tiny(ET_EXEC, 0x40_0000, &[0xf4], &[]);
        img[4] = 1;
        assert_eq!(parse(&img, "x"), Err(ElfError::Elf32("x".into())));
        let rel = tiny(1, 0x40_0000, &[0xf4], &[]);
        assert!(parse(&rel, "o").unwrap_err().to_string().contains("ET_REL"));
        let interp = Phdr {
            kind: PT_INTERP,
            flags: PF_R,
            // The code's offset: after the ELF header and two program headers.
            offset: 64 + 2 * 56,
            vaddr: 0,
            filesz: 1,
            memsz: 1,
            align: 1,
        };
        let dynamic = tiny(ET_DYN, 0, b"/", &[interp]);
        assert_eq!(parse(&dynamic, "d").unwrap().interp.as_deref(), Some("/"));
        let outside = Phdr {
            offset: 1 << 20,
            ..interp
        };
        let e = parse(&tiny(ET_DYN, 0, b"/", &[outside]), "d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("PT_INTERP") && e.contains("outside"), "{e}");
        // Truncated headers and segments outside the file.
        assert!(parse(&img[..40], "t").is_err());
        let mut short = tiny(ET_EXEC, 0x40_0000, &[0xf4], &[]);
        short.truncate(100);
        assert!(parse(&short, "t").is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_garbage(mut bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            if bytes.len() > 6 {
                bytes[..4].copy_from_slice(b"\x7fELF");
                bytes[4] = 2;
                bytes[5] = 1;
            }
            let _ = parse(&bytes, "fuzz");
        }
    }
}
