//! Probes of what this host's KVM can do, with tiny built-in guests.
//! Results are cached for the life of the process.

use std::sync::OnceLock;

use kvm_ioctls::VcpuExit;
use mem::{GuestRam, MemoryMap};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::{boot, X86_64};
use crate::arch::Arch;
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

fn probe_single_step(cpl: u8) -> Result<bool> {
    let ram =
        GuestRam::new(MemoryMap::for_size(4 << 20).map_err(|e| KvmError::Setup(e.to_string()))?)
            .map_err(|e| KvmError::Setup(e.to_string()))?;
    let entry = boot::MIN_LOAD_ADDR;
    ram.memory()
        .write_slice(&NOPS, GuestAddress(entry))
        .map_err(|source| KvmError::Memory {
            what: "writing the probe guest",
            source,
        })?;
    let mut vm = KvmVm::new()?;
    vm.map_ram(&ram)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let mut arch = X86_64::new();
    boot::write_boot_structures(ram.memory())?;
    boot::enter_long_mode(&mut arch, &vcpu, entry, boot::DEFAULT_STACK_TOP, &[])?;
    if cpl == 3 {
        let gdt = boot::gdt();
        let sregs = arch.sregs_mut(&vcpu)?;
        sregs.cs = boot::segment_from_entry(boot::USER_CS, gdt[usize::from(boot::USER_CS / 8)]);
        sregs.ss = boot::segment_from_entry(boot::USER_DS, gdt[usize::from(boot::USER_DS / 8)]);
    }
    arch.update_kvm_state(&vcpu)?;
    arch.set_single_step(&vcpu, true)?;
    let stepped = matches!(vcpu.run(), Ok(VcpuExit::Debug(_)));
    arch.kvm_state_changed();
    let rip = arch.regs(&vcpu)?.rip;
    let works = stepped && rip == entry + 1;
    tracing::debug!("single-step probe at CPL{cpl}: debug exit {stepped}, rip {rip:#x}: {works}");
    Ok(works)
}
