//! `kvmsim doctor`: probes what this host's KVM can do, with tiny guests,
//! and derives what kvmsim must add for a Linux guest (kernel command-line
//! flags) and which repairs it applies. Every finding is measured here.

use crate::probe::{run_snippet, ProbeExit, PROBE_CODE};
use crate::{perf, KvmVm};

/// One probe's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub name: &'static str,
    /// True when the host behaves like hardware virtualization here.
    pub ok: bool,
    pub detail: String,
    /// What a failure disables or which repair kvmsim applies.
    pub consequence: String,
}

/// All findings and what follows from them.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Flags kvmsim adds to a Linux command line on this host.
    pub linux_flags: Vec<String>,
}

/// The CPUID registers whose feature bits the guest may see without KVM
/// supporting them: (leaf, register index in [eax, ebx, ecx, edx], Linux
/// cpufeature word). Linux's clearcpuid= takes word * 32 + bit.
const CPUID_WORDS: &[(u32, usize, u32)] = &[
    (1, 2, 4),           // leaf 1 ECX
    (7, 1, 9),           // leaf 7 EBX
    (7, 2, 16),          // leaf 7 ECX
    (7, 3, 18),          // leaf 7 EDX
    (0x8000_0001, 2, 6), // leaf 0x80000001 ECX
];

/// Linux features whose code assumes another one without Linux clearing
/// them together (6.1 has no such dependency): (dependent, required).
const LINUX_DEPENDS: &[(u32, u32)] = &[
    // FSRM: memmove drops its length check and relies on ERMS for short
    // copies; with ERMS hidden and FSRM seen, a copy shorter than 32 bytes
    // runs away through memory (found booting Debian's 6.1 kernel).
    (18 * 32 + 4, 9 * 32 + 9),
];

/// Adds to `bits` (clearcpuid= bits) every feature that depends on one of
/// them; sorted, without duplicates.
pub fn hide_dependents(bits: &mut Vec<u32>) {
    for &(dependent, required) in LINUX_DEPENDS {
        if bits.contains(&required) {
            bits.push(dependent);
        }
    }
    bits.sort_unstable();
    bits.dedup();
}

/// Features Linux clears by itself when XSAVE is cleared (`noxsave`), by
/// its cpuid-deps table: AVX and all that builds on it, PKU. With `noxsave`
/// on the command line they need no clearcpuid= entry.
const CLEARED_WITH_XSAVE: &[u32] = &[
    4 * 32 + 12,  // FMA
    4 * 32 + 28,  // AVX
    9 * 32 + 5,   // AVX2
    9 * 32 + 16,  // AVX512F
    9 * 32 + 17,  // AVX512DQ
    9 * 32 + 21,  // AVX512IFMA
    9 * 32 + 26,  // AVX512PF
    9 * 32 + 27,  // AVX512ER
    9 * 32 + 28,  // AVX512CD
    9 * 32 + 30,  // AVX512BW
    9 * 32 + 31,  // AVX512VL
    16 * 32 + 1,  // AVX512VBMI
    16 * 32 + 3,  // PKU
    16 * 32 + 6,  // AVX512_VBMI2
    16 * 32 + 9,  // VAES
    16 * 32 + 10, // VPCLMULQDQ
    16 * 32 + 11, // AVX512_VNNI
    16 * 32 + 12, // AVX512_BITALG
    16 * 32 + 14, // AVX512_VPOPCNTDQ
    18 * 32 + 2,  // AVX512_4VNNIW
    18 * 32 + 3,  // AVX512_4FMAPS
    18 * 32 + 8,  // AVX512_VP2INTERSECT
];

/// Linux reads the clearcpuid= argument into a 128-byte buffer: a longer
/// list loses its tail (silently, apart from what the kernel logs).
pub const CLEARCPUID_MAX: usize = 127;

