//! KvmVm: one KVM virtual machine per simulated system.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use mem::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vcpu::KvmVcpu;
use crate::{KvmError, Result};

/// IA32_APIC_BASE.
const APIC_BASE_MSR: u32 = 0x1b;

/// Where KVM may put its TSS pages (needed on Intel without unrestricted
/// guest); inside the device hole, below the sim-ops window.
pub const TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM: the `/dev/kvm` handle and the VM file descriptor. RAM regions
/// are mapped into memory slots; the holes between them are left unmapped, so
/// guest accesses there exit to the simulator as MMIO.
pub struct KvmVm {
    // Field order matters on drop: the VM goes before the /dev/kvm handle.
    vm: VmFd,
    kvm: Kvm,
    vcpu_mmap_size: usize,
    slots: u32,
    /// KVM's MSR save list, read once (see [`crate::state`]).
    msr_list: std::sync::OnceLock<std::sync::Arc<[u32]>>,
}

impl KvmVm {
    /// The KVM device: `/dev/kvm`, or the path in `KVMSIM_KVM_DEVICE`.
    pub fn device_path() -> std::path::PathBuf {
        std::env::var_os("KVMSIM_KVM_DEVICE")
            .map(Into::into)
            .unwrap_or_else(|| "/dev/kvm".into())
    }

