//! Direct 64-bit entry for bare-metal guests.
//!
//! The loader writes a GDT (Linux's selector layout), a TSS and identity page
//! tables for the first 4 GiB (2 MiB pages, user-accessible, the device hole
//! at 3-4 GiB uncached) into low guest memory and starts the vCPU in long
//! mode at CPL0 with paging on, so that device windows below 4 GiB (sim-ops
//! at 0xFFFF0000) are reachable from ring 0 and ring 3.
//!
//! Layout of the boot area (all below [`BOOT_AREA_END`]):
//!
//! | address | what |
//! |---|---|
//! | 0x1000 | GDT (10 entries) |
//! | 0x1080 | TSS (RSP0 = [`INT_STACK_TOP`]) |
//! | 0x2000 | PML4 |
//! | 0x3000 | PDPT |
//! | 0x4000..0x8000 | four page directories (4 x 1 GiB) |
//! | 0x8000..0x9000 | stack for interrupts taken at ring 3 (TSS.RSP0) |

use crate::vcpu::Vcpu;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::X86_64;
use crate::{KvmError, Result};

pub const GDT_ADDR: u64 = 0x1000;
pub const TSS_ADDR: u64 = 0x1080;
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
pub const PD_ADDR: u64 = 0x4000;
pub const INT_STACK_TOP: u64 = 0x9000;
/// Everything below this address belongs to the boot structures.
pub const BOOT_AREA_END: u64 = 0x9000;
/// The default initial stack pointer (the stack grows down from here).
pub const DEFAULT_STACK_TOP: u64 = 0x8_0000;
/// Bare-metal images must load at or above this address.
pub const MIN_LOAD_ADDR: u64 = 0x10_0000;

/// Kernel code (64-bit), Linux's `__KERNEL_CS`.
pub const KERNEL_CS: u16 = 0x10;
/// Kernel data, `__KERNEL_DS`.
pub const KERNEL_DS: u16 = 0x18;
/// User data, `__USER_DS` (RPL 3).
pub const USER_DS: u16 = 0x2b;
/// User code (64-bit), `__USER_CS` (RPL 3).
pub const USER_CS: u16 = 0x33;
/// The TSS selector.
pub const TSS_SEL: u16 = 0x40;

const TSS_SIZE: u64 = 0x68;

/// A GDT descriptor from access byte, flags nibble, base and limit.
pub fn gdt_entry(access: u8, flags: u8, base: u32, limit: u32) -> u64 {
    (u64::from(limit) & 0xffff)
        | ((u64::from(base) & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | ((u64::from(limit >> 16) & 0xf) << 48)
        | ((u64::from(flags) & 0xf) << 52)
        | ((u64::from(base) >> 24) << 56)
}

/// The KVM view of the descriptor `entry` loaded with `selector`.
pub fn segment_from_entry(selector: u16, entry: u64) -> kvm_segment {
    let access = (entry >> 40) as u8;
    let flags = ((entry >> 52) & 0xf) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let g = flags & 0x8 != 0;
    kvm_segment {
        base,
        limit: if g {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: access & 0xf,
        present: access >> 7,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g: u8::from(g),
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    }
}

/// The boot GDT, indexed by selector / 8. Accessed bits are set: an
/// emulated far jump to a descriptor without it looped forever on a
/// software-assisted KVM.
pub fn gdt() -> [u64; 10] {
    let tss_low = gdt_entry(0x8b, 0, TSS_ADDR as u32, (TSS_SIZE - 1) as u32);
    [
        0,
        gdt_entry(0x9b, 0xc, 0, 0xfffff), // 0x08 kernel code, 32-bit
        gdt_entry(0x9b, 0xa, 0, 0xfffff), // 0x10 kernel code, 64-bit
        gdt_entry(0x93, 0xc, 0, 0xfffff), // 0x18 kernel data
        gdt_entry(0xfb, 0xc, 0, 0xfffff), // 0x20 user code, 32-bit
        gdt_entry(0xf3, 0xc, 0, 0xfffff), // 0x28 user data
        gdt_entry(0xfb, 0xa, 0, 0xfffff), // 0x30 user code, 64-bit
        0,
        tss_low, // 0x40 TSS (busy), low half
        TSS_ADDR >> 32,
    ]
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: u64, v: T) -> Result<()> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|source| KvmError::Memory {
            what: "writing the boot structures",
            source,
        })
}

/// Writes GDT, TSS and page tables into guest memory.
pub fn write_boot_structures(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in gdt().iter().enumerate() {
        write(mem, GDT_ADDR + 8 * i as u64, *e)?;
    }
    // TSS: zeroed, RSP0 at offset 4, I/O map base past the end (no bitmap).
    for off in (0..TSS_SIZE).step_by(8) {
        write(mem, TSS_ADDR + off, 0u64)?;
    }
    write(mem, TSS_ADDR + 4, INT_STACK_TOP)?;
    write(mem, TSS_ADDR + 0x66, TSS_SIZE as u16)?;
    // Present | writable | user.
    const PTE: u64 = 0x7;
    const PS: u64 = 1 << 7;
    const PWT_PCD: u64 = 0x18;
    write(mem, PML4_ADDR, PDPT_ADDR | PTE)?;
    for i in 1..512u64 {
        write(mem, PML4_ADDR + 8 * i, 0u64)?;
    }
    for i in 0..512u64 {
        let e = if i < 4 {
            (PD_ADDR + 0x1000 * i) | PTE
        } else {
            0
        };
        write(mem, PDPT_ADDR + 8 * i, e)?;
    }
    for i in 0..(4 * 512u64) {
        let addr = i << 21;
        let uncached = if addr >= mem::ram::MMIO_HOLE_START {
            PWT_PCD
        } else {
            0
        };
        write(mem, PD_ADDR + 8 * i, addr | PTE | PS | uncached)?;
    }
    Ok(())
}

/// Writes only the boot GDT (for a 32-bit protected-mode entry, which
/// needs no page tables and leaves the rest of low memory alone).
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in gdt().iter().enumerate() {
        write(mem, GDT_ADDR + 8 * i as u64, *e)?;
    }
    Ok(())
}

