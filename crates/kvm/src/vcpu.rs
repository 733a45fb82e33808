//! The seam under the KVM CPU: what [`crate::KvmCpu`] and its architecture
//! hooks need from a virtual CPU, as a trait ([`Vcpu`]) with the real KVM
//! implementation ([`KvmVcpu`]) here and a scripted one for tests
//! ([`crate::fake::FakeVcpu`]).
//!
//! Each exit is decoded once, right after `KVM_RUN`, into a [`VmExit`]
//! record; the completion of a pending read takes that record's geometry
//! back (`complete_io_in`, `complete_mmio_read`), so the `kvm_run` union is
//! read in one place ([`crate::sys`]).

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_guest_debug, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::timer::{ExitTimer, KickHandle, TimerKind};
use crate::{sys, KvmError, Result};

/// One exit from the guest, copied out of `kvm_run` so it can be serviced
/// later (at a later simulated tick).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// A port read of `count` elements of `size` bytes.
    IoIn {
        port: u16,
        size: u8,
        count: u32,
    },
    /// A port write; its `size * count` bytes were copied into the buffer
    /// given to [`Vcpu::run`].
    IoOut {
        port: u16,
        size: u8,
        count: u32,
    },
    MmioRead {
        addr: u64,
        len: usize,
    },
    MmioWrite {
        addr: u64,
        len: usize,
        data: [u8; 8],
    },
    Hlt,
    /// A signal interrupted KVM_RUN (run timer, kick, or immediate_exit).
    Intr,
    /// KVM_RUN asked to be retried (EAGAIN), or an exit needed no service.
    Retry,
    IrqWindowOpen,
    /// A single-step or breakpoint exit.
    Debug(DebugExit),
    /// KVM could not emulate an instruction (its bytes, when KVM gave them).
    EmulationFailure(Option<Vec<u8>>),
    Hypercall(u64),
    /// The guest wrote an MSR kvmsim traps ([`crate::KvmVm::trap_apic_msrs`]):
    /// IA32_APIC_BASE, or an x2APIC register. The instruction waits for
    /// [`Vcpu::complete_msr`] (#GP or done) before the next entry.
    MsrWrite {
        index: u32,
        value: u64,
    },
    /// The guest read an x2APIC register (MSR 0x800-0x8FF), which KVM
    /// without its own local APIC cannot: the value (or #GP) goes back with
    /// [`Vcpu::complete_msr`] before the next entry.
    MsrRead {
        index: u32,
    },
    /// Anything the CPU cannot continue from (explained).
    Fatal(String),
}

/// What KVM reports with a debug exit (`kvm_debug_exit_arch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugExit {
    /// The exception: 1 (#DB: a step, a hardware breakpoint) or 3 (#BP: `int3`).
    pub exception: u32,
    /// The guest's linear program counter.
    pub pc: u64,
    /// DR6 as the exception left it (bit 14 step, bits 0-3 the slots).
    pub dr6: u64,
    pub dr7: u64,
}

/// An XSAVE area as KVM_GET_XSAVE (or KVM_GET_XSAVE2, where the host's
/// area is larger than 4 KiB) returned it. It can only be made by
/// [`Vcpu::xsave`], so handing it back to [`Vcpu::set_xsave`] is sound (KVM
/// reads an area of exactly this size and layout); saved contents go back
/// in through [`XsaveArea::load_words`], which keeps the size.
pub struct XsaveArea(pub(crate) XsaveBuf);

/// The two sizes of XSAVE area KVM hands out.
pub(crate) enum XsaveBuf {
    /// `kvm_xsave`: 4 KiB.
    Legacy(Box<kvm_xsave>),
    /// `kvm_xsave` followed by more words (KVM_CAP_XSAVE2).
    Large(kvm_bindings::Xsave),
}

