//! ACPI tables for the PC platform, enough for Linux to find the local APIC
//! and the I/O APIC (kernels built without MP-table support, like Debian's
//! cloud kernel, need them): RSDP, XSDT, a hardware-reduced FADT (no PM
//! timer, no SCI, no fixed-function hardware), a DSDT naming the legacy
//! devices Linux finds only through ACPI (the CMOS RTC, PNP0B00, and COM1,
//! PNP0501, with their ports and ISA IRQs), and a MADT
//! with the local APICs, the I/O APIC, ISA IRQ0 overridden to GSI 2 (where
//! the PIT is wired) and LINT1 as NMI. Built with rust-vmm's acpi_tables.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::disks::MmioDevice;

/// Where the RSDP goes (inside the BIOS area reserved in the E820 map).
pub const RSDP_ADDR: u64 = 0xe_0000;

const OEM_ID: [u8; 6] = *b"KVMSIM";
const OEM_TABLE: [u8; 8] = *b"KVMSIMPC";

/// MADT interrupt source override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    uid: u8,
    flags: U16<LE>,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's body: `\_SB` with the CMOS RTC, COM1 and the virtio-mmio
/// devices (`LNRO0005`, each with its register window and interrupt).
fn dsdt_devices(virtio: &[MmioDevice]) -> Vec<u8> {
    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_io = aml::IO::new(0x70, 0x70, 1, 2);
    let rtc_irq = aml::Interrupt::new(true, true, false, false, 8);
    let rtc_res = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_hid_name = aml::Name::new("_HID".into(), &rtc_hid);
    let rtc_crs = aml::Name::new("_CRS".into(), &rtc_res);
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_hid_name, &rtc_crs]);
    let com_hid = aml::EISAName::new("PNP0501");
    let com_io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com_res = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_hid_name = aml::Name::new("_HID".into(), &com_hid);
    let com_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com_crs = aml::Name::new("_CRS".into(), &com_res);
    let com = aml::Device::new("COM1".into(), vec![&com_hid_name, &com_uid, &com_crs]);
    let mut body: Vec<u8> = Vec::new();
    rtc.to_aml_bytes(&mut body);
    com.to_aml_bytes(&mut body);
    for (i, d) in virtio.iter().enumerate() {
        // As Firecracker describes its devices: consumer, edge-triggered,
        // active high, exclusive.
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_val = i as u32;
        let uid = aml::Name::new("_UID".into(), &uid_val);
        let mmio = aml::Memory32Fixed::new(true, d.base as u32, d.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let res = aml::ResourceTemplate::new(vec![&mmio, &irq]);
        let crs = aml::Name::new("_CRS".into(), &res);
        let dev = aml::Device::new(format!("VR{i:02}").as_str().into(), vec![&hid, &uid, &crs]);
        dev.to_aml_bytes(&mut body);
    }
    let mut out = Vec::new();
    aml::Scope::new("\\_SB_".into(), vec![&RawAml(body)]).to_aml_bytes(&mut out);
    out
}

/// AML bytes built elsewhere.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn align16(a: u64) -> u64 {
    (a + 15) & !15
}

/// The tables for `cpus` CPUs and the I/O APIC with ID `ioapic_id`, as
/// (guest physical address, bytes), starting with the RSDP at [`RSDP_ADDR`].
pub fn tables(cpus: u8, ioapic_id: u8) -> Vec<(u64, Vec<u8>)> {
    tables_with_devices(cpus, ioapic_id, &[])
}

