//! `kvmsim bench kick`: what one forced exit costs inside kvmsim, next to a
//! bare kvm-ioctls loop that does the same work, measured in one run.
//!
//! Both run the built-in `ticks` guest (ring-3 compute loop, a timer
//! interrupt every period). kvmsim runs it as usual. The bare loop uses the
//! same VM setup and the same signal plumbing (POSIX timer on the thread,
//! kick signal unblocked only inside KVM_RUN) but no event queue, devices,
//! state machine or statistics: arm the timer for one period, KVM_RUN, on
//! the signal exit inject vector 0x40 (or request a window), repeat; its
//! port and MMIO exits are acknowledged with zeros. The cost of a forced
//! exit is (wall time - native loop time) / forced exits.

use std::time::Instant;

use kvm::arch::x86_64::{boot, X86_64};
use kvm::arch::Arch;
use kvm::timer::{KickHandle, ThreadSignals, TimerKind};
use kvm::KvmVm;
use kvm_ioctls::VcpuExit;
use mem::{GuestRam, MemoryMap};
use platform::{Config, OutDir, System};

const VECTOR: u8 = 0x40;

struct Sample {
    wall: f64,
    exits: u64,
}

fn kvmsim_run(period_us: u64, iterations: u64) -> Result<Sample, String> {
    let dir = std::env::temp_dir().join(format!("kvmsim-bench-kick-{}", std::process::id()));
    let mut cfg = Config::for_kernel("builtin:ticks");
    let sc = &mut cfg.system[0];
    sc.args = vec![period_us * 1000, iterations];
    sc.serial.stdout = false;
    sc.serial.stdin = false;
    sc.cpu.timer = "posix".into();
    let t = Instant::now();
    let out = OutDir::create(&dir).map_err(|e| e.to_string())?;
    let mut sys = System::build(&mut cfg, out).map_err(|e| e.to_string())?;
    let exit = sys.run().map_err(|e| e.to_string())?;
    let wall = t.elapsed().as_secs_f64();
    sys.finish(&exit, 0).map_err(|e| e.to_string())?;
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("stats.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    let exits = stats[0]["stats"]["system.cpu.numExitSignal"]
        .as_u64()
        .unwrap_or(0);
    Ok(Sample { wall, exits })
}

fn bare_run(period_us: u64, iterations: u64) -> Result<Sample, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let t = Instant::now();
    let ram =
        GuestRam::new(MemoryMap::for_size(64 << 20).map_err(|x| e(&x))?).map_err(|x| e(&x))?;
    let image = guests::builtin("ticks").ok_or("no ticks guest")?;
    let info = platform::loader::inspect(image, "ticks").map_err(|x| e(&x))?;
    let entry = platform::loader::load(&ram, image, &info, "ticks").map_err(|x| e(&x))?;
    let mut vm = KvmVm::new().map_err(|x| e(&x))?;
    vm.map_ram(&ram).map_err(|x| e(&x))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|x| e(&x))?;
    let mut arch = X86_64::new();
    boot::write_boot_structures(ram.memory()).map_err(|x| e(&x))?;
    boot::enter_long_mode(
        &mut arch,
        &mut vcpu,
        entry,
        boot::DEFAULT_STACK_TOP,
        &[period_us * 1000, iterations],
    )
    .map_err(|x| e(&x))?;
    arch.update_kvm_state(&mut vcpu).map_err(|x| e(&x))?;
    let vcpu = vcpu.fd_mut();
    let signals =
        ThreadSignals::setup(vcpu, TimerKind::Posix, &KickHandle::default()).map_err(|x| e(&x))?;
    let period_ns = period_us * 1000;
    let mut exits = 0u64;
    let mut pending = false;
    loop {
        if pending {
            let run = vcpu.get_kvm_run();
            if run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
                run.request_interrupt_window = 0;
                kvm::sys::interrupt(vcpu, VECTOR).map_err(|x| e(&x))?;
                pending = false;
            } else {
                run.request_interrupt_window = 1;
            }
        }
        signals.arm_timer_ns(period_ns).map_err(|x| e(&x))?;
        let r = vcpu.run();
        let done = match r {
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0);
                addr >= 0xffff_0000
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                data.fill(0x20); // LSR: transmitter empty
                false
            }
            Ok(VcpuExit::IoOut(..) | VcpuExit::MmioWrite(..) | VcpuExit::IrqWindowOpen) => false,
            Ok(other) => return Err(format!("bare loop: unexpected exit {other:?}")),
            Err(err) if err.errno() == libc::EINTR => {
                exits += 1;
                pending = true;
                false
            }
            Err(err) => return Err(format!("bare loop: KVM_RUN failed: {err}")),
        };
        signals.disarm_timer().map_err(|x| e(&x))?;
        kvm::sys::discard_pending(kvm::timer::kick_signal());
        if done {
            break;
        }
    }
    Ok(Sample {
        wall: t.elapsed().as_secs_f64(),
        exits,
    })
}

