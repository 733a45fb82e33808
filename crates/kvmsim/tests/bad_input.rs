//! Bad input gives a clear error, a non-zero status and no panic.

mod common;

use std::process::Command;

use common::*;

fn expect_error(r: &Run, needles: &[&str]) {
    r.no_panic();
    assert_eq!(r.status, 254, "stderr:\n{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "{n:?} missing from:\n{}", r.stderr);
    }
}

fn write(dir: &std::path::Path, name: &str, text: &[u8]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn missing_config_file() {
    let out = outdir("missing-config");
    let r = kvmsim(&["run", "/nonexistent/x.toml"], &out);
    expect_error(&r, &["/nonexistent/x.toml", "No such file"]);
}

#[test]
fn malformed_configs_name_file_line_and_field() {
    let dir = outdir("bad-config");
    let f = write(
        &dir,
        "a.toml",
        b"[system]\nkernel = \"builtin:hello\"\nmemroy = \"64MiB\"\n",
    );
    let r = kvmsim(&["run", &f], &dir.join("o1"));
    expect_error(&r, &["a.toml", "line 3", "memroy"]);

    let f = write(
        &dir,
        "b.toml",
        b"[system]\nkernel = \"builtin:hello\"\nmemory = \"64 parsecs\"\n",
    );
    let r = kvmsim(&["run", &f], &dir.join("o2"));
    expect_error(&r, &["b.toml", "line 3", "unknown size unit"]);

    let f = write(&dir, "c.toml", b"[system\nkernel = 3\n");
    let r = kvmsim(&["run", &f], &dir.join("o3"));
    expect_error(&r, &["c.toml", "line 1"]);

    let f = write(&dir, "d.toml", b"[system]\nkernel = \"builtin:nosuch\"\n");
    let r = kvmsim(&["run", &f], &dir.join("o4"));
    expect_error(&r, &["d.toml", "system.kernel", "no such built-in guest"]);

    let r = kvmsim(
        &["run", "--kernel", "builtin:hello", "--memory", "lots"],
        &dir.join("o5"),
    );
    expect_error(&r, &["--memory", "lots"]);

    let r = kvmsim(&["run"], &dir.join("o6"));
    expect_error(&r, &["nothing to run"]);

    let r = kvmsim(
        &["run", "--kernel", "builtin:hello", "--trace", "many@1s"],
        &dir.join("o7"),
    );
    expect_error(&r, &["--trace", "\"many\" is not an instruction count"]);

    let f = write(
        &dir,
        "e.toml",
        b"[system]\nkernel = \"builtin:hello\"\n[system.cpu]\ntrace = { insts = 0 }\n",
    );
    let r = kvmsim(&["run", &f], &dir.join("o8"));
    expect_error(&r, &["e.toml", "system.cpu.trace.insts", "at least 1"]);
}

#[test]
fn kernel_that_is_not_an_elf() {
    let dir = outdir("not-elf");
    let f = write(&dir, "k.bin", b"MZ this is not an ELF file");
    let r = kvmsim(&["run", "--kernel", &f], &dir.join("o"));
    expect_error(&r, &["k.bin", "not an ELF file"]);
    let r = kvmsim(&["run", "--kernel", "/nonexistent/kernel"], &dir.join("o2"));
    expect_error(&r, &["/nonexistent/kernel", "cannot read kernel"]);
}

#[test]
fn kernel_segments_outside_ram() {
    // Checked before KVM is opened, so this runs everywhere.
    let dir = outdir("outside-ram");
    let r = kvmsim(
        &["run", "--kernel", "builtin:hello", "--memory", "1MiB"],
        &dir,
    );
    expect_error(&r, &["builtin:hello", "outside guest RAM"]);
}

#[test]
fn missing_kvm_device_says_what_to_do() {
    let dir = outdir("no-kvm");
    let r = kvmsim_env(
        &["run", "--kernel", "builtin:hello"],
        &dir,
        &[("KVMSIM_KVM_DEVICE", "/nonexistent/kvm")],
    );
    expect_error(&r, &["/nonexistent/kvm does not exist", "modprobe"]);
    assert_eq!(r.stderr.lines().count(), 1, "one line:\n{}", r.stderr);
    let r = kvmsim_env(
        &["run", "--kernel", "builtin:hello"],
        &dir,
        &[("KVMSIM_KVM_DEVICE", "/dev/null")],
    );
    expect_error(&r, &["/dev/null is not a KVM device"]);
}

/// Well inside what a prompt refusal takes, even on a busy host.
const PROMPT: std::time::Duration = std::time::Duration::from_secs(120);

#[test]
fn kernels_and_initrds_that_are_not_regular_files_or_too_large_are_refused() {
    let dir = outdir("special-files");
    std::fs::create_dir_all(&*dir).unwrap();
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = dir.join("big.img");
    // Sparse: no disk space.
    std::fs::File::create(&big)
        .unwrap()
        .set_len((1 << 30) + 1)
        .unwrap();
    let d = dir.to_str().unwrap();
    for (kernel, needles) in [
        ("/dev/zero", &["kernel /dev/zero", "a character device"][..]),
        (
            fifo.to_str().unwrap(),
            &["a FIFO", "not a regular file"][..],
        ),
        (d, &["a directory"][..]),
        (
            big.to_str().unwrap(),
            &["1073741825 bytes", "limit for kernel images"][..],
        ),
    ] {
        let r = kvmsim_bounded(&["run", "--kernel", kernel], &dir.join("o"), PROMPT);
        expect_error(&r, needles);
        assert!(!dir.join("o").exists(), "the output folder was created");
    }
    // An initrd: a regular file that fits in guest RAM.
    let r = kvmsim_bounded(
        &["run", "--kernel", "builtin:hello", "--initrd", "/dev/zero"],
        &dir.join("o"),
        PROMPT,
    );
    expect_error(&r, &["initrd /dev/zero", "a character device"]);
    let r = kvmsim_bounded(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--memory",
            "64MiB",
            "--initrd",
            big.to_str().unwrap(),
        ],
        &dir.join("o"),
        PROMPT,
    );
    expect_error(&r, &["initrd", "must fit in guest RAM"]);
}

