//! The CPUID table given to the guest: what KVM supports, minus what would
//! let host time leak into the guest or bypass the simulated devices.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// First and last leaf of the hypervisor range (KVM's paravirt interface:
/// kvmclock, steal time, PV EOI, ...).
pub const HYPERVISOR_LEAVES: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00ff;
/// CPUID.1:ECX bit of x2APIC (the simulated LAPIC is xAPIC only).
pub const ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit of the TSC-deadline timer (not modelled).
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Filters `supported` for a vCPU with APIC ID `apic_id`: removes the KVM
/// paravirt leaves, clears x2APIC and TSC-deadline, and sets the initial
/// APIC ID in leaf 1.
pub fn filter(supported: &CpuId, apic_id: u8) -> Vec<kvm_cpuid_entry2> {
    supported
        .as_slice()
        .iter()
        .filter(|e| !HYPERVISOR_LEAVES.contains(&e.function))
        .map(|e| {
            let mut e = *e;
            if e.function == 1 {
                e.ecx &= !(ECX_X2APIC | ECX_TSC_DEADLINE);
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(apic_id) << 24);
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn removes_paravirt_leaves_and_bits() {
        let table = CpuId::from_entries(&[
            entry(0, 0, 0),
            entry(1, 0xff00_0800, ECX_X2APIC | ECX_TSC_DEADLINE | 1),
            entry(0x4000_0000, 0x4b4d_564b, 0),
            entry(0x4000_0001, 0, 0),
            entry(0x4000_0100, 0, 0),
            entry(0x8000_0001, 0, 0),
        ])
        .unwrap();
        let out = filter(&table, 3);
        let leaves: Vec<u32> = out.iter().map(|e| e.function).collect();
        assert_eq!(leaves, vec![0, 1, 0x4000_0100, 0x8000_0001]);
        assert_eq!(out[1].ecx, 1);
        assert_eq!(out[1].ebx, 0x0300_0800);
    }
}
