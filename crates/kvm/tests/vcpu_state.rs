//! A vCPU's whole state on a real vCPU: a guest sets known values in its
//! general registers, vector registers (YMM, and ZMM with the opmask
//! registers where the host has AVX-512) and MSRs; the state is saved,
//! goes through JSON, is restored into a fresh vCPU of a fresh VM holding
//! the same RAM, and the guest there stores its registers to memory: every
//! value survived, upper halves and all (gem5 loses the upper halves of
//! YMM and the MSRs it does not know).

use kvm::arch::x86_64::{boot, X86_64};
use kvm::state::{self, VcpuState};
use kvm::{Arch, KvmVcpu, KvmVm, Vcpu, VcpuSpec, VmExit};
use mem::{GuestRam, MemoryMap};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 4 << 20;
const CODE: u64 = 0x10_0000;
const PATTERN: u64 = 0x20_0000;
const OUT: u64 = 0x30_0000;
const MMIO: u64 = 0xd000_0000;
/// What the first MMIO read returns (lands in RAX).
const READ_VALUE: u64 = 0x5a5a_0000_1234_5678;

/// The snippets' sources are beside them (`tests/asm/*.s`, `build.sh`).
const AVX512: &[u8] = include_bytes!("asm/vstate_avx512.bin");
const AVX: &[u8] = include_bytes!("asm/vstate_avx.bin");

/// The values the snippet puts in RBX, RCX, RDX, RSI, RDI, RBP, R8-R15.
fn gpr_values() -> [u64; 14] {
    std::array::from_fn(|i| {
        0x1111_1111_1111_1111u64.wrapping_mul((i % 15 + 1) as u64) ^ 0x0123_4567_89ab_cdef
    })
}

/// MSRs set from the host before the guest runs: (index, name, value).
const MSRS: &[(u32, &str, u64)] = &[
    (0xc000_0103, "TSC_AUX", 0x2a),
    (0xc000_0081, "STAR", 0x0023_0010_0000_0000),
    (0xc000_0082, "LSTAR", 0xffff_ffff_8160_0000),
    (0xc000_0083, "CSTAR", 0xffff_ffff_8160_1000),
    (0xc000_0084, "SFMASK", 0x4_7700),
    (0xc000_0102, "KERNEL_GS_BASE", 0xffff_8880_1234_5000),
    (0x174, "SYSENTER_CS", 0x10),
    (0x176, "SYSENTER_EIP", 0xffff_ffff_8160_2000),
];

/// Fields drop in order: vCPU, VM, RAM.
struct Machine {
    vcpu: KvmVcpu,
    arch: X86_64,
    _vm: KvmVm,
    ram: GuestRam,
}

fn machine(ram: GuestRam) -> Machine {
    let mut vm = KvmVm::new().unwrap();
    vm.map_ram(&ram).unwrap();
    let vcpu = vm
        .create_cpu(&VcpuSpec {
            id: 0,
            cpus: 1,
            coalesced_mmio: false,
            x2apic: false,
        })
        .unwrap();
    Machine {
        vcpu,
        arch: X86_64::new(),
        _vm: vm,
        ram,
    }
}

/// What the vCPU's CPUID table offers.
struct Features {
    avx: bool,
    avx512: bool,
    /// XCR0 bits the table allows.
    xcr0: u64,
    /// Standard-format offsets of XSAVE components 2 (YMM_Hi128), 5
    /// (opmask), 6 (ZMM_Hi256), 7 (Hi16_ZMM).
    offsets: [usize; 8],
}

fn features(vcpu: &KvmVcpu) -> Features {
    let t = vcpu.cpuid_entries().unwrap();
    let leaf = |f: u32, i: u32| t.iter().find(|e| e.function == f && e.index == i);
    let l1 = leaf(1, 0).expect("CPUID leaf 1");
    let avx = l1.ecx & (1 << 28) != 0 && l1.ecx & (1 << 26) != 0;
    let d0 = leaf(0xd, 0);
    let xcr0 = d0.map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
    let avx512 = avx && leaf(7, 0).is_some_and(|e| e.ebx & (1 << 16) != 0) && xcr0 & 0xe0 == 0xe0;
    let mut offsets = [0; 8];
    for (c, o) in offsets.iter_mut().enumerate().skip(2) {
        *o = leaf(0xd, c as u32).map_or(0, |e| e.ebx as usize);
    }
    Features {
        avx,
        avx512,
        xcr0,
        offsets,
    }
}

