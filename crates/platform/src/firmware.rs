//! What a PC's firmware would hand a Linux kernel: the E820 memory map, the
//! zero page (boot_params) with the setup header, command line and initrd,
//! and an Intel MP table describing the CPUs, the I/O APIC and how ISA
//! interrupts are routed (enough with `acpi=off`).

use mem::MemoryMap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::linux::KernelImage;

/// Where the zero page goes (just above the boot structures).
pub const ZERO_PAGE: u64 = 0x9000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0xa000;
/// Longest command line written (including the NUL).
pub const CMDLINE_MAX: usize = 4096;
/// The MP table: the last KiB of the 640 KiB of base memory.
pub const MPTABLE: u64 = 0x9_fc00;
/// End of base memory; [MPTABLE, 1 MiB) is reserved.
const BASE_END: u64 = 0x9_fc00;

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// An E820 entry: (address, size, type).
pub type E820Entry = (u64, u64, u32);

/// The E820 map for `map`: base memory, the hole up to 1 MiB, RAM above,
/// and the sim-ops window reserved so the kernel leaves it alone.
pub fn e820(map: &MemoryMap) -> Vec<E820Entry> {
    let mut v = vec![
        (0, BASE_END, E820_RAM),
        (BASE_END, 0x10_0000 - BASE_END, E820_RESERVED),
    ];
    for r in map.regions() {
        let start = r.base.max(0x10_0000);
        if r.end() > start {
            v.push((start, r.end() - start, E820_RAM));
        }
    }
    v.push((
        devices::simops::SIMOPS_BASE,
        devices::simops::SIMOPS_SIZE,
        E820_RESERVED,
    ));
    v
}

/// Firmware data that does not fit guest memory.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirmwareError {
    #[error("the kernel command line is {0} bytes; at most {1} fit")]
    CmdlineTooLong(usize, usize),
    #[error("the initrd ({size} bytes) does not fit in RAM below {limit:#x} above the kernel (ending at {kernel_end:#x}); give the system more memory")]
    InitrdTooLarge {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("writing firmware data into guest memory failed: {0}")]
    Memory(String),
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible
/// below `limit` (the kernel's initrd_addr_max) and the end of low RAM, and
/// above the kernel.
pub fn initrd_address(
    map: &MemoryMap,
    size: u64,
    kernel_end: u64,
    limit: u64,
) -> Result<u64, FirmwareError> {
    let low_end = map.regions().first().map_or(0, |r| r.end());
    let top = low_end.min(limit.saturating_add(1));
    let addr = top.saturating_sub(size) & !0xfff;
    if size == 0 || addr < kernel_end || addr + size > top {
        return Err(FirmwareError::InitrdTooLarge {
            size,
            limit: top,
            kernel_end,
        });
    }
    Ok(addr)
}

