//! `kvmsim sweep` and `kvmsim collect`: a grid of runs, locally and as a
//! Slurm array job, gathered into one table.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::*;

/// Runs kvmsim with `args` (no --outdir added): status and stderr.
fn kvmsim_cmd(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot start kvmsim");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&read(p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const BASE: &str = r#"
[system]
memory = "64MiB"
kernel = "builtin:compute"
args = [1000]
"#;

/// 2 host factors x 3 loop lengths.
const GRID: &str = r#"
config = "base.toml"

[[param]]
key = "system.cpu.host_factor"
values = [1.0, 2.0]

[[param]]
key = "system.args"
name = "iterations"
values = [[1000], [200000], [3000000]]
"#;

const FACTORS: [f64; 2] = [1.0, 2.0];
const ITERATIONS: [u64; 3] = [1000, 200000, 3000000];

/// The table `kvmsim collect` wrote: one map per row, column name to text.
fn table(csv_path: &Path) -> Vec<HashMap<String, String>> {
    let mut r = csv::Reader::from_path(csv_path).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            header
                .iter()
                .cloned()
                .zip(rec.iter().map(String::from))
                .collect()
        })
        .collect()
}

/// Checks run folder `dir` (run `i` of GRID) against what its params say.
fn check_run(dir: &Path, i: usize) {
    let (factor, iters) = (FACTORS[i / 3], ITERATIONS[i % 3]);
    let p = json(&dir.join("params.json"));
    assert_eq!(p["params"]["system.cpu.host_factor"], factor, "{p}");
    assert_eq!(p["params"]["iterations"], serde_json::json!([iters]), "{p}");
    let exit = json(&dir.join("exit.json"));
    assert_eq!(exit["cause"], "guest_exit", "{}: {exit}", dir.display());
    assert_eq!(exit["status"], 0);
    // The run had the params: the config it ran with, and what the guest did.
    let cfg = json(&dir.join("config.json"));
    assert_eq!(cfg["system"][0]["cpu"]["host_factor"], factor, "{cfg}");
    assert_eq!(cfg["system"][0]["args"], serde_json::json!([iters]));
    let serial = read(&dir.join("serial.log"));
    assert!(
        serial.contains(&format!("compute: iterations={iters} ")),
        "{serial}"
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_six_run_sweep_runs_locally_and_as_a_slurm_array_and_collect_tabulates_it() {
    if !kvm_or_skip("sweep_six_runs") {
        return;
    }
    let dir = outdir("sweep-six");
    std::fs::create_dir_all(&*dir).unwrap();
    std::fs::write(dir.join("base.toml"), BASE).unwrap();
    let sweep = dir.join("sweep.toml");
    std::fs::write(&sweep, GRID).unwrap();

    // Locally, two at a time.
    let local = dir.join("local");
    let (st, err) = kvmsim_cmd(&["sweep", s(&sweep), "--jobs", "2", "--outdir", s(&local)]);
    assert_eq!(st, 0, "{err}");
    assert!(err.contains("2 at a time"), "{err}");
    let summary = json(&local.join("sweep.json"));
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 6, "{summary}");
    assert_eq!(summary["failed"], 0);
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r["run"], format!("run-{i:03}"));
        assert_eq!(r["state"], "ok", "{r}");
        assert_eq!(r["status"], 0);
        check_run(&local.join(format!("run-{i:03}")), i);
    }

    // One table.
    let csv_path = dir.join("table.csv");
    let (st, err) = kvmsim_cmd(&["collect", s(&local), "--out", s(&csv_path)]);
    assert_eq!(st, 0, "{err}");
    let rows = table(&csv_path);
    assert_eq!(rows.len(), 6);
    for (i, row) in rows.iter().enumerate() {
        let run = local.join(format!("run-{i:03}"));
        assert_eq!(row["run"], s(&run));
        let factor: f64 = row["system.cpu.host_factor"].parse().unwrap();
        assert_eq!(factor, FACTORS[i / 3]);
        assert_eq!(row["iterations"], format!("[{}]", ITERATIONS[i % 3]));
        assert_eq!(row["exit_status"], "0");
        assert_eq!(row["exit_cause"], "guest_exit");
        // The final dump's statistics, exactly as the run wrote them.
        let dumps = json(&run.join("stats.json"));
        let stats = dumps.as_array().unwrap().last().unwrap()["stats"]
            .as_object()
            .unwrap();
        for (name, v) in stats {
            let cell = &row[name];
            match v {
                serde_json::Value::Null => assert_eq!(cell, "", "{name}"),
                v => assert_eq!(
                    cell.parse::<f64>().ok(),
                    v.as_f64(),
                    "{name}: {cell} against {v}"
                ),
            }
        }
        // The console's bytes are the guest's output (which depends on
        // the loop length).
        let tx: u64 = row["system.uart.txBytes"].parse().unwrap();
        assert_eq!(tx, read(&run.join("serial.log")).len() as u64);
        // Simulated time inside KVM is host time in KVM times host_factor
        // (whatever the host's load), plus the exits' own simulated costs.
        let sim: f64 = row["simSeconds"].parse().unwrap();
        let kvm: f64 = row["system.cpu.kvmHostSeconds"].parse().unwrap();
        let ratio = sim / kvm;
        assert!(
            ratio >= factor * 0.999 && ratio <= factor * 1.1,
            "run {i}: simSeconds {sim} / kvmHostSeconds {kvm} = {ratio}, host_factor {factor}"
        );
    }
    let types = json(&dir.join("table.types.json"));
    let dtype = |n: &str| {
        types
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("no column {n} in {types}"))["dtype"]
            .clone()
    };
    assert_eq!(dtype("run"), "string");
    assert_eq!(dtype("system.cpu.host_factor"), "float64");
    assert_eq!(dtype("iterations"), "string");
    assert_eq!(dtype("exit_status"), "Int64");
    assert_eq!(dtype("simSeconds"), "float64");
    assert_eq!(dtype("simTicks"), "Int64");
    assert_eq!(types.as_array().unwrap().len(), rows[0].len());

    // The same grid as a Slurm array job: prepared, nothing run.
    let cluster = dir.join("cluster");
    let script = dir.join("sweep.sbatch");
    let (st, err) = kvmsim_cmd(&[
        "sweep",
        s(&sweep),
        "--outdir",
        s(&cluster),
        "--slurm",
        s(&script),
    ]);
    assert_eq!(st, 0, "{err}");
    let text = read(&script);
    assert!(text.starts_with("#!/bin/bash\n"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("#SBATCH --array="))
            .collect::<Vec<_>>(),
        ["#SBATCH --array=0-5"],
        "{text}"
    );
    let commands: Vec<&str> = text.lines().filter(|l| l.contains(") exec ")).collect();
    assert_eq!(commands.len(), 6, "{text}");
    for (i, c) in commands.iter().enumerate() {
        let run = cluster.join(format!("run-{i:03}"));
        assert!(c.starts_with(&format!("{i}) exec ")), "{c}");
        assert!(c.contains(env!("CARGO_BIN_EXE_kvmsim")), "{c}");
        assert!(
            c.contains(&format!(
                " run {} --outdir {} --quiet --no-stdin ",
                s(&run.join("config.toml")),
                s(&run)
            )),
            "{c}"
        );
        assert!(run.join("config.toml").is_file() && run.join("params.json").is_file());
        assert!(!run.join("stats.json").exists(), "ran: {}", run.display());
    }
    let summary = json(&cluster.join("sweep.json"));
    assert_eq!(summary["finished"], 0, "{summary}");
    assert_eq!(summary["slurm_script"], s(&script));
    // Every array task, run here as Slurm would: same results.
    for i in 0..6 {
        let st = Command::new("bash")
            .arg(&script)
            .env("SLURM_ARRAY_TASK_ID", i.to_string())
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(0), "task {i}");
        let (a, b) = (
            local.join(format!("run-{i:03}")),
            cluster.join(format!("run-{i:03}")),
        );
        check_run(&b, i);
        assert_eq!(read(&a.join("serial.log")), read(&b.join("serial.log")));
        assert_eq!(
            json(&a.join("params.json"))["params"],
            json(&b.join("params.json"))["params"]
        );
        assert_eq!(
            json(&a.join("config.json"))["system"],
            json(&b.join("config.json"))["system"]
        );
        assert!(read(&b.join("kvmsim.log")).contains("exiting @ tick"));
    }
    let st = Command::new("bash")
        .arg(&script)
        .env("SLURM_ARRAY_TASK_ID", "6")
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(254), "a task beyond the array");
    let csv2 = dir.join("cluster.csv");
    let (st, err) = kvmsim_cmd(&["collect", s(&cluster), "--out", s(&csv2)]);
    assert_eq!(st, 0, "{err}");
    let rows2 = table(&csv2);
    assert_eq!(rows2.len(), 6);
    for (a, b) in rows.iter().zip(&rows2) {
        for k in [
            "system.cpu.host_factor",
            "iterations",
            "exit_status",
            "system.uart.txBytes",
        ] {
            assert_eq!(a[k], b[k], "{k}");
        }
    }
    // Both sweeps in one table.
    let (st, err) = kvmsim_cmd(&["collect", s(&local), s(&cluster), "--out", s(&csv2)]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(table(&csv2).len(), 12);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_failed_run_is_recorded_and_the_others_still_run() {
    if !kvm_or_skip("sweep_failed_run") {
        return;
    }
    let dir = outdir("sweep-failed");
    std::fs::create_dir_all(&*dir).unwrap();
    std::fs::write(dir.join("base.toml"), BASE).unwrap();
    // 1 ns of simulated time is too little for the guest to finish: the
    // run ends at the limit (status 250).
    let grid = r#"
config = "base.toml"
[[param]]
flag = "--max-time"
values = ["1ns", "10s"]
"#;
    let sweep = dir.join("sweep.toml");
    std::fs::write(&sweep, grid).unwrap();
    let out = dir.join("out");
    let (st, err) = kvmsim_cmd(&["sweep", s(&sweep), "--jobs", "1", "--outdir", s(&out)]);
    assert_eq!(st, 250, "{err}");
    assert!(err.contains("1 of 2 runs failed"), "{err}");
    let summary = json(&out.join("sweep.json"));
    assert_eq!(summary["failed"], 1, "{summary}");
    assert_eq!(summary["runs"][0]["state"], "failed");
    assert_eq!(summary["runs"][0]["status"], 250);
    assert_eq!(summary["runs"][0]["params"]["max_time"], "1ns");
    assert_eq!(summary["runs"][1]["state"], "ok");
    assert_eq!(json(&out.join("run-001/exit.json"))["cause"], "guest_exit");
    assert_eq!(json(&out.join("run-000/exit.json"))["cause"], "max_tick");

    // A sweep that expects the limit counts it as success.
    std::fs::write(&sweep, format!("ok_status = [0, 250]\n{grid}")).unwrap();
    let out2 = dir.join("out2");
    let (st, err) = kvmsim_cmd(&["sweep", s(&sweep), "--outdir", s(&out2)]);
    assert_eq!(st, 0, "{err}");
    assert_eq!(json(&out2.join("sweep.json"))["failed"], 0);
}

#[test]
fn bad_sweep_files_are_refused_before_anything_runs() {
    let dir = outdir("sweep-bad");
    std::fs::create_dir_all(&*dir).unwrap();
    std::fs::write(dir.join("base.toml"), BASE).unwrap();
    std::fs::write(
        dir.join("two.toml"),
        "[[system]]\nkernel = \"builtin:compute\"\n[[system]]\nkernel = \"builtin:compute\"\n",
    )
    .unwrap();
    let sweep = dir.join("sweep.toml");
    let out = dir.join("out");
    let param = |key: &str, values: &str| {
        format!("config = \"base.toml\"\n[[param]]\nkey = \"{key}\"\nvalues = {values}\n")
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        // An unknown key, named with the param and the value.
        (
            param("system.cpu.host_factr", "[1.0, 2.0]"),
            vec!["param 1", "system.cpu.host_factr = 1.0", "host_factr"],
        ),
        // A value of the wrong type.
        (
            param("system.memory", "[\"64MiB\", \"lots\"]"),
            vec!["param 1", "system.memory = \"lots\""],
        ),
        // A value the config refuses.
        (
            param("system.cpu.host_factor", "[1.0, -2.0]"),
            vec!["param 1", "host_factor = -2.0", "host_factor"],
        ),
        (
            param("system.3.memory", "[\"64MiB\"]"),
            vec!["param 1", "system.3.memory", "one system"],
        ),
        (param("system.cpus", "[]"), vec!["param 1", "values = []"]),
        (
            "config = \"base.toml\"\n[[param]]\nflag = \"--max-time\"\nvalues = [\"1s\", \"soon\"]\n"
                .into(),
            vec!["param 1", "--max-time \"soon\""],
        ),
        (
            "config = \"base.toml\"\n[[param]]\nflag = \"--memory\"\nvalues = [\"1GiB\"]\n".into(),
            vec!["param 1", "flag = \"--memory\"", "--max-time"],
        ),
        (
            "config = \"base.toml\"\n[[param]]\nkey = \"system.cpus\"\nflag = \"--max-time\"\nvalues = [1]\n"
                .into(),
            vec!["param 1", "either key"],
        ),
        (
            "[[param]]\nkey = \"system.cpus\"\nvalues = [1]\n".into(),
            vec!["config = ", "restore = "],
        ),
        (
            "restore = \".\"\n[[param]]\nkey = \"system.cpus\"\nvalues = [1]\n".into(),
            vec!["param 1", "key = \"system.cpus\"", "flag"],
        ),
        (
            "restore = \"no-such-checkpoint\"\n".into(),
            vec!["no-such-checkpoint", "not a checkpoint folder"],
        ),
        (
            "config = \"missing.toml\"\n".into(),
            vec!["config = \"missing.toml\"", "cannot read"],
        ),
        (
            "config = \"base.toml\"\nparm = 1\n".into(),
            vec!["unknown field", "parm"],
        ),
        (
            "config = \"base.toml\"\n[[param]]\nkey = \"sim.max_time\"\nname = \"t\"\nvalues = [\"1s\"]\n[[param]]\nkey = \"system.cpus\"\nname = \"t\"\nvalues = [1]\n"
                .into(),
            vec!["param 2", "\"t\" is taken"],
        ),
    ];
    for (text, wants) in &cases {
        std::fs::write(&sweep, text).unwrap();
        let (st, err) = kvmsim_cmd(&["sweep", s(&sweep), "--outdir", s(&out)]);
        assert_eq!(st, 254, "{text}\n{err}");
        assert!(err.contains(s(&sweep)), "the sweep file is named: {err}");
        for w in wants {
            assert!(err.contains(w), "{text}\nwanted {w:?} in: {err}");
        }
        assert!(!out.exists(), "{text}: created {}", out.display());
    }
    // With several systems, a key applies to every system or to one.
    for (key, ok) in [
        ("system.cpu.host_factor", true),
        ("system.1.cpu.host_factor", true),
        ("system.2.cpu.host_factor", false),
    ] {
        std::fs::write(
            &sweep,
            format!("config = \"two.toml\"\n[[param]]\nkey = \"{key}\"\nvalues = [3.0]\n"),
        )
        .unwrap();
        let (st, err) = kvmsim_cmd(&[
            "sweep",
            s(&sweep),
            "--outdir",
            s(&out),
            "--slurm",
            s(&dir.join("x.sbatch")),
        ]);
        if !ok {
            assert_eq!(st, 254, "{err}");
            assert!(
                err.contains("system.2: the config has 2 system entries"),
                "{err}"
            );
            continue;
        }
        assert_eq!(st, 0, "{key}: {err}");
        let cfg = read(&out.join("run-000/config.toml"));
        let factors = cfg.lines().filter(|l| *l == "host_factor = 3.0").count();
        assert_eq!(
            factors,
            if key == "system.cpu.host_factor" {
                2
            } else {
                1
            },
            "{cfg}"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
    // A folder that holds something is not overwritten.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "earlier results").unwrap();
    std::fs::write(&sweep, param("system.cpus", "[1]")).unwrap();
    let (st, err) = kvmsim_cmd(&["sweep", s(&sweep), "--outdir", s(&out)]);
    assert_eq!(st, 254, "{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(read(&out.join("keep.txt")), "earlier results");
    // Nothing to collect.
    let (st, err) = kvmsim_cmd(&["collect", s(&out), "--out", s(&dir.join("t.csv"))]);
    assert_eq!(st, 254, "{err}");
    assert!(err.contains("no run folders"), "{err}");
    assert!(!dir.join("t.csv").exists());
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_sweep_restores_a_checkpoint_with_each_runs_flags() {
    if !kvm_or_skip("sweep_restore") {
        return;
    }
    let dir = outdir("sweep-restore");
    let orig = dir.join("orig");
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
        &orig,
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let cpt = std::fs::read_dir(&orig)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("cpt."))
        .expect("no checkpoint");
    let sweep = dir.join("sweep.toml");
    let grid = |limits: &str| {
        format!(
            "restore = \"orig/{cpt}\"\n\
             [[param]]\nflag = \"--host-factor\"\nvalues = [1.0, 2.0]\n\
             [[param]]\nflag = \"--max-time\"\nvalues = [{limits}]\n"
        )
    };
    // A limit before the checkpoint's time is refused, naming the run.
    std::fs::write(&sweep, grid("\"10s\", \"1ms\"")).unwrap();
    let out = dir.join("out");
    let (st, err) = kvmsim_cmd(&["sweep", s(&sweep), "--outdir", s(&out)]);
    assert_eq!(st, 254, "{err}");
    assert!(
        err.contains("run-001")
            && err.contains("--max-time \"1ms\"")
            && err.contains("checkpoint is at tick"),
        "{err}"
    );
    assert!(!out.exists(), "a refused sweep leaves no folder");

    std::fs::write(&sweep, grid("\"10s\", \"20s\"")).unwrap();
    let (st, err) = kvmsim_cmd(&["sweep", s(&sweep), "--jobs", "2", "--outdir", s(&out)]);
    assert_eq!(st, 0, "{err}");
    for i in 0..4 {
        let run = out.join(format!("run-{i:03}"));
        assert!(
            !run.join("config.toml").exists(),
            "a restore has no config file"
        );
        let cfg = json(&run.join("config.json"));
        assert_eq!(cfg["restored_from"], s(&orig.join(&cpt)), "{cfg}");
        let factor = [1.0, 2.0][i / 2];
        assert_eq!(cfg["system"][0]["cpu"]["host_factor"], factor);
        assert_eq!(
            cfg["sim"]["max_time"],
            ["10000000000000ps", "20000000000000ps"][i % 2],
            "{cfg}"
        );
        assert_eq!(
            read(&run.join("serial.log")),
            "ckpt: periods=20 ymm=ok\n",
            "{}",
            run.display()
        );
        assert_eq!(json(&run.join("exit.json"))["status"], 0);
    }
    let csv_path = dir.join("t.csv");
    let (st, err) = kvmsim_cmd(&["collect", s(&out), "--out", s(&csv_path)]);
    assert_eq!(st, 0, "{err}");
    let rows = table(&csv_path);
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["host_factor"].as_str(), r["max_time"].as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("1.0", "10s"),
            ("1.0", "20s"),
            ("2.0", "10s"),
            ("2.0", "20s")
        ]
    );
}

#[test]
fn the_example_sweep_is_a_good_sweep_of_six_runs() {
    let dir = outdir("sweep-example");
    let script = dir.join("example.sbatch");
    std::fs::create_dir_all(&*dir).unwrap();
    let ex = repo().join("examples/sweep.toml");
    let (st, err) = kvmsim_cmd(&[
        "sweep",
        s(&ex),
        "--outdir",
        s(&dir.join("out")),
        "--slurm",
        s(&script),
    ]);
    assert_eq!(st, 0, "{err}");
    let text = read(&script);
    assert!(text.contains("\n#SBATCH --array=0-5\n"), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains(") exec ")).count(), 6);
    let cfg = read(&dir.join("out/run-005/config.toml"));
    assert!(cfg.contains("\nhost_factor = 2.0\n"), "{cfg}");
    assert!(cfg.contains("\nargs = [10000000]\n"), "{cfg}");
}
