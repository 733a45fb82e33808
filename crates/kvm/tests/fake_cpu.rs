//! The CPU model driven through a scripted vCPU: no /dev/kvm needed.
//! (These run with `KVMSIM_KVM_DEVICE=/nonexistent` too.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use kvm::arch::x86_64::X86_64;
use kvm::cpu::{CpuOptions, IntcHandle};
use kvm::fake::{FakeVcpu, Step};
use kvm::Arch;
use kvm::{CpuConfig, KvmCpu, TickOutcome, VmExit};
use mem::IoBus;
use proptest::prelude::*;
use sim::intr::{InterruptController, Pending};
use sim::{ClockDomain, Stats, Tick};

/// Host counter at 1 GHz: one host cycle is one simulated ns at host_factor 1.
const HOST_HZ: f64 = 1e9;
const NS: Tick = sim::tick::TICKS_PER_NS;

/// An interrupt controller with a queue of pending vectors.
#[derive(Default)]
struct Queue {
    pending: VecDeque<u8>,
    acknowledged: u64,
    nmis: u8,
    msrs: Vec<(u32, u64)>,
}

impl InterruptController for Queue {
    fn pending(&mut self) -> Pending {
        if self.nmis > 0 {
            Pending::Nmi
        } else if self.pending.is_empty() {
            Pending::None
        } else {
            Pending::Maskable
        }
    }
    fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending.pop_front();
        self.acknowledged += u64::from(v.is_some());
        v
    }
    fn take_nmi(&mut self) -> bool {
        let had = self.nmis > 0;
        self.nmis = self.nmis.saturating_sub(1);
        had
    }
    fn merge_nmis(&mut self) {
        self.nmis = self.nmis.min(1);
    }
    fn msr_written(&mut self, index: u32, value: u64) {
        self.msrs.push((index, value));
    }
    // A register 0x802 that reads 7 and takes only 0.
    fn msr_write(
        &mut self,
        index: u32,
        value: u64,
        _now: u64,
        _requests: &mut Vec<sim::Request>,
    ) -> sim::intr::MsrWrite {
        match (index, value) {
            (0x802, 0) => sim::intr::MsrWrite::Done { latency: 5 },
            (0x802, _) => sim::intr::MsrWrite::Fault,
            _ => sim::intr::MsrWrite::ToCpu,
        }
    }
    fn msr_read(&mut self, index: u32, _now: u64) -> Option<(u64, u64)> {
        (index == 0x802).then_some((7, 5))
    }
}

struct Rig {
    cpu: KvmCpu<X86_64, FakeVcpu>,
    bus: IoBus,
    stats: Stats,
    intc: Arc<Mutex<Queue>>,
    now: Tick,
}

impl Rig {
    fn new(script: Vec<Step>) -> Rig {
        Rig::with_vcpu(FakeVcpu::new(script))
    }

    fn with_vcpu(vcpu: FakeVcpu) -> Rig {
        let mut stats = Stats::new();
        let cfg = CpuConfig {
            clock: ClockDomain::from_hz(1e9),
            host_freq_hz: HOST_HZ,
            host_factor: 1.0,
        };
        let mut cpu = KvmCpu::new(
            "system.cpu",
            vcpu,
            X86_64::new(),
            cfg,
            CpuOptions::default(),
            &mut stats,
        )
        .unwrap();
        let intc = Arc::new(Mutex::new(Queue::default()));
        let handle: IntcHandle = intc.clone();
        cpu.set_interrupt_controller(handle);
        cpu.startup_thread().unwrap();
        let bus = IoBus::new(&mut stats, "system.iobus").unwrap();
        Rig {
            cpu,
            bus,
            stats,
            intc,
            now: 0,
        }
    }

    /// One tick with the next event at `next`; checks that time moves on.
    fn tick(&mut self, next: Option<Tick>) -> TickOutcome {
        let mut reqs = Vec::new();
        let o = self.cpu.tick(self.now, next, &self.bus, &mut reqs).unwrap();
        if let TickOutcome::Next(t) = o {
            assert!(t >= self.now, "time went back: {} -> {t}", self.now);
            self.now = t;
        }
        o
    }

    /// Ticks until the CPU halts (at most `limit` ticks), with an event
    /// every `period` (None: no events).
    fn run(&mut self, period: Option<Tick>, limit: usize) -> usize {
        for i in 0..limit {
            let next = period.map(|p| (self.now / p + 1) * p);
            match self.tick(next) {
                TickOutcome::Next(_) => {}
                TickOutcome::Idle => return i,
                other => panic!("unexpected outcome {other:?}"),
            }
        }
        panic!("the CPU did not halt within {limit} ticks");
    }

