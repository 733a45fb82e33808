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
            // The checks of the gate and its code segment come first: a
            // fault there is raised at the `int` (RIP unchanged), as the
            // CPU does; KVM would deliver the injected vector without them.
            if let Some((nr, code)) = gate_fault(arch, vcpu, vector)? {
                // A frame that cannot be pushed turns the fault into the
                // page fault the push raises (handled serially, as the CPU
                // does after a contributory fault); the host's KVM shuts
                // the guest down delivering such an injected fault.
                let (nr, code) = match frame_fault(arch, vcpu, nr, true)? {
                    Some((cr2, pf_code)) => {
                        arch.sregs_mut(vcpu)?.cr2 = cr2;
                        (PF, pf_code)
                    }
                    None => (nr, code),
                };
                let ev = arch.events_mut(vcpu)?;
                ev.exception.injected = 1;
                ev.exception.nr = nr;
                ev.exception.has_error_code = 1;
                ev.exception.error_code = code;
                return Ok(Emulated::Completed(3));
            }
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

/// #GP and #NP, the faults [`gate_fault`] raises, and #PF.
const GP: u8 = 13;
const NP: u8 = 11;
const PF: u8 = 14;

/// Where pushing the frame of exception `vector` (with an error code or
/// not) at CPL0 in long mode would fault: (CR2, #PF error code) for the
/// first push that meets a page that is not present, or read-only while
/// CR0.WP is set. The stack is the gate's IST stack (read from the TSS) or
/// the current one, aligned down to 16 bytes as the CPU does. None where
/// every push can be made, outside long mode paging, and where the tables
/// cannot be read.
fn frame_fault(
    arch: &mut X86_64,
    vcpu: &mut dyn Vcpu,
    vector: u8,
    error_code: bool,
) -> Result<Option<(u64, u32)>> {
    let sr = *arch.sregs(vcpu)?;
    if sr.efer & (1 << 10) == 0 || sr.cr0 & (1 << 31) == 0 {
        return Ok(None);
    }
    let at = u64::from(vector) * 16;
    if at + 15 > u64::from(sr.idt.limit) {
        return Ok(None);
    }
    let mut gate = [0u8; 16];
    if arch.read_virt(vcpu, sr.idt.base.wrapping_add(at), &mut gate) != 16 {
        return Ok(None);
    }
    let ist = u64::from(gate[4] & 7);
    let top = if ist == 0 {
        arch.regs(vcpu)?.rsp
    } else {
        let mut v = [0u8; 8];
        let slot = sr.tr.base.wrapping_add(0x24 + 8 * (ist - 1));
        if arch.read_virt(vcpu, slot, &mut v) != 8 {
            return Ok(None);
        }
        u64::from_le_bytes(v)
    };
    let wp = sr.cr0 & (1 << 16) != 0;
    let words = if error_code { 6 } else { 5 };
    let mut slot = top & !0xf;
    for _ in 0..words {
        slot = slot.wrapping_sub(8);
        let w = arch.walk(vcpu, slot)?;
        match w.result {
            Ok(_) if wp && !w.permissions().0 => return Ok(Some((slot, 0b11))),
            Ok(_) => {}
            Err(super::paging::Stop::NotPresent(_)) => return Ok(Some((slot, 0b10))),
            Err(_) => return Ok(None),
        }
    }
    Ok(None)
}

/// The fault (vector, error code) that `int vector` at CPL0 raises before
/// its handler runs, if any, from the checks the CPU makes in protected and
/// long mode: the gate inside the IDT's limit, of an interrupt or trap type
/// (or a task gate outside long mode, not checked further) and present; its
/// code-segment selector not null, inside its table's limit, naming a code
/// segment that is present. The error code names the IDT entry (`vector *
/// 8 + 2`) or the selector, as the CPU's does for a software interrupt (EXT
/// clear). None where the checks pass, in real mode, and where the tables
/// cannot be read (KVM then delivers, as before).
fn gate_fault(arch: &mut X86_64, vcpu: &mut dyn Vcpu, vector: u8) -> Result<Option<(u8, u32)>> {
    let sr = *arch.sregs(vcpu)?;
    if sr.cr0 & 1 == 0 {
        return Ok(None);
    }
    let long = sr.efer & (1 << 10) != 0;
    let idt_code = u32::from(vector) * 8 + 2;
    let size: u64 = if long { 16 } else { 8 };
    let at = u64::from(vector) * size;
    if at + size - 1 > u64::from(sr.idt.limit) {
        return Ok(Some((GP, idt_code)));
    }
    let mut gate = [0u8; 16];
    let n = size as usize;
    if arch.read_virt(vcpu, sr.idt.base.wrapping_add(at), &mut gate[..n]) != n {
        return Ok(None);
    }
    let kind = gate[5] & 0x0f;
    let present = gate[5] & 0x80 != 0;
    let gate_ok = match kind {
        0xe | 0xf => true,
        0x5 => !long,
        0x6 | 0x7 => !long,
        _ => false,
    };
    if !gate_ok {
        return Ok(Some((GP, idt_code)));
    }
    if !present {
        return Ok(Some((NP, idt_code)));
    }
    if kind == 0x5 {
        return Ok(None);
    }
    let selector = u16::from_le_bytes([gate[2], gate[3]]);
    if selector & !3 == 0 {
        return Ok(Some((GP, 0)));
    }
    let code = u32::from(selector & !3);
    let (base, limit) = if selector & 4 != 0 {
        if sr.ldt.unusable != 0 || sr.ldt.present == 0 {
            return Ok(Some((GP, code)));
        }
        (sr.ldt.base, sr.ldt.limit)
    } else {
        (sr.gdt.base, u32::from(sr.gdt.limit))
    };
    let index = u64::from(selector & !7);
    if index + 7 > u64::from(limit) {
        return Ok(Some((GP, code)));
    }
    let mut desc = [0u8; 8];
    if arch.read_virt(vcpu, base.wrapping_add(index), &mut desc) != 8 {
        return Ok(None);
    }
    let access = desc[5];
    // A code segment: S set and the executable bit.
    if access & 0x18 != 0x18 {
        return Ok(Some((GP, code)));
    }
    if access & 0x80 == 0 {
        return Ok(Some((NP, code)));
    }
    Ok(None)
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
