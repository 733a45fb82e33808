//! One function per fuzz target: each takes the fuzzer's bytes, feeds them
//! to kvmsim's code the way kvmsim does, and panics when something that
//! must hold does not (besides panicking on its own: the targets are built
//! with debug assertions, so arithmetic overflow counts too).

use std::path::Path;
use std::sync::OnceLock;

use mem::{GuestRam, MemoryMap};
use platform::firmware::{self, E820Entry, E820_RAM};
use platform::linux::{self, Compression, KernelError, KernelImage, MAX_KERNEL};
use platform::{acpi, loader, units, Config};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices;

/// A target: its name and function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target. scripts/fuzz.sh runs them all (`cargo fuzz list`).
pub const TARGETS: &[Target] = &[
    ("config", config),
    ("ckpt_state", ckpt_state),
    ("units", units),
    ("elf", elf),
    ("multiboot", multiboot),
    ("bzimage", bzimage),
    ("decompress_gzip", decompress_gzip),
    ("decompress_xz", decompress_xz),
    ("decompress_lzma", decompress_lzma),
    ("decompress_zstd", decompress_zstd),
    ("decompress_lz4", decompress_lz4),
    ("firmware", firmware),
    ("dev_uart", devices::run::<devices::UartRig>),
    ("dev_simops", devices::run::<devices::SimOpsRig>),
    ("dev_timer", devices::run::<devices::TimerRig>),
    ("dev_mailbox", devices::run::<devices::MailboxRig>),
    ("dev_pic", devices::run::<devices::PicRig>),
    ("dev_pit", devices::run::<devices::PitRig>),
    ("dev_rtc", devices::run::<devices::RtcRig>),
    ("dev_i8042", devices::run::<devices::I8042Rig>),
    ("dev_ioapic", devices::run::<devices::IoApicRig>),
    ("dev_lapic", devices::run::<devices::LapicRig>),
    ("dev_virtio_blk", devices::run::<devices::VirtioBlkRig>),
    ("dev_virtio_net", devices::run::<devices::VirtioNetRig>),
    ("dev_restore", dev_restore),
];

/// Devices' saved state (checkpoints): byte 0 picks the device (in the
/// order of `dev_*` targets above, then virtio-blk), the rest is
/// [`devices::run_restore`]'s input: hostile edits of the state a script
/// left, restored into a fresh device.
pub fn dev_restore(data: &[u8]) {
    use devices::*;
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let run: fn(&[u8]) = match which % 11 {
        0 => run_restore::<UartRig>,
        1 => run_restore::<SimOpsRig>,
        2 => run_restore::<TimerRig>,
        3 => run_restore::<MailboxRig>,
        4 => run_restore::<PicRig>,
        5 => run_restore::<PitRig>,
        6 => run_restore::<RtcRig>,
        7 => run_restore::<I8042Rig>,
        8 => run_restore::<IoApicRig>,
        9 => run_restore::<LapicRig>,
        _ => run_restore::<VirtioBlkRig>,
    };
    run(rest);
}

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// A config file: `Config::parse` (TOML, defaults, path resolution,
/// validation). An error names the file; an accepted config has a system,
/// a name per system, a non-zero quantum, and serialises (config.json).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // kvmsim reads config files as UTF-8 and says so otherwise
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(cfg) => {
            assert!(!cfg.system.is_empty(), "accepted a config without a system");
            assert_eq!(cfg.system_names().len(), cfg.system.len());
            serde_json::to_string(&cfg).expect("an accepted config serialises to JSON");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.toml: "),
                "error without the file: {msg}"
            );
        }
    }
}

/// The unit parsers behind sizes, frequencies and durations. An error
/// quotes the input; a frequency is a positive number.
pub fn units(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let quoted = format!("{s:?}");
    let names_input =
        |e: &String| assert!(e.contains(&quoted), "error {e:?} does not quote the input");
    if let Err(e) = units::parse_size(s) {
        names_input(&e);
    }
    match units::parse_freq(s) {
        Ok(hz) => assert!(hz > 0.0, "frequency {hz} from {quoted}"),
        Err(e) => names_input(&e),
    }
    if let Err(e) = units::parse_duration(s) {
        names_input(&e);
    }
}

