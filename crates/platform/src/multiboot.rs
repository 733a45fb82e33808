//! Multiboot (version 1) kernels: finding and checking the header, loading
//! the image, and writing the boot information the kernel is entered with.
//!
//! A Multiboot kernel carries a 12-byte header (magic 0x1BADB002, flags,
//! checksum) 4-byte aligned in its first 8 KiB. Its loadable parts come from
//! the header's address fields when flag bit 16 is set (the "a.out kludge"),
//! else from its ELF program headers (ELF32 or ELF64, loaded at their
//! physical addresses). kvmsim enters it as the specification says: 32-bit
//! protected mode, flat segments, no paging, EAX = 0x2BADB002 and EBX = the
//! information structure, which carries mem_lower/mem_upper, the memory
//! map (the same map a Linux kernel gets as E820), the command line (the
//! kernel's name then `append`, as QEMU builds it) and the modules given as
//! `initrd` (several separated by commas, each `PATH [ARGS]`, as QEMU's
//! `-initrd`).
//!
//! Everything here reads bytes a user handed in: every field is
//! bounds-checked and a refusal names the file, the field and its value.

use mem::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::loader::Segment;

/// The header's magic value.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// What EAX holds when a Multiboot kernel is entered.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie entirely within this many bytes of the file's start.
pub const SEARCH_LIMIT: usize = 8192;
/// Where the boot information goes (as QEMU puts it): the structure, the
/// memory map, the module list and every string, below [`INFO_END`].
pub const INFO_ADDR: u64 = 0x9000;
/// The end of the boot-information area (the MP table follows).
pub const INFO_END: u64 = crate::firmware::MPTABLE;
/// Kernels load at or above 1 MiB (below is the boot information and the
/// firmware tables; the guest may use that memory once it runs).
pub const MIN_LOAD: u64 = 0x10_0000;
/// The most modules kvmsim hands a kernel.
pub const MAX_MODULES: usize = 64;

/// Header flag bits kvmsim understands: 0 (page-align modules; kvmsim
/// always does), 1 (memory information; always given), 2 (video mode;
/// kvmsim has no display and leaves the video fields unset, as QEMU does)
/// and 16 (the address fields are valid).
const KNOWN_FLAGS: u32 = 0b111 | (1 << 16);
/// Flag bit 16: load from the header's address fields.
const FLAG_AOUT: u32 = 1 << 16;

/// Why a Multiboot kernel cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MultibootError {
    /// A header field (or ELF field) holds a value kvmsim cannot use.
    #[error("{source_name}: Multiboot {field} = {value:#x}: {message}")]
    Field {
        source_name: String,
        field: &'static str,
        value: u64,
        message: String,
    },
    /// The image is cut short or inconsistent.
    #[error("{source_name}: Multiboot kernel: {message}")]
    Corrupt {
        source_name: String,
        message: String,
    },
    /// A module (from `initrd`) that cannot be handed over.
    #[error("Multiboot module {index} ({path}): {message}")]
    Module {
        index: usize,
        path: String,
        message: String,
    },
    /// The boot information does not fit where it goes.
    #[error("Multiboot boot information: {0}")]
    Info(String),
}

/// The optional address fields (flag bit 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressFields {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// A checked Multiboot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// File offset of the magic.
    pub offset: usize,
    pub flags: u32,
    pub address: Option<AddressFields>,
}

/// A Multiboot kernel ready to load: what goes where, and the entry point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub header: Header,
    pub segments: Vec<Segment>,
    pub entry: u32,
}

