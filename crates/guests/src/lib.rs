//! The bare-metal test guests, built from `asm/*.s` at compile time and
//! embedded. A config names one as `kernel = "builtin:NAME"`;
//! `kvmsim guests --extract DIR` writes them out as ELF files.
//!
//! Every guest is a static x86-64 ELF linked at 1 MiB and entered in 64-bit
//! mode at CPL0 with boot arguments in RDI, RSI, RDX, RCX, R8, R9:
//!
//! * `hello`: prints `Hello from the guest` on COM1, then sim-ops exit.
//! * `compute`: drops to ring 3, runs [`compute_loop_native`]'s loop for
//!   RDI iterations (default 100,000,000), returns to ring 0 through a page
//!   fault, prints the count and the result, then sim-ops exit.
//! * `fault`: triple faults on purpose.
//! * `simops`: checks sum and an unknown op, times a work item, dumps and
//!   resets stats, then exit(RDI delay ns) or, if RSI != 0, fail(RDI, RSI).
//! * `ticks`: counts interval-timer interrupts (period RDI ns) taken while
//!   ring 3 runs the compute loop (RSI iterations); prints the counts and
//!   the simulated time elapsed.
//! * `sleep`: halts until RSI (10) interrupts of period RDI (1 s) arrived.
//! * `steps`: an endless loop whose instruction count shows in RAX
//!   ((N - 2) / 2 after N instructions at ring 0); at ring 3 if RDI != 0.
//! * `iostream`: RDI (2000) port writes and reads of the UART scratch
//!   register, summed; prints the sum.
//! * `pingpong`: bounces a counter RSI (100) times over link port 0 with a
//!   peer; RDI = 0 initiates and sums round-trip times, RDI = 1 answers and
//!   sums its processing time.
//! * `pcirq` (platform "pc"): times 10 interrupts each through the 8259
//!   pair in virtual-wire mode, through the I/O APIC, and from the local
//!   APIC timer.
//! * `int3`: three `int3` traps under a #BP handler; prints the count.
//! * `syscall`: RDI (1000) system calls from ring 3 to a ring-0 handler that
//!   returns with sysretq; prints the count.
//! * `fwait`: `fwait` at ring 0 with nothing pending, then with CR0.TS and
//!   CR0.MP set (#NM, counted); prints "fwait: passed=2 nm=1".
//! * `flags`: RDI (20,000) passes of Linux's memmove loop in kernel mode
//!   while the interval timer interrupts every RSI (50,000) ns (none if RDX
//!   != 0); prints how many passes lost the carry flag to an interrupt.
//! * `irqint3`: RSI (5,000) `int3` traps at ring 0 with interrupts on while
//!   the interval timer interrupts every RDI (30,000) ns; prints the traps
//!   and interrupts taken (each interrupt kvmsim injects must arrive).

macro_rules! guest {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(env!("OUT_DIR"), "/", $name, ".elf")) as &[u8],
        )
    };
}

/// Every built-in guest: (name, ELF image).
pub const GUESTS: &[(&str, &[u8])] = &[
    guest!("hello"),
    guest!("compute"),
    guest!("fault"),
    guest!("simops"),
    guest!("ticks"),
    guest!("sleep"),
    guest!("steps"),
    guest!("iostream"),
    guest!("pingpong"),
    guest!("pcirq"),
    guest!("int3"),
    guest!("syscall"),
    guest!("flags"),
    guest!("fwait"),
    guest!("irqint3"),
];

/// The ELF image of built-in guest `name`.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|(n, _)| *n == name).map(|(_, e)| *e)
}

extern "C" {
    fn kvmsim_compute_loop(n: u64) -> u64;
}

/// Runs the `compute` guest's loop natively on the host: the same machine
/// code, assembled from the same source.
pub fn compute_loop_native(iterations: u64) -> u64 {
    // SAFETY: kvmsim_compute_loop (asm/compute_loop.s) follows the System V
    // ABI, touches only caller-saved registers (RAX, RCX, RDX, RDI, R8, R9)
    // and no memory.
    unsafe { kvmsim_compute_loop(iterations) }
}

/// The same computation written in Rust, to check the assembly against.
pub fn compute_loop_reference(iterations: u64) -> u64 {
    let (mut x, mut acc) = (1u64, 0u64);
    for _ in 0..iterations {
        x = x
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(0x1405_7b7e_f767_814f);
        acc = acc.wrapping_add(x >> 33);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_are_x86_64_elf_executables() {
        for (name, elf) in GUESTS {
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
            assert_eq!(elf[4], 2, "{name}: 64-bit");
            assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "{name}: x86-64");
            let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
            assert_eq!(entry, 0x100000, "{name}: entry at 1 MiB");
        }
        assert!(builtin("hello").is_some());
        assert!(builtin("nope").is_none());
    }

    #[test]
    fn native_loop_matches_reference() {
        for n in [0, 1, 2, 1000, 123_457] {
            assert_eq!(compute_loop_native(n), compute_loop_reference(n), "n={n}");
        }
    }
}
