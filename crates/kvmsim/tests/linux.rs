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
    let r = boot("linux-boot", &dir, &[]);
    let console = r.file("serial.log");
    let tail: String = console
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
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
    let example = std::fs::read_to_string(repo().join("examples/linux.toml")).unwrap();
    let trim = example
        .lines()
        .find_map(|l| l.strip_prefix("append = \""))
        .and_then(|l| l.split('"').next())
        .expect("examples/linux.toml has an append line");
    let append = format!("{trim} rdinit=/no-such-init init=/no-such-init");
    let r = boot("linux-panic", &dir, &["--append", &append]);
    let console = r.file("serial.log");
    assert_eq!(r.status, 253, "stderr:\n{}", r.stderr);
    assert_eq!(r.json("exit.json")["cause"], "guest_reset");
    assert!(console.contains("Kernel panic"), "console:\n{console}");
    assert!(r.stderr.contains("guest reset"), "{}", r.stderr);
}
