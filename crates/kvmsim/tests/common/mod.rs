//! Helpers for tests that run the real kvmsim binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, Weak};

/// True if KVM can be used here (see `kvm::usable_or_skip`).
pub fn kvm_or_skip(test: &str) -> bool {
    kvm::usable_or_skip(test)
}

/// The repository's root folder.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A test's folder (/tmp/kvmsim-test-PID-NAME): removed when the test
/// passes, kept (and named on stderr) when it fails. Every [`Run`] whose
/// output lies inside it holds it too, so a temporary `&outdir(..)`
/// argument lives as long as the run's results.
#[derive(Clone)]
pub struct TestDir(Arc<DirGuard>);

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if self.0.exists() {
                eprintln!("kept {} for inspection: the test failed", self.0.display());
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0 .0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        self
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0 .0.as_os_str()
    }
}

/// Every live test folder, for [`Run`]s to find theirs.
static DIRS: Mutex<Vec<Weak<DirGuard>>> = Mutex::new(Vec::new());

/// The test folder that holds `path`, if one is alive.
fn dir_of(path: &Path) -> Option<TestDir> {
    let mut dirs = DIRS.lock().unwrap_or_else(|p| p.into_inner());
    dirs.retain(|w| w.strong_count() > 0);
    dirs.iter()
        .filter_map(Weak::upgrade)
        .find(|g| path.starts_with(&g.0))
        .map(TestDir)
}

/// A fresh, empty folder for one test's output (not created).
pub fn outdir(test: &str) -> TestDir {
    let d = std::env::temp_dir().join(format!("kvmsim-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let g = Arc::new(DirGuard(d));
    DIRS.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::downgrade(&g));
    TestDir(g)
}

/// The result of one kvmsim run.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub out: PathBuf,
    /// Keeps the test folder the output lies in.
    pub dir: Option<TestDir>,
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

/// Like [`kvmsim`], with extra environment variables. The run is killed
/// if the thread that started it ends first (a test process that exits,
/// say after a filtered run or a failure, leaves no kvmsim behind).
pub fn kvmsim_env(args: &[&str], out: &Path, env: &[(&str, &str)]) -> Run {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvmsim"));
    cmd.args(args)
        .arg("--outdir")
        .arg(out)
        .stdin(std::process::Stdio::null());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
    // memory of the parent; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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
        dir: dir_of(out),
    }
}

/// Writes a config file into a fresh folder for `test` and returns the
/// folder and the config's path.
pub fn config(test: &str, text: &str) -> (TestDir, String) {
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

/// Runs `kvmsim ARGS --outdir OUT` with stdin closed, at most `limit` of
/// host time and 2 GiB of address space (a run that would read without
/// bound fails instead of taking the host's memory): for bad input that
/// must be refused promptly. A run that takes longer is killed and fails
/// the test.
pub fn kvmsim_bounded(args: &[&str], out: &Path, limit: std::time::Duration) -> Run {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -v 2097152 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_kvmsim"))
        .args(args)
        .arg("--outdir")
        .arg(out);
    let (status, stdout, stderr) = run_bounded(cmd, limit);
    Run {
        status,
        stdout,
        stderr,
        out: out.to_path_buf(),
        dir: dir_of(out),
    }
}

/// Runs the shell script `script` with `$K` = the kvmsim binary and `$D` =
/// `dir`; returns its status and stdout (stderr goes to the test's).
pub fn shell(script: &str, dir: &Path) -> (i32, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("K", env!("CARGO_BIN_EXE_kvmsim"))
        .env("D", dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("cannot start sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The last `n` lines of `text` (a console's end, for failure messages).
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// True if `mpirun` is here; false (the test is skipped) if not, unless
/// KVMSIM_REQUIRE_MPI=1 makes that a failure.
pub fn mpirun_or_skip(test: &str) -> bool {
    let ok = std::process::Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("KVMSIM_REQUIRE_MPI").as_deref() != Ok("1"),
            "KVMSIM_REQUIRE_MPI=1 but mpirun is missing (apt-get install openmpi-bin \
             libopenmpi-dev)"
        );
        eprintln!("{test}: skipped: no mpirun on this host");
    }
    ok
}

/// `mpirun -np N kvmsim ARGS --outdir OUT`: two ranks share this
/// busy host's cores (oversubscribed, unbound, yielding while they
/// wait); root is allowed (CI runs as root).
pub fn mpirun(np: usize, args: &[&str], out: &Path) -> Run {
    mpirun_env(np, args, out, &[], std::time::Duration::from_secs(3600))
}

/// [`mpirun`] with extra environment variables (every rank gets them),
/// killed and failing the test if it runs longer than `limit`.
pub fn mpirun_env(
    np: usize,
    args: &[&str],
    out: &Path,
    env: &[(&str, &str)],
    limit: std::time::Duration,
) -> Run {
    let mut cmd = std::process::Command::new("mpirun");
    cmd.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args(["--mca", "mpi_yield_when_idle", "1"])
    .arg(env!("CARGO_BIN_EXE_kvmsim"))
    .args(args)
    .arg("--outdir")
    .arg(out)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (status, stdout, stderr) = run_bounded(cmd, limit);
    Run {
        status,
        stdout,
        stderr,
        out: out.to_path_buf(),
        dir: None,
    }
}

/// Runs `cmd` with stdin closed and its output captured; kills it and
/// fails the test if it runs longer than `limit`.
pub fn run_bounded(
    mut cmd: std::process::Command,
    limit: std::time::Duration,
) -> (i32, String, String) {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start the command");
    let reader = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = p.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let so = reader(Box::new(child.stdout.take().unwrap()));
    let se = reader(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} was still running after {limit:?}; stderr so far:\n{}",
                se.join().unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        so.join().unwrap(),
        se.join().unwrap(),
    )
}
