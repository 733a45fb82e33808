//! A vCPU's whole state as KVM reports it, saved and restored
//! ([`VcpuState`], [`save`], [`restore`]).
//!
//! Everything goes through the [`Vcpu`] trait, so the same code saves a
//! real vCPU and the scripted one of the tests. What is kept: general and
//! special registers, the FPU, the whole XSAVE area KVM hands out (4 KiB
//! with KVM_GET_XSAVE, or KVM_CAP_XSAVE2's size with KVM_GET_XSAVE2: x87,
//! SSE, AVX, AVX-512 and whatever else the host's XCR0 covers), the XCRs,
//! every MSR of KVM's save list (KVM_GET_MSR_INDEX_LIST) and of the
//! thread context's list ([`crate::arch::x86_64::CONTEXT_MSRS`]: KVM leaves
//! IA32_TSC_AUX out of its list on hosts without RDTSCP but keeps it for the
//! guest); those KVM refuses to read are skipped and listed, the vCPU events, the debug registers,
//! the MP state, the TSC (IA32_TSC), the CPUID table the vCPU was given and
//! the local APIC base. KVM_GET_MSR_FEATURE_INDEX_LIST lists what the host
//! *can* offer, not vCPU state, and KVM_GET_CLOCK belongs to the VM: neither
//! is here.
//!
//! Restoring goes into a fresh vCPU in the order KVM needs (see
//! [`restore`]).
//!
//! Serialised with serde, self-describing: named fields, registers by name,
//! and KVM's fixed-layout structures (`kvm_sregs`, `kvm_vcpu_events`,
//! `kvm_debugregs`, `kvm_cpuid_entry2`) as hex strings of their bytes in
//! KVM's x86-64 ABI layout ([`Raw`]), which KVM keeps stable. A hex string of
//! the wrong length is an error naming the structure, never padded.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::vcpu::Vcpu;
use crate::{KvmError, Result};

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_APIC_BASE.
pub const MSR_IA32_APIC_BASE: u32 = 0x1b;

/// The whole state of one x86-64 vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    pub regs: Regs,
    pub sregs: Raw<kvm_sregs>,
    /// The x87/SSE state as KVM_GET_FPU reports it (the XSAVE area holds
    /// it too; this is what is restored where the host has no XSAVE).
    pub fpu: Fpu,
    /// The whole XSAVE area as 32-bit words (hex), or none where KVM has
    /// no XSAVE.
    pub xsave: Option<HexWords>,
    /// Extended control registers (XCR0, ...): (index, value).
    pub xcrs: Vec<(u32, u64)>,
    /// Every MSR of KVM's save list and of the thread context's list that
    /// KVM would read: (index, value), in the lists' order.
    pub msrs: Vec<(u32, u64)>,
    /// MSRs of KVM's save list that KVM refused to read (not kept).
    pub msrs_refused: Vec<u32>,
    pub events: Raw<kvm_vcpu_events>,
    pub debug_regs: Raw<kvm_debugregs>,
    /// KVM_MP_STATE_* (0 runnable, 2 waiting for INIT/SIPI, 3 halted, ...).
    pub mp_state: u32,
    /// IA32_TSC when saved (also among `msrs`).
    pub tsc: u64,
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<Raw<kvm_cpuid_entry2>>,
    /// The local APIC base (IA32_APIC_BASE, as in `sregs`).
    pub apic_base: u64,
}

impl VcpuState {
    /// The XSAVE area's size in bytes (0 without XSAVE).
    pub fn xsave_bytes(&self) -> usize {
        self.xsave.as_ref().map_or(0, |x| x.0.len() * 4)
    }

    /// The saved value of MSR `index`, if it was kept.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == index).map(|&(_, v)| v)
    }
}

/// What [`restore`] could not put back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Saved MSRs this KVM refused to write (skipped).
    pub msrs_refused: Vec<u32>,
    /// IA32_TSC read back after the restore, when it did not continue from
    /// the saved value (this KVM ignored the write): the guest's TSC
    /// restarted from there.
    pub tsc_not_kept: Option<u64>,
}