impl Kernel {
    /// The first address past every loaded byte (bss included).
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.paddr.saturating_add(s.memsz))
            .max()
            .unwrap_or(0)
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The offset of the first Multiboot header in `image` (magic, and flags
/// and checksum summing to zero with it), searched 4-byte aligned within
/// the first [`SEARCH_LIMIT`] bytes. `None`: not a Multiboot kernel.
pub fn find_header(image: &[u8]) -> Option<usize> {
    let window = &image[..image.len().min(SEARCH_LIMIT)];
    (0..window.len().saturating_sub(11))
        .step_by(4)
        .find(|&off| {
            let (Some(m), Some(f), Some(c)) = (
                u32_at(window, off),
                u32_at(window, off + 4),
                u32_at(window, off + 8),
            ) else {
                return false;
            };
            m == HEADER_MAGIC && m.wrapping_add(f).wrapping_add(c) == 0
        })
}

/// Whether `image` is a Multiboot kernel (a header in its first 8 KiB).
pub fn is_multiboot(image: &[u8]) -> bool {
    find_header(image).is_some()
}

/// Parses and checks the header of `image` and works out what to load
/// where. Never panics, whatever the bytes.
pub fn parse(image: &[u8], source_name: &str) -> Result<Kernel, MultibootError> {
    let corrupt = |m: String| MultibootError::Corrupt {
        source_name: source_name.into(),
        message: m,
    };
    let field = |field: &'static str, value: u64, m: String| MultibootError::Field {
        source_name: source_name.into(),
        field,
        value,
        message: m,
    };
    let offset = find_header(image).ok_or_else(|| {
        corrupt(format!(
            "no header (magic {HEADER_MAGIC:#x} with a valid checksum) in the first {SEARCH_LIMIT} bytes"
        ))
    })?;
    let flags = u32_at(image, offset + 4).unwrap_or(0);
    let unknown = flags & !KNOWN_FLAGS & 0xffff;
    if unknown != 0 {
        return Err(field(
            "header flags",
            u64::from(flags),
            format!(
                "required feature bits {unknown:#x} are unknown to kvmsim (it knows bits 0-2 and 16)"
            ),
        ));
    }
    if flags & FLAG_AOUT != 0 {
        // The header holds 8 words when the address fields are valid.
        let at = |i: usize| u32_at(image, offset + 12 + 4 * i);
        let (
            Some(header_addr),
            Some(load_addr),
            Some(load_end_addr),
            Some(bss_end_addr),
            Some(entry_addr),
        ) = (at(0), at(1), at(2), at(3), at(4))
        else {
            return Err(corrupt(format!(
                "flag bit 16 is set but the header at file offset {offset:#x} is cut short before its address fields"
            )));
        };
        let address = AddressFields {
            header_addr,
            load_addr,
            load_end_addr,
            bss_end_addr,
            entry_addr,
        };
        let header = Header {
            offset,
            flags,
            address: Some(address),
        };
        let segment = address_layout(image.len(), offset, &address, &field)?;
        if !(u64::from(entry_addr) >= segment.paddr
            && u64::from(entry_addr) - segment.paddr < segment.memsz)
        {
            return Err(field(
                "entry_addr",
                u64::from(entry_addr),
                format!(
                    "not inside the loaded image [{:#x}, {:#x})",
                    segment.paddr,
                    segment.paddr + segment.memsz
                ),
            ));
        }
        return Ok(Kernel {
            header,
            segments: vec![segment],
            entry: entry_addr,
        });
    }
    let header = Header {
        offset,
        flags,
        address: None,
    };
    if image.get(..4) != Some(b"\x7fELF") {
        return Err(field(
            "header flags",
            u64::from(flags),
            "bit 16 (address fields) is clear and the image is not an ELF file: nothing says where to load it".into(),
        ));
    }
    let (segments, entry) = elf_layout(image, &field, &corrupt)?;
    Ok(Kernel {
        header,
        segments,
        entry,
    })
}

type FieldErr<'a> = dyn Fn(&'static str, u64, String) -> MultibootError + 'a;

/// The one segment the address fields describe.
fn address_layout(
    file_len: usize,
    offset: usize,
    a: &AddressFields,
    field: &FieldErr,
) -> Result<Segment, MultibootError> {
    if a.header_addr < a.load_addr {
        return Err(field(
            "header_addr",
            u64::from(a.header_addr),
            format!("below load_addr {:#x}", a.load_addr),
        ));
    }
    let before = u64::from(a.header_addr - a.load_addr);
    let file_start = (offset as u64).checked_sub(before).ok_or_else(|| {
        field(
            "load_addr",
            u64::from(a.load_addr),
            format!(
                "the header would lie {before:#x} bytes into the image, but it is at file offset {offset:#x}"
            ),
        )
    })?;
    let file_len = file_len as u64;
    let filesz = if a.load_end_addr == 0 {
        file_len - file_start
    } else {
        if a.load_end_addr < a.load_addr {
            return Err(field(
                "load_end_addr",
                u64::from(a.load_end_addr),
                format!("below load_addr {:#x}", a.load_addr),
            ));
        }
        let n = u64::from(a.load_end_addr - a.load_addr);
        if file_start + n > file_len {
            return Err(field(
                "load_end_addr",
                u64::from(a.load_end_addr),
                format!(
                    "asks for {n:#x} bytes from file offset {file_start:#x}, past the end of the {file_len}-byte file"
                ),
            ));
        }
        n
    };
    let memsz = if a.bss_end_addr == 0 {
        filesz
    } else {
        let end = u64::from(a.bss_end_addr);
        if end < u64::from(a.load_addr) + filesz {
            return Err(field(
                "bss_end_addr",
                end,
                format!(
                    "below the end of the loaded data ({:#x})",
                    u64::from(a.load_addr) + filesz
                ),
            ));
        }
        end - u64::from(a.load_addr)
    };
    Ok(Segment {
        offset: file_start,
        filesz,
        paddr: u64::from(a.load_addr),
        memsz,
    })
}

const PT_LOAD: u32 = 1;

