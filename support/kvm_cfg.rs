// Shared by the build scripts of crates/kvmsim and crates/platform
// (`include!`d): decides `kvmsim_no_kvm`, under which tests that need KVM
// are compiled as `#[ignore]`d, so `cargo test` counts them as ignored
// with the reason instead of reporting a skipped test as passed.

/// True if the environment variable `name` is `value` (and rebuilds when it changes).
#[allow(dead_code)]
fn env_is(name: &str, value: &str) -> bool {
    println!("cargo:rerun-if-env-changed={name}");
    std::env::var(name).as_deref() == Ok(value)
}

/// Sets `kvmsim_no_kvm` when the KVM device (`KVMSIM_KVM_DEVICE`, else
/// `/dev/kvm`) cannot be opened for reading and writing and
/// `KVMSIM_REQUIRE_KVM` is not 1.
fn decide_kvm_cfg() {
    println!("cargo:rustc-check-cfg=cfg(kvmsim_no_kvm)");
    println!("cargo:rerun-if-env-changed=KVMSIM_KVM_DEVICE");
    let device = std::env::var_os("KVMSIM_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    let device = std::path::Path::new(&device);
    if device.exists() {
        println!("cargo:rerun-if-changed={}", device.display());
    }
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .is_ok();
    if !usable && !env_is("KVMSIM_REQUIRE_KVM", "1") {
        println!("cargo:rustc-cfg=kvmsim_no_kvm");
        println!(
            "cargo:warning={} is not usable: the tests that need KVM are marked ignored",
            device.display()
        );
    }
}
