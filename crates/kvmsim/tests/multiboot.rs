//! Multiboot kernels on a real vCPU: the built-in `multiboot` guest is
//! entered in 32-bit protected mode, checks what it was handed (memory
//! map, command line, a module, fw_cfg, pc-testdev) and ends through
//! isa-debug-exit with the bits of its failed checks.

mod common;

use common::*;

const MODULE: &[u8] = b"KVMSIM-MODULE\nthe first module's payload\n";

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn multiboot_kernel_checks_its_boot_information() {
    if !kvm_or_skip("multiboot") {
        return;
    }
    let (dir, cfg) = config(
        "multiboot",
        "[sim]\nmax_time = \"10s\"\n[system]\nkernel = \"builtin:multiboot\"\n\
         append = \"mbcheck=kvmsim extra\"\ninitrd = \"mod.bin arg=1,env.txt\"\n\
         serial = { stdout = false }\n",
    );
    // Module paths are relative to the config file's folder.
    std::fs::write(dir.join("mod.bin"), MODULE).unwrap();
    std::fs::write(dir.join("env.txt"), b"NR_CPUS=1\n").unwrap();
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    let serial = r.file("serial.log");
    // Every check passed: the guest wrote 0, QEMU's status is 0 * 2 + 1.
    // Check 64 (the APIC off and on through IA32_APIC_BASE) needs the
    // user-space MSR filter, which kvmsim doctor reports.
    if !apic_base_filter() {
        assert!(serial.contains("failed checks 00000040\n"), "{serial}");
        return;
    }
    assert_eq!(r.status, 1, "stderr:\n{}\nserial:\n{serial}", r.stderr);
    let exit = r.json("exit.json");
    assert_eq!(exit["cause"], "debug_exit", "{exit}");
    assert_eq!(exit["code"], 1, "{exit}");
    assert!(
        exit["message"]
            .as_str()
            .unwrap()
            .contains("wrote 0x0 to port 0xf4"),
        "{exit}"
    );
    assert!(
        serial.contains("entered in 32-bit protected mode"),
        "{serial}"
    );
    assert!(
        serial.contains("command line: builtin:multiboot mbcheck=kvmsim extra\n"),
        "{serial}"
    );
    let sum: u32 = MODULE.iter().map(|&b| u32::from(b)).sum();
    assert!(
        serial.contains(&format!("module sum {sum:08x}\n")),
        "{serial}"
    );
    assert!(serial.contains("fw_cfg CPUs 00000001\n"), "{serial}");
    assert!(serial.contains("failed checks 00000000\n"), "{serial}");
    // Check 64 passed: the guest's IA32_APIC_BASE writes reached the APIC
    // (this host has the user-space MSR filter; see the next test).
    let c = r.json("config.json");
    let sys = &c["system"][0];
    assert_eq!(sys["platform"], "pc", "{sys}");
    assert_eq!(sys["cmdline"], "builtin:multiboot mbcheck=kvmsim extra");
    for s in ["debug_exit", "testdev", "fw_cfg"] {
        assert_eq!(sys["qemu"][s], true, "{s}: {sys}");
    }
    assert_eq!(r.stat("system.debugexit.writes"), 1);
}

/// Whether `kvmsim doctor` finds the user-space MSR filter on this host.
fn apic_base_filter() -> bool {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["probe"] == "user-space MSR filter (IA32_APIC_BASE)" && f["ok"] == true)
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn failed_checks_become_the_debug_exit_status() {
    if !kvm_or_skip("multiboot-fail") {
        return;
    }
    // No command-line token (check 8), no module (16), no fw_cfg (32).
    let (dir, cfg) = config(
        "multiboot-fail",
        "[sim]\nmax_time = \"10s\"\n[system]\nkernel = \"builtin:multiboot\"\n\
         serial = { stdout = false }\n[system.qemu]\nfw_cfg = false\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    r.no_panic();
    let serial = r.file("serial.log");
    assert!(serial.contains("failed checks 00000038\n"), "{serial}");
    assert_eq!(r.status, 0x38 * 2 + 1, "stderr:\n{}", r.stderr);
    assert_eq!(r.json("exit.json")["code"], 0x38 * 2 + 1);
    assert_eq!(r.json("config.json")["system"][0]["qemu"]["fw_cfg"], false);
}

#[test]
fn hostile_multiboot_headers_are_refused_by_name() {
    let dir = outdir("multiboot-bad");
    std::fs::create_dir_all(&dir).unwrap();
    // A header with required flag bit 5 set (unknown to every loader).
    let mut img = vec![0u8; 64];
    let (magic, flags) = (0x1BAD_B002u32, 1u32 << 5);
    for (i, w) in [magic, flags, 0u32.wrapping_sub(magic.wrapping_add(flags))]
        .iter()
        .enumerate()
    {
        img[8 + 4 * i..12 + 4 * i].copy_from_slice(&w.to_le_bytes());
    }
    let k = dir.join("bad.mb");
    std::fs::write(&k, &img).unwrap();
    let r = kvmsim(&["run", "--kernel", k.to_str().unwrap()], &dir.join("out"));
    r.no_panic();
    assert_eq!(r.status, 254, "{}", r.stderr);
    assert!(
        r.stderr.contains("bad.mb: Multiboot header flags = 0x20"),
        "{}",
        r.stderr
    );
    assert!(
        !dir.join("out").exists(),
        "nothing written for a refused image"
    );
}