/// 4 MiB of guest RAM, shared by every run of the ELF target.
fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new(MemoryMap::for_size(4 << 20).expect("map")).expect("RAM"))
}

/// An ELF image: `loader::inspect`, then `loader::load` into 4 MiB of RAM
/// as a system does. An error names the image; an accepted image's
/// segments lie inside the file; a loaded segment's bytes are in RAM at its
/// address (where no other segment overlaps it).
pub fn elf(data: &[u8]) {
    let info = match loader::inspect(data, "fuzz.elf") {
        Ok(info) => info,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.elf: "),
                "error without the file: {msg}"
            );
            return;
        }
    };
    assert!(!info.segments.is_empty());
    for s in &info.segments {
        assert!(s.filesz <= s.memsz, "{s:?}");
        assert!(
            s.offset
                .checked_add(s.filesz)
                .is_some_and(|e| e <= data.len() as u64),
            "segment past the end of the file: {s:?}"
        );
    }
    let ram = ram();
    match loader::load(ram, data, &info, "fuzz.elf") {
        Ok(entry) => {
            assert_eq!(entry, info.entry);
            for (i, s) in info.segments.iter().enumerate() {
                if s.memsz == 0 {
                    continue; // nothing to load
                }
                assert!(
                    ram.map().is_ram(s.paddr, s.memsz),
                    "segment {i} outside RAM: {s:?}"
                );
                assert!(s.paddr >= 0x10_0000, "segment {i} in the boot area: {s:?}");
                let overlapped = info.segments.iter().enumerate().any(|(j, o)| {
                    j != i && o.paddr < s.paddr + s.memsz && s.paddr < o.paddr + o.memsz
                });
                if s.filesz == 0 || overlapped {
                    continue;
                }
                let mut got = vec![0u8; s.filesz as usize];
                ram.memory()
                    .read_slice(&mut got, GuestAddress(s.paddr))
                    .expect("segment in RAM");
                let want = &data[s.offset as usize..(s.offset + s.filesz) as usize];
                assert!(
                    got == want,
                    "segment {i} loaded with other bytes than the file's"
                );
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.elf: "),
                "error without the file: {msg}"
            );
        }
    }
}

/// A Multiboot kernel: `multiboot::parse` (the header in the first 8 KiB,
/// the address fields or ELF32/ELF64 program headers), then
/// `multiboot::load` into 4 MiB of RAM. An error names the image; an
/// accepted kernel's segments lie inside the file with file size at most
/// memory size, its entry lies inside a segment, and a loaded segment is
/// in RAM at or above 1 MiB and holds the file's bytes (where no other
/// segment overlaps it).
pub fn multiboot(data: &[u8]) {
    use platform::multiboot as mb;
    let k = match mb::parse(data, "fuzz.mb") {
        Ok(k) => k,
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.mb: "),
                "error without the file: {msg}"
            );
            return;
        }
    };
    assert!(mb::find_header(data).is_some_and(|o| o + 12 <= mb::SEARCH_LIMIT));
    assert!(!k.segments.is_empty());
    for s in &k.segments {
        assert!(s.filesz <= s.memsz, "{s:?}");
        assert!(
            s.offset
                .checked_add(s.filesz)
                .is_some_and(|e| e <= data.len() as u64),
            "segment past the end of the file: {s:?}"
        );
    }
    let entry = u64::from(k.entry);
    assert!(
        k.segments
            .iter()
            .any(|s| entry >= s.paddr && entry - s.paddr < s.memsz),
        "entry {entry:#x} outside every segment: {:?}",
        k.segments
    );
    let ram = ram();
    match mb::load(ram, data, &k, "fuzz.mb") {
        Ok(()) => {
            for (i, s) in k.segments.iter().enumerate() {
                assert!(
                    ram.map().is_ram(s.paddr, s.memsz),
                    "segment {i} outside RAM"
                );
                assert!(s.paddr >= mb::MIN_LOAD, "segment {i} below 1 MiB");
                let overlapped = k.segments.iter().enumerate().any(|(j, o)| {
                    j != i && o.paddr < s.paddr + s.memsz && s.paddr < o.paddr + o.memsz
                });
                if s.filesz == 0 || overlapped {
                    continue;
                }
                let mut got = vec![0u8; s.filesz as usize];
                ram.memory()
                    .read_slice(&mut got, GuestAddress(s.paddr))
                    .expect("segment in RAM");
                let want = &data[s.offset as usize..(s.offset + s.filesz) as usize];
                assert!(
                    got == want,
                    "segment {i} loaded with other bytes than the file's"
                );
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.mb: "),
                "error without the file: {msg}"
            );
        }
    }
}

