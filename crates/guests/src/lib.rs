//! The bare-metal test guests, built from `asm/*.s` at compile time and
//! embedded. A config names one as `kernel = "builtin:NAME"`;
//! `kvmsim guests --extract DIR` writes them out as ELF files.
//!
//! Every guest is a static x86-64 ELF linked at 1 MiB and (all but
//! `multiboot`) entered in 64-bit mode at CPL0 with boot arguments in RDI, RSI, RDX, RCX, R8, R9:
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
//! * `netpong` (platform "pc", an Ethernet link): bounces RSI (10) frames
//!   of RDX (60) bytes through the first virtio-net NIC with a peer;
//!   RDI = 0 initiates and sums round-trip times, RDI = 1 answers.
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
//! * `echo`: reads RDI (1) bytes from COM1, polling with RTS asserted and
//!   dropping RTS before the last, and prints them back.
//! * `pioloop`: RDI (10,000) port reads at ring 0 (the UART scratch
//!   register) and nothing else, then exit (`kvmsim bench`).
//! * `mmioloop`: RDI (10,000) 64-bit MMIO reads at ring 0 (the interval
//!   timer's PERIOD_NS) and nothing else, then exit (`kvmsim bench`).
//! * `kick`: spins at ring 3 until the interval timer (period RDI ns,
//!   100,000) has interrupted it RSI (1,000) times, then exit (`kvmsim
//!   bench`: a fixed number of forced exits on any host).
//! * `smpboot`: the BSP starts the APs (APIC IDs 1..N-1, N = RDI, default
//!   2) with INIT, SIPI, SIPI through a real-mode trampoline at 0x10000
//!   (`asm/smp.s`); every CPU runs the compute loop at ring 3 for RSI
//!   (10,000,000) iterations and reports into shared memory; the BSP waits
//!   at most RDX (10,000) simulated ms, prints a line per CPU and
//!   `smpboot: K of N CPUs started`, and fails naming the APs that never
//!   reported. With N = 1 the BSP runs alone (no local APIC needed).
//! * `ipipong`: the BSP starts AP 1, then bounces a fixed IPI RSI (100)
//!   times between APIC 0 and APIC 1 and prints the round trips in
//!   simulated ns (total, mean, min, max); RDX (1,000) simulated ms bound
//!   each wait.
//!
//! * `multiboot`: a Multiboot-1 kernel (header after a 2-byte jump at 1
//!   MiB), entered in 32-bit protected mode: checks EAX, the information
//!   structure (memory sizes, memory map, a command line holding
//!   `mbcheck=kvmsim`, a module starting with `KVMSIM-MODULE`, whose byte
//!   sum it prints), fw_cfg's signature and CPU count and pc-testdev's
//!   scratch port, then writes the bits of the failed checks to
//!   isa-debug-exit (status 1 when all passed).
//!
//! * `ckpt`: fills YMM0-15 with known values, spins at ring 3 through RSI (20)
//!   interval-timer periods of RDI (200 us) ns, then checks the registers
//!   and prints `ckpt: periods=N ymm=ok`: a guest to checkpoint in the
//!   middle of (nothing it prints depends on host timing).
//! * `gdbdemo`: a debugger's target with symbols: calls `triple` on RDI
//!   (14), stores the result in `result`, prints it and ends with sim-ops
//!   fail(0, result) (status 42 unless a debugger changed something).
//! * `readfile`: prints the host file of `system.readfile` (the readfile
//!   sim-op, in chunks of RDI (256) bytes) and ends with fail(0, bytes
//!   read), or exit when it read nothing.
//! * `pcevents`: a target for PC events with symbols: calls `counted` RDI
//!   times (10), reads the simulated time, calls `marker` (which reads it
//!   again first), prints "pcevents: calls=N before=T0 at=T1" (ns) and
//!   exits with 0.
//! * `irqwin` (platform "pc"): interrupts that wait while IF is clear
//!   (self-IPIs) are taken at the first instruction boundary that accepts
//!   them: two at a `sti; nop; cli` (the second right after the first's
//!   `iretq`), one after a `popf` that sets IF, and one its handler's
//!   `iretq` leaves waiting; prints "irqwin: sti=2 order=0x..6160 popf=1
//!   iret=2" and exits with 0, else fails with the bits of the cases that
//!   went wrong.
//! * `x2apic` (platform "pc", `system.x2apic = true`): switches its local
//!   APIC to x2APIC mode and checks it through the MSRs: ID (0) and derived
//!   LDR (1), the xAPIC page reading all-ones, #GP for an ID write, a DFR
//!   read and a switch straight back to xAPIC, a SELF IPI with its EOI;
//!   prints "x2apic: id=0 ldr=1 mmio=0x00000000ffffffff gp=3 selfipi=1
//!   mode=1"; fails with the bits of the checks that went wrong.
//!
//! [`ABOUT`] has a line and the arguments of each (`kvmsim guests` prints it).

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
    guest!("netpong"),
    guest!("int3"),
    guest!("syscall"),
    guest!("flags"),
    guest!("fwait"),
    guest!("irqint3"),
    guest!("echo"),
    guest!("pioloop"),
    guest!("mmioloop"),
    guest!("kick"),
    guest!("smpboot"),
    guest!("ipipong"),
    guest!("multiboot"),
    guest!("ckpt"),
    guest!("gdbdemo"),
    guest!("readfile"),
    guest!("pcevents"),
    guest!("irqwin"),
    guest!("x2apic"),
];

