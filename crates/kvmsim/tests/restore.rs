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
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
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
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
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
    // The host factor may change, with a word on what the guest's TSC does;
    // the restored run finishes as the guest would.
    let r = kvmsim(
        &["run", "--restore", &cp, "--host-factor", "0.5", "--quiet"],
        &d.join("factor"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert_eq!(
        r.json("config.json")["system"][0]["cpu"]["host_factor"],
        0.5
    );
    assert!(
        r.stderr
            .contains("host_factor 0.5 after a checkpoint taken at 1"),
        "{}",
        r.stderr
    );
    assert!(
        r.file("serial.log").contains("ymm=ok"),
        "{}",
        r.file("serial.log")
    );
    let r = kvmsim(
        &["run", "--restore", &cp, "--host-factor", "0"],
        &d.join("factor0"),
    );
    assert_eq!(r.no_panic().status, 254, "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("host_factor"), "{}", r.stderr);
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
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
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
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
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

/// Disks in a checkpoint (the `pcirq` guest on the PC platform, which
/// never touches its disks; the sectors' path through the layers is
/// tested in devices::disk): an overlay disk's sector file, a read-only
/// and a writable image identified; restores put the overlay disk's new
/// overlay in their own output folder, warn about the writable image, and
/// refuse an image or sector file that is not the checkpoint's.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn disks_are_saved_identified_and_restored_with_an_overlay_of_their_own() {
    if !kvm_or_skip("restore_disks") {
        return;
    }
    let (d, cfg) = config(
        "restore-disks",
        "[sim]\nmax_time = \"1s\"\n[system]\nkernel = \"builtin:pcirq\"\nplatform = \"pc\"\n\
         serial = { stdout = false }\n\
         [[system.disk]]\npath = \"base.img\"\noverlay = \"first.cow\"\n\
         [[system.disk]]\npath = \"ro.img\"\nreadonly = true\n\
         [[system.disk]]\npath = \"rw.img\"\n",
    );
    let img: Vec<u8> = (0..256 * 512u32).map(|i| (i % 253) as u8).collect();
    for f in ["base.img", "ro.img", "rw.img"] {
        std::fs::write(d.join(f), &img).unwrap();
    }
    let r = kvmsim(
        &["run", &cfg, "--checkpoint-at", "5ms", "--checkpoint-exit"],
        &d.join("orig"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert_eq!(r.json("exit.json")["cause"], "checkpoint");
    assert!(
        r.stderr.contains("system.disk2") && r.stderr.contains("writable image"),
        "a warning names the writable disk:\n{}",
        r.stderr
    );
    let (_, cp) = checkpoints(&d.join("orig")).remove(0);
    let disks = state(&cp)["systems"][0]["disks"].clone();
    assert_eq!(disks[0]["mode"], "overlay");
    assert_eq!(disks[0]["saved"]["file"], "system.disk0.sectors");
    assert_eq!(disks[0]["saved"]["extents"], serde_json::json!([]));
    assert_eq!(disks[1]["mode"], "readonly");
    assert_eq!(disks[2]["mode"], "writable");
    assert_eq!(disks[0]["image"]["size"], 256 * 512);
    let base = std::fs::canonicalize(d.join("base.img")).unwrap();
    assert_eq!(disks[0]["image"]["path"], base.to_str().unwrap());
    let sectors = cp.join("system.disk0.sectors");
    assert_eq!(std::fs::metadata(&sectors).unwrap().len(), 256 * 512);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["checkpoint", "info"])
        .arg(&cp)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(
        info.contains("system.disk0: overlay")
            && info.contains("written sectors 0 bytes in system.disk0.sectors")
            && info.contains("system.disk1: readonly")
            && info.contains("system.disk2: writable")
            && info.contains("contents not saved"),
        "{info}"
    );
    // The first run's overlay exists now (as after a run that wrote): a
    // restore does not use it.
    std::fs::write(d.join("first.cow"), b"the first run's").unwrap();
    let cps = cp.to_string_lossy().into_owned();
    // Two restores at once, each with its own overlay.
    let runs: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = ["r1", "r2"]
            .iter()
            .map(|n| {
                let (cps, out) = (&cps, d.join(n));
                s.spawn(move || kvmsim(&["run", "--restore", cps], &out))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, n) in runs.iter().zip(["r1", "r2"]) {
        assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
        assert_eq!(r.json("exit.json")["cause"], "guest_exit");
        let overlay = d.join(n).join("system.disk0.cow");
        assert!(
            r.stderr
                .contains(&format!("this run's writes go to {}", overlay.display())),
            "{}",
            r.stderr
        );
        assert!(
            r.stderr.contains("system.disk2") && r.stderr.contains("opened as it is now"),
            "{}",
            r.stderr
        );
        let c = r.json("config.json");
        assert_eq!(
            c["system"][0]["disk"][0]["overlay"],
            overlay.to_str().unwrap()
        );
    }
    assert_eq!(
        std::fs::read(d.join("first.cow")).unwrap(),
        b"the first run's"
    );
    assert_eq!(std::fs::read(d.join("base.img")).unwrap(), img);

    // Images that are not the checkpoint's, and damaged sector files.
    let refused = |what: &str, want: &[&str]| {
        let r = kvmsim(&["run", "--restore", &cps], &d.join("refused"));
        assert_eq!(r.no_panic().status, 254, "{what}: {}", r.stderr);
        for w in want {
            assert!(r.stderr.contains(w), "{what}: {w:?} not in:\n{}", r.stderr);
        }
        assert!(!d.join("refused").exists(), "{what}: nothing was written");
    };
    let mut longer = img.clone();
    longer.extend_from_slice(&[0; 512]);
    std::fs::write(d.join("base.img"), &longer).unwrap();
    refused(
        "a longer base",
        &[
            "system.disk0",
            "base.img",
            "131584 bytes",
            "131072 at the checkpoint",
        ],
    );
    std::fs::write(d.join("base.img"), &img).unwrap();
    let mut changed = img.clone();
    changed[1024] ^= 0xff;
    std::fs::write(d.join("ro.img"), &changed).unwrap();
    refused(
        "a changed read-only image",
        &["system.disk1", "ro.img", "changed since the checkpoint"],
    );
    // The same bytes again, with a new modification time: a warning.
    std::fs::write(d.join("ro.img"), &img).unwrap();
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&sectors)
        .unwrap();
    f.set_len(100 * 512).unwrap();
    refused(
        "a truncated sector file",
        &["system.disk0.sectors", "51200 bytes", "truncated"],
    );
    f.set_len(256 * 512).unwrap();
    let r = kvmsim(&["run", "--restore", &cps], &d.join("r3"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(
        r.stderr.contains("system.disk1") && r.stderr.contains("another modification time"),
        "{}",
        r.stderr
    );
    std::fs::remove_file(&sectors).unwrap();
    refused("a missing sector file", &["system.disk0.sectors"]);
}

/// A checkpoint holds systems that still run: asked for after one system
/// ended, none is taken, the run says so by name and goes on to its end.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_checkpoint_after_a_system_ended_is_declined_by_name_and_the_run_goes_on() {
    if !kvm_or_skip("restore_ended") {
        return;
    }
    let (_d, cfg) = config(
        "restore-ended",
        "[[system]]\nkernel = \"builtin:hello\"\n[system.serial]\nstdout = false\n\
         [[system]]\nkernel = \"builtin:ckpt\"\nargs = [200000, 200]\n[system.serial]\nstdout = false\n",
    );
    let out = outdir("restore-ended-out");
    let r = kvmsim_bounded(
        // hello ends within a few ms; ckpt spins for 40 ms.
        &["run", &cfg, "--checkpoint-at", "20ms", "--no-stdin"],
        &out,
        std::time::Duration::from_secs(120),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(
        r.stderr.contains("not taken: system0 has already ended"),
        "{}",
        r.stderr
    );
    assert!(checkpoints(&out).is_empty(), "a checkpoint folder was left");
    assert!(r.file("serial.system0.log").contains("Hello"));
    assert_eq!(r.file("serial.system1.log"), "ckpt: periods=200 ymm=ok\n");
    let exits = r.json("exit.json");
    assert_eq!(exits["systems"][0]["cause"], "guest_exit");
    assert_eq!(exits["systems"][1]["cause"], "guest_exit");
}

/// A run of several systems goes on after its checkpoint: the CPU threads
/// that resume are new, and each binds its CPU's run timer to itself again
/// (before the fix, nothing forced a guest spinning in ring 3 out of KVM:
/// the run crawled at about 50 simulated us per host second, minutes for
/// these 18 ms; with it, about a second). The checkpoint restores to the
/// same results.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn several_systems_run_on_after_a_checkpoint_and_restore_alike() {
    if !kvm_or_skip("restore_run_on") {
        return;
    }
    let sys = "[[system]]\nkernel = \"builtin:ckpt\"\nargs = [200000, 100]\n\
               [system.serial]\nstdout = false\n";
    let (_d, cfg) = config("restore-run-on", &format!("{sys}{sys}"));
    let out = outdir("restore-run-on-out");
    let r = kvmsim_bounded(
        &["run", &cfg, "--checkpoint-at", "2ms", "--no-stdin"],
        &out.join("orig"),
        std::time::Duration::from_secs(120),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let want = "ckpt: periods=100 ymm=ok\n";
    for s in ["serial.system0.log", "serial.system1.log"] {
        assert_eq!(r.file(s), want, "{s}");
    }
    let (_, cp) = checkpoints(&out.join("orig")).remove(0);
    let r = kvmsim_bounded(
        &["run", "--restore", cp.to_str().unwrap(), "--no-stdin"],
        &out.join("restored"),
        std::time::Duration::from_secs(120),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    for s in ["serial.system0.log", "serial.system1.log"] {
        assert_eq!(r.file(s), want, "restored {s}");
    }
}
