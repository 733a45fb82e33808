//! Probes of what this host's KVM can do, with tiny built-in guests.
//! Results are cached for the life of the process.

use std::sync::OnceLock;

use mem::{GuestRam, MemoryMap};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::{boot, X86_64};
use crate::arch::Arch;
use crate::vcpu::{KvmVcpu, Vcpu, VmExit};
use crate::{KvmError, KvmVm, Result};

/// Eight `nop`s, then `hlt` (or an exception at CPL3, which also exits).
const NOPS: [u8; 9] = [0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0xf4];

/// Whether KVM single-step stops after exactly one instruction at
/// privilege level `cpl` (0 or 3) on this host.
pub fn single_step_works(cpl: u8) -> Result<bool> {
    static CPL0: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    static CPL3: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    let cell = if cpl == 3 { &CPL3 } else { &CPL0 };
    cell.get_or_init(|| probe_single_step(cpl).map_err(|e| e.to_string()))
        .clone()
        .map_err(KvmError::Setup)
}

/// Whether a hardware execution breakpoint (a debug register, through
/// KVM_SET_GUEST_DEBUG) stops code running at privilege level `cpl` (0 or
/// 3) on this host, before the instruction at its address.
pub fn hw_breakpoint_works(cpl: u8) -> Result<bool> {
    static CPL0: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    static CPL3: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    let cell = if cpl == 3 { &CPL3 } else { &CPL0 };
    cell.get_or_init(|| probe_hw_breakpoint(cpl).map_err(|e| e.to_string()))
        .clone()
        .map_err(KvmError::Setup)
}

fn probe_hw_breakpoint(cpl: u8) -> Result<bool> {
    let ProbeVm {
        mut vcpu,
        mut arch,
        vm: _vm,
        _ram,
    } = probe_vm(&NOPS, cpl)?;
    let at = PROBE_CODE + 4;
    arch.add_pc_event(at)?;
    arch.update_kvm_state(&mut vcpu)?;
    // The nops run to the breakpoint, or (not trapped) to the hlt, which
    // exits at CPL0 and faults at CPL3 (no IDT: a shutdown exit).
    let exit = vcpu.run(&mut Vec::new());
    let stopped = matches!(exit, VmExit::Debug(_));
    arch.kvm_state_changed();
    let rip = arch.regs(&mut vcpu)?.rip;
    let works = stopped && rip == at;
    tracing::debug!("hardware breakpoint probe at CPL{cpl}: {exit:?}, rip {rip:#x}: {works}");
    Ok(works)
}

/// A fresh VM with `code` at [`PROBE_CODE`], its vCPU in 64-bit mode at
/// CPL `cpl` (not yet pushed to KVM). Fields drop in order: vCPU, VM, RAM.
struct ProbeVm {
    vcpu: KvmVcpu,
    arch: X86_64,
    vm: KvmVm,
    _ram: GuestRam,
}

fn probe_vm(code: &[u8], cpl: u8) -> Result<ProbeVm> {
    let map = MemoryMap::for_size(4 << 20).map_err(|e| KvmError::Setup(e.to_string()))?;
    let ram = GuestRam::new(map).map_err(|e| KvmError::Setup(e.to_string()))?;
    ram.memory()
        .write_slice(code, GuestAddress(PROBE_CODE))
        .map_err(|source| KvmError::Memory {
            what: "writing the probe guest",
            source,
        })?;
    let mut vm = KvmVm::new()?;
    vm.map_ram(&ram)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let mut arch = X86_64::new();
    boot::write_boot_structures(ram.memory())?;
    boot::enter_long_mode(
        &mut arch,
        &mut vcpu,
        PROBE_CODE,
        boot::DEFAULT_STACK_TOP,
        &[],
    )?;
    if cpl == 3 {
        let gdt = boot::gdt();
        let sregs = arch.sregs_mut(&mut vcpu)?;
        sregs.cs = boot::segment_from_entry(boot::USER_CS, gdt[usize::from(boot::USER_CS / 8)]);
        sregs.ss = boot::segment_from_entry(boot::USER_DS, gdt[usize::from(boot::USER_DS / 8)]);
    }
    Ok(ProbeVm {
        vcpu,
        arch,
        vm,
        _ram: ram,
    })
}

fn probe_single_step(cpl: u8) -> Result<bool> {
    // Bind every field: a dropped VM or RAM would end the probe early.
    let ProbeVm {
        mut vcpu,
        mut arch,
        vm: _vm,
        _ram,
    } = probe_vm(&NOPS, cpl)?;
    arch.update_kvm_state(&mut vcpu)?;
    arch.set_step(&mut vcpu, crate::arch::Stepper::Insts, true)?;
    let stepped = matches!(vcpu.run(&mut Vec::new()), VmExit::Debug(_));
    arch.kvm_state_changed();
    let rip = arch.regs(&mut vcpu)?.rip;
    let works = stepped && rip == PROBE_CODE + 1;
    tracing::debug!("single-step probe at CPL{cpl}: debug exit {stepped}, rip {rip:#x}: {works}");
    Ok(works)
}