/// The loadable segments of an ELF32 or ELF64 image (at their physical
/// addresses) and the entry point (translated to a physical address when
/// it lies in a segment linked elsewhere than it loads).
fn elf_layout(
    image: &[u8],
    field: &FieldErr,
    corrupt: &dyn Fn(String) -> MultibootError,
) -> Result<(Vec<Segment>, u32), MultibootError> {
    let short = || corrupt("ELF header cut short".into());
    let class = *image.get(4).ok_or_else(short)?;
    if class != 1 && class != 2 {
        return Err(field(
            "ELF class",
            u64::from(class),
            "neither ELF32 (1) nor ELF64 (2)".into(),
        ));
    }
    if image.get(5) != Some(&1) {
        return Err(field(
            "ELF data encoding",
            u64::from(*image.get(5).ok_or_else(short)?),
            "not little-endian (1)".into(),
        ));
    }
    let e_type = u16_at(image, 16).ok_or_else(short)?;
    if e_type != 2 {
        return Err(field(
            "ELF type",
            u64::from(e_type),
            "not an executable (2)".into(),
        ));
    }
    let machine = u16_at(image, 18).ok_or_else(short)?;
    if machine != 3 && machine != 62 {
        return Err(field(
            "ELF machine",
            u64::from(machine),
            "neither i386 (3) nor x86-64 (62)".into(),
        ));
    }
    let elf64 = class == 2;
    let (entry, phoff, phentsize, phnum, min_ent) = if elf64 {
        (
            u64_at(image, 24).ok_or_else(short)?,
            u64_at(image, 32).ok_or_else(short)?,
            u16_at(image, 54).ok_or_else(short)?,
            u16_at(image, 56).ok_or_else(short)?,
            56u16,
        )
    } else {
        (
            u64::from(u32_at(image, 24).ok_or_else(short)?),
            u64::from(u32_at(image, 28).ok_or_else(short)?),
            u16_at(image, 42).ok_or_else(short)?,
            u16_at(image, 44).ok_or_else(short)?,
            32u16,
        )
    };
    if phentsize < min_ent {
        return Err(field(
            "ELF e_phentsize",
            u64::from(phentsize),
            format!("smaller than a program header ({min_ent})"),
        ));
    }
    let mut segments = Vec::new();
    // (vaddr, paddr, memsz) of each loaded segment, for the entry point.
    let mut spans = Vec::new();
    for i in 0..u64::from(phnum) {
        let off = i
            .checked_mul(u64::from(phentsize))
            .and_then(|o| o.checked_add(phoff))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(|| {
                field(
                    "ELF e_phoff",
                    phoff,
                    "program header offset overflows".into(),
                )
            })?;
        let ph = image
            .get(off..off.saturating_add(usize::from(min_ent)))
            .filter(|s| s.len() == usize::from(min_ent))
            .ok_or_else(|| {
                field(
                    "ELF e_phoff",
                    phoff,
                    format!(
                        "program header {i} lies past the end of the {}-byte file",
                        image.len()
                    ),
                )
            })?;
        if u32_at(ph, 0) != Some(PT_LOAD) {
            continue;
        }
        let g32 = |o: usize| u64::from(u32_at(ph, o).unwrap_or(0));
        let g64 = |o: usize| u64_at(ph, o).unwrap_or(0);
        let (offset, vaddr, paddr, filesz, memsz) = if elf64 {
            (g64(8), g64(16), g64(24), g64(32), g64(40))
        } else {
            (g32(4), g32(8), g32(12), g32(16), g32(20))
        };
        if filesz > memsz {
            return Err(field(
                "ELF p_filesz",
                filesz,
                format!("segment {i}'s file size exceeds its memory size {memsz:#x}"),
            ));
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|e| e > image.len() as u64)
        {
            return Err(field(
                "ELF p_offset",
                offset,
                format!(
                    "segment {i}'s {filesz:#x} bytes lie past the end of the {}-byte file",
                    image.len()
                ),
            ));
        }
        if memsz == 0 {
            continue;
        }
        if paddr.checked_add(memsz).is_none_or(|e| e > 1 << 32) {
            return Err(field(
                "ELF p_paddr",
                paddr,
                format!("segment {i} ({memsz:#x} bytes) does not end below 4 GiB, which a 32-bit entry needs"),
            ));
        }
        segments.push(Segment {
            offset,
            filesz,
            paddr,
            memsz,
        });
        spans.push((vaddr, paddr, memsz));
    }
    if segments.is_empty() {
        return Err(corrupt("the ELF file has no loadable segments".into()));
    }
    let phys = spans
        .iter()
        .find(|&&(v, _, m)| entry >= v && entry - v < m)
        .map(|&(v, p, _)| p + (entry - v))
        .or_else(|| {
            spans
                .iter()
                .any(|&(_, p, m)| entry >= p && entry - p < m)
                .then_some(entry)
        })
        .ok_or_else(|| field("ELF e_entry", entry, "not inside a loadable segment".into()))?;
    let entry =
        u32::try_from(phys).map_err(|_| field("ELF e_entry", entry, "not below 4 GiB".into()))?;
    Ok((segments, entry))
}

