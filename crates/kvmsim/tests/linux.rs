//! Linux on the PC platform: Debian's cloud kernel (the bzImage as Debian
//! ships it) and the busybox initramfs of scripts/linux-guest.sh boot to
//! /init in simulated time. The guest comes from KVMSIM_LINUX_DIR (a folder
//! with vmlinuz and initrd.gz), else target/linux-guest. Unless
//! KVMSIM_LINUX_DIR or KVMSIM_REQUIRE_LINUX=1 (CI) was set when they were
//! built, the tests are ignored, with the reason (see build.rs); run anyway
//! (`-- --include-ignored`), a missing guest is a failure.

mod common;

use std::path::PathBuf;

use common::*;

fn linux_guest(test: &str) -> Option<PathBuf> {
    if !kvm_or_skip(test) {
        return None;
    }
    let dir = std::env::var_os("KVMSIM_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/linux-guest"));
    if dir.join("vmlinuz").is_file() && dir.join("initrd.gz").is_file() {
        return Some(dir);
    }
    let why = format!(
        "no Linux guest in {} (make one with scripts/linux-guest.sh {0})",
        dir.display()
    );
    // A test that runs was not ignored: its guest is expected.
    panic!("{test}: {why}");
}

/// examples/linux.toml's append (trimming flags): `--append` replaces it.
fn example_append() -> String {
    let example = std::fs::read_to_string(repo().join("examples/linux.toml")).unwrap();
    example
        .lines()
        .find_map(|l| l.strip_prefix("append = \""))
        .and_then(|l| l.split('"').next())
        .expect("examples/linux.toml has an append line")
        .to_string()
}

/// Boots the guest with examples/linux.toml and `extra` flags.
fn boot(test: &str, dir: &std::path::Path, extra: &[&str]) -> Run {
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.gz");
    let example = repo().join("examples/linux.toml");
    let mut args = vec![
        "run",
        example.to_str().unwrap(),
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let r = kvmsim(&args, &outdir(test));
    r.no_panic();
    r
}

#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn debian_kernel_boots_to_init_and_ends_with_the_workload_status() {
    let Some(dir) = linux_guest("linux_boot") else {
        return;
    };
    // /init takes a checkpoint (kvmsim.checkpoint) and the run goes on.
    let append = format!("{} kvmsim.checkpoint", example_append());
    let r = boot("linux-boot", &dir, &["--append", &append]);
    let console = r.file("serial.log");
    let tail = last_lines(&console, 30);
    assert_eq!(
        r.status, 0,
        "stderr:\n{}\nconsole (last lines):\n{tail}",
        r.stderr
    );
    assert_eq!(r.json("exit.json")["cause"], "guest_exit");
    for line in [
        "KVMSIM-INIT: /init is running",
        "KVMSIM-WORKLOAD: counted to 100000",
        "KVMSIM-INIT: workload status 0",
    ] {
        assert!(
            console.contains(line),
            "{line:?} not in the console:\n{tail}"
        );
    }
    // Time is simulated time: the kernel's clocks and timers agree with it.
    for bad in ["Marking TSC unstable", "IO-APIC + timer doesn't work"] {
        assert!(!console.contains(bad), "{bad:?} in the console");
    }
    // The local APIC timer ticks and its interrupts are taken; the UART's
    // reach the CPU through the I/O APIC (user-space console output).
    assert!(r.stat("system.apic.timerInterrupts").as_u64().unwrap() > 0);
    assert!(r.stat("system.cpu.numInterrupts").as_u64().unwrap() > 0);
    assert!(r.stat("system.ioapic.interrupts").as_u64().unwrap() > 0);
    assert!(console.contains("rtc_cmos"), "the kernel found the RTC");
    // /init dumps the stats first thing: simulated and host seconds to
    // /init, then to the end.
    let dumps = r.json("stats.json");
    let dumps = dumps.as_array().unwrap();
    assert!(dumps.len() >= 2, "{} stats dumps", dumps.len());
    let at = |d: &serde_json::Value, s: &str| d["stats"][s].as_f64().unwrap();
    let (init, end) = (&dumps[0], dumps.last().unwrap());
    assert!(at(init, "simSeconds") > 0.0 && at(init, "hostSeconds") > 0.0);
    assert!(at(end, "simSeconds") >= at(init, "simSeconds"));
    assert!(at(end, "hostSeconds") >= at(init, "hostSeconds"));
    eprintln!(
        "linux boot: /init at {:.1} s simulated ({:.1} s host), end at {:.1} s ({:.1} s host)",
        at(init, "simSeconds"),
        at(init, "hostSeconds"),
        at(end, "simSeconds"),
        at(end, "hostSeconds")
    );
    // The repairs this host needs are counted.
    let doctor = kvm::doctor::cached();
    if doctor.needs_syscall_repair() {
        assert!(
            r.stat("system.cpu.completedInstructions::syscall-entry")
                .as_u64()
                .unwrap()
                > 0
        );
    }

    // The checkpoint /init took: a restore runs the workload from there to
    // its sim-ops exit, without booting.
    assert!(console.contains("KVMSIM-INIT: checkpoint taken"), "{tail}");
    let cp = std::fs::read_dir(&r.out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("cpt."))
        .expect("a checkpoint folder in the output");
    let restored = kvmsim(
        &["run", "--restore", cp.to_str().unwrap(), "--quiet"],
        &r.out.join("restored"),
    );
    let rc = restored.no_panic().file("serial.log");
    let rtail = last_lines(&rc, 30);
    assert_eq!(
        restored.status, 0,
        "stderr:\n{}\nconsole (last lines):\n{rtail}",
        restored.stderr
    );
    assert_eq!(restored.json("exit.json")["cause"], "guest_exit");
    for line in [
        "KVMSIM-INIT: checkpoint taken",
        "KVMSIM-WORKLOAD: counted to 100000",
        "KVMSIM-INIT: workload status 0",
    ] {
        assert!(
            rc.contains(line),
            "{line:?} not in the restored console:\n{rtail}"
        );
    }
    assert!(
        !rc.contains("Linux version"),
        "the restored run booted:\n{rtail}"
    );
    let cp_tick: u64 = cp.file_name().unwrap().to_string_lossy()[4..]
        .parse()
        .unwrap();
    assert!(restored.json("exit.json")["tick"].as_u64().unwrap() > cp_tick);
    eprintln!(
        "linux restore: from {:.1} s simulated to the end at {:.1} s in {:.1} s host",
        cp_tick as f64 * 1e-12,
        restored.statf("simSeconds"),
        restored.statf("hostSeconds")
    );
}