impl XsaveArea {
    /// The first 4 KiB of the area, read-only (the legacy region holds FCW,
    /// FSW, MXCSR and the XMM registers; the XSAVE header and the AVX and
    /// AVX-512 components follow).
    pub fn region(&self) -> &[u32] {
        match &self.0 {
            XsaveBuf::Legacy(x) => &x.region,
            XsaveBuf::Large(x) => &x.as_fam_struct_ref().xsave.region,
        }
    }

    /// The first 4 KiB for modification (same layout as read).
    pub fn region_mut(&mut self) -> &mut [u32] {
        match &mut self.0 {
            XsaveBuf::Legacy(x) => &mut x.region,
            // SAFETY: only the fixed-size region is changed, never the
            // length of the flexible array.
            XsaveBuf::Large(x) => unsafe { &mut x.as_mut_fam_struct().xsave.region },
        }
    }

    /// The whole area as 32-bit words (4 KiB, or KVM_CAP_XSAVE2's size).
    pub fn words(&self) -> Vec<u32> {
        let mut w = self.region().to_vec();
        if let XsaveBuf::Large(x) = &self.0 {
            w.extend_from_slice(x.as_slice());
        }
        w
    }

    /// Overwrites the whole area with `words`, which must be exactly as
    /// long as the area (its size is what this host's KVM reads).
    pub fn load_words(&mut self, words: &[u32]) -> Result<()> {
        let len = self.region().len()
            + match &self.0 {
                XsaveBuf::Legacy(_) => 0,
                XsaveBuf::Large(x) => x.as_slice().len(),
            };
        if words.len() != len {
            return Err(KvmError::Setup(format!(
                "the saved XSAVE area is {} bytes but this host's KVM uses {} bytes",
                words.len() * 4,
                len * 4
            )));
        }
        let (head, tail) = words.split_at(self.region().len());
        self.region_mut().copy_from_slice(head);
        if let XsaveBuf::Large(x) = &mut self.0 {
            x.as_mut_slice().copy_from_slice(tail);
        }
        Ok(())
    }
}

impl std::fmt::Debug for XsaveArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XsaveArea")
    }
}

/// What a vCPU offers the CPU model. Getters take `&self`, anything that
/// changes the vCPU or its shared run area takes `&mut self`.
pub trait Vcpu: Send {
    /// Enters the guest until the next exit. Port-write data goes into
    /// `io_out` (cleared first). Errors of KVM_RUN are exits too (`Intr`,
    /// `Retry`, `Fatal`).
    fn run(&mut self, io_out: &mut Vec<u8>) -> VmExit;

    /// Enters only to complete a pending port or MMIO read and leaves
    /// without running guest code (`immediate_exit`).
    fn half_entry(&mut self) -> Result<()>;

    /// The counter `host_freq` describes (x86: the host TSC, whose deltas
    /// are the guest's TSC deltas).
    fn host_cycles(&self) -> u64;

    /// Prepares the calling thread to run this vCPU: the kick signal and
    /// its masks, and a run timer of `kind` that signals this thread.
    fn thread_setup(&mut self, kind: TimerKind, kick: &KickHandle) -> Result<Box<dyn ExitTimer>>;

    /// True if guest instructions can be counted by a hardware counter.
    fn has_pmu(&self) -> bool {
        crate::perf::pmu_available()
    }

    /// How kvmsim makes up for missing interrupt-window exits on this host
    /// (nothing where KVM has them).
    fn window_assist(&self) -> crate::probe::WindowAssist {
        crate::probe::window_assist()
    }