/// Copies the kernel into `ram` (bss zeroed) after checking that every
/// segment lies in RAM at or above [`MIN_LOAD`].
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    k: &Kernel,
    source_name: &str,
) -> Result<(), MultibootError> {
    for (i, s) in k.segments.iter().enumerate() {
        if s.paddr < MIN_LOAD {
            return Err(MultibootError::Field {
                source_name: source_name.into(),
                field: "load address",
                value: s.paddr,
                message: format!(
                    "segment {i} starts below 1 MiB, where kvmsim puts the boot information; link the kernel at 0x100000 or above"
                ),
            });
        }
        if !ram.map().is_ram(s.paddr, s.memsz) {
            return Err(MultibootError::Field {
                source_name: source_name.into(),
                field: "load address",
                value: s.paddr,
                message: format!(
                    "segment {i} [{:#x}, {:#x}) is outside guest RAM ({} bytes); give the system more memory",
                    s.paddr,
                    s.paddr.saturating_add(s.memsz),
                    ram.map().total()
                ),
            });
        }
    }
    let mem = ram.memory();
    let write_err = |e: vm_memory::GuestMemoryError| MultibootError::Corrupt {
        source_name: source_name.into(),
        message: format!("loading failed: {e}"),
    };
    for s in &k.segments {
        // Both checked by `parse`: inside the file.
        let (from, n) = (s.offset as usize, s.filesz as usize);
        let data = image
            .get(from..from + n)
            .ok_or_else(|| MultibootError::Corrupt {
                source_name: source_name.into(),
                message: "a segment lies past the end of the file".into(),
            })?;
        mem.write_slice(data, GuestAddress(s.paddr))
            .map_err(write_err)?;
        let mut zero_at = s.paddr + s.filesz;
        let zeros = [0u8; 4096];
        while zero_at < s.paddr + s.memsz {
            let n = (s.paddr + s.memsz - zero_at).min(zeros.len() as u64) as usize;
            mem.write_slice(&zeros[..n], GuestAddress(zero_at))
                .map_err(write_err)?;
            zero_at += n as u64;
        }
    }
    Ok(())
}

/// One module named in `initrd`: the file, and the string the kernel gets
/// (the whole item: path and arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    pub path: String,
    pub string: String,
}

/// Splits an `initrd` value into modules as QEMU does: items separated by
/// commas (",," is a literal comma), each `PATH [ARGS]`; empty items are
/// skipped.
pub fn module_specs(initrd: &str) -> Vec<ModuleSpec> {
    let mut items = vec![String::new()];
    let mut chars = initrd.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                items.last_mut().expect("never empty").push(',');
            } else {
                items.push(String::new());
            }
        } else {
            items.last_mut().expect("never empty").push(c);
        }
    }
    items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .map(|string| ModuleSpec {
            path: string.split(' ').next().unwrap_or("").to_string(),
            string,
        })
        .collect()
}

/// The files an `initrd` value names: itself if that file exists (a Linux
/// initrd, or one module), else each module's path.
pub fn initrd_paths(initrd: &str) -> Vec<String> {
    if std::path::Path::new(initrd).exists() {
        return vec![initrd.to_string()];
    }
    let paths: Vec<String> = module_specs(initrd).into_iter().map(|m| m.path).collect();
    if paths.is_empty() {
        vec![initrd.to_string()]
    } else {
        paths
    }
}

