//! Syscall emulation (SE mode): an x86-64 Linux program (static, or
//! dynamically linked with its ld.so) runs at CPL3 on kvmsim's KVM CPU,
//! every system call it makes is serviced here, and signals reach its
//! handlers ([`signal`]).
//!
//! This crate never touches KVM. It builds the process image in guest RAM
//! ([`process::Process::load`]: the ELF's segments, the initial stack with
//! argc, argv, envp and the auxiliary vector, page tables, and a minimal
//! kernel stub: GDT, TSS, IDT and the SYSCALL entry), and provides the
//! device ([`dev::SeDevice`]) that the stub reaches:
//!
//! - `syscall` goes to LSTAR = [`ENTRY_VA`], a user-executable page whose
//!   one instruction writes RAX to the SE window ([`SE_MMIO_BASE`], mapped
//!   at [`MMIO_VA`]). The write exits to kvmsim; the device takes the
//!   registers through [`mem::CallArgs::user_context`], performs the call,
//!   and sets the return state as `sysretq` would (RAX = result, RIP = RCX,
//!   RFLAGS = R11, CPL3). The page is user-accessible so that this works
//!   both where SYSCALL enters CPL0 (the stub runs at CPL0) and where, as
//!   on our hosts, it stays at CPL3 (the stub runs at CPL3): one exit per
//!   system call either way.
//! - Exceptions go through the IDT to CPL0 stubs that write the vector to
//!   the second page of the window (supervisor-only); the device then
//!   populates a page (demand paging), or ends the run with the signal
//!   Linux would send.

pub mod dev;
pub mod elf;
pub mod epoll;
pub mod eventfd;
pub mod mm;
pub mod names;
pub mod pipe;
pub mod process;
pub mod signal;
pub mod sys;

/// The SE window in guest physical address space (in the MMIO hole, clear
/// of kvmsim's other devices): page 0 is the system-call doorbell, page 1
/// the exception doorbell.
pub const SE_MMIO_BASE: u64 = 0xFED0_0000;
pub const SE_MMIO_SIZE: u64 = 0x2000;
/// Offsets in the window.
pub const SYSCALL_DOORBELL: u64 = 0;
pub const FAULT_DOORBELL: u64 = 0x1000;

/// The kernel stub's virtual addresses (the top 16 MiB of the address space).
pub const KBASE: u64 = 0xffff_ffff_ff00_0000;
pub const GDT_VA: u64 = KBASE;
pub const TSS_VA: u64 = KBASE + 0x80;
pub const IDT_VA: u64 = KBASE + 0x1000;
pub const TRAPS_VA: u64 = KBASE + 0x2000;
/// LSTAR: the SYSCALL entry (a user-executable page).
pub const ENTRY_VA: u64 = KBASE + 0x3000;
pub const KSTACK_VA: u64 = KBASE + 0x4000;
pub const KSTACK_TOP: u64 = KBASE + 0x8000;
pub const MMIO_VA: u64 = KBASE + 0x10000;
pub const FAULT_VA: u64 = KBASE + 0x11000;
/// Vectors with a gate: the exceptions (0..31), [`SIGNAL_VECTOR`] and
/// [`WAKE_VECTOR`].
pub const IDT_VECTORS: u64 = 34;
/// The interrupt kvmsim raises when a timer signal is due while the
/// program runs: its stub reports it like an exception, and the device
/// delivers the signal.
pub const SIGNAL_VECTOR: u64 = 32;
/// The interrupt kvmsim raises at a thread's CPU when something changed
/// for it (a futex wake, a new thread to start, page tables to reload):
/// its stub reports it, and the device decides what the CPU runs next.
pub const WAKE_VECTOR: u64 = 33;
/// Where a CPU with no thread to run (or whose thread waits) idles: in
/// kernel mode, `hlt` with interrupts enabled, then `jmp` back to it (in
/// the trap stubs' page, after the stubs). It idles in simulated time
/// until [`WAKE_VECTOR`] or [`SIGNAL_VECTOR`] arrives.
pub const IDLE_VA: u64 = TRAPS_VA + 0x800;
/// Where the other CPUs start (user-executable): `ud2`. Their first wake
/// interrupt is taken before it runs; if it ever ran, its #UD is taken
/// as a wake.
pub const PARK_VA: u64 = KBASE + 0x12000;
/// Task-state segments of CPUs 1 and up ([`tss_va`]), 128 bytes each.
pub const TSS_AREA_VA: u64 = KBASE + 0x10_0000;
/// Kernel stacks of CPUs 1 and up ([`kstack_top`]): 8 KiB each, with an
/// unmapped 8 KiB guard below each.
pub const KSTACKS_VA: u64 = KBASE + 0x20_0000;
/// The most CPUs (threads running at once) an SE process may have.
pub const MAX_SE_CPUS: usize = 64;

/// The TSS of CPU `cpu` (CPU 0's is [`TSS_VA`], beside the GDT).
pub fn tss_va(cpu: usize) -> u64 {
    if cpu == 0 {
        TSS_VA
    } else {
        TSS_AREA_VA + 0x80 * cpu as u64
    }
}