/// The clearcpuid= argument for `bits`: the bits in `first` come first
/// (they matter most if the list is cut), then the others in order. Returns
/// the argument and the bits that do not fit in Linux's buffer.
pub fn clearcpuid_arg(bits: &[u32], first: &[u32]) -> (String, Vec<u32>) {
    let mut ordered: Vec<u32> = bits.iter().copied().filter(|b| first.contains(b)).collect();
    ordered.extend(bits.iter().copied().filter(|b| !first.contains(b)));
    let mut arg = String::new();
    let mut dropped = Vec::new();
    for b in ordered {
        let item = if arg.is_empty() {
            b.to_string()
        } else {
            format!(",{b}")
        };
        if arg.len() + item.len() > CLEARCPUID_MAX {
            dropped.push(b);
        } else {
            arg.push_str(&item);
        }
    }
    (arg, dropped)
}

/// The MMIO read every snippet ends with: `mov 0xffff0000, %rax` (via EAX).
const END: [u8; 8] = [0xb8, 0x00, 0x00, 0xff, 0xff, 0x48, 0x8b, 0x00];

fn snippet(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    v.extend_from_slice(&END);
    v
}

/// A loop of `n` iterations of `dec %rcx; jnz`: RCX holds n.
const LOOP: [u8; 5] = [0x48, 0xff, 0xc9, 0x75, 0xfb];

/// Nanoseconds per loop iteration at privilege level `cpl`.
fn loop_speed(cpl: u8, n: u64) -> Option<f64> {
    let r = run_snippet(&snippet(&LOOP), cpl, [0, 0, n, 0], &[], 20_000).ok()?;
    (r.exit == ProbeExit::Mmio).then(|| r.host_ns as f64 / n as f64)
}

fn cpuinfo_vendor() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("vendor_id"))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn cpuinfo_flags() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("flags"))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

impl Report {
    /// True when the probes found that this host's KVM cannot emulate
    /// `insn` (a name of [`crate::arch::x86_64::emulate::SUPPORTED`] or
    /// "cmpxchg16b", "popcnt") at CPL0.
    pub fn emulator_lacks(&self, insn: &str) -> bool {
        let name = format!("emulator: {insn}");
        self.findings
            .iter()
            .any(|f| (f.name == name || f.name.ends_with(&format!(" {insn}"))) && !f.ok)
    }

    /// True when `syscall` from CPL3 does not enter CPL0 here (the
    /// SYSCALL-entry repair is needed).
    pub fn needs_syscall_repair(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.name == "syscall from CPL3 enters CPL0" && !f.ok)
    }
}

/// The probes' report, run once per process.
pub fn cached() -> &'static Report {
    static REPORT: std::sync::OnceLock<Report> = std::sync::OnceLock::new();
    REPORT.get_or_init(run)
}