    fn stat(&self, name: &str) -> f64 {
        self.stats
            .dump(self.now)
            .get(name)
            .unwrap_or_else(|| panic!("no stat {name}"))
            .as_f64()
    }
}

fn int3() -> VmExit {
    VmExit::EmulationFailure(Some(vec![0xcc]))
}

#[test]
fn an_interrupt_is_not_injected_beside_a_completed_exception_nor_discarded() {
    // The guest hits an int3 that KVM cannot emulate while an interrupt is
    // pending: kvmsim completes the int3 (a #BP to inject) and must neither
    // let the events it pushes discard the interrupt nor inject both.
    let mut rig = Rig::new(vec![
        Step::new(100, int3()),
        Step::new(100, VmExit::IrqWindowOpen),
        Step::new(100, int3()),
        Step::new(
            100,
            VmExit::IoOut {
                port: 0x80,
                size: 1,
                count: 1,
            },
        ),
    ]);
    rig.intc.lock().unwrap().pending.extend([0x40, 0x41, 0x42]);
    rig.run(None, 100);
    let rec = rig.cpu.vcpu().record().clone();
    assert_eq!(rec.exceptions, vec![3, 3], "both #BP delivered");
    assert!(rec.discarded.is_empty(), "interrupts discarded: {rec:?}");
    assert_eq!(rec.injected_beside_exception, 0, "{rec:?}");
    assert_eq!(rec.taken, rec.injected);
    assert_eq!(rec.taken, vec![0x40, 0x41, 0x42]);
    assert_eq!(rig.stat("system.cpu.numInterrupts"), 3.0);
    assert_eq!(rig.stat("system.cpu.completedInstructions::int3"), 2.0);
}

#[test]
fn a_run_is_charged_what_it_measured_but_never_past_the_next_event() {
    // No timer involved: an exit after 300 host cycles (300 ns) is charged 300 ns.
    let mut rig = Rig::new(vec![Step::new(
        300,
        VmExit::IoOut {
            port: 0x80,
            size: 1,
            count: 1,
        },
    )]);
    assert_eq!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(300 * NS));
    // The next event is 50 ns away: the timer is armed for its resolution
    // (1000 host cycles) and its signal comes 400 cycles late. The run is
    // charged just past the event (gem5's rule), whatever the host measured.
    let mut rig = Rig::new(vec![Step::new(100_000, VmExit::Hlt)]);
    rig.cpu.vcpu_mut().timer_latency = 400;
    // 50 ns + 1 tick, rounded up to the 1 ns clock edge.
    assert_eq!(rig.tick(Some(50 * NS)), TickOutcome::Next(51 * NS));
    assert_eq!(rig.stat("system.cpu.numExitSignal"), 1.0);
    // A signal exit that is not the timer's (a kick) is charged what it
    // measured.
    let mut rig = Rig::new(vec![Step::new(70, VmExit::Intr)]);
    assert_eq!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(70 * NS));
}

#[test]
fn a_host_counter_that_goes_back_counts_as_no_time() {
    let mut rig = Rig::new(vec![Step::clock_at_exit(
        VmExit::IoOut {
            port: 0x80,
            size: 1,
            count: 1,
        },
        5,
    )]);
    // Without the guard the run would be charged ~2^64 cycles.
    assert_eq!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(NS));
    assert_eq!(rig.stat("system.cpu.numHostClockBackwards"), 1.0);
}

#[test]
fn an_instruction_longer_than_the_span_to_the_next_event_still_completes() {
    // Events every 100 ns, and the guest's next instruction needs 20,000
    // uninterrupted host cycles (an emulated instruction on a slow host):
    // each run is cut off before it completes until the minimum run span
    // has grown enough.
    let mut rig = Rig::new(vec![
        Step::atomic(
            20_000,
            VmExit::IoOut {
                port: 0x80,
                size: 1,
                count: 1,
            },
        ),
        Step::new(10, VmExit::Hlt),
    ]);
    rig.run(Some(100 * NS), 10_000);
    assert!(rig.stat("system.cpu.numProgressStalls") >= 1.0);
    assert_eq!(rig.stat("system.cpu.numIO"), 1.0);
    // Simulated time never passed an event by more than a tick: the
    // 20,000 cycles were not charged at once.
    assert!(rig.now < 20_000 * NS, "now {}", rig.now);
}

