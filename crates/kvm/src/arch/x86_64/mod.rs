//! x86-64 architecture support: thread context with lazy synchronisation,
//! direct 64-bit boot, filtered CPUID and the register dump.

pub mod boot;
pub mod cpuid;

use std::fmt::Write as _;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;

use super::Arch;
use crate::{KvmError, Result};

/// One cached part of the context.
#[derive(Debug, Default)]
struct Part<T> {
    value: T,
    /// The cached value matches KVM's (or is newer).
    valid: bool,
    /// The cached value is newer than KVM's and must be pushed.
    dirty: bool,
}

impl<T> Part<T> {
    fn get(&mut self, pull: impl FnOnce() -> Result<T>) -> Result<&mut T> {
        if !self.valid {
            self.value = pull()?;
            self.valid = true;
        }
        Ok(&mut self.value)
    }
}

/// Counts of context transfers, for tests and statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncCounts {
    pub pulls: u64,
    pub pushes: u64,
}

/// The x86-64 side of a KVM CPU.
#[derive(Debug, Default)]
pub struct X86_64 {
    regs: Part<kvm_regs>,
    sregs: Part<kvm_sregs>,
    counts: SyncCounts,
}

impl X86_64 {
    pub fn new() -> Self {
        Self::default()
    }

    /// General registers, pulled from KVM if stale.
    pub fn regs(&mut self, vcpu: &VcpuFd) -> Result<&kvm_regs> {
        let counts = &mut self.counts;
        self.regs
            .get(|| {
                counts.pulls += 1;
                vcpu.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))
            })
            .map(|r| &*r)
    }

    /// General registers for modification; pushed before the next entry.
    pub fn regs_mut(&mut self, vcpu: &VcpuFd) -> Result<&mut kvm_regs> {
        self.regs(vcpu)?;
        self.regs.dirty = true;
        Ok(&mut self.regs.value)
    }

    /// Special registers (segments, control registers, EFER), pulled if stale.
    pub fn sregs(&mut self, vcpu: &VcpuFd) -> Result<&kvm_sregs> {
        let counts = &mut self.counts;
        self.sregs
            .get(|| {
                counts.pulls += 1;
                vcpu.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))
            })
            .map(|r| &*r)
    }

    /// Special registers for modification; pushed before the next entry.
    pub fn sregs_mut(&mut self, vcpu: &VcpuFd) -> Result<&mut kvm_sregs> {
        self.sregs(vcpu)?;
        self.sregs.dirty = true;
        Ok(&mut self.sregs.value)
    }

    /// How often the context was pulled from and pushed to KVM.
    pub fn sync_counts(&self) -> SyncCounts {
        self.counts
    }
}

impl Arch for X86_64 {
    fn host_cycles(&self) -> u64 {
        // KVM gives the guest the host TSC plus a constant offset (there is
        // no TSC scaling here), so host TSC deltas are guest TSC deltas.
        crate::sys::rdtsc()
    }

    fn kvm_state_changed(&mut self) {
        debug_assert!(!self.regs.dirty && !self.sregs.dirty, "unpushed context");
        self.regs.valid = false;
        self.sregs.valid = false;
    }

    fn update_kvm_state(&mut self, vcpu: &VcpuFd) -> Result<()> {
        if self.sregs.dirty {
            vcpu.set_sregs(&self.sregs.value)
                .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
            self.sregs.dirty = false;
            self.counts.pushes += 1;
        }
        if self.regs.dirty {
            vcpu.set_regs(&self.regs.value)
                .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
            self.regs.dirty = false;
            self.counts.pushes += 1;
        }
        Ok(())
    }

    fn update_thread_context(&mut self, vcpu: &VcpuFd) -> Result<()> {
        self.regs(vcpu)?;
        self.sregs(vcpu)?;
        Ok(())
    }

    fn call_args(&mut self, vcpu: &VcpuFd) -> Result<[u64; 6]> {
        let r = self.regs(vcpu)?;
        Ok([r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9])
    }