/// How a probe snippet ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeExit {
    /// An MMIO read (the snippets end with one: `mov (0xffff0000), %rax`).
    Mmio,
    Hlt,
    Shutdown,
    /// KVM could not emulate an instruction.
    EmulationFailure,
    /// The time limit.
    Timeout,
    Other(String),
}

/// What a probe snippet did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRun {
    pub exit: ProbeExit,
    pub rip: u64,
    pub cpl: u8,
    pub host_ns: u64,
    /// RAX, RBX, RCX, RDX after the run.
    pub regs: [u64; 4],
}

/// Where probe code is loaded.
pub const PROBE_CODE: u64 = 0x10_0000;

/// Runs `code` at CPL `cpl` (0 or 3) on a fresh VM with `regs` (RAX, RBX,
/// RCX, RDX) and `msrs` set, for at most `limit_ms` of host time.
pub fn run_snippet(
    code: &[u8],
    cpl: u8,
    regs: [u64; 4],
    msrs: &[(u32, u64)],
    limit_ms: u64,
) -> Result<ProbeRun> {
    use std::time::Instant;
    let ProbeVm {
        mut vcpu,
        mut arch,
        vm,
        _ram,
    } = probe_vm(code, cpl)?;
    if let Ok(cpuid) = vm
        .kvm()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
    {
        if let Ok(t) = kvm_bindings::CpuId::from_entries(&crate::arch::x86_64::cpuid::filter(
            &cpuid, 0, 1, false,
        )) {
            let _ = vcpu.set_cpuid(&t);
        }
    }
    {
        let r = arch.regs_mut(&mut vcpu)?;
        r.rax = regs[0];
        r.rbx = regs[1];
        r.rcx = regs[2];
        r.rdx = regs[3];
    }
    arch.update_kvm_state(&mut vcpu)?;
    if !msrs.is_empty() {
        vcpu.set_msrs(msrs)?;
    }
    // The run timer: a kick after the limit, to this thread.
    let signals = crate::timer::ThreadSignals::setup(
        vcpu.fd(),
        crate::timer::TimerKind::Posix,
        &crate::timer::KickHandle::default(),
    )
    .map_err(|e| KvmError::Timer(format!("probe timer: {e}")))?;
    signals
        .arm_timer_ns(limit_ms * 1_000_000)
        .map_err(|e| KvmError::Timer(format!("probe timer: {e}")))?;
    let t = Instant::now();
    let exit = match vcpu.run(&mut Vec::new()) {
        VmExit::MmioRead { .. } | VmExit::MmioWrite { .. } => ProbeExit::Mmio,
        VmExit::Hlt => ProbeExit::Hlt,
        VmExit::EmulationFailure(_) => ProbeExit::EmulationFailure,
        VmExit::Fatal(m) if m.starts_with("KVM_EXIT_SHUTDOWN") => ProbeExit::Shutdown,
        VmExit::Intr => ProbeExit::Timeout,
        other => ProbeExit::Other(format!("{other:?}")),
    };
    let host_ns = t.elapsed().as_nanos() as u64;
    let _ = signals.disarm_timer();
    crate::sys::discard_pending(crate::timer::kick_signal());
    arch.kvm_state_changed();
    let r = *arch.regs(&mut vcpu)?;
    let cpl = arch.privilege_level(&mut vcpu)?;
    Ok(ProbeRun {
        exit,
        rip: r.rip,
        cpl,
        host_ns,
        regs: [r.rax, r.rbx, r.rcx, r.rdx],
    })
}

/// What a run loses to each window end where KVM must be left and entered
/// again (a forced exit: the run timer's signal, the exit, the re-entry).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForcedExitCost {
    /// Host time per forced exit that the guest did not run (median).
    pub loss_ns: u64,
    /// The span each run was given.
    pub span_ns: u64,
    /// Runs measured.
    pub runs: u32,
}