/// Runs the comparison and prints it.
pub fn kick(period_us: u64, iterations: u64, runs: u32) -> Result<(), String> {
    let runs = runs.max(1);
    let mut native = f64::INFINITY;
    let mut best_sim: Option<(f64, Sample)> = None;
    let mut best_bare: Option<(f64, Sample)> = None;
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(guests::compute_loop_native(std::hint::black_box(
            iterations,
        )));
        native = native.min(t.elapsed().as_secs_f64());
        for (slot, s) in [
            (&mut best_sim, kvmsim_run(period_us, iterations)?),
            (&mut best_bare, bare_run(period_us, iterations)?),
        ] {
            let per_exit = (s.wall - native).max(0.0) / s.exits.max(1) as f64;
            if slot.as_ref().is_none_or(|(p, _)| per_exit < *p) {
                *slot = Some((per_exit, s));
            }
        }
    }
    let (sim_cost, sim) = best_sim.ok_or("no kvmsim sample")?;
    let (bare_cost, bare) = best_bare.ok_or("no bare sample")?;
    println!("forced exits (timer kick + interrupt injection), period {period_us} us, {iterations} iterations, best of {runs}:");
    println!("  native loop:            {native:.3} s");
    println!(
        "  bare kvm-ioctls loop:   {:.3} s, {} exits, {:.1} us per exit",
        bare.wall,
        bare.exits,
        bare_cost * 1e6
    );
    println!(
        "  kvmsim:                 {:.3} s, {} exits, {:.1} us per exit",
        sim.wall,
        sim.exits,
        sim_cost * 1e6
    );
    println!(
        "  ratio kvmsim/bare per exit: {:.2}",
        sim_cost / bare_cost.max(1e-12)
    );
    Ok(())
}

/// Wall time of one run of `systems` independent `compute` systems.
fn compute_systems_wall(systems: usize, iterations: u64) -> Result<f64, String> {
    // The default quantum (no links: 10 ms), as a user gets it.
    let mut text = String::new();
    for _ in 0..systems {
        text.push_str(&format!(
            "[[system]]\nmemory = \"32MiB\"\nkernel = \"builtin:compute\"\nargs = [{iterations}]\n\
             [system.serial]\nstdout = false\nstdin = false\n[system.cpu]\ntimer = \"posix\"\n"
        ));
    }
    let mut cfg = Config::parse(&text, std::path::Path::new("bench")).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("kvmsim-bench-par-{}", std::process::id()));
    let t = Instant::now();
    let out = OutDir::create(&dir).map_err(|e| e.to_string())?;
    let mut s = platform::Simulation::build(&mut cfg, out).map_err(|e| e.to_string())?;
    let exits = s.run().map_err(|e| e.to_string())?;
    let wall = t.elapsed().as_secs_f64();
    if let Some(e) = exits.iter().find(|e| e.cause != sim::ExitCause::GuestExit) {
        return Err(format!("a compute system did not exit cleanly: {e:?}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(wall)
}

/// Aggregate guest throughput of 2 independent systems against 1.
pub fn parallel(iterations: u64, runs: u32) -> Result<(), String> {
    let runs = runs.max(1);
    let (mut one, mut two) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..runs {
        one = one.min(compute_systems_wall(1, iterations)?);
        two = two.min(compute_systems_wall(2, iterations)?);
    }
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "aggregate guest throughput, compute loop of {iterations} iterations per system, best of {runs}, \
         {host_cpus} host CPUs, quantum {} ms:",
        platform::config::DEFAULT_QUANTUM / sim::tick::TICKS_PER_MS
    );
    println!(
        "  1 system:   {one:.3} s  ({:.0} M iterations/s)",
        iterations as f64 / one / 1e6
    );
    println!(
        "  2 systems:  {two:.3} s  ({:.0} M iterations/s)",
        2.0 * iterations as f64 / two / 1e6
    );
    println!(
        "  ratio 2 systems / 1 system: {:.2} (goal: at least 1.8)",
        2.0 * one / two
    );
    Ok(())
}
