//! The KVM CPU as the reference describes it: simulated time, run timer and
//! signals, interrupts, drain, instruction counts. Real /dev/kvm.

mod common;

use common::*;

/// Runs the `ticks` guest (periodic interrupts while ring 3 computes).
fn ticks(test: &str, timer: &str, period_ns: u64, iterations: u64) -> (Run, String) {
    ticks_nmi(test, timer, period_ns, iterations, false)
}

fn ticks_nmi(test: &str, timer: &str, period_ns: u64, iterations: u64, nmi: bool) -> (Run, String) {
    let nmi = u64::from(nmi);
    let (dir, cfg) = config(
        test,
        &format!(
            "[system]\nkernel = \"builtin:ticks\"\nargs = [{period_ns}, {iterations}, {nmi}]\n\
             [system.cpu]\ntimer = \"{timer}\"\n[system.serial]\nstdout = false\n"
        ),
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    assert_eq!(r.status, 0, "stderr:\n{}", r.stderr);
    let line = r.file("serial.log");
    (r, line)
}

fn check_periodic_interrupts(r: &Run, line: &str, period_ns: u64) {
    check_periodic(r, line, period_ns, false)
}

fn check_periodic(r: &Run, line: &str, period_ns: u64, nmi: bool) {
    let taken = field(line, "interrupts");
    let count = field(line, "count");
    let elapsed = field(line, "elapsed_ns");
    assert_eq!(
        field(line, "result"),
        guests::compute_loop_reference(20_000_000)
    );
    // Interrupts arrive at the rate the timer sets, in simulated time: the
    // guest read COUNT after at least `least_ns` and at most `elapsed_ns`
    // of the timer's running (how much simulated time passes between its
    // clock reads and the COUNT read depends on the host: a vCPU thread
    // preempted in KVM charges that time to the guest)...
    let least = field(line, "least_ns");
    assert!(count >= 20, "too few periods for a meaningful test: {line}");
    assert!(
        count + 1 >= least / period_ns && count <= elapsed / period_ns + 1,
        "{line}"
    );
    // ...the device raises one per period: as many as the guest counted,
    // plus those that ended between its COUNT read and its stop (two MMIO
    // exits later). How many that is depends on the host (a vCPU thread
    // preempted in KVM charges that time to the guest), but they all end
    // before the run does: at most one per period from the guest's
    // elapsed-time read (at least `elapsed_ns` after tick 0) to the end.
    let raised = r.stat("system.timer.interrupts").as_u64().unwrap();
    let end_ns = r.json("exit.json")["tick"].as_u64().unwrap() / 1000;
    let after_read = end_ns.saturating_sub(elapsed) / period_ns + 1;
    assert!(
        raised >= count && raised <= count + after_read,
        "raised {raised}, count {count}, at most {after_read} more periods after the read"
    );
    // ...and every interrupt injected reaches the guest: the last one may
    // still be queued in KVM when the guest, now at ring 0 with interrupts
    // off, reads its counter. (How many periods pass while the guest's
    // handler still runs depends on the host's speed: a raise that finds
    // its vector still pending merges with it, as on hardware, so `taken`
    // is not compared with `count`.)
    // (NMIs go on being injected until the guest stops the timer, after
    // its COUNT read; KVM merges an NMI into one already pending, so the
    // guest may take fewer than were injected.)
    let injected = r.stat("system.cpu.numInterrupts").as_u64().unwrap();
    if nmi {
        assert!(injected >= taken, "injected {injected}, taken {taken}");
    } else {
        assert!(
            injected == taken || injected == taken + 1,
            "injected {injected}, taken {taken}"
        );
    }
    // Interrupts are off from the guest's return to ring 0 on, before it
    // reads COUNT. NMIs ignore that: they land until the guest stops the
    // timer, as many as the host lets periods pass meanwhile, and are
    // bounded only by what the device raised.
    let most = if nmi { raised } else { count };
    assert!(taken >= 1 && taken <= most, "raised {raised}: {line}");
    assert!(injected <= raised, "injected {injected}, raised {raised}");
    // Ring 3 never exits by itself: forced exits end its runs. (How many a
    // period costs depends on the host: a timer kept armed across entries
    // may expire a little before the event and cost one more, and a busy
    // host may pass a deadline on another exit.)
    let signals = r.stat("system.cpu.numExitSignal").as_u64().unwrap();
    assert!(signals >= 1, "numExitSignal {signals} for {count} periods");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn interrupts_arrive_at_the_rate_the_timer_sets() {
    if !kvm_or_skip("interrupts") {
        return;
    }
    let (r, line) = ticks("interrupts", "posix", 100_000, 20_000_000);
    check_periodic_interrupts(&r, &line, 100_000);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn nmis_arrive_through_kvm_nmi() {
    if !kvm_or_skip("nmi") {
        return;
    }
    let (r, line) = ticks_nmi("nmi", "posix", 100_000, 20_000_000, true);
    check_periodic(&r, &line, 100_000, true);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn perf_timer_forces_exits_too() {
    if !kvm_or_skip("perf_timer") {
        return;
    }
    // A software perf clock event: the perf overflow path runs even
    // without a PMU.
    let (r, line) = ticks("perf-timer", "perf-task-clock", 100_000, 20_000_000);
    check_periodic_interrupts(&r, &line, 100_000);
    assert_eq!(
        r.json("config.json")["system"][0]["cpu"]["timer"],
        "perf-task-clock"
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn io_is_serviced_after_the_guests_time() {
    if !kvm_or_skip("io_after") {
        return;
    }
    // A period far beyond the run: no interrupts, no forced exits. The
    // guest reads the simulated time before and after its ring-3 loop; the
    // second read is serviced only after the loop's time has been added.
    let (r, line) = ticks("io-after", "posix", 100_000_000_000, 20_000_000);
    let elapsed = field(&line, "elapsed_ns") as f64 * 1e-9;
    assert_eq!(field(&line, "interrupts"), 0);
    // The loop is a serial chain of a 64-bit multiply (3 cycles on every
    // x86-64 core) and an add: at least 2 cycles per iteration on a core of
    // at most 6 GHz, so the loop alone takes at least this much, on any
    // host, busy or not.
    let least = 20_000_000.0 * 2.0 / 6e9;
    assert!(
        elapsed >= least && elapsed <= r.statf("simSeconds"),
        "elapsed {elapsed} s, the loop needs at least {least} s, simulated {} s",
        r.statf("simSeconds")
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn host_factor_scales_host_time_into_simulated_time() {
    if !kvm_or_skip("host_factor") {
        return;
    }
    for factor in [1.0, 2.0] {
        let (dir, cfg) = config(
            &format!("factor-{factor}"),
            &format!(
                "[system]\nkernel = \"builtin:compute\"\nargs = [30000000]\n\
                 [system.cpu]\nhost_factor = {factor:?}\n[system.serial]\nstdout = false\n"
            ),
        );
        let r = kvmsim(&["run", &cfg], &dir.join("out"));
        assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
        // No events are pending while the guest computes, so simulated time
        // is the time measured inside KVM (TSC) times the factor.
        let ratio = r.statf("simSeconds") / r.statf("system.cpu.kvmHostSeconds");
        assert!(
            (ratio / factor - 1.0).abs() < 0.1,
            "factor {factor}: simulated/host-in-KVM = {ratio}"
        );
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn hlt_advances_simulated_time_without_host_waiting() {
    if !kvm_or_skip("hlt") {
        return;
    }
    let out = outdir("hlt");
    // Ten 1-second timer periods, halted in between.
    let r = kvmsim(&["run", "--kernel", "builtin:sleep", "--quiet"], &out);
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let line = r.file("serial.log");
    assert_eq!(field(&line, "ticks"), 10);
    assert!(field(&line, "slept_ns") >= 10_000_000_000, "{line}");
    assert!(r.statf("simSeconds") >= 10.0);
    // The host did not wait for the simulated time: waiting (in KVM or in
    // kvmsim) would take at least the 10 simulated seconds; skipping idle
    // time takes a small fraction of them.
    assert!(
        r.statf("hostSeconds") < r.statf("simSeconds"),
        "host {} s for {} s simulated",
        r.statf("hostSeconds"),
        r.statf("simSeconds")
    );
    assert!(r.stat("system.cpu.numHalt").as_u64().unwrap() >= 10);
    assert_eq!(
        r.stat("system.cpu.numExitSignal"),
        0,
        "halting needs no forced exits"
    );
    // The guest's TSC followed simulated time, not the host's: the cycles
    // it counted are the slept time at the TSC rate (within 0.1%), unless
    // the host's KVM ignores TSC writes, which kvmsim then says.
    let hz = r.json("config.json")["system"][0]["cpu"]["host_freq"]
        .as_f64()
        .unwrap();
    let counted = field(&line, "tsc_cycles") as f64 / hz;
    let slept = field(&line, "slept_ns") as f64 / 1e9;
    if r.stderr.contains("ignores writes to the guest TSC") {
        assert!(counted < slept / 2.0, "{counted} s counted");
    } else {
        assert!(
            (counted - slept).abs() < slept * 1e-3,
            "TSC counted {counted} s over {slept} s simulated"
        );
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn drain_during_port_reads_uses_half_entries_and_keeps_the_result() {
    if !kvm_or_skip("drain") {
        return;
    }
    let n: u64 = 2000;
    let want: u64 = (0..n).map(|i| i % 256).sum();
    let (dir, cfg) = config(
        "drain",
        &format!(
            "[sim]\ndrain_period = \"20us\"\n[system]\nkernel = \"builtin:iostream\"\nargs = [{n}]\n\
             [system.serial]\nstdout = false\n"
        ),
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert_eq!(
        r.file("serial.log"),
        format!("iostream: n={n} sum={want}\n")
    );
    assert!(r.stat("system.numDrains").as_u64().unwrap() > 100);
    assert!(r.stat("system.cpu.numVMHalfEntries").as_u64().unwrap() > 0);
    // Without drains: the same result and no half entries.
    let out = dir.join("plain");
    let r = kvmsim(&["run", "--kernel", "builtin:iostream", "--quiet"], &out);
    assert_eq!(
        r.file("serial.log"),
        format!("iostream: n={n} sum={want}\n")
    );
    assert_eq!(r.stat("system.cpu.numVMHalfEntries"), 0);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn max_insts_stops_exactly_in_kernel_mode() {
    if !kvm_or_skip("max_insts") {
        return;
    }
    let n: u64 = 1001;
    let (dir, cfg) = config(
        "max-insts",
        &format!("[system]\nkernel = \"builtin:steps\"\n[system.cpu]\nmax_insts = {n}\n"),
    );
    let r = kvmsim(&["run", &cfg, "--max-time", "60s"], &dir.join("out"));
    r.no_panic();
    assert_eq!(r.status, 250, "stderr:\n{}", r.stderr);
    assert_eq!(r.json("exit.json")["cause"], "max_insts");
    let insts = r.stat("system.cpu.numInsts").as_u64().unwrap();
    assert_eq!(r.stat("system.totalNumInsts").as_u64(), Some(insts));
    if kvm::perf::pmu_available() {
        // A perf counter's overflow comes with skid: the stop lands at or
        // after the limit, never before.
        assert!(insts >= n, "stopped at {insts} of {n}");
    } else {
        // Single-stepping is exact: the count, and RAX = (N - 2) / 2 (see
        // steps.s).
        assert_eq!(insts, n);
        let rax = format!("rax={:016x}", (n - 2) / 2);
        assert!(r.stderr.contains(&rax), "{rax} not in:\n{}", r.stderr);
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn max_insts_in_user_mode_says_when_it_cannot_be_exact() {
    if !kvm_or_skip("max_insts_cpl3") {
        return;
    }
    let (dir, cfg) = config(
        "max-insts-cpl3",
        "[system]\nkernel = \"builtin:steps\"\nargs = [1]\n[system.cpu]\nmax_insts = 5000\n",
    );
    let r = kvmsim(&["run", &cfg, "--max-time", "60s"], &dir.join("out"));
    r.no_panic();
    let pmu = kvm::perf::pmu_available();
    let steps_cpl3 = kvm::probe::single_step_works(3).unwrap();
    if pmu || steps_cpl3 {
        assert_eq!(r.status, 250, "stderr:\n{}", r.stderr);
    } else {
        // No PMU and no single-step at CPL3: refused, not a wrong count.
        assert_eq!(r.status, 249, "stderr:\n{}", r.stderr);
        assert!(
            r.stderr.contains("does not single-step CPL3"),
            "{}",
            r.stderr
        );
        assert_eq!(r.json("exit.json")["cause"], "unsupported");
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn instruction_counts_are_unavailable_not_zero_without_a_pmu() {
    if !kvm_or_skip("insts_unavailable") {
        return;
    }
    let r = kvmsim(
        &["run", "--kernel", "builtin:hello", "--quiet"],
        &outdir("insts-nan"),
    );
    assert_eq!(r.no_panic().status, 0);
    if kvm::perf::pmu_available() {
        assert!(r.stat("system.cpu.numInsts").as_u64().unwrap() > 0);
        assert_eq!(r.statf("system.cpu.instCountMethod"), 1.0);
    } else {
        assert!(r.stat("system.cpu.numInsts").is_null());
        assert!(r.stat("system.totalNumInsts").is_null());
        assert_eq!(r.statf("system.cpu.instCountMethod"), 0.0);
        let line = r
            .file("stats.txt")
            .lines()
            .find(|l| l.starts_with("system.cpu.numInsts "))
            .unwrap()
            .to_string();
        assert!(line.contains(" nan "), "{line}");
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn coalesced_mmio_writes_go_through_the_ring() {
    if !kvm_or_skip("coalesced") {
        return;
    }
    let (dir, cfg) = config(
        "coalesced",
        "[system]\nkernel = \"builtin:ticks\"\nargs = [100000, 20000000]\n\
         coalesced_mmio = [[0xFEB00000, 0x1000]]\n[system.serial]\nstdout = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    // The guest writes VECTOR, PERIOD, CTRL, CTRL: buffered, not exits.
    assert_eq!(r.stat("system.cpu.numCoalescedMMIO"), 4);
    // Five clock and COUNT reads and the exit sim-op.
    assert_eq!(r.stat("system.cpu.numMMIO"), 6, "only the reads exit");
    // The buffered writes took effect (the timer ran).
    assert!(field(&r.file("serial.log"), "count") > 0);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn dump_on_exit_prints_the_whole_cpu_state() {
    if !kvm_or_skip("dump_on_exit") {
        return;
    }
    let out = outdir("dump-on-exit");
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--dump-on-exit",
            "--quiet",
        ],
        &out,
    );
    assert_eq!(r.no_panic().status, 0);
    let dump = r.file("cpu-dump.txt");
    for part in [
        "rip=", "cr0=", "efer=", "events:", "msrs:", "LSTAR=", "fpu:", "xmm15=", "dr7=",
    ] {
        assert!(dump.contains(part), "{part} missing from:\n{dump}");
    }
    assert!(r.stderr.contains("CPU state at exit"));
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn interrupts_in_kernel_mode_keep_the_interrupted_flags() {
    if !kvm_or_skip("flags") {
        return;
    }
    // Linux's memmove loop at CPL0 (a carry set by `sub` is read by `jae`
    // ten instructions later) under a 50 us interval timer, then with the
    // interrupts held back while the loop runs: kvmsim's injection and
    // register sync must not lose the carry.
    for mode in [0, 2] {
        let r = kvmsim(
            &[
                "run",
                "--kernel",
                "builtin:flags",
                "--arg",
                "3000",
                "--arg",
                "50000",
                "--arg",
                &mode.to_string(),
            ],
            &outdir(&format!("flags-{mode}")),
        );
        assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
        let line = r.file("serial.log");
        assert_eq!(field(&line, "passes"), 3000, "{line}");
        assert_eq!(field(&line, "bad"), 0, "{line}");
        let taken = field(&line, "interrupts");
        assert!(taken > 0, "the timer interrupted the loop: {line}");
        assert_eq!(r.stat("system.cpu.numInterrupts").as_u64(), Some(taken));
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn system_calls_from_user_mode_reach_the_kernel() {
    if !kvm_or_skip("syscall") {
        return;
    }
    // 1000 `syscall`s from ring 3 to a ring-0 handler that counts them and
    // returns with sysretq. Where the host's KVM leaves `syscall` at CPL3,
    // kvmsim repairs each entry from the page fault it raises.
    let r = kvmsim(
        &["run", "--kernel", "builtin:syscall", "--quiet"],
        &outdir("syscall"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert_eq!(r.file("serial.log"), "syscall: calls=1000\n");
    let repaired = r.stat("system.cpu.completedInstructions::syscall-entry");
    if kvm::doctor::cached().needs_syscall_repair() {
        assert_eq!(repaired, 1000, "{}", r.stderr);
        assert!(r.stderr.contains("repair applied"), "{}", r.stderr);
    } else {
        assert_eq!(repaired, 0);
    }

    // Without the repair (or where it cannot apply) the entry faults: the
    // guest's page-fault handler runs first and sees no call counted.
    let (dir, cfg) = config(
        "syscall-norepair",
        "[system]\nkernel = \"builtin:syscall\"\n[system.cpu]\nsyscall_repair = false\n\
         [system.serial]\nstdout = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let calls = field(&r.file("serial.log"), "calls");
    if kvm::doctor::cached().needs_syscall_repair() {
        assert_eq!(calls, 0);
    } else {
        assert_eq!(calls, 1000);
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn trace_records_each_instruction_from_a_given_time() {
    if !kvm_or_skip("trace") {
        return;
    }
    // hello (kernel mode) prints by polling the UART: lodsb, test, je, ...,
    // in al,dx ... out dx,al. Trace 40 instructions from the start, then
    // 5 from 10 us on (the guest is still printing then).
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--quiet",
            "--trace",
            "40",
        ],
        &outdir("trace"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let t = r.file("trace.txt");
    let lines: Vec<&str> = t.lines().filter(|l| !l.starts_with('#')).collect();
    if !kvm::probe::single_step_works(0).unwrap() {
        // Without stepping only the first line (the start) is recorded.
        assert!(lines.len() <= 1, "{t}");
        return;
    }
    assert_eq!(lines.len(), 40, "{t}");
    assert!(lines[0].contains("cpl0 0x0000000000100000"), "{t}");
    let ticks: Vec<u64> = lines
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[0] <= w[1]),
        "time goes forward: {t}"
    );
    for insn in ["lodsb", "in al,dx", "out dx,al"] {
        assert!(t.contains(insn), "{insn} not in:\n{t}");
    }
    // The guest still prints the whole message while traced.
    assert!(r.stdout.is_empty());
    assert!(
        r.file("serial.log").starts_with("Hello"),
        "{}",
        r.file("serial.log")
    );

    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--quiet",
            "--trace",
            "5@10us",
        ],
        &outdir("trace-later"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let t = r.file("trace.txt");
    let first: u64 = t
        .lines()
        .find(|l| !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no trace line in:\n{t}"));
    assert!(first >= 10_000_000, "trace starts at 10 us, not {first} ps");
    assert_eq!(t.lines().filter(|l| !l.starts_with('#')).count(), 5, "{t}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn fwait_that_kvm_cannot_emulate_is_completed() {
    if !kvm_or_skip("fwait") {
        return;
    }
    let r = kvmsim(
        &["run", "--kernel", "builtin:fwait", "--quiet"],
        &outdir("fwait"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    // Nothing pending: it goes on; CR0.TS|MP: #NM, then it goes on.
    assert_eq!(r.file("serial.log"), "fwait: passed=2 nm=1\n");
    let completed = r
        .stat("system.cpu.completedInstructions::fwait")
        .as_u64()
        .unwrap();
    // Where KVM emulates fwait itself kvmsim completes none; where kvmsim
    // doctor's probe finds that it cannot, all 3 executions (one of them
    // raising #NM) fail in KVM and kvmsim completes them.
    let want = if kvm::doctor::cached().emulator_lacks("fwait") {
        3
    } else {
        0
    };
    assert_eq!(completed, want);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn int3_that_kvm_cannot_emulate_is_completed() {
    if !kvm_or_skip("int3") {
        return;
    }
    let r = kvmsim(
        &["run", "--kernel", "builtin:int3", "--quiet"],
        &outdir("int3"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert_eq!(r.file("serial.log"), "int3: traps=3\n");
    // A software-assisted KVM fails on every int3 (kvmsim doctor's probe
    // says so) and kvmsim completes it; with VMX/SVM the CPU executes it.
    let done = r
        .stat("system.cpu.completedInstructions::int3")
        .as_u64()
        .unwrap();
    let want = if kvm::doctor::cached().emulator_lacks("int3") {
        3
    } else {
        0
    };
    assert_eq!(done, want);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn cpu_samples_record_where_the_guest_is() {
    if !kvm_or_skip("samples") {
        return;
    }
    let (dir, cfg) = config(
        "samples",
        "[sim]\nsample_period = \"1ms\"\nmax_time = \"20ms\"\n\
         [system]\nkernel = \"builtin:compute\"\nargs = [4000000000]\nserial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 250, "stderr:\n{}", r.stderr);
    let samples = r.file("cpu-samples.txt");
    let lines: Vec<&str> = samples.lines().collect();
    // One sample per simulated millisecond; the guest computes at ring 3
    // once its set-up at ring 0 is done (kernel-mode code is emulated on
    // some hosts, and a busy host stretches that set-up over the first
    // samples), and never leaves it.
    assert!((19..=20).contains(&lines.len()), "{samples}");
    let ring3 = lines
        .iter()
        .position(|l| l.contains(" cpl=3 "))
        .unwrap_or_else(|| panic!("no sample at ring 3:\n{samples}"));
    assert!(
        lines[ring3..]
            .iter()
            .all(|l| l.contains(" cpl=3 ") && l.contains("rip=0x1")),
        "{samples}"
    );
    assert!(
        lines.iter().all(|l| l.contains("rip=0x1")),
        "outside the guest's code:\n{samples}"
    );
    assert!(lines[0].starts_with("1000000000 "), "{}", lines[0]);
}

/// Runs the `irqint3` guest (`traps` int3 at ring 0 under a timer of
/// `period_ns`) and checks what holds for every run: it ends with status 0,
/// every trap is counted, and the guest took every interrupt kvmsim
/// injected. Returns the run, its report line and the injected count.
fn irqint3(test: &str, period_ns: u64, traps: u64) -> (Run, String, u64) {
    let (period, count) = (period_ns.to_string(), traps.to_string());
    let args = [
        "run",
        "--kernel",
        "builtin:irqint3",
        "--arg",
        &period,
        "--arg",
        &count,
        "--quiet",
    ];
    let r = kvmsim(&args, &outdir(test));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let line = r.file("serial.log");
    assert_eq!(field(&line, "traps"), traps, "{line}");
    let injected = r.stat("system.cpu.numInterrupts").as_u64().unwrap();
    assert_eq!(field(&line, "interrupts"), injected, "{line}");
    (r, line, injected)
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn every_injected_interrupt_is_taken_while_instructions_are_completed() {
    if !kvm_or_skip("irqint3") {
        return;
    }
    // 2,000 int3 in kernel mode (each completed by kvmsim where KVM cannot
    // emulate it) under a 30 us timer: the guest's own count of interrupts
    // equals the interrupts kvmsim injected (none discarded by the #BP
    // events kvmsim pushes).
    let (r, line, injected) = irqint3("irqint3", 30_000, 2000);
    assert!(injected > 0, "no interrupt arrived: {line}");
    if kvm::doctor::cached().emulator_lacks("int3") {
        assert_eq!(
            r.stat("system.cpu.completedInstructions::int3").as_u64(),
            Some(2000)
        );
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_port_io_exit_costs_one_system_call() {
    if !kvm_or_skip("syscalls_per_exit") {
        return;
    }
    // The iostream guest: port writes and reads at ring 0, nothing else.
    // With a far event (max_time) the run timer stays armed across exits:
    // no timer or signal call per exit, and the SYSCALL repair's IDT
    // checks (where the host needs it) are rare.
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:iostream",
            "--arg",
            "20000",
            "--max-time",
            "1000s",
            "--quiet",
        ],
        &outdir("syscalls"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let exits = r.stat("system.cpu.numVMExits").as_u64().unwrap();
    let io = r.stat("system.cpu.numIO").as_u64().unwrap();
    let calls = r.stat("system.cpu.hostSyscalls").as_u64().unwrap();
    assert!(io >= 40_000, "{io} port exits");
    // KVM_RUN once per exit, plus at most 3% for the timer's re-arming,
    // the repair's occasional KVM_GET_SREGS and the start and end.
    assert!(
        calls <= exits + exits * 3 / 100,
        "{calls} system calls for {exits} exits"
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_timer_shorter_than_an_instruction_takes_still_lets_the_guest_finish() {
    if !kvm_or_skip("short_timer") {
        return;
    }
    // The interval timer every 2 us while kernel-mode code runs: on a host
    // that emulates kernel mode, one entry cannot complete an instruction
    // in 2 us. The minimum run span grows until it can.
    irqint3("short-timer", 2000, 200);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn an_interrupted_run_keeps_the_simulated_time_its_cpu_used() {
    if !kvm_or_skip("sigint_time") {
        return;
    }
    // A ring-3 loop with no event to bound it (no max_time): the CPU runs
    // in one long entry until SIGINT. stderr is a pipe (a batch
    // scheduler's case): no progress kicks.
    for wait in [2u64, 4, 8] {
        let out = outdir(&format!("sigint-{wait}"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kvmsim"))
            .args([
                "run",
                "--kernel",
                "builtin:compute",
                "--arg",
                "100000000000000",
            ])
            .arg("--quiet")
            .arg("--outdir")
            .arg(&out)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_secs(wait));
        // SAFETY: kill(2) on our own child's pid, with a valid signal.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            o.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r = Run {
            status: 130,
            stdout: String::new(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            out: out.to_path_buf(),
            dir: Some(out.clone()),
        };
        if r.stderr.contains("interrupted during set-up") {
            continue; // so busy that the run had not started: nothing written
        }
        let cycles = r.stat("system.cpu.numCycles").as_u64().unwrap();
        if cycles == 0 {
            continue; // the machine is so busy the guest had not started
        }
        // numCycles and simSeconds come from the same charged time: at
        // 2 GHz one cycle is 500 ps (rounded up per run).
        let sim_ticks = r.stat("simTicks").as_u64().unwrap();
        assert!(
            sim_ticks as f64 >= cycles as f64 * 500.0 * 0.99,
            "simTicks {sim_ticks} for {cycles} cycles"
        );
        assert_eq!(r.json("exit.json")["cause"], "user_interrupt");
        return;
    }
    panic!("the guest never ran in 14 s");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_trace_never_hands_user_mode_a_debug_exception_the_host_cannot_step() {
    if !kvm_or_skip("trace_cpl3") {
        return;
    }
    // The compute guest sets up in a few dozen kernel-mode instructions
    // and is at ring 3 well before 20 ms (its loop takes ~100 ms); the
    // trace starts then.
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:compute",
            "--arg",
            "100000000",
            "--trace",
            "20@20ms",
            "--quiet",
        ],
        &outdir("trace-cpl3"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(r
        .file("serial.log")
        .starts_with("compute: iterations=100000000"));
    let trace = r.file("trace.txt");
    let steps = trace.lines().filter(|l| !l.starts_with('#')).count();
    assert_eq!(steps, 20, "{trace}");
    if !kvm::probe::single_step_works(3).unwrap() {
        assert!(trace.contains("paused: the guest runs at CPL3"), "{trace}");
        assert!(trace
            .lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| l.contains(" cpl0 ")));
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_host_freq_set_too_high_loses_no_timer() {
    if !kvm_or_skip("host_freq_high") {
        return;
    }
    // host_freq far above the real TSC rate: the TSC then says a timer's
    // deadline has not come when the timer has already fired. The signal
    // exit must still count as the timer's, or the timer is taken for
    // armed while none is, and the ring-3 loop runs on with no period ever
    // ending (seen: 1 period, 0 interrupts for the whole loop).
    let (dir, cfg) = config(
        "host-freq-high",
        "[system]\nkernel = \"builtin:ticks\"\nargs = [100000, 100000000]\n\
         [system.cpu]\nhost_freq = \"100GHz\"\n[system.serial]\nstdout = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let line = r.file("serial.log");
    let count = field(&line, "count");
    assert!(count >= 3, "{line}");
    assert!(field(&line, "interrupts") + 1 >= count, "{line}");
}