/// Runs every probe.
pub fn run() -> Report {
    let mut rep = Report::default();
    fn add(v: &mut Vec<Finding>, name: &'static str, ok: bool, detail: String, consequence: &str) {
        v.push(Finding {
            name,
            ok,
            detail,
            consequence: consequence.into(),
        })
    }
    if let Err(e) = KvmVm::available() {
        add(
            &mut rep.findings,
            "kvm",
            false,
            e.to_string(),
            "kvmsim cannot run guests",
        );
        return rep;
    }
    add(
        &mut rep.findings,
        "kvm",
        true,
        format!("{} usable", KvmVm::device_path().display()),
        "",
    );

    let flags = cpuinfo_flags();
    let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
    add(
        &mut rep.findings,
        "hardware virtualization",
        hw,
        if hw {
            "vmx/svm in /proc/cpuinfo".into()
        } else {
            "no vmx/svm in /proc/cpuinfo".into()
        },
        "without it KVM may be software-assisted: see the speed probes",
    );

    let cpl3 = loop_speed(3, 20_000_000);
    let cpl0 = loop_speed(0, 20_000);
    let (emulated, detail) = match (cpl0, cpl3) {
        (Some(k), Some(u)) => (
            k > 20.0 * u,
            format!("{k:.2} ns/iteration at CPL0, {u:.2} at CPL3"),
        ),
        _ => (true, "the speed probes did not complete".into()),
    };
    add(
        &mut rep.findings,
        "native speed at CPL0 and CPL3",
        !emulated,
        detail,
        "kernel-mode code is emulated: keep guest kernel work short; Linux boots slowly \
         and its lockup watchdogs would misread that as hangs (Linux: nowatchdog)",
    );
    if emulated {
        rep.linux_flags.push("nowatchdog".into());
    }

    let filter = KvmVm::new().and_then(|vm| vm.trap_apic_base_writes());
    add(
        &mut rep.findings,
        "user-space MSR filter (IA32_APIC_BASE)",
        matches!(filter, Ok(true)),
        match &filter {
            Ok(true) => "KVM_X86_SET_MSR_FILTER with KVM_CAP_X86_USER_SPACE_MSR: writes of \
                         MSR 0x1B exit to kvmsim, which hands them on to KVM and to the local APIC \
                         (system.x2apic can be used)"
                .into(),
            Ok(false) => "KVM_CAP_X86_USER_SPACE_MSR or KVM_CAP_X86_MSR_FILTER missing".into(),
            Err(e) => format!("setting the filter failed: {e}"),
        },
        "a guest that disables its local APIC through IA32_APIC_BASE keeps kvmsim's APIC \
         enabled (KVM alone handles the MSR), and system.x2apic = true is refused",
    );

    let pmu = perf::pmu_available();
    add(
        &mut rep.findings,
        "hardware PMU",
        pmu,
        if pmu { "guest instruction counter opens".into() } else { "perf hardware events unavailable".into() },
        "instruction counts unavailable (nan); the run timer is a POSIX timer; max_insts single-steps",
    );

    if let Ok(vm) = KvmVm::new() {
        let khz = vm.create_vcpu(0).ok().and_then(|v| v.tsc_khz().ok());
        add(
            &mut rep.findings,
            "TSC rate",
            khz.is_some(),
            khz.map_or("KVM_GET_TSC_KHZ failed".into(), |k| {
                format!("{k} kHz (KVM_GET_TSC_KHZ)")
            }),
            "set system.cpu.host_freq by hand",
        );
        let scaling = vm.kvm().check_extension(kvm_ioctls::Cap::TscControl);
        add(
            &mut rep.findings,
            "TSC scaling",
            scaling,
            format!(
                "KVM_CAP_TSC_CONTROL {}",
                if scaling { "present" } else { "absent" }
            ),
            "the guest TSC runs at the host rate",
        );
    }

    for cpl in [0u8, 3] {
        let ok = crate::probe::single_step_works(cpl).unwrap_or(false);
        add(
            &mut rep.findings,
            if cpl == 0 {
                "single-step at CPL0"
            } else {
                "single-step at CPL3"
            },
            ok,
            format!(
                "KVM_GUESTDBG_SINGLESTEP {} one instruction",
                if ok {
                    "stops after"
                } else {
                    "does not stop after"
                }
            ),
            "exact max_insts impossible at that privilege level without a PMU",
        );
    }

    // Interrupt-window exits where CPL0 code sets IF.
    let window = crate::probe::irq_window_exits();
    let assist = crate::probe::window_assist();
    add(
        &mut rep.findings,
        "interrupt-window exit at CPL0",
        matches!(window, Ok(true)),
        match &window {
            Ok(true) => "KVM_EXIT_IRQ_WINDOW_OPEN after `sti` with a window requested".into(),
            Ok(false) => {
                "`sti` with a window requested runs on without KVM_EXIT_IRQ_WINDOW_OPEN".into()
            }
            Err(e) => format!("the probe failed: {e}"),
        },
        if assist.iret_breakpoint {
            "kvmsim single-steps CPL0 code while an interrupt waits for IF, with an execution \
             breakpoint on an iret's return address (a step there stopped one instruction late \
             on the software-assisted host we measured): system.cpu.irqWindowSteps"
        } else if assist.step {
            "kvmsim single-steps CPL0 code while an interrupt waits for IF; after an iret it \
             stops one instruction late: system.cpu.irqWindowSteps"
        } else {
            "an interrupt that waits for IF is injected at the next exit with IF set, which may \
             be long after the guest opened its window"
        },
    );

    // CPUID as the guest sees it (leaf 1 ECX, leaf 7 EBX) against KVM's table.
    let guest = |leaf: u64| {
        run_snippet(&snippet(&[0x0f, 0xa2]), 0, [leaf, 0, 0, 0], &[], 5_000)
            .ok()
            .filter(|r| r.exit == ProbeExit::Mmio)
            .map(|r| r.regs)
    };
    let supported = KvmVm::new().ok().and_then(|vm| {
        vm.kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .ok()
    });
    // kvmsim's table: what KVM supports minus what kvmsim hides (x2APIC,
    // TSC-deadline, the KVM paravirt leaves).
    let filtered = supported
        .as_ref()
        .map(|c| crate::arch::x86_64::cpuid::filter(c, 0, 1, false));
    let table = |leaf: u32, reg: usize| {
        filtered.as_ref().map(|c| {
            // A leaf missing from the table supports nothing.
            c.iter()
                .find(|e| e.function == leaf && e.index == 0)
                .map_or(0, |e| u64::from([e.eax, e.ebx, e.ecx, e.edx][reg]))
        })
    };
    let mut extra: Vec<u32> = Vec::new();
    for &(leaf, reg, word) in CPUID_WORDS {
        if let (Some(g), Some(t)) = (guest(u64::from(leaf)), table(leaf, reg)) {
            let seen = g[reg] & 0xffff_ffff;
            let unsupported = seen & !t;
            for bit in 0..32 {
                if unsupported & (1 << bit) != 0 {
                    extra.push(word * 32 + bit);
                }
            }
        }
    }
    // The hypervisor bit is information, not an instruction set.
    extra.retain(|&b| b != 4 * 32 + 31);
    add(
        &mut rep.findings,
        "guest CPUID is KVM's table",
        extra.is_empty(),
        if extra.is_empty() {
            "the guest sees the filtered table".into()
        } else {
            format!(
                "the guest sees {} feature bits KVM does not support: {extra:?}",
                extra.len()
            )
        },
        "these features are hidden from Linux with clearcpuid=/noxsave/nofsgsbase; kvmsim also hides the TSC-deadline timer, which it does not model, and x2APIC unless system.x2apic is set",
    );

    // Instructions the emulator lacks (at CPL0, where it emulates).
    let gap = |name: &'static str, body: &[u8], rbx: u64| {
        let r = run_snippet(&snippet(body), 0, [0, rbx, 0, 0], &[], 5_000).ok();
        let failed = r
            .as_ref()
            .is_some_and(|r| r.exit == ProbeExit::EmulationFailure);
        (name, failed)
    };
    let mut gap_bits: Vec<u32> = Vec::new();
    let gaps = [
        gap("int3", &[0xcc], 0),
        // fwait with nothing pending (CR0.TS clear): a no-op on hardware.
        gap("fwait", &[0x9b], 0),
        // lock cmpxchg16b [rbx], rbx = 0x200000 (16-byte aligned RAM).
        gap("cmpxchg16b", &[0xf0, 0x48, 0x0f, 0xc7, 0x0b], 0x20_0000),
        gap("popcnt", &[0xf3, 0x48, 0x0f, 0xb8, 0xc0], 0),
    ];
    for (name, failed) in gaps {
        let consequence = match name {
            "int3" => "kvmsim completes it (advance RIP, inject #BP)",
            "fwait" => "kvmsim completes it (advance RIP, or inject #NM/#MF)",
            "cmpxchg16b" => "Linux: clearcpuid=141 (CX16)",
            _ => "Linux: clearcpuid=151 (POPCNT)",
        };
        rep.findings.push(Finding {
            name: match name {
                "int3" => "emulator: int3",
                "fwait" => "emulator: fwait",
                "cmpxchg16b" => "emulator: lock cmpxchg16b",
                _ => "emulator: popcnt",
            },
            ok: !failed,
            detail: if failed {
                "emulation failure at CPL0".into()
            } else {
                "executes".into()
            },
            consequence: consequence.into(),
        });
        let bit = match (name, failed) {
            ("cmpxchg16b", true) => Some(141),
            ("popcnt", true) => Some(151),
            _ => None,
        };
        extra.extend(bit);
        gap_bits.extend(bit);
    }

    // SYSCALL from CPL3: STAR selects kernel CS 0x10; LSTAR = the landing pad.
    let mut code = vec![0x0f, 0x05]; // syscall
    code.resize(16, 0x90);
    code.extend_from_slice(&END);
    let msrs = [
        (0xc000_0080, 0xd01), // EFER: LME | LMA | SCE | NXE
        (0xc000_0081, (0x10u64 << 32) | (0x23u64 << 48)),
        (0xc000_0082, PROBE_CODE + 16),
    ];
    let sys = run_snippet(&code, 3, [0; 4], &msrs, 5_000).ok();
    let enters = sys
        .as_ref()
        .is_some_and(|r| r.exit == ProbeExit::Mmio && r.cpl == 0);
    add(
        &mut rep.findings,
        "syscall from CPL3 enters CPL0",
        enters,
        match &sys {
            Some(r) => format!(
                "after syscall: rip {:#x}, CPL {}, exit {:?}",
                r.rip, r.cpl, r.exit
            ),
            None => "the probe did not run".into(),
        },
        "kvmsim repairs each entry from the page fault it raises (a breakpoint on the guest's page-fault handler; system.cpu.syscall_repair)",
    );

    hide_dependents(&mut extra);
    // If the list is cut, the emulator gaps and the dependents must stay.
    let mut priority = gap_bits;
    priority.extend(LINUX_DEPENDS.iter().map(|&(dependent, _)| dependent));
    let xsave = 4 * 32 + 26;
    let fsgsbase = 9 * 32;
    let noxsave = extra.contains(&xsave);
    if noxsave {
        rep.linux_flags.push("noxsave".into());
    }
    if extra.contains(&fsgsbase) {
        rep.linux_flags.push("nofsgsbase".into());
    }
    let clear: Vec<u32> = extra
        .iter()
        .copied()
        .filter(|&b| b != xsave && b != fsgsbase)
        .filter(|b| !(noxsave && CLEARED_WITH_XSAVE.contains(b)))
        .collect();
    let (arg, dropped) = clearcpuid_arg(&clear, &priority);
    add(
        &mut rep.findings,
        "clearcpuid= fits Linux's buffer",
        dropped.is_empty(),
        if dropped.is_empty() {
            format!("{} bits in {} characters (at most {CLEARCPUID_MAX})", clear.len(), arg.len())
        } else {
            format!("{} bits do not fit in {CLEARCPUID_MAX} characters: {dropped:?}", dropped.len())
        },
        "Linux keeps seeing the features that do not fit; the emulator gaps and dependents go first",
    );
    if !arg.is_empty() {
        rep.linux_flags.push(format!("clearcpuid={arg}"));
    }
    rep
}