#[test]
fn a_drain_completes_a_pending_read_with_a_half_entry() {
    let mut rig = Rig::new(vec![
        Step::new(
            100,
            VmExit::IoIn {
                port: 0x3f8,
                size: 1,
                count: 4,
            },
        ),
        Step::new(100, VmExit::Hlt),
    ]);
    assert!(matches!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(_)));
    // Service the read: the CPU now waits to complete it.
    assert!(matches!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(_)));
    assert!(!rig.cpu.drain().unwrap());
    // A half entry completes the read, then the CPU is drained.
    assert!(matches!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(_)));
    assert_eq!(rig.tick(Some(10_000 * NS)), TickOutcome::Drained);
    let rec = rig.cpu.vcpu().record().clone();
    assert_eq!(rec.half_entries, 1);
    assert_eq!(
        rec.completions,
        vec![vec![0xff; 4]],
        "unclaimed ports read all-ones"
    );
    assert_eq!(rec.uncompleted_entries, 0);
    rig.cpu.drain_resume();
    rig.run(None, 10);
    assert_eq!(
        rig.cpu.vcpu().record().completions.len(),
        1,
        "completed once"
    );
}

#[test]
fn the_state_machine_needs_no_kvm_device() {
    // The scripted vCPU works where /dev/kvm is absent or unusable.
    let mut rig = Rig::new(vec![Step::new(10, VmExit::Hlt)]);
    assert_eq!(rig.run(None, 10), 1);
    assert_eq!(rig.stat("system.cpu.numHalt"), 1.0);
}