/// Puts the vCPU in 32-bit protected mode as the Multiboot specification
/// asks: CS a flat 32-bit code segment (selector 0x08), DS, ES, FS, GS and
/// SS flat data (0x18), CR0 = PE | ET (no paging), CR4 and EFER 0, EFLAGS
/// with IF clear, EIP = `entry`, EAX = `eax`, EBX = `ebx`, ESP = `esp`.
/// GDTR points at the boot GDT ([`write_gdt`]); the kernel must load its
/// own before it loads a segment register, as the specification says.
pub fn enter_protected_mode(
    arch: &mut X86_64,
    vcpu: &mut dyn Vcpu,
    entry: u32,
    eax: u32,
    ebx: u32,
    esp: u32,
) -> Result<()> {
    let gdt = gdt();
    let sregs = arch.sregs_mut(vcpu)?;
    sregs.cs = segment_from_entry(0x08, gdt[1]);
    let ds = segment_from_entry(KERNEL_DS, gdt[usize::from(KERNEL_DS / 8)]);
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = segment_from_entry(TSS_SEL, gdt[usize::from(TSS_SEL / 8)]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // PE | ET.
    sregs.cr0 = 0x11;
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    *arch.regs_mut(vcpu)? = kvm_regs {
        rip: u64::from(entry),
        rax: u64::from(eax),
        rbx: u64::from(ebx),
        rsp: u64::from(esp),
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })?;
    Ok(())
}

/// Puts the vCPU in 64-bit mode at CPL0: RIP = `entry`, RSP = `stack`,
/// boot arguments in RDI, RSI, RDX, RCX, R8, R9. The boot structures must
/// have been written with [`write_boot_structures`].
pub fn enter_long_mode(
    arch: &mut X86_64,
    vcpu: &mut dyn Vcpu,
    entry: u64,
    stack: u64,
    args: &[u64],
) -> Result<()> {
    let gdt = gdt();
    let sregs = arch.sregs_mut(vcpu)?;
    sregs.cs = segment_from_entry(KERNEL_CS, gdt[usize::from(KERNEL_CS / 8)]);
    let ds = segment_from_entry(KERNEL_DS, gdt[usize::from(KERNEL_DS / 8)]);
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = segment_from_entry(TSS_SEL, gdt[usize::from(TSS_SEL / 8)]);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // PE | MP | ET | NE | WP | AM | PG.
    sregs.cr0 = 0x8005_0033;
    // PAE | OSFXSR | OSXMMEXCPT.
    sregs.cr4 = 0x620;
    sregs.cr3 = PML4_ADDR;
    // LME | LMA.
    sregs.efer = 0x500;

    let mut regs = kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rflags: 0x2,
        ..Default::default()
    };
    let slots = [
        &mut regs.rdi,
        &mut regs.rsi,
        &mut regs.rdx,
        &mut regs.rcx,
        &mut regs.r8,
        &mut regs.r9,
    ];
    for (slot, v) in slots.into_iter().zip(args) {
        *slot = *v;
    }
    *arch.regs_mut(vcpu)? = regs;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)?;
    Ok(())
}

