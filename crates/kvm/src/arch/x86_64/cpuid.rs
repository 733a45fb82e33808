//! The CPUID table given to the guest: what KVM supports, minus what would
//! let host time leak into the guest or bypass the simulated devices.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// First and last leaf of the hypervisor range (KVM's paravirt interface:
/// kvmclock, steal time, PV EOI, ...).
pub const HYPERVISOR_LEAVES: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_00ff;
/// CPUID.1:ECX bit of x2APIC (offered only with `system.x2apic`).
pub const ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit of the TSC-deadline timer (not modelled).
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// CPUID.1:EDX bit of multi-threading (more than one logical processor).
pub const EDX_HTT: u32 = 1 << 28;

/// Filters `supported` for a vCPU with APIC ID `apic_id` in a system of
/// `cpus` CPUs: removes the KVM paravirt leaves, clears TSC-deadline and
/// sets x2APIC as `x2apic` says, and describes the topology: one package of `cpus` cores,
/// one thread each, APIC IDs 0..cpus (leaf 1's initial APIC ID and logical
/// count, leaf 4's cores per package, leaf 0xB's SMT and core levels with
/// the x2APIC ID, AMD's leaf 0x80000008 core count; leaf 0x1F is removed so
/// that leaf 0xB is the one read).
pub fn filter(supported: &CpuId, apic_id: u8, cpus: u8, x2apic: bool) -> Vec<kvm_cpuid_entry2> {
    let cpus = cpus.max(1);
    // Bits of the APIC ID that number the cores of the package.
    let core_bits = u32::BITS - u32::from(cpus - 1).leading_zeros();
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| !HYPERVISOR_LEAVES.contains(&e.function))
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .map(|e| {
            let mut e = *e;
            match e.function {
                1 => {
                    e.ecx &= !(ECX_X2APIC | ECX_TSC_DEADLINE);
                    if x2apic {
                        e.ecx |= ECX_X2APIC;
                    }
                    e.ebx = (e.ebx & 0x0000_ffff)
                        | (u32::from(apic_id) << 24)
                        | (u32::from(cpus) << 16);
                    if cpus > 1 {
                        e.edx |= EDX_HTT;
                    } else {
                        e.edx &= !EDX_HTT;
                    }
                }
                4 if e.eax & 0x1f != 0 => {
                    // Cores per package - 1; one thread shares each cache
                    // below the last level.
                    e.eax = (e.eax & 0x03ff_ffff) | ((u32::from(cpus) - 1) << 26);
                }
                0x8000_0008 => {
                    e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (u32::from(cpus) - 1);
                }
                _ => {}
            }
            e
        })
        .collect();
    let max_basic = out.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    if max_basic >= 0xb {
        let level = |index: u32, shift: u32, count: u32, kind: u32| kvm_cpuid_entry2 {
            function: 0xb,
            index,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: count,
            ecx: (kind << 8) | index,
            edx: u32::from(apic_id),
            ..Default::default()
        };
        out.push(level(0, 0, 1, 1));
        out.push(level(1, core_bits, u32::from(cpus), 2));
        out.push(level(2, 0, 0, 0));
    }
    out
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
        let out = filter(&table, 3, 1, false);
        let leaves: Vec<u32> = out.iter().map(|e| e.function).collect();
        assert_eq!(leaves, vec![0, 1, 0x4000_0100, 0x8000_0001]);
        assert_eq!(out[1].ecx, 1);
        assert_eq!(out[1].ebx, 0x0301_0800);
    }

    #[test]
    fn x2apic_is_offered_only_when_asked_for() {
        // KVM lists x2APIC as supported even where the host CPU lacks it.
        let table = CpuId::from_entries(&[entry(0, 0, 0), entry(1, 0, 1)]).unwrap();
        let out = filter(&table, 0, 4, true);
        assert_eq!(out[1].ecx, ECX_X2APIC | 1);
        let table = CpuId::from_entries(&[entry(0, 0, 0), entry(1, 0, ECX_X2APIC)]).unwrap();
        assert_eq!(filter(&table, 0, 4, false)[1].ecx, 0);
    }
}
