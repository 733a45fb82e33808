//! The output folder: stats.txt (gem5's text layout, one block per dump),
//! stats.json (every dump so far), serial.log, config.json and exit.json.
//! Everything is written as it happens, so an interrupted or failed run keeps
//! what it produced.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use sim::stats::Dump;

/// An output folder that cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct OutputError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The output folder of one run. Clones share it (systems on several
/// threads write into one folder; writes are serialised).
#[derive(Debug, Clone)]
pub struct OutDir {
    dir: PathBuf,
    dumps: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> OutputError + '_ {
    move |source| OutputError {
        path: path.into(),
        source,
    }
}

impl OutDir {
    /// Creates (or reuses) `dir`, truncating the files of an earlier run.
    pub fn create(dir: &Path) -> Result<Self, OutputError> {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        for f in ["stats.txt", "stats.json", "exit.json"] {
            let p = dir.join(f);
            File::create(&p).map_err(err(&p))?;
        }
        Ok(OutDir {
            dir: dir.into(),
            dumps: Default::default(),
        })
    }

    /// Path of a file in the folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
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
        let mut dumps = self.dumps.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.file("stats.txt");
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(err(&path))?;
        f.write_all(dump.to_text().as_bytes()).map_err(err(&path))?;
        dumps.push(dump.to_json());
        self.write_json("stats.json", &serde_json::Value::Array(dumps.clone()))
    }

    /// Creates (truncating) a console log for a system.
    pub fn serial_log(&self, name: &str) -> Result<File, OutputError> {
        let path = self.file(name);
        File::create(&path).map_err(err(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_accumulate() {
        let dir = std::env::temp_dir().join(format!("kvmsim-outdir-{}", std::process::id()));
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