/// What a built-in guest does, for `kvmsim guests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct About {
    pub name: &'static str,
    /// Its boot arguments (RDI, RSI, ...) with their defaults, or "-".
    pub args: &'static str,
    /// What it does, in one line.
    pub about: &'static str,
}

/// A line on every guest of [`GUESTS`], in the same order.
pub const ABOUT: &[About] = &[
    About {
        name: "hello",
        args: "-",
        about: "prints \"Hello from the guest\" on COM1, then exits with 0",
    },
    About {
        name: "compute",
        args: "RDI=iterations (100000000)",
        about: "ring-3 integer loop (kvmsim bench compute's); prints the count and the result",
    },
    About {
        name: "fault",
        args: "-",
        about: "triple faults on purpose (status 252, a register dump)",
    },
    About {
        name: "simops",
        args: "RDI=delay ns, RSI=fail code (0: exit)",
        about: "exercises sim-ops: sum, an unknown op, a work item, stats dump and reset, \
                then exit or fail after the delay",
    },
    About {
        name: "ticks",
        args: "RDI=timer period ns (100000), RSI=iterations (50000000), RDX!=0: NMIs",
        about: "counts interval-timer interrupts taken while ring 3 computes",
    },
    About {
        name: "sleep",
        args: "RDI=timer period ns (1000000000), RSI=periods (10)",
        about: "halts through RSI timer periods; prints simulated ns and TSC cycles elapsed",
    },
    About {
        name: "steps",
        args: "RDI!=0: at ring 3",
        about: "endless, exactly countable instruction stream (RAX = (N - 2) / 2), \
                for max_insts",
    },
    About {
        name: "iostream",
        args: "RDI=accesses (2000)",
        about: "writes and reads back the UART scratch register; prints the sum read",
    },
    About {
        name: "pingpong",
        args: "RDI=role (0 starts, 1 answers), RSI=rounds (100)",
        about: "bounces a counter over link port 0 with a peer system; \
                reports round-trip times",
    },
    About {
        name: "pcirq",
        args: "- (platform = \"pc\")",
        about: "times 10 interrupts each through the 8259 pair, the I/O APIC \
                and the local APIC timer",
    },
    About {
        name: "netpong",
        args: "RDI=role (0 starts, 1 answers), RSI=rounds (10), RDX=frame bytes (60) \
               (platform = \"pc\", an Ethernet link)",
        about: "bounces Ethernet frames through virtio-net with a peer system; \
                reports round-trip times",
    },
    About {
        name: "int3",
        args: "-",
        about: "three int3 traps under a #BP handler; prints the count",
    },
    About {
        name: "syscall",
        args: "RDI=calls (1000)",
        about: "system calls from ring 3 to a ring-0 handler that returns with sysretq",
    },
    About {
        name: "flags",
        args: "RDI=passes (20000), RSI=timer period ns (50000), RDX!=0: no timer",
        about: "Linux's memmove loop in kernel mode under timer interrupts; \
                prints passes that lost the carry flag",
    },
    About {
        name: "fwait",
        args: "-",
        about: "fwait at ring 0, then with CR0.TS and CR0.MP set (#NM); \
                prints \"fwait: passed=2 nm=1\"",
    },
    About {
        name: "irqint3",
        args: "RDI=timer period ns (30000), RSI=traps (5000)",
        about: "int3 traps at ring 0 with interrupts on under the interval timer; \
                prints the traps and interrupts taken",
    },
    About {
        name: "echo",
        args: "RDI=bytes (1, at most 256)",
        about: "reads bytes from COM1 (the console's input) and prints them back",
    },
    About {
        name: "pioloop",
        args: "RDI=reads (10000)",
        about: "port reads at ring 0 and nothing else, then exits (kvmsim bench pio's)",
    },
    About {
        name: "mmioloop",
        args: "RDI=reads (10000)",
        about: "64-bit MMIO reads at ring 0 and nothing else, then exits (kvmsim bench mmio's)",
    },
    About {
        name: "kick",
        args: "RDI=timer period ns (100000), RSI=interrupts (1000)",
        about: "spins at ring 3 until the interval timer has interrupted it RSI times, \
                then exits (kvmsim bench kick's)",
    },
    About {
        name: "smpboot",
        args: "RDI=CPUs (2, at most 64), RSI=iterations per CPU (10000000), \
               RDX=wait limit ms (10000); system.cpus >= RDI",
        about: "starts every AP with INIT-SIPI-SIPI, each CPU computes at ring 3 and reports; \
                prints a line per CPU and \"K of N CPUs started\"",
    },
    About {
        name: "ipipong",
        args: "RSI=round trips (100), RDX=wait limit ms (1000); system.cpus >= 2",
        about: "starts AP 1, bounces an IPI between APIC 0 and 1; \
                prints the round trips in simulated ns",
    },
    About {
        name: "multiboot",
        args: "- (a Multiboot kernel: append, initrd = modules)",
        about: "entered in 32-bit protected mode; checks the Multiboot information (memory map, \
                command line \"mbcheck=kvmsim\", a module starting \"KVMSIM-MODULE\"), fw_cfg \
                and pc-testdev; ends through isa-debug-exit with the failed checks' bits (status 1: all passed)",
    },
    About {
        name: "ckpt",
        args: "RDI=timer period ns (200000), RSI=periods (20), RDX!=0: checkpoint (sim-op 0x43) once filled",
        about: "fills YMM0-15 at ring 3, spins through RSI timer periods, then checks \
                them; prints \"ckpt: periods=N ymm=ok\" (a guest to checkpoint in the middle of)",
    },
    About {
        name: "gdbdemo",
        args: "RDI=input (14)",
        about: "a debugger's target with symbols (triple, result, done): result = 3 * RDI, printed; \
                ends with sim-ops fail(0, result), so the status is the result (42)",
    },
    About {
        name: "readfile",
        args: "RDI=chunk bytes (256, at most 4096)",
        about: "prints the host file of system.readfile (--readfile), read with the readfile \
                sim-op; ends with fail(0, bytes read), or exit when it read nothing",
    },
    About {
        name: "pcevents",
        args: "RDI=calls (10)",
        about: "a PC events' target with symbols (counted, marker): calls counted N times, reads \
                the simulated time, calls marker (which reads it first), prints \"pcevents: \
                calls=N before=T0 at=T1\" (ns), exits with 0",
    },
    About {
        name: "irqwin",
        args: "- (platform \"pc\")",
        about: "self-IPIs waiting while IF is clear must run at the first boundary that accepts \
                them (sti; nop; cli, popf, a handler's iretq); prints \"irqwin: sti=2 \
                order=0x..6160 popf=1 iret=2\"; fails with the bits of the cases that went wrong",
    },
    About {
        name: "x2apic",
        args: "- (platform \"pc\", system.x2apic = true)",
        about: "switches the local APIC to x2APIC mode and checks it through its MSRs (ID, \
                derived LDR, #GP cases, a SELF IPI and its EOI, the xAPIC page gone); prints \
                \"x2apic: id=0 ldr=1 mmio=0x00000000ffffffff gp=3 selfipi=1 mode=1\"; fails \
                with the bits of the checks that went wrong",
    },
];