/// The top of CPU `cpu`'s kernel stack (RSP0 in its TSS).
pub fn kstack_top(cpu: usize) -> u64 {
    if cpu == 0 {
        KSTACK_TOP
    } else {
        KSTACKS_VA + 0x4000 * cpu as u64 + 0x4000
    }
}

/// Where the sim-ops window (gem5's m5 address mode) is mapped in the
/// process: the same address as its physical one, user-readable and
/// writable, 64 KiB.
pub const SIMOPS_VA: u64 = 0xFFFF_0000;
pub const SIMOPS_PHYS: u64 = 0xFFFF_0000;
pub const SIMOPS_SIZE: u64 = 0x1_0000;

/// The end of user space (as Linux's TASK_SIZE, one page less).
pub const USER_TOP: u64 = 0x7fff_ffff_f000;
/// The top of the initial stack, and the stack's reserved size.
pub const STACK_TOP: u64 = 0x7fff_ffff_e000;
pub const STACK_SIZE: u64 = 8 << 20;
/// mmap areas are placed top-down from here.
pub const MMAP_TOP: u64 = 0x7fff_f000_0000;
/// Where a static-pie program (ET_DYN) is loaded (Linux's ELF_ET_DYN_BASE).
pub const PIE_BASE: u64 = 0x5555_5555_4000;

/// The 16-byte IDT gate for a handler at `addr` (interrupt gate, CS 0x10).
pub fn idt_gate(addr: u64, dpl: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(addr as u16).to_le_bytes());
    g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    g[5] = 0x8e | (dpl << 5);
    g[6..8].copy_from_slice(&((addr >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((addr >> 32) as u32).to_le_bytes());
    g
}

/// Vectors whose exceptions push an error code.
fn has_error_code(v: u64) -> bool {
    matches!(v, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The trap stubs page: one 16-byte stub per vector at `TRAPS_VA + 16 v`:
/// `push $0` (where the CPU pushes no error code, so that every frame is
/// [error, RIP, CS, RFLAGS, RSP, SS]), `movl $v, FAULT_VA(%rip)`, `hlt`,
/// `jmp` back to the `hlt`.
pub fn trap_stubs() -> Vec<u8> {
    let mut page = vec![0xccu8; 4096];
    for v in 0..IDT_VECTORS {
        let at = (16 * v) as usize;
        let mut code = Vec::new();
        if !has_error_code(v) {
            code.extend_from_slice(&[0x6a, 0x00]);
        }
        let next = TRAPS_VA + 16 * v + code.len() as u64 + 10;
        let disp = FAULT_VA.wrapping_sub(next) as i64;
        code.extend_from_slice(&[0xc7, 0x05]);
        code.extend_from_slice(&(disp as i32).to_le_bytes());
        code.extend_from_slice(&(v as u32).to_le_bytes());
        code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
        page[at..at + code.len()].copy_from_slice(&code);
    }
    // The idle loop.
    let idle = (IDLE_VA - TRAPS_VA) as usize;
    page[idle..idle + 3].copy_from_slice(&[0xf4, 0xeb, 0xfd]);
    page
}

/// The park page: `ud2`.
pub fn park_page() -> Vec<u8> {
    let mut page = vec![0xccu8; 4096];
    page[0..2].copy_from_slice(&[0x0f, 0x0b]);
    page
}

/// The SYSCALL entry page: `movl %eax, MMIO_VA(%rip)`, then `ud2`
/// (never reached: kvmsim returns to RCX).
pub fn entry_page() -> Vec<u8> {
    let mut page = vec![0xccu8; 4096];
    let disp = MMIO_VA.wrapping_sub(ENTRY_VA + 6) as i64;
    page[0..2].copy_from_slice(&[0x89, 0x05]);
    page[2..6].copy_from_slice(&(disp as i32).to_le_bytes());
    page[6..8].copy_from_slice(&[0x0f, 0x0b]);
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stubs_address_their_doorbells() {
        let e = entry_page();
        let disp = i32::from_le_bytes(e[2..6].try_into().unwrap()) as i64;
        assert_eq!((ENTRY_VA + 6).wrapping_add(disp as u64), MMIO_VA);
        let t = trap_stubs();
        // Vector 14 (page fault) has an error code: no push.
        let s = &t[16 * 14..16 * 15];
        assert_eq!(&s[0..2], &[0xc7, 0x05]);
        let disp = i32::from_le_bytes(s[2..6].try_into().unwrap()) as i64;
        assert_eq!(
            (TRAPS_VA + 16 * 14 + 10).wrapping_add(disp as u64),
            FAULT_VA
        );
        assert_eq!(u32::from_le_bytes(s[6..10].try_into().unwrap()), 14);
        // Vector 6 (#UD) pushes a zero error code first.
        assert_eq!(&t[16 * 6..16 * 6 + 2], &[0x6a, 0]);
        assert!(t
            .chunks(16)
            .take(32)
            .all(|c| c.len() == 16 && c.contains(&0xf4)));
        let g = idt_gate(0xffff_ffff_ff00_2010, 0);
        assert_eq!(g[0..2], [0x10, 0x20]);
        assert_eq!(g[5], 0x8e);
    }
}
