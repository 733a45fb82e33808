//! Checkpoints of running machines and restores of them: a guest stopped in
//! the middle (timers armed, YMM registers holding values, link messages
//! on their way, several CPUs) finishes after a restore exactly as it does
//! uninterrupted; bad restores are clear errors.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The checkpoint folders in `out` (cpt.TICK), by tick.
fn checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let tick = e.file_name().to_str()?.strip_prefix("cpt.")?.parse().ok()?;
            Some((tick, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// The state file's body (JSON) of checkpoint `dir`.
fn state(dir: &Path) -> serde_json::Value {
    let b = std::fs::read(dir.join("state.ckpt")).unwrap();
    serde_json::from_slice(&b[32..]).unwrap()
}

const CKPT_OUT: &str = "ckpt: periods=20 ymm=ok\n";

#[test]
fn a_guest_checkpointed_in_the_middle_finishes_alike_after_restores() {
    if !kvm_or_skip("restore_ckpt_guest") {
        return;
    }
    let d = outdir("restore-ckpt");
    let orig = d.join("orig");
    // The guest asks for the checkpoint itself (sim-op 0x43 from ring 3)
    // once its YMM registers are filled; its timer is armed.
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:ckpt",
            "--arg",
            "0",
            "--arg",
            "0",
            "--arg",
            "1",
            "--quiet",
        ],
        &orig,
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    // The run went on after the checkpoint.
    assert_eq!(r.file("serial.log"), CKPT_OUT);
    let cps = checkpoints(&orig);
    assert_eq!(cps.len(), 1, "{cps:?}");
    let (tick, cp) = &cps[0];
    let st = state(cp);
    let sys = &st["systems"][0];
    // The upper half of YMM0 (its third quadword, 0x030303030303035d) is in
    // the saved XSAVE area: the checkpoint caught the registers in use.
    let xsave = sys["cpus"][0]["vcpu"]["xsave"].as_str().unwrap();
    assert!(
        xsave.contains("5d03030303030303"),
        "YMM0's upper half not saved"
    );
    // The interval timer is armed: its deadline is a pending event.
    let events = sys["sim"]["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["event"]["device"].is_number()),
        "no device deadline pending: {events:?}"
    );
    for dev in ["uart", "timer", "simops"] {
        assert!(sys["devices"][dev].is_object() || sys["devices"][dev].is_null());
        assert!(sys["devices"].get(dev).is_some(), "{dev} not saved");
    }
    let exits_at_checkpoint = {
        let dumps = r.json("stats.json");
        // The only dump is the final one; the checkpoint's own counter was
        // saved: the restored run's counters start from it.
        dumps[0]["stats"]["system.cpu.numVMExits"].as_u64().unwrap()
    };

    // Two restores at once, each to the end: the same output.
    let cp_s = cp.to_string_lossy().into_owned();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let cp_s = &cp_s;
                let out = d.join(format!("restored{i}"));
                s.spawn(move || kvmsim(&["run", "--restore", cp_s, "--quiet"], &out))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &runs {
        assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
        assert_eq!(r.file("serial.log"), CKPT_OUT);
        let exit = r.json("exit.json");
        assert_eq!(exit["cause"], "guest_exit");
        assert!(exit["tick"].as_u64().unwrap() > *tick);
        // Counters go on from the checkpoint's values.
        let exits = r.stat("system.cpu.numVMExits").as_u64().unwrap();
        let saved = st["systems"][0]["sim"]["stats"]["values"]["system.cpu.numVMExits"]["count"]
            .as_u64()
            .unwrap();
        assert!(exits > saved, "{exits} exits, {saved} at the checkpoint");
        assert!(saved <= exits_at_checkpoint);
        let cfg = r.json("config.json");
        assert_eq!(cfg["restored_from"], cp_s.as_str());
    }
}

#[test]
fn checkpoint_exit_ends_the_run_and_a_restore_takes_a_new_limit() {
    if !kvm_or_skip("restore_checkpoint_exit") {
        return;
    }
    let d = outdir("restore-exit");
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:ckpt",
            "--checkpoint-at",
            "1500us",
            "--checkpoint-exit",
            "--quiet",
        ],
        &d.join("orig"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert_eq!(r.json("exit.json")["cause"], "checkpoint");
    assert_eq!(r.file("serial.log"), "", "the guest had not finished");
    let (tick, cp) = checkpoints(&d.join("orig")).remove(0);
    let cp = cp.to_string_lossy().into_owned();
    // A limit before the checkpoint is refused; a limit after it applies.
    let r = kvmsim(
        &["run", "--restore", &cp, "--max-time", "1ms"],
        &d.join("early"),
    );
    assert_eq!(r.no_panic().status, 254, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("--max-time"), "{}", r.stderr);
    let limit = format!("{}ps", tick + 100_000);
    let r = kvmsim(
        &["run", "--restore", &cp, "--max-time", &limit, "--quiet"],
        &d.join("limited"),
    );
    assert_eq!(r.no_panic().status, 250, "stderr:\n{}", r.stderr);
    assert_eq!(r.json("exit.json")["tick"], tick + 100_000);
    // What cannot change on a restore is refused by name.
    for flag in [
        ["--memory", "64MiB"],
        ["--cpus", "2"],
        ["--kernel", "builtin:hello"],
    ] {
        let r = kvmsim(
            &["run", "--restore", &cp, flag[0], flag[1]],
            &d.join("refused"),
        );
        assert_eq!(r.no_panic().status, 254, "{flag:?}: {}", r.stderr);
        assert!(r.stderr.contains(flag[0]), "{flag:?}: {}", r.stderr);
    }
}

#[test]
fn linked_systems_restore_with_their_messages() {
    if !kvm_or_skip("restore_pingpong") {
        return;
    }
    // A small host_factor: a guest's processing is short against the 1 ms
    // latency, so a message is nearly always on its way.
    let (dir, cfg) = config(
        "restore-pingpong",
        "[sim]\nquantum = \"1ms\"\n\
         [[system]]\nmemory = \"32MiB\"\nkernel = \"builtin:pingpong\"\nargs = [0, 20]\n\
         [system.cpu]\nhost_factor = 0.01\n[system.serial]\nstdout = false\n\
         [[system]]\nmemory = \"32MiB\"\nkernel = \"builtin:pingpong\"\nargs = [1, 20]\n\
         [system.cpu]\nhost_factor = 0.01\n[system.serial]\nstdout = false\n\
         [[link]]\nsystems = [0, 1]\nlatency = \"1ms\"\n",
    );
    let r = kvmsim(
        &["run", &cfg, "--checkpoint-at", "15500us"],
        &dir.join("orig"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let (_, cp) = checkpoints(&dir.join("orig")).remove(0);
    let st = state(&cp);
    assert_eq!(st["systems"].as_array().unwrap().len(), 2);
    // The one value bouncing between them is somewhere in the checkpoint:
    // on its way (a delivery event) or in a mailbox.
    let mut found = 0;
    for s in st["systems"].as_array().unwrap() {
        found += s["sim"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"]["link_deliver"].is_object())
            .count();
        found += s["devices"]["link0"]["rx"]
            .as_array()
            .map_or(0, |a| a.len());
    }
    assert!(found <= 1, "{found} values");
    let r2 = kvmsim(
        &["run", "--restore", cp.to_str().unwrap()],
        &dir.join("restored"),
    );
    assert_eq!(r2.no_panic().status, 0, "stderr:\n{}", r2.stderr);
    for (i, role) in [(0, "role=0 n=20"), (1, "role=1 n=20")] {
        let log = r2.file(&format!("serial.system{i}.log"));
        assert!(log.contains(role), "system{i}: {log}");
        // The counts and roles match the uninterrupted run's (the sums are
        // host-timed processing and may differ).
        let stable = |l: &str| {
            l.split(" rtt_sum")
                .next()
                .unwrap()
                .split(" proc_sum")
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(
            log.lines().map(stable).collect::<Vec<_>>(),
            r.file(&format!("serial.system{i}.log"))
                .lines()
                .map(stable)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn several_cpus_restore_each_in_its_place() {
    if !kvm_or_skip("restore_smp") {
        return;
    }
    let d = outdir("restore-smp");
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:smpboot",
            "--cpus",
            "2",
            "--arg",
            "2",
            "--arg",
            "200000000",
            "--checkpoint-at",
            "5ms",
            "--quiet",
        ],
        &d.join("orig"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let orig = r.file("serial.log");
    assert!(orig.contains("2 of 2 CPUs started"), "{orig}");
    let (_, cp) = checkpoints(&d.join("orig")).remove(0);
    let st = state(&cp);
    assert_eq!(st["systems"][0]["cpus"].as_array().unwrap().len(), 2);
    let r = kvmsim(
        &["run", "--restore", cp.to_str().unwrap(), "--quiet"],
        &d.join("restored"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let log = r.file("serial.log");
    assert!(log.contains("2 of 2 CPUs started"), "{log}");
}

#[test]
fn a_damaged_checkpoint_is_refused_before_anything_runs() {
    let d = outdir("restore-bad");
    std::fs::create_dir_all(d.join("cp")).unwrap();
    std::fs::write(d.join("cp/state.ckpt"), b"KVMSIMCP garbage").unwrap();
    let r = kvmsim(
        &["run", "--restore", d.join("cp").to_str().unwrap()],
        &d.join("out"),
    );
    assert_eq!(r.no_panic().status, 254, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("state.ckpt"), "{}", r.stderr);
    assert!(
        !d.join("out").exists(),
        "no output folder for a refused restore"
    );
}