/// Puts the vCPU where a startup IPI with `vector` starts an application
/// processor: real mode at CS:IP = (vector << 8):0 (CS base vector << 12),
/// the other registers as INIT leaves them (flat 64 KiB data segments, CR0
/// = CD | NW | ET, no paging, EFER 0, descriptor tables at 0 with limit
/// 0xFFFF, RFLAGS 2, a reset x87/SSE state).
pub fn enter_sipi(arch: &mut X86_64, vcpu: &mut dyn Vcpu, vector: u8) -> Result<()> {
    let real = |selector: u16, base: u64, type_: u8, s: u8| kvm_segment {
        base,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 0,
        s,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let sregs = arch.sregs_mut(vcpu)?;
    sregs.cs = real(u16::from(vector) << 8, u64::from(vector) << 12, 0xb, 1);
    let data = real(0, 0, 3, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = real(0, 0, 0xb, 0);
    sregs.ldt = real(0, 0, 2, 0);
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0xffff;
    sregs.idt.base = 0;
    sregs.idt.limit = 0xffff;
    sregs.cr0 = 0x6000_0010;
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.cr8 = 0;
    sregs.efer = 0;
    sregs.interrupt_bitmap = [0; 4];
    *arch.regs_mut(vcpu)? = kvm_regs {
        rip: 0,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_fpu(&kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })?;
    Ok(())
}

/// The GDT of a syscall-emulation process: [`gdt`]'s selectors, with the
/// TSS descriptor (16 bytes in long mode) at `tss_base`.
pub fn gdt_with_tss(tss_base: u64) -> [u64; 10] {
    let mut g = gdt();
    g[8] = gdt_entry(0x8b, 0, tss_base as u32, (TSS_SIZE - 1) as u32);
    g[9] = tss_base >> 32;
    g
}

/// Where a syscall-emulation process starts: its page tables, descriptor
/// tables (virtual addresses inside those page tables) and first
/// instruction. The GDT must be [`gdt_with_tss`]`(tss_base)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserEntry {
    pub rip: u64,
    pub rsp: u64,
    pub cr3: u64,
    pub gdt_base: u64,
    pub idt_base: u64,
    pub idt_limit: u16,
    pub tss_base: u64,
    /// Where `syscall` goes (IA32_LSTAR).
    pub lstar: u64,
}

/// STAR for Linux's selectors: SYSCALL loads CS 0x10 / SS 0x18, SYSRET
/// (64-bit) CS 0x33 / SS 0x2b.
pub const STAR: u64 = (0x23 << 48) | (0x10 << 32);
/// SFMASK as Linux sets it: TF, DF, IF, IOPL, NT, AC cleared on entry.
pub const SFMASK: u64 = 0x47700;

/// Puts the vCPU in 64-bit user mode (CPL3) at `e.rip` with RSP =
/// `e.rsp`, on the process's page tables and descriptor tables, with
/// SYSCALL enabled (EFER.SCE, LSTAR/STAR/SFMASK), no-execute pages
/// (EFER.NXE), and XSAVE enabled with every user state component the
/// vCPU's CPUID offers among x87, SSE, AVX and AVX-512 (as Linux gives a
/// process). Other registers are zero, RFLAGS = IF, as Linux starts a
/// process.
pub fn enter_user_mode(arch: &mut X86_64, vcpu: &mut dyn Vcpu, e: &UserEntry) -> Result<()> {
    let gdt = gdt_with_tss(e.tss_base);
    let cpuid = vcpu.cpuid_entries().unwrap_or_default();
    let leaf = |f: u32, i: u32| cpuid.iter().find(|c| c.function == f && c.index == i);
    let xsave = leaf(1, 0).is_some_and(|c| c.ecx & (1 << 26) != 0);
    // x87 | SSE | AVX | opmask | ZMM_Hi256 | Hi16_ZMM, as offered.
    let xcr0 = leaf(0xd, 0).map_or(0x3, |c| u64::from(c.eax) & 0xe7) | 0x3;
    let sregs = arch.sregs_mut(vcpu)?;
    sregs.cs = segment_from_entry(USER_CS, gdt[usize::from(USER_CS / 8)]);
    let ds = segment_from_entry(USER_DS, gdt[usize::from(USER_DS / 8)]);
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = segment_from_entry(TSS_SEL, gdt[usize::from(TSS_SEL / 8)]);
    sregs.tr.base = e.tss_base;
    sregs.gdt.base = e.gdt_base;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = e.idt_base;
    sregs.idt.limit = e.idt_limit;
    // PE | MP | ET | NE | WP | AM | PG.
    sregs.cr0 = 0x8005_0033;
    // PAE | OSFXSR | OSXMMEXCPT (| OSXSAVE).
    sregs.cr4 = 0x620 | if xsave { 1 << 18 } else { 0 };
    sregs.cr3 = e.cr3;
    // SCE | LME | LMA | NXE.
    sregs.efer = 0xd01;
    *arch.regs_mut(vcpu)? = kvm_regs {
        rip: e.rip,
        rsp: e.rsp,
        rflags: 0x202,
        ..Default::default()
    };
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)?;
    if xsave {
        let mut x = kvm_bindings::kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        x.xcrs[0].xcr = 0;
        x.xcrs[0].value = xcr0;
        // Written now, before the special registers are pushed: KVM checks
        // XCR0 against CPUID, not against CR4.
        if let Err(err) = vcpu.set_xcrs(&x) {
            tracing::warn!("cannot enable XCR0 {xcr0:#x} for the process: {err}");
        }
    }
    let msrs = [
        (super::syscall_repair::MSR_STAR, STAR),
        (super::syscall_repair::MSR_LSTAR, e.lstar),
        (super::syscall_repair::MSR_SFMASK, SFMASK),
    ];
    let n = vcpu.set_msrs(&msrs)?;
    if n != msrs.len() {
        return Err(KvmError::Setup(format!(
            "KVM accepted {n} of the 3 SYSCALL MSRs (STAR, LSTAR, SFMASK)"
        )));
    }
    Ok(())
}

