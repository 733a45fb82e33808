//! Fault injection (the `failpoints` feature; `FAILPOINTS` arms a fail
//! point of kvmsim's code as the `fail` crate documents): what a bug in
//! kvmsim does to a run of several threads, and of several MPI processes.
//!
//! `cargo test -p kvmsim --features failpoints --test failpoints` (add
//! `mpi` to the features for the distributed case; scripts/test.sh does
//! both where MPI is installed).

mod common;

use common::*;
use std::time::Duration;

/// A panic in a CPU thread (armed in the run's second thread, at its first
/// window end): the run ends promptly with kvmsim's error status, names
/// the thread and the panic, and keeps what it wrote; nobody waits for the
/// dead thread at the next window end.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_panicking_cpu_thread_ends_the_run_with_an_error_instead_of_a_hang() {
    if !kvm_or_skip("failpoint_thread_panic") {
        return;
    }
    // Two linked systems: two threads meeting at every window end.
    let text = std::fs::read_to_string(repo().join("examples/netpong.toml"))
        .unwrap()
        .replace(
            "platform = \"pc\"",
            "platform = \"pc\"\nserial = { stdout = false }",
        );
    let (dir, cfg) = config("failpoint-thread", &text);
    let out = dir.join("out");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kvmsim"));
    cmd.args(["run", &cfg, "--outdir"]).arg(&out).env(
        "FAILPOINTS",
        "cpu-thread-window-end=panic(injected by the test)",
    );
    let (status, _, stderr) = run_bounded(cmd, Duration::from_secs(600));
    assert_eq!(status, 254, "stderr:\n{stderr}");
    assert!(
        stderr.contains("kvmsim's thread kvmsim-system1-cpu0 panicked: injected by the test")
            && stderr.contains("a bug in kvmsim"),
        "{stderr}"
    );
    // What the run produced is on disk.
    for f in ["stats.txt", "serial.system0.log", "config.json"] {
        assert!(out.join(f).exists(), "{f} missing; stderr:\n{stderr}");
    }
    let stats = std::fs::read_to_string(out.join("stats.txt")).unwrap();
    assert!(stats.contains("simSeconds"), "{stats}");
}

#[cfg(feature = "mpi")]
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_panic_on_one_rank_ends_every_rank_instead_of_a_hang() {
    if !kvm_or_skip("failpoint_rank_panic") || !mpirun_or_skip("failpoint_rank_panic") {
        return;
    }
    // examples/switch.toml's three systems: rank 0 runs two of them (its
    // second thread panics), rank 1 the other, and waits for rank 0 at
    // every window.
    let text = std::fs::read_to_string(repo().join("examples/switch.toml"))
        .unwrap()
        .replace(
            "platform = \"pc\"",
            "platform = \"pc\"\nserial = { stdout = false }",
        )
        .replacen("args = [2, 10, 1514]", "args = [2, 10, 1514]\nrank = 1", 1)
        .replacen("args = [3, 4, 1514]", "args = [3, 4, 1514]\nrank = 0", 1);
    let (dir, cfg) = config("failpoint-rank", &text);
    let r = mpirun_env(
        2,
        &["run", &cfg],
        &dir.join("out"),
        &[(
            "FAILPOINTS",
            "cpu-thread-window-end=panic(injected by the test)",
        )],
        Duration::from_secs(600),
    );
    assert_ne!(r.status, 0, "stderr:\n{}", r.stderr);
    assert!(
        r.stderr
            .contains("kvmsim-system2-cpu0: kvmsim's thread panicked (injected by the test)")
            && r.stderr.contains("wait for this one: ending them all"),
        "{}",
        r.stderr
    );
}