/// A Linux kernel image: `linux::parse` (bzImage setup header, payload,
/// decompression), then the ELF checks on what it yields. An accepted
/// bzImage has protocol 2.08 or later, a setup header copied from the file
/// and a payload no larger than the cap.
pub fn bzimage(data: &[u8]) {
    match linux::parse(data, "fuzz.bz") {
        Ok(k) => {
            assert!(k.elf.len() <= MAX_KERNEL);
            if data.starts_with(b"\x7fELF") {
                assert!(k.elf == data && k.setup_header.is_none());
            } else {
                assert!(linux::is_bzimage(data));
                assert!(k.protocol >= 0x0208, "protocol {:#x}", k.protocol);
                let end = (0x202 + usize::from(data[0x201])).min(data.len());
                assert_eq!(k.setup_header.as_deref(), data.get(0x1f1..end));
            }
            let _ = loader::inspect(&k.elf, "fuzz.bz");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.bz: "),
                "error without the file: {msg}"
            );
        }
    }
}

/// `linux::decompress` on a payload of format `c` (the magic is put in
/// front when the input does not start with it, so every input reaches
/// the decoder). The output is capped; errors name the image and format.
fn decompress_as(data: &[u8], magic: &[u8], c: Compression) {
    let owned;
    let input = if data.starts_with(magic) {
        data
    } else {
        owned = [magic, data].concat();
        &owned
    };
    match linux::decompress(input, "fuzz") {
        Ok((got, out)) => {
            assert_eq!(got, c);
            assert!(out.len() <= MAX_KERNEL);
        }
        Err(KernelError::Decompress(name, got, _)) => assert!(name == "fuzz" && got == c),
        Err(KernelError::TooLarge(name)) => assert_eq!(name, "fuzz"),
        Err(e) => panic!("unexpected error for a {c:?} payload: {e}"),
    }
}

pub fn decompress_gzip(data: &[u8]) {
    decompress_as(data, &[0x1f, 0x8b], Compression::Gzip)
}
pub fn decompress_xz(data: &[u8]) {
    decompress_as(data, &[0xfd, b'7', b'z', b'X', b'Z', 0], Compression::Xz)
}
pub fn decompress_lzma(data: &[u8]) {
    decompress_as(data, &[0x5d, 0, 0], Compression::Lzma)
}
pub fn decompress_zstd(data: &[u8]) {
    decompress_as(data, &[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd)
}
pub fn decompress_lz4(data: &[u8]) {
    decompress_as(data, &[0x02, 0x21, 0x4c, 0x18], Compression::Lz4)
}

/// The first MiB of guest memory, where the firmware data goes.
fn low_mem() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("1 MiB of memory")
    })
}

