//! The output folder across runs: a run that starts replaces every file of
//! the run before it (and only those), and a folder in use by a running
//! kvmsim is refused to a second one, which names the first's process.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_run_replaces_every_file_of_the_earlier_run_and_keeps_the_rest() {
    if !kvm_or_skip("replaces") {
        return;
    }
    let dir = outdir("replaces");
    std::fs::create_dir_all(&*dir).unwrap();
    for (f, text) in [
        ("stats.txt", "earlier"),
        ("trace.txt", "earlier"),
        ("cpu-samples.txt", "earlier"),
        ("cpu-dump.txt", "earlier"),
        ("serial.system1.log", "earlier"),
        ("notes.txt", "the user's own"),
    ] {
        std::fs::write(dir.join(f), text).unwrap();
    }
    let r = kvmsim(&["run", "--kernel", "builtin:hello", "--quiet"], &dir);
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(r.file("stats.txt").contains("simSeconds"));
    assert_eq!(r.file("serial.log"), "Hello from the guest\n");
    assert_eq!(r.json("exit.json")["cause"], "guest_exit");
    for gone in [
        "trace.txt",
        "cpu-samples.txt",
        "cpu-dump.txt",
        "serial.system1.log",
    ] {
        assert!(
            !dir.join(gone).exists(),
            "{gone} of the earlier run is left"
        );
    }
    assert_eq!(r.file("notes.txt"), "the user's own");
    for hidden in [".kvmsim.lock", ".kvmsim-new"] {
        assert!(!dir.join(hidden).exists(), "{hidden} left behind");
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_second_run_on_a_folder_in_use_is_refused_and_names_the_first() {
    if !kvm_or_skip("in_use") {
        return;
    }
    let dir = outdir("in-use-live");
    // The echo guest waits for input that never comes (stdin is closed).
    let mut first = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["run", "--kernel", "builtin:echo", "--quiet", "--outdir"])
        .arg(&*dir)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // config.json is written once the run has started.
    let start = Instant::now();
    while !dir.join("config.json").exists() {
        if let Some(st) = first.try_wait().unwrap() {
            panic!("the first run ended early: {st}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the first run did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = kvmsim(&["run", "--kernel", "builtin:hello"], &dir);
    let pid = first.id();
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let st = first.wait().unwrap();
    assert_eq!(second.no_panic().status, 254, "{}", second.stderr);
    assert!(
        second.stderr.contains("in use by another kvmsim run")
            && second.stderr.contains(&format!("process {pid}")),
        "{}",
        second.stderr
    );
    // The first run was not disturbed: it ends as interrupted, with its files.
    assert_eq!(st.code(), Some(130));
    let exit: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("exit.json")).unwrap()).unwrap();
    assert_eq!(exit["cause"], "user_interrupt");
    assert!(!dir.join(".kvmsim.lock").exists());
}
