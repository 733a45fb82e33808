//! Bare reference loops: the least a VMM can do to run a guest, for
//! `kvmsim bench` to hold kvmsim against.
//!
//! A [`BareVm`] gets the VM set-up kvmsim gives a bare-metal guest (RAM in
//! memory slots, the filtered CPUID table, the boot GDT, TSS and identity
//! page tables, 64-bit mode at CPL0 with the boot arguments in RDI...R9),
//! and then nothing else: no event queue, devices, CPU state machine,
//! register cache or statistics. Its loops service each exit with the
//! minimum (a read returns a constant, a write is dropped) and stop at the
//! guest's first read of the sim-ops window, which is how every built-in
//! guest ends its run.
//!
//! * [`BareVm::run_io`]: port-IO and MMIO exits only (no run timer).
//! * [`BareVm::run_kicked`]: a POSIX run timer armed for one period before
//!   every entry (the same kick signal and masks as kvmsim's CPU,
//!   [`ThreadSignals`]); after every forced exit the signal is taken and an
//!   interrupt injected, or an interrupt window requested until the guest
//!   can take it.
//!
//! The time of a loop runs from its first entry to the end of the exit that
//! ends it; building the VM is not part of it.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use mem::GuestRam;

use crate::arch::x86_64::{boot, X86_64};
use crate::sys;
use crate::timer::{kick_signal, KickHandle, ThreadSignals, TimerKind};
use crate::{Arch, KvmError, KvmVcpu, KvmVm, Result, VcpuSpec};

/// Start of the sim-ops window: a read there ends a bare loop.
pub const SIMOPS_BASE: u64 = 0xffff_0000;

/// What a bare loop did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BareRun {
    /// Host time from the first entry to the exit that ended the loop.
    pub wall: Duration,
    /// `KVM_RUN` calls.
    pub entries: u64,
    /// Port-IO exits (reads and writes).
    pub pio_exits: u64,
    /// MMIO exits (reads and writes), the final sim-ops read included.
    pub mmio_exits: u64,
    /// Exits forced by the run timer (`EINTR`).
    pub forced_exits: u64,
    /// Interrupts injected.
    pub injected: u64,
}

/// A VM with one vCPU, set up as kvmsim sets up a bare-metal guest, whose
/// guest image the caller has loaded into `ram`.
pub struct BareVm<'a> {
    // Field order matters on drop: the vCPU goes before its VM.
    vcpu: KvmVcpu,
    _vm: KvmVm,
    _ram: &'a GuestRam,
}

impl<'a> BareVm<'a> {
    /// Creates the VM over `ram` (the guest already loaded) and puts its
    /// vCPU at `entry` in 64-bit mode at CPL0 with kvmsim's default stack
    /// and `args` in RDI, RSI, RDX, RCX, R8, R9 (at most six).
    pub fn new(ram: &'a GuestRam, entry: u64, args: &[u64]) -> Result<Self> {
        if args.len() > 6 {
            return Err(KvmError::Setup(format!(
                "a bare guest takes at most 6 boot arguments, not {}",
                args.len()
            )));
        }
        let mut vm = KvmVm::new()?;
        vm.map_ram(ram)?;
        // As platform::System builds a bare-metal system's CPU.
        let mut vcpu = vm.create_cpu(&VcpuSpec {
            cpus: 1,
            id: 0,
            coalesced_mmio: false,
            x2apic: false,
        })?;
        boot::write_boot_structures(ram.memory())?;
        let mut arch = X86_64::new();
        boot::enter_long_mode(&mut arch, &mut vcpu, entry, boot::DEFAULT_STACK_TOP, args)?;
        arch.update_kvm_state(&mut vcpu)?;
        Ok(BareVm {
            vcpu,
            _vm: vm,
            _ram: ram,
        })
    }

