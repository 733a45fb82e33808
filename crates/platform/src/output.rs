//! The output folder: stats.txt (gem5's text layout, one block per dump),
//! stats.json (every dump so far), serial.log, config.json and exit.json.
//!
//! A run owns its folder: a lock file (`.kvmsim.lock`, holding the owner's
//! PID) keeps a second run out while the first is alive. A run is *staged*
//! while it is being set up: what it writes then (console logs, the trace)
//! goes into a hidden sub-folder, and the previous run's results stay
//! untouched. Only [`OutDir::commit`], once every input has been read and
//! the systems are built, removes the previous run's files and moves the
//! staged ones in; a run that fails or is interrupted before that leaves
//! the folder as it was. After the commit everything is written as it
//! happens, so an interrupted or failed run keeps what it produced.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sim::stats::Dump;

/// An output folder that cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct OutputError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// An output folder that cannot be taken for a run.
#[derive(Debug, thiserror::Error)]
pub enum OutDirError {
    #[error(transparent)]
    Io(#[from] OutputError),
    #[error("output folder {} is in use by another kvmsim run ({}); wait for it to end or choose another --outdir", dir.display(), holder(*pid))]
    Busy { dir: PathBuf, pid: Option<u32> },
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("process {p}"),
        None => "its process id is not known yet".into(),
    }
}

/// The lock file inside an output folder.
pub const LOCK_FILE: &str = ".kvmsim.lock";
/// The sub-folder a staged run writes into.
pub const STAGING_DIR: &str = ".kvmsim-new";

/// True for the names of files a kvmsim run writes (the ones a new run
/// replaces).
pub fn is_run_output(name: &str) -> bool {
    let between = |pre: &str, suf: &str| {
        name.len() > pre.len() + suf.len() && name.starts_with(pre) && name.ends_with(suf)
    };
    matches!(
        name,
        "stats.txt"
            | "stats.json"
            | "exit.json"
            | "config.json"
            | "serial.log"
            | "trace.txt"
            | "cpu-dump.txt"
            | "cpu-samples.txt"
            | "stdout.txt"
            | "stderr.txt"
    ) || between("serial.", ".log")
        // A restored run's overlays (crate::disks::restored_overlay_name).
        || name
            .strip_suffix(".cow")
            .and_then(|n| n.rsplit_once(".disk"))
            .is_some_and(|(sys, i)| {
                !sys.is_empty() && !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())
            })
        || between("trace.", ".txt")
        // A distributed run's other processes' dumps (OutDir::stage_rank).
        || between("stats.rank", ".txt")
        || between("stats.rank", ".json")
        || between("cpu-dump.rank", ".txt")
        || (name.starts_with('.') && name.ends_with(".json.tmp"))
}

