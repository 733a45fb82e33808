//! Several simulated systems in one process: parallel queues in lock-step
//! windows, links between systems, per-system stats, logs and exits.

mod common;

use common::*;

fn compute_systems(n: usize, iterations: u64) -> String {
    let mut t = String::from("[sim]\nquantum = \"1ms\"\n");
    for _ in 0..n {
        t.push_str(&format!(
            "[[system]]\nmemory = \"32MiB\"\nkernel = \"builtin:compute\"\nargs = [{iterations}]\n\
             [system.serial]\nstdout = false\n"
        ));
    }
    t
}

fn check_compute_systems(n: usize) {
    if !kvm_or_skip(&format!("compute_x{n}")) {
        return;
    }
    let iterations = 40_000_000;
    let (dir, cfg) = config(&format!("compute-x{n}"), &compute_systems(n, iterations));
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let want = format!(
        "compute: iterations={iterations} result=0x{:016x}\n",
        guests::compute_loop_reference(iterations)
    );
    let stats = r.file("stats.txt");
    for i in 0..n {
        assert_eq!(r.file(&format!("serial.system{i}.log")), want);
        // Each system has its own counters in the one stats.txt.
        assert!(
            stats.contains(&format!("system{i}.cpu.numVMExits ")),
            "system{i}"
        );
        // The lock-step windows (1 ms) force exits on every system: a
        // CPU never runs past a window's end. (On a loaded host some
        // windows end without a forced exit of their own: 48 in 51 were
        // seen at load average 15.)
        let sim = r.json("exit.json")["systems"][i]["sim_seconds"]
            .as_f64()
            .unwrap();
        let signals = r
            .stat(&format!("system{i}.cpu.numExitSignal"))
            .as_u64()
            .unwrap();
        let windows = (sim / 1e-3) as u64;
        assert!(
            signals * 4 >= windows * 3 && signals <= windows + windows / 5 + 5,
            "system{i}: {signals} forced exits in {windows} windows"
        );
    }
    assert!(!stats.contains(&format!("system{n}.")));
    assert_eq!(r.json("exit.json")["systems"].as_array().unwrap().len(), n);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn two_compute_systems() {
    check_compute_systems(2);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn four_compute_systems() {
    check_compute_systems(4);
}

fn pingpong(test: &str, host_factor: f64) -> (Run, u64, u64, u64) {
    let text = std::fs::read_to_string(repo().join("examples/pingpong.toml"))
        .unwrap()
        .replace(
            "kernel = \"builtin:pingpong\"",
            &format!("kernel = \"builtin:pingpong\"\ncpu = {{ host_factor = {host_factor:?} }}\nserial = {{ stdout = false }}"),
        );
    let (dir, cfg) = config(test, &text);
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let init = r.file("serial.system0.log");
    let resp = r.file("serial.system1.log");
    assert_eq!(field(&init, "n"), 100);
    assert_eq!(field(&resp, "n"), 100);
    let latency = field(&init, "latency_ns");
    (
        r,
        field(&init, "rtt_sum_ns"),
        field(&resp, "proc_sum_ns"),
        latency,
    )
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn pingpong_example_round_trips_are_twice_the_latency_plus_processing() {
    if !kvm_or_skip("pingpong") {
        return;
    }
    let (r, rtt, proc, latency) = pingpong("pingpong", 1.0);
    assert_eq!(latency, 100_000);
    // Every round trip: two link crossings, the responder's processing, and
    // the guests' own work around them (never less).
    assert!(rtt >= 100 * 2 * latency + proc, "rtt {rtt}, proc {proc}");
    assert_eq!(r.stat("system0.link0.sent"), 100);
    assert_eq!(r.stat("system1.link0.received"), 100);
    assert_eq!(r.stat("system1.link0.sent"), 100);
    assert_eq!(r.stat("system0.link0.received"), 100);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn pingpong_times_are_exact_and_repeatable_when_host_time_does_not_count() {
    if !kvm_or_skip("pingpong_exact") {
        return;
    }
    // With a tiny host_factor, time inside KVM adds almost nothing: what is
    // left is the link latency and the devices' access latencies, which are
    // deterministic.
    let factor = 1e-6;
    let (r1, rtt1, proc1, latency) = pingpong("pingpong-exact-1", factor);
    let (r2, rtt2, proc2, _) = pingpong("pingpong-exact-2", factor);
    // What host time can still add, in ns: each system's time inside KVM
    // (however long a busy host made it) times the factor.
    let host_ns = |r: &Run| {
        (0..2)
            .map(|i| r.statf(&format!("system{i}.cpu.kvmHostSeconds")))
            .sum::<f64>()
            * factor
            * 1e9
    };
    let slack = host_ns(&r1).max(host_ns(&r2)).ceil() as u64;
    let two_l = 100 * 2 * latency;
    // The rest per round trip: a few 100 ns device accesses on each side.
    assert!(
        rtt1 >= two_l + proc1 && rtt1 < two_l + proc1 + 100 * 2_000 + slack,
        "rtt {rtt1}, host time adds up to {slack} ns"
    );
    assert!(
        rtt1.abs_diff(rtt2) < 1_000 + slack,
        "runs differ: {rtt1} vs {rtt2} (host time adds up to {slack} ns)"
    );
    assert!(
        proc1.abs_diff(proc2) < 1_000 + slack,
        "runs differ: {proc1} vs {proc2} (host time adds up to {slack} ns)"
    );
    for i in 0..2 {
        let t1 = r1.json("exit.json")["systems"][i]["tick"].as_u64().unwrap();
        let t2 = r2.json("exit.json")["systems"][i]["tick"].as_u64().unwrap();
        assert!(
            t1.abs_diff(t2) < 1_000_000 + slack * 1000,
            "system{i} exit ticks {t1} vs {t2} (host time adds up to {slack} ns)"
        );
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn each_cpu_gets_its_own_timer_exits() {
    if !kvm_or_skip("own_quanta") {
        return;
    }
    // Timer periods far above what any host needs per run, so that a busy
    // host still makes progress.
    let (dir, cfg) = config(
        "own-quanta",
        "[sim]\nquantum = \"1ms\"\n\
         [[system]]\nkernel = \"builtin:ticks\"\nargs = [500000, 30000000]\nserial = { stdout = false }\n\
         [[system]]\nkernel = \"builtin:ticks\"\nargs = [2000000, 30000000]\nserial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    for i in 0..2 {
        let line = r.file(&format!("serial.system{i}.log"));
        let count = field(&line, "count");
        let signals = r
            .stat(&format!("system{i}.cpu.numExitSignal"))
            .as_u64()
            .unwrap();
        // Ring 3 runs until a forced exit: each system's own timer (or its
        // windows' ends) reached its thread, and neither starved: both
        // took their timer's interrupts and finished with the right result.
        assert!(
            signals >= 1,
            "system{i}: {signals} forced exits, {count} periods"
        );
        assert!(field(&line, "interrupts") >= 1, "{line}");
        assert_eq!(
            field(&line, "result"),
            guests::compute_loop_reference(30_000_000)
        );
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn the_status_says_which_system_failed() {
    if !kvm_or_skip("which_failed") {
        return;
    }
    let (dir, cfg) = config(
        "which-failed",
        "[[system]]\nkernel = \"builtin:hello\"\nserial = { stdout = false }\n\
         [[system]]\nkernel = \"builtin:fault\"\nserial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    assert_eq!(r.status, 252, "stderr:\n{}", r.stderr);
    assert!(
        r.stderr.contains("status 252 comes from system1"),
        "{}",
        r.stderr
    );
    let exit = r.json("exit.json");
    assert_eq!(exit["system"], "system1");
    assert_eq!(exit["systems"][0]["cause"], "guest_exit");
    assert_eq!(exit["systems"][1]["cause"], "guest_fault");
    assert_eq!(r.file("serial.system0.log"), "Hello from the guest\n");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn stop_on_fault_ends_the_whole_run() {
    if !kvm_or_skip("stop_on_fault") {
        return;
    }
    let (dir, cfg) = config(
        "stop-on-fault",
        "[sim]\nstop_on_fault = true\n\
         [[system]]\nkernel = \"builtin:sleep\"\nargs = [1000000000, 1000]\nserial = { stdout = false }\n\
         [[system]]\nkernel = \"builtin:fault\"\nserial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    assert_eq!(r.status, 252, "stderr:\n{}", r.stderr);
    let exit = r.json("exit.json");
    assert_eq!(exit["systems"][0]["cause"], "stopped");
    // The sleeper (1000 s of simulated time) was stopped early.
    assert!(exit["systems"][0]["sim_seconds"].as_f64().unwrap() < 1.0);
}

/// Several CPUs in one system: CPU 0 runs the guest, the others wait for a
/// startup IPI that never comes (their threads meet every window and never
/// enter KVM); each CPU has its own statistics, APIC statistics and sample
/// file; two systems of several CPUs each run side by side.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn cpus_of_a_system_have_their_own_stats_and_aps_wait_for_sipi() {
    if !kvm_or_skip("cpus_wait_for_sipi") {
        return;
    }
    let (dir, cfg) = config(
        "cpus-wait",
        "[sim]\nquantum = \"50us\"\nsample_period = \"200us\"\n\
         [[system]]\nkernel = \"builtin:hello\"\ncpus = 3\n\
         [system.serial]\nstdout = false\n\
         [[system]]\nkernel = \"builtin:hello\"\ncpus = 2\nplatform = \"pc\"\n\
         [system.serial]\nstdout = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    for (sys, cpus) in [("system0", 3), ("system1", 2)] {
        assert!(r
            .file(&format!("serial.{sys}.log"))
            .contains("Hello from the guest"));
        assert_eq!(r.stat(&format!("{sys}.numIpis")).as_u64(), Some(0));
        for i in 0..cpus {
            let exits = r
                .stat(&format!("{sys}.cpu{i}.numVMExits"))
                .as_u64()
                .unwrap();
            if i == 0 {
                assert!(exits > 0, "{sys}.cpu0 ran");
            } else {
                assert_eq!(exits, 0, "{sys}.cpu{i} waits for SIPI");
            }
            assert!(r.stat(&format!("{sys}.cpu{i}.apic.interrupts")).is_u64());
        }
        assert!(r.stat(&format!("{sys}.cpu.numVMExits")).is_null());
        let samples = r.file(&format!("cpu-samples.{sys}.cpu1.txt"));
        assert!(samples.contains("state=Idle"), "{samples}");
    }
}

/// Windows in which nothing can happen are skipped: two systems that
/// sleep 10 simulated seconds between timer interrupts, in windows of 10
/// us, finish after 100 simulated seconds without running ten million
/// empty windows (bounded in host time, which an empty window costs).
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn empty_windows_are_skipped() {
    if !kvm_or_skip("empty_windows") {
        return;
    }
    let mut text = String::from("[sim]\nquantum = \"10us\"\n");
    for _ in 0..2 {
        text.push_str(
            "[[system]]\nkernel = \"builtin:sleep\"\nargs = [10000000000, 10]\n\
             [system.serial]\nstdout = false\n",
        );
    }
    let (dir, cfg) = config("empty-windows", &text);
    let r = kvmsim_bounded(
        &["run", &cfg],
        &dir.join("out"),
        std::time::Duration::from_secs(300),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    for i in 0..2 {
        let sim = r.json("exit.json")["systems"][i]["sim_seconds"]
            .as_f64()
            .unwrap();
        assert!((100.0..101.0).contains(&sim), "system{i}: {sim} s");
        // Forced exits happen only in windows that were run: a handful per
        // interrupt, not one per 10 us window.
        let forced = r
            .stat(&format!("system{i}.cpu.numExitSignal"))
            .as_u64()
            .unwrap();
        assert!(forced < 10_000, "system{i}: {forced} forced exits");
    }
}

#[test]
fn cpus_are_validated() {
    for (text, field, why) in [
        ("cpus = 0", "system.cpus", "must be 1 to 254"),
        ("cpus = 255", "system.cpus", "must be 1 to 254"),
        (
            "cpus = 2\ncoalesced_mmio = [[0xFEB00000, 0x1000]]",
            "system.cpus",
            "coalesced_mmio is not supported yet with more than one CPU",
        ),
        (
            "ipi_latency = \"0ns\"",
            "system.ipi_latency",
            "longer than zero",
        ),
    ] {
        let (dir, cfg) = config(
            "cpus-validated",
            &format!("[system]\nkernel = \"builtin:hello\"\n{text}\n"),
        );
        let r = kvmsim(&["run", &cfg], &dir.join("out"));
        assert_eq!(r.no_panic().status, 254, "{text}: {}", r.stderr);
        assert!(
            r.stderr.contains(field) && r.stderr.contains(why),
            "{text}: {}",
            r.stderr
        );
    }
}
