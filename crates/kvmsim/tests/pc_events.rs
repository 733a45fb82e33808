//! PC events (`[[system.cpu.pc_event]]`): the `pcevents` guest calls
//! `counted` N times, then `marker`, and reports the simulated time just
//! before the call and as `marker`'s first instruction. Counts are exact,
//! a stats dump at `marker` lies between the guest's two times, the exit
//! and checkpoint actions end the run there (and the checkpoint restores),
//! and bad events are refused before the guest starts.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The report line of the `pcevents` guest: (calls, before, at), times in ns.
fn report(serial: &str) -> (u64, u64, u64) {
    let line = serial
        .lines()
        .find(|l| l.starts_with("pcevents: "))
        .unwrap_or_else(|| panic!("no report in {serial:?}"));
    (
        field(line, "calls"),
        field(line, "before"),
        field(line, "at"),
    )
}

/// `finalTick` of every block of stats.txt, in order.
fn final_ticks(stats_txt: &str) -> Vec<u64> {
    stats_txt
        .lines()
        .filter(|l| l.starts_with("finalTick "))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect()
}

/// A config of the `pcevents` guest making `calls` calls, with `events`
/// (TOML `[[system.cpu.pc_event]]` tables) and `extra` at the end.
fn config_text(calls: u64, events: &[(&str, &str)], extra: &str) -> String {
    let mut t = format!(
        "[system]\nkernel = \"builtin:pcevents\"\nargs = [{calls}]\n[system.serial]\nstdout = false\n"
    );
    for (at, action) in events {
        t.push_str(&format!(
            "[[system.cpu.pc_event]]\nat = {at}\naction = \"{action}\"\n"
        ));
    }
    t.push_str(extra);
    t
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn counts_are_exact_and_a_dump_lands_at_the_guests_time() {
    if !kvm_or_skip("pc_events_count_dump") {
        return;
    }
    const N: u64 = 25;
    let (d, cfg) = config(
        "pcev-count",
        &config_text(
            N,
            &[("\"counted\"", "count"), ("\"marker\"", "dump_stats")],
            "",
        ),
    );
    let r = kvmsim(&["run", &cfg, "--no-stdin"], &d.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let (calls, before, at) = report(&r.file("serial.log"));
    assert_eq!(calls, N);
    // The event's dump, then the final one.
    let ticks = final_ticks(&r.file("stats.txt"));
    assert_eq!(ticks.len(), 2, "{ticks:?}");
    let dump = ticks[0];
    let json = r.json("stats.json");
    assert_eq!(json[0]["tick"].as_u64(), Some(dump));
    // The guest read the time (ns) before calling marker and as marker's
    // first instruction: the event lies between.
    assert!(
        before * 1000 <= dump && dump < (at + 1) * 1000,
        "dump at tick {dump}, guest times {before} ns and {at} ns"
    );
    for dump in [&json[0], &json[1]] {
        assert_eq!(dump["stats"]["system.cpu.pcEvents::counted"], N);
        assert_eq!(dump["stats"]["system.cpu.pcEvents::marker"], 1);
        assert_eq!(dump["stats"]["system.cpu.pcEvents::total"], N + 1);
    }
    assert!(r.file("stats.txt").contains("system.cpu.pcEvents::counted"));
    // config.json records the addresses the symbols resolved to.
    let c = r.json("config.json");
    let ev = &c["system"][0]["cpu"]["pc_event"];
    assert_eq!(ev[0]["at"], "counted");
    assert!(ev[0]["address"].as_u64().unwrap() >= 0x10_0000, "{ev}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn dump_and_reset_actions_and_a_system_map() {
    if !kvm_or_skip("pc_events_system_map") {
        return;
    }
    let d = outdir("pcev-map");
    std::fs::create_dir_all(&d).unwrap();
    // A System.map made as the kernel's is: nm over the ELF.
    let (st, _) = shell("\"$K\" guests --extract \"$D\" >/dev/null", &d);
    assert_eq!(st, 0);
    let (st, map) = shell("nm \"$D/pcevents.elf\"", &d);
    assert_eq!(st, 0);
    let map = map.replace(" counted\n", " counted_in_map\n");
    std::fs::write(d.join("System.map"), map).unwrap();
    // A reset at the first counted call, a dump-and-reset at marker.
    let text = config_text(
        4,
        &[
            ("\"counted_in_map\"", "reset_stats"),
            ("\"marker\"", "dump_reset_stats"),
        ],
        "",
    )
    .replacen("args = [4]\n", "args = [4]\nsymbols = \"System.map\"\n", 1);
    let cfg = d.join("c.toml");
    std::fs::write(&cfg, text).unwrap();
    let r = kvmsim(
        &["run", cfg.to_str().unwrap(), "--no-stdin"],
        &d.join("out"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let json = r.json("stats.json");
    let dumps = json.as_array().unwrap();
    assert_eq!(dumps.len(), 2);
    // The last reset was at the 4th call: the dump at marker counts marker
    // only; the final dump follows its reset.
    assert_eq!(dumps[0]["stats"]["system.cpu.pcEvents::counted_in_map"], 0);
    assert_eq!(dumps[0]["stats"]["system.cpu.pcEvents::marker"], 1);
    assert_eq!(dumps[1]["stats"]["system.cpu.pcEvents::marker"], 0);
    assert_eq!(report(&r.file("serial.log")).0, 4);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn exit_action_ends_the_run_there() {
    if !kvm_or_skip("pc_events_exit") {
        return;
    }
    let (d, cfg) = config(
        "pcev-exit",
        &config_text(3, &[("\"counted\"", "count"), ("\"marker\"", "exit")], ""),
    );
    let r = kvmsim(&["run", &cfg, "--no-stdin"], &d.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let exit = r.json("exit.json");
    let e = &exit;
    assert_eq!(e["cause"], "pc_event", "{exit}");
    assert!(
        e["message"].as_str().unwrap().contains("PC event marker"),
        "{exit}"
    );
    // It ended before marker's report.
    assert!(!r.file("serial.log").contains("pcevents:"));
    assert_eq!(r.stat("system.cpu.pcEvents::counted"), 3);
    assert!(r.stderr.contains("reached a PC event"), "{}", r.stderr);
}

/// The checkpoint folders in `out`.
fn checkpoints(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("cpt."))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn checkpoint_action_restores_past_the_event() {
    if !kvm_or_skip("pc_events_checkpoint") {
        return;
    }
    let (d, cfg) = config(
        "pcev-ckpt",
        &config_text(
            5,
            &[("\"counted\"", "count"), ("\"marker\"", "checkpoint")],
            "[sim]\ncheckpoint_exit = true\n",
        ),
    );
    let out = d.join("out");
    let r = kvmsim(&["run", &cfg, "--no-stdin"], &out);
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(!r.file("serial.log").contains("pcevents:"));
    let cpts = checkpoints(&out);
    assert_eq!(cpts.len(), 1, "{cpts:?}");
    // The restored guest goes on from marker: the event does not fire again
    // (no second checkpoint), and the counts go on from the saved ones.
    let out2 = d.join("restored");
    let r = kvmsim(
        &[
            "run",
            "--restore",
            cpts[0].to_str().unwrap(),
            "--no-stdin",
            "--quiet",
        ],
        &out2,
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let (calls, before, at) = report(&r.file("serial.log"));
    assert_eq!(calls, 5);
    assert!(before <= at);
    assert!(checkpoints(&out2).is_empty());
    assert_eq!(r.stat("system.cpu.pcEvents::counted"), 5);
    assert_eq!(r.stat("system.cpu.pcEvents::marker"), 1);
}

/// Runs a bad config; returns kvmsim's stderr after checking it failed as
/// a kvmsim error (254) before the guest ran.
fn refused(test: &str, text: &str) -> String {
    let (d, cfg) = config(test, text);
    let out = d.join("out");
    let r = kvmsim(&["run", &cfg, "--no-stdin"], &out);
    r.no_panic();
    assert_eq!(r.status, 254, "stderr:\n{}", r.stderr);
    assert!(!out.join("serial.log").exists(), "the guest ran");
    r.stderr
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn bad_events_are_refused_before_the_guest_starts() {
    if !kvm_or_skip("pc_events_bad") {
        return;
    }
    // An unknown symbol: the field, the value and where it was looked up.
    let e = refused(
        "pcev-nosym",
        &config_text(1, &[("\"counted\"", "count"), ("\"nosuch\"", "count")], ""),
    );
    assert!(
        e.contains("system.cpu.pc_event[1].at = \"nosuch\"")
            && e.contains("no symbol \"nosuch\"")
            && e.contains("builtin:pcevents"),
        "{e}"
    );
    // More distinct addresses than debug registers.
    let many: Vec<(String, &str)> = (0..5)
        .map(|i| (format!("{}", 0x10_0000 + i), "count"))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    let e = refused("pcev-many", &config_text(1, &many, ""));
    assert!(
        e.contains("5 distinct addresses") && e.contains("at most"),
        "{e}"
    );
    // A System.map that does not exist.
    let e = refused(
        "pcev-nomap",
        &config_text(1, &[("\"marker\"", "count")], "").replacen(
            "args = [1]\n",
            "args = [1]\nsymbols = \"missing.map\"\n",
            1,
        ),
    );
    assert!(
        e.contains("system.symbols") && e.contains("missing.map"),
        "{e}"
    );
}

#[test]
fn malformed_events_name_file_field_and_value() {
    // Config checks only: no KVM needed.
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "pcev-hex",
            "\"0xZZ\"",
            &["system.cpu.pc_event[0].at", "\"0xZZ\"", "hex"],
        ),
        (
            "pcev-neg",
            "-5",
            &["config.toml", "-5", "non-negative integer"],
        ),
        (
            "pcev-space",
            "\"two words\"",
            &["system.cpu.pc_event[0].at", "\"two words\""],
        ),
        ("pcev-float", "1.5", &["config.toml", "1.5", "symbol name"]),
    ];
    for (test, at, want) in cases {
        let (d, cfg) = config(test, &config_text(1, &[(at, "count")], ""));
        let r = kvmsim(&["run", &cfg, "--no-stdin"], &d.join("out"));
        assert_eq!(r.no_panic().status, 254, "{at}: {}", r.stderr);
        for w in *want {
            assert!(
                r.stderr.contains(w),
                "{at}: {w:?} missing from {}",
                r.stderr
            );
        }
        assert!(r.stderr.contains("config.toml"), "{}", r.stderr);
    }
    // An unknown action names the value and the choices.
    let (d, cfg) = config("pcev-action", &config_text(1, &[("1", "explode")], ""));
    let r = kvmsim(&["run", &cfg, "--no-stdin"], &d.join("out"));
    assert_eq!(r.no_panic().status, 254);
    assert!(
        r.stderr.contains("config.toml")
            && r.stderr.contains("explode")
            && r.stderr.contains("dump_reset_stats"),
        "{}",
        r.stderr
    );
    // Two events with the same name in the statistics.
    let (d, cfg) = config(
        "pcev-dup",
        &config_text(1, &[("\"marker\"", "count"), ("\"marker\"", "exit")], ""),
    );
    let r = kvmsim(&["run", &cfg, "--no-stdin"], &d.join("out"));
    assert_eq!(r.no_panic().status, 254);
    assert!(
        r.stderr.contains("system.cpu.pc_event[1].name") && r.stderr.contains("\"marker\""),
        "{}",
        r.stderr
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn several_cpus_count_their_own_hits_from_command_line_events() {
    if !kvm_or_skip("pc_events_smp") {
        return;
    }
    // smpboot on 3 CPUs: every CPU calls `record` once, only the APs run
    // `ap_main`. The events come from --pc-event (no config file).
    let d = outdir("pcev-smp");
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:smpboot",
            "--cpus",
            "3",
            "--arg",
            "3",
            "--arg",
            "1000",
            "--no-stdin",
            "--quiet",
            "--pc-event",
            "record:count",
            "--pc-event",
            "ap_main:count:ap",
        ],
        &d.join("out"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    assert!(r
        .file("serial.log")
        .contains("smpboot: 3 of 3 CPUs started"));
    let count = |cpu: usize, name: &str| {
        r.stat(&format!("system.cpu{cpu}.pcEvents::{name}"))
            .as_u64()
            .unwrap_or_else(|| panic!("cpu{cpu} {name}: {}", r.file("stats.txt")))
    };
    assert_eq!(
        [count(0, "record"), count(1, "record"), count(2, "record")],
        [1, 1, 1]
    );
    assert_eq!([count(0, "ap"), count(1, "ap"), count(2, "ap")], [0, 1, 1]);
    let total: u64 = (0..3).map(|c| count(c, "total")).sum();
    assert_eq!(total, 3 + 2, "{}", r.file("stats.txt"));
    // config.json holds them as [[system.cpu.pc_event]] entries.
    let c = r.json("config.json");
    let ev = &c["system"][0]["cpu"]["pc_event"];
    assert_eq!(ev[0]["at"], "record");
    assert_eq!(ev[0]["action"], "count");
    assert_eq!(ev[1]["name"], "ap");
}

#[test]
fn bad_command_line_events_name_the_flag_and_value() {
    // Flag checks only: refused before anything is built.
    let cases: &[(&str, &[&str])] = &[
        ("marker", &["AT:ACTION"]),
        ("marker:explode", &["\"explode\"", "dump_reset_stats"]),
        ("0xZZ:count", &["hex"]),
        ("marker:count:", &["name"]),
        ("a:b:c:d", &["AT:ACTION"]),
        ("two words:count", &["symbol name"]),
    ];
    for (i, (value, want)) in cases.iter().enumerate() {
        let d = outdir(&format!("pcev-flag{i}"));
        let r = kvmsim(
            &[
                "run",
                "--kernel",
                "builtin:pcevents",
                "--no-stdin",
                "--pc-event",
                value,
            ],
            &d.join("out"),
        );
        assert_eq!(r.no_panic().status, 254, "{value}: {}", r.stderr);
        assert!(r.stderr.contains("--pc-event"), "{value}: {}", r.stderr);
        assert!(r.stderr.contains(value), "{value}: {}", r.stderr);
        for w in *want {
            assert!(
                r.stderr.contains(w),
                "{value}: {w:?} missing from {}",
                r.stderr
            );
        }
        assert!(!d.join("out").exists(), "{value}: nothing is written");
    }
}