/// The output folder of one run. Clones share it (systems on several
/// threads write into one folder; writes are serialised).
#[derive(Debug, Clone)]
pub struct OutDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// The staging folder while the run is staged.
    staging: Mutex<Option<PathBuf>>,
    dumps: Mutex<Vec<serde_json::Value>>,
    /// The lock file, locked for as long as this folder is in use (closing
    /// it releases the lock); none for the other processes of a
    /// distributed run, whose process 0 holds it.
    lock: Option<File>,
    /// The process of a distributed run (0 otherwise).
    rank: usize,
    /// True if this run created `dir`.
    created: bool,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError {
        path: path.into(),
        source,
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes an exclusive lock on `f` without waiting; false if another open
/// file description holds it.
fn try_flock(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock only reads its two integer arguments; the descriptor is
    // owned by `f`, which outlives the call.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Locks `dir`'s lock file and writes our PID into it.
fn take_lock(dir: &Path) -> Result<File, OutDirError> {
    let path = dir.join(LOCK_FILE);
    for _ in 0..100 {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err(&path))?;
        if !try_flock(&f).map_err(err(&path))? {
            // The holder writes its PID right after locking: give it a moment.
            let mut pid = None;
            for _ in 0..20 {
                let mut text = String::new();
                let _ = f.rewind().and_then(|()| f.read_to_string(&mut text));
                pid = text.trim().parse().ok();
                if pid.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            return Err(OutDirError::Busy {
                dir: dir.into(),
                pid,
            });
        }
        // The previous holder removes the file as it ends: if the name now
        // leads elsewhere, the lock we hold is on a removed file.
        let ours = f.metadata().map_err(err(&path))?;
        match std::fs::metadata(&path) {
            Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {}
            _ => continue,
        }
        f.set_len(0).map_err(err(&path))?;
        f.rewind().map_err(err(&path))?;
        writeln!(f, "{}", std::process::id()).map_err(err(&path))?;
        return Ok(f);
    }
    Err(OutDirError::Busy {
        dir: dir.into(),
        pid: None,
    })
}

impl OutDir {
    /// Takes `dir` for a run that is being set up: creates it if needed,
    /// locks it (an error names the process that holds it) and stages the
    /// run. Nothing of an earlier run is touched until [`OutDir::commit`].
    pub fn stage(dir: &Path) -> Result<Self, OutDirError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let out = |lock| OutDir {
            inner: Arc::new(Inner {
                dir: dir.into(),
                staging: Mutex::new(None),
                dumps: Default::default(),
                lock: Some(lock),
                rank: 0,
                created,
            }),
        };
        let lock = match take_lock(dir) {
            Ok(l) => l,
            Err(e) => {
                if created {
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        let out = out(lock);
        // Left behind by a run that was killed: nobody else can be using it.
        let staging = dir.join(STAGING_DIR);
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(err(&staging))?;
        *locked(&out.inner.staging) = Some(staging);
        Ok(out)
    }

    /// Joins `dir` for process `rank` (> 0) of a distributed run whose
    /// process 0 holds the folder ([`OutDir::stage`]): what it writes is
    /// staged in a sub-folder of its own until [`OutDir::commit`], which
    /// (called after process 0's) moves it in without removing anything.
    /// Its stats dumps go to stats.rank{rank}.txt and .json.
    pub fn stage_rank(dir: &Path, rank: usize) -> Result<Self, OutDirError> {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        let staging = dir.join(format!("{STAGING_DIR}.rank{rank}"));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir(&staging).map_err(err(&staging))?;
        Ok(OutDir {
            inner: Arc::new(Inner {
                dir: dir.into(),
                staging: Mutex::new(Some(staging)),
                dumps: Default::default(),
                lock: None,
                rank,
                created: false,
            }),
        })
    }

    /// Takes `dir` for a run and commits at once: the earlier run's files
    /// are removed.
    pub fn create(dir: &Path) -> Result<Self, OutDirError> {
        let out = Self::stage(dir)?;
        out.commit()?;
        Ok(out)
    }

    /// The run has been set up: removes the earlier run's files and moves
    /// the staged ones in. Files opened while staged stay open (and are
    /// written in their new place). Later calls do nothing.
    pub fn commit(&self) -> Result<(), OutputError> {
        let mut staging = locked(&self.inner.staging);
        let Some(stage) = staging.as_ref() else {
            return Ok(());
        };
        let dir = &self.inner.dir;
        // The other processes of a distributed run add their files to
        // what process 0 committed.
        let entries: Vec<std::io::Result<std::fs::DirEntry>> = if self.inner.lock.is_some() {
            std::fs::read_dir(dir).map_err(err(dir))?.collect()
        } else {
            Vec::new()
        };
        for e in entries {
            let e = e.map_err(err(dir))?;
            let name = e.file_name();
            if is_run_output(&name.to_string_lossy()) {
                let p = e.path();
                std::fs::remove_file(&p).map_err(err(&p))?;
            }
        }
        for e in std::fs::read_dir(stage).map_err(err(stage))? {
            let e = e.map_err(err(stage))?;
            let to = dir.join(e.file_name());
            std::fs::rename(e.path(), &to).map_err(err(&to))?;
        }
        std::fs::remove_dir(stage).map_err(err(stage))?;
        *staging = None;
        Ok(())
    }

    /// True until [`OutDir::commit`].
    pub fn is_staged(&self) -> bool {
        locked(&self.inner.staging).is_some()
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Path of a file of the run (in the staging folder until the commit).
    pub fn file(&self, name: &str) -> PathBuf {
        match &*locked(&self.inner.staging) {
            Some(s) => s.join(name),
            None => self.inner.dir.join(name),
        }
    }

    /// Writes `value` as pretty JSON to `name`, atomically (temp file + rename).
    pub fn write_json(&self, name: &str, value: &serde_json::Value) -> Result<(), OutputError> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
        std::fs::write(&tmp, text).map_err(err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(err(&path))
    }

    /// Appends a stats dump to stats.txt and rewrites stats.json.
    pub fn write_dump(&self, dump: &Dump) -> Result<(), OutputError> {
        let mut dumps = locked(&self.inner.dumps);
        let (txt, json) = match self.inner.rank {
            0 => ("stats.txt".to_string(), "stats.json".to_string()),
            r => (format!("stats.rank{r}.txt"), format!("stats.rank{r}.json")),
        };
        let path = self.file(&txt);
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(err(&path))?;
        f.write_all(dump.to_text().as_bytes()).map_err(err(&path))?;
        dumps.push(dump.to_json());
        self.write_json(&json, &serde_json::Value::Array(dumps.clone()))
    }

    /// Creates (truncating) a console log for a system.
    pub fn serial_log(&self, name: &str) -> Result<File, OutputError> {
        let path = self.file(name);
        File::create(&path).map_err(err(&path))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let staged = self.staging.get_mut().map_or(true, |s| s.is_some());
        if let Ok(Some(stage)) = self.staging.get_mut().map(|s| s.take()) {
            // Never committed: the earlier run's files are as they were.
            let _ = std::fs::remove_dir_all(stage);
        }
        // Removed while still locked; a run that opened the old file finds
        // out after locking it (see take_lock).
        if self.lock.is_some() {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
        }
        if staged && self.created {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvmsim-outdir-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn dumps_accumulate() {
        let dir = tmp("dumps");
        let out = OutDir::create(&dir).unwrap();
        let mut stats = sim::Stats::new();
        let c = stats.counter("system.x", "x", "Count").unwrap();
        c.inc();
        out.write_dump(&stats.dump(10)).unwrap();
        c.inc();
        out.write_dump(&stats.dump(20)).unwrap();
        let text = std::fs::read_to_string(dir.join("stats.txt")).unwrap();
        assert_eq!(text.matches("Begin Simulation Statistics").count(), 2);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap())
                .unwrap();
        assert_eq!(json[1]["stats"]["system.x"], 2);
        assert_eq!(json[1]["tick"], 20);
        drop(out);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_staged_run_leaves_the_earlier_results_until_it_commits() {
        let dir = tmp("staged");
        std::fs::create_dir_all(&dir).unwrap();
        for (f, text) in [
            ("stats.txt", "old stats"),
            ("exit.json", "{}"),
            ("serial.log", "old console"),
            ("trace.txt", "old trace"),
            ("cpu-samples.txt", "old samples"),
            ("notes.txt", "the user's"),
        ] {
            std::fs::write(dir.join(f), text).unwrap();
        }
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        // A run that never commits changes nothing.
        let out = OutDir::stage(&dir).unwrap();
        let mut log = out.serial_log("serial.log").unwrap();
        log.write_all(b"new console").unwrap();
        drop(out);
        assert_eq!(read("serial.log").as_deref(), Some("old console"));
        assert_eq!(read("stats.txt").as_deref(), Some("old stats"));
        assert!(!dir.join(STAGING_DIR).exists());
        assert!(!dir.join(LOCK_FILE).exists());

        // A committed run replaces every earlier output, keeps other files,
        // and its open files move with it.
        let out = OutDir::stage(&dir).unwrap();
        let mut log = out.serial_log("serial.log").unwrap();
        log.write_all(b"new ").unwrap();
        assert_eq!(read("serial.log").as_deref(), Some("old console"));
        out.commit().unwrap();
        log.write_all(b"console").unwrap();
        assert_eq!(read("serial.log").as_deref(), Some("new console"));
        for gone in ["stats.txt", "exit.json", "trace.txt", "cpu-samples.txt"] {
            assert_eq!(read(gone), None, "{gone} of the earlier run is still there");
        }
        assert_eq!(read("notes.txt").as_deref(), Some("the user's"));
        assert_eq!(out.file("x"), dir.join("x"));
        drop(out);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn other_processes_add_their_files_after_process_0_commits() {
        let dir = tmp("ranks");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("serial.system1.log"), "old").unwrap();
        let zero = OutDir::stage(&dir).unwrap();
        let one = OutDir::stage_rank(&dir, 1).unwrap();
        let mut a = zero.serial_log("serial.system0.log").unwrap();
        let mut b = one.serial_log("serial.system1.log").unwrap();
        a.write_all(b"zero").unwrap();
        b.write_all(b"one").unwrap();
        zero.commit().unwrap();
        one.commit().unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("serial.system0.log"), "zero");
        assert_eq!(read("serial.system1.log"), "one");
        // Process 1's dumps have files of their own.
        let mut stats = sim::Stats::new();
        stats.counter("system1.x", "x", "Count").unwrap().inc();
        one.write_dump(&stats.dump(5)).unwrap();
        assert!(read("stats.rank1.txt").contains("system1.x"));
        assert!(!dir.join("stats.txt").exists());
        // Only process 0 holds (and removes) the lock.
        drop(one);
        assert!(dir.join(LOCK_FILE).exists());
        drop(zero);
        assert!(!dir.join(LOCK_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_created_for_a_run_that_never_committed_is_removed() {
        let dir = tmp("created");
        drop(OutDir::stage(&dir).unwrap());
        assert!(!dir.exists());
    }

    #[test]
    fn a_second_run_on_a_locked_folder_is_refused_with_the_holder() {
        let dir = tmp("locked");
        let first = OutDir::stage(&dir).unwrap();
        let e = OutDir::stage(&dir).unwrap_err();
        match &e {
            OutDirError::Busy { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("not a busy error: {other}"),
        }
        assert!(
            e.to_string()
                .contains(&format!("process {}", std::process::id())),
            "{e}"
        );
        // The refused run did not disturb the holder.
        assert!(first.is_staged() && dir.join(STAGING_DIR).is_dir());
        drop(first);
        let again = OutDir::create(&dir).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_outputs_are_recognised() {
        for n in [
            "stats.txt",
            "serial.system1.log",
            "trace.system0.txt",
            ".stats.json.tmp",
            "system.disk0.cow",
            "system1.disk7.cow",
            "stats.rank1.txt",
            "stats.rank12.json",
        ] {
            assert!(is_run_output(n), "{n}");
        }
        for n in [
            "notes.txt",
            "serial..log",
            "config.toml",
            "trace.",
            LOCK_FILE,
            "root.cow",
            "system.disk.cow",
            ".disk0.cow",
            "system.diskx.cow",
        ] {
            assert!(!is_run_output(n), "{n}");
        }
    }
}