/// The MSRs a booting Linux kernel expects firmware to have set: fast
/// strings enabled (IA32_MISC_ENABLE) and write-back as the default memory
/// type with MTRRs enabled (IA32_MTRR_DEF_TYPE).
pub fn set_boot_msrs(vcpu: &mut dyn Vcpu) -> Result<()> {
    let entries = [(0x1a0, 1), (0x2ff, (1 << 11) | 6)];
    let n = vcpu.set_msrs(&entries)?;
    if n != entries.len() {
        tracing::warn!("KVM accepted {n} of {} boot MSRs", entries.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_what_they_encode() {
        let g = gdt();
        let cs = segment_from_entry(KERNEL_CS, g[2]);
        assert_eq!(
            (cs.l, cs.db, cs.dpl, cs.type_, cs.present, cs.s),
            (1, 0, 0, 0xb, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ucs = segment_from_entry(USER_CS, g[6]);
        assert_eq!((ucs.l, ucs.dpl), (1, 3));
        let uds = segment_from_entry(USER_DS, g[5]);
        assert_eq!((uds.db, uds.dpl, uds.type_), (1, 3, 3));
        let tr = segment_from_entry(TSS_SEL, g[8]);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s),
            (TSS_ADDR, 0x67, 0xb, 0)
        );
        assert_eq!(g[2], 0x00af_9b00_0000_ffff);
        assert_eq!(g[3], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn the_protected_mode_code_segment_is_flat_32_bit() {
        let cs = segment_from_entry(0x08, gdt()[1]);
        assert_eq!(
            (cs.l, cs.db, cs.dpl, cs.type_, cs.base, cs.limit, cs.g),
            (0, 1, 0, 0xb, 0, 0xffff_ffff, 1)
        );
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_gdt(&mem).unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(GDT_ADDR + 8)).unwrap(),
            gdt()[1]
        );
        // Nothing but the GDT: the page-table area stays as it was.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(), 0);
    }

    #[test]
    fn page_tables_map_4gib_identity() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem).unwrap();
        let rd = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(rd(PML4_ADDR), PDPT_ADDR | 7);
        assert_eq!(rd(PDPT_ADDR + 8 * 3), (PD_ADDR + 0x3000) | 7);
        assert_eq!(rd(PDPT_ADDR + 8 * 4), 0);
        // 2 MiB page 1 maps 2 MiB.
        assert_eq!(rd(PD_ADDR + 8), (2 << 20) | 0x87);
        // The last page (0xFFE00000, containing sim-ops) is uncached.
        assert_eq!(rd(PD_ADDR + 8 * 2047), 0xffe0_0000 | 0x87 | 0x18);
        assert_eq!(rd(TSS_ADDR + 4), INT_STACK_TOP);
    }
}
