//! Reading the user's input files (kernel images, initrds) safely: only
//! regular files, at most a stated size, and a read the user can interrupt.
//! A path may name anything (`/dev/zero`, a FIFO, a directory, a file that
//! grows while it is read): none of them may hang kvmsim or exhaust the
//! host's memory.

use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

/// The largest kernel image kvmsim reads: a bzImage is a few tens of MiB
/// and a vmlinux with debug information a few hundred.
pub const MAX_KERNEL_FILE: u64 = 1 << 30;

/// Read granularity: the interrupt flag is checked between chunks.
const CHUNK: u64 = 4 << 20;

/// An input file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} is {kind}, not a regular file", path.display())]
    NotRegular {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {} is {size} bytes, more than the {limit} bytes kvmsim reads ({why})", path.display())]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        size: u64,
        limit: u64,
        why: String,
    },
    #[error("interrupted by the user while reading {what} {}", path.display())]
    Interrupted { what: &'static str, path: PathBuf },
}

/// What a file that is not a regular file is, in words (None: a regular file).
fn kind(t: FileType) -> Option<&'static str> {
    let k = if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Some(k)
}

/// The limit a file is checked against: at most `limit` bytes, because `why`.
#[derive(Debug, Clone)]
pub struct Limit {
    pub bytes: u64,
    pub why: String,
}

impl Limit {
    /// The limit of a kernel image ([`MAX_KERNEL_FILE`]).
    pub fn kernel() -> Self {
        Limit {
            bytes: MAX_KERNEL_FILE,
            why: "the limit for kernel images".into(),
        }
    }

    /// The limit of an initrd: guest RAM of `ram` bytes.
    pub fn initrd(ram: u64) -> Self {
        Limit {
            bytes: ram,
            why: "an initrd must fit in guest RAM, system.memory".into(),
        }
    }
}

/// Checks that `path` is a regular file of at most `limit` bytes without
/// opening it; returns its size.
pub fn check_file(path: &str, what: &'static str, limit: &Limit) -> Result<u64, InputError> {
    let p = PathBuf::from(path);
    let m = std::fs::metadata(&p).map_err(|source| InputError::Read {
        what,
        path: p.clone(),
        source,
    })?;
    check_metadata(&m, &p, what, limit)
}

fn check_metadata(
    m: &std::fs::Metadata,
    path: &std::path::Path,
    what: &'static str,
    limit: &Limit,
) -> Result<u64, InputError> {
    if let Some(kind) = kind(m.file_type()) {
        return Err(InputError::NotRegular {
            what,
            path: path.into(),
            kind,
        });
    }
    if m.len() > limit.bytes {
        return Err(InputError::TooLarge {
            what,
            path: path.into(),
            size: m.len(),
            limit: limit.bytes,
            why: limit.why.clone(),
        });
    }
    Ok(m.len())
}

/// Reads the regular file at `path`, at most `limit` bytes, stopping if
/// the user interrupts the run (SIGINT/SIGTERM).
pub fn read_file(path: &str, what: &'static str, limit: &Limit) -> Result<Vec<u8>, InputError> {
    let p = PathBuf::from(path);
    let io = |source| InputError::Read {
        what,
        path: p.clone(),
        source,
    };
    // Refused before opening: opening a FIFO for reading would wait for a writer.
    check_file(path, what, limit)?;
    // O_NONBLOCK: should the name have become a FIFO since, open does not wait.
    let f: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&p)
        .map_err(io)?;
    let size = check_metadata(&f.metadata().map_err(io)?, &p, what, limit)?;
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // One byte more than the limit tells a file that grew past it.
    let mut rest = f.take(limit.bytes.saturating_add(1));
    loop {
        if crate::console::interrupted() {
            return Err(InputError::Interrupted { what, path: p });
        }
        let n = (&mut rest).take(CHUNK).read_to_end(&mut data).map_err(io)?;
        if n == 0 {
            break;
        }
    }
    if data.len() as u64 > limit.bytes {
        return Err(InputError::TooLarge {
            what,
            path: p,
            size: data.len() as u64,
            limit: limit.bytes,
            why: limit.why.clone(),
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvmsim-input-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn limit(bytes: u64) -> Limit {
        Limit {
            bytes,
            why: "the test's limit".into(),
        }
    }

    #[test]
    fn special_files_are_refused_by_kind() {
        let d = tmp("kinds");
        let fifo = d.join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        for (path, kind) in [
            ("/dev/zero", "a character device"),
            (d.to_str().unwrap(), "a directory"),
            (fifo.to_str().unwrap(), "a FIFO"),
        ] {
            let e = read_file(path, "kernel", &Limit::kernel())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(path) && e.contains(kind) && e.contains("not a regular file"),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_over_the_limit_are_refused_unread() {
        let d = tmp("large");
        let f = d.join("big");
        // Sparse: takes no disk space.
        File::create(&f)
            .unwrap()
            .set_len(MAX_KERNEL_FILE + 1)
            .unwrap();
        let e = read_file(f.to_str().unwrap(), "kernel", &Limit::kernel())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1073741825 bytes") && e.contains("1073741824") && e.contains("kernel"),
            "{e}"
        );
        let small = d.join("small");
        std::fs::write(&small, b"12345").unwrap();
        assert_eq!(
            read_file(small.to_str().unwrap(), "initrd", &limit(5)).unwrap(),
            b"12345"
        );
        let e = read_file(small.to_str().unwrap(), "initrd", &limit(4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the test's limit"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_files_say_so() {
        let e = read_file("/nonexistent/k", "kernel", &Limit::kernel())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot read kernel /nonexistent/k"), "{e}");
    }
}
