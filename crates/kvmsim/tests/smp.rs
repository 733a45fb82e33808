//! The bare-metal SMP guests (`smpboot`, `ipipong`) on real /dev/kvm: AP
//! bring-up with INIT-SIPI-SIPI, ring-3 work on every CPU, and IPI round
//! trips in simulated time.

mod common;

use common::*;

/// One CPU's report line of `smpboot`: (APIC ID, CPU index, result).
fn cpu_lines(serial: &str) -> Vec<(u64, u64, u64)> {
    serial
        .lines()
        .filter(|l| l.starts_with("smpboot: apic=") && !l.contains("apic=none"))
        .map(|l| (field(l, "apic"), field(l, "cpu"), field(l, "result")))
        .collect()
}

/// Runs `smpboot` for `n` CPUs on a system of `cpus` CPUs.
fn smpboot(test: &str, platform: &str, cpus: u32, n: u64, iterations: u64, wait_ms: u64) -> Run {
    let cpus_line = if cpus > 1 {
        format!("cpus = {cpus}\n")
    } else {
        String::new()
    };
    let (dir, cfg) = config(
        test,
        &format!(
            "[sim]\nmax_time = \"60s\"\n\
             [system]\nplatform = \"{platform}\"\nmemory = \"64MiB\"\n{cpus_line}\
             kernel = \"builtin:smpboot\"\nargs = [{n}, {iterations}, {wait_ms}]\n\
             [system.serial]\nstdout = false\n"
        ),
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    r
}

/// Every CPU 0..n-1 reported once, with the right result, and the summary
/// says so.
fn check_all_started(r: &Run, n: u64, iterations: u64) {
    assert_eq!(r.status, 0, "stderr:\n{}", r.stderr);
    let serial = r.file("serial.log");
    let want = guests::compute_loop_reference(iterations);
    let mut lines = cpu_lines(&serial);
    lines.sort();
    let apics: Vec<u64> = lines.iter().map(|l| l.0).collect();
    assert_eq!(apics, (0..n).collect::<Vec<_>>(), "{serial}");
    let mut indexes: Vec<u64> = lines.iter().map(|l| l.1).collect();
    indexes.sort();
    assert_eq!(indexes, (0..n).collect::<Vec<_>>(), "{serial}");
    assert_eq!(lines[0].1, 0, "the BSP is CPU 0 and APIC 0: {serial}");
    for l in &lines {
        assert_eq!(l.2, want, "{serial}");
    }
    assert!(
        serial.contains(&format!(
            "smpboot: {n} of {n} CPUs started iterations={iterations} "
        )),
        "{serial}"
    );
    assert!(!serial.contains("never reported"), "{serial}");
    assert!(!serial.contains("platform error"), "{serial}");
    assert_eq!(r.json("exit.json")["cause"], "guest_exit");
    // Each AP got INIT, SIPI, SIPI and sent one wake-up to the BSP.
    for cpu in 1..n {
        assert_eq!(
            r.stat(&format!("system.cpu{cpu}.numIpisReceived")),
            3,
            "cpu{cpu}"
        );
    }
    // The BSP gets at most one wake-up per AP. It may end the run when
    // the last report lands, before that AP's wake-up is sent: a host that
    // preempts the AP between the two stretches the gap in simulated time
    // (its time inside KVM counts as the guest's).
    let woken = r.stat("system.cpu0.numIpisReceived").as_u64().unwrap();
    assert!(woken < n, "{woken} wake-ups from {} APs", n - 1);
    // Every CPU's thread counts every window it ran: all the same number,
    // and no more than the simulated time holds windows of the default SMP
    // quantum (100 us; empty ones are skipped).
    let windows = r.stat("system.cpu0.numWindows").as_u64().unwrap();
    assert!(windows > 0, "no window counted");
    for cpu in 1..n {
        assert_eq!(
            r.stat(&format!("system.cpu{cpu}.numWindows")),
            windows,
            "cpu{cpu}"
        );
    }
    let sim = r.json("exit.json")["sim_seconds"].as_f64().unwrap();
    assert!(
        windows as f64 <= sim / 100e-6 + 2.0,
        "{windows} windows in {sim} s"
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn smpboot_alone_needs_no_apic() {
    if !kvm_or_skip("smpboot_alone") {
        return;
    }
    // One CPU on the bare platform: no local APIC there, and none needed.
    let r = smpboot("smpboot-alone", "bare", 1, 1, 100_000, 1000);
    assert_eq!(r.status, 0, "stderr:\n{}", r.stderr);
    let serial = r.file("serial.log");
    let want = guests::compute_loop_reference(100_000);
    assert!(
        serial.contains(&format!("smpboot: apic=none cpu=0 result=0x{want:016x} ")),
        "{serial}"
    );
    assert!(serial.contains("smpboot: 1 of 1 CPUs started"), "{serial}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn smpboot_names_the_aps_that_never_reported() {
    if !kvm_or_skip("smpboot_missing") {
        return;
    }
    // The PC has a local APIC even with one CPU: the BSP sends INIT and
    // SIPI to APIC 1 and 2, which do not exist, waits 200 ms of simulated
    // time and fails naming them.
    let r = smpboot("smpboot-missing", "pc", 1, 3, 100_000, 200);
    assert_eq!(r.status, 1, "stderr:\n{}", r.stderr);
    let serial = r.file("serial.log");
    assert!(
        serial.contains("smpboot: never reported: apic=1 apic=2\n"),
        "{serial}"
    );
    assert!(serial.contains("smpboot: 1 of 3 CPUs started"), "{serial}");
    assert_eq!(cpu_lines(&serial).len(), 1, "{serial}");
    // The wait is bounded in simulated time, from the BSP's start.
    let elapsed = field(
        serial.lines().find(|l| l.contains("CPUs started")).unwrap(),
        "elapsed_ns",
    );
    assert!(elapsed >= 200_000_000, "{serial}");
    let exit = r.json("exit.json");
    assert_eq!(exit["cause"], "guest_exit");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn ipipong_needs_a_second_cpu() {
    if !kvm_or_skip("ipipong_alone") {
        return;
    }
    let (dir, cfg) = config(
        "ipipong-alone",
        "[system]\nplatform = \"pc\"\nmemory = \"64MiB\"\nkernel = \"builtin:ipipong\"\n\
         args = [0, 10, 50]\n[system.serial]\nstdout = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    assert_eq!(r.status, 1, "stderr:\n{}", r.stderr);
    assert_eq!(
        r.file("serial.log"),
        "ipipong: APIC 1 never started (it needs [system] cpus = 2 or more)\n"
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn smpboot_starts_every_ap_of_2_and_of_8_cpus() {
    if !kvm_or_skip("smpboot_cpus") {
        return;
    }
    // 8 CPUs on a 2-core host: the APs take turns, which costs host time,
    // not correctness.
    for n in [2u32, 8] {
        let r = smpboot(
            &format!("smpboot-{n}"),
            "bare",
            n,
            n.into(),
            2_000_000,
            10_000,
        );
        check_all_started(&r, n.into(), 2_000_000);
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn smpboot_starts_the_aps_on_the_pc_too() {
    if !kvm_or_skip("smpboot_pc") {
        return;
    }
    let r = smpboot("smpboot-pc", "pc", 2, 2, 1_000_000, 10_000);
    check_all_started(&r, 2, 1_000_000);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn smpboot_names_the_ap_a_smaller_system_lacks() {
    if !kvm_or_skip("smpboot_lacks") {
        return;
    }
    // Three CPUs asked of a two-CPU system: APIC 2 does not exist.
    let r = smpboot("smpboot-lacks", "bare", 2, 3, 100_000, 200);
    assert_eq!(r.status, 1, "stderr:\n{}", r.stderr);
    let serial = r.file("serial.log");
    assert!(
        serial.contains("smpboot: never reported: apic=2\n"),
        "{serial}"
    );
    assert!(serial.contains("smpboot: 2 of 3 CPUs started"), "{serial}");
    let mut apics: Vec<u64> = cpu_lines(&serial).iter().map(|l| l.0).collect();
    apics.sort();
    assert_eq!(apics, [0, 1], "{serial}");
}

/// Runs `ipipong` for `rounds` round trips with IPIs taking `latency_ns`;
/// returns its report line.
fn ipipong(test: &str, latency_ns: u64, rounds: u64) -> String {
    // The quantum is below the latency, so every IPI arrives exactly
    // `latency` after it was sent; a small host factor keeps the guest's
    // own (host-timed) execution a small part of the round trip.
    let (dir, cfg) = config(
        test,
        &format!(
            "[sim]\nmax_time = \"60s\"\nquantum = \"10us\"\n\
             [system]\nmemory = \"64MiB\"\ncpus = 2\nipi_latency = \"{latency_ns}ns\"\n\
             kernel = \"builtin:ipipong\"\nargs = [0, {rounds}]\n\
             [system.cpu]\nhost_factor = 0.01\n[system.serial]\nstdout = false\n"
        ),
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    assert_eq!(r.status, 0, "stderr:\n{}", r.stderr);
    let line = r.file("serial.log");
    assert_eq!(field(&line, "rounds"), rounds, "{line}");
    // Two IPIs per round trip, each sent by one CPU and received by the other.
    assert_eq!(r.stat("system.cpu1.numIpisReceived"), rounds + 3, "{line}");
    assert_eq!(r.stat("system.cpu0.numIpisReceived"), rounds + 1, "{line}");
    line
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn ipi_round_trip_grows_by_twice_the_latency() {
    if !kvm_or_skip("ipipong") {
        return;
    }
    let rounds = 100;
    let (short, long) = (20_000u64, 50_000u64);
    let a = ipipong("ipipong-short", short, rounds);
    let b = ipipong("ipipong-long", long, rounds);
    for (line, lat) in [(&a, short), (&b, long)] {
        // No round trip can beat two IPI latencies.
        assert!(field(line, "min_ns") >= 2 * lat, "{line}");
        assert_eq!(
            field(line, "mean_ns"),
            field(line, "total_ns") / rounds,
            "{line}"
        );
    }
    // What the two runs share (the guest's work, device latencies) cancels
    // out: the mean grows by two latency differences, up to what host
    // jitter adds to the guest's execution (x host_factor 0.01).
    let grew = field(&b, "mean_ns") as f64 - field(&a, "mean_ns") as f64;
    let want = 2.0 * (long - short) as f64;
    assert!(
        (grew - want).abs() <= 0.1 * want,
        "mean grew by {grew} ns, expected {want}:\n{a}{b}"
    );
}

/// Drains with several CPUs: every CPU finishes what is in flight and
/// stops, the last one counts the drain and resumes them all; the guest
/// runs to the same results as without drains.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn periodic_drains_of_four_cpus_complete_and_change_nothing() {
    if !kvm_or_skip("smp_drains") {
        return;
    }
    let iterations = 2_000_000;
    let (dir, cfg) = config(
        "smp-drains",
        &format!(
            "[sim]\nmax_time = \"60s\"\ndrain_period = \"500us\"\n\
             [system]\nmemory = \"64MiB\"\ncpus = 4\n\
             kernel = \"builtin:smpboot\"\nargs = [4, {iterations}, 10000]\n\
             [system.serial]\nstdout = false\n"
        ),
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    check_all_started(&r, 4, iterations);
    let sim = r.json("exit.json")["sim_seconds"].as_f64().unwrap();
    let drains = r.stat("system.numDrains").as_u64().unwrap();
    // One drain per period, each completed (a drain still under way at the
    // end is the only one missing; one due at the exit's tick may count).
    let periods = (sim / 500e-6) as u64;
    assert!(
        drains + 1 >= periods && drains <= periods + 1,
        "{drains} drains in {periods} periods"
    );
}

/// A run whose windows are short against what a window end costs on
/// this host (kvmsim doctor: "cost of a forced exit") says so and names a
/// quantum that fits; one with long windows does not.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_quantum_too_short_for_this_host_is_named() {
    if !kvm_or_skip("smp_quantum_warning") {
        return;
    }
    let cost = kvm::probe::forced_exit_cost_cached().expect("the forced-exit probe ran");
    let run = |quantum: &str| {
        let (dir, cfg) = config(
            &format!("smp-quantum-{quantum}"),
            &format!(
                "[sim]\nmax_time = \"10s\"\nquantum = \"{quantum}\"\n[system]\n\
                 kernel = \"builtin:smpboot\"\ncpus = 2\nargs = [2, 100000, 10000]\n\
                 [system.serial]\nstdout = false\n"
            ),
        );
        let r = kvmsim(&["run", &cfg], &dir.join("out"));
        r.no_panic();
        assert_eq!(r.status, 0, "stderr:\n{}", r.stderr);
        r
    };
    // Any host's forced exit costs more than 2 us (a signal, an exit, an
    // entry): 20% or more of a 10 us window.
    if cost.loss_ns > 2_000 {
        let r = run("10us");
        assert!(
            r.stderr
                .contains("sim.quantum 10us: each window end costs about"),
            "{}",
            r.stderr
        );
    }
    // No host's costs 100 ms.
    let r = run("1s");
    assert!(!r.stderr.contains("each window end costs"), "{}", r.stderr);
}

/// max_insts with several CPUs: each CPU counts its own instructions (by
/// single-stepping where there is no PMU) and the first to reach the limit
/// ends the run, named; where the host cannot step the guest's user mode,
/// the run says so instead (and names the CPU).
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn max_insts_stops_at_the_first_cpu_to_reach_it() {
    if !kvm_or_skip("smp_max_insts") {
        return;
    }
    let (dir, cfg) = config(
        "smp-max-insts",
        "[sim]\nmax_time = \"10s\"\n[system]\nkernel = \"builtin:smpboot\"\ncpus = 2\n\
         args = [2, 1000, 10000]\n[system.cpu]\nmax_insts = 300\n[system.serial]\nstdout = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    let exit = r.json("exit.json");
    let (cause, message) = (&exit["cause"], exit["message"].as_str().unwrap_or(""));
    let total = r.stat("system.totalNumInsts");
    if cause == "max_insts" {
        assert!(
            message.contains("system.cpu0 stopped after 300 guest instructions"),
            "{message}"
        );
        assert_eq!(r.stat("system.cpu0.numInsts"), 300);
        assert_eq!(
            total,
            300 + r.stat("system.cpu1.numInsts").as_u64().unwrap()
        );
    } else {
        // The BSP reaches ring 3 before 300 instructions only if its APIC
        // set-up is shorter; on a host that cannot step CPL3 the run ends
        // as unsupported and names the CPU that got there.
        assert_eq!(cause, "unsupported", "{exit}");
        assert!(message.starts_with("system.cpu"), "{message}");
        assert!(total.as_u64().unwrap() > 0);
    }
}