/// What built-in guest `name` does.
pub fn about(name: &str) -> Option<&'static About> {
    ABOUT.iter().find(|a| a.name == name)
}

/// The ELF image of built-in guest `name`.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|(n, _)| *n == name).map(|(_, e)| *e)
}

/// A static x86-64 Linux program (not a guest) for `kvmsim bench`'s SE
/// figures: `se_bench N` runs [`compute_loop_native`]'s loop and prints
/// `result=0x<hex>`; `se_bench N s` makes N getppid calls (asm/se_bench.s).
pub const SE_BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/se_bench.elf"));

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
    fn every_guest_is_described() {
        let guests: Vec<&str> = GUESTS.iter().map(|(n, _)| *n).collect();
        let described: Vec<&str> = ABOUT.iter().map(|a| a.name).collect();
        assert_eq!(guests, described, "ABOUT must list GUESTS, in order");
        for a in ABOUT {
            assert!(!a.about.is_empty() && !a.args.is_empty(), "{}", a.name);
            assert!(!a.about.contains('\n'), "{}: one line", a.name);
        }
    }

    #[test]
    fn native_loop_matches_reference() {
        for n in [0, 1, 2, 1000, 123_457] {
            assert_eq!(compute_loop_native(n), compute_loop_reference(n), "n={n}");
        }
    }
}