    fn regs(&self) -> Result<kvm_regs>;
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<()>;
    fn sregs(&self) -> Result<kvm_sregs>;
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<()>;
    fn fpu(&self) -> Result<kvm_fpu>;
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<()>;
    /// The XSAVE area (None where the host has no KVM_CAP_XSAVE).
    fn xsave(&self) -> Result<Option<XsaveArea>>;
    fn set_xsave(&mut self, xsave: &XsaveArea) -> Result<()>;
    fn xcrs(&self) -> Result<kvm_xcrs>;
    fn set_xcrs(&mut self, xcrs: &kvm_xcrs) -> Result<()>;
    fn events(&self) -> Result<kvm_vcpu_events>;
    fn set_events(&mut self, events: &kvm_vcpu_events) -> Result<()>;
    /// Reads the MSRs `indices`; KVM stops at the first it does not know,
    /// so the result may be shorter.
    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>>;
    /// Writes MSRs; returns how many KVM accepted (it stops at the first
    /// it refuses).
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<usize>;
    fn debug_regs(&self) -> Result<kvm_debugregs>;
    fn set_debug_regs(&mut self, dr: &kvm_debugregs) -> Result<()>;
    /// The multiprocessing state (runnable, halted, waiting for SIPI, ...).
    fn mp_state(&self) -> Result<kvm_mp_state>;
    fn set_mp_state(&mut self, mp: kvm_mp_state) -> Result<()>;
    /// The CPUID table the vCPU was given (KVM_GET_CPUID2).
    fn cpuid_entries(&self) -> Result<Vec<kvm_cpuid_entry2>>;
    /// Gives the vCPU a CPUID table (KVM_SET_CPUID2; before its first run,
    /// or the same table again).
    fn set_cpuid_entries(&mut self, entries: &[kvm_cpuid_entry2]) -> Result<()>;
    /// The MSRs whose values make up the vCPU's state: KVM's save list
    /// (KVM_GET_MSR_INDEX_LIST, its own MSRs and the emulated ones).
    fn saved_msr_indices(&self) -> Result<Vec<u32>>;
    fn set_guest_debug(&mut self, dbg: &kvm_guest_debug) -> Result<()>;

    /// Injects an NMI (KVM_NMI).
    fn nmi(&mut self) -> Result<()>;
    /// Injects external interrupt `vector` (KVM_INTERRUPT).
    fn interrupt(&mut self, vector: u8) -> Result<()>;
    /// Whether KVM could take an interrupt now: (ready_for_interrupt_injection, IF).
    fn interrupt_window(&mut self) -> (bool, bool);
    /// Asks KVM to exit as soon as the guest can take an interrupt.
    fn request_interrupt_window(&mut self, on: bool);
    /// CR8 as KVM reports it after an exit.
    fn cr8(&mut self) -> u64;
    /// CR8 for the next entry.
    fn set_cr8(&mut self, cr8: u64);

    /// Completes the pending port read of the last exit with `data` (all of
    /// its `size * count` bytes). False if the last exit was not that.
    fn complete_io_in(&mut self, data: &[u8]) -> bool;
    /// Completes the pending MMIO read of the last exit with `data`.
    fn complete_mmio_read(&mut self, data: &[u8]) -> bool;
    /// Completes the MSR access of the last exit ([`VmExit::MsrWrite`],
    /// [`VmExit::MsrRead`]): `failed` makes KVM inject #GP at the next
    /// entry; else a read returns `data`. False if the last exit was not
    /// an MSR access.
    fn complete_msr(&mut self, failed: bool, data: u64) -> bool;
    /// The next write buffered in the coalesced-MMIO ring: address, bytes
    /// and length.
    fn coalesced_mmio_read(&mut self) -> Option<(u64, [u8; 8], usize)>;
}

/// The real vCPU: a KVM vCPU file descriptor and its run area.
pub struct KvmVcpu {
    fd: VcpuFd,
    mmap_size: usize,
    coalesced: bool,
    /// The last exit, if it was port IO (read from kvm_run once).
    pio: Option<sys::PioExit>,
    /// KVM_CAP_XSAVE2's area size where it exceeds `kvm_xsave` (4 KiB),
    /// else 0 (KVM_GET_XSAVE is used).
    xsave2_size: usize,
    /// KVM's MSR save list (KVM_GET_MSR_INDEX_LIST), shared by the vCPUs
    /// of a VM.
    msr_list: Arc<[u32]>,
}

impl KvmVcpu {
    /// Wraps `fd`, whose `kvm_run` mapping is `mmap_size` bytes.
    pub fn new(fd: VcpuFd, mmap_size: usize) -> Self {
        KvmVcpu {
            fd,
            mmap_size,
            coalesced: false,
            pio: None,
            xsave2_size: 0,
            msr_list: Arc::from(Vec::new()),
        }
    }

