//! Guest debugging on a real vCPU: single-stepping, a hardware execution
//! breakpoint, a write watchpoint and a software breakpoint, all in one
//! KVM_SET_GUEST_DEBUG setting, each exit told apart (`X86_64::debug_exit`).

use kvm::arch::x86_64::guest_debug::{HwBreakpoint, SlotOwner};
use kvm::arch::x86_64::{boot, X86_64};
use kvm::arch::{BreakKind, DebugStop, Stepper};
use kvm::{Arch, KvmVm, Vcpu, VcpuSpec, VmExit};
use mem::{GuestRam, MemoryMap};
use vm_memory::{Bytes, GuestAddress};

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;

/// Runs the snippet with the debugger's breakpoints (and single-stepping
/// for instruction counts if `stepping`) until it halts; returns the
/// debugger's stops with the RIP at each, and the steps counted.
fn run(stepping: bool) -> (Vec<(DebugStop, u64)>, u32) {
    // nop; nop; mov %rax, DATA; nop; int3; hlt
    let code: &[u8] = &[
        0x90, 0x90, 0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x90, 0xcc, 0xf4,
    ];
    let (bp, after_store, int3) = (CODE + 1, CODE + 10, CODE + 11);
    let ram = GuestRam::new(MemoryMap::for_size(4 << 20).unwrap()).unwrap();
    ram.memory().write_slice(code, GuestAddress(CODE)).unwrap();
    boot::write_boot_structures(ram.memory()).unwrap();
    let mut vm = KvmVm::new().unwrap();
    vm.map_ram(&ram).unwrap();
    let mut vcpu = vm
        .create_cpu(&VcpuSpec {
            id: 0,
            cpus: 1,
            coalesced_mmio: false,
            x2apic: false,
        })
        .unwrap();
    let mut arch = X86_64::new();
    arch.attach_memory(ram.memory().clone());
    boot::enter_long_mode(&mut arch, &mut vcpu, CODE, boot::DEFAULT_STACK_TOP, &[]).unwrap();
    arch.set_step(&mut vcpu, Stepper::Insts, stepping).unwrap();
    let d = arch.debug_mut();
    d.add_hw(HwBreakpoint {
        addr: bp,
        kind: BreakKind::Exec,
        len: 1,
        owner: SlotOwner::Debugger,
    })
    .unwrap();
    d.add_hw(HwBreakpoint {
        addr: DATA,
        kind: BreakKind::Write,
        len: 8,
        owner: SlotOwner::Debugger,
    })
    .unwrap();
    d.add_sw(int3);

    let mut steps = 0;
    let mut stops = Vec::new();
    let mut halted = false;
    for _ in 0..64 {
        arch.update_kvm_state(&mut vcpu).unwrap();
        let exit = vcpu.run(&mut Vec::new());
        arch.kvm_state_changed();
        match exit {
            VmExit::Hlt => {
                halted = true;
                break;
            }
            VmExit::Debug(_) | VmExit::EmulationFailure(_) => {
                // A host whose emulator fails on int3 reports the
                // debugger's breakpoint as an emulation failure.
                let e = match exit {
                    VmExit::Debug(e) => e,
                    VmExit::EmulationFailure(b) => arch
                        .planted_breakpoint(&mut vcpu, b.as_deref())
                        .unwrap()
                        .unwrap_or_else(|| panic!("emulation failure {b:x?}")),
                    _ => unreachable!(),
                };
                let o = arch.debug_exit(&mut vcpu, &e).unwrap();
                steps += u32::from(o.stepped);
                let rip = arch.regs(&mut vcpu).unwrap().rip;
                match o.stop {
                    Some(DebugStop::HwBreak(a)) => {
                        // Execution breakpoints fire again at the same
                        // instruction: the debugger steps over with it off.
                        arch.debug_mut()
                            .remove_hw(SlotOwner::Debugger, a, BreakKind::Exec, None);
                    }
                    Some(DebugStop::SwBreak) => {
                        // Past the planted int3 (a debugger would restore
                        // the original byte instead).
                        arch.debug_mut().remove_sw(int3);
                        arch.regs_mut(&mut vcpu).unwrap().rip += 1;
                    }
                    _ => {}
                }
                if let Some(s) = o.stop {
                    stops.push((s, rip));
                }
                // A step over the hlt (this host's emulator steps it).
                if arch.regs(&mut vcpu).unwrap().rip == CODE + code.len() as u64 {
                    halted = true;
                    break;
                }
            }
            VmExit::Intr | VmExit::Retry => {}
            other => panic!(
                "unexpected exit {other:?} at {:#x}",
                arch.regs(&mut vcpu).unwrap().rip
            ),
        }
    }
    assert!(halted, "the guest did not reach its hlt; stops {stops:x?}");
    assert!(
        stops.contains(&(DebugStop::HwBreak(bp), bp)),
        "no stop at the execution breakpoint: {stops:x?}"
    );
    assert!(
        stops.contains(&(DebugStop::SwBreak, int3)),
        "no stop at the int3: {stops:x?}"
    );
    // A watchpoint stops right after the store, or (a KVM that ignores
    // data breakpoints: ours, which emulates kernel mode) never.
    let watch = DebugStop::Watch(BreakKind::Write, DATA);
    for &(s, rip) in &stops {
        if s == watch {
            assert_eq!(rip, after_store, "{stops:x?}");
        }
    }
    let expected = if stops.iter().any(|&(s, _)| s == watch) {
        3
    } else {
        2
    };
    assert_eq!(stops.len(), expected, "{stops:x?}");
    (stops, steps)
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn steps_breakpoints_and_a_watchpoint_coexist() {
    if !kvm::usable_or_skip("steps_breakpoints_and_a_watchpoint_coexist") {
        return;
    }
    let (stops, _) = run(false);
    eprintln!("without stepping: {stops:x?}");
    if kvm::probe::single_step_works(0).unwrap() {
        let (stops, steps) = run(true);
        // nop, nop, mov, nop before the int3, and the hlt: a step each
        // (the breakpoints' stops come in addition).
        assert!(steps >= 5, "{steps} steps, stops {stops:x?}");
        eprintln!("with stepping: {stops:x?}, {steps} steps");
    }
}

/// A PC event's breakpoint in a loop of three rounds: reported once per
/// round (the CPU steps over the instruction with the breakpoint off and
/// re-arms it), and the guest runs to its hlt.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn pc_event_fires_once_per_visit() {
    if !kvm::usable_or_skip("pc_event_fires_once_per_visit") {
        return;
    }
    if !kvm::probe::hw_breakpoint_works(0).unwrap() {
        eprintln!("skipped: this host's KVM does not trap hardware breakpoints at CPL0");
        return;
    }
    // mov $3, %ecx; L: nop; dec %ecx; jnz L; hlt
    let code: &[u8] = &[0xb9, 0x03, 0, 0, 0, 0x90, 0xff, 0xc9, 0x75, 0xfb, 0xf4];
    let at = CODE + 5;
    let ram = GuestRam::new(MemoryMap::for_size(4 << 20).unwrap()).unwrap();
    ram.memory().write_slice(code, GuestAddress(CODE)).unwrap();
    boot::write_boot_structures(ram.memory()).unwrap();
    let mut vm = KvmVm::new().unwrap();
    vm.map_ram(&ram).unwrap();
    let mut vcpu = vm
        .create_cpu(&VcpuSpec {
            id: 0,
            cpus: 1,
            coalesced_mmio: false,
            x2apic: false,
        })
        .unwrap();
    let mut arch = X86_64::new();
    arch.attach_memory(ram.memory().clone());
    boot::enter_long_mode(&mut arch, &mut vcpu, CODE, boot::DEFAULT_STACK_TOP, &[]).unwrap();
    assert_eq!(arch.add_pc_event(at).unwrap(), 0);
    let mut hits = Vec::new();
    let mut halted = false;
    for _ in 0..64 {
        arch.update_kvm_state(&mut vcpu).unwrap();
        let exit = vcpu.run(&mut Vec::new());
        arch.kvm_state_changed();
        match exit {
            VmExit::Hlt => {
                halted = true;
                break;
            }
            VmExit::Debug(e) => {
                let o = arch.debug_exit(&mut vcpu, &e).unwrap();
                if let Some(a) = o.pc_event {
                    hits.push((a, arch.regs(&mut vcpu).unwrap().rcx));
                    assert!(arch.pc_event_stepping());
                } else {
                    // The step over the nop ended: armed again.
                    assert!(!arch.pc_event_stepping());
                    assert_eq!(arch.regs(&mut vcpu).unwrap().rip, at + 1);
                }
            }
            VmExit::Intr | VmExit::Retry => {}
            other => panic!(
                "unexpected exit {other:?} at {:#x}",
                arch.regs(&mut vcpu).unwrap().rip
            ),
        }
    }
    assert!(halted, "the guest did not reach its hlt; hits {hits:x?}");
    // RCX counts down 3, 2, 1 at the nop.
    assert_eq!(hits, vec![(at, 3), (at, 2), (at, 1)]);
}
