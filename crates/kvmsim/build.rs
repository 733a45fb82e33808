//! Decides which integration tests this build can run, so that `cargo test`
//! counts a test whose prerequisite is missing as *ignored* (with the
//! reason, in the summary line) instead of reporting a skipped test as
//! passed. libtest has no run-time "skipped" result; `#[ignore]` is decided
//! when the test is compiled, so the prerequisite is looked at here:
//!
//! - `kvmsim_no_kvm`: the KVM device (`KVMSIM_KVM_DEVICE`, else
//!   `/dev/kvm`) cannot be opened for reading and writing, and
//!   `KVMSIM_REQUIRE_KVM` is not 1. Tests that need KVM are then ignored.
//! - `kvmsim_linux_guest`: a Linux guest is expected: `KVMSIM_LINUX_DIR` is
//!   set or `KVMSIM_REQUIRE_LINUX=1` (as in CI). Without it the Linux boot
//!   tests are ignored; `-- --include-ignored` runs them with the guest in
//!   `target/linux-guest`.
//!
//! - `kvmsim_no_gdb`: `/usr/bin/gdb` is missing and `KVMSIM_REQUIRE_GDB`
//!   is not 1: the tests that drive the real GDB are ignored.
//! - `kvmsim_no_se_tools`: gcc is not on PATH, or neither apt-get nor
//!   `KVMSIM_BUSYBOX` can give a static busybox, and
//!   `KVMSIM_REQUIRE_SE_TOOLS` is not 1: the SE tests that run busybox or a
//!   C program compiled here are ignored.
//!
//! - `kvmsim_no_host_dynamic`: the host has no glibc loader at
//!   `/lib64/ld-linux-x86-64.so.2` or lacks one of the coreutils the SE
//!   tests run (`/usr/bin/{ls,cat,sort,sha256sum,md5sum,wc,mkdir}`), and
//!   `KVMSIM_REQUIRE_SE_TOOLS` is not 1: the SE tests of dynamically
//!   linked host programs are ignored.
//!
//! - `kvmsim_no_musl`: musl-gcc (Debian's musl-tools) is not on PATH, and
//!   neither `KVMSIM_REQUIRE_SE_TOOLS=1` nor `CI=true`: the SE tests of
//!   programs linked with musl are ignored.
//!
//! (After installing a tool, `touch crates/kvmsim/build.rs`.)
//!
//! A test that runs anyway (`cargo test -- --include-ignored`, or a test
//! binary run where KVM has since become unusable) checks its prerequisite
//! again: it fails with the reason where one is required, else skips with a
//! printed reason.

include!("../../support/kvm_cfg.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../../support/kvm_cfg.rs");
    println!("cargo:rustc-check-cfg=cfg(kvmsim_linux_guest)");
    println!("cargo:rustc-check-cfg=cfg(kvmsim_no_gdb)");
    println!("cargo:rustc-check-cfg=cfg(kvmsim_no_se_tools)");
    println!("cargo:rustc-check-cfg=cfg(kvmsim_no_host_dynamic)");
    println!("cargo:rustc-check-cfg=cfg(kvmsim_no_musl)");
    println!("cargo:rerun-if-env-changed=CI");
    println!("cargo:rerun-if-env-changed=KVMSIM_REQUIRE_GDB");
    println!("cargo:rerun-if-env-changed=KVMSIM_REQUIRE_SE_TOOLS");
    println!("cargo:rerun-if-env-changed=KVMSIM_BUSYBOX");
    let on_path = |tool: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
    };
    if !std::path::Path::new("/usr/bin/gdb").is_file() && !env_is("KVMSIM_REQUIRE_GDB", "1") {
        println!("cargo:rustc-cfg=kvmsim_no_gdb");
    }
    let busybox = std::env::var_os("KVMSIM_BUSYBOX").is_some() || on_path("apt-get");
    let have_tools = on_path("gcc") && busybox;
    if !have_tools && !env_is("KVMSIM_REQUIRE_SE_TOOLS", "1") {
        println!("cargo:rustc-cfg=kvmsim_no_se_tools");
    }
    if !on_path("musl-gcc") && !env_is("KVMSIM_REQUIRE_SE_TOOLS", "1") && !env_is("CI", "true") {
        println!("cargo:rustc-cfg=kvmsim_no_musl");
    }
    let dynamic = std::path::Path::new("/lib64/ld-linux-x86-64.so.2").exists()
        && ["ls", "cat", "sort", "sha256sum", "md5sum", "wc", "mkdir"]
            .iter()
            .all(|t| std::path::Path::new("/usr/bin").join(t).is_file());
    if !dynamic && !env_is("KVMSIM_REQUIRE_SE_TOOLS", "1") {
        println!("cargo:rustc-cfg=kvmsim_no_host_dynamic");
    }
    decide_kvm_cfg();

    // Decided by the environment alone, which cargo tracks exactly (a guest
    // folder made after the build could not be noticed without rebuilding
    // on every run).
    println!("cargo:rerun-if-env-changed=KVMSIM_LINUX_DIR");
    let dir_set = std::env::var_os("KVMSIM_LINUX_DIR").is_some_and(|d| !d.is_empty());
    if env_is("KVMSIM_REQUIRE_LINUX", "1") || dir_set {
        println!("cargo:rustc-cfg=kvmsim_linux_guest");
    }
}