    /// What saving this vCPU's state needs from the VM and the system:
    /// KVM_CAP_XSAVE2's area size (used when above 4 KiB) and KVM's MSR
    /// save list.
    pub fn set_state_info(&mut self, xsave2_size: usize, msr_list: Arc<[u32]>) {
        self.xsave2_size = if xsave2_size > std::mem::size_of::<kvm_xsave>() {
            xsave2_size
        } else {
            0
        };
        self.msr_list = msr_list;
    }

    /// The XSAVE area's size in bytes that KVM hands out on this VM.
    pub fn xsave_size(&self) -> usize {
        self.xsave2_size.max(std::mem::size_of::<kvm_xsave>())
    }

    /// Maps the coalesced-MMIO ring (writes in registered ranges do not exit).
    pub fn enable_coalesced_mmio(&mut self) -> Result<()> {
        self.fd
            .map_coalesced_mmio_ring()
            .map_err(KvmError::ioctl("mapping the coalesced-MMIO ring"))?;
        self.coalesced = true;
        Ok(())
    }

    /// The file descriptor (for set-up, and the bare reference loops of
    /// the benchmarks).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The file descriptor, mutable (the bare reference loops run it).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// The TSC rate KVM gives this vCPU, in kHz.
    pub fn tsc_khz(&self) -> Result<u32> {
        sys::count_syscall();
        self.fd
            .get_tsc_khz()
            .map_err(KvmError::ioctl("KVM_GET_TSC_KHZ"))
    }

    /// Sets the CPUID table the guest sees.
    pub fn set_cpuid(&self, table: &kvm_bindings::CpuId) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_cpuid2(table)
            .map_err(KvmError::ioctl("KVM_SET_CPUID2"))
    }

    /// The details of exits whose data lives in the `kvm_run` union.
    fn decode_run_area(&mut self, exit: Decoded) -> VmExit {
        self.pio = None;
        let run = self.fd.get_kvm_run();
        match exit {
            Decoded::Internal => match sys::internal_error(run) {
                Some((sub, _)) if sub == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => {
                    VmExit::EmulationFailure(sys::emulation_failure_bytes(run))
                }
                Some((sub, data)) => {
                    let what = match sub {
                        2 => " (simultaneous exceptions)",
                        3 => " (delivery event)",
                        _ => "",
                    };
                    VmExit::Fatal(format!(
                        "KVM_EXIT_INTERNAL_ERROR: suberror {sub}{what}, data {data:x?}"
                    ))
                }
                None => VmExit::Fatal("KVM_EXIT_INTERNAL_ERROR".into()),
            },
            Decoded::Unknown => {
                let hw = sys::unknown_hw_reason(run).unwrap_or(0);
                VmExit::Fatal(format!("KVM_EXIT_UNKNOWN: hardware exit reason {hw:#x}"))
            }
            Decoded::Exception => {
                let (nr, code) = sys::exception(run).unwrap_or((0, 0));
                VmExit::Fatal(format!(
                    "KVM_EXIT_EXCEPTION: exception {nr} error code {code:#x}"
                ))
            }
            Decoded::Exit(exit @ (VmExit::IoIn { .. } | VmExit::IoOut { .. })) => {
                // Port IO: the element size, count and data offset are in
                // kvm_run; kept for the completion.
                let pio = sys::pio_exit(run);
                self.pio = pio;
                let (size, count) = pio.map_or((1, 1), |p| (p.size, p.count));
                match exit {
                    VmExit::IoIn { port, .. } => VmExit::IoIn { port, size, count },
                    VmExit::IoOut { port, .. } => VmExit::IoOut { port, size, count },
                    e => e,
                }
            }
            Decoded::Exit(e) => e,
        }
    }
}