    /// Opens the KVM device and creates a VM, with an error that says what to
    /// do when KVM is missing or not accessible.
    pub fn new() -> Result<Self> {
        let path = Self::device_path();
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            KvmError::Setup(format!(
                "KVM device path {} contains a NUL byte",
                path.display()
            ))
        })?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => KvmError::NoDevice(path.clone()),
            libc::EACCES | libc::EPERM => KvmError::NoPermission(path.clone()),
            _ => KvmError::Open {
                path: path.clone(),
                source: e,
            },
        })?;
        let api = kvm.get_api_version();
        if api < 0 {
            return Err(KvmError::Setup(format!(
                "{} is not a KVM device (KVM_GET_API_VERSION failed)",
                path.display()
            )));
        }
        if api != 12 {
            return Err(KvmError::ApiVersion(api));
        }
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(KvmError::ioctl("KVM_SET_TSS_ADDR"))?;
        let vcpu_mmap_size = kvm
            .get_vcpu_mmap_size()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_MMAP_SIZE"))?;
        Ok(KvmVm {
            vm,
            kvm,
            vcpu_mmap_size,
            slots: 0,
            msr_list: std::sync::OnceLock::new(),
        })
    }

    /// True if `/dev/kvm` can be opened by this process.
    pub fn available() -> std::result::Result<(), KvmError> {
        Self::new().map(|_| ())
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.vm
    }

    /// Size of each vCPU's shared `kvm_run` mapping.
    pub fn vcpu_mmap_size(&self) -> usize {
        self.vcpu_mmap_size
    }

    /// Maps every RAM region of `ram` into its own memory slot. `ram` must
    /// outlive this VM.
    pub fn map_ram(&mut self, ram: &GuestRam) -> Result<()> {
        for region in ram.memory().iter() {
            let host = ram
                .memory()
                .get_host_address(region.start_addr())
                .map_err(|source| KvmError::Memory {
                    what: "mapping RAM into the VM",
                    source,
                })?;
            let slot = kvm_userspace_memory_region {
                slot: self.slots,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` points to a live anonymous mapping of
            // `region.len()` bytes owned by `ram`, which the caller keeps
            // alive for as long as this VM exists (the platform drops the VM
            // first). Slots never overlap: each region gets a fresh slot
            // number and vm-memory guarantees regions do not overlap.
            unsafe { self.vm.set_user_memory_region(slot) }
                .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
            self.slots += 1;
        }
        Ok(())
    }

    /// Creates vCPU `id`, bare (for probes).
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu> {
        let fd = self
            .vm
            .create_vcpu(id)
            .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;
        let mut vcpu = KvmVcpu::new(fd, self.vcpu_mmap_size);
        let xsave2 = usize::try_from(self.vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        // Only saving the vCPU's state needs the list: a KVM that cannot
        // give it still runs guests (a checkpoint then keeps the thread
        // context's MSRs only).
        let msrs = self.msr_list().unwrap_or_else(|e| {
            tracing::warn!("{e}: checkpoints will keep only the MSRs kvmsim knows");
            // Said once per VM: the empty list is kept.
            self.msr_list
                .get_or_init(|| std::sync::Arc::from(Vec::new()))
                .clone()
        });
        vcpu.set_state_info(xsave2, msrs);
        Ok(vcpu)
    }

    /// KVM's list of the MSRs that make up a vCPU's state
    /// (KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and the ones it
    /// emulates; read once per VM).
    pub fn msr_list(&self) -> Result<std::sync::Arc<[u32]>> {
        if let Some(l) = self.msr_list.get() {
            return Ok(l.clone());
        }
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let list: std::sync::Arc<[u32]> = std::sync::Arc::from(list.as_slice().to_vec());
        Ok(self.msr_list.get_or_init(|| list).clone())
    }

    /// Makes writes to `[base, base + size)` coalesced: KVM buffers them in
    /// a ring instead of exiting (see [`VcpuSpec::coalesced_mmio`]).
    pub fn register_coalesced_mmio(&self, base: u64, size: u64) -> Result<()> {
        self.vm
            .register_coalesced_mmio(
                IoEventAddress::Mmio(base),
                u32::try_from(size).unwrap_or(u32::MAX),
            )
            .map_err(KvmError::ioctl("KVM_REGISTER_COALESCED_MMIO"))
    }

    /// Makes the guest's writes of IA32_APIC_BASE (MSR 0x1B) exit to user
    /// space (`KVM_X86_SET_MSR_FILTER` with `KVM_CAP_X86_USER_SPACE_MSR`),
    /// so that kvmsim's local APIC sees the APIC being disabled or
    /// re-enabled when it happens ([`crate::vcpu::VmExit::MsrWrite`]).
    /// Without an in-kernel irqchip KVM handles the MSR itself and tells
    /// nobody. Returns false (and changes nothing) where the host lacks
    /// either capability. Call before any vCPU runs.
    pub fn trap_apic_base_writes(&self) -> Result<bool> {
        self.trap_apic_msrs(false)
    }

    /// As [`KvmVm::trap_apic_base_writes`]; with `x2apic`, reads and
    /// writes of the x2APIC registers (MSRs 0x800-0x8FF) exit to user space
    /// too. KVM never filters those (its API says so), but without an
    /// in-kernel local APIC it finds every access to them invalid: asking
    /// for the exits of invalid accesses (KVM_MSR_EXIT_REASON_INVAL) brings
    /// them to kvmsim ([`crate::vcpu::VmExit::MsrRead`], `MsrWrite`); other
    /// invalid accesses get the #GP KVM would give.
    pub fn trap_apic_msrs(&self, x2apic: bool) -> Result<bool> {
        use kvm_ioctls::{
            MsrExitReason, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags,
        };
        if !self.kvm.check_extension(Cap::X86UserSpaceMsr)
            || !self.kvm.check_extension(Cap::X86MsrFilter)
        {
            return Ok(false);
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [
                u64::from(if x2apic {
                    (MsrExitReason::Filter | MsrExitReason::Inval).bits()
                } else {
                    MsrExitReason::Filter.bits()
                }),
                0,
                0,
                0,
            ],
            ..Default::default()
        };
        self.vm.enable_cap(&cap).map_err(KvmError::ioctl(
            "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)",
        ))?;
        // One MSR, its bit clear: writes are denied, hence exit to user space.
        let bitmap = [0u8; 1];
        let range = MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: APIC_BASE_MSR,
            msr_count: 1,
            bitmap: &bitmap,
        };
        self.vm
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
            .map_err(KvmError::ioctl("KVM_X86_SET_MSR_FILTER"))?;
        Ok(true)
    }

    /// Creates vCPU `spec.id` as a simulated CPU: the CPUID table is what
    /// KVM supports, filtered ([`crate::arch::x86_64::cpuid::filter`]), and
    /// the coalesced-MMIO ring is mapped if asked for.
    pub fn create_cpu(&self, spec: &VcpuSpec) -> Result<KvmVcpu> {
        let mut vcpu = self.create_vcpu(spec.id)?;
        let supported = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let table = kvm_bindings::CpuId::from_entries(&crate::arch::x86_64::cpuid::filter(
            &supported,
            spec.id as u8,
            spec.cpus.max(1),
            spec.x2apic,
        ))
        .map_err(|e| KvmError::Setup(format!("CPUID table: {e:?}")))?;
        vcpu.set_cpuid(&table)?;
        if spec.coalesced_mmio {
            vcpu.enable_coalesced_mmio()?;
        }
        Ok(vcpu)
    }
}

/// How to create a simulated CPU's vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuSpec {
    /// The vCPU (and APIC) id.
    pub id: u64,
    /// How many CPUs the system has (the topology CPUID describes).
    pub cpus: u8,
    /// Map the coalesced-MMIO ring (some range was registered).
    pub coalesced_mmio: bool,
    /// Offer x2APIC (CPUID.1:ECX bit 21): the simulated local APIC has an
    /// x2APIC mode and the VM traps its MSRs ([`KvmVm::trap_apic_msrs`]).
    pub x2apic: bool,
}
