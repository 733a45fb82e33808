//! The unsafe corner of kvmsim: direct access to the shared `kvm_run` area
//! and the ioctls that kvm-ioctls does not wrap. Every `unsafe` block here
//! says why it is sound; nothing outside this module touches raw KVM memory.

use kvm_bindings::{kvm_run, KVM_EXIT_IO, KVM_EXIT_MMIO};
use kvm_ioctls::VcpuFd;

/// A port-IO exit as `kvm_run` describes it, read once after the exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PioExit {
    pub size: u8,
    pub count: u32,
    /// Where the data lies in the run area.
    pub data_offset: u64,
    pub is_in: bool,
}

/// The port-IO exit described by `run`, or `None` if the last exit was not
/// port IO.
pub fn pio_exit(run: &kvm_run) -> Option<PioExit> {
    if run.exit_reason != KVM_EXIT_IO {
        return None;
    }
    // SAFETY: exit_reason is KVM_EXIT_IO, so the kernel filled the `io`
    // member of the union; it is plain old data.
    let io = unsafe { run.__bindgen_anon_1.io };
    Some(PioExit {
        size: io.size,
        count: io.count,
        data_offset: io.data_offset,
        is_in: io.direction == kvm_bindings::KVM_EXIT_IO_IN as u8,
    })
}