/// An exit as far as kvm-ioctls reports it; the marked ones have their
/// details in the `kvm_run` union.
enum Decoded {
    Exit(VmExit),
    Internal,
    Unknown,
    Exception,
}

/// An x2APIC register (MSRs 0x800-0x8FF).
pub fn is_x2apic_msr(index: u32) -> bool {
    (0x800..=0x8ff).contains(&index)
}

/// The exit as kvm-ioctls reports it; exits whose details are in the
/// `kvm_run` union are marked for [`KvmVcpu::decode_run_area`].
fn decode(
    r: std::result::Result<VcpuExit<'_>, kvm_ioctls::Error>,
    io_out: &mut Vec<u8>,
) -> Decoded {
    Decoded::Exit(match r {
        Ok(VcpuExit::IoIn(port, data)) => VmExit::IoIn {
            port,
            size: 0,
            count: data.len() as u32,
        },
        Ok(VcpuExit::IoOut(port, data)) => {
            io_out.extend_from_slice(data);
            VmExit::IoOut {
                port,
                size: 0,
                count: data.len() as u32,
            }
        }
        Ok(VcpuExit::MmioRead(addr, data)) => VmExit::MmioRead {
            addr,
            len: data.len().min(8),
        },
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            let mut buf = [0u8; 8];
            let len = data.len().min(8);
            buf[..len].copy_from_slice(&data[..len]);
            VmExit::MmioWrite {
                addr,
                len,
                data: buf,
            }
        }
        Ok(VcpuExit::Hlt) => VmExit::Hlt,
        Ok(VcpuExit::Intr) => VmExit::Intr,
        Ok(VcpuExit::IrqWindowOpen) => VmExit::IrqWindowOpen,
        Ok(VcpuExit::Debug(d)) => VmExit::Debug(DebugExit {
            exception: d.exception,
            pc: d.pc,
            dr6: d.dr6,
            dr7: d.dr7,
        }),
        Ok(VcpuExit::Hypercall(h)) => VmExit::Hypercall(h.nr),
        // Filtered writes (IA32_APIC_BASE) and x2APIC registers go to the
        // CPU; any other MSR KVM found invalid (an exit asked for so that
        // the x2APIC registers come here) gets the #GP KVM would give.
        Ok(VcpuExit::X86Wrmsr(w))
            if w.reason == kvm_ioctls::MsrExitReason::Filter || is_x2apic_msr(w.index) =>
        {
            VmExit::MsrWrite {
                index: w.index,
                value: w.data,
            }
        }
        Ok(VcpuExit::X86Wrmsr(w)) => {
            *w.error = 1;
            VmExit::Retry
        }
        Ok(VcpuExit::X86Rdmsr(r)) if is_x2apic_msr(r.index) => VmExit::MsrRead { index: r.index },
        Ok(VcpuExit::X86Rdmsr(r)) => {
            *r.error = 1;
            VmExit::Retry
        }
        Ok(VcpuExit::Shutdown) => {
            VmExit::Fatal("KVM_EXIT_SHUTDOWN: the guest shut down (triple fault)".into())
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => VmExit::Fatal(format!(
            "KVM_EXIT_FAIL_ENTRY: KVM could not enter the guest (hardware entry failure \
                 reason {reason:#x}, host cpu {cpu})"
        )),
        Ok(VcpuExit::InternalError) => return Decoded::Internal,
        Ok(VcpuExit::Unknown) => return Decoded::Unknown,
        Ok(VcpuExit::Exception) => return Decoded::Exception,
        Ok(VcpuExit::MemoryFault { gpa, size, .. }) => VmExit::Fatal(format!(
            "KVM_EXIT_MEMORY_FAULT: guest physical [{gpa:#x}, +{size:#x})"
        )),
        Ok(other) => VmExit::Fatal(format!("unexpected exit from KVM: {other:?}")),
        Err(e) if e.errno() == libc::EINTR => VmExit::Intr,
        Err(e) if e.errno() == libc::EAGAIN => VmExit::Retry,
        Err(e) => VmExit::Fatal(format!("KVM_RUN failed: {e}")),
    })
}