/// The window-cost finding: what each end of a lock-step window costs
/// (runs of several CPUs or systems; see `probe::forced_exit_cost`). Kept
/// out of [`run`], whose report every Linux run computes: this probe is
/// only for `kvmsim doctor` and for runs with windows.
pub fn window_cost() -> Finding {
    match crate::probe::forced_exit_cost_cached() {
        Some(c) => {
            // Hardware virtualization: a few microseconds.
            let ok = c.loss_ns < 10_000;
            Finding {
                name: "cost of a forced exit",
                ok,
                detail: format!(
                    "{:.1} us of host time lost per run cut by the run timer (median of {} runs \
                     of {} us)",
                    c.loss_ns as f64 / 1e3,
                    c.runs,
                    c.span_ns / 1000
                ),
                consequence: format!(
                    "runs of several CPUs or systems lose this at every window end: keep \
                     sim.quantum at {} or more for a loss near 5% (kvmsim warns at run time)",
                    fmt_us(c.loss_ns.saturating_mul(20))
                ),
            }
        }
        None => Finding {
            name: "cost of a forced exit",
            ok: false,
            detail: "the probe did not complete".into(),
            consequence: "kvmsim cannot tell what a window end costs here".into(),
        },
    }
}

/// `ns` as the config would write it, rounded up to a whole microsecond
/// or millisecond.
pub fn fmt_us(ns: u64) -> String {
    let us = ns.div_ceil(1000).max(1);
    if us >= 1000 {
        format!("{}ms", us.div_ceil(1000))
    } else {
        format!("{us}us")
    }
}