fn pattern() -> Vec<u8> {
    (0..2048 + 16).map(|i| (i * 7 + 3) as u8).collect()
}

/// Runs until the next MMIO read of the snippet.
fn run_to_mmio(vcpu: &mut KvmVcpu) -> usize {
    let mut io = Vec::new();
    for _ in 0..1000 {
        match vcpu.run(&mut io) {
            VmExit::MmioRead { addr, len } => {
                assert_eq!(addr, MMIO);
                return len;
            }
            VmExit::Intr | VmExit::Retry => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("the snippet did not reach its MMIO read");
}

/// Bytes of the XSAVE area (little-endian words) at [off, off + len).
fn xsave_bytes(s: &VcpuState, off: usize, len: usize) -> Vec<u8> {
    let words = &s.xsave.as_ref().expect("an XSAVE area").0;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    bytes[off..off + len].to_vec()
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn every_register_survives_a_save_and_restore_into_a_fresh_vm() {
    if !kvm::usable_or_skip("every_register_survives") {
        return;
    }
    let ram = GuestRam::new(MemoryMap::for_size(RAM).unwrap()).unwrap();
    let mut m = machine(ram);
    let f = features(&m.vcpu);
    assert!(
        f.avx,
        "this test needs a host whose KVM offers AVX and XSAVE"
    );
    let (code, regs) = if f.avx512 {
        eprintln!("host has AVX-512: ZMM0-31 and k1-k7 are checked");
        (AVX512, 32)
    } else {
        eprintln!("host has no AVX-512: YMM0-15 are checked");
        (AVX, 16)
    };
    let mem = m.ram.memory();
    boot::write_boot_structures(mem).unwrap();
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    mem.write_slice(&pattern(), GuestAddress(PATTERN)).unwrap();
    boot::enter_long_mode(&mut m.arch, &mut m.vcpu, CODE, boot::DEFAULT_STACK_TOP, &[]).unwrap();
    {
        let gdt = boot::gdt();
        let s = m.arch.sregs_mut(&mut m.vcpu).unwrap();
        s.cs = boot::segment_from_entry(boot::USER_CS, gdt[usize::from(boot::USER_CS / 8)]);
        s.ss = boot::segment_from_entry(boot::USER_DS, gdt[usize::from(boot::USER_DS / 8)]);
        s.cr4 |= 1 << 18; // OSXSAVE
    }
    m.arch.update_kvm_state(&mut m.vcpu).unwrap();
    let mut xcrs = kvm_bindings::kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].value = f.xcr0 & if f.avx512 { 0xe7 } else { 0x7 };
    m.vcpu.set_xcrs(&xcrs).unwrap();
    let msrs: Vec<(u32, u64)> = MSRS.iter().map(|&(i, _, v)| (i, v)).collect();
    assert_eq!(
        m.vcpu.set_msrs(&msrs).unwrap(),
        msrs.len(),
        "KVM took only some of {MSRS:x?}"
    );

    // Run to the first read, complete it (a half entry, as a drain does):
    // the guest is between instructions with everything set.
    let len = run_to_mmio(&mut m.vcpu);
    assert!(m.vcpu.complete_mmio_read(&READ_VALUE.to_le_bytes()[..len]));
    m.vcpu.half_entry().unwrap();
    let saved = state::save(&m.vcpu).unwrap();

    // The saved state itself holds every value.
    assert_eq!(saved.regs.rax, READ_VALUE);
    let g = gpr_values();
    let r = &saved.regs;
    assert_eq!(
        [
            r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
            r.r14, r.r15
        ],
        g
    );
    for &(i, name, v) in MSRS {
        assert_eq!(saved.msr(i), Some(v), "{name} ({i:#x}) in the saved state");
    }
    let p = pattern();
    let width = if f.avx512 { 64 } else { 32 };
    for reg in 0..16 {
        let want = &p[reg * width..reg * width + width];
        assert_eq!(
            xsave_bytes(&saved, 160 + 16 * reg, 16),
            want[..16],
            "XMM{reg}"
        );
        assert_eq!(
            xsave_bytes(&saved, f.offsets[2] + 16 * reg, 16),
            want[16..32],
            "upper half of YMM{reg}"
        );
        if f.avx512 {
            assert_eq!(
                xsave_bytes(&saved, f.offsets[6] + 32 * reg, 32),
                want[32..64],
                "upper 256 bits of ZMM{reg}"
            );
        }
    }
    if f.avx512 {
        for reg in 16..32 {
            assert_eq!(
                xsave_bytes(&saved, f.offsets[7] + 64 * (reg - 16), 64),
                p[reg * 64..reg * 64 + 64],
                "ZMM{reg}"
            );
        }
        for k in 1..8 {
            assert_eq!(
                xsave_bytes(&saved, f.offsets[5] + 8 * k, 2),
                p[2048 + 2 * k..2048 + 2 * k + 2],
                "k{k}"
            );
        }
    }
    eprintln!(
        "saved: XSAVE area {} bytes, {} MSRs kept, {} refused by KVM ({:x?}), {} CPUID entries",
        saved.xsave_bytes(),
        saved.msrs.len(),
        saved.msrs_refused.len(),
        saved.msrs_refused,
        saved.cpuid.len()
    );

    // Through the serialised form, into a fresh vCPU of a fresh VM that
    // holds a copy of the RAM.
    let json = serde_json::to_string(&saved).unwrap();
    let back: VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    let copy = GuestRam::new(MemoryMap::for_size(RAM).unwrap()).unwrap();
    let mut buf = vec![0u8; RAM as usize];
    m.ram
        .memory()
        .read_slice(&mut buf, GuestAddress(0))
        .unwrap();
    copy.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    drop(m);
    let mut m2 = machine(copy);
    let report = state::restore(&mut m2.vcpu, &back).unwrap();
    eprintln!(
        "restored: KVM refused {} saved MSRs {:x?}",
        report.msrs_refused.len(),
        report.msrs_refused
    );
    for &(i, name, _) in MSRS {
        assert!(!report.msrs_refused.contains(&i), "{name} refused");
    }

    // Read back before running: the fresh vCPU holds the saved state.
    let again = state::save(&m2.vcpu).unwrap();
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs, saved.sregs);
    assert_eq!(again.xcrs, saved.xcrs);
    assert_eq!(again.xsave, saved.xsave, "the whole XSAVE area");
    assert_eq!(again.fpu, saved.fpu);
    assert_eq!(again.events, saved.events);
    assert_eq!(again.debug_regs, saved.debug_regs);
    assert_eq!(again.mp_state, saved.mp_state);
    assert_eq!(again.cpuid, saved.cpuid);
    assert_eq!(again.apic_base, saved.apic_base);
    let differ: Vec<(u32, u64, Option<u64>)> = saved
        .msrs
        .iter()
        .filter(|&&(i, v)| i != state::MSR_IA32_TSC && again.msr(i) != Some(v))
        .map(|&(i, v)| (i, v, again.msr(i)))
        .collect();
    assert!(
        differ.iter().all(|(i, ..)| report.msrs_refused.contains(i)),
        "MSRs KVM took but that read back different (index, saved, now): {differ:x?}"
    );
    eprintln!(
        "TSC: saved {:#x}, fresh vCPU after restore {:#x}",
        saved.tsc, again.tsc
    );

    // The guest continues from there: it stores what its registers hold.
    run_to_mmio(&mut m2.vcpu);
    let mem = m2.ram.memory();
    let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
    assert_eq!(rd(OUT), READ_VALUE, "RAX after the completed read");
    for (i, want) in g.iter().enumerate() {
        assert_eq!(rd(OUT + 8 + 8 * i as u64), *want, "GPR {i} in the guest");
    }
    let mut out = vec![0u8; regs * width];
    mem.read_slice(&mut out, GuestAddress(OUT + 8 + 0x100))
        .unwrap();
    for reg in 0..regs {
        assert_eq!(
            out[reg * width..(reg + 1) * width],
            p[reg * width..(reg + 1) * width],
            "vector register {reg} as the restored guest sees it"
        );
    }
    if f.avx512 {
        let mut k = [0u8; 16];
        mem.read_slice(&mut k, GuestAddress(OUT + 8 + 0x900))
            .unwrap();
        for n in 1..8 {
            assert_eq!(
                k[2 * n..2 * n + 2],
                p[2048 + 2 * n..2048 + 2 * n + 2],
                "k{n}"
            );
        }
    }
}