impl Vcpu for KvmVcpu {
    fn run(&mut self, io_out: &mut Vec<u8>) -> VmExit {
        io_out.clear();
        sys::count_syscall();
        let exit = decode(self.fd.run(), io_out);
        self.decode_run_area(exit)
    }

    fn half_entry(&mut self) -> Result<()> {
        self.fd.set_kvm_immediate_exit(1);
        sys::count_syscall();
        let r = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match r {
            Ok(()) | Err(libc::EINTR) => Ok(()),
            Err(e) => Err(KvmError::Completion(format!(
                "half entry (KVM_RUN with immediate_exit) failed: {}",
                std::io::Error::from_raw_os_error(e)
            ))),
        }
    }

    fn host_cycles(&self) -> u64 {
        sys::rdtsc()
    }

    fn thread_setup(&mut self, kind: TimerKind, kick: &KickHandle) -> Result<Box<dyn ExitTimer>> {
        let signals = crate::timer::ThreadSignals::setup(&self.fd, kind, kick)
            .map_err(|e| KvmError::Timer(format!("setting up the run timer ({kind:?}): {e}")))?;
        Ok(Box::new(signals))
    }

    fn regs(&self) -> Result<kvm_regs> {
        sys::count_syscall();
        self.fd.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_regs(regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<kvm_sregs> {
        sys::count_syscall();
        self.fd
            .get_sregs()
            .map_err(KvmError::ioctl("KVM_GET_SREGS"))
    }

    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_sregs(sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))
    }

    fn fpu(&self) -> Result<kvm_fpu> {
        sys::count_syscall();
        self.fd.get_fpu().map_err(KvmError::ioctl("KVM_GET_FPU"))
    }

    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<()> {
        sys::count_syscall();
        self.fd.set_fpu(fpu).map_err(KvmError::ioctl("KVM_SET_FPU"))
    }

    fn xsave(&self) -> Result<Option<XsaveArea>> {
        sys::count_syscall();
        if self.xsave2_size > 0 {
            return sys::get_xsave2(&self.fd, self.xsave2_size)
                .map(|x| Some(XsaveArea(XsaveBuf::Large(x))))
                .map_err(KvmError::ioctl("KVM_GET_XSAVE2"));
        }
        // Hosts without KVM_CAP_XSAVE fail here; the FPU is then not kept
        // in the context (KVM still holds it).
        Ok(self
            .fd
            .get_xsave()
            .ok()
            .map(|x| XsaveArea(XsaveBuf::Legacy(Box::new(x)))))
    }

    fn set_xsave(&mut self, xsave: &XsaveArea) -> Result<()> {
        sys::count_syscall();
        match &xsave.0 {
            // SAFETY: an XsaveArea can only be made by `xsave` on a vCPU of
            // this host (`load_words` keeps its size), so its size and layout
            // are what KVM_SET_XSAVE reads.
            XsaveBuf::Legacy(x) => unsafe { sys::set_xsave(&self.fd, x) },
            // SAFETY: as above; a large area was made with KVM_CAP_XSAVE2's
            // size, which is what KVM reads.
            XsaveBuf::Large(x) => unsafe { sys::set_xsave2(&self.fd, x) },
        }
        .map_err(KvmError::ioctl("KVM_SET_XSAVE"))
    }

    fn xcrs(&self) -> Result<kvm_xcrs> {
        sys::count_syscall();
        Ok(self.fd.get_xcrs().unwrap_or_default())
    }

