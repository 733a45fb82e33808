//! Bad input gives a clear error, a non-zero status and no panic.

mod common;

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
