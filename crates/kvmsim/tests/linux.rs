//! Linux on the PC platform: Debian's cloud kernel (the bzImage as Debian
//! ships it) and the busybox initramfs of scripts/linux-guest.sh boot to
//! /init in simulated time. The guest comes from KVMSIM_LINUX_DIR (a folder
//! with vmlinuz and initrd.gz), else target/linux-guest. Unless
//! KVMSIM_LINUX_DIR or KVMSIM_REQUIRE_LINUX=1 (CI) was set when they were
//! built, the tests are ignored, with the reason (see build.rs); run anyway
//! (`-- --include-ignored`), a missing guest is a failure.
//!
//! Boots cost minutes of host time where kernel mode is emulated, so the
//! tests share them: one boot of examples/linux.toml to /init, which takes
//! a checkpoint there and runs on to its workload's end; every test of a
//! single-CPU system after /init is a restore of that checkpoint, with its
//! own script through the readfile sim-op. Only what a checkpoint cannot
//! give boots on its own: two CPUs, the root on a disk (`disk` below), and
//! two systems on Ethernet (`network` below).
//! The shared boot starts in the background as soon as any boot test runs.
//! libtest runs tests in name order, as many at once as the host has cores
//! (2 on ours): the tests that boot on their own sort first (`debian_...`,
//! `disk::...`, `network::...`) and start the shared boot beside theirs; the tests of the
//! shared boot (`shared_boot_...`) sort last, so their waiting for it never
//! holds back another boot.

mod common;
#[path = "linux/disk.rs"]
mod disk;
#[path = "linux/network.rs"]
mod network;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Once};

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

/// Boots the guest with examples/linux.toml and `extra` flags into `out`.
fn boot_into(dir: &Path, out: &Path, extra: &[&str]) -> Run {
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
        "--no-stdin",
    ];
    args.extend_from_slice(extra);
    let r = kvmsim(&args, out);
    r.no_panic();
    r
}

/// The shared boot: its run, and the checkpoint /init took.
struct Booted {
    run: Run,
    checkpoint: PathBuf,
}

/// The shared boot's outcome once it is known.
type Outcome = Option<Result<Arc<Booted>, String>>;

static SHARED: (Mutex<Outcome>, Condvar) = (Mutex::new(None), Condvar::new());
static SHARED_START: Once = Once::new();

/// Starts the shared boot in the background (once per test process).
fn start_shared_boot(dir: &Path) {
    SHARED_START.call_once(|| {
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            // Under the target folder, replaced by each test run.
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-shared-boot");
            let _ = std::fs::remove_dir_all(&out);
            // /init takes a checkpoint (kvmsim.checkpoint) and goes on.
            let append = format!("{} kvmsim.checkpoint", example_append());
            let result = std::panic::catch_unwind(|| {
                let run = boot_into(&dir, &out, &["--append", &append]);
                let checkpoint = std::fs::read_dir(&run.out)
                    .ok()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("cpt."));
                match checkpoint {
                    Some(checkpoint) => Ok(Arc::new(Booted { run, checkpoint })),
                    None => Err(format!(
                        "no checkpoint in {} (status {}); stderr:\n{}\nconsole (last lines):\n{}",
                        out.display(),
                        run.status,
                        run.stderr,
                        last_lines(
                            &std::fs::read_to_string(out.join("serial.log")).unwrap_or_default(),
                            30
                        )
                    )),
                }
            })
            .unwrap_or_else(|_| Err("the shared boot panicked (see above)".into()));
            let (m, c) = &SHARED;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            c.notify_all();
        });
    });
}

/// Waits for the shared boot (starting it if no test has).
fn shared_boot(dir: &Path) -> Arc<Booted> {
    start_shared_boot(dir);
    let (m, c) = &SHARED;
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    while g.is_none() {
        g = c.wait(g).unwrap_or_else(|p| p.into_inner());
    }
    match g.as_ref().unwrap() {
        Ok(b) => b.clone(),
        Err(e) => panic!("the shared Linux boot failed: {e}"),
    }
}

