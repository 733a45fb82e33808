//! Boots each built-in guest through the real kvmsim binary on /dev/kvm.

mod common;

use common::*;

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn hello_example_prints_exits_0_and_writes_outputs() {
    if !kvm_or_skip("hello_example") {
        return;
    }
    let out = outdir("hello");
    let ex = repo().join("examples/hello.toml");
    let r = kvmsim(&["run", ex.to_str().unwrap()], &out);
    r.no_panic();
    assert_eq!(r.status, 0, "stderr:\n{}", r.stderr);
    assert!(
        r.stdout.contains("Hello from the guest"),
        "stdout: {}",
        r.stdout
    );
    assert_eq!(r.file("serial.log"), "Hello from the guest\n");
    let stats = r.file("stats.txt");
    assert!(stats.contains("---------- Begin Simulation Statistics ----------"));
    for name in [
        "system.cpu.numVMExits",
        "system.cpu.numIO",
        "system.cpu.numMMIO",
        "system.cpu.numHalt",
        "simSeconds",
        "hostSeconds",
    ] {
        assert!(
            stats.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing from stats.txt:\n{stats}"
        );
    }
    // 21 characters, each an LSR poll and a THR write: at least 42 port IOs;
    // one sim-ops MMIO read.
    assert!(r.stat("system.cpu.numIO").as_u64().unwrap() >= 42);
    assert_eq!(r.stat("system.cpu.numMMIO"), 1);
    assert_eq!(r.stat("system.uart.txBytes"), 21);
    assert!(r.stat("simSeconds").as_f64().unwrap() > 0.0);
    let cfg = r.json("config.json");
    assert_eq!(cfg["system"][0]["kernel"], "builtin:hello");
    assert!(
        cfg["system"][0]["cpu"]["host_freq"].as_f64().unwrap() > 1e6,
        "resolved host_freq"
    );
    let exit = r.json("exit.json");
    assert_eq!(exit["cause"], "guest_exit");
    assert_eq!(exit["status"], 0);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn compute_guest_matches_the_native_loop() {
    if !kvm_or_skip("compute") {
        return;
    }
    let n: u64 = 20_000_000;
    let out = outdir("compute");
    let ex = repo().join("examples/compute.toml");
    let r = kvmsim(
        &["run", ex.to_str().unwrap(), "--arg", &n.to_string()],
        &out,
    );
    r.no_panic();
    assert_eq!(r.status, 0, "stderr:\n{}", r.stderr);
    let want = format!(
        "compute: iterations={n} result=0x{:016x}\n",
        guests::compute_loop_reference(n)
    );
    assert_eq!(r.file("serial.log"), want);
    assert_eq!(
        guests::compute_loop_native(n),
        guests::compute_loop_reference(n)
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn fault_guest_ends_with_a_register_dump() {
    if !kvm_or_skip("fault") {
        return;
    }
    let out = outdir("fault");
    let r = kvmsim(&["run", "--kernel", "builtin:fault"], &out);
    r.no_panic();
    assert_eq!(r.status, 252, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("because guest fault"), "{}", r.stderr);
    assert!(r.stderr.contains("KVM_EXIT_SHUTDOWN"), "{}", r.stderr);
    for reg in [
        "rip=",
        "rflags=",
        "cr0=",
        "cr3=",
        "cr4=",
        "efer=",
        "cs=sel 0010",
        "gdt=",
    ] {
        assert!(
            r.stderr.contains(reg),
            "{reg} missing from the dump:\n{}",
            r.stderr
        );
    }
    assert!(
        r.stderr.contains("r15=000000001234abcd"),
        "the guest's marker register"
    );
    // The dump shows what the registers point at: the faulting
    // instruction and where RIP leads through the page tables.
    assert!(
        r.stderr.contains("code at rip: [0f, 0b] = ud2"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("rip: page walk of 0x"), "{}", r.stderr);
    // What the guest printed and the stats survive the fault.
    assert_eq!(r.file("serial.log"), "fault: about to triple fault\n");
    assert!(r.file("stats.txt").contains("system.cpu.numVMExits"));
    let exit = r.json("exit.json");
    assert_eq!(exit["cause"], "guest_fault");
    assert!(exit["message"].as_str().unwrap().contains("rip="));
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn simops_fail_code_delay_and_stats_dumps() {
    if !kvm_or_skip("simops") {
        return;
    }
    let out = outdir("simops");
    // fail(delay = 5 ms, code = 7)
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:simops",
            "--arg",
            "5000000",
            "--arg",
            "7",
        ],
        &out,
    );
    r.no_panic();
    assert_eq!(r.status, 7, "stderr:\n{}", r.stderr);
    assert!(r.file("serial.log").contains("simops: sum and unknown ok"));
    assert!(r.stderr.contains("unknown function 0x99"), "{}", r.stderr);
    let exit = r.json("exit.json");
    assert_eq!(exit["code"], 7);
    let tick = exit["tick"].as_u64().unwrap();
    // Two dumps: the guest's dump_reset_stats, then the final one.
    let dumps = r.json("stats.json");
    let dumps = dumps.as_array().unwrap();
    assert_eq!(dumps.len(), 2);
    // The exit comes 5 ms of simulated time after the fail op; the guest
    // halted meanwhile, so time jumped there without the host waiting.
    // Since the reset just before the op, simulated time is those 5 ms plus
    // the guest's run to the op (its host time in KVM, which a busy host
    // stretches: numCycles counts it) and a few device latencies.
    let sim_ticks = dumps[1]["stats"]["simTicks"].as_u64().unwrap();
    assert_eq!(tick, dumps[0]["tick"].as_u64().unwrap() + sim_ticks);
    let ran = dumps[1]["stats"]["system.cpu.numCycles"].as_u64().unwrap() * 500; // 2 GHz
    assert!(
        sim_ticks >= 5_000_000_000 && sim_ticks <= 5_000_000_000 + ran + 1_000_000,
        "{sim_ticks} ticks after the reset, {ran} of them running"
    );
    assert_eq!(dumps[0]["stats"]["system.simops.workItems"], 1);
    assert_eq!(dumps[0]["stats"]["system.simops.numUnknownOps"], 1);
    // Reset after the first dump: the final dump counts only what followed.
    assert_eq!(dumps[1]["stats"]["system.simops.workItems"], 0);
    assert_eq!(
        dumps[1]["stats"]["system.simops.numOps"], 1,
        "only the fail op"
    );
    assert_eq!(dumps[1]["stats"]["system.cpu.numHalt"], 1);
    assert_eq!(
        r.file("stats.txt")
            .matches("Begin Simulation Statistics")
            .count(),
        2
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn simops_exit_returns_0() {
    if !kvm_or_skip("simops_exit") {
        return;
    }
    let out = outdir("simops-exit");
    let r = kvmsim(&["run", "--kernel", "builtin:simops"], &out);
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn max_time_stops_the_run() {
    if !kvm_or_skip("max_time") {
        return;
    }
    let out = outdir("max-time");
    // The guest asks to exit after 1 s; the limit is 2 ms.
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:simops",
            "--arg",
            "1000000000",
            "--max-time",
            "2ms",
        ],
        &out,
    );
    r.no_panic();
    assert_eq!(r.status, 250, "stderr:\n{}", r.stderr);
    let exit = r.json("exit.json");
    assert_eq!(exit["cause"], "max_tick");
    assert_eq!(exit["tick"], 2_000_000_000u64);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn extracted_guest_runs_from_a_file() {
    if !kvm_or_skip("extracted") {
        return;
    }
    let dir = outdir("extract");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["guests", "--extract"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let elf = dir.join("hello.elf");
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "16MiB",
            "--quiet",
        ],
        &dir.join("out"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(r.stdout.is_empty(), "--quiet keeps the console off stdout");
    assert_eq!(r.file("serial.log"), "Hello from the guest\n");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn progress_line_only_on_a_terminal() {
    if !kvm_or_skip("progress") {
        return;
    }
    let args = [
        "run",
        "--kernel",
        "builtin:compute",
        "--arg",
        "2500000000",
        "--quiet",
    ];
    let out = outdir("progress");
    // stderr is a pipe here: quiet.
    let r = kvmsim(&args, &out);
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(!r.stderr.contains("[kvmsim] simulated"), "{}", r.stderr);
    // Under a terminal (script(1) gives the run a pty) the line shows.
    let cmd = format!(
        "{} {} --outdir {}",
        env!("CARGO_BIN_EXE_kvmsim"),
        args.join(" "),
        out.join("tty").display()
    );
    match std::process::Command::new("script")
        .args(["-qc", &cmd, "/dev/null"])
        .output()
    {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains("[kvmsim] simulated"), "{text}");
            assert!(text.contains("exits/s"), "{text}");
        }
        Err(e) => eprintln!("script(1) unavailable ({e}): the terminal half is not checked"),
    }
}

/// The last `Begin/End Simulation Statistics` block of a stats.txt.
fn last_block(stats: &str) -> Vec<&str> {
    let start = stats
        .rfind("---------- Begin Simulation Statistics ----------")
        .expect("a stats block");
    stats[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("---------- End"))
        .filter(|l| !l.is_empty())
        .collect()
}

/// The value column of `name`'s line in a stats block.
fn text_value<'a>(block: &[&'a str], name: &str) -> &'a str {
    block
        .iter()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("{name} missing from:\n{}", block.join("\n")))
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn stats_txt_has_gem5s_global_statistics_in_one_column() {
    if !kvm_or_skip("gem5_stats") {
        return;
    }
    let r = kvmsim(
        &["run", "--kernel", "builtin:hello", "--quiet"],
        &outdir("gem5-stats"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let stats = r.file("stats.txt");
    let block = last_block(&stats);
    // gem5's global statistics, first and in gem5's order.
    let names: Vec<&str> = block
        .iter()
        .take(sim::stats::BUILTINS.len())
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, sim::stats::BUILTINS);
    // Rates and sizes are integers, as gem5 prints them.
    for name in ["hostTickRate", "hostMemory"] {
        let v = text_value(&block, name);
        assert!(v.parse::<u64>().is_ok(), "{name} = {v}");
    }
    assert!(text_value(&block, "hostMemory").parse::<u64>().unwrap() > 1 << 20);
    // simInsts/simOps: the system's instructions, or nan where they cannot
    // be counted (never 0).
    let method = r.stat("system.cpu.instCountMethod").as_u64().unwrap();
    let labels = ["unavailable", "perf-counter", "single-step"];
    if method == 0 {
        for name in ["simInsts", "simOps", "hostInstRate", "hostOpRate"] {
            assert_eq!(text_value(&block, name), "nan", "{name}");
            assert!(r.stat(name).is_null(), "{name}");
        }
    } else {
        assert_eq!(r.stat("simInsts"), r.stat("system.totalNumInsts"));
        assert_eq!(r.stat("simOps"), r.stat("system.totalNumInsts"));
    }
    // The enumeration: its number in the value column, its name beside it
    // in both files.
    let line = block
        .iter()
        .find(|l| l.starts_with("system.cpu.instCountMethod "))
        .unwrap();
    assert_eq!(
        text_value(&block, "system.cpu.instCountMethod"),
        method.to_string()
    );
    assert!(
        line.contains(&format!(
            "counted: {} (0 unavailable",
            labels[method as usize]
        )),
        "{line}"
    );
    let dumps = r.json("stats.json");
    let last = dumps.as_array().unwrap().last().unwrap();
    assert_eq!(
        last["labels"]["system.cpu.instCountMethod"],
        labels[method as usize]
    );
    // Every value ends in the same column, long names included (values
    // wider than gem5's 12 columns, like simFreq, push only themselves).
    let longest = block
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().len())
        .max()
        .unwrap();
    assert!(
        longest > 40,
        "a name longer than gem5's 40 columns is present"
    );
    for l in &block {
        let value = l.split_whitespace().nth(1).unwrap();
        if value.len() <= 12 {
            let end = l.find(" # ").unwrap();
            assert_eq!(end, longest.max(40) + 1 + 12 + 1 + 10 + 1 + 10, "{l}");
        }
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn sim_insts_count_every_instruction_of_the_run() {
    if !kvm_or_skip("sim_insts") {
        return;
    }
    // max_insts counts instructions on any host (a perf counter, or
    // single-stepping in kernel mode).
    let (dir, cfg) = config(
        "sim-insts",
        "[system]\nkernel = \"builtin:steps\"\n[system.cpu]\nmax_insts = 1001\n",
    );
    let r = kvmsim(&["run", &cfg, "--max-time", "60s"], &dir.join("out"));
    assert_eq!(r.no_panic().status, 250, "stderr:\n{}", r.stderr);
    let n = r.stat("system.totalNumInsts").as_u64().unwrap();
    assert!(n >= 1001, "{n}");
    assert_eq!(r.stat("simInsts").as_u64(), Some(n));
    assert_eq!(r.stat("simOps").as_u64(), Some(n));
    assert!(r.stat("hostInstRate").as_u64().unwrap() > 0);
    let stats = r.file("stats.txt");
    let block = last_block(&stats);
    assert_eq!(text_value(&block, "simInsts"), n.to_string());
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn log_lines_are_plain_text_off_a_terminal() {
    if !kvm_or_skip("log_colour") {
        return;
    }
    // The simops guest calls an unknown function: a warning on every host.
    let args = ["run", "--kernel", "builtin:simops", "--quiet"];
    let out = outdir("log-colour");
    let r = kvmsim(&args, &out);
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("WARN"), "{}", r.stderr);
    assert!(
        !r.stderr.contains('\x1b'),
        "colour codes in a pipe:\n{:?}",
        r.stderr
    );
    // On a terminal (script(1) gives the run a pty) the levels are coloured.
    let cmd = format!(
        "{} {} --outdir {}",
        env!("CARGO_BIN_EXE_kvmsim"),
        args.join(" "),
        out.join("tty").display()
    );
    match std::process::Command::new("script")
        .args(["-qc", &cmd, "/dev/null"])
        .output()
    {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains("WARN"), "{text}");
            assert!(text.contains("\x1b["), "no colour on a terminal: {text:?}");
        }
        Err(e) => eprintln!("script(1) unavailable ({e}): the terminal half is not checked"),
    }
}

/// gem5's readfile sim-op: the guest copies a host file into its memory in
/// chunks, offset by offset, and sees 0 at the end; a missing file is an
/// error before the guest starts.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn readfile_gives_the_guest_a_host_file() {
    if !kvm_or_skip("readfile") {
        return;
    }
    let out = outdir("readfile");
    let file = out.join("script.txt");
    // 200 bytes: three chunks of 64 and one of 8.
    let text: String = (0..200)
        .map(|i| {
            if i % 50 == 49 {
                '\n'
            } else {
                (b'a' + (i % 26) as u8) as char
            }
        })
        .collect();
    std::fs::create_dir_all(&*out).unwrap();
    std::fs::write(&file, &text).unwrap();
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:readfile",
            "--arg",
            "64",
            "--readfile",
            file.to_str().unwrap(),
        ],
        &out.join("run"),
    );
    r.no_panic();
    assert_eq!(r.status, 200, "stderr:\n{}", r.stderr);
    assert_eq!(r.file("serial.log"), text);
    assert_eq!(r.stat("system.simops.readFileBytes").as_u64(), Some(200));
    // Six sim-ops: four reads with data, one at the end, and fail.
    assert_eq!(r.stat("system.simops.numOps").as_u64(), Some(6));
    // The path is in the resolved config.
    assert_eq!(
        r.json("config.json")["system"][0]["readfile"],
        file.to_str().unwrap()
    );

    // No file configured: the guest reads nothing and exits.
    let r = kvmsim(&["run", "--kernel", "builtin:readfile"], &out.join("none"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert_eq!(r.file("serial.log"), "");

    // A file that is not there, or a folder: refused before the guest runs.
    for bad in [out.join("no-such-file"), out.to_path_buf()] {
        let r = kvmsim(
            &[
                "run",
                "--kernel",
                "builtin:readfile",
                "--readfile",
                bad.to_str().unwrap(),
            ],
            &out.join("bad"),
        );
        assert_eq!(r.no_panic().status, 254, "stderr:\n{}", r.stderr);
        assert!(r.stderr.contains("system.readfile"), "{}", r.stderr);
        assert!(r.stderr.contains(bad.to_str().unwrap()), "{}", r.stderr);
    }
}