/// [`tables`] with virtio-mmio devices in the DSDT.
pub fn tables_with_devices(cpus: u8, ioapic_id: u8, virtio: &[MmioDevice]) -> Vec<(u64, Vec<u8>)> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(devices::lapic::LAPIC_BASE as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        ioapic_id,
        devices::ioapic::IOAPIC_BASE as u32,
        0,
    ));
    madt.add_structure(InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2.into(),
        flags: 0.into(),
    });
    madt.add_structure(LocalApicNmi {
        kind: 4,
        length: 6,
        uid: 0xff,
        flags: 0.into(),
        lint: 1,
    });
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    dsdt.append_slice(&dsdt_devices(virtio));
    let dsdt = dsdt.as_slice().to_vec();

    let xsdt_addr = align16(RSDP_ADDR + 36);
    // The XSDT lists two tables: FADT and MADT.
    let fadt_addr = align16(xsdt_addr + 36 + 16);
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(Flags::HwReducedAcpi)
        .dsdt_64(0) // patched below, once its address is known
        .finalize();
    let fadt_len = bytes(&fadt).len() as u64;
    let dsdt_addr = align16(fadt_addr + fadt_len);
    let madt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(Flags::HwReducedAcpi)
        .dsdt_64(dsdt_addr)
        .finalize();
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    vec![
        (RSDP_ADDR, bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
        (xsdt_addr, bytes(&xsdt)),
        (fadt_addr, bytes(&fadt)),
        (dsdt_addr, dsdt),
        (madt_addr, bytes(&madt)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let t = tables(1, 1);
        let (rsdp_addr, rsdp) = &t[0];
        assert_eq!(*rsdp_addr, RSDP_ADDR);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let find = |addr: u64| {
            t.iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, b)| b.clone())
                .unwrap()
        };
        let xsdt = find(xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<[u8; 4]> = entries
            .iter()
            .map(|&a| find(a)[0..4].try_into().unwrap())
            .collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC"]);
        for (_, b) in &t[1..] {
            let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, b.len(), "{:?}", &b[0..4]);
            assert_eq!(sum(b), 0, "{:?} checksum", std::str::from_utf8(&b[0..4]));
        }
        // The FADT points at the DSDT; the MADT holds 1 LAPIC, the I/O
        // APIC, the IRQ0 override and the NMI entry.
        let fadt = find(entries[0]);
        let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = find(dsdt);
        assert_eq!(&dsdt[0..4], b"DSDT");
        // \_SB_ holds RTC_ (PNP0B00) and COM1 (PNP0501); EISA IDs are
        // stored compressed: PNP0B00 = 0x000bd041, PNP0501 = 0x0105d041.
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_SB_") && has(b"RTC_") && has(b"COM1"));
        assert!(has(&0x000b_d041u32.to_le_bytes()));
        assert!(has(&0x0105_d041u32.to_le_bytes()));
        let madt = find(entries[1]);
        let kinds: Vec<u8> = {
            let mut k = vec![];
            let mut o = 44;
            while o + 2 <= madt.len() {
                k.push(madt[o]);
                o += usize::from(madt[o + 1]).max(1);
            }
            k
        };
        assert_eq!(kinds, vec![0, 1, 2, 4]);
        assert_eq!(
            u32::from_le_bytes(madt[36..40].try_into().unwrap()),
            0xfee0_0000
        );
        assert!(!has(b"LNRO0005"), "no disks, no virtio devices");
    }

    #[test]
    fn virtio_devices_are_in_the_dsdt_with_window_and_interrupt() {
        let devs = crate::disks::layout(2);
        let t = tables_with_devices(1, 1, &devs);
        let dsdt = t
            .iter()
            .find(|(_, b)| &b[0..4] == b"DSDT")
            .unwrap()
            .1
            .clone();
        assert_eq!(sum(&dsdt), 0);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005\0") && has(b"VR00") && has(b"VR01"));
        for d in &devs {
            // Memory32Fixed: 0x86, length 9, read-write, base, size.
            let mut m = vec![0x86, 9, 0, 1];
            m.extend_from_slice(&(d.base as u32).to_le_bytes());
            m.extend_from_slice(&(d.size as u32).to_le_bytes());
            assert!(has(&m), "window of {d:?}");
            // Extended interrupt: consumer, edge, active high, exclusive (flags 0x03), one GSI.
            let mut i = vec![0x89, 6, 0, 0x03, 1];
            i.extend_from_slice(&d.gsi.to_le_bytes());
            assert!(has(&i), "interrupt of {d:?}");
        }
        // The other tables are as without devices.
        assert_eq!(t.len(), tables(1, 1).len());
    }
}
