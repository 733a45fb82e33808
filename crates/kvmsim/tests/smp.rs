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