/// Completes the port read `pio` (the vCPU's last exit) with `data` (all
/// `size * count` bytes), copied to where KVM picks it up on the next
/// entry. Returns false (and writes nothing) if `pio` is not a read of
/// exactly that many bytes inside the run area.
pub fn complete_pio_in(vcpu: &mut VcpuFd, mmap_size: usize, pio: &PioExit, data: &[u8]) -> bool {
    let len = pio.size as usize * pio.count as usize;
    let Ok(off) = usize::try_from(pio.data_offset) else {
        return false;
    };
    if !pio.is_in || len != data.len() || off.checked_add(len).is_none_or(|end| end > mmap_size) {
        return false;
    }
    let run = vcpu.get_kvm_run();
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: the kvm_run area is an mmap of `mmap_size` bytes owned by
    // `vcpu` (KVM_GET_VCPU_MMAP_SIZE); we checked that [off, off+len) lies
    // inside it. The kernel designates that range as the data buffer of the
    // exit `pio` was read from and reads it on the next KVM_RUN; no Rust
    // reference to it exists.
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

/// Completes an MSR access that exited to user space (KVM_EXIT_X86_WRMSR
/// or KVM_EXIT_X86_RDMSR): `failed` makes KVM inject #GP on the next
/// entry, else it finishes the instruction (a read with `data`). Returns
/// false if the last exit was not such an access.
pub fn complete_msr(vcpu: &mut VcpuFd, failed: bool, data: u64) -> bool {
    let run = vcpu.get_kvm_run();
    let read = run.exit_reason == kvm_bindings::KVM_EXIT_X86_RDMSR;
    if !read && run.exit_reason != kvm_bindings::KVM_EXIT_X86_WRMSR {
        return false;
    }
    // SAFETY: exit_reason is KVM_EXIT_X86_RDMSR or _WRMSR, so `msr` is the
    // live union member; it is plain old data and we hold the only
    // reference to kvm_run.
    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
    msr.error = u8::from(failed);
    if read && !failed {
        msr.data = data;
    }
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

/// The instruction bytes KVM reports with an emulation failure
/// (KVM_INTERNAL_ERROR_EMULATION with the instruction-bytes flag), if any.
pub fn emulation_failure_bytes(run: &kvm_run) -> Option<Vec<u8>> {
    if run.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: exit_reason says the internal-error member is live; the
    // emulation-failure view is the same memory with a defined layout.
    let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
    if ef.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
        || ef.flags & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            == 0
    {
        return None;
    }
    // SAFETY: the flag says the instruction bytes are valid.
    let b = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
    let n = usize::from(b.insn_size).min(b.insn_bytes.len());
    Some(b.insn_bytes[..n].to_vec())
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

thread_local! {
    static SYSCALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts one system call made by the calling thread for a CPU (ioctls on
/// the vCPU, timer and signal calls). See [`syscalls`].
pub fn count_syscall() {
    SYSCALLS.with(|c| c.set(c.get() + 1));
}

/// System calls the calling thread has made through this crate's vCPU,
/// timer and signal wrappers (a CPU thread's per-exit cost, testable).
pub fn syscalls() -> u64 {
    SYSCALLS.with(std::cell::Cell::get)
}

/// Reads the host's time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

// ---------------------------------------------------------------------------
// Signals, threads and timers.

use std::io;
use std::mem::MaybeUninit;

use kvm_bindings::{kvm_interrupt, kvm_signal_mask, KVMIO};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
ioctl_iow_nr!(KVM_SET_SIGNAL_MASK, KVMIO, 0x8b, kvm_signal_mask);

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `pthread_*` functions return the error number instead of setting errno.
fn check_pthread(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// An empty signal set.
pub fn empty_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole set it is given.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        set.assume_init()
    }
}

/// Adds or removes `sig` in `set`.
pub fn sigset_change(set: &mut libc::sigset_t, sig: libc::c_int, add: bool) {
    // SAFETY: `set` is a valid, initialised sigset; invalid signal numbers
    // only make these return EINVAL.
    unsafe {
        if add {
            libc::sigaddset(set, sig);
        } else {
            libc::sigdelset(set, sig);
        }
    }
}

/// True if `sig` is in `set`.
pub fn sigset_has(set: &libc::sigset_t, sig: libc::c_int) -> bool {
    // SAFETY: `set` is a valid, initialised sigset.
    unsafe { libc::sigismember(set, sig) == 1 }
}

/// Changes the calling thread's signal mask (`how` = SIG_BLOCK, SIG_UNBLOCK,
/// SIG_SETMASK) and returns the previous one.
pub fn thread_sigmask(
    how: libc::c_int,
    set: Option<&libc::sigset_t>,
) -> io::Result<libc::sigset_t> {
    let mut old = empty_sigset();
    let new = set.map_or(std::ptr::null(), |s| s as *const libc::sigset_t);
    // SAFETY: both pointers are valid for the call (or null for "no change").
    check_pthread(unsafe { libc::pthread_sigmask(how, new, &mut old) })?;
    Ok(old)
}

/// Sets the signal mask KVM applies while the vCPU runs inside KVM_RUN.
pub fn set_kvm_signal_mask(vcpu: &VcpuFd, set: &libc::sigset_t) -> io::Result<()> {
    /// `struct kvm_signal_mask` with the 8-byte kernel sigset the kernel
    /// insists on (`len` must be 8, not glibc's 128-byte sigset_t).
    #[repr(C)]
    struct KernelMask {
        len: u32,
        sigset: [u8; 8],
    }
    let mut mask = KernelMask {
        len: 8,
        sigset: [0; 8],
    };
    // The kernel's sigset for signals 1..=64 is the first 64 bits of glibc's.
    for sig in 1..=64 {
        if sigset_has(set, sig) {
            let bit = (sig - 1) as usize;
            mask.sigset[bit / 8] |= 1 << (bit % 8);
        }
    }
    // SAFETY: KVM_SET_SIGNAL_MASK reads a kvm_signal_mask header followed by
    // `len` (8) bytes of mask; KernelMask is exactly that, and it outlives
    // the call. The fd is a vCPU fd.
    check(unsafe { ioctl_with_ref(vcpu, KVM_SET_SIGNAL_MASK(), &mask) })?;
    Ok(())
}

/// Discards every pending instance of `sig` for the calling thread (the
/// signal must be blocked). Returns how many were discarded.
pub fn discard_pending(sig: libc::c_int) -> u32 {
    let mut set = empty_sigset();
    sigset_change(&mut set, sig, true);
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut n = 0;
    loop {
        count_syscall();
        // SAFETY: valid set and timeout; a null siginfo is allowed.
        let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
        if r == sig {
            n += 1;
        } else if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return n;
        }
    }
}

/// True if `sig` is pending for the calling thread or the process.
pub fn is_pending(sig: libc::c_int) -> bool {
    let mut set = empty_sigset();
    // SAFETY: sigpending fills the valid set it is given.
    unsafe { libc::sigpending(&mut set) };
    sigset_has(&set, sig)
}

/// The calling thread's kernel thread id.
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The calling thread's pthread handle.
pub fn pthread_self() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Sends `sig` to thread `t`.
///
/// # Safety
/// `t` must name a live (not yet ended) thread of this process: signalling
/// a thread that has ended is undefined behaviour.
pub unsafe fn pthread_kill(t: libc::pthread_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: the caller guarantees `t` names a live thread of this process.
    check_pthread(unsafe { libc::pthread_kill(t, sig) })
}

/// Injects external interrupt `vector` (KVM_INTERRUPT; no in-kernel irqchip).
pub fn interrupt(vcpu: &VcpuFd, vector: u8) -> io::Result<()> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: KVM_INTERRUPT reads one kvm_interrupt, which lives across the call.
    check(unsafe { ioctl_with_ref(vcpu, KVM_INTERRUPT(), &irq) })?;
    Ok(())
}

/// Restores the FPU/SSE/AVX state with KVM_SET_XSAVE.
///
/// # Safety
/// `xsave` must be an area KVM_GET_XSAVE returned on a vCPU of this host:
/// KVM reads an area of the size it reported (kvm-ioctls marks the call
/// unsafe because a larger XSAVE2 area would be read past the struct).
pub unsafe fn set_xsave(
    vcpu: &VcpuFd,
    xsave: &kvm_bindings::kvm_xsave,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the caller guarantees the area's origin (see above).
    unsafe { vcpu.set_xsave(xsave) }
}

/// Reads the whole XSAVE area with KVM_GET_XSAVE2 into a buffer of
/// `size` bytes (`KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` on this VM; more
/// than the 4 KiB of `kvm_xsave`, e.g. with AMX tile data).
pub fn get_xsave2(vcpu: &VcpuFd, size: usize) -> Result<kvm_bindings::Xsave, kvm_ioctls::Error> {
    let extra = size.saturating_sub(std::mem::size_of::<kvm_bindings::kvm_xsave>()) / 4;
    let mut area =
        kvm_bindings::Xsave::new(extra).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
    // SAFETY: the buffer holds the 4 KiB `kvm_xsave` plus `extra` 32-bit
    // words, `size` bytes in all: what KVM_CAP_XSAVE2 said KVM writes.
    unsafe { vcpu.get_xsave2(&mut area) }?;
    Ok(area)
}

/// Restores an XSAVE area larger than 4 KiB with KVM_SET_XSAVE.
///
/// # Safety
/// `xsave` must be as large as `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` says
/// for this VM (KVM reads that many bytes).
pub unsafe fn set_xsave2(
    vcpu: &VcpuFd,
    xsave: &kvm_bindings::Xsave,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the caller guarantees the size (see above).
    unsafe { vcpu.set_xsave2(xsave) }
}

/// A POSIX timer on CLOCK_MONOTONIC that signals one thread.
#[derive(Debug)]
pub struct PosixTimer(libc::timer_t);

// SAFETY: a timer_t is a process-wide handle; any thread may arm, disarm or
// delete it. The signal goes to the thread named at creation.
unsafe impl Send for PosixTimer {}

impl PosixTimer {
    /// Creates a timer that sends `sig` to the kernel thread `tid`.
    pub fn new(sig: libc::c_int, tid: libc::pid_t) -> io::Result<Self> {
        // SAFETY: sigevent is plain data; all-zero is a valid start.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        sev.sigev_notify_thread_id = tid;
        let mut id = MaybeUninit::<libc::timer_t>::uninit();
        loop {
            // SAFETY: valid sigevent and output pointer.
            let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, id.as_mut_ptr()) };
            if r == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
        }
        // SAFETY: timer_create succeeded and wrote the id.
        Ok(PosixTimer(unsafe { id.assume_init() }))
    }

    fn settime(&self, ns: u64) -> io::Result<libc::itimerspec> {
        let new = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: an all-zero itimerspec is valid plain data.
        let mut old: libc::itimerspec = unsafe { std::mem::zeroed() };
        count_syscall();
        // SAFETY: self.0 is a live timer; both structs are valid.
        check(unsafe { libc::timer_settime(self.0, 0, &new, &mut old) })?;
        Ok(old)
    }

    /// Arms a one-shot expiry `ns` nanoseconds from now (at least 1 ns: 0
    /// would disarm).
    pub fn arm(&self, ns: u64) -> io::Result<()> {
        self.settime(ns.max(1)).map(|_| ())
    }

    /// Disarms; returns true if the timer had expired (nothing was left).
    pub fn disarm(&self) -> io::Result<bool> {
        let old = self.settime(0)?;
        Ok(old.it_value.tv_sec == 0 && old.it_value.tv_nsec == 0)
    }
}