#[test]
fn zero_latency_links_are_refused_instead_of_hanging() {
    let (dir, cfg) = config(
        "zero-latency",
        "[[system]]\nkernel = \"builtin:hello\"\n[[system]]\nkernel = \"builtin:hello\"\n\
         [[link]]\nsystems = [0, 1]\nlatency = \"0s\"\n",
    );
    let r = kvmsim_bounded(&["run", &cfg], &dir.join("o"), PROMPT);
    expect_error(
        &r,
        &["config.toml", "link[0].latency = 0", "longer than zero"],
    );
}

#[test]
fn unusable_values_are_refused_with_the_field() {
    let dir = outdir("values");
    let (d, cfg) = config(
        "values-stack",
        "[system]\nkernel = \"builtin:hello\"\nmemory = \"64MiB\"\nstack = 0x10000000\n",
    );
    let r = kvmsim(&["run", &cfg], &d.join("o"));
    expect_error(&r, &["system.stack = 0x10000000", "guest RAM", "0x4000000"]);
    let (d, cfg) = config(
        "values-hf",
        "[system]\nkernel = \"builtin:hello\"\n[system.cpu]\nhost_factor = 1e300\n",
    );
    let r = kvmsim(&["run", &cfg], &d.join("o"));
    expect_error(&r, &["system.cpu.host_factor = 1e300", "(0, 1000]"]);
    // More guest RAM than the host has.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let more = format!("{}MiB", total_kib / 1024 + 1024);
    let r = kvmsim(
        &["run", "--kernel", "builtin:hello", "--memory", &more],
        &dir.join("o1"),
    );
    expect_error(&r, &["system.memory", "more than this host's RAM"]);
    assert!(!dir.join("o1").exists());
    // Minutes and hours are durations.
    let r = kvmsim(
        &["run", "--kernel", "/nonexistent/k", "--max-time", "2min"],
        &dir.join("o2"),
    );
    expect_error(&r, &["cannot read kernel /nonexistent/k"]);
    let r = kvmsim(
        &["run", "--kernel", "/nonexistent/k", "--max-time", "1.5h"],
        &dir.join("o3"),
    );
    expect_error(&r, &["cannot read kernel /nonexistent/k"]);
}

/// Files of an earlier run in `dir`, by name and content.
fn earlier_run(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let files = [
        ("stats.txt", "earlier stats.txt\n"),
        ("stats.json", "[\"earlier stats.json\"]\n"),
        ("exit.json", "{\"earlier\": true}\n"),
        ("config.json", "{\"earlier config\": true}\n"),
        ("serial.log", "earlier console\n"),
    ];
    for (f, text) in files {
        std::fs::write(dir.join(f), text).unwrap();
    }
    files.iter().map(|(f, t)| (*f, t.to_string())).collect()
}