fn exit_strategy() -> impl Strategy<Value = VmExit> {
    prop_oneof![
        (
            0u16..0x400,
            prop_oneof![Just(1u8), Just(2), Just(4)],
            1u32..4
        )
            .prop_map(|(port, size, count)| VmExit::IoIn { port, size, count }),
        (
            0u16..0x400,
            prop_oneof![Just(1u8), Just(2), Just(4)],
            1u32..4
        )
            .prop_map(|(port, size, count)| VmExit::IoOut { port, size, count }),
        (0xfec0_0000u64..0xfec1_0000, 1usize..=8)
            .prop_map(|(addr, len)| VmExit::MmioRead { addr, len }),
        (0xfec0_0000u64..0xfec1_0000, 1usize..=8).prop_map(|(addr, len)| VmExit::MmioWrite {
            addr,
            len,
            data: [7; 8]
        }),
        Just(VmExit::Intr),
        Just(VmExit::IrqWindowOpen),
        Just(VmExit::EmulationFailure(Some(vec![0xcc]))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random exits, interrupts raised at random points, events at random
    /// distances, drains now and then: simulated time never goes back, every
    /// interrupt the controller handed over is taken by the guest, and every
    /// read is completed exactly once.
    #[test]
    fn random_exit_sequences_lose_nothing(
        steps in proptest::collection::vec((1u64..5_000, exit_strategy(), any::<bool>()), 1..60),
        raise in proptest::collection::vec(any::<bool>(), 60),
        drains in proptest::collection::vec(0u8..8, 60),
        period_ns in 50u64..20_000,
    ) {
        let reads = steps
            .iter()
            .filter(|(_, e, _)| matches!(e, VmExit::IoIn { .. } | VmExit::MmioRead { .. }))
            .count();
        let script: Vec<Step> = steps
            .into_iter()
            .map(|(c, e, atomic)| if atomic { Step::atomic(c, e) } else { Step::new(c, e) })
            .chain([Step::new(10, VmExit::Hlt)])
            .collect();
        let mut rig = Rig::new(script);
        let mut vector = 0x40u8;
        let mut halted = false;
        for i in 0..20_000usize {
            if raise[i % raise.len()] && i % 3 == 0 {
                rig.intc.lock().unwrap().pending.push_back(vector);
                vector = vector.wrapping_add(1).max(0x20);
            }
            if drains[i % drains.len()] == 0 && i % 5 == 0 {
                let _ = rig.cpu.drain().unwrap();
            }
            let next = Some((rig.now / (period_ns * NS) + 1) * period_ns * NS);
            match rig.tick(next) {
                TickOutcome::Next(_) => {}
                TickOutcome::Drained => rig.cpu.drain_resume(),
                TickOutcome::Idle => { halted = true; break; }
                other => panic!("unexpected outcome {other:?}"),
            }
        }
        prop_assert!(halted, "the script did not finish");
        let rec = rig.cpu.vcpu().record().clone();
        prop_assert!(rec.discarded.is_empty(), "{:?}", rec);
        prop_assert_eq!(rec.injected_beside_exception, 0);
        prop_assert_eq!(&rec.taken, &rec.injected);
        prop_assert_eq!(rig.intc.lock().unwrap().acknowledged, rec.injected.len() as u64);
        prop_assert_eq!(rec.completions.len(), reads);
        prop_assert_eq!(rec.uncompleted_entries, 0);
        prop_assert_eq!(rec.stray_completions, 0);
    }
}

#[test]
fn a_cpu_is_saved_only_at_a_drained_point() {
    let mut rig = Rig::new(vec![
        Step::new(
            100,
            VmExit::IoIn {
                port: 0x3f8,
                size: 1,
                count: 1,
            },
        ),
        Step::new(100, VmExit::Hlt),
    ]);
    // The read is waiting for its service: refused, named.
    assert!(matches!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(_)));
    let e = rig.cpu.save_state().unwrap_err().to_string();
    assert!(
        e.contains("system.cpu") && e.contains("RunningService"),
        "{e}"
    );
    // Serviced, waiting for its completion: still refused.
    assert!(matches!(rig.tick(Some(10_000 * NS)), TickOutcome::Next(_)));
    assert!(rig.cpu.save_state().is_err());
    // Drained (half entry): saved.
    assert!(!rig.cpu.drain().unwrap());
    rig.tick(Some(10_000 * NS));
    assert_eq!(rig.tick(Some(10_000 * NS)), TickOutcome::Drained);
    let saved = rig.cpu.save_state().unwrap();
    assert!(!saved.halted);
    // An event KVM is still injecting: refused.
    let mut ev = kvm::Vcpu::events(rig.cpu.vcpu()).unwrap();
    ev.interrupt.injected = 1;
    ev.interrupt.nr = 0x30;
    kvm::Vcpu::set_events(rig.cpu.vcpu_mut(), &ev).unwrap();
    kvm::Arch::kvm_state_changed(rig.cpu.arch_mut().0);
    let e = rig.cpu.save_state().unwrap_err().to_string();
    assert!(e.contains("injected or pending"), "{e}");
}

#[test]
fn saving_pushes_the_simulators_changes_and_restoring_drops_the_cached_context() {
    let mut rig = Rig::new(vec![Step::new(100, VmExit::Hlt)]);
    // A change the simulator made and has not pushed yet (as sim-ops or an
    // emulated instruction would): it must be in the saved state.
    {
        let (arch, vcpu) = rig.cpu.arch_mut();
        arch.regs_mut(vcpu).unwrap().rbx = 0xabcd;
    }
    let saved = rig.cpu.save_state().unwrap();
    assert_eq!(
        saved.vcpu.regs.rbx, 0xabcd,
        "the dirty part was pushed first"
    );
    assert_eq!(rig.cpu.vcpu().regs.rbx, 0xabcd);

    // A second CPU whose context cache holds other values (read, and one
    // changed but not pushed): after the restore it reads the saved ones,
    // and nothing stale is pushed over them before the next entry.
    let mut other = Rig::new(vec![Step::new(100, VmExit::Hlt)]);
    {
        let (arch, vcpu) = other.cpu.arch_mut();
        assert_eq!(arch.regs(vcpu).unwrap().rbx, 0);
        arch.sregs_mut(vcpu).unwrap().cr2 = 0x1234;
    }
    other.cpu.restore_state(&saved).unwrap();
    {
        let (arch, vcpu) = other.cpu.arch_mut();
        assert_eq!(arch.regs(vcpu).unwrap().rbx, 0xabcd);
        assert_eq!(arch.sregs(vcpu).unwrap().cr2, 0);
    }
    other.run(None, 10);
    assert_eq!(other.cpu.vcpu().regs.rbx, 0xabcd);
    assert_eq!(
        other.cpu.vcpu().sregs.cr2,
        0,
        "a stale dirty part was pushed"
    );
}

#[test]
fn a_halted_cpu_is_restored_halted() {
    let mut rig = Rig::new(vec![Step::new(100, VmExit::Hlt)]);
    rig.run(None, 10);
    assert_eq!(rig.cpu.state(), kvm::CpuState::Idle);
    let saved = rig.cpu.save_state().unwrap();
    assert!(saved.halted);
    let mut other = Rig::new(vec![Step::new(100, VmExit::Hlt)]);
    other.cpu.restore_state(&saved).unwrap();
    assert_eq!(other.cpu.state(), kvm::CpuState::Idle);
    assert!(other.cpu.wake(), "it waits to be woken");
}

#[test]
fn accepted_msr_writes_reach_the_interrupt_controller() {
    let write = |value| Step::new(100, VmExit::MsrWrite { index: 0x1b, value });
    let mut rig = Rig::new(vec![write(0xfee0_0100), Step::new(10, VmExit::Hlt)]);
    rig.run(None, 20);
    assert_eq!(rig.intc.lock().unwrap().msrs, vec![(0x1b, 0xfee0_0100)]);
    assert_eq!(rig.cpu.vcpu().record().msr_completions, vec![(false, 0)]);
    assert_eq!(rig.cpu.vcpu().record().uncompleted_entries, 0);
    // KVM refuses the value (the guest gets #GP): the APIC never sees it.
    let mut rig = Rig::new(vec![write(0xfee0_0901), Step::new(10, VmExit::Hlt)]);
    rig.cpu.vcpu_mut().refused_msrs.push(0x1b);
    rig.run(None, 20);
    assert!(rig.intc.lock().unwrap().msrs.is_empty());
    assert_eq!(rig.cpu.vcpu().record().msr_completions, vec![(true, 0)]);
}

#[test]
fn x2apic_register_accesses_are_answered_by_the_interrupt_controller() {
    let mut rig = Rig::new(vec![
        Step::new(100, VmExit::MsrRead { index: 0x802 }),
        Step::new(100, VmExit::MsrRead { index: 0x809 }),
        Step::new(
            100,
            VmExit::MsrWrite {
                index: 0x802,
                value: 0,
            },
        ),
        Step::new(
            100,
            VmExit::MsrWrite {
                index: 0x802,
                value: 1,
            },
        ),
        // Not the controller's and not KVM's (no in-kernel APIC): #GP.
        Step::new(
            100,
            VmExit::MsrWrite {
                index: 0x808,
                value: 0,
            },
        ),
        Step::new(10, VmExit::Hlt),
    ]);
    rig.cpu.vcpu_mut().refused_msrs.push(0x808);
    rig.run(None, 20);
    let rec = rig.cpu.vcpu().record();
    assert_eq!(
        rec.msr_completions,
        vec![(false, 7), (true, 0), (false, 0), (true, 0), (true, 0)]
    );
    assert_eq!(rec.uncompleted_entries, 0);
    assert_eq!(rec.stray_completions, 0);
    assert!(rig.intc.lock().unwrap().msrs.is_empty());
}

#[test]
fn every_pending_nmi_goes_to_kvm_before_one_entry() {
    let mut rig = Rig::new(vec![Step::new(100, VmExit::Hlt)]);
    rig.intc.lock().unwrap().nmis = 2;
    rig.run(None, 10);
    // KVM gets both at the first entry: it injects one and keeps the other
    // until the guest's NMI handler returns.
    assert_eq!(rig.cpu.vcpu().record().nmis, 2);
    assert_eq!(rig.intc.lock().unwrap().nmis, 0);
}

#[test]
fn int_n_at_cpl0_is_completed_as_an_injected_interrupt() {
    // `int 0x21` that KVM cannot emulate (eventinj of kvm-unit-tests), with
    // a device interrupt pending (taken at the first entry): both reach the
    // guest, one per entry, none discarded.
    let mut rig = Rig::new(vec![
        Step::new(100, VmExit::EmulationFailure(Some(vec![0xcd, 0x21]))),
        Step::new(100, VmExit::IrqWindowOpen),
        Step::new(100, VmExit::Hlt),
    ]);
    rig.intc.lock().unwrap().pending.push_back(0x40);
    rig.run(None, 100);
    let rec = rig.cpu.vcpu().record().clone();
    assert_eq!(rec.taken, vec![0x40, 0x21], "{rec:?}");
    assert!(rec.discarded.is_empty(), "{rec:?}");
    assert_eq!(rig.stat("system.cpu.completedInstructions::int-n"), 1.0);
}

#[test]
fn int_n_through_a_gate_whose_code_segment_is_absent_raises_np() {
    // eventinj of kvm-unit-tests: `int $33` whose gate names a code segment
    // marked not present raises #NP(selector) at the `int`; once the handler
    // points the gate back at a present segment, the `int` runs again and
    // the vector is taken.
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let int = || VmExit::EmulationFailure(Some(vec![0xcd, 0x21]));
    let mut rig = Rig::new(vec![
        Step::new(100, int()),
        Step::new(100, int()),
        Step::new(100, int()),
        Step::new(100, VmExit::Hlt),
    ]);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    // GDT at 0x2000: 0x08 a present 64-bit code segment, 0x18 the same
    // marked not present; IDT at 0x1000, gate 0x21 through 0x18.
    let code: u64 = 0x00af_9a00_0000_ffff;
    mem.write_obj(code, GuestAddress(0x2008)).unwrap();
    mem.write_obj(code & !(0x80 << 40), GuestAddress(0x2018))
        .unwrap();
    let gate = |sel: u16, access: u8| {
        let mut g = [0u8; 16];
        g[2..4].copy_from_slice(&sel.to_le_bytes());
        g[5] = access;
        g
    };
    mem.write_slice(&gate(0x18, 0x8e), GuestAddress(0x1000 + 0x21 * 16))
        .unwrap();
    rig.cpu.set_guest_memory(mem.clone());
    {
        let v = rig.cpu.vcpu_mut();
        // Protection on, paging off (linear addresses are physical here).
        v.sregs.cr0 = 0x11;
        v.sregs.efer = 0x500;
        v.sregs.cs.l = 1;
        v.sregs.idt.base = 0x1000;
        v.sregs.idt.limit = 0xfff;
        v.sregs.gdt.base = 0x2000;
        v.sregs.gdt.limit = 0x1f;
    }
    // Ticks until the next entry is made (the CPU may wait for time to
    // catch up with it first).
    let enter = |rig: &mut Rig| {
        let entries = rig.cpu.vcpu().record().entries;
        for _ in 0..10 {
            rig.tick(None);
            if rig.cpu.vcpu().record().entries > entries {
                return;
            }
        }
        panic!("no entry");
    };
    enter(&mut rig);
    enter(&mut rig);
    // The #NP went in at the next entry, naming the selector.
    assert_eq!(rig.cpu.vcpu().record().exceptions, vec![11]);
    assert_eq!(rig.cpu.vcpu().record().error_codes, vec![Some(0x18)]);
    assert!(rig.cpu.vcpu().record().taken.is_empty());
    // A gate that is itself not present: #NP naming the IDT entry.
    mem.write_slice(&gate(0x08, 0x0e), GuestAddress(0x1000 + 0x21 * 16))
        .unwrap();
    enter(&mut rig);
    assert_eq!(
        rig.cpu.vcpu().record().error_codes,
        vec![Some(0x18), Some(0x21 * 8 + 2)]
    );
    // The handler fixed the gate: the vector is taken.
    mem.write_slice(&gate(0x08, 0x8e), GuestAddress(0x1000 + 0x21 * 16))
        .unwrap();
    rig.run(None, 100);
    assert_eq!(rig.cpu.vcpu().record().taken, vec![0x21]);
    assert_eq!(rig.cpu.vcpu().record().exceptions, vec![11, 11]);
    assert_eq!(rig.stat("system.cpu.completedInstructions::int-n"), 3.0);
}

/// A debug exit as KVM reports it.
fn debug_exit(exception: u32, pc: u64, dr6: u64) -> VmExit {
    VmExit::Debug(kvm::vcpu::DebugExit {
        exception,
        pc,
        dr6,
        dr7: 0,
    })
}

/// What the next entry gives KVM: (control, DR0, DR7).
fn next_guest_debug(rig: &mut Rig) -> (u32, u64, u64) {
    let (arch, vcpu) = rig.cpu.arch_mut();
    arch.update_kvm_state(vcpu).unwrap();
    let d = rig.cpu.vcpu().guest_debug;
    (d.control, d.arch.debugreg[0], d.arch.debugreg[7])
}

#[test]
fn the_syscall_repair_and_stepping_share_one_guest_debug_setting() {
    use kvm::arch::{DebugStop, Stepper};
    use kvm_bindings::{
        KVM_GUESTDBG_ENABLE as EN, KVM_GUESTDBG_SINGLESTEP as SS, KVM_GUESTDBG_USE_HW_BP as HW,
        KVM_GUESTDBG_USE_SW_BP as SW,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    const HANDLER: u64 = 0x5000;
    let mut rig = Rig::new(vec![
        // The repair's breakpoint on the page-fault handler fires (an
        // ordinary kernel page fault): it steps over the handler's first
        // instruction with its breakpoint off.
        Step::new(100, debug_exit(1, HANDLER, 0b1)),
        // That step is also the debugger's: the CPU stops for it.
        Step::new(100, debug_exit(1, HANDLER + 1, 1 << 14)),
        // The guest's own int3 while the debugger has one planted
        // elsewhere: it goes to the guest as a #BP.
        Step::new(100, debug_exit(3, 0x7000, 0)),
        // The debugger's int3.
        Step::new(100, debug_exit(3, 0x6000, 0)),
        Step::new(100, VmExit::Hlt),
    ]);
    // An IDT at 0x1000 whose entry 14 points at HANDLER; a kernel-mode
    // page-fault frame on the stack (not the broken SYSCALL entry).
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    gate[5] = 0x8e;
    mem.write_slice(&gate, GuestAddress(0x1000 + 14 * 16))
        .unwrap();
    for (i, w) in [0u64, 0x4000, 0x10, 0x2, 0x7_0000, 0x18].iter().enumerate() {
        mem.write_obj(*w, GuestAddress(0x8_0000 + 8 * i as u64))
            .unwrap();
    }
    rig.cpu.set_guest_memory(mem);
    {
        let v = rig.cpu.vcpu_mut();
        v.sregs.idt.base = 0x1000;
        v.sregs.idt.limit = 0xfff;
        // The fake moves RIP one byte per exit.
        v.regs.rip = HANDLER - 1;
    }
    let (arch, vcpu) = rig.cpu.arch_mut();
    arch.enable_syscall_repair(vcpu).unwrap();
    arch.set_step(vcpu, Stepper::Debugger, true).unwrap();
    arch.debug_mut().add_sw(0x6000);
    // Both at once: the step, the repair's breakpoint in DR0, int3 exits.
    assert_eq!(
        next_guest_debug(&mut rig),
        (EN | SS | HW | SW, HANDLER, 0b1)
    );

    // The repair's breakpoint: no stop, no instruction completed.
    assert!(matches!(rig.tick(None), TickOutcome::Next(_)));
    // Stepping over the handler's first instruction: breakpoint off.
    assert_eq!(next_guest_debug(&mut rig), (EN | SS | SW, 0, 0));
    // The step ends the repair's step (re-armed) and stops for the debugger.
    match rig.tick(None) {
        TickOutcome::DebugStop { next, stop } => {
            assert_eq!(stop, DebugStop::Step);
            assert!(next > rig.now);
            rig.now = next;
        }
        o => panic!("expected the debugger's stop, got {o:?}"),
    }
    assert_eq!(
        next_guest_debug(&mut rig),
        (EN | SS | HW | SW, HANDLER, 0b1)
    );
    // The debugger stops stepping; the repair keeps its breakpoint.
    let (arch, vcpu) = rig.cpu.arch_mut();
    arch.set_step(vcpu, Stepper::Debugger, false).unwrap();
    assert_eq!(next_guest_debug(&mut rig), (EN | HW | SW, HANDLER, 0b1));
    // The guest's own int3 becomes a #BP for the guest.
    assert!(matches!(rig.tick(None), TickOutcome::Next(_)));
    assert_eq!(rig.stat("system.cpu.completedInstructions::int3"), 1.0);
    // The debugger's int3 stops the CPU (the guest took its #BP at this entry).
    match rig.tick(None) {
        TickOutcome::DebugStop { next, stop } => {
            assert_eq!(stop, DebugStop::SwBreak);
            rig.now = next;
        }
        o => panic!("expected the debugger's breakpoint, got {o:?}"),
    }
    assert_eq!(rig.cpu.vcpu().record().exceptions, vec![3]);
    rig.run(None, 10);
}

/// A CPU on a host whose KVM does not exit at interrupt windows, with an
/// interrupt waiting while IF is clear, at CPL0 in 64-bit mode, with guest
/// memory (code at the fake's RIP, 1 MiB; stack at 0x80000).
fn window_rig(script: Vec<Step>) -> (Rig, vm_memory::GuestMemoryMmap) {
    use vm_memory::{GuestAddress, GuestMemoryMmap};
    let mut vcpu = FakeVcpu::new(script);
    vcpu.window_assist = kvm::probe::WindowAssist {
        step: true,
        iret_breakpoint: true,
    };
    vcpu.regs.rflags = 0x2;
    vcpu.sregs.cs.l = 1;
    let mut rig = Rig::with_vcpu(vcpu);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    rig.cpu.set_guest_memory(mem.clone());
    rig.intc.lock().unwrap().pending.push_back(0x40);
    (rig, mem)
}

/// The step flag and the first breakpoint the last entry gave KVM.
fn entry_debug(rig: &Rig) -> (bool, Option<u64>) {
    use kvm_bindings::{KVM_GUESTDBG_SINGLESTEP as SS, KVM_GUESTDBG_USE_HW_BP as HW};
    let d = rig.cpu.vcpu().guest_debug;
    (
        d.control & SS != 0,
        (d.control & HW != 0 && d.arch.debugreg[7] & 1 != 0).then_some(d.arch.debugreg[0]),
    )
}

#[test]
fn without_window_exits_cpl0_code_is_stepped_to_the_window() {
    use vm_memory::{Bytes, GuestAddress};
    let step = || debug_exit(1, 0, 1 << 14);
    let (mut rig, mem) = window_rig(vec![
        Step::new(100, step()),
        Step::new(100, step()),
        Step::new(100, step()),
        Step::new(100, VmExit::Hlt),
    ]);
    // A nop, then an iretq (the fake moves RIP one byte per exit) whose
    // frame returns to 0x1234.
    mem.write_slice(&[0x90, 0x48, 0xcf], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_obj(0x1234u64, GuestAddress(0x8_0000)).unwrap();
    // Window steps are no one's stops (a debugger's step would be).
    assert!(matches!(rig.tick(None), TickOutcome::Next(_)));
    assert_eq!(entry_debug(&rig), (true, None), "IF clear: steps");
    assert!(rig.cpu.vcpu().record().injected.is_empty());
    assert!(matches!(rig.tick(None), TickOutcome::Next(_)));
    assert_eq!(
        entry_debug(&rig),
        (true, Some(0x1234)),
        "an iret: a breakpoint on its return address"
    );
    // The guest set IF: the interrupt goes in, stepping ends.
    rig.cpu.vcpu_mut().regs.rflags = 0x202;
    rig.tick(None);
    assert_eq!(entry_debug(&rig), (false, None));
    assert_eq!(rig.cpu.vcpu().record().taken, vec![0x40]);
    rig.run(None, 10);
    assert_eq!(rig.stat("system.cpu.irqWindowSteps"), 2.0);
}

#[test]
fn an_nmi_during_the_nmi_handler_waits_for_its_iret() {
    // eventinj's "NMI that will fault on IRET": the handler sends itself an
    // NMI. Given to KVM, it would be held until the handler's `iret`, which
    // a host without window exits runs past (and a delivery inside a
    // stepped run would push the step's TF into the NMI's frame). It waits
    // in the controller instead while the handler is stepped to its `iret`
    // (a breakpoint on the return address), and goes in after it.
    use vm_memory::{Bytes, GuestAddress};
    let step = || debug_exit(1, 0, 1 << 14);
    let (mut rig, mem) = window_rig(vec![
        Step::new(100, step()),
        Step::new(100, step()),
        Step::new(100, step()),
        Step::new(100, VmExit::Hlt),
    ]);
    rig.intc.lock().unwrap().pending.clear();
    // apic.flat's "pending nmi": the handler sent itself several; one is
    // latched, the others merge into it.
    rig.intc.lock().unwrap().nmis = 2;
    rig.cpu.vcpu_mut().set_in_nmi_handler(true);
    // A nop, then an iretq returning to 0x1234.
    mem.write_slice(&[0x90, 0x48, 0xcf], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_obj(0x1234u64, GuestAddress(0x8_0000)).unwrap();
    rig.tick(None);
    assert_eq!(rig.cpu.vcpu().record().nmis, 0, "not given to KVM");
    assert_eq!(rig.intc.lock().unwrap().nmis, 1, "merged");
    assert_eq!(entry_debug(&rig), (true, None), "the handler steps");
    rig.tick(None);
    assert_eq!(entry_debug(&rig), (true, Some(0x1234)), "its iret");
    // The iret ran: the NMI goes in at an entry that does not step.
    rig.cpu.vcpu_mut().set_in_nmi_handler(false);
    rig.tick(None);
    assert_eq!(rig.cpu.vcpu().record().nmis, 1);
    assert!(!rig.cpu.vcpu().nmi_held());
    assert_eq!(entry_debug(&rig), (false, None));
    rig.run(None, 10);
    assert_eq!(rig.stat("system.cpu.irqWindowSteps"), 2.0);

    // Outside a handler an NMI goes in at once, one per entry: nothing
    // steps.
    let (mut rig, _mem) = window_rig(vec![Step::new(100, VmExit::Hlt)]);
    rig.intc.lock().unwrap().pending.clear();
    rig.intc.lock().unwrap().nmis = 2;
    rig.tick(None);
    assert_eq!(rig.cpu.vcpu().record().nmis, 1);
    assert_eq!(entry_debug(&rig), (false, None));
}

#[test]
fn window_steps_leave_hlt_and_cpl3_alone() {
    use vm_memory::{Bytes, GuestAddress};
    let (mut rig, mem) = window_rig(vec![Step::new(100, VmExit::Hlt)]);
    mem.write_slice(&[0xf4], GuestAddress(0x10_0000)).unwrap();
    rig.tick(None);
    assert_eq!(entry_debug(&rig), (false, None), "hlt is left to KVM");
    let (mut rig, _mem) = window_rig(vec![Step::new(100, VmExit::Hlt)]);
    rig.cpu.vcpu_mut().sregs.cs.dpl = 3;
    rig.tick(None);
    assert_eq!(entry_debug(&rig), (false, None), "CPL3 is not stepped");
    // A host with window exits needs no steps.
    let (mut rig, _mem) = window_rig(vec![Step::new(100, VmExit::Hlt)]);
    rig.cpu.vcpu_mut().window_assist = kvm::probe::WindowAssist::default();
    rig.cpu.startup_thread().unwrap();
    rig.tick(None);
    assert_eq!(entry_debug(&rig), (false, None));
    assert!(rig.cpu.vcpu().window_requested());
}