impl Drop for PosixTimer {
    fn drop(&mut self) {
        // SAFETY: self.0 is a live timer, deleted exactly once.
        unsafe { libc::timer_delete(self.0) };
    }
}

/// CPU time consumed by the calling thread, in nanoseconds.
pub fn thread_cpu_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid output pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Resolution of CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_resolution_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid output pointer.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------
// perf_event_open.

use perf_event_open_sys as perf;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Opens a perf event for thread `tid` on any CPU, in group `group` (-1 for
/// a new group).
pub fn perf_open(
    attr: &mut perf::bindings::perf_event_attr,
    tid: libc::pid_t,
    group: libc::c_int,
) -> io::Result<OwnedFd> {
    attr.size = std::mem::size_of::<perf::bindings::perf_event_attr>() as u32;
    // SAFETY: `attr` is a fully initialised perf_event_attr with its size set.
    let fd = unsafe {
        perf::perf_event_open(
            attr,
            tid,
            -1,
            group,
            perf::bindings::PERF_FLAG_FD_CLOEXEC as _,
        )
    };
    check(fd)?;
    // SAFETY: perf_event_open returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The perf ioctls kvmsim uses.
#[derive(Debug, Clone, Copy)]
pub enum PerfIoctl {
    Enable,
    Disable,
    Reset,
    /// Reload the overflow counter and allow this many more overflows.
    Refresh(i32),
    /// Set the sample period (overflow every N events).
    Period(u64),
}

/// Issues a perf ioctl on a perf event fd.
pub fn perf_ioctl(fd: &OwnedFd, op: PerfIoctl) -> io::Result<()> {
    count_syscall();
    let fd = fd.as_raw_fd();
    // SAFETY: `fd` is a perf event fd; each ioctl takes the argument type
    // its wrapper declares (PERIOD reads a u64 through the pointer we pass).
    let r = unsafe {
        match op {
            PerfIoctl::Enable => perf::ioctls::ENABLE(fd, 0),
            PerfIoctl::Disable => perf::ioctls::DISABLE(fd, 0),
            PerfIoctl::Reset => perf::ioctls::RESET(fd, 0),
            PerfIoctl::Refresh(n) => perf::ioctls::REFRESH(fd, n),
            PerfIoctl::Period(p) => {
                let p = p.max(1);
                libc::ioctl(fd, perf::bindings::PERIOD as _, &p as *const u64)
            }
        }
    };
    check(r).map(|_| ())
}

/// Reads a perf counter's value.
pub fn perf_read(fd: &OwnedFd) -> io::Result<u64> {
    count_syscall();
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into `v` from a perf fd (read_format 0).
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n != 8 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

// From <bits/fcntl-linux.h>; the libc crate does not export them.
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// `struct f_owner_ex`.
#[repr(C)]
struct FOwnerEx {
    type_: libc::c_int,
    pid: libc::pid_t,
}

/// Routes a perf fd's overflow notifications to thread `tid` as signal `sig`.
pub fn perf_signal_to_thread(fd: &OwnedFd, sig: libc::c_int, tid: libc::pid_t) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let owner = FOwnerEx {
        type_: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: fcntl on a valid fd with a valid f_owner_ex pointer / int args.
    unsafe {
        check(libc::fcntl(raw, F_SETOWN_EX, &owner as *const FOwnerEx))?;
        check(libc::fcntl(raw, F_SETSIG, sig))?;
        let flags = check(libc::fcntl(raw, libc::F_GETFL))?;
        check(libc::fcntl(
            raw,
            libc::F_SETFL,
            flags | libc::O_ASYNC | libc::O_NONBLOCK,
        ))?;
    }
    Ok(())
}