    /// Runs the guest until it reads the sim-ops window, servicing port and
    /// MMIO exits with the minimum: every read returns the low bytes of
    /// `read_value`, every write is dropped. No run timer is armed.
    pub fn run_io(&mut self, read_value: u64) -> Result<BareRun> {
        let value = read_value.to_le_bytes();
        let mut r = BareRun::default();
        let start = Instant::now();
        loop {
            r.entries += 1;
            match self.vcpu.fd_mut().run() {
                Ok(VcpuExit::IoIn(_, data)) => {
                    r.pio_exits += 1;
                    fill(data, &value);
                }
                Ok(VcpuExit::IoOut(..)) => r.pio_exits += 1,
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    r.mmio_exits += 1;
                    fill(data, &value);
                    if addr >= SIMOPS_BASE {
                        break;
                    }
                }
                Ok(VcpuExit::MmioWrite(..)) => r.mmio_exits += 1,
                Ok(other) => return Err(unexpected(&other)),
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => {
                    return Err(KvmError::Ioctl {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            }
        }
        r.wall = start.elapsed();
        Ok(r)
    }

    /// Runs the guest until it reads the sim-ops window with a POSIX run
    /// timer armed for `period` before every entry (one `timer_settime`;
    /// the guest's time in KVM is what the period measures, as in kvmsim);
    /// after each forced exit takes the pending signal and injects
    /// `vector` (or requests an interrupt window and injects when the guest
    /// can take it). Port and MMIO exits are serviced as in
    /// [`BareVm::run_io`] with reads returning `read_value`. Sets up the
    /// kick signal handling of the calling thread as kvmsim's CPU does on
    /// its own ([`ThreadSignals::setup`]).
    pub fn run_kicked(&mut self, period: Duration, vector: u8, read_value: u64) -> Result<BareRun> {
        let value = read_value.to_le_bytes();
        let period_ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1);
        let setup = |e: std::io::Error| KvmError::Setup(format!("bare run timer: {e}"));
        let signals =
            ThreadSignals::setup(self.vcpu.fd(), TimerKind::Posix, &KickHandle::default())
                .map_err(setup)?;
        let mut r = BareRun::default();
        let mut pending = false;
        let start = Instant::now();
        loop {
            if pending {
                let run = self.vcpu.fd_mut().get_kvm_run();
                if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
                    run.request_interrupt_window = 0;
                    sys::interrupt(self.vcpu.fd(), vector).map_err(setup)?;
                    r.injected += 1;
                    pending = false;
                } else {
                    run.request_interrupt_window = 1;
                }
            }
            signals.arm_timer_ns(period_ns).map_err(setup)?;
            r.entries += 1;
            let done = match self.vcpu.fd_mut().run() {
                Ok(VcpuExit::IoIn(_, data)) => {
                    r.pio_exits += 1;
                    fill(data, &value);
                    false
                }
                Ok(VcpuExit::IoOut(..)) => {
                    r.pio_exits += 1;
                    false
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    r.mmio_exits += 1;
                    fill(data, &value);
                    addr >= SIMOPS_BASE
                }
                Ok(VcpuExit::MmioWrite(..)) => {
                    r.mmio_exits += 1;
                    false
                }
                Ok(VcpuExit::IrqWindowOpen) => false,
                Ok(other) => return Err(unexpected(&other)),
                Err(e) if e.errno() == libc::EINTR => {
                    // The expired timer's signal stays pending (blocked
                    // outside KVM): take it, or the next entry exits at once.
                    sys::discard_pending(kick_signal());
                    r.forced_exits += 1;
                    pending = true;
                    false
                }
                Err(e) => {
                    return Err(KvmError::Ioctl {
                        what: "KVM_RUN",
                        source: e,
                    })
                }
            };
            if done {
                break;
            }
        }
        r.wall = start.elapsed();
        signals.disarm_timer().map_err(setup)?;
        sys::discard_pending(kick_signal());
        Ok(r)
    }
}

/// Fills a read's data with the low bytes of `value` (a read wider than
/// eight bytes gets zeros past them).
fn fill(data: &mut [u8], value: &[u8; 8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = value.get(i).copied().unwrap_or(0);
    }
}

fn unexpected(exit: &VcpuExit<'_>) -> KvmError {
    KvmError::Setup(format!(
        "bare loop: the guest made an exit the loop does not service: {exit:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_get_the_constant_in_little_endian_order() {
        let v = 0x1122_3344_5566_7788u64.to_le_bytes();
        let mut one = [0u8; 1];
        fill(&mut one, &v);
        assert_eq!(one, [0x88]);
        let mut four = [0u8; 4];
        fill(&mut four, &v);
        assert_eq!(u32::from_le_bytes(four), 0x5566_7788);
        let mut wide = [0xffu8; 10];
        fill(&mut wide, &v);
        assert_eq!(&wide[8..], &[0, 0]);
    }

    /// `mov $5, %ecx; mov $0x3ff, %dx; 1: in %dx, %al; dec %ecx; jnz 1b;
    /// mov $0xfeb00000, %esi; 2: mov (%rsi), %rax; dec %edi; jnz 2b;
    /// mov $0xffff2100, %eax; mov (%rax), %rax; hlt`
    const IO_GUEST: &[u8] = &[
        0xb9, 0x05, 0x00, 0x00, 0x00, 0x66, 0xba, 0xff, 0x03, 0xec, 0xff, 0xc9, 0x75, 0xfb, 0xbe,
        0x00, 0x00, 0xb0, 0xfe, 0x48, 0x8b, 0x06, 0xff, 0xcf, 0x75, 0xf9, 0xb8, 0x00, 0x21, 0xff,
        0xff, 0x48, 0x8b, 0x00, 0xf4,
    ];

    #[test]
    fn run_io_services_every_exit_once_and_stops_at_sim_ops() {
        if !crate::usable_or_skip("run_io_services_every_exit_once_and_stops_at_sim_ops") {
            return;
        }
        use vm_memory::{Bytes, GuestAddress};
        let ram = GuestRam::new(mem::MemoryMap::for_size(16 << 20).unwrap()).unwrap();
        ram.memory()
            .write_slice(IO_GUEST, GuestAddress(boot::MIN_LOAD_ADDR))
            .unwrap();
        let mut vm = BareVm::new(&ram, boot::MIN_LOAD_ADDR, &[3]).unwrap();
        let r = vm.run_io(0xff).unwrap();
        // Five port reads, three MMIO reads (RDI = 3), the sim-ops read.
        assert_eq!((r.pio_exits, r.mmio_exits), (5, 4), "{r:?}");
        assert_eq!(r.entries, 9, "{r:?}");
        assert_eq!((r.forced_exits, r.injected), (0, 0));
        assert!(r.wall > Duration::ZERO);
    }

    #[test]
    fn more_than_six_arguments_are_refused() {
        let ram = GuestRam::new(mem::MemoryMap::for_size(16 << 20).unwrap()).unwrap();
        let e = BareVm::new(&ram, boot::MIN_LOAD_ADDR, &[0; 7])
            .err()
            .expect("seven arguments must be refused");
        assert!(e.to_string().contains("at most 6"), "{e}");
    }
}