/// Restores the shared boot's checkpoint into a fresh folder for `test`,
/// with `script` (if any) as the readfile script /init runs.
fn restore(test: &str, booted: &Booted, script: Option<&str>) -> Run {
    let out = outdir(test);
    std::fs::create_dir_all(&*out).unwrap();
    let cp = booted.checkpoint.to_str().unwrap().to_string();
    let mut args = vec!["run", "--restore", &cp, "--quiet", "--no-stdin"];
    let path = out.join("script.sh");
    if let Some(s) = script {
        std::fs::write(&path, s).unwrap();
        args.extend_from_slice(&["--readfile", path.to_str().unwrap()]);
    }
    let r = kvmsim(&args, &out.join("run"));
    r.no_panic();
    // The run holds the test's folder.
    Run {
        dir: Some(out),
        ..r
    }
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
fn shared_boot_reaches_init_and_ends_with_the_workload_status() {
    let Some(dir) = linux_guest("linux_boot") else {
        return;
    };
    let booted = shared_boot(&dir);
    let r = &booted.run;
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
        "KVMSIM-INIT: checkpoint taken",
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
    // A Linux kernel is not stepped to find its interrupt windows (see
    // system.cpu.irq_window_step): they are taken at exits.
    assert_eq!(r.statf("system.cpu.irqWindowSteps"), 0.0);
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
}

/// The checkpoint /init took: a restore runs the workload from there to
/// its sim-ops exit, without booting, and its statistics go on from the
/// checkpoint's.
#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn shared_boot_restored_runs_the_workload_without_booting() {
    let Some(dir) = linux_guest("linux_restore") else {
        return;
    };
    let booted = shared_boot(&dir);
    let restored = restore("linux-restore", &booted, None);
    let rc = restored.file("serial.log");
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
        !rc.contains("Linux version") && !rc.contains("/init is running"),
        "the restored run booted:\n{rtail}"
    );
    let cp_tick: u64 = booted.checkpoint.file_name().unwrap().to_string_lossy()[4..]
        .parse()
        .unwrap();
    assert!(restored.json("exit.json")["tick"].as_u64().unwrap() > cp_tick);
    // Counters go on from their values at the checkpoint.
    let boot_dumps = booted.run.json("stats.json");
    let at_init = boot_dumps[0]["stats"]["system.cpu.numVMExits"]
        .as_u64()
        .unwrap();
    assert!(restored.stat("system.cpu.numVMExits").as_u64().unwrap() > at_init);
    eprintln!(
        "linux restore: from {:.1} s simulated to the end at {:.1} s in {:.1} s host",
        cp_tick as f64 * 1e-12,
        restored.statf("simSeconds"),
        restored.statf("hostSeconds")
    );
}