/// Reads bytes from the front of the input (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = self.0.len().min(N);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// The firmware writers with fuzzed sizes and counts, as the Linux set-up
/// forms them: the memory size (E820 map), the initrd's size, the kernel's
/// end and the header's initrd_addr_max (initrd placement), the header's
/// cmdline_size and a command line, the setup header's bytes and extra
/// E820 entries (zero page), the CPU count and I/O APIC ID (MP table and
/// ACPI tables). Input layout: memory u64, initrd size u64, kernel end u64,
/// initrd_addr_max u32, cmdline_size u32, cpus u8, I/O APIC ID u8, extra
/// E820 entries u8, setup header length u16, then the command line's
/// length u16, the setup header, the command line and E820 entries
/// (20 bytes each).
pub fn firmware(data: &[u8]) {
    let mut i = Input(data);
    let memory = i.u64();
    let initrd_size = i.u64();
    let kernel_end = i.u64();
    let addr_max = i.u32();
    let cmdline_size = i.u32();
    let cpus = i.u8();
    let ioapic_id = i.u8();
    let extra_e820 = usize::from(i.u8());
    let header_len = usize::from(i.u16());
    let cmdline_len = usize::from(i.u16());
    let header = i.take(header_len).to_vec();
    let cmdline = String::from_utf8_lossy(i.take(cmdline_len)).into_owned();

    // E820: disjoint, non-empty entries; RAM entries cover the map.
    let Ok(map) = MemoryMap::for_size(memory) else {
        return;
    };
    let mut e820 = firmware::e820(&map);
    let mut sorted = e820.clone();
    sorted.sort();
    for w in sorted.windows(2) {
        assert!(w[0].1 > 0 && w[0].0 + w[0].1 <= w[1].0, "E820 {e820:x?}");
    }
    for r in map.regions().iter().filter(|r| r.end() > 0x10_0000) {
        let covered = e820
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .any(|e| e.0 <= r.base.max(0x10_0000) && r.end() <= e.0 + e.1);
        assert!(
            covered,
            "RAM [{:#x}, {:#x}) not in E820 {e820:x?}",
            r.base,
            r.end()
        );
    }
    for _ in 0..extra_e820 {
        let b = i.bytes::<20>();
        let e: E820Entry = (
            u64::from_le_bytes(b[0..8].try_into().expect("8")),
            u64::from_le_bytes(b[8..16].try_into().expect("8")),
            le32(&b, 16),
        );
        e820.push(e);
    }

    // The initrd, as high as possible under both limits, above the kernel.
    let limit = u64::from(Some(addr_max).filter(|&v| v != 0).unwrap_or(0x37ff_ffff));
    let initrd = match firmware::initrd_address(&map, initrd_size, kernel_end, limit) {
        Ok(addr) => {
            let end = addr + initrd_size;
            assert!(initrd_size > 0 && addr % 4096 == 0 && addr >= kernel_end);
            assert!(
                end - 1 <= limit && map.is_ram(addr, initrd_size),
                "initrd at {addr:#x}"
            );
            assert!(end <= map.regions()[0].end(), "initrd above low RAM");
            Some((addr, initrd_size))
        }
        Err(e) => {
            assert!(matches!(e, firmware::FirmwareError::InitrdTooLarge { .. }));
            None
        }
    };

    // The command line, within the header's limit (and kvmsim's).
    let mem = low_mem();
    let max = Some(cmdline_size).filter(|&v| v != 0).unwrap_or(2048) as usize + 1;
    match firmware::write_cmdline(mem, &cmdline, max) {
        Ok(n) => {
            assert_eq!(n, cmdline.len());
            assert!(n < max.min(firmware::CMDLINE_MAX));
            let mut got = vec![0u8; n + 1];
            mem.read_slice(&mut got, GuestAddress(firmware::CMDLINE))
                .expect("read");
            assert!(got[..n] == *cmdline.as_bytes() && got[n] == 0);
        }
        Err(e) => assert!(matches!(e, firmware::FirmwareError::CmdlineTooLong(..))),
    }

    // The zero page.
    let kernel = KernelImage {
        elf: Vec::new(),
        setup_header: (!header.is_empty()).then_some(header),
        compression: None,
        protocol: 0x020f,
    };
    firmware::write_zero_page(mem, &kernel, initrd, &e820).expect("the zero page fits");
    let mut zp = vec![0u8; 4096];
    mem.read_slice(&mut zp, GuestAddress(firmware::ZERO_PAGE))
        .expect("read");
    assert_eq!(&zp[0x1fe..0x200], &[0x55, 0xaa]);
    assert_eq!(zp[0x210], 0xff);
    assert_eq!(le32(&zp, 0x228), firmware::CMDLINE as u32);
    let (ia, is) = initrd.unwrap_or((0, 0));
    if initrd.is_some() {
        assert_eq!(
            (u64::from(le32(&zp, 0x218)), u64::from(le32(&zp, 0x21c))),
            (ia, is),
            "the zero page's initrd fields lost bits"
        );
    }
    let n = usize::from(zp[0x1e8]);
    assert_eq!(n, e820.len().min(128));
    for (k, e) in e820.iter().take(n).enumerate() {
        let o = 0x2d0 + 20 * k;
        let got = (
            u64::from_le_bytes(zp[o..o + 8].try_into().expect("8")),
            u64::from_le_bytes(zp[o + 8..o + 16].try_into().expect("8")),
            le32(&zp, o + 16),
        );
        assert_eq!(got, *e, "E820 entry {k}");
    }

    // The MP table: checksummed, consistent, inside the reserved base memory
    // and below the ACPI tables.
    let t = firmware::mp_table(firmware::MPTABLE, cpus, ioapic_id);
    assert_eq!(&t[0..4], b"_MP_");
    assert_eq!(sum(&t[..16]), 0, "MP floating pointer checksum");
    let table = &t[16..];
    assert_eq!(&table[0..4], b"PCMP");
    assert_eq!(
        usize::from(u16::from_le_bytes([table[4], table[5]])),
        table.len()
    );
    assert_eq!(sum(table), 0, "MP table checksum");
    assert!(
        firmware::MPTABLE + t.len() as u64 <= acpi::RSDP_ADDR,
        "MP table runs into ACPI"
    );
    firmware::write_mp_table(mem, cpus, ioapic_id).expect("the MP table fits");

    // ACPI: each table checksummed with its length, disjoint, in the BIOS area.
    let tables = acpi::tables(cpus, ioapic_id);
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for (k, (addr, b)) in tables.iter().enumerate() {
        if k == 0 {
            assert_eq!(*addr, acpi::RSDP_ADDR);
            assert_eq!(sum(&b[..20]), 0, "RSDP checksum");
        } else {
            assert_eq!(le32(b, 4) as usize, b.len(), "table {:?} length", &b[0..4]);
        }
        assert_eq!(sum(b), 0, "table {:?} checksum", &b[0..4]);
        let end = addr + b.len() as u64;
        assert!(
            end <= 0x10_0000,
            "ACPI table {:?} ends at {end:#x}, above 1 MiB",
            &b[0..4]
        );
        for &(a, e) in &spans {
            assert!(end <= a || e <= *addr, "ACPI tables overlap");
        }
        spans.push((*addr, end));
    }
    firmware::write_acpi(mem, cpus, ioapic_id).expect("the ACPI tables fit");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_a_binary_and_seeds_that_pass() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, f) in TARGETS {
            assert!(
                root.join(format!("fuzz_targets/{name}.rs")).is_file(),
                "{name}"
            );
            let seeds: Vec<_> = std::fs::read_dir(root.join("corpus").join(name))
                .unwrap_or_else(|e| panic!("{name}: no seeds: {e}"))
                .map(|e| e.expect("entry").path())
                .collect();
            assert!(!seeds.is_empty(), "{name}: no seeds");
            for s in seeds {
                f(&std::fs::read(&s).expect("seed"));
            }
        }
    }
}

