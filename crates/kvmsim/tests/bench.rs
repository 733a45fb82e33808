//! `kvmsim bench` with tiny work: the table and the structure of
//! bench.json (never the ratios, which depend on the host).

mod common;

use std::process::Command;

use common::*;

fn bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .arg("bench")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot start kvmsim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn bench_prints_every_figure_and_writes_bench_json() {
    if !kvm_or_skip("bench_json") {
        return;
    }
    let dir = outdir("bench-json");
    let (status, stdout, stderr) = bench(&[
        "--runs",
        "2",
        "--scale",
        "0.00001",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(status, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let want = [
        ("compute", "compute", Some(("<=", 1.02))),
        ("pio", "port-IO round trip, CPL0", Some(("<=", 1.05))),
        ("mmio", "MMIO round trip, CPL0", Some(("<=", 1.05))),
        ("kick", "forced exit per quantum (kick)", Some(("<=", 1.05))),
        ("parallel", "2 systems vs 1 on 2 cores", Some((">=", 1.9))),
        ("smp", "2 CPUs vs 1 in one system", Some((">=", 1.8))),
        ("window", "window barrier, 2 threads", Some(("<=", 0.1))),
        ("se-compute", "SE compute loop", Some(("<=", 1.02))),
        // Reported only: no goal.
        ("se-syscall", "SE system call (getppid)", None),
    ];
    assert!(stdout.contains("best run"), "{stdout}");
    for (_, title, goal) in want {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(title))
            .unwrap_or_else(|| panic!("no row {title:?} in:\n{stdout}"));
        match goal {
            Some((op, goal)) => {
                assert!(row.contains(&format!("{op} {goal}")), "{row}");
                assert!(row.ends_with("yes") || row.ends_with("NO"), "{row}");
            }
            None => assert!(row.ends_with("n/a"), "{row}"),
        }
    }

    let text = std::fs::read_to_string(dir.join("bench.json")).expect("bench.json");
    let j: serde_json::Value = serde_json::from_str(&text).expect("bench.json is JSON");
    assert_eq!(j["runs"], 2);
    assert_eq!(j["statistic"], "best");
    let figures = j["figures"].as_array().expect("figures");
    assert_eq!(figures.len(), want.len());
    for (f, (key, title, goal)) in figures.iter().zip(want) {
        assert_eq!(f["key"], key);
        assert_eq!(f["figure"], title);
        let a = positive(&f["kvmsim"], &format!("{key}.kvmsim"));
        let b = positive(&f["reference"], &format!("{key}.reference"));
        let r = positive(&f["ratio"], &format!("{key}.ratio"));
        assert!(
            (r - a / b).abs() <= 1e-9 * r,
            "{key}: ratio {r} is not {a} / {b}"
        );
        match goal {
            Some((op, goal)) => {
                assert_eq!(f["goal"]["op"], op);
                assert_eq!(f["goal"]["value"], goal);
                let met = f["met"].as_bool().expect("met is a boolean");
                assert_eq!(met, if op == "<=" { r <= goal } else { r >= goal }, "{key}");
            }
            None => {
                assert!(f["goal"].is_null() && f["met"].is_null(), "{key}: {f}");
            }
        }
        for side in ["kvmsim", "reference"] {
            let s = f["samples"][side].as_array().expect("samples");
            assert_eq!(s.len(), 2, "{key}.{side}: one sample per run");
            let vals: Vec<f64> = s.iter().map(|v| positive(v, key)).collect();
            // The best is one of the samples (the lowest time, the highest throughput).
            let best = if key == "parallel" || key == "smp" {
                vals.iter().copied().fold(f64::MIN, f64::max)
            } else {
                vals.iter().copied().fold(f64::MAX, f64::min)
            };
            assert_eq!(best, f[side].as_f64().unwrap(), "{key}.{side}");
        }
    }
    // Each side did the work asked of it.
    for key in ["pio", "mmio"] {
        let f = figures.iter().find(|f| f["key"] == key).unwrap();
        let reads = f["work"]["reads"].as_u64().unwrap();
        for side in ["kvmsim", "reference"] {
            for e in f["exits"][side].as_array().unwrap() {
                assert!(e["io"].as_u64().unwrap() >= reads, "{key}.{side}: {e}");
            }
        }
    }
    // SE mode made every system call asked of it.
    let se = figures.iter().find(|f| f["key"] == "se-syscall").unwrap();
    let calls = se["work"]["calls"].as_u64().unwrap();
    for e in se["exits"]["kvmsim"].as_array().unwrap() {
        assert_eq!(e["getppid"].as_u64().unwrap(), calls, "{e}");
    }
    let kick = figures.iter().find(|f| f["key"] == "kick").unwrap();
    let k = kick["work"]["forced_exits"].as_u64().unwrap();
    for e in kick["exits"]["kvmsim"].as_array().unwrap() {
        assert!(e["injected"].as_u64().unwrap() >= k, "kvmsim: {e}");
    }
    for e in kick["exits"]["reference"].as_array().unwrap() {
        // The bare loop injects only after a forced exit.
        assert!(e["injected"].as_u64().unwrap() >= k, "bare: {e}");
        assert!(e["forced"].as_u64().unwrap() >= k, "bare: {e}");
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn bench_subcommand_prints_its_row_only() {
    if !kvm_or_skip("bench_pio") {
        return;
    }
    let (status, stdout, stderr) = bench(&["pio", "--reads", "10", "--runs", "1"]);
    assert_eq!(status, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("port-IO round trip, CPL0"), "{stdout}");
    assert!(!stdout.contains("MMIO round trip"), "{stdout}");
}

#[test]
fn bench_bad_input_is_an_error_before_measuring() {
    let dir = outdir("bench-bad");
    for scale in ["0", "-1", "nan"] {
        let flag = format!("--scale={scale}");
        let (status, _, stderr) = bench(&[&flag, "--out", dir.to_str().unwrap()]);
        assert_eq!(status, 254, "--scale {scale}: {stderr}");
        assert!(stderr.contains("--scale"), "{stderr}");
    }
    assert!(!dir.join("bench.json").exists());
    // --out names a file, not a folder.
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    let (status, stdout, stderr) = bench(&["--out", file.to_str().unwrap()]);
    assert_eq!(status, 254, "{stderr}");
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    assert!(stdout.is_empty(), "nothing measured: {stdout}");
}
