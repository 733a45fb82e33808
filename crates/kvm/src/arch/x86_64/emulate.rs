//! Completing in user space the instructions a host's KVM cannot emulate.
//!
//! A software-assisted KVM emulates guest kernel-mode code and lacks some
//! instructions. On such an emulation failure kvmsim decodes the
//! instruction (iced-x86) and completes it here when it knows how; each
//! supported instruction is named in [`SUPPORTED`] and counted. Anything
//! else is reported with its bytes and disassembly. On a host with VMX/SVM
//! these failures do not happen and this code is never reached.

use crate::vcpu::Vcpu;
use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter, Mnemonic};

use super::X86_64;
use crate::Result;

/// The instructions kvmsim completes, by name (the index is the stat's).
/// `syscall-entry` counts system calls whose broken entry was repaired.
pub const SUPPORTED: &[&str] = &["int3", "syscall-entry", "fwait", "int-n"];
/// Index of `syscall-entry` in [`SUPPORTED`].
pub const SYSCALL_ENTRY: usize = 1;

/// What became of an instruction KVM could not emulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emulated {
    /// Completed: the index into [`SUPPORTED`].
    Completed(usize),
    /// Not supported: its disassembly.
    Unsupported(String),
}

/// Disassembles `bytes` at `rip` (Intel syntax); `bitness` 16, 32 or 64.
pub fn disassemble(bytes: &[u8], rip: u64, bitness: u32) -> String {
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return format!("(undecodable: {bytes:02x?})");
    }
    let mut s = String::new();
    IntelFormatter::new().format(&insn, &mut s);
    s
}

/// The length of the instruction `bytes` start with (all of `bytes` if it
/// does not decode).
pub fn instruction_len(bytes: &[u8], rip: u64, bitness: u32) -> usize {
    let insn = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() {
        bytes.len()
    } else {
        insn.len().min(bytes.len())
    }
}

/// The code size the code segment `cs` selects: 16, 32 or 64 bits.
pub fn code_bitness(sregs: &kvm_bindings::kvm_sregs) -> u32 {
    if sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    }
}

/// Completes the instruction `bytes` at the vCPU's RIP if kvmsim knows how.
pub fn complete(arch: &mut X86_64, vcpu: &mut dyn Vcpu, bytes: &[u8]) -> Result<Emulated> {
    let rip = arch.regs(vcpu)?.rip;
    let bitness = code_bitness(arch.sregs(vcpu)?);
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return Ok(Emulated::Unsupported(disassemble(bytes, rip, bitness)));
    }
    match insn.mnemonic() {
        Mnemonic::Int3 => {
            // A trap: #BP is delivered with RIP after the instruction.
            arch.regs_mut(vcpu)?.rip = rip.wrapping_add(insn.len() as u64);
            let ev = arch.events_mut(vcpu)?;
            ev.exception.injected = 1;
            ev.exception.nr = 3;
            ev.exception.has_error_code = 0;
            ev.exception.error_code = 0;
            Ok(Emulated::Completed(0))
        }
        Mnemonic::Int if arch.sregs(vcpu)?.cs.dpl == 0 => {
            // `int n` at CPL0 (where every gate's DPL admits it): RIP after
            // the instruction, vector n injected as an event (delivered
            // whatever IF says, as a software interrupt is). At CPL3 the
            // instruction runs natively and never gets here.
            let vector = insn.immediate8();
            arch.regs_mut(vcpu)?.rip = rip.wrapping_add(insn.len() as u64);
            let ev = arch.events_mut(vcpu)?;
            ev.interrupt.injected = 1;
            ev.interrupt.nr = vector;
            ev.interrupt.soft = 0;
            Ok(Emulated::Completed(3))
        }
        Mnemonic::Wait => {
            // fwait: #NM if CR0.MP and CR0.TS; #MF if an unmasked x87
            // exception is pending (FSW.ES, with CR0.NE); else nothing.
            let cr0 = arch.sregs(vcpu)?.cr0;
            let fsw = vcpu.fpu()?.fsw;
            let fault = if cr0 & 0b1010 == 0b1010 {
                Some(7)
            } else if fsw & 0x80 != 0 && cr0 & (1 << 5) != 0 {
                Some(16)
            } else {
                None
            };
            match fault {
                // A fault: RIP stays on the instruction.
                Some(nr) => {
                    let ev = arch.events_mut(vcpu)?;
                    ev.exception.injected = 1;
                    ev.exception.nr = nr;
                    ev.exception.has_error_code = 0;
                    ev.exception.error_code = 0;
                }
                None => arch.regs_mut(vcpu)?.rip = rip.wrapping_add(insn.len() as u64),
            }
            Ok(Emulated::Completed(2))
        }
        _ => Ok(Emulated::Unsupported(disassemble(bytes, rip, bitness))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disassembly() {
        assert_eq!(disassemble(&[0xcc], 0x1000, 64), "int3");
        assert_eq!(
            disassemble(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], 0, 64),
            "lock cmpxchg16b [rdi]"
        );
        assert!(disassemble(&[0x0f], 0, 64).starts_with("(undecodable"));
    }
}
