//! Decides whether this build's integration tests can use KVM, so that
//! `cargo test` counts a test whose KVM is missing as *ignored* (with the
//! reason) instead of a skipped test reported as passed; the same rule as
//! crates/kvmsim/build.rs: `kvmsim_no_kvm` when the KVM device
//! (`KVMSIM_KVM_DEVICE`, else `/dev/kvm`) cannot be opened for reading and
//! writing and `KVMSIM_REQUIRE_KVM` is not 1.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(kvmsim_no_kvm)");
    println!("cargo:rerun-if-env-changed=KVMSIM_KVM_DEVICE");
    println!("cargo:rerun-if-env-changed=KVMSIM_REQUIRE_KVM");
    let device = std::env::var_os("KVMSIM_KVM_DEVICE").unwrap_or_else(|| "/dev/kvm".into());
    let device = Path::new(&device);
    if device.exists() {
        println!("cargo:rerun-if-changed={}", device.display());
    }
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .is_ok();
    let required = std::env::var("KVMSIM_REQUIRE_KVM").as_deref() == Ok("1");
    if !usable && !required {
        println!("cargo:rustc-cfg=kvmsim_no_kvm");
    }
}