#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_kernel_panic_ends_the_run_as_a_reset_and_keeps_the_console() {
    let Some(dir) = linux_guest("linux_panic") else {
        return;
    };
    // No init to run: the kernel panics; panic=-1 reboots at once, and
    // reboot=k resets through the keyboard controller. (--append replaces
    // the example's append, so its trimming flags are kept by hand.)
    let append = format!(
        "{} rdinit=/no-such-init init=/no-such-init",
        example_append()
    );
    let r = boot("linux-panic", &dir, &["--append", &append]);
    let console = r.file("serial.log");
    assert_eq!(r.status, 253, "stderr:\n{}", r.stderr);
    assert_eq!(r.json("exit.json")["cause"], "guest_reset");
    assert!(console.contains("Kernel panic"), "console:\n{console}");
    assert!(r.stderr.contains("guest reset"), "{}", r.stderr);
}

/// The one-command boot (`--kernel`, `--initrd`, no config): where kernel
/// mode is emulated it gets examples/linux.toml's host_factor and append,
/// says so in one line, and writes them into config.json; the user's own
/// choices win. Checked on the first 5 simulated ms (the resolution happens
/// before the boot; a whole boot costs minutes here).
#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn one_command_boot_picks_the_examples_settings_where_kernel_mode_is_emulated() {
    let Some(dir) = linux_guest("linux_one_command") else {
        return;
    };
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.gz");
    let (kernel, initrd) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let emulated = kvm::doctor::cached()
        .findings
        .iter()
        .any(|f| f.name == "native speed at CPL0 and CPL3" && !f.ok);
    let example = std::fs::read_to_string(repo().join("examples/linux.toml")).unwrap();
    let value = |key: &str| {
        example
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .map(|v| {
                v.split('#')
                    .next()
                    .unwrap()
                    .trim()
                    .trim_matches('"')
                    .to_string()
            })
            .unwrap_or_else(|| panic!("examples/linux.toml has no {key}"))
    };
    let (example_factor, example_append) = (value("host_factor"), value("append"));
    let run = |test: &str, extra: &[&str]| {
        let mut args = vec![
            "run",
            "--kernel",
            kernel,
            "--initrd",
            initrd,
            "--max-time",
            "5ms",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let r = kvmsim(&args, &outdir(test));
        assert_eq!(r.no_panic().status, 250, "stderr:\n{}", r.stderr);
        let sys = r.json("config.json")["system"][0].clone();
        (r, sys)
    };
    let note = |r: &Run| {
        r.stderr
            .lines()
            .filter(|l| l.contains("kernel mode is emulated on this host"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // The command line the kernel got carries the append, and its TSC rate
    // matches the host factor.
    let check_cmdline = |sys: &serde_json::Value| {
        let line = sys["cmdline"].as_str().unwrap();
        if let Some(a) = sys["append"].as_str() {
            assert!(line.ends_with(a), "{line}");
        }
        let khz = sys["cpu"]["host_freq"].as_f64().unwrap()
            / sys["cpu"]["host_factor"].as_f64().unwrap()
            / 1e3;
        assert!(
            line.contains(&format!("tsc_early_khz={} ", khz as u64)),
            "{line}"
        );
    };

    let (r, sys) = run("linux-one-command", &[]);
    check_cmdline(&sys);
    if emulated {
        assert_eq!(
            sys["cpu"]["host_factor"].as_f64(),
            Some(example_factor.parse().unwrap())
        );
        assert_eq!(sys["append"], example_append.as_str());
        let lines = note(&r);
        assert_eq!(lines.len(), 1, "one line:\n{}", r.stderr);
        for part in [
            format!("host_factor = {example_factor}"),
            example_append.clone(),
            "system.cpu.host_factor".into(),
            "--append".into(),
        ] {
            assert!(lines[0].contains(&part), "{part:?} missing: {}", lines[0]);
        }
    } else {
        // VMX/SVM: nothing changes.
        assert_eq!(sys["cpu"]["host_factor"].as_f64(), Some(1.0));
        assert!(sys["append"].is_null(), "{sys}");
        assert!(note(&r).is_empty(), "{}", r.stderr);
    }

    // The user's append wins; the host factor is still adapted.
    let (r, sys) = run("linux-one-command-append", &["--append", "quiet"]);
    check_cmdline(&sys);
    assert_eq!(sys["append"], "quiet");
    if emulated {
        assert_eq!(
            sys["cpu"]["host_factor"].as_f64(),
            Some(example_factor.parse().unwrap())
        );
        let lines = note(&r);
        assert_eq!(lines.len(), 1, "{}", r.stderr);
        assert!(!lines[0].contains("append ="), "{}", lines[0]);
    }

    // The user's host_factor (a config file) wins; the append is adapted.
    let (_cdir, cfg) = config(
        "linux-one-command-factor",
        &format!(
            "[system]\nkernel = {kernel:?}\ninitrd = {initrd:?}\n[system.cpu]\nhost_factor = 1.0\n"
        ),
    );
    let (r, sys) = run("linux-one-command-factor-out", &[&cfg]);
    check_cmdline(&sys);
    assert_eq!(sys["cpu"]["host_factor"].as_f64(), Some(1.0));
    if emulated {
        assert_eq!(sys["append"], example_append.as_str());
        let lines = note(&r);
        assert_eq!(lines.len(), 1, "{}", r.stderr);
        assert!(!lines[0].contains("host_factor ="), "{}", lines[0]);
    }
}

/// SMP: Debian's kernel on two CPUs brings up the second through INIT and
/// SIPI (real mode, then long mode, on this host's KVM), /init sees two
/// CPUs and runs one counting process per CPU, and both CPUs run guest code
/// after /init started (the per-CPU stats between /init's dump and the end).
#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn debian_kernel_boots_on_two_cpus_and_runs_a_process_on_each() {
    let Some(dir) = linux_guest("linux_smp") else {
        return;
    };
    let r = boot("linux-smp", &dir, &["--cpus", "2"]);
    let console = r.file("serial.log");
    let tail = last_lines(&console, 40);
    assert_eq!(
        r.status, 0,
        "stderr:\n{}\nconsole (last lines):\n{tail}",
        r.stderr
    );
    for line in [
        "smp: Brought up 1 node, 2 CPUs",
        "KVMSIM-NPROC: 2",
        "KVMSIM-INIT: workload status 0",
    ] {
        assert!(
            console.contains(line),
            "{line:?} not in the console:\n{tail}"
        );
    }
    assert_eq!(
        console
            .matches("KVMSIM-WORKLOAD: counted to 100000")
            .count(),
        2,
        "one counting process per CPU:\n{tail}"
    );
    assert!(r.stat("system.numIpis").as_u64().unwrap() > 0);
    let dumps = r.json("stats.json");
    let dumps = dumps.as_array().unwrap();
    let at = |d: &serde_json::Value, s: &str| d["stats"][s].as_f64().unwrap();
    let (init, end) = (&dumps[0], dumps.last().unwrap());
    for cpu in ["system.cpu0", "system.cpu1"] {
        let s = format!("{cpu}.kvmHostSeconds");
        assert!(at(end, &s) > 0.0, "{s} at the end: {}", at(end, &s));
        let n = format!("{cpu}.numVMExits");
        assert!(
            at(end, &n) > at(init, &n),
            "{cpu} ran nothing after /init started"
        );
        assert!(at(end, &format!("{cpu}.numIpisReceived")) > 0.0);
    }
    eprintln!(
        "linux smp boot: /init at {:.1} s simulated ({:.1} s host), end at {:.1} s ({:.1} s host), {} IPIs",
        at(init, "simSeconds"),
        at(init, "hostSeconds"),
        at(end, "simSeconds"),
        at(end, "hostSeconds"),
        at(end, "system.numIpis")
    );
}