/// Measures [`ForcedExitCost`]: a guest counts in a CPL3 loop (`inc %rax;
/// jmp`), first in one long run that gives its rate, then in runs cut by
/// the run timer after `span_ns`; each short run's loss is its host time
/// minus the time its count took at the long run's rate.
pub fn forced_exit_cost(span_ns: u64, runs: u32) -> Result<ForcedExitCost> {
    use std::time::Instant;
    // inc %rax; jmp .-3
    const COUNT: [u8; 5] = [0x48, 0xff, 0xc0, 0xeb, 0xfb];
    let ProbeVm {
        mut vcpu,
        mut arch,
        vm: _vm,
        _ram,
    } = probe_vm(&COUNT, 3)?;
    let signals = crate::timer::ThreadSignals::setup(
        vcpu.fd(),
        crate::timer::TimerKind::Posix,
        &crate::timer::KickHandle::default(),
    )
    .map_err(|e| KvmError::Timer(format!("probe timer: {e}")))?;
    // One run of `ns`: (host ns, iterations counted).
    let mut run = |ns: u64| -> Result<(u64, u64)> {
        let before = arch.regs(&mut vcpu)?.rax;
        arch.update_kvm_state(&mut vcpu)?;
        signals
            .arm_timer_ns(ns)
            .map_err(|e| KvmError::Timer(format!("probe timer: {e}")))?;
        let t = Instant::now();
        let exit = vcpu.run(&mut Vec::new());
        let host = t.elapsed().as_nanos() as u64;
        let _ = signals.disarm_timer();
        crate::sys::discard_pending(crate::timer::kick_signal());
        arch.kvm_state_changed();
        if exit != VmExit::Intr {
            return Err(KvmError::Setup(format!(
                "forced-exit probe: the counting loop exited with {exit:?}"
            )));
        }
        Ok((host, arch.regs(&mut vcpu)?.rax.wrapping_sub(before)))
    };
    // The rate, from the best of three long runs (a busy host only slows
    // them, which would overstate the loss).
    let mut rate = 0.0f64;
    for _ in 0..3 {
        let (host, n) = run(20_000_000)?;
        if host > 0 {
            rate = rate.max(n as f64 / host as f64);
        }
    }
    if rate <= 0.0 {
        return Err(KvmError::Setup(
            "forced-exit probe: the counting loop did not count".into(),
        ));
    }
    let mut losses = Vec::with_capacity(runs as usize);
    for _ in 0..runs.max(1) {
        let (host, n) = run(span_ns)?;
        let ran = (n as f64 / rate) as u64;
        losses.push(host.saturating_sub(ran));
    }
    losses.sort_unstable();
    Ok(ForcedExitCost {
        loss_ns: losses[losses.len() / 2],
        span_ns,
        runs: runs.max(1),
    })
}

/// [`forced_exit_cost`] with the settings kvmsim uses (50 us runs, 101 of
/// them), measured once per process; `None` if the probe failed.
pub fn forced_exit_cost_cached() -> Option<ForcedExitCost> {
    static COST: OnceLock<Option<ForcedExitCost>> = OnceLock::new();
    *COST.get_or_init(|| match forced_exit_cost(50_000, 101) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::debug!("forced-exit probe: {e}");
            None
        }
    })
}

/// How kvmsim makes up for a host whose KVM does not exit when the guest
/// opens an interrupt window (see [`irq_window_exits`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowAssist {
    /// Single-step CPL0 code while an interrupt waits for the guest to
    /// accept it (IF clear, or an interrupt shadow), and inject it at the
    /// first instruction boundary where it can.
    pub step: bool,
    /// An execution breakpoint on the return address of an `iret` stepped
    /// over: this host's step after an `iret` stops one instruction late.
    pub iret_breakpoint: bool,
}

/// What this host's KVM needs to deliver a waiting interrupt at the
/// instruction boundary where the guest opens its window (probed once).
pub fn window_assist() -> WindowAssist {
    static CELL: OnceLock<WindowAssist> = OnceLock::new();
    *CELL.get_or_init(|| {
        let exits = irq_window_exits().unwrap_or(true);
        if exits {
            return WindowAssist::default();
        }
        let step = single_step_works(0).unwrap_or(false);
        WindowAssist {
            step,
            iret_breakpoint: step && hw_breakpoint_works(0).unwrap_or(false),
        }
    })
}

/// Whether KVM exits with KVM_EXIT_IRQ_WINDOW_OPEN when CPL0 code sets IF
/// (`sti`) while kvmsim asked for an interrupt window: the exit comes after
/// the instruction that follows `sti` (its interrupt shadow) on hardware
/// virtualization.
pub fn irq_window_exits() -> Result<bool> {
    static CELL: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    CELL.get_or_init(|| probe_irq_window().map_err(|e| e.to_string()))
        .clone()
        .map_err(KvmError::Setup)
}

/// `sti`, eight `nop`s, then an MMIO read (`mov 0xffff0000, %rax`).
const STI_NOPS: [u8; 17] = [
    0xfb, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0xb8, 0x00, 0x00, 0xff, 0xff, 0x48, 0x8b,
    0x00,
];

fn probe_irq_window() -> Result<bool> {
    let ProbeVm {
        mut vcpu,
        mut arch,
        vm: _vm,
        _ram,
    } = probe_vm(&STI_NOPS, 0)?;
    arch.regs_mut(&mut vcpu)?.rflags = 0x2; // IF clear
    arch.update_kvm_state(&mut vcpu)?;
    vcpu.request_interrupt_window(true);
    let exit = vcpu.run(&mut Vec::new());
    arch.kvm_state_changed();
    let rip = arch.regs(&mut vcpu)?.rip;
    let exits = matches!(exit, VmExit::IrqWindowOpen);
    tracing::debug!("interrupt-window probe: {exit:?} at rip {rip:#x}: {exits}");
    Ok(exits)
}
