//! Helpers for tests that run the real kvmsim binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// True if KVM can be used here (see `kvm::usable_or_skip`).
pub fn kvm_or_skip(test: &str) -> bool {
    kvm::usable_or_skip(test)
}

/// The repository's root folder.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh, empty folder for one test's output.
pub fn outdir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvmsim-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The result of one kvmsim run.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub out: PathBuf,
}

impl Run {
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name))
            .unwrap_or_else(|e| panic!("{name} in {}: {e}", self.out.display()))
    }

    pub fn json(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.file(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The value of `stat` in the last dump of stats.json.
    pub fn stat(&self, stat: &str) -> serde_json::Value {
        let dumps = self.json("stats.json");
        let last = dumps.as_array().and_then(|a| a.last()).expect("no dump");
        last["stats"][stat].clone()
    }

    /// Asserts that nothing panicked.
    pub fn no_panic(&self) -> &Self {
        assert!(
            !self.stderr.contains("panicked"),
            "kvmsim panicked:\n{}",
            self.stderr
        );
        self
    }
}

/// Runs `kvmsim ARGS` with stdin closed; the output folder is `out`.
pub fn kvmsim(args: &[&str], out: &Path) -> Run {
    kvmsim_env(args, out, &[])
}

/// Like [`kvmsim`], with extra environment variables.
pub fn kvmsim_env(args: &[&str], out: &Path, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmsim"));
    cmd.args(args)
        .arg("--outdir")
        .arg(out)
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("cannot start kvmsim");
    Run {
        status: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        out: out.to_path_buf(),
    }
}

/// Writes a config file into a fresh folder for `test` and returns the
/// folder and the config's path.
pub fn config(test: &str, text: &str) -> (PathBuf, String) {
    let dir = outdir(test);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p.to_string_lossy().into_owned())
}

/// Parses `key=value` fields of a guest's report line.
pub fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing from {line:?}"));
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

impl Run {
    /// A statistic as a float (NaN when the stat is null/unavailable).
    pub fn statf(&self, stat: &str) -> f64 {
        self.stat(stat).as_f64().unwrap_or(f64::NAN)
    }
}