fn unchanged(dir: &std::path::Path, files: &[(&str, String)]) {
    for (f, text) in files {
        let now = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        assert_eq!(&now, text, "{f} of the earlier run changed");
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = files.iter().map(|(f, _)| f.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "files left behind in {}", dir.display());
}

#[test]
fn a_failed_run_keeps_the_earlier_results() {
    let dir = outdir("keeps-earlier");
    let out = dir.join("out");
    let files = earlier_run(&out);
    let o = out.to_str().unwrap();
    // Refused before the folder is touched.
    let r = kvmsim(&["run", "--kernel", "/etc/passwd"], &out);
    expect_error(&r, &["/etc/passwd", "not an ELF file"]);
    unchanged(&out, &files);
    let r = kvmsim(&["run", "--kernel", "/nonexistent/k"], &out);
    expect_error(&r, &["cannot read kernel"]);
    unchanged(&out, &files);
    // Failing while the systems are built (KVM cannot be opened).
    let r = kvmsim_env(
        &["run", "--kernel", "builtin:hello"],
        &out,
        &[("KVMSIM_KVM_DEVICE", "/dev/null")],
    );
    expect_error(&r, &["/dev/null is not a KVM device"]);
    unchanged(&out, &files);
    // A folder that did not exist is not left behind.
    let fresh = dir.join("fresh");
    let r = kvmsim_env(
        &["run", "--kernel", "builtin:hello"],
        &fresh,
        &[("KVMSIM_KVM_DEVICE", "/dev/null")],
    );
    expect_error(&r, &["/dev/null is not a KVM device"]);
    assert!(!fresh.exists(), "{o}");
}

#[test]
fn a_folder_in_use_by_another_run_is_refused_with_its_process() {
    let dir = outdir("in-use");
    let out = dir.join("out");
    let files = earlier_run(&out);
    // This test process holds the folder, as a running kvmsim would.
    let held = platform::OutDir::stage(&out).unwrap();
    let r = kvmsim(&["run", "--kernel", "builtin:hello"], &out);
    expect_error(
        &r,
        &[
            "in use by another kvmsim run",
            &format!("process {}", std::process::id()),
        ],
    );
    drop(held);
    unchanged(&out, &files);
}

#[test]
fn bad_disk_images_are_refused_before_the_guest_starts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = outdir("bad-disks");
    std::fs::create_dir_all(&dir).unwrap();
    let o = |n: &str| dir.join(n);
    let run = |args: &[&str], out: &str| {
        let mut a = vec!["run", "--kernel", "builtin:hello"];
        a.extend_from_slice(args);
        kvmsim(&a, &o(out))
    };
    let missing = dir.join("missing.img");
    let r = run(&["--disk", missing.to_str().unwrap()], "o1");
    expect_error(&r, &["system.disk[0]", "missing.img", "No such file"]);
    let r = run(&["--disk", dir.to_str().unwrap()], "o2");
    expect_error(&r, &["system.disk[0]", "is a directory"]);
    let odd = write(&dir, "odd.img", &[0u8; 1000]);
    let r = run(&["--disk", &odd], "o3");
    expect_error(&r, &["odd.img", "1000 bytes", "not a multiple of 512"]);
    let ro = write(&dir, "ro.img", &[0u8; 4096]);
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let r = run(&["--disk", &ro], "o4");
    expect_error(&r, &["ro.img", "read-only but was given as writable"]);
    let existing = write(&dir, "exists.cow", b"keep me");
    let cfg = write(
        &dir,
        "cow.toml",
        b"[system]\nkernel = \"builtin:hello\"\nplatform = \"pc\"\n[[system.disk]]\npath = \"ro.img\"\noverlay = \"exists.cow\"\n",
    );
    let r = kvmsim(&["run", &cfg], &o("o5"));
    expect_error(&r, &["exists.cow", "already exists"]);
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    let cfg = write(
        &dir,
        "both.toml",
        b"[system]\nkernel = \"builtin:hello\"\n[[system.disk]]\npath = \"ro.img\"\nreadonly = true\noverlay = \"x.cow\"\n",
    );
    let r = kvmsim(&["run", &cfg], &o("o6"));
    expect_error(&r, &["both.toml", "system.disk[0].overlay", "not both"]);
    let cfg = write(
        &dir,
        "bare.toml",
        b"[system]\nkernel = \"builtin:hello\"\nplatform = \"bare\"\n[[system.disk]]\npath = \"ro.img\"\nreadonly = true\n",
    );
    let r = kvmsim(&["run", &cfg], &o("o7"));
    expect_error(&r, &["bare.toml", "disks need the pc platform"]);
    let cfg = write(
        &dir,
        "bw.toml",
        b"[system]\nkernel = \"builtin:hello\"\n[[system.disk]]\npath = \"ro.img\"\nbandwidth = \"0/s\"\n",
    );
    let r = kvmsim(&["run", &cfg], &o("o8"));
    expect_error(&r, &["bw.toml", "bandwidth", "at least 1 B/s"]);
    for n in ["o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"] {
        assert!(!o(n).exists(), "{n}: nothing written");
    }
}