/// One checkpoint, many experiments: restores of it at the same time, each
/// with its own readfile script, run their scripts instead of the built-in
/// workload and end with the scripts' statuses.
#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn shared_boot_restored_side_by_side_runs_each_its_own_readfile_script() {
    let Some(dir) = linux_guest("linux_scripts") else {
        return;
    };
    let booted = shared_boot(&dir);
    let scripts = [
        (
            "linux-script-a",
            "echo KVMSIM-SCRIPT: a on $(uname -s)\nexit 3\n",
            3,
        ),
        (
            "linux-script-b",
            "i=0; while [ $i -lt 1000 ]; do i=$((i+1)); done\necho KVMSIM-SCRIPT: b counted $i\n",
            0,
        ),
    ];
    let runs: Vec<(Run, &str, i32)> = std::thread::scope(|s| {
        let handles: Vec<_> = scripts
            .iter()
            .map(|&(name, text, want)| {
                let booted = &booted;
                s.spawn(move || (restore(name, booted, Some(text)), name, want))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, name, want) in &runs {
        let console = r.file("serial.log");
        let tail = last_lines(&console, 30);
        assert_eq!(
            r.status, *want,
            "{name}: stderr:\n{}\nconsole:\n{tail}",
            r.stderr
        );
        assert!(
            console.contains("KVMSIM-INIT: running the readfile script"),
            "{name}:\n{tail}"
        );
        assert!(
            !console.contains("KVMSIM-WORKLOAD"),
            "{name}: the built-in workload ran:\n{tail}"
        );
        assert!(
            console.contains(&format!("KVMSIM-INIT: script status {want}")),
            "{name}:\n{tail}"
        );
        let bytes = scripts.iter().find(|s| s.0 == *name).unwrap().1.len() as u64;
        assert_eq!(r.stat("system.simops.readFileBytes").as_u64(), Some(bytes));
    }
    assert!(runs[0]
        .0
        .file("serial.log")
        .contains("KVMSIM-SCRIPT: a on Linux"));
    assert!(runs[1]
        .0
        .file("serial.log")
        .contains("KVMSIM-SCRIPT: b counted 1000"));
}

/// A kernel panic (here the one sysrq's crash trigger causes, from a
/// restored run's script) ends the run as a reset: the command line has
/// panic=-1 (reboot at once) and reboot=k (through the keyboard
/// controller). The console up to the panic is kept.
#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn shared_boot_restored_kernel_panic_ends_the_run_as_a_reset_and_keeps_the_console() {
    let Some(dir) = linux_guest("linux_panic") else {
        return;
    };
    let booted = shared_boot(&dir);
    let r = restore(
        "linux-panic",
        &booted,
        Some("echo KVMSIM-SCRIPT: crashing\necho c > /proc/sysrq-trigger\nsleep 100\n"),
    );
    let console = r.file("serial.log");
    assert_eq!(
        r.status,
        253,
        "stderr:\n{}\nconsole:\n{}",
        r.stderr,
        last_lines(&console, 30)
    );
    assert_eq!(r.json("exit.json")["cause"], "guest_reset");
    assert!(
        console.contains("KVMSIM-SCRIPT: crashing"),
        "console:\n{console}"
    );
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
    // The shared boot of the other tests runs meanwhile.
    start_shared_boot(&dir);
    let out = outdir("linux-smp");
    let r = boot_into(&dir, &out, &["--cpus", "2"]);
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

/// GDB on a restored Linux: a hardware breakpoint at a kernel function
/// (`__switch_to`: the first context switch after the restore) stops the
/// guest there, and the run then goes on to its end. Debian's own
/// System.map is a stub (the real one ships in the -dbg package), so the
/// address comes from the running kernel's /proc/kallsyms (the same
/// symbols; the command line has nokaslr), read by a first restore; `grep
/// -m1` stops the read early, since every line costs kernel work, which
/// is emulated on our hosts (the whole file: minutes).
#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, not(kvmsim_no_kvm), kvmsim_no_gdb),
    ignore = "needs /usr/bin/gdb (Debian: apt-get install gdb), which was not there when this test was built"
)]
fn shared_boot_restored_under_gdb_stops_at_a_kernel_function() {
    use std::io::BufRead;
    let Some(dir) = linux_guest("linux_gdb") else {
        return;
    };
    // The build decided that GDB is there (build.rs, `kvmsim_no_gdb`).
    assert!(
        Path::new("/usr/bin/gdb").exists(),
        "linux_gdb: /usr/bin/gdb is missing (install it, then touch crates/kvmsim/build.rs)"
    );
    let booted = shared_boot(&dir);
    // 1. The kernel's address of the context switch.
    let r = restore(
        "linux-gdb-syms",
        &booted,
        Some("grep -m1 ' __switch_to$' /proc/kallsyms | sed 's/^/KVMSIM-SYM: /'\n"),
    );
    let console = r.file("serial.log");
    assert_eq!(
        r.status,
        0,
        "stderr:\n{}\nconsole:\n{}",
        r.stderr,
        last_lines(&console, 20)
    );
    let line = console
        .lines()
        .find_map(|l| l.split("KVMSIM-SYM: ").nth(1))
        .unwrap_or_else(|| panic!("no symbol line:\n{}", last_lines(&console, 20)));
    let addr = u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap();
    assert!(addr >= 0xffff_ffff_8000_0000, "{line}");

    // 2. A restore under GDB: the guest soon switches tasks (/init starts
    // kvmsim-ops readfile).
    let out = outdir("linux-gdb");
    std::fs::create_dir_all(&*out).unwrap();
    let cp = booted.checkpoint.to_str().unwrap().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args([
            "run",
            "--restore",
            &cp,
            "--quiet",
            "--no-stdin",
            "--gdb",
            "127.0.0.1:0",
            "--outdir",
        ])
        .arg(out.join("run"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kvmsim runs");
    let stderr = child.stderr.take().unwrap();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = l.split("waiting for GDB on 127.0.0.1:").nth(1) {
                let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let _ = port_tx.send(port);
            }
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let port = match port_rx.recv_timeout(std::time::Duration::from_secs(300)) {
        Ok(p) => p,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kvmsim never waited for GDB:\n{}", reader.join().unwrap());
        }
    };
    let script = format!(
        "set pagination off\n\
         target remote 127.0.0.1:{port}\n\
         hbreak *{addr:#x}\n\
         continue\n\
         print/x $pc\n\
         monitor time\n\
         delete\n\
         continue\n"
    );
    let cmds = out.join("cmds.gdb");
    std::fs::write(&cmds, script).unwrap();
    let gdb = std::process::Command::new("/usr/bin/gdb")
        .args(["-batch", "-nx", "-x"])
        .arg(&cmds)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("gdb runs");
    let gdb_out = format!(
        "{}{}",
        String::from_utf8_lossy(&gdb.stdout),
        String::from_utf8_lossy(&gdb.stderr)
    );
    let status = child.wait().expect("kvmsim ends");
    let stderr = reader.join().unwrap();
    let has = |want: &str| gdb_out.lines().any(|l| l.contains(want));
    assert!(
        has(&format!("Hardware assisted breakpoint 1 at {addr:#x}")),
        "gdb:\n{gdb_out}\nkvmsim:\n{stderr}"
    );
    assert!(
        has(&format!("$1 = {addr:#x}")),
        "stopped elsewhere:\n{gdb_out}\nkvmsim:\n{stderr}"
    );
    assert!(has("simulated time: tick "), "gdb:\n{gdb_out}");
    assert_eq!(status.code(), Some(0), "gdb:\n{gdb_out}\nkvmsim:\n{stderr}");
    let console = std::fs::read_to_string(out.join("run/serial.log")).unwrap();
    assert!(
        console.contains("KVMSIM-INIT: workload status 0"),
        "the run did not finish its workload:\n{}",
        last_lines(&console, 20)
    );
}