    fn dump(&mut self, vcpu: &VcpuFd) -> String {
        let mut s = String::new();
        match self.regs(vcpu) {
            Ok(r) => {
                let r = *r;
                let rows = [
                    [
                        ("rax", r.rax),
                        ("rbx", r.rbx),
                        ("rcx", r.rcx),
                        ("rdx", r.rdx),
                    ],
                    [
                        ("rsi", r.rsi),
                        ("rdi", r.rdi),
                        ("rbp", r.rbp),
                        ("rsp", r.rsp),
                    ],
                    [("r8", r.r8), ("r9", r.r9), ("r10", r.r10), ("r11", r.r11)],
                    [
                        ("r12", r.r12),
                        ("r13", r.r13),
                        ("r14", r.r14),
                        ("r15", r.r15),
                    ],
                ];
                for row in rows {
                    for (n, v) in row {
                        let _ = write!(s, "{n:>4}={v:016x} ");
                    }
                    s.push('\n');
                }
                let _ = writeln!(
                    s,
                    " rip={:016x} rflags={:016x} [{}]",
                    r.rip,
                    r.rflags,
                    rflags_names(r.rflags)
                );
            }
            Err(e) => {
                let _ = writeln!(s, "(general registers unavailable: {e})");
            }
        }
        match self.sregs(vcpu) {
            Ok(sr) => {
                let sr = *sr;
                let _ = writeln!(
                    s,
                    " cr0={:016x} cr2={:016x} cr3={:016x} cr4={:016x} cr8={:x}",
                    sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8
                );
                let _ = writeln!(
                    s,
                    "efer={:016x} apic_base={:016x} cpl={}",
                    sr.efer, sr.apic_base, sr.cs.dpl
                );
                for (n, seg) in [
                    ("cs", &sr.cs),
                    ("ss", &sr.ss),
                    ("ds", &sr.ds),
                    ("es", &sr.es),
                    ("fs", &sr.fs),
                    ("gs", &sr.gs),
                    ("tr", &sr.tr),
                    ("ldt", &sr.ldt),
                ] {
                    let _ = writeln!(s, "{n:>4}={}", segment(seg));
                }
                let _ = writeln!(
                    s,
                    " gdt=base {:016x} limit {:04x}   idt=base {:016x} limit {:04x}",
                    sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
                );
            }
            Err(e) => {
                let _ = writeln!(s, "(special registers unavailable: {e})");
            }
        }
        if let Ok(ev) = vcpu.get_vcpu_events() {
            let _ = writeln!(
                s,
                "events: exception injected={} nr={} has_error={} error={:#x}; interrupt injected={} nr={}; nmi injected={} pending={}",
                ev.exception.injected,
                ev.exception.nr,
                ev.exception.has_error_code,
                ev.exception.error_code,
                ev.interrupt.injected,
                ev.interrupt.nr,
                ev.nmi.injected,
                ev.nmi.pending
            );
        }
        s
    }
}

fn segment(s: &kvm_segment) -> String {
    format!(
        "sel {:04x} base {:016x} limit {:08x} type {:x} s={} dpl={} p={} db={} l={} g={}{}",
        s.selector,
        s.base,
        s.limit,
        s.type_,
        s.s,
        s.dpl,
        s.present,
        s.db,
        s.l,
        s.g,
        if s.unusable != 0 { " unusable" } else { "" }
    )
}

fn rflags_names(f: u64) -> String {
    const NAMES: [(u64, &str); 10] = [
        (0, "CF"),
        (2, "PF"),
        (4, "AF"),
        (6, "ZF"),
        (7, "SF"),
        (8, "TF"),
        (9, "IF"),
        (10, "DF"),
        (11, "OF"),
        (17, "VM"),
    ];
    let mut v: Vec<String> = NAMES
        .iter()
        .filter(|(b, _)| f & (1 << b) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let iopl = (f >> 12) & 3;
    if iopl != 0 {
        v.push(format!("IOPL={iopl}"));
    }
    v.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_names() {
        assert_eq!(rflags_names(0x3246), "PF ZF IF IOPL=3");
        assert_eq!(rflags_names(0x2), "");
    }
}