/// Writes the zero page for `kernel` at [`ZERO_PAGE`]: its setup header
/// (or a minimal one for a plain ELF), the loader fields, the command line
/// pointer, the initrd and the E820 map.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &KernelImage,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> Result<(), FirmwareError> {
    let mut zp = vec![0u8; 4096];
    if let Some(h) = &kernel.setup_header {
        let n = h.len().min(4096 - 0x1f1);
        zp[0x1f1..0x1f1 + n].copy_from_slice(&h[..n]);
    } else {
        zp[0x202..0x206].copy_from_slice(b"HdrS");
        zp[0x206..0x208].copy_from_slice(&kernel.protocol.to_le_bytes());
        zp[0x230..0x234].copy_from_slice(&0x0100_0000u32.to_le_bytes()); // kernel_alignment
    }
    zp[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    zp[0x210] = 0xff; // type_of_loader: undefined
    zp[0x211] |= 0x01 | 0x80; // LOADED_HIGH, CAN_USE_HEAP
    zp[0x224..0x226].copy_from_slice(&0xfe00u16.to_le_bytes()); // heap_end_ptr
    zp[0x228..0x22c].copy_from_slice(&(CMDLINE as u32).to_le_bytes());
    // acpi_rsdp_addr (boot protocol 2.14): where the ACPI tables start.
    zp[0x70..0x78].copy_from_slice(&crate::acpi::RSDP_ADDR.to_le_bytes());
    if let Some((addr, size)) = initrd {
        zp[0x218..0x21c].copy_from_slice(&(addr as u32).to_le_bytes());
        zp[0x21c..0x220].copy_from_slice(&(size as u32).to_le_bytes());
    }
    let entries = e820.len().min(128);
    zp[0x1e8] = entries as u8;
    for (i, &(addr, size, ty)) in e820.iter().take(entries).enumerate() {
        let o = 0x2d0 + 20 * i;
        zp[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        zp[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        zp[o + 16..o + 20].copy_from_slice(&ty.to_le_bytes());
    }
    mem.write_slice(&zp, GuestAddress(ZERO_PAGE))
        .map_err(|e| FirmwareError::Memory(e.to_string()))
}

/// Writes the NUL-terminated command line at [`CMDLINE`]; `max` is the
/// kernel's limit (setup header cmdline_size) including the NUL.
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    max: usize,
) -> Result<usize, FirmwareError> {
    let max = max.min(CMDLINE_MAX);
    if cmdline.len() + 1 > max {
        return Err(FirmwareError::CmdlineTooLong(cmdline.len(), max - 1));
    }
    let mut b = cmdline.as_bytes().to_vec();
    b.push(0);
    mem.write_slice(&b, GuestAddress(CMDLINE))
        .map_err(|e| FirmwareError::Memory(e.to_string()))?;
    Ok(cmdline.len())
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// An Intel MP table (spec 1.4) for `cpus` processors (APIC IDs 0..) and
/// one I/O APIC with ID `ioapic_id`, to be placed at `addr`: the floating
/// pointer followed by the configuration table.
pub fn mp_table(addr: u64, cpus: u8, ioapic_id: u8) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = 0x14; // local APIC version
        e[3] = 0x01 | if id == 0 { 0x02 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x0600u32.to_le_bytes()); // signature: family 6
        e[8..12].copy_from_slice(&0x0201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    let mut io = vec![2u8, ioapic_id, 0x11, 0x01];
    io.extend_from_slice(&(devices::ioapic::IOAPIC_BASE as u32).to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    // ISA interrupts: the 8259 as ExtINT on pin 0, IRQ0 on pin 2, IRQ n on pin n.
    let mut intsrc = |kind: u8, irq: u8, pin: u8| {
        entries.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    };
    intsrc(3, 0, 0);
    intsrc(0, 0, 2);
    for irq in 1..16u8 {
        if irq != 2 {
            intsrc(0, irq, irq);
        }
    }
    // Local interrupts: LINT0 ExtINT, LINT1 NMI, on every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = addr + 16;
    let mut t = vec![0u8; 44];
    t[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[6] = 4; // spec revision 1.4
    t[8..16].copy_from_slice(b"KVMSIM  ");
    t[16..28].copy_from_slice(b"kvmsim PC   ");
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[36..40].copy_from_slice(&(devices::lapic::LAPIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);

    let mut f = vec![0u8; 16];
    f[0..4].copy_from_slice(b"_MP_");
    f[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = 4; // spec revision
    f[10] = checksum(&f);
    f.extend_from_slice(&t);
    f
}

/// Writes the ACPI tables (see [`crate::acpi`]).
pub fn write_acpi(mem: &GuestMemoryMmap, cpus: u8, ioapic_id: u8) -> Result<(), FirmwareError> {
    write_acpi_with_devices(mem, cpus, ioapic_id, &[])
}

/// [`write_acpi`] with virtio-mmio devices in the DSDT.
pub fn write_acpi_with_devices(
    mem: &GuestMemoryMmap,
    cpus: u8,
    ioapic_id: u8,
    virtio: &[crate::disks::MmioDevice],
) -> Result<(), FirmwareError> {
    for (addr, bytes) in crate::acpi::tables_with_devices(cpus, ioapic_id, virtio) {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| FirmwareError::Memory(e.to_string()))?;
    }
    Ok(())
}

/// Writes the MP table at [`MPTABLE`].
pub fn write_mp_table(mem: &GuestMemoryMmap, cpus: u8, ioapic_id: u8) -> Result<(), FirmwareError> {
    let t = mp_table(MPTABLE, cpus, ioapic_id);
    mem.write_slice(&t, GuestAddress(MPTABLE))
        .map_err(|e| FirmwareError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_holes_and_sim_ops() {
        let map = MemoryMap::for_size(128 << 20).unwrap();
        let e = e820(&map);
        assert_eq!(e[0], (0, 0x9fc00, E820_RAM));
        assert_eq!(e[1], (0x9fc00, 0x60400, E820_RESERVED));
        assert_eq!(e[2], (0x100000, (128 << 20) - 0x100000, E820_RAM));
        assert_eq!(e[3], (0xffff_0000, 0x1_0000, E820_RESERVED));
        let big = e820(&MemoryMap::for_size(5 << 30).unwrap());
        assert!(big.contains(&(0x1_0000_0000, (5u64 << 30) - 0xc000_0000, E820_RAM)));
    }

    #[test]
    fn mp_table_is_well_formed() {
        let t = mp_table(MPTABLE, 2, 2);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(
            t[..16].iter().fold(0u8, |a, &b| a.wrapping_add(b)),
            0,
            "pointer checksum"
        );
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()),
            (MPTABLE + 16) as u32
        );
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
        assert_eq!(len, table.len());
        assert_eq!(
            table.iter().fold(0u8, |a, &b| a.wrapping_add(b)),
            0,
            "table checksum"
        );
        // 2 CPUs, 1 bus, 1 I/O APIC, 16 interrupt sources (ExtINT + 15), 2 local.
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            2 + 1 + 1 + 16 + 2
        );
        // The first CPU is the BSP; IRQ0 goes to pin 2.
        assert_eq!(table[44 + 3], 0x03);
        let irq0 = table.windows(8).position(|w| w == [3, 0, 0, 0, 0, 0, 2, 2]);
        assert!(irq0.is_some());
    }

    #[test]
    fn zero_page_and_cmdline() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let k = KernelImage {
            elf: vec![],
            setup_header: None,
            compression: None,
            protocol: 0x020f,
        };
        let e = e820(&MemoryMap::for_size(64 << 20).unwrap());
        write_zero_page(&mem, &k, Some((0x300_0000, 0x1234)), &e).unwrap();
        let rd8 = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        let rd32 = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
        assert_eq!(rd32(ZERO_PAGE + 0x202), u32::from_le_bytes(*b"HdrS"));
        assert_eq!(rd8(ZERO_PAGE + 0x210), 0xff);
        assert_eq!(rd32(ZERO_PAGE + 0x228), CMDLINE as u32);
        assert_eq!(rd32(ZERO_PAGE + 0x218), 0x300_0000);
        assert_eq!(rd32(ZERO_PAGE + 0x21c), 0x1234);
        assert_eq!(rd32(ZERO_PAGE + 0x70), crate::acpi::RSDP_ADDR as u32);
        assert_eq!(usize::from(rd8(ZERO_PAGE + 0x1e8)), e.len());
        assert_eq!(write_cmdline(&mem, "console=ttyS0", 2048), Ok(13));
        assert_eq!(rd8(CMDLINE + 13), 0);
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(3000), 2048),
            Err(FirmwareError::CmdlineTooLong(3000, 2047))
        ));
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let map = MemoryMap::for_size(128 << 20).unwrap();
        let a = initrd_address(&map, 1 << 20, 64 << 20, 0x37ff_ffff).unwrap();
        assert_eq!(a, (127 << 20));
        assert!(initrd_address(&map, 100 << 20, 64 << 20, 0x37ff_ffff).is_err());
    }
}