    fn set_xcrs(&mut self, xcrs: &kvm_xcrs) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_xcrs(xcrs)
            .map_err(KvmError::ioctl("KVM_SET_XCRS"))
    }

    fn events(&self) -> Result<kvm_vcpu_events> {
        sys::count_syscall();
        self.fd
            .get_vcpu_events()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))
    }

    fn set_events(&mut self, events: &kvm_vcpu_events) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_vcpu_events(events)
            .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| KvmError::Setup(format!("MSR list: {e:?}")))?;
        sys::count_syscall();
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
        Ok(msrs.as_slice()[..n.min(entries.len())]
            .iter()
            .map(|e| (e.index, e.data))
            .collect())
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<usize> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let m = Msrs::from_entries(&entries)
            .map_err(|e| KvmError::Setup(format!("MSR list: {e:?}")))?;
        sys::count_syscall();
        self.fd
            .set_msrs(&m)
            .map_err(KvmError::ioctl("KVM_SET_MSRS"))
    }

    fn debug_regs(&self) -> Result<kvm_debugregs> {
        sys::count_syscall();
        self.fd
            .get_debug_regs()
            .map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))
    }

    fn set_debug_regs(&mut self, dr: &kvm_debugregs) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_debug_regs(dr)
            .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))
    }

    fn mp_state(&self) -> Result<kvm_mp_state> {
        sys::count_syscall();
        self.fd
            .get_mp_state()
            .map_err(KvmError::ioctl("KVM_GET_MP_STATE"))
    }

    fn set_mp_state(&mut self, mp: kvm_mp_state) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_mp_state(mp)
            .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))
    }

    fn cpuid_entries(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        sys::count_syscall();
        self.fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map(|c| c.as_slice().to_vec())
            .map_err(KvmError::ioctl("KVM_GET_CPUID2"))
    }

    fn set_cpuid_entries(&mut self, entries: &[kvm_cpuid_entry2]) -> Result<()> {
        let table = CpuId::from_entries(entries).map_err(|e| {
            KvmError::Setup(format!("CPUID table of {} entries: {e:?}", entries.len()))
        })?;
        self.set_cpuid(&table)
    }

    fn saved_msr_indices(&self) -> Result<Vec<u32>> {
        Ok(self.msr_list.to_vec())
    }

    fn set_guest_debug(&mut self, dbg: &kvm_guest_debug) -> Result<()> {
        sys::count_syscall();
        self.fd
            .set_guest_debug(dbg)
            .map_err(KvmError::ioctl("KVM_SET_GUEST_DEBUG"))
    }

    fn nmi(&mut self) -> Result<()> {
        sys::count_syscall();
        self.fd.nmi().map_err(KvmError::ioctl("KVM_NMI"))
    }

    fn interrupt(&mut self, vector: u8) -> Result<()> {
        sys::count_syscall();
        sys::interrupt(&self.fd, vector).map_err(|e| {
            KvmError::Completion(format!("KVM_INTERRUPT (vector {vector:#x}) failed: {e}"))
        })
    }

    fn interrupt_window(&mut self) -> (bool, bool) {
        let run = self.fd.get_kvm_run();
        (run.ready_for_interrupt_injection != 0, run.if_flag != 0)
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = u8::from(on);
    }

    fn cr8(&mut self) -> u64 {
        self.fd.get_kvm_run().cr8
    }

    fn set_cr8(&mut self, cr8: u64) {
        self.fd.get_kvm_run().cr8 = cr8;
    }

    fn complete_io_in(&mut self, data: &[u8]) -> bool {
        match self.pio.take() {
            Some(pio) => sys::complete_pio_in(&mut self.fd, self.mmap_size, &pio, data),
            None => false,
        }
    }

    fn complete_msr(&mut self, failed: bool, data: u64) -> bool {
        sys::complete_msr(&mut self.fd, failed, data)
    }

    fn complete_mmio_read(&mut self, data: &[u8]) -> bool {
        sys::complete_mmio_read(&mut self.fd, data)
    }

    fn coalesced_mmio_read(&mut self) -> Option<(u64, [u8; 8], usize)> {
        if !self.coalesced {
            return None;
        }
        match self.fd.coalesced_mmio_read() {
            Ok(Some(e)) => {
                let len = (e.len as usize).min(e.data.len()).min(8);
                let mut data = [0u8; 8];
                data[..len].copy_from_slice(&e.data[..len]);
                Some((e.phys_addr, data, len))
            }
            _ => None,
        }
    }
}
