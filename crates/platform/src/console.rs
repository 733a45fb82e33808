//! The host side of the guest console and of user interrupts.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::uart::InputQueue;

/// The console's output: the system's serial log, plus kvmsim's stdout if
/// asked (each line prefixed with the system's name when several share it).
pub struct SerialSink {
    log: File,
    stdout: bool,
    prefix: Option<String>,
    line: Vec<u8>,
}

impl SerialSink {
    pub fn new(log: File, stdout: bool, prefix: Option<String>) -> Self {
        SerialSink {
            log,
            stdout,
            prefix,
            line: Vec::new(),
        }
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The log is unbuffered: nothing is lost if the run dies.
        self.log.write_all(buf)?;
        if self.stdout {
            match &self.prefix {
                None => {
                    let _ = std::io::stdout().write_all(buf);
                }
                Some(p) => {
                    // Whole lines, so that systems' outputs do not interleave mid-line.
                    for &b in buf {
                        self.line.push(b);
                        if b == b'\n' || self.line.len() >= 4096 {
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(p.as_bytes());
                            let _ = out.write_all(&self.line);
                            self.line.clear();
                        }
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.stdout {
            let _ = std::io::stdout().flush();
        }
        Ok(())
    }
}

/// True when stdin is a terminal or a pipe (not a file, not /dev/null).
pub fn stdin_is_interactive() -> bool {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return true;
    }
    let fd = stdin.as_fd().try_clone_to_owned();
    fd.ok()
        .and_then(|fd| File::from(fd).metadata().ok())
        .is_some_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_fifo()
        })
}

/// Starts a thread that feeds stdin to the UART, when stdin is a terminal
/// or a pipe. It reads only what the guest is ready for (the UART says how
/// many bytes: none until the guest enables its receiver) and reads the
/// file descriptor directly, without a buffer, so that input the guest did
/// not ask for stays in stdin for whoever reads it next (a shell loop
/// around kvmsim). The thread blocks the control signals so that they
/// reach the simulation thread.
pub fn spawn_stdin_reader() -> Option<InputQueue> {
    if !stdin_is_interactive() {
        return None;
    }
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let mut stdin = File::from(fd);
    let queue = InputQueue::default();
    let q = queue.clone();
    std::thread::Builder::new()
        .name("kvmsim-stdin".into())
        .spawn(move || {
            for sig in [libc::SIGINT, libc::SIGTERM] {
                let _ = vmm_sys_util::signal::block_signal(sig);
            }
            let mut buf = [0u8; 64];
            loop {
                let n = q.wait_wanted().min(buf.len());
                match stdin.read(&mut buf[..n]) {
                    Ok(0) => break,
                    Ok(k) => q.push(&buf[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        })
        .ok()?;
    Some(queue)
}

/// True the first time it is called with `what` in this process: for
/// notices that hold for the whole host (said once, not once per system).
pub fn first_time(what: &str) -> bool {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if said.iter().any(|s| s == what) {
        return false;
    }
    said.push(what.to_string());
    true
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag (and interrupt KVM_RUN) instead of
/// killing the process, so an interrupted run still writes its stats.
pub fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_interrupt) {
            tracing::warn!("cannot install a handler for signal {sig}: {e}");
        }
    }
}

/// Asks the run to stop, as SIGINT/SIGTERM do (set-up stops at its next
/// check, a running simulation at its next event).
pub fn request_interrupt() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// True once the user asked the run to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
