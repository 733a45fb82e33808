//! The PC platform's interrupt paths on a real vCPU, in simulated time.

mod common;

use common::*;

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn pc_interrupt_paths_tick_in_simulated_time() {
    if !kvm_or_skip("pcirq") {
        return;
    }
    let (dir, cfg) = config(
        "pcirq",
        "[sim]\nmax_time = \"1s\"\n[system]\nkernel = \"builtin:pcirq\"\nplatform = \"pc\"\n\
         serial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let line = r.file("serial.log");
    // Ten 1 ms periods each: PIT through the 8259 pair (virtual wire), PIT
    // through the I/O APIC, and the local APIC timer.
    for key in ["pic_ns", "ioapic_ns", "apic_timer_ns"] {
        let ns = field(&line, key);
        assert!(
            (9_000_000..12_000_000).contains(&ns),
            "{key} = {ns}: {line}"
        );
    }
    assert_eq!(r.stat("system.apic.timerInterrupts"), 10);
    assert_eq!(r.stat("system.ioapic.interrupts"), 10);
    assert_eq!(r.stat("system.cpu.numInterrupts"), 30);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn doctor_reports_every_probe() {
    if !kvm_or_skip("doctor") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["probe"].as_str().unwrap())
        .collect();
    for probe in [
        "kvm",
        "hardware virtualization",
        "native speed at CPL0 and CPL3",
        "hardware PMU",
        "TSC rate",
        "TSC scaling",
        "single-step at CPL0",
        "single-step at CPL3",
        "guest CPUID is KVM's table",
        "emulator: int3",
        "emulator: lock cmpxchg16b",
        "emulator: popcnt",
        "syscall from CPL3 enters CPL0",
        "interrupt-window exit at CPL0",
        "hypercall at CPL0 returns",
    ] {
        assert!(names.contains(&probe), "{probe} missing: {names:?}");
    }
    let find = |n: &str| {
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["probe"] == n)
            .unwrap()
            .clone()
    };
    // Consistency with what the rest of kvmsim measures.
    assert_eq!(find("hardware PMU")["ok"], kvm::perf::pmu_available());
    assert_eq!(
        find("single-step at CPL3")["ok"],
        kvm::probe::single_step_works(3).unwrap()
    );
    // A failing cmpxchg16b probe puts CX16 (bit 141) into the Linux flags.
    let flags: Vec<String> = v["linux_flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    if find("emulator: lock cmpxchg16b")["ok"] == false {
        assert!(
            flags
                .iter()
                .any(|f| f.starts_with("clearcpuid=") && f.contains("141")),
            "{flags:?}"
        );
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn waiting_interrupts_are_taken_at_the_first_open_boundary() {
    if !kvm_or_skip("irqwin") {
        return;
    }
    let (dir, cfg) = config(
        "irqwin",
        "[sim]\nmax_time = \"1s\"\n[system]\nkernel = \"builtin:irqwin\"\nplatform = \"pc\"\n\
         serial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    let line = r.file("serial.log");
    // The guest checks itself (status 0 only if every case held); the
    // line says which case went wrong if one did.
    assert_eq!(r.no_panic().status, 0, "{line}\nstderr:\n{}", r.stderr);
    assert!(
        line.contains("sti=2 order=0x0000000000006160 popf=1 iret=2"),
        "{line}"
    );
    // Where KVM does not exit at the window, kvmsim stepped to find it.
    let assist = kvm::probe::window_assist();
    let steps = r.statf("system.cpu.irqWindowSteps");
    assert_eq!(assist.step, steps > 0.0, "{assist:?}: {steps} window steps");

    // The switch: with stepping off, a host without window exits misses
    // the `sti; nop; cli` and `popf` windows (the guest says which), and
    // nothing is stepped; a host with them still passes.
    let (dir, cfg) = config(
        "irqwin-nostep",
        "[sim]\nmax_time = \"1s\"\n[system]\nkernel = \"builtin:irqwin\"\nplatform = \"pc\"\n\
         serial = { stdout = false }\n[system.cpu]\nirq_window_step = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    let line = r.file("serial.log");
    assert_eq!(r.statf("system.cpu.irqWindowSteps"), 0.0, "{line}");
    if assist.step {
        assert_ne!(r.no_panic().status, 0, "{line}");
        assert!(line.contains("sti=0"), "{line}");
    } else {
        assert_eq!(r.no_panic().status, 0, "{line}\nstderr:\n{}", r.stderr);
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_guest_switches_its_local_apic_to_x2apic_mode() {
    if !kvm_or_skip("x2apic") {
        return;
    }
    let doctor_filter = kvm::KvmVm::new()
        .and_then(|vm| vm.trap_apic_base_writes())
        .unwrap_or(false);
    let (dir, cfg) = config(
        "x2apic",
        "[sim]\nmax_time = \"1s\"\n[system]\nkernel = \"builtin:x2apic\"\nplatform = \"pc\"\n\
         x2apic = true\nserial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    if !doctor_filter {
        // No user-space MSR filter: a configuration error naming the key.
        assert_eq!(r.no_panic().status, 254, "stderr:\n{}", r.stderr);
        assert!(r.stderr.contains("system.x2apic"), "{}", r.stderr);
        return;
    }
    let line = r.file("serial.log");
    // The guest checks itself (status 0 only if every check held).
    assert_eq!(r.no_panic().status, 0, "{line}\nstderr:\n{}", r.stderr);
    assert!(
        line.contains("x2apic: id=0 ldr=1 mmio=0x00000000ffffffff gp=3 selfipi=1 mode=1"),
        "{line}"
    );
    assert_eq!(r.stat("system.apic.interrupts"), 1, "the SELF IPI");
    let used = r.file("config.json");
    assert!(used.contains("\"x2apic\": true"), "{used}");

    // Off (the default): CPUID does not offer x2APIC and the guest says so.
    let (dir, cfg) = config(
        "x2apic-off",
        "[sim]\nmax_time = \"1s\"\n[system]\nkernel = \"builtin:x2apic\"\nplatform = \"pc\"\n\
         serial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_ne!(r.no_panic().status, 0);
    assert!(r.file("serial.log").contains("x2apic: id=0"));
}
