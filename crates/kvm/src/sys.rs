//! The unsafe corner of kvmsim: direct access to the shared `kvm_run` area
//! and the ioctls that kvm-ioctls does not wrap. Every `unsafe` block here
//! says why it is sound; nothing outside this module touches raw KVM memory.

use kvm_bindings::{kvm_run, KVM_EXIT_IO, KVM_EXIT_MMIO};
use kvm_ioctls::VcpuFd;

/// Size and repeat count of the port-IO exit described by `run`, or `None`
/// if the last exit was not port IO.
pub fn pio_geometry(run: &kvm_run) -> Option<(u8, u32)> {
    if run.exit_reason != KVM_EXIT_IO {
        return None;
    }
    // SAFETY: exit_reason is KVM_EXIT_IO, so the kernel filled the `io`
    // member of the union; it is plain old data.
    let io = unsafe { run.__bindgen_anon_1.io };
    Some((io.size, io.count))
}

/// Completes a port-IO read (`in`, `ins`) that exited: copies `data` (all
/// `size * count` bytes) to where KVM will pick it up on the next entry.
/// Returns false (and writes nothing) if the last exit was not a port read of
/// exactly that many bytes.
pub fn complete_pio_in(vcpu: &mut VcpuFd, mmap_size: usize, data: &[u8]) -> bool {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != KVM_EXIT_IO {
        return false;
    }
    // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the live union member.
    let io = unsafe { run.__bindgen_anon_1.io };
    let len = io.size as usize * io.count as usize;
    let off = io.data_offset as usize;
    if io.direction != kvm_bindings::KVM_EXIT_IO_IN as u8
        || len != data.len()
        || off.checked_add(len).is_none_or(|end| end > mmap_size)
    {
        return false;
    }
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: the kvm_run area is an mmap of `mmap_size` bytes owned by
    // `vcpu` (KVM_GET_VCPU_MMAP_SIZE); we checked that [off, off+len) lies
    // inside it. The kernel designates that range as the data buffer of this
    // exit and reads it on the next KVM_RUN; no Rust reference to it exists.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(off), len) };
    true
}

/// Completes an MMIO read that exited with the device's `data`. Returns false
/// if the last exit was not an MMIO read of `data.len()` bytes.
pub fn complete_mmio_read(vcpu: &mut VcpuFd, data: &[u8]) -> bool {
    let run = vcpu.get_kvm_run();
    if run.exit_reason != KVM_EXIT_MMIO {
        return false;
    }
    // SAFETY: exit_reason is KVM_EXIT_MMIO, so `mmio` is the live union
    // member; it is plain old data and we hold the only reference to kvm_run.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    if mmio.is_write != 0 || mmio.len as usize != data.len() || data.len() > mmio.data.len() {
        return false;
    }
    mmio.data[..data.len()].copy_from_slice(data);
    true
}

/// The suberror and extra data of a KVM_EXIT_INTERNAL_ERROR.
pub fn internal_error(run: &kvm_run) -> Option<(u32, Vec<u64>)> {
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: exit_reason says the `internal` member of the union is live.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let n = (ie.ndata as usize).min(ie.data.len());
    Some((ie.suberror, ie.data[..n].to_vec()))
}

/// The hardware exit reason of a KVM_EXIT_UNKNOWN.
pub fn unknown_hw_reason(run: &kvm_run) -> Option<u64> {
    if run.exit_reason != kvm_bindings::KVM_EXIT_UNKNOWN {
        return None;
    }
    // SAFETY: exit_reason says the `hw` member of the union is live.
    Some(unsafe { run.__bindgen_anon_1.hw.hardware_exit_reason })
}

/// The exception number and error code of a KVM_EXIT_EXCEPTION.
pub fn exception(run: &kvm_run) -> Option<(u32, u32)> {
    if run.exit_reason != kvm_bindings::KVM_EXIT_EXCEPTION {
        return None;
    }
    // SAFETY: exit_reason says the `ex` member of the union is live.
    let ex = unsafe { run.__bindgen_anon_1.ex };
    Some((ex.exception, ex.error_code))
}

/// Reads the host's time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}