/// Whether a hypercall at CPL0 returns (`kvmsim doctor` only: where it
/// does not, the probe waits out its 2 s limit, too long for every run's
/// cached report).
pub fn hypercall() -> Finding {
    // A hypercall at CPL0 (KVM answers an unknown one with -KVM_ENOSYS and
    // moves on): `vmcall` (Intel) or `vmmcall` (AMD), RAX = 10
    // (KVM_HC_SEND_IPI, what kvm-unit-tests' apic test calls).
    let amd = cpuinfo_vendor().contains("AuthenticAMD");
    let call: &[u8] = if amd {
        &[0x0f, 0x01, 0xd9]
    } else {
        &[0x0f, 0x01, 0xc1]
    };
    let hc = run_snippet(&snippet(call), 0, [10, u64::MAX, 0, u64::MAX], &[], 2_000).ok();
    Finding {
        name: "hypercall at CPL0 returns",
        ok: hc.as_ref().is_some_and(|r| r.exit == ProbeExit::Mmio),
        detail: match &hc {
            Some(r) if r.exit == ProbeExit::Mmio => {
                format!(
                    "{} returned RAX {}",
                    if amd { "vmmcall" } else { "vmcall" },
                    r.regs[0] as i64
                )
            }
            Some(r) => format!(
                "{} at CPL0: {:?} after {} ms, RIP still at the instruction: {}",
                if amd { "vmmcall" } else { "vmcall" },
                r.exit,
                r.host_ns / 1_000_000,
                r.rip == PROBE_CODE
            ),
            None => "the probe did not run".into(),
        },
        consequence:
            "a guest's hypercall never returns: the CPU spins on it (kvm-unit-tests' apic test \
         does one for its PV IPI sub-test: run it with TEST_DEVICE=0, as the suite does \
         without its test device)"
                .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clearcpuid_puts_priorities_first_and_respects_the_limit() {
        let (arg, dropped) = clearcpuid_arg(&[128, 141, 297, 580], &[141, 580]);
        assert_eq!(arg, "141,580,128,297");
        assert!(dropped.is_empty());
        let many: Vec<u32> = (100..200).collect();
        let (arg, dropped) = clearcpuid_arg(&many, &[199]);
        assert!(arg.len() <= CLEARCPUID_MAX);
        assert!(arg.starts_with("199,100,"));
        assert_eq!(arg.split(',').count() + dropped.len(), 100);
        assert_eq!(dropped.last(), Some(&198));
    }

    #[test]
    fn hiding_erms_hides_fsrm_too() {
        let mut bits = vec![297, 151];
        hide_dependents(&mut bits);
        assert_eq!(bits, vec![151, 297, 580]);
        let mut bits = vec![580, 297, 580];
        hide_dependents(&mut bits);
        assert_eq!(bits, vec![297, 580]);
        let mut bits = vec![151];
        hide_dependents(&mut bits);
        assert_eq!(bits, vec![151]);
    }

    #[test]
    fn quanta_are_written_as_the_config_takes_them() {
        assert_eq!(fmt_us(0), "1us");
        assert_eq!(fmt_us(87_300), "88us");
        assert_eq!(fmt_us(1_746_000), "2ms");
        assert_eq!(fmt_us(999_000), "999us");
        assert_eq!(fmt_us(1_000_000), "1ms");
    }
}