/// The general registers, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl From<&kvm_regs> for Regs {
    fn from(r: &kvm_regs) -> Self {
        Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&Regs> for kvm_regs {
    fn from(r: &Regs) -> Self {
        kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

/// The x87/SSE state of KVM_GET_FPU, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// A KVM structure of fixed layout, serialised as a hex string of its
/// bytes (KVM's x86-64 ABI). Deserialising checks the length exactly.
#[derive(Clone, Copy, Default)]
pub struct Raw<T>(pub T);

/// Equal when the bytes are (padding included: KVM's structures have
/// explicit padding fields).
impl<T: IntoBytes + Immutable> PartialEq for Raw<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl<T: IntoBytes + Immutable> Eq for Raw<T> {}

impl<T> std::fmt::Debug for Raw<T>
where
    T: IntoBytes + Immutable,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw({})", to_hex(self.0.as_bytes()))
    }
}

impl<T: IntoBytes + Immutable> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(self.0.as_bytes()))
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        let bytes = from_hex(&s).map_err(serde::de::Error::custom)?;
        let want = std::mem::size_of::<T>();
        T::read_from_bytes(&bytes).map(Raw).map_err(|_| {
            serde::de::Error::custom(format!(
                "{} is {want} bytes, the saved value has {}",
                std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("structure"),
                bytes.len()
            ))
        })
    }
}

/// 32-bit words serialised as one hex string (little-endian bytes).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HexWords(pub Vec<u32>);

impl std::fmt::Debug for HexWords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HexWords({} words)", self.0.len())
    }
}

impl Serialize for HexWords {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(self.0.as_bytes()))
    }
}

impl<'de> Deserialize<'de> for HexWords {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        let bytes = from_hex(&s).map_err(serde::de::Error::custom)?;
        if !bytes.len().is_multiple_of(4) {
            return Err(serde::de::Error::custom(format!(
                "an XSAVE area of {} bytes is not whole 32-bit words",
                bytes.len()
            )));
        }
        Ok(HexWords(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn from_hex(s: &str) -> std::result::Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("hex string of odd length {}", s.len()));
    }
    let digit = |c: u8, at: usize| -> std::result::Result<u8, String> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(format!(
                "not a hex digit at offset {at}: {:?}",
                char::from(c)
            )),
        }
    };
    s.as_bytes()
        .chunks_exact(2)
        .enumerate()
        .map(|(i, p)| Ok((digit(p[0], 2 * i)? << 4) | digit(p[1], 2 * i + 1)?))
        .collect()
}

/// MSRs read (index, value) and those refused (index).
type MsrRead = (Vec<(u32, u64)>, Vec<u32>);

/// Reads the MSRs `list` one bulk read at a time; KVM stops at the first
/// it refuses, which is recorded and skipped. Returns (read, refused).
fn read_msrs(vcpu: &dyn Vcpu, list: &[u32]) -> Result<MsrRead> {
    let mut got = Vec::with_capacity(list.len());
    let mut refused = Vec::new();
    let mut rest = list;
    while !rest.is_empty() {
        let part = vcpu.msrs(rest)?;
        let n = part.len().min(rest.len());
        got.extend(part.into_iter().take(n));
        if n == rest.len() {
            break;
        }
        refused.push(rest[n]);
        rest = &rest[n + 1..];
    }
    Ok((got, refused))
}

/// Writes `msrs`; those KVM refuses are skipped and returned.
fn write_msrs(vcpu: &mut dyn Vcpu, msrs: &[(u32, u64)]) -> Result<Vec<u32>> {
    let mut refused = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let n = vcpu.set_msrs(rest)?.min(rest.len());
        if n == rest.len() {
            break;
        }
        refused.push(rest[n].0);
        rest = &rest[n + 1..];
    }
    Ok(refused)
}

/// Saves the whole state of `vcpu`, which must not be running and should
/// hold nothing in flight (take it at a drained point: no pending read, no
/// event being injected).
pub fn save(vcpu: &dyn Vcpu) -> Result<VcpuState> {
    let cpuid = vcpu.cpuid_entries()?.into_iter().map(Raw).collect();
    let mp_state = vcpu.mp_state()?.mp_state;
    let regs = Regs::from(&vcpu.regs()?);
    let sregs = vcpu.sregs()?;
    let fpu = Fpu::from(&vcpu.fpu()?);
    let xsave = vcpu.xsave()?.map(|x| HexWords(x.words()));
    let x = vcpu.xcrs()?;
    let xcrs = x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
        .iter()
        .map(|x| (x.xcr, x.value))
        .collect();
    let debug_regs = vcpu.debug_regs()?;
    let mut list = vcpu.saved_msr_indices()?;
    // KVM lists some MSRs only where the host has the feature (IA32_TSC_AUX
    // only with RDTSCP on the host, for one) though it keeps them for the
    // guest anyway: the MSRs kvmsim keeps in its own context go in too.
    for &(index, _) in crate::arch::x86_64::CONTEXT_MSRS {
        if !list.contains(&index) {
            list.push(index);
        }
    }
    let (msrs, msrs_refused) = read_msrs(vcpu, &list)?;
    let tsc = match msrs.iter().find(|(i, _)| *i == MSR_IA32_TSC) {
        Some(&(_, v)) => v,
        None => read_msrs(vcpu, &[MSR_IA32_TSC])?
            .0
            .first()
            .map(|&(_, v)| v)
            .ok_or_else(|| KvmError::Setup("KVM refuses to read IA32_TSC".into()))?,
    };
    // Last, as KVM's own users do: nothing above changes the events.
    let events = vcpu.events()?;
    Ok(VcpuState {
        regs,
        apic_base: sregs.apic_base,
        sregs: Raw(sregs),
        fpu,
        xsave,
        xcrs,
        msrs,
        msrs_refused,
        events: Raw(events),
        debug_regs: Raw(debug_regs),
        mp_state,
        tsc,
        cpuid,
    })
}