/// `initrd` with every relative module path made relative to `base` (the
/// config file's folder); a value naming an existing file under `base` is
/// taken whole.
pub fn resolve_initrd(initrd: &str, base: &std::path::Path) -> String {
    let rel = |p: &str| {
        if std::path::Path::new(p).is_relative() {
            base.join(p).to_string_lossy().into_owned()
        } else {
            p.to_string()
        }
    };
    if base.join(initrd).exists() || !initrd.contains([',', ' ']) {
        return rel(initrd);
    }
    module_specs(initrd)
        .iter()
        .map(|m| {
            let rest = &m.string[m.path.len()..];
            format!("{}{rest}", rel(&m.path)).replace(',', ",,")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A module's bytes and string, read by the caller.
pub struct Module {
    pub data: Vec<u8>,
    pub string: String,
}

/// Where things went (for logs and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// The information structure (EBX).
    pub info: u32,
    /// Each module's [start, end).
    pub modules: Vec<(u32, u32)>,
}

/// Info structure flags.
const INFO_MEM: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
/// The information structure's size (up to and including the VBE fields).
const INFO_SIZE: usize = 88;

/// Writes the modules (page-aligned, above `kernel_end`) and the boot
/// information (at [`INFO_ADDR`]) for a kernel entered with `cmdline`.
pub fn write_boot_info(
    ram: &GuestRam,
    kernel_end: u64,
    cmdline: &str,
    modules: &[Module],
) -> Result<BootInfo, MultibootError> {
    if modules.len() > MAX_MODULES {
        return Err(MultibootError::Info(format!(
            "{} modules; at most {MAX_MODULES} are handed over",
            modules.len()
        )));
    }
    let map = ram.map();
    let mem = ram.memory();
    let merr =
        |e: vm_memory::GuestMemoryError| MultibootError::Info(format!("writing guest memory: {e}"));
    // Modules: page-aligned, one after the other, in the RAM below 4 GiB.
    let low = map
        .regions()
        .iter()
        .find(|r| r.base <= MIN_LOAD && r.end() > MIN_LOAD)
        .map_or(0, |r| r.end());
    let mut at = kernel_end.max(MIN_LOAD).next_multiple_of(4096);
    let mut placed = Vec::with_capacity(modules.len());
    for (index, m) in modules.iter().enumerate() {
        let end = at + m.data.len() as u64;
        if end > low {
            return Err(MultibootError::Module {
                index,
                path: m.string.clone(),
                message: format!(
                    "{} bytes do not fit in RAM at {at:#x} (RAM below the device hole ends at {low:#x}); give the system more memory",
                    m.data.len()
                ),
            });
        }
        mem.write_slice(&m.data, GuestAddress(at)).map_err(merr)?;
        placed.push((at as u32, end as u32));
        at = end.next_multiple_of(4096);
    }

    // The area: the structure, the memory map, the module list, strings.
    let mut area: Vec<u8> = vec![0; INFO_SIZE];
    let put = |area: &mut Vec<u8>, off: usize, v: u32| {
        area[off..off + 4].copy_from_slice(&v.to_le_bytes());
    };
    let addr_of = |area: &Vec<u8>| (INFO_ADDR + area.len() as u64) as u32;
    let e820 = crate::firmware::e820(map);
    let mem_lower = e820
        .iter()
        .find(|e| e.0 == 0 && e.2 == crate::firmware::E820_RAM)
        .map_or(0, |e| e.1 / 1024);
    let mem_upper = map
        .regions()
        .iter()
        .find(|r| r.base <= MIN_LOAD && r.end() > MIN_LOAD)
        .map_or(0, |r| (r.end() - MIN_LOAD) / 1024);
    let mut flags = INFO_MEM | INFO_MMAP | INFO_CMDLINE | INFO_LOADER_NAME;
    put(&mut area, 4, mem_lower as u32);
    put(&mut area, 8, mem_upper as u32);
    // The memory map: entries of (size = 20, base, length, type).
    let mmap_addr = addr_of(&area);
    for &(base, len, ty) in &e820 {
        area.extend_from_slice(&20u32.to_le_bytes());
        area.extend_from_slice(&base.to_le_bytes());
        area.extend_from_slice(&len.to_le_bytes());
        area.extend_from_slice(&ty.to_le_bytes());
    }
    let mmap_len = addr_of(&area) - mmap_addr;
    put(&mut area, 44, mmap_len);
    put(&mut area, 48, mmap_addr);
    let string = |area: &mut Vec<u8>, s: &str| {
        let a = addr_of(area);
        area.extend_from_slice(s.as_bytes());
        area.push(0);
        a
    };
    let c = string(&mut area, cmdline);
    put(&mut area, 16, c);
    let name = string(&mut area, "kvmsim");
    put(&mut area, 64, name);
    if !modules.is_empty() {
        flags |= INFO_MODS;
        let strings: Vec<u32> = modules
            .iter()
            .map(|m| string(&mut area, &m.string))
            .collect();
        while !area.len().is_multiple_of(16) {
            area.push(0);
        }
        let list = addr_of(&area);
        for (&(start, end), s) in placed.iter().zip(strings) {
            for v in [start, end, s, 0] {
                area.extend_from_slice(&v.to_le_bytes());
            }
        }
        put(&mut area, 20, modules.len() as u32);
        put(&mut area, 24, list);
    }
    put(&mut area, 0, flags);
    if INFO_ADDR + area.len() as u64 > INFO_END {
        return Err(MultibootError::Info(format!(
            "{} bytes (command line and module names) do not fit in the {} bytes at {INFO_ADDR:#x}; shorten them",
            area.len(),
            INFO_END - INFO_ADDR
        )));
    }
    mem.write_slice(&area, GuestAddress(INFO_ADDR))
        .map_err(merr)?;
    Ok(BootInfo {
        info: INFO_ADDR as u32,
        modules: placed,
    })
}

/// Everything a Multiboot kernel gets besides itself, for system `sc`:
/// the modules from `initrd`, the command line (the kernel's name, then
/// `append`, as QEMU builds it), the boot information, and the firmware
/// tables a PC has (MP table, ACPI), which kernels may look for. Returns
/// the boot information's address (EBX) and fills in `sc.cmdline`.
pub fn setup(
    sc: &mut crate::config::SystemConfig,
    k: &Kernel,
    ram: &GuestRam,
    cpus: u8,
) -> Result<u32, crate::PlatformError> {
    let specs = sc.initrd.as_deref().map(module_specs).unwrap_or_default();
    if specs.len() > MAX_MODULES {
        return Err(MultibootError::Info(format!(
            "{} modules in initrd; at most {MAX_MODULES} are handed over",
            specs.len()
        ))
        .into());
    }
    let mut modules = Vec::with_capacity(specs.len());
    for spec in specs {
        let data = crate::input::read_file(
            &spec.path,
            "Multiboot module",
            &crate::input::Limit::initrd(ram.map().total()),
        )?;
        modules.push(Module {
            data,
            string: spec.string,
        });
    }
    let mut line = sc.kernel.clone();
    if let Some(a) = sc.append.as_deref().filter(|a| !a.trim().is_empty()) {
        line.push(' ');
        line.push_str(a.trim());
    }
    let boot = write_boot_info(ram, k.end(), &line, &modules)?;
    let fwerr = |e: crate::firmware::FirmwareError| {
        crate::PlatformError::Kernel(format!("{}: {e}", sc.kernel))
    };
    crate::firmware::write_mp_table(ram.memory(), cpus, cpus).map_err(fwerr)?;
    crate::firmware::write_acpi(ram.memory(), cpus, cpus).map_err(fwerr)?;
    for (i, (s, e)) in boot.modules.iter().enumerate() {
        tracing::debug!("Multiboot module {i} at [{s:#x}, {e:#x})");
    }
    sc.cmdline = Some(line);
    Ok(boot.info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mem::MemoryMap;

    /// A header with `flags` (and address fields if given) at `off`.
    fn header(img: &mut Vec<u8>, off: usize, flags: u32, addr: Option<[u32; 5]>) {
        let mut words = vec![
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
        ];
        if let Some(a) = addr {
            words.extend_from_slice(&a);
        }
        if img.len() < off + 4 * words.len() {
            img.resize(off + 4 * words.len(), 0);
        }
        for (i, w) in words.iter().enumerate() {
            img[off + 4 * i..off + 4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
    }

    /// An ELF32 executable with one segment at `paddr` holding `code`.
    fn elf32(paddr: u32, code: &[u8], bss: u32) -> Vec<u8> {
        let mut img = vec![0u8; 0x100];
        img[..4].copy_from_slice(b"\x7fELF");
        img[4] = 1;
        img[5] = 1;
        img[6] = 1;
        img[16..18].copy_from_slice(&2u16.to_le_bytes());
        img[18..20].copy_from_slice(&3u16.to_le_bytes());
        img[24..28].copy_from_slice(&paddr.to_le_bytes());
        img[28..32].copy_from_slice(&0x34u32.to_le_bytes());
        img[42..44].copy_from_slice(&32u16.to_le_bytes());
        img[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x34;
        let w = |img: &mut Vec<u8>, o: usize, v: u32| {
            img[ph + o..ph + o + 4].copy_from_slice(&v.to_le_bytes())
        };
        w(&mut img, 0, 1);
        w(&mut img, 4, 0x100);
        w(&mut img, 8, paddr);
        w(&mut img, 12, paddr);
        w(&mut img, 16, code.len() as u32);
        w(&mut img, 20, code.len() as u32 + bss);
        img.extend_from_slice(code);
        header(&mut img, 0x60, 0, None);
        img
    }

    fn ram(size: u64) -> GuestRam {
        GuestRam::new(MemoryMap::for_size(size).unwrap()).unwrap()
    }

    #[test]
    fn finds_the_header_only_with_a_valid_checksum_in_8k() {
        let mut img = vec![0u8; 16384];
        header(&mut img, 0x1ff4, 0, None);
        assert_eq!(find_header(&img), Some(0x1ff4));
        let mut img = vec![0u8; 16384];
        header(&mut img, 0x1ff8, 0, None); // ends past 8 KiB
        assert_eq!(find_header(&img), None);
        let mut img = vec![0u8; 64];
        header(&mut img, 8, 0, None);
        img[16] ^= 1; // checksum broken
        assert_eq!(find_header(&img), None);
        let mut img = vec![0u8; 64];
        header(&mut img, 6, 0, None); // not 4-byte aligned
        assert_eq!(find_header(&img), None);
        assert!(!is_multiboot(guests::builtin("hello").unwrap()));
    }

    #[test]
    fn elf32_kernels_load_with_bss_zeroed() {
        let img = elf32(0x20_0000, &[0xf4, 0xeb, 0xfd], 0x2000);
        let k = parse(&img, "k").unwrap();
        assert_eq!(k.entry, 0x20_0000);
        assert_eq!(k.end(), 0x20_0000 + 3 + 0x2000);
        let r = ram(8 << 20);
        r.memory()
            .write_slice(&[0xaa; 16], GuestAddress(0x20_0003))
            .unwrap();
        load(&r, &img, &k, "k").unwrap();
        let mut b = [0u8; 8];
        r.memory()
            .read_slice(&mut b, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(b, [0xf4, 0xeb, 0xfd, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn elf64_kernels_load_too() {
        // The built-in multiboot guest is an ELF64 with a 32-bit entry.
        let img = guests::builtin("multiboot").unwrap();
        let k = parse(img, "builtin:multiboot").unwrap();
        assert!(k.entry >= 0x10_0000);
        load(&ram(8 << 20), img, &k, "mb").unwrap();
    }

    #[test]
    fn the_address_fields_win_and_are_checked() {
        // header at file offset 0x10, loaded at 0x100000 from file offset 0.
        let mut img = vec![0x90u8; 0x400];
        header(
            &mut img,
            0x10,
            1 << 16,
            Some([0x10_0010, 0x10_0000, 0x10_0200, 0x10_1000, 0x10_0040]),
        );
        let k = parse(&img, "k").unwrap();
        assert_eq!(
            k.segments,
            vec![Segment {
                offset: 0,
                filesz: 0x200,
                paddr: 0x10_0000,
                memsz: 0x1000
            }]
        );
        assert_eq!(k.entry, 0x10_0040);
        let r = ram(4 << 20);
        load(&r, &img, &k, "k").unwrap();
        let mut b = [0u8; 2];
        r.memory()
            .read_slice(&mut b, GuestAddress(0x10_01ff))
            .unwrap();
        assert_eq!(b, [0x90, 0]);

        let bad = |a: [u32; 5]| {
            let mut img = vec![0u8; 0x400];
            header(&mut img, 0x10, 1 << 16, Some(a));
            parse(&img, "bad.bin").unwrap_err().to_string()
        };
        let e = bad([0x10_0000, 0x10_0010, 0, 0, 0x10_0010]);
        assert!(
            e.contains("bad.bin")
                && e.contains("header_addr = 0x100000")
                && e.contains("below load_addr"),
            "{e}"
        );
        let e = bad([0x10_0100, 0x10_0000, 0, 0, 0x10_0100]);
        assert!(e.contains("load_addr = 0x100000"), "{e}");
        let e = bad([0x10_0010, 0x10_0000, 0x20_0000, 0, 0x10_0010]);
        assert!(
            e.contains("load_end_addr = 0x200000") && e.contains("past the end"),
            "{e}"
        );
        let e = bad([0x10_0010, 0x10_0000, 0x10_0100, 0x10_0080, 0x10_0010]);
        assert!(e.contains("bss_end_addr = 0x100080"), "{e}");
        let e = bad([0x10_0010, 0x10_0000, 0, 0, 0x50_0000]);
        assert!(e.contains("entry_addr = 0x500000"), "{e}");
        // Cut short before the address fields.
        let mut img = vec![0u8; 0x10];
        header(&mut img, 0, 1 << 16, None);
        assert!(parse(&img, "x")
            .unwrap_err()
            .to_string()
            .contains("cut short"));
    }

    #[test]
    fn refuses_unknown_required_flags_and_bad_elf() {
        let mut img = elf32(0x20_0000, &[0xf4], 0);
        header(&mut img, 0x60, 1 << 5, None);
        let e = parse(&img, "k.elf").unwrap_err().to_string();
        assert!(
            e.contains("k.elf: Multiboot header flags = 0x20") && e.contains("0x20"),
            "{e}"
        );
        let mut img = elf32(0x20_0000, &[0xf4], 0);
        img[18] = 40; // ARM
        let e = parse(&img, "k.elf").unwrap_err().to_string();
        assert!(e.contains("ELF machine = 0x28"), "{e}");
        let mut img = elf32(0x20_0000, &[0xf4], 0);
        img[24..28].copy_from_slice(&0x30_0000u32.to_le_bytes());
        let e = parse(&img, "k.elf").unwrap_err().to_string();
        assert!(e.contains("ELF e_entry = 0x300000"), "{e}");
        // Not ELF, no address fields.
        let mut img = vec![0u8; 64];
        header(&mut img, 0, 0, None);
        assert!(parse(&img, "x")
            .unwrap_err()
            .to_string()
            .contains("nothing says where"));
        // Below 1 MiB or outside RAM.
        let img = elf32(0x8000, &[0xf4], 0);
        let k = parse(&img, "k").unwrap();
        let e = load(&ram(4 << 20), &img, &k, "k").unwrap_err().to_string();
        assert!(
            e.contains("load address = 0x8000") && e.contains("below 1 MiB"),
            "{e}"
        );
        let img = elf32(0x80_0000, &[0xf4], 0);
        let k = parse(&img, "k").unwrap();
        let e = load(&ram(4 << 20), &img, &k, "k").unwrap_err().to_string();
        assert!(e.contains("outside guest RAM"), "{e}");
    }

    #[test]
    fn modules_split_like_qemu() {
        assert_eq!(
            module_specs("a.bin arg1 arg2, b.bin,,c.bin, d"),
            vec![
                ModuleSpec {
                    path: "a.bin".into(),
                    string: "a.bin arg1 arg2".into()
                },
                ModuleSpec {
                    path: "b.bin,c.bin".into(),
                    string: "b.bin,c.bin".into()
                },
                ModuleSpec {
                    path: "d".into(),
                    string: "d".into()
                },
            ]
        );
        assert!(module_specs(" , ").is_empty());
        assert_eq!(
            resolve_initrd("a.bin x=1,/abs/b,c,,d", std::path::Path::new("/cfg")),
            "/cfg/a.bin x=1,/abs/b,/cfg/c,,d"
        );
        assert_eq!(
            resolve_initrd("initrd.gz", std::path::Path::new("/cfg")),
            "/cfg/initrd.gz"
        );
        assert_eq!(
            initrd_paths("/nonexistent/a x,/nonexistent/b"),
            vec!["/nonexistent/a", "/nonexistent/b"]
        );
    }

    #[test]
    fn boot_info_describes_memory_command_line_and_modules() {
        let r = ram(64 << 20);
        let mods = [
            Module {
                data: b"first".to_vec(),
                string: "one.bin x=1".into(),
            },
            Module {
                data: vec![7; 5000],
                string: "two.bin".into(),
            },
        ];
        let b = write_boot_info(&r, 0x20_0123, "kernel console=ttyS0", &mods).unwrap();
        assert_eq!(b.info, INFO_ADDR as u32);
        assert_eq!(
            b.modules,
            vec![(0x20_1000, 0x20_1005), (0x20_2000, 0x20_3388)]
        );
        let m = r.memory();
        let rd = |a: u64| m.read_obj::<u32>(GuestAddress(a)).unwrap();
        let info = INFO_ADDR;
        assert_eq!(rd(info), 1 | 4 | 8 | 64 | 512);
        assert_eq!(rd(info + 4), 639);
        assert_eq!(rd(info + 8), 63 * 1024);
        let cstr = |a: u64| {
            let mut s = Vec::new();
            let mut a = a;
            loop {
                let c: u8 = m.read_obj(GuestAddress(a)).unwrap();
                if c == 0 {
                    break String::from_utf8(s).unwrap();
                }
                s.push(c);
                a += 1;
            }
        };
        assert_eq!(cstr(u64::from(rd(info + 16))), "kernel console=ttyS0");
        assert_eq!(cstr(u64::from(rd(info + 64))), "kvmsim");
        assert_eq!(rd(info + 20), 2);
        let list = u64::from(rd(info + 24));
        assert_eq!((rd(list), rd(list + 4)), (0x20_1000, 0x20_1005));
        assert_eq!(cstr(u64::from(rd(list + 8))), "one.bin x=1");
        assert_eq!(cstr(u64::from(rd(list + 24))), "two.bin");
        let mut b = [0u8; 5];
        m.read_slice(&mut b, GuestAddress(0x20_1000)).unwrap();
        assert_eq!(&b, b"first");
        // The memory map: the same entries as E820, 24 bytes each.
        let (len, addr) = (rd(info + 44), u64::from(rd(info + 48)));
        let e820 = crate::firmware::e820(r.map());
        assert_eq!(len as usize, 24 * e820.len());
        for (i, &(base, size, ty)) in e820.iter().enumerate() {
            let e = addr + 24 * i as u64;
            assert_eq!(rd(e), 20);
            assert_eq!(m.read_obj::<u64>(GuestAddress(e + 4)).unwrap(), base);
            assert_eq!(m.read_obj::<u64>(GuestAddress(e + 12)).unwrap(), size);
            assert_eq!(rd(e + 20), ty);
        }
    }

    #[test]
    fn boot_info_refuses_what_does_not_fit() {
        let r = ram(4 << 20);
        let big = [Module {
            data: vec![0; 3 << 20],
            string: "big".into(),
        }];
        let e = write_boot_info(&r, 0x20_0000, "k", &big)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("module 0 (big)") && e.contains("do not fit"),
            "{e}"
        );
        let long = "x".repeat(700 * 1024);
        let e = write_boot_info(&r, 0x20_0000, &long, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
                              at in 0usize..150, flags: u32, addr: [u32; 5]) {
            let _ = parse(&bytes, "fuzz");
            let mut img = bytes.clone();
            header(&mut img, at * 4, flags, Some(addr));
            if let Ok(k) = parse(&img, "fuzz") {
                for s in &k.segments {
                    proptest::prop_assert!(s.offset + s.filesz <= img.len() as u64);
                    proptest::prop_assert!(s.filesz <= s.memsz);
                }
                let _ = load(&ram(2 << 20), &img, &k, "fuzz");
            }
        }
    }
}