/// A checkpoint's state file: `ckpt::decode_state` (header, version,
/// checksums, JSON body, consistency). An error names the file; an accepted
/// state has a system with a CPU in each, and encodes back to a file that
/// decodes to the same state.
pub fn ckpt_state(data: &[u8]) {
    let path = Path::new("fuzz/state.ckpt");
    match ckpt::decode_state(path, data) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("fuzz/state.ckpt"),
                "error {msg:?} does not name the file"
            );
        }
        Ok(state) => {
            assert!(!state.systems.is_empty());
            assert!(state.systems.iter().all(|s| !s.cpus.is_empty()));
            // A disk's saved sectors lie inside it, in order, apart.
            for d in state.systems.iter().flat_map(|s| &s.disks) {
                let sectors = d.image.size / ckpt::SECTOR;
                let mut end = 0u64;
                for &[first, count] in d.saved.iter().flat_map(|x| &x.extents) {
                    assert!(count > 0 && first >= end, "{:?}", d.saved);
                    end = first.checked_add(count).expect("an extent wraps");
                    assert!(end <= sectors, "an extent past the disk: {:?}", d.saved);
                }
            }
            let again = ckpt::decode_state(path, &ckpt::encode_state(&state))
                .unwrap_or_else(|e| panic!("an accepted state does not read back: {e}"));
            assert_eq!(again, state, "an accepted state changes when written back");
        }
    }
}