/// Puts `state` into `vcpu` (a fresh vCPU of a VM holding the same RAM,
/// before its first run), in the order KVM needs:
///
/// 1. the CPUID table (KVM refuses a different one after the first run, and
///    derives from it which XSAVE components and MSRs the vCPU has);
/// 2. the MP state;
/// 3. special registers before general ones (CR0, CR4 and EFER decide how
///    KVM takes RIP, RSP and RFLAGS);
/// 4. XCRs before XSAVE (XCR0 enables the components the area carries),
///    or the FPU where the host has no XSAVE;
/// 5. debug registers;
/// 6. MSRs (IA32_TSC among them; those KVM refuses are reported);
/// 7. the vCPU events last: an exception, interrupt or NMI in flight must
///    not be overwritten by anything set after it.
pub fn restore(vcpu: &mut dyn Vcpu, state: &VcpuState) -> Result<RestoreReport> {
    if !state.cpuid.is_empty() {
        let entries: Vec<kvm_cpuid_entry2> = state.cpuid.iter().map(|r| r.0).collect();
        vcpu.set_cpuid_entries(&entries)?;
    }
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })?;
    let mut sregs = state.sregs.0;
    sregs.apic_base = state.apic_base;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&kvm_regs::from(&state.regs))?;
    if !state.xcrs.is_empty() {
        let mut x = kvm_xcrs::default();
        if state.xcrs.len() > x.xcrs.len() {
            return Err(KvmError::Setup(format!(
                "the saved state has {} XCRs; KVM takes at most {}",
                state.xcrs.len(),
                x.xcrs.len()
            )));
        }
        x.nr_xcrs = state.xcrs.len() as u32;
        for (slot, &(xcr, value)) in x.xcrs.iter_mut().zip(&state.xcrs) {
            slot.xcr = xcr;
            slot.value = value;
        }
        vcpu.set_xcrs(&x)?;
    }
    match &state.xsave {
        Some(words) => {
            let mut area = vcpu.xsave()?.ok_or_else(|| {
                KvmError::Setup(
                    "the saved state has an XSAVE area but this host's KVM has no XSAVE".into(),
                )
            })?;
            area.load_words(&words.0)?;
            vcpu.set_xsave(&area)?;
        }
        None => vcpu.set_fpu(&kvm_fpu::from(&state.fpu))?,
    }
    vcpu.set_debug_regs(&state.debug_regs.0)?;
    let msrs_refused = write_msrs(vcpu, &state.msrs)?;
    vcpu.set_events(&state.events.0)?;
    // The TSC goes on from the saved value where KVM honours the write:
    // read it back. The slack (2^32 cycles, over a second at common
    // rates) covers a busy host between the write and the read; where KVM
    // ignores the write, the TSC reads the host's, which moved on by the
    // host time since the checkpoint (a restore seconds after its
    // checkpoint cannot tell the two apart, nor does it matter much).
    const SLACK: u64 = 1 << 32;
    let tsc_not_kept = match read_msrs(vcpu, &[MSR_IA32_TSC])?.0.first() {
        Some(&(_, now)) if now.wrapping_sub(state.tsc) >= SLACK => Some(now),
        _ => None,
    };
    Ok(RestoreReport {
        msrs_refused,
        tsc_not_kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeVcpu;

    fn fake_with_state() -> FakeVcpu {
        let mut v = FakeVcpu::default();
        v.regs.rax = 0x1122_3344_5566_7788;
        v.regs.r15 = 0xdead_beef;
        v.sregs.cr0 = 0x8005_0033;
        v.sregs.apic_base = 0xfee0_0900;
        v.fpu.xmm[3] = [7; 16];
        v.fpu.mxcsr = 0x1f80;
        v.xcrs.nr_xcrs = 1;
        v.xcrs.xcrs[0].value = 0x7;
        v.debug_regs.db[1] = 0x4000;
        v.mp_state.mp_state = 3;
        v.msr_list = vec![MSR_IA32_TSC, 0x3b, 0xc000_0082, 0x10a, 0xc000_0103];
        v.msrs = vec![
            (MSR_IA32_TSC, 12345),
            (0xc000_0082, 0xffff_8000_0000_1000),
            (0xc000_0103, 42),
        ];
        v.refused_msrs = vec![0x10a];
        v.cpuid = vec![kvm_cpuid_entry2 {
            function: 1,
            eax: 0x806f8,
            ..Default::default()
        }];
        v
    }

    #[test]
    fn refused_msrs_are_skipped_and_listed() {
        let v = fake_with_state();
        let s = save(&v).unwrap();
        assert_eq!(s.msrs_refused, vec![0x10a]);
        // Every other MSR of the list, read past the refused one.
        let idx: Vec<u32> = s.msrs.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx[..4], [MSR_IA32_TSC, 0x3b, 0xc000_0082, 0xc000_0103]);
        // Then the thread context's MSRs that KVM's list left out.
        assert!(idx[4..].contains(&0x174) && !idx[4..].contains(&MSR_IA32_TSC));
        assert_eq!(s.msr(0xc000_0103), Some(42));
        assert_eq!(s.tsc, 12345);
    }

    #[test]
    fn a_tsc_the_host_did_not_take_is_reported_with_what_it_reads() {
        let v = fake_with_state();
        let mut s = save(&v).unwrap();
        s.tsc = 1 << 50;
        s.msrs.retain(|(i, _)| *i != MSR_IA32_TSC);
        s.msrs.push((MSR_IA32_TSC, 1 << 50));
        let mut fresh = FakeVcpu::default();
        fresh.msrs = vec![(MSR_IA32_TSC, 777)];
        fresh.ignored_msrs = vec![MSR_IA32_TSC];
        assert_eq!(restore(&mut fresh, &s).unwrap().tsc_not_kept, Some(777));
        // A host that takes it, and a little host time after the write.
        fresh.ignored_msrs.clear();
        let report = restore(&mut fresh, &s).unwrap();
        assert_eq!(report.tsc_not_kept, None);
        fresh.msrs.retain(|(i, _)| *i != MSR_IA32_TSC);
        fresh.msrs.push((MSR_IA32_TSC, (1 << 50) + 5_000_000));
        fresh.ignored_msrs = vec![MSR_IA32_TSC];
        assert_eq!(restore(&mut fresh, &s).unwrap().tsc_not_kept, None);
    }

    #[test]
    fn a_state_goes_through_json_and_into_a_fresh_vcpu_unchanged() {
        let v = fake_with_state();
        let s = save(&v).unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);

        let mut fresh = FakeVcpu::default();
        fresh.msr_list = v.msr_list.clone();
        fresh.refused_msrs = vec![0xc000_0082];
        let report = restore(&mut fresh, &back).unwrap();
        assert_eq!(report.msrs_refused, vec![0xc000_0082]);
        assert_eq!(
            report.tsc_not_kept, None,
            "the TSC went on from the saved value"
        );
        assert_eq!(fresh.regs, v.regs);
        assert_eq!(fresh.sregs, v.sregs);
        assert_eq!(fresh.fpu.xmm, v.fpu.xmm);
        assert_eq!(fresh.xcrs.xcrs[0].value, 0x7);
        assert_eq!(fresh.debug_regs.db[1], 0x4000);
        assert_eq!(fresh.mp_state.mp_state, 3);
        assert_eq!(fresh.cpuid.len(), 1);
        assert_eq!(fresh.cpuid[0].eax, 0x806f8);
        // MSRs after the refused one still went in.
        assert!(fresh.msrs.contains(&(0xc000_0103, 42)));
        assert!(fresh.msrs.contains(&(MSR_IA32_TSC, 12345)));
    }

    #[test]
    fn a_structure_of_the_wrong_length_is_an_error_naming_it() {
        let s = save(&fake_with_state()).unwrap();
        let mut json: serde_json::Value = serde_json::to_value(&s).unwrap();
        let short = json["debug_regs"].as_str().unwrap()[2..].to_string();
        json["debug_regs"] = serde_json::Value::String(short);
        let e = serde_json::from_value::<VcpuState>(json).unwrap_err();
        assert!(e.to_string().contains("kvm_debugregs"), "{e}");
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let b = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").unwrap_err().contains("offset 0"));
    }
}
