//! The system calls: Linux's x86-64 ABI, serviced on the host.
//!
//! Every pointer the program passes is checked against its mappings
//! ([`AddressSpace::read_user`] / `write_user`): a bad one is EFAULT.
//! Host memory per call is bounded: reads and writes move at most
//! [`MAX_IO`] bytes per call (a shorter count, as Linux may return), path
//! names at most PATH_MAX bytes, vectors at most IOV_MAX entries.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sim::Tick;

use crate::mm::{Backing, PhysMem, Vma, EINVAL, ENOMEM, MMAP_MIN, PAGE, PROT_READ, PROT_WRITE};
use crate::process::Process;

pub const EPERM: i64 = 1;
pub const ENOENT: i64 = 2;
pub const ESRCH: i64 = 3;
pub const EBADF: i64 = 9;
pub const EAGAIN: i64 = 11;
pub const ENOTDIR: i64 = 20;
pub const EMFILE: i64 = 24;
pub const ENOTTY: i64 = 25;
pub const ESPIPE: i64 = 29;
pub const ERANGE: i64 = 34;
pub const ENAMETOOLONG: i64 = 36;
pub const ENOSYS: i64 = 38;
pub const EINTR: i64 = 4;
pub const EOPNOTSUPP: i64 = 95;
pub const EPIPE: i64 = 32;
pub const EACCES: i64 = 13;
pub const EEXIST: i64 = 17;
pub const ENOSPC: i64 = 28;
/// Not an errno the program sees: the call would block (a pipe), and
/// [`Process::blocked`] says on what. The device parks the thread and
/// makes the call again when the pipe changes.
pub const ERESTARTSYS: i64 = 512;

/// Calls that change the host file system at one path.
#[derive(Debug, Clone, Copy)]
enum PathOp {
    Unlink,
    Rmdir,
    Mkdir,
}

fn cpath(p: &std::path::Path) -> Result<std::ffi::CString, i64> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| EINVAL)
}

fn check(r: libc::c_int) -> Result<i64, i64> {
    if r < 0 {
        Err(last_err())
    } else {
        Ok(i64::from(r))
    }
}

/// The identity the program sees.
pub const PID: u32 = 1000;
pub const PPID: u32 = 999;
pub const UID: u32 = 1000;
pub const GID: u32 = 1000;

/// The most bytes one read or write moves.
pub const MAX_IO: usize = 1 << 20;
/// File descriptors (RLIMIT_NOFILE).
pub const MAX_FDS: usize = 1024;
const PATH_MAX: usize = 4096;
const IOV_MAX: u64 = 1024;

/// What an open file descriptor refers to.
#[derive(Debug)]
pub enum Object {
    /// kvmsim's stdin (or nothing, when the run does not read stdin).
    Stdin { enabled: bool },
    /// The program's stdout (1) or stderr (2): kvmsim's, and a file in the
    /// output folder.
    Out(Arc<Mutex<Sink>>),
    /// A host file or directory.
    Host(std::fs::File),
    /// An end of a pipe inside the process.
    Pipe(crate::pipe::PipeEnd),
    /// An eventfd (eventfd, eventfd2).
    EventFd(crate::eventfd::EventFd),
    /// An epoll instance (epoll_create, epoll_create1).
    Epoll(crate::epoll::Epoll),
    /// A read-only file whose contents kvmsim gives (the CPU lists under
    /// /sys/devices/system/cpu), and the read position.
    Synthetic { data: Vec<u8>, pos: Mutex<usize> },
}

/// The files kvmsim answers itself (the program's absolute path, its
/// contents for `cpus` CPUs): the CPUs online and possible, so that
/// glibc's get_nprocs and sysconf(_SC_NPROCESSORS_*) give the process's
/// CPU count, not the host's.
pub fn synthetic_file(path: &[u8], cpus: usize) -> Option<Vec<u8>> {
    match path {
        b"/sys/devices/system/cpu/online" | b"/sys/devices/system/cpu/possible" => {
            Some(if cpus <= 1 {
                b"0\n".to_vec()
            } else {
                format!("0-{}\n", cpus - 1).into_bytes()
            })
        }
        _ => None,
    }
}

/// poll's events for an open file now: pipes and eventfds as Linux gives
/// them, an epoll instance readable while a wait would report something,
/// host files, the standard streams and kvmsim's own files always ready
/// (as regular files are).
pub fn poll_state(obj: &Object) -> i16 {
    let (r, w) = (
        libc::POLLIN | libc::POLLRDNORM,
        libc::POLLOUT | libc::POLLWRNORM,
    );
    match obj {
        Object::Pipe(end) => end.poll(),
        Object::EventFd(e) => e.poll(),
        Object::Epoll(ep) => {
            if ep.ready(1).is_empty() {
                0
            } else {
                r
            }
        }
        Object::Stdin { .. } | Object::Synthetic { .. } => r,
        Object::Out(_) => w,
        Object::Host(_) => r | w,
    }
}

/// Where the program's stdout or stderr goes.
pub struct Sink {
    pub echo: Option<Box<dyn Write + Send>>,
    pub log: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

impl Sink {
    fn write(&mut self, data: &[u8]) {
        if let Some(e) = &mut self.echo {
            let _ = e.write_all(data);
            let _ = e.flush();
        }
        if let Some(l) = &mut self.log {
            let _ = l.write_all(data);
            let _ = l.flush();
        }
    }
}

/// An open file: the object and the path it was opened by.
#[derive(Debug)]
pub struct OpenFile {
    pub obj: Object,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
struct Fd {
    file: Arc<OpenFile>,
    cloexec: bool,
}

/// The file-descriptor table.
#[derive(Debug, Default)]
pub struct Files {
    fds: Vec<Option<Fd>>,
}

impl Files {
    /// Descriptors 0, 1 and 2.
    pub fn stdio(stdin: bool, out: Sink, err: Sink) -> Files {
        let mk = |obj, path: &str| {
            Some(Fd {
                file: Arc::new(OpenFile {
                    obj,
                    path: path.into(),
                }),
                cloexec: false,
            })
        };
        Files {
            fds: vec![
                mk(Object::Stdin { enabled: stdin }, "/dev/stdin"),
                mk(Object::Out(Arc::new(Mutex::new(out))), "/dev/stdout"),
                mk(Object::Out(Arc::new(Mutex::new(err))), "/dev/stderr"),
            ],
        }
    }

    fn get(&self, fd: u64) -> Result<Arc<OpenFile>, i64> {
        // A descriptor is an int: only the low 32 bits count.
        usize::try_from(fd as u32)
            .ok()
            .and_then(|i| self.fds.get(i))
            .and_then(|f| f.as_ref())
            .map(|f| f.file.clone())
            .ok_or(EBADF)
    }

    fn install(&mut self, file: Arc<OpenFile>, cloexec: bool, min: usize) -> Result<i64, i64> {
        let slot = (min..MAX_FDS)
            .find(|&i| self.fds.get(i).is_none_or(|f| f.is_none()))
            .ok_or(EMFILE)?;
        if self.fds.len() <= slot {
            self.fds.resize(slot + 1, None);
        }
        self.fds[slot] = Some(Fd { file, cloexec });
        Ok(slot as i64)
    }

    fn close(&mut self, fd: u64) -> Result<i64, i64> {
        let slot = usize::try_from(fd)
            .ok()
            .and_then(|i| self.fds.get_mut(i))
            .ok_or(EBADF)?;
        slot.take().map(|_| 0).ok_or(EBADF)
    }
}

/// The time a call sees.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The simulated time of the call.
    pub now: Tick,
    /// CLOCK_REALTIME at tick 0, in nanoseconds since the Unix epoch.
    pub realtime_base_ns: u64,
}

/// How a call ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Return this value (a negative errno for errors) to the program.
    Return(i64),
    /// The process ends with this status (0-255, or 128 + signal).
    Exit { status: i32, message: String },
    /// rt_sigreturn: the registers come from the signal frame at RSP.
    SigReturn,
    /// The call would block on wait key `key` (a pipe, or poll; `fd` the
    /// descriptor, or poll's descriptor count, for messages): the thread
    /// waits until the key is woken or `deadline` (poll's timeout) passes,
    /// then makes the call again; a deadline already past returns 0.
    Block {
        key: u64,
        fd: u32,
        deadline: Option<Tick>,
    },
}

/// What a call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub flow: Flow,
    /// Simulated time the call takes beyond the per-call latency (sleeps).
    pub sleep: Tick,
}

fn ret(v: Result<i64, i64>) -> Done {
    Done {
        flow: Flow::Return(v.unwrap_or_else(|e| -e)),
        sleep: 0,
    }
}

fn host_err(e: std::io::Error) -> i64 {
    i64::from(e.raw_os_error().unwrap_or(libc::EIO))
}

fn last_err() -> i64 {
    host_err(std::io::Error::last_os_error())
}

/// Calls with their numbers.
pub mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const OPEN: u64 = 2;
    pub const CLOSE: u64 = 3;
    pub const STAT: u64 = 4;
    pub const FSTAT: u64 = 5;
    pub const LSTAT: u64 = 6;
    pub const LSEEK: u64 = 8;
    pub const MMAP: u64 = 9;
    pub const MPROTECT: u64 = 10;
    pub const MUNMAP: u64 = 11;
    pub const BRK: u64 = 12;
    pub const RT_SIGACTION: u64 = 13;
    pub const RT_SIGPROCMASK: u64 = 14;
    pub const IOCTL: u64 = 16;
    pub const PREAD64: u64 = 17;
    pub const PWRITE64: u64 = 18;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const ACCESS: u64 = 21;
    pub const SCHED_YIELD: u64 = 24;
    pub const MREMAP: u64 = 25;
    pub const MADVISE: u64 = 28;
    pub const MINCORE: u64 = 27;
    pub const CREAT: u64 = 85;
    pub const LINK: u64 = 86;
    pub const SYMLINK: u64 = 88;
    pub const CHMOD: u64 = 90;
    pub const FCHMOD: u64 = 91;
    pub const GETGROUPS: u64 = 115;
    pub const LINKAT: u64 = 265;
    pub const SYMLINKAT: u64 = 266;
    pub const FCHMODAT: u64 = 268;
    pub const UTIMENSAT: u64 = 280;
    pub const FCHMODAT2: u64 = 452;
    pub const DUP: u64 = 32;
    pub const DUP2: u64 = 33;
    pub const NANOSLEEP: u64 = 35;
    pub const GETPID: u64 = 39;
    pub const EXIT: u64 = 60;
    pub const CLONE: u64 = 56;
    pub const CLONE3: u64 = 435;
    pub const KILL: u64 = 62;
    pub const UNAME: u64 = 63;
    pub const FCNTL: u64 = 72;
    pub const GETCWD: u64 = 79;
    pub const READLINK: u64 = 89;
    pub const UMASK: u64 = 95;
    pub const GETTIMEOFDAY: u64 = 96;
    pub const GETRLIMIT: u64 = 97;
    pub const SETUID: u64 = 105;
    pub const SETGID: u64 = 106;
    pub const PRCTL: u64 = 157;
    pub const GETUID: u64 = 102;
    pub const GETGID: u64 = 104;
    pub const GETEUID: u64 = 107;
    pub const GETEGID: u64 = 108;
    pub const GETPPID: u64 = 110;
    pub const SIGALTSTACK: u64 = 131;
    pub const ARCH_PRCTL: u64 = 158;
    pub const GETTID: u64 = 186;
    pub const TIME: u64 = 201;
    pub const FUTEX: u64 = 202;
    pub const SCHED_GETAFFINITY: u64 = 204;
    pub const GETDENTS64: u64 = 217;
    pub const SET_TID_ADDRESS: u64 = 218;
    pub const CLOCK_GETTIME: u64 = 228;
    pub const CLOCK_GETRES: u64 = 229;
    pub const CLOCK_NANOSLEEP: u64 = 230;
    pub const EXIT_GROUP: u64 = 231;
    pub const TGKILL: u64 = 234;
    pub const OPENAT: u64 = 257;
    pub const NEWFSTATAT: u64 = 262;
    pub const READLINKAT: u64 = 267;
    pub const FACCESSAT: u64 = 269;
    pub const SET_ROBUST_LIST: u64 = 273;
    pub const DUP3: u64 = 292;
    pub const PRLIMIT64: u64 = 302;
    pub const GETRANDOM: u64 = 318;
    pub const RSEQ: u64 = 334;
    pub const PIPE: u64 = 22;
    pub const PIPE2: u64 = 293;
    pub const POLL: u64 = 7;
    pub const PPOLL: u64 = 271;
    pub const SELECT: u64 = 23;
    pub const PSELECT6: u64 = 270;
    pub const EVENTFD: u64 = 284;
    pub const EVENTFD2: u64 = 290;
    pub const EPOLL_CREATE: u64 = 213;
    pub const EPOLL_CREATE1: u64 = 291;
    pub const EPOLL_CTL: u64 = 233;
    pub const EPOLL_WAIT: u64 = 232;
    pub const EPOLL_PWAIT: u64 = 281;
    pub const EPOLL_PWAIT2: u64 = 441;
    pub const FACCESSAT2: u64 = 439;
    pub const FSYNC: u64 = 74;
    pub const FDATASYNC: u64 = 75;
    pub const FTRUNCATE: u64 = 77;
    pub const RENAME: u64 = 82;
    pub const MKDIR: u64 = 83;
    pub const RMDIR: u64 = 84;
    pub const UNLINK: u64 = 87;
    pub const SYSINFO: u64 = 99;
    pub const STATFS: u64 = 137;
    pub const FSTATFS: u64 = 138;
    pub const GETXATTR: u64 = 191;
    pub const LGETXATTR: u64 = 192;
    pub const FGETXATTR: u64 = 193;
    pub const LISTXATTR: u64 = 194;
    pub const LLISTXATTR: u64 = 195;
    pub const FLISTXATTR: u64 = 196;
    pub const FADVISE64: u64 = 221;
    pub const MKDIRAT: u64 = 258;
    pub const UNLINKAT: u64 = 263;
    pub const RENAMEAT: u64 = 264;
    pub const RENAMEAT2: u64 = 316;
    pub const STATX: u64 = 332;
    pub const RT_SIGRETURN: u64 = 15;
    pub const PAUSE: u64 = 34;
    pub const GETITIMER: u64 = 36;
    pub const ALARM: u64 = 37;
    pub const SETITIMER: u64 = 38;
    pub const RT_SIGPENDING: u64 = 127;
    pub const RT_SIGSUSPEND: u64 = 130;
    pub const TKILL: u64 = 200;
    pub const CHDIR: u64 = 80;
    pub const FCHDIR: u64 = 81;
}

const AT_FDCWD: i64 = -100;
const AT_EMPTY_PATH: u64 = 0x1000;
const AT_SYMLINK_NOFOLLOW: u64 = 0x100;

/// Signal names for messages.
pub fn signal_name(sig: i32) -> &'static str {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    usize::try_from(sig - 1)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("a real-time signal")
}

impl Process {
    /// Services call `nr` with arguments `a` (RDI, RSI, RDX, R10, R8, R9).
    pub fn syscall(
        &mut self,
        mem: &dyn PhysMem,
        nr: u64,
        a: [u64; 6],
        clock: Clock,
    ) -> Option<Done> {
        use nr::*;
        let done = match nr {
            READ => ret(self.read(mem, a[0], a[1], a[2], None)),
            WRITE => ret(self.write(mem, a[0], a[1], a[2], None)),
            PREAD64 => ret(self.read(mem, a[0], a[1], a[2], Some(a[3] as i64))),
            PWRITE64 => ret(self.write(mem, a[0], a[1], a[2], Some(a[3] as i64))),
            READV => ret(self.vector_io(mem, a[0], a[1], a[2], false)),
            WRITEV => ret(self.vector_io(mem, a[0], a[1], a[2], true)),
            OPEN => ret(self.openat(mem, AT_FDCWD as u64, a[0], a[1], a[2])),
            OPENAT => ret(self.openat(mem, a[0], a[1], a[2], a[3])),
            // creat(path, mode) is open(path, O_CREAT | O_WRONLY | O_TRUNC, mode).
            CREAT => ret(self.openat(
                mem,
                AT_FDCWD as u64,
                a[0],
                (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u64,
                a[1],
            )),
            CLOSE => ret(self.files.close(a[0])),
            FSTAT => ret(self.fstat(mem, a[0], a[1])),
            STAT => ret(self.fstatat(mem, AT_FDCWD as u64, a[0], a[1], 0)),
            LSTAT => ret(self.fstatat(mem, AT_FDCWD as u64, a[0], a[1], AT_SYMLINK_NOFOLLOW)),
            NEWFSTATAT => ret(self.fstatat(mem, a[0], a[1], a[2], a[3])),
            LSEEK => ret(self.lseek(a[0], a[1] as i64, a[2])),
            GETDENTS64 => ret(self.getdents64(mem, a[0], a[1], a[2])),
            READLINK => ret(self.readlinkat(mem, AT_FDCWD as u64, a[0], a[1], a[2])),
            READLINKAT => ret(self.readlinkat(mem, a[0], a[1], a[2], a[3])),
            GETCWD => ret(self.getcwd(mem, a[0], a[1])),
            CHDIR => ret(self.chdir(mem, Some(a[0]), 0)),
            FCHDIR => ret(self.chdir(mem, None, a[0])),
            ACCESS => ret(self.faccessat(mem, AT_FDCWD as u64, a[0], a[1])),
            FACCESSAT | FACCESSAT2 => ret(self.faccessat(mem, a[0], a[1], a[2])),
            DUP => ret(self
                .files
                .get(a[0])
                .and_then(|f| self.files.install(f, false, 0))),
            DUP2 | DUP3 => ret(self.dup3(a[0], a[1], if nr == DUP3 { a[2] } else { u64::MAX })),
            FCNTL => ret(self.fcntl(a[0], a[1], a[2])),
            IOCTL => ret(self.ioctl(mem, a[0], a[1], a[2])),
            PIPE => ret(self.pipe2(mem, a[0], 0)),
            PIPE2 => ret(self.pipe2(mem, a[0], a[1])),
            POLL => {
                // A negative timeout is none; milliseconds otherwise.
                let ms = a[2] as i32;
                let timeout = (ms >= 0).then(|| u64::from(ms as u32) * 1_000_000_000);
                ret(self.poll(mem, a[0], a[1], timeout, clock, &mut None))
            }
            PPOLL => ret(self.ppoll(mem, a, clock)),
            SELECT => ret(self.select(mem, a, clock, false)),
            PSELECT6 => ret(self.select(mem, a, clock, true)),
            EVENTFD => ret(self.eventfd2(a[0], 0)),
            EVENTFD2 => ret(self.eventfd2(a[0], a[1])),
            EPOLL_CREATE => ret(if a[0] as i32 <= 0 {
                Err(EINVAL)
            } else {
                self.epoll_create1(0)
            }),
            EPOLL_CREATE1 => ret(self.epoll_create1(a[0])),
            EPOLL_CTL => ret(self.epoll_ctl(mem, a[0], a[1], a[2], a[3])),
            EPOLL_WAIT | EPOLL_PWAIT | EPOLL_PWAIT2 => ret(self.epoll_wait(mem, nr, a, clock)),
            BRK => ret(Ok(self.set_brk(mem, a[0]) as i64)),
            MMAP => ret(self.mmap(mem, a[0], a[1], a[2], a[3], a[4], a[5])),
            MUNMAP => ret(self.munmap(mem, a[0], a[1])),
            MPROTECT => ret(self.mprotect(mem, a[0], a[1], a[2])),
            // Moving a mapping is not supported yet: callers (glibc's
            // realloc) fall back to mmap + copy + munmap.
            MREMAP => ret(Err(ENOMEM)),
            MADVISE => ret(Ok(0)),
            MINCORE => ret(self.mincore(mem, a[0], a[1], a[2])),
            EXIT | EXIT_GROUP => Done {
                flow: Flow::Exit {
                    status: (a[0] & 0xff) as i32,
                    message: String::new(),
                },
                sleep: 0,
            },
            KILL | TGKILL | TKILL => {
                let (pid, sig) = match nr {
                    KILL => (a[0], a[1]),
                    TKILL => (a[0], a[1]),
                    _ => (a[1], a[2]),
                };
                let other_group = nr == TGKILL && a[0] != u64::from(PID);
                let me = if nr == KILL {
                    u64::from(PID)
                } else {
                    u64::from(self.t.tid)
                };
                if other_group || (pid != me && (nr != KILL || (pid != 0 && pid as i64 != -1))) {
                    ret(Err(ESRCH))
                } else if sig > 64 {
                    ret(Err(EINVAL))
                } else {
                    // Sent; delivered (or acted on) when the call returns.
                    // tgkill/tkill to another thread are the device's
                    // (dev::SeDevice), which knows the other threads.
                    if sig != 0 {
                        if nr == KILL {
                            self.send(sig as i32);
                        } else {
                            self.send_thread(sig as i32);
                        }
                    }
                    ret(Ok(0))
                }
            }
            RT_SIGRETURN => Done {
                flow: Flow::SigReturn,
                sleep: 0,
            },
            ALARM => ret(Ok(self.alarm(a[0], clock))),
            SETITIMER => ret(self.setitimer(mem, a[0], a[1], a[2], clock)),
            GETITIMER => ret(self.getitimer(mem, a[0], a[1], clock)),
            PAUSE => self.wait_for_signal(self.t.sigmask, clock, "pause"),
            RT_SIGSUSPEND => {
                let mut b = [0u8; 8];
                if a[1] != 8 {
                    return Some(ret(Err(EINVAL)));
                }
                if let Err(e) = self.space.read_user(mem, a[0], &mut b) {
                    return Some(ret(Err(e)));
                }
                let mask = u64::from_le_bytes(b) & !crate::signal::UNBLOCKABLE;
                let done = self.wait_for_signal(mask, clock, "rt_sigsuspend");
                if done.flow == Flow::Return(-EINTR) {
                    // The handler runs with the given mask; the old one comes
                    // back when it returns.
                    self.t.suspend_mask = Some(self.t.sigmask);
                    self.t.sigmask = mask;
                }
                done
            }
            RT_SIGPENDING => {
                if a[1] > 8 {
                    return Some(ret(Err(EINVAL)));
                }
                let p = ((self.pending | self.t.pending) & self.t.sigmask).to_le_bytes();
                ret(self
                    .space
                    .write_user(mem, a[0], &p[..a[1] as usize])
                    .map(|_| 0))
            }
            ARCH_PRCTL => ret(self.arch_prctl(mem, a[0], a[1])),
            SET_TID_ADDRESS => {
                self.t.tid_address = a[0];
                ret(Ok(i64::from(self.t.tid)))
            }
            SET_ROBUST_LIST => {
                self.t.robust_list = a[0];
                ret(if a[1] == 24 { Ok(0) } else { Err(EINVAL) })
            }
            RSEQ => ret(Err(ENOSYS)),
            PRLIMIT64 => ret(self.prlimit(mem, a[0], a[1], a[2], a[3])),
            GETRLIMIT => ret(self.prlimit(mem, 0, a[0], 0, a[1])),
            UNAME => ret(self.uname(mem, a[0])),
            GETPID => ret(Ok(i64::from(PID))),
            GETTID => ret(Ok(i64::from(self.t.tid))),
            GETPPID => ret(Ok(i64::from(PPID))),
            GETUID | GETEUID => ret(Ok(i64::from(UID))),
            GETGID | GETEGID => ret(Ok(i64::from(GID))),
            UMASK => ret(Ok(0o022)),
            // The identity cannot change: setting it to itself succeeds.
            SETUID => ret(if a[0] == u64::from(UID) {
                Ok(0)
            } else {
                Err(EPERM)
            }),
            SETGID => ret(if a[0] == u64::from(GID) {
                Ok(0)
            } else {
                Err(EPERM)
            }),
            PRCTL => ret(self.prctl(mem, a[0], a[1])),
            GETRANDOM => ret(self.getrandom(mem, a[0], a[1])),
            CLOCK_GETTIME => ret(self.clock_gettime(mem, a[0], a[1], clock)),
            CLOCK_GETRES => ret(self.clock_getres(mem, a[0], a[1])),
            GETTIMEOFDAY => ret(self.gettimeofday(mem, a[0], clock)),
            TIME => {
                let t = (clock.realtime_base_ns + clock.now / 1000) / 1_000_000_000;
                if a[0] != 0 {
                    if let Err(e) = self.space.write_user(mem, a[0], &t.to_le_bytes()) {
                        return Some(ret(Err(e)));
                    }
                }
                ret(Ok(t as i64))
            }
            NANOSLEEP => self.sleep(mem, 1, 0, a[0], a[1], clock),
            CLOCK_NANOSLEEP => self.sleep(mem, a[0], a[1], a[2], a[3], clock),
            SCHED_YIELD => ret(Ok(0)),
            SCHED_GETAFFINITY => ret(self.getaffinity(mem, a[1], a[2])),
            RT_SIGACTION => ret(self.sigaction(mem, a[0], a[1], a[2], a[3])),
            RT_SIGPROCMASK => ret(self.sigprocmask(mem, a[0], a[1], a[2], a[3])),
            SIGALTSTACK => ret(self.sigaltstack(mem, a[0], a[1])),
            // futex, clone, clone3, a thread's exit, signals to other
            // threads: the device's (dev::SeDevice), which knows them all.
            STATX => ret(self.statx(mem, a[0], a[1], a[2], a[3], a[4])),
            STATFS => ret(self.statfs(mem, Some(a[0]), 0, a[1])),
            FSTATFS => ret(self.statfs(mem, None, a[0], a[1])),
            // Advice only: nothing to do.
            FADVISE64 => ret(self.files.get(a[0]).map(|_| 0)),
            SYSINFO => ret(self.sysinfo(mem, a[0], clock)),
            UNLINK => ret(self.path_op(mem, PathOp::Unlink, AT_FDCWD as u64, a[0], 0)),
            UNLINKAT => ret(self.path_op(
                mem,
                if a[2] & 0x200 != 0 {
                    PathOp::Rmdir
                } else {
                    PathOp::Unlink
                },
                a[0],
                a[1],
                0,
            )),
            RMDIR => ret(self.path_op(mem, PathOp::Rmdir, AT_FDCWD as u64, a[0], 0)),
            MKDIR => ret(self.path_op(mem, PathOp::Mkdir, AT_FDCWD as u64, a[0], a[1])),
            MKDIRAT => ret(self.path_op(mem, PathOp::Mkdir, a[0], a[1], a[2])),
            RENAME => ret(self.rename(mem, AT_FDCWD as u64, a[0], AT_FDCWD as u64, a[1], 0)),
            LINK => ret(self.link(mem, AT_FDCWD as u64, a[0], AT_FDCWD as u64, a[1], 0)),
            LINKAT => ret(self.link(mem, a[0], a[1], a[2], a[3], a[4])),
            SYMLINK => ret(self.symlink(mem, a[0], AT_FDCWD as u64, a[1])),
            SYMLINKAT => ret(self.symlink(mem, a[0], a[1], a[2])),
            CHMOD => ret(self.chmod(mem, AT_FDCWD as u64, a[0], a[1], 0)),
            FCHMODAT => ret(self.chmod(mem, a[0], a[1], a[2], 0)),
            FCHMODAT2 => ret(self.chmod(mem, a[0], a[1], a[2], a[3])),
            FCHMOD => ret(self.fchmod(a[0], a[1])),
            UTIMENSAT => ret(self.utimensat(mem, a, clock)),
            // One group, the process's own (as `id` shows it).
            GETGROUPS => ret(match a[0] as i32 {
                0 => Ok(1),
                n if n < 0 => Err(EINVAL),
                _ => self
                    .space
                    .write_user(mem, a[1], &GID.to_le_bytes())
                    .map(|()| 1),
            }),
            RENAMEAT => ret(self.rename(mem, a[0], a[1], a[2], a[3], 0)),
            RENAMEAT2 => ret(self.rename(mem, a[0], a[1], a[2], a[3], a[4])),
            FTRUNCATE => ret(self.ftruncate(a[0], a[1])),
            FSYNC | FDATASYNC => ret(self.fsync(a[0])),
            // No extended attributes (as on a file system without them):
            // ls and cp ask for ACLs and security labels and go on.
            GETXATTR | LGETXATTR | LISTXATTR | LLISTXATTR => ret(self
                .resolve(mem, AT_FDCWD as u64, a[0])
                .and(Err(EOPNOTSUPP))),
            FGETXATTR | FLISTXATTR => ret(self.files.get(a[0]).and(Err(EOPNOTSUPP))),
            _ => return None,
        };
        let mut done = done;
        if done.flow == Flow::Return(-ERESTARTSYS) {
            done.flow = match self.blocked.take() {
                Some((key, fd, deadline)) => Flow::Block { key, fd, deadline },
                None => Flow::Return(-EINTR),
            };
        }
        Some(done)
    }

    fn read(
        &mut self,
        mem: &dyn PhysMem,
        fd: u64,
        buf: u64,
        count: u64,
        at: Option<i64>,
    ) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        if let Object::Pipe(end) = &f.obj {
            if at.is_some() {
                return Err(ESPIPE);
            }
            return self.pipe_read(mem, fd, end, &[(buf, count)]);
        }
        if let Object::EventFd(e) = &f.obj {
            if at.is_some() {
                return Err(ESPIPE);
            }
            return self.eventfd_read(mem, fd, e, buf, count);
        }
        if let Object::Epoll(_) = &f.obj {
            return Err(EINVAL);
        }
        let n = (count as usize).min(MAX_IO);
        // The buffer's first byte must be writable before anything is
        // consumed; the rest is checked as the data is copied (as Linux does,
        // a count larger than the buffer is fine when the data fits).
        self.space
            .check_user(mem, buf, n.min(1) as u64, PROT_WRITE)?;
        let mut tmp = vec![0u8; n];
        let got = match (&f.obj, at) {
            (Object::Stdin { enabled: false }, _) => 0,
            (Object::Stdin { enabled: true }, None) => {
                // SAFETY: reads into `tmp`, which holds `n` bytes.
                let r = unsafe { libc::read(0, tmp.as_mut_ptr().cast(), n) };
                if r < 0 {
                    return Err(last_err());
                }
                r as usize
            }
            (Object::Stdin { .. } | Object::Out(_), Some(_)) => return Err(ESPIPE),
            (Object::Out(_), None) => return Err(EBADF),
            (Object::Pipe(_) | Object::EventFd(_) | Object::Epoll(_), _) => return Err(EBADF),
            (Object::Synthetic { data, pos }, at) => {
                let mut p = mem::lock(pos);
                let from = match at {
                    Some(off) if off < 0 => return Err(EINVAL),
                    Some(off) => usize::try_from(off).unwrap_or(usize::MAX),
                    None => *p,
                };
                let k = data.len().saturating_sub(from).min(n);
                if k > 0 {
                    tmp[..k].copy_from_slice(&data[from..from + k]);
                }
                if at.is_none() {
                    *p = from + k;
                }
                k
            }
            (Object::Host(file), None) => {
                let mut total = 0;
                while total < n {
                    match std::io::Read::read(&mut &*file, &mut tmp[total..]) {
                        Ok(0) => break,
                        Ok(k) => total += k,
                        Err(e) if total == 0 => return Err(host_err(e)),
                        Err(_) => break,
                    }
                }
                total
            }
            (Object::Host(file), Some(off)) => {
                if off < 0 {
                    return Err(EINVAL);
                }
                std::os::unix::fs::FileExt::read_at(file, &mut tmp, off as u64).map_err(host_err)?
            }
        };
        self.space.write_user(mem, buf, &tmp[..got])?;
        Ok(got as i64)
    }

    fn write(
        &mut self,
        mem: &dyn PhysMem,
        fd: u64,
        buf: u64,
        count: u64,
        at: Option<i64>,
    ) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        if let Object::Pipe(end) = &f.obj {
            if at.is_some() {
                return Err(ESPIPE);
            }
            return self.pipe_write(mem, fd, end, &[(buf, count)]);
        }
        if let Object::EventFd(e) = &f.obj {
            if at.is_some() {
                return Err(ESPIPE);
            }
            return self.eventfd_write(mem, fd, e, buf, count);
        }
        if let Object::Epoll(_) = &f.obj {
            return Err(EINVAL);
        }
        let n = (count as usize).min(MAX_IO);
        let mut tmp = vec![0u8; n];
        self.space.read_user(mem, buf, &mut tmp)?;
        self.write_bytes(&f, &tmp, at)
    }

    fn write_bytes(&mut self, f: &OpenFile, data: &[u8], at: Option<i64>) -> Result<i64, i64> {
        match (&f.obj, at) {
            (Object::Out(sink), None) => {
                mem::lock(sink).write(data);
                Ok(data.len() as i64)
            }
            (
                Object::Stdin { .. }
                | Object::Pipe(_)
                | Object::Synthetic { .. }
                | Object::EventFd(_)
                | Object::Epoll(_),
                _,
            ) => Err(EBADF),
            (Object::Out(_), Some(_)) => Err(ESPIPE),
            (Object::Host(file), None) => std::io::Write::write(&mut &*file, data)
                .map(|n| n as i64)
                .map_err(host_err),
            (Object::Host(file), Some(off)) => {
                if off < 0 {
                    return Err(EINVAL);
                }
                std::os::unix::fs::FileExt::write_at(file, data, off as u64)
                    .map(|n| n as i64)
                    .map_err(host_err)
            }
        }
    }

    fn vector_io(
        &mut self,
        mem: &dyn PhysMem,
        fd: u64,
        iov: u64,
        cnt: u64,
        write: bool,
    ) -> Result<i64, i64> {
        if cnt > IOV_MAX {
            return Err(EINVAL);
        }
        let f = self.files.get(fd)?;
        if let Object::Pipe(end) = &f.obj {
            // All the vector at once: a pipe write of it is one write
            // (atomic up to PIPE_BUF), a read takes what is there.
            let segs = self.iovecs(mem, iov, cnt)?;
            return if write {
                self.pipe_write(mem, fd, end, &segs)
            } else {
                self.pipe_read(mem, fd, end, &segs)
            };
        }
        let mut raw = vec![0u8; 16 * cnt as usize];
        self.space.read_user(mem, iov, &mut raw)?;
        let mut total: i64 = 0;
        for c in raw.chunks(16) {
            let base = u64::from_le_bytes(c[0..8].try_into().unwrap_or_default());
            let len = u64::from_le_bytes(c[8..16].try_into().unwrap_or_default());
            if len == 0 {
                continue;
            }
            if len > isize::MAX as u64 {
                return Err(EINVAL);
            }
            let r = if write {
                self.write(mem, fd, base, len, None)
            } else {
                self.read(mem, fd, base, len, None)
            };
            match r {
                Ok(n) => {
                    total += n;
                    if (n as u64) < len {
                        break;
                    }
                }
                Err(e) if total == 0 => return Err(e),
                Err(_) => {
                    // What is done is returned; a later segment's wait
                    // (an eventfd) is not made.
                    self.blocked = None;
                    break;
                }
            }
            if total as usize >= MAX_IO {
                break;
            }
        }
        Ok(total)
    }

    /// The (base, length) pairs of an iovec array of `cnt` entries.
    fn iovecs(&mut self, mem: &dyn PhysMem, iov: u64, cnt: u64) -> Result<Vec<(u64, u64)>, i64> {
        let mut raw = vec![0u8; 16 * cnt.min(IOV_MAX) as usize];
        self.space.read_user(mem, iov, &mut raw)?;
        let mut segs = Vec::with_capacity(raw.len() / 16);
        let mut total: u64 = 0;
        for c in raw.chunks(16) {
            let base = u64::from_le_bytes(c[0..8].try_into().unwrap_or_default());
            let len = u64::from_le_bytes(c[8..16].try_into().unwrap_or_default());
            total = total.checked_add(len).ok_or(EINVAL)?;
            if total > isize::MAX as u64 {
                return Err(EINVAL);
            }
            segs.push((base, len));
        }
        Ok(segs)
    }

    /// The call waits on `key` (see [`ERESTARTSYS`]).
    fn block(&mut self, key: u64, fd: u64) -> Result<i64, i64> {
        self.blocked = Some((key, fd as u32, None));
        Err(ERESTARTSYS)
    }

    /// read/readv of a pipe: what is there (at most the buffers' size and
    /// [`MAX_IO`]), end of file once every write end is closed, else a
    /// wait (EAGAIN if non-blocking).
    fn pipe_read(
        &mut self,
        mem: &dyn PhysMem,
        fd: u64,
        end: &crate::pipe::PipeEnd,
        segs: &[(u64, u64)],
    ) -> Result<i64, i64> {
        use crate::pipe::Ready;
        if end.is_writer() {
            return Err(EBADF);
        }
        let want = segs
            .iter()
            .fold(0u64, |t, s| t.saturating_add(s.1))
            .min(MAX_IO as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let data = match end.peek(want) {
            Ready::Now(d) => d,
            Ready::Wait if end.nonblock() => return Err(EAGAIN),
            Ready::Wait => return self.block(end.key(), fd),
        };
        // Copied out before it is taken: a bad buffer is EFAULT and the
        // data stays for the next read.
        let mut done = 0usize;
        for &(base, len) in segs {
            if done == data.len() {
                break;
            }
            let k = (len as usize).min(data.len() - done);
            if let Err(e) = self.space.write_user(mem, base, &data[done..done + k]) {
                if done == 0 {
                    return Err(e);
                }
                break;
            }
            done += k;
        }
        end.consume(done);
        Ok(done as i64)
    }

    /// write/writev to a pipe: EPIPE and SIGPIPE once every read end is
    /// closed; up to PIPE_BUF bytes go in at once or not at all, more go
    /// in as room allows. A blocking write returns once all is written
    /// (waiting for readers as often as needed: `ThreadState::pipe_done`
    /// carries what is written across the waits); a non-blocking one
    /// writes what fits, or EAGAIN.
    fn pipe_write(
        &mut self,
        mem: &dyn PhysMem,
        fd: u64,
        end: &crate::pipe::PipeEnd,
        segs: &[(u64, u64)],
    ) -> Result<i64, i64> {
        use crate::pipe::Ready;
        if !end.is_writer() {
            return Err(EBADF);
        }
        let total = segs
            .iter()
            .fold(0u64, |t, s| t.saturating_add(s.1))
            .min(MAX_IO as u64) as usize;
        let done = (std::mem::take(&mut self.t.pipe_done) as usize).min(total);
        let so_far = |e: i64| if done > 0 { Ok(done as i64) } else { Err(e) };
        if done == total {
            return Ok(total as i64);
        }
        let k = match end.room(total - done) {
            Err(()) => {
                self.send_thread(crate::signal::SIGPIPE);
                self.t.sigpipe = true;
                return so_far(EPIPE);
            }
            Ok(Ready::Wait) if end.nonblock() => return so_far(EAGAIN),
            Ok(Ready::Wait) => {
                self.t.pipe_done = done as u64;
                return self.block(end.key(), fd);
            }
            Ok(Ready::Now(k)) => k,
        };
        // Gather bytes done..done + k of the segments.
        let mut data = vec![0u8; k];
        let (mut skip, mut got) = (done, 0usize);
        for &(base, len) in segs {
            if got == k {
                break;
            }
            let len = len as usize;
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(k - got);
            let at = base.wrapping_add(skip as u64);
            if let Err(e) = self.space.read_user(mem, at, &mut data[got..got + n]) {
                if got == 0 {
                    return so_far(e);
                }
                break;
            }
            got += n;
            skip = 0;
        }
        end.push(&data[..got]);
        let done = done + got;
        if done == total || end.nonblock() || got < k {
            return Ok(done as i64);
        }
        self.t.pipe_done = done as u64;
        self.block(end.key(), fd)
    }

    /// poll / ppoll: the descriptors' states (pipes as Linux gives them;
    /// host files, the standard streams and kvmsim's own files always
    /// ready), or a wait until a pipe changes, the timeout (`timeout`,
    /// relative, in ticks; `None`: none) passes or a signal comes. A call
    /// made again after a wake keeps its first deadline
    /// (`ThreadState::poll_deadline`).
    fn poll(
        &mut self,
        mem: &dyn PhysMem,
        fds: u64,
        nfds: u64,
        timeout: Option<Tick>,
        clock: Clock,
        deadline_out: &mut Option<Tick>,
    ) -> Result<i64, i64> {
        if nfds > MAX_FDS as u64 {
            return Err(EINVAL);
        }
        let mut raw = vec![0u8; 8 * nfds as usize];
        self.space.read_user(mem, fds, &mut raw)?;
        let mut ready = 0;
        for e in raw.chunks_mut(8) {
            let fd = i32::from_le_bytes(e[0..4].try_into().unwrap_or_default());
            let events = i16::from_le_bytes(e[4..6].try_into().unwrap_or_default());
            let revents = if fd < 0 {
                0
            } else {
                match self.files.get(fd as u64) {
                    Err(_) => libc::POLLNVAL,
                    // POLLERR, POLLHUP (and POLLNVAL) come unasked.
                    Ok(f) => poll_state(&f.obj) & (events | libc::POLLERR | libc::POLLHUP),
                }
            };
            e[6..8].copy_from_slice(&revents.to_le_bytes());
            ready += i64::from(revents != 0);
        }
        self.space.write_user(mem, fds, &raw)?;
        *deadline_out = self.poll_wait(ready > 0, timeout, clock, nfds as u32)?;
        Ok(ready)
    }

    /// The end of a poll, select or epoll wait that found `ready` (or
    /// not): the call returns now (`Ok`, with its deadline, if it has
    /// one) if something is ready or its deadline (`timeout` from its
    /// first making, kept in `ThreadState::poll_deadline` while it is made
    /// again) has passed; otherwise it waits on the poll key, woken by
    /// any pipe or eventfd change. `what` is the descriptor count (or the
    /// epoll descriptor) for messages.
    fn poll_wait(
        &mut self,
        ready: bool,
        timeout: Option<Tick>,
        clock: Clock,
        what: u32,
    ) -> Result<Option<Tick>, i64> {
        let deadline = match self.t.poll_deadline.take() {
            Some(d) => Some(d),
            None => timeout.map(|t| clock.now.saturating_add(t)),
        };
        if ready || deadline.is_some_and(|d| d <= clock.now) {
            return Ok(deadline);
        }
        self.t.poll_deadline = deadline;
        self.blocked = Some((crate::pipe::POLL_KEY, what, deadline));
        Err(ERESTARTSYS)
    }

    /// A timespec timeout at `at` (`None` for a null pointer): EINVAL if
    /// it is not one (negative, or 10^9 nanoseconds or more), in ticks.
    fn read_timeout(&mut self, mem: &dyn PhysMem, at: u64) -> Result<Option<Tick>, i64> {
        if at == 0 {
            return Ok(None);
        }
        let mut b = [0u8; 16];
        self.space.read_user(mem, at, &mut b)?;
        let sec = i64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let nsec = i64::from_le_bytes(b[8..].try_into().unwrap_or_default());
        if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
            return Err(EINVAL);
        }
        let ns = (sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(nsec as u64);
        Ok(Some(ns.saturating_mul(1000)))
    }

    /// A wait's signal mask (ppoll, pselect6, epoll_pwait): the 8-byte
    /// set at `set` (none if null) is in force while the call waits; the
    /// mask to put back is kept for when it returns (or when a handler it
    /// let in returns). Returns whether a mask was set.
    fn wait_mask(&mut self, mem: &dyn PhysMem, set: u64, size: u64) -> Result<bool, i64> {
        if set == 0 {
            return Ok(false);
        }
        if size != 8 {
            return Err(EINVAL);
        }
        let mut b = [0u8; 8];
        self.space.read_user(mem, set, &mut b)?;
        if self.t.suspend_mask.is_none() {
            self.t.suspend_mask = Some(self.t.sigmask);
        }
        self.t.sigmask = u64::from_le_bytes(b) & !crate::signal::UNBLOCKABLE;
        Ok(true)
    }

    /// The call that set a wait mask returns (not to a handler): the old
    /// mask is back.
    fn end_wait_mask(&mut self, set: bool) {
        if set {
            if let Some(old) = self.t.suspend_mask.take() {
                self.t.sigmask = old;
            }
        }
    }

    /// ppoll: poll with a timespec timeout (the time left written back)
    /// and a signal mask in force while it waits.
    fn ppoll(&mut self, mem: &dyn PhysMem, a: [u64; 6], clock: Clock) -> Result<i64, i64> {
        let timeout = self.read_timeout(mem, a[2])?;
        let masked = self.wait_mask(mem, a[3], a[4])?;
        let mut deadline = None;
        let r = self.poll(mem, a[0], a[1], timeout, clock, &mut deadline);
        if r == Err(ERESTARTSYS) {
            return r;
        }
        self.end_wait_mask(masked);
        if let (Some(d), Ok(_)) = (deadline, r) {
            // The time left, as Linux writes it back.
            let left_ns = d.saturating_sub(clock.now) / 1000;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&(left_ns / 1_000_000_000).to_le_bytes());
            b[8..].copy_from_slice(&(left_ns % 1_000_000_000).to_le_bytes());
            self.space.write_user(mem, a[2], &b)?;
        }
        r
    }

    /// select (`pselect` false: a timeval timeout, written back with the
    /// time left as Linux does) and pselect6 (a timespec timeout, written
    /// back too, and a signal mask in force while it waits, given as
    /// {pointer, size}). Readiness is poll's: a descriptor is readable
    /// with POLLIN, POLLHUP or POLLERR, writable with POLLOUT or POLLERR,
    /// exceptional with POLLPRI (which nothing here has). A set
    /// descriptor that is not open is EBADF. `nfds` above the descriptor
    /// limit counts as the limit, as Linux clamps it to its table.
    fn select(
        &mut self,
        mem: &dyn PhysMem,
        a: [u64; 6],
        clock: Clock,
        pselect: bool,
    ) -> Result<i64, i64> {
        let n = a[0] as i32;
        if n < 0 {
            return Err(EINVAL);
        }
        let n = (n as usize).min(MAX_FDS);
        let timeout = if pselect {
            self.read_timeout(mem, a[4])?
        } else if a[4] == 0 {
            None
        } else {
            // A timeval: microseconds beyond a second carry over, and a
            // negative result is EINVAL (as Linux checks it).
            let mut b = [0u8; 16];
            self.space.read_user(mem, a[4], &mut b)?;
            let sec = i64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            let usec = i64::from_le_bytes(b[8..].try_into().unwrap_or_default());
            let sec = sec.saturating_add(usec / 1_000_000);
            let nsec = (usec % 1_000_000) * 1000;
            if sec < 0 || nsec < 0 {
                return Err(EINVAL);
            }
            let ns = (sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(nsec as u64);
            Some(ns.saturating_mul(1000))
        };
        let mut masked = false;
        if pselect && a[5] != 0 {
            let mut b = [0u8; 16];
            self.space.read_user(mem, a[5], &mut b)?;
            let set = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            let size = u64::from_le_bytes(b[8..].try_into().unwrap_or_default());
            masked = self.wait_mask(mem, set, size)?;
        }
        let r = self.select_sets(mem, n, [a[1], a[2], a[3]], timeout, clock);
        if r.as_ref().is_err_and(|&e| e == ERESTARTSYS) {
            return r.map(|(v, _)| v);
        }
        self.end_wait_mask(masked);
        let (v, deadline) = r?;
        if let (Some(d), Some(t)) = (deadline, timeout) {
            if t > 0 {
                // The time left; a pointer that cannot take it is no error
                // (Linux ignores it: the call succeeded).
                let left_ns = d.saturating_sub(clock.now) / 1000;
                let (sec, frac) = (left_ns / 1_000_000_000, left_ns % 1_000_000_000);
                let frac = if pselect { frac } else { frac / 1000 };
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&sec.to_le_bytes());
                b[8..].copy_from_slice(&frac.to_le_bytes());
                let _ = self.space.write_user(mem, a[4], &b);
            }
        }
        Ok(v)
    }

    /// select's sets (`sets`: read, write, except; null pointers are
    /// empty) for descriptors below `n`: the count of bits set in the
    /// result and the deadline, or a wait.
    fn select_sets(
        &mut self,
        mem: &dyn PhysMem,
        n: usize,
        sets: [u64; 3],
        timeout: Option<Tick>,
        clock: Clock,
    ) -> Result<(i64, Option<Tick>), i64> {
        // Linux reads and writes the sets in whole longs.
        let bytes = n.div_ceil(64) * 8;
        let mut want = [vec![0u8; bytes], vec![0u8; bytes], vec![0u8; bytes]];
        for (buf, &at) in want.iter_mut().zip(&sets) {
            if at != 0 {
                self.space.read_user(mem, at, buf)?;
            }
        }
        let mut got = [vec![0u8; bytes], vec![0u8; bytes], vec![0u8; bytes]];
        let in_set =
            libc::POLLIN | libc::POLLRDNORM | libc::POLLRDBAND | libc::POLLHUP | libc::POLLERR;
        let out_set = libc::POLLOUT | libc::POLLWRNORM | libc::POLLWRBAND | libc::POLLERR;
        let ex_set = libc::POLLPRI;
        let mut ready = 0i64;
        for fd in 0..n {
            let (byte, bit) = (fd / 8, 1u8 << (fd % 8));
            if want.iter().all(|w| w[byte] & bit == 0) {
                continue;
            }
            let state = poll_state(&self.files.get(fd as u64)?.obj);
            for (i, mask) in [in_set, out_set, ex_set].into_iter().enumerate() {
                if want[i][byte] & bit != 0 && state & mask != 0 {
                    got[i][byte] |= bit;
                    ready += 1;
                }
            }
        }
        let deadline = self.poll_wait(ready > 0, timeout, clock, n as u32)?;
        // Ready, or the timeout passed (the sets come back empty).
        for (buf, &at) in got.iter().zip(&sets) {
            if at != 0 {
                self.space.write_user(mem, at, buf)?;
            }
        }
        Ok((ready, deadline))
    }

    /// eventfd / eventfd2: a counter file starting at `init` (an unsigned
    /// int), with EFD_SEMAPHORE, EFD_NONBLOCK and EFD_CLOEXEC.
    fn eventfd2(&mut self, init: u64, flags: u64) -> Result<i64, i64> {
        use crate::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE};
        if flags & !(EFD_SEMAPHORE | EFD_NONBLOCK | EFD_CLOEXEC) != 0 {
            return Err(EINVAL);
        }
        self.next_pipe += 1;
        let e = EventFd::new(
            self.next_pipe,
            u64::from(init as u32),
            flags & EFD_SEMAPHORE != 0,
            flags & EFD_NONBLOCK != 0,
            self.pipe_events.clone(),
        );
        let file = Arc::new(OpenFile {
            obj: Object::EventFd(e),
            path: PathBuf::from("anon_inode:[eventfd]"),
        });
        self.files.install(file, flags & EFD_CLOEXEC != 0, 0)
    }

    /// read of an eventfd: 8 bytes (EINVAL for fewer), the counter (or 1
    /// in semaphore mode); while it is 0, a wait (EAGAIN if non-blocking).
    fn eventfd_read(
        &mut self,
        mem: &dyn PhysMem,
        fd: u64,
        e: &crate::eventfd::EventFd,
        buf: u64,
        count: u64,
    ) -> Result<i64, i64> {
        use crate::pipe::Ready;
        if count < 8 {
            return Err(EINVAL);
        }
        // A bad buffer is EFAULT before anything is taken.
        self.space.check_user(mem, buf, 8, PROT_WRITE)?;
        match e.read() {
            Ready::Now(v) => {
                self.space.write_user(mem, buf, &v.to_le_bytes())?;
                Ok(8)
            }
            Ready::Wait if e.nonblock() => Err(EAGAIN),
            Ready::Wait => self.block(e.key(false), fd),
        }
    }

    /// write to an eventfd: 8 bytes (EINVAL for fewer, or for the value
    /// u64::MAX) added to the counter; a wait (EAGAIN if non-blocking)
    /// while that would take it past 0xfffffffffffffffe.
    fn eventfd_write(
        &mut self,
        mem: &dyn PhysMem,
        fd: u64,
        e: &crate::eventfd::EventFd,
        buf: u64,
        count: u64,
    ) -> Result<i64, i64> {
        use crate::pipe::Ready;
        if count < 8 {
            return Err(EINVAL);
        }
        let mut b = [0u8; 8];
        self.space.read_user(mem, buf, &mut b)?;
        let v = u64::from_le_bytes(b);
        if v == u64::MAX {
            return Err(EINVAL);
        }
        match e.write(v) {
            Ready::Now(()) => Ok(8),
            Ready::Wait if e.nonblock() => Err(EAGAIN),
            Ready::Wait => self.block(e.key(true), fd),
        }
    }

    /// epoll_create1 (and epoll_create): a new epoll instance.
    fn epoll_create1(&mut self, flags: u64) -> Result<i64, i64> {
        let cloexec = libc::O_CLOEXEC as u64;
        if flags & !cloexec != 0 {
            return Err(EINVAL);
        }
        let file = Arc::new(OpenFile {
            obj: Object::Epoll(crate::epoll::Epoll::new(self.epoll_watches.clone())),
            path: PathBuf::from("anon_inode:[eventpoll]"),
        });
        self.files.install(file, flags & cloexec != 0, 0)
    }

    /// epoll_ctl: ADD, MOD, DEL of `fd` in the set of `epfd` (see
    /// [`crate::epoll`]; the checks in Linux's order).
    fn epoll_ctl(
        &mut self,
        mem: &dyn PhysMem,
        epfd: u64,
        op: u64,
        fd: u64,
        event: u64,
    ) -> Result<i64, i64> {
        let ev = if op == crate::epoll::EPOLL_CTL_DEL {
            None
        } else {
            // struct epoll_event is packed on x86-64: 4 + 8 bytes.
            let mut b = [0u8; 12];
            self.space.read_user(mem, event, &mut b)?;
            Some((
                u32::from_le_bytes(b[..4].try_into().unwrap_or_default()),
                u64::from_le_bytes(b[4..].try_into().unwrap_or_default()),
            ))
        };
        let ef = self.files.get(epfd)?;
        let tf = self.files.get(fd)?;
        match &tf.obj {
            // Host files are regular files and directories here: Linux
            // cannot poll those.
            Object::Host(_) => return Err(EPERM),
            // Nesting is not supported (said in the docs).
            Object::Epoll(_) => return Err(EINVAL),
            _ => {}
        }
        let Object::Epoll(ep) = &ef.obj else {
            return Err(EINVAL);
        };
        ep.ctl(op, fd as i32, &tf, ev)?;
        Ok(0)
    }

    /// epoll_wait, epoll_pwait (a signal mask in force while it waits)
    /// and epoll_pwait2 (a timespec timeout): the ready items, at most
    /// `maxevents`, or a wait until one is ready or the timeout passes.
    fn epoll_wait(
        &mut self,
        mem: &dyn PhysMem,
        nr: u64,
        a: [u64; 6],
        clock: Clock,
    ) -> Result<i64, i64> {
        let (epfd, events, max) = (a[0], a[1], a[2] as i32);
        if max <= 0 || max > i32::MAX / 12 {
            return Err(EINVAL);
        }
        // As Linux's access_ok: the array must lie in user space.
        let len = 12 * max as u64;
        if events
            .checked_add(len)
            .is_none_or(|end| end > crate::USER_TOP)
        {
            return Err(crate::mm::EFAULT);
        }
        let f = self.files.get(epfd)?;
        let Object::Epoll(ep) = &f.obj else {
            return Err(EINVAL);
        };
        let timeout = match nr {
            nr::EPOLL_PWAIT2 => self.read_timeout(mem, a[3])?,
            // Milliseconds; negative: none.
            _ => {
                let ms = a[3] as i32;
                (ms >= 0).then(|| u64::from(ms as u32) * 1_000_000_000)
            }
        };
        let masked = if nr == nr::EPOLL_WAIT {
            false
        } else {
            self.wait_mask(mem, a[4], a[5])?
        };
        let ready = ep.ready((max as usize).min(crate::epoll::MAX_WATCHES));
        let mut b = Vec::with_capacity(12 * ready.len());
        for e in &ready {
            b.extend_from_slice(&e.events.to_le_bytes());
            b.extend_from_slice(&e.data.to_le_bytes());
        }
        let r = self
            .space
            .write_user(mem, events, &b)
            .and_then(|()| {
                ep.commit(&ready);
                self.poll_wait(!ready.is_empty(), timeout, clock, epfd as u32)
            })
            .map(|_| ready.len() as i64);
        if r != Err(ERESTARTSYS) {
            self.end_wait_mask(masked);
        }
        r
    }

    /// pipe / pipe2: two descriptors, the read end first.
    fn pipe2(&mut self, mem: &dyn PhysMem, fds: u64, flags: u64) -> Result<i64, i64> {
        let (cloexec, nonblock) = (libc::O_CLOEXEC as u64, libc::O_NONBLOCK as u64);
        if flags & !(cloexec | nonblock) != 0 {
            return Err(EINVAL);
        }
        self.space.check_user(mem, fds, 8, PROT_WRITE)?;
        self.next_pipe += 1;
        let id = self.next_pipe;
        let (r, w) = crate::pipe::Pipe::open(id, self.pipe_events.clone(), flags & nonblock != 0);
        let c = flags & cloexec != 0;
        let mk = |obj, side: &str| {
            Arc::new(OpenFile {
                obj,
                path: PathBuf::from(format!("pipe:[{id}] ({side} end)")),
            })
        };
        let rfd = self.files.install(mk(Object::Pipe(r), "read"), c, 0)?;
        let wfd = match self.files.install(mk(Object::Pipe(w), "write"), c, 0) {
            Ok(w) => w,
            Err(e) => {
                let _ = self.files.close(rfd as u64);
                return Err(e);
            }
        };
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&(rfd as i32).to_le_bytes());
        b[4..].copy_from_slice(&(wfd as i32).to_le_bytes());
        if let Err(e) = self.space.write_user(mem, fds, &b) {
            let _ = self.files.close(rfd as u64);
            let _ = self.files.close(wfd as u64);
            return Err(e);
        }
        Ok(0)
    }

    /// ioctl: FIONREAD on a pipe; anything else is ENOTTY (no terminals).
    fn ioctl(&mut self, mem: &dyn PhysMem, fd: u64, req: u64, arg: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        match (&f.obj, req) {
            (Object::Pipe(end), 0x541b) => {
                let n = end.available() as i32;
                self.space.write_user(mem, arg, &n.to_le_bytes())?;
                Ok(0)
            }
            _ => Err(ENOTTY),
        }
    }

    /// The host path for `path` relative to `dirfd`, with /proc/self/exe
    /// meaning the program.
    fn resolve(&mut self, mem: &dyn PhysMem, dirfd: u64, path: u64) -> Result<PathBuf, i64> {
        let p = self.space.read_cstr(mem, path, PATH_MAX)?;
        let p = PathBuf::from(std::ffi::OsStr::from_bytes(&p));
        if p.as_os_str().is_empty() {
            return Err(ENOENT);
        }
        // Descriptors are C ints: the upper half of the register is not looked at.
        if p.is_absolute() {
            return Ok(self.redirect(p));
        }
        if dirfd as i32 as i64 == AT_FDCWD {
            return Ok(self.cwd.join(p));
        }
        let d = self.files.get(dirfd)?;
        match &d.obj {
            Object::Host(f) if f.metadata().is_ok_and(|m| m.is_dir()) => Ok(d.path.join(p)),
            Object::Host(_) => Err(ENOTDIR),
            _ => Err(ENOTDIR),
        }
    }

    /// The host path of the program's absolute path `p`: /proc/self and
    /// /proc/PID describe kvmsim on the host, so the program's own are
    /// answered here (exe) or refused; everything else goes through the
    /// redirects and the sysroot ([`crate::process::PathMap`]).
    fn redirect(&self, p: PathBuf) -> PathBuf {
        let s = p.to_string_lossy();
        let own = ["/proc/self/", &format!("/proc/{PID}/")]
            .iter()
            .any(|pre| s.starts_with(pre));
        if own {
            if s.ends_with("/exe") {
                return self.exe.clone();
            }
            return PathBuf::from("/nonexistent/kvmsim-se/proc-self-is-not-emulated");
        }
        self.paths.host(&p)
    }

    fn openat(
        &mut self,
        mem: &dyn PhysMem,
        dirfd: u64,
        path: u64,
        flags: u64,
        mode: u64,
    ) -> Result<i64, i64> {
        let raw = self.space.read_cstr(mem, path, PATH_MAX)?;
        if let Some(data) = synthetic_file(&raw, self.cpus) {
            if flags & libc::O_ACCMODE as u64 != libc::O_RDONLY as u64 {
                return Err(EACCES);
            }
            if flags & libc::O_DIRECTORY as u64 != 0 {
                return Err(ENOTDIR);
            }
            return self.files.install(
                Arc::new(OpenFile {
                    obj: Object::Synthetic {
                        data,
                        pos: Mutex::new(0),
                    },
                    path: PathBuf::from(std::ffi::OsStr::from_bytes(&raw)),
                }),
                flags & libc::O_CLOEXEC as u64 != 0,
                0,
            );
        }
        let p = self.resolve(mem, dirfd, path)?;
        let cpath = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| EINVAL)?;
        let cloexec = flags & libc::O_CLOEXEC as u64 != 0;
        let flags = (flags as i32 & !libc::O_CLOEXEC) | libc::O_CLOEXEC;
        // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
        let fd = unsafe { libc::open(cpath.as_ptr(), flags, (mode & 0o7777) as libc::c_uint) };
        if fd < 0 {
            return Err(last_err());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        self.files.install(
            Arc::new(OpenFile {
                obj: Object::Host(file),
                path: p,
            }),
            cloexec,
            0,
        )
    }

    fn dup3(&mut self, old: u64, new: u64, flags: u64) -> Result<i64, i64> {
        let f = self.files.get(old)?;
        if new as usize >= MAX_FDS {
            return Err(EBADF);
        }
        if old == new {
            return if flags == u64::MAX {
                Ok(new as i64)
            } else {
                Err(EINVAL)
            };
        }
        let cloexec = flags != u64::MAX && flags & libc::O_CLOEXEC as u64 != 0;
        let _ = self.files.close(new);
        self.files.install(f, cloexec, new as usize)
    }

    fn fcntl(&mut self, fd: u64, cmd: u64, arg: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        match cmd as i32 {
            libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => self.files.install(
                f,
                cmd as i32 == libc::F_DUPFD_CLOEXEC,
                (arg as usize).min(MAX_FDS),
            ),
            libc::F_GETFD => Ok(i64::from(
                self.files.fds[fd as usize]
                    .as_ref()
                    .is_some_and(|f| f.cloexec),
            )),
            libc::F_SETFD => {
                if let Some(Some(e)) = self.files.fds.get_mut(fd as usize) {
                    e.cloexec = arg & 1 != 0;
                }
                Ok(0)
            }
            libc::F_GETFL => match &f.obj {
                Object::Host(h) => {
                    // SAFETY: F_GETFL on a descriptor we own.
                    let r = unsafe { libc::fcntl(h.as_raw_fd(), libc::F_GETFL) };
                    if r < 0 {
                        Err(last_err())
                    } else {
                        Ok(i64::from(r))
                    }
                }
                Object::Stdin { .. } | Object::Synthetic { .. } => Ok(i64::from(libc::O_RDONLY)),
                Object::Out(_) => Ok(i64::from(libc::O_WRONLY)),
                Object::EventFd(e) => Ok(i64::from(
                    libc::O_RDWR | if e.nonblock() { libc::O_NONBLOCK } else { 0 },
                )),
                Object::Epoll(_) => Ok(i64::from(libc::O_RDWR)),
                Object::Pipe(end) => Ok(i64::from(
                    if end.is_writer() {
                        libc::O_WRONLY
                    } else {
                        libc::O_RDONLY
                    } | if end.nonblock() { libc::O_NONBLOCK } else { 0 },
                )),
            },
            libc::F_SETFL => match &f.obj {
                Object::Host(h) => {
                    let keep = (arg as i32) & (libc::O_APPEND | libc::O_NONBLOCK);
                    // SAFETY: F_SETFL on a descriptor we own.
                    let r = unsafe { libc::fcntl(h.as_raw_fd(), libc::F_SETFL, keep) };
                    if r < 0 {
                        Err(last_err())
                    } else {
                        Ok(0)
                    }
                }
                Object::Pipe(end) => {
                    end.set_nonblock(arg as i32 & libc::O_NONBLOCK != 0);
                    Ok(0)
                }
                Object::EventFd(e) => {
                    e.set_nonblock(arg as i32 & libc::O_NONBLOCK != 0);
                    Ok(0)
                }
                _ => Ok(0),
            },
            _ => Err(EINVAL),
        }
    }

    fn path_op(
        &mut self,
        mem: &dyn PhysMem,
        op: PathOp,
        dirfd: u64,
        path: u64,
        mode: u64,
    ) -> Result<i64, i64> {
        let p = cpath(&self.resolve(mem, dirfd, path)?)?;
        // SAFETY: a NUL-terminated path.
        check(unsafe {
            match op {
                PathOp::Unlink => libc::unlink(p.as_ptr()),
                PathOp::Rmdir => libc::rmdir(p.as_ptr()),
                PathOp::Mkdir => libc::mkdir(p.as_ptr(), (mode & 0o7777) as libc::mode_t),
            }
        })
    }

    fn rename(
        &mut self,
        mem: &dyn PhysMem,
        olddir: u64,
        old: u64,
        newdir: u64,
        new: u64,
        flags: u64,
    ) -> Result<i64, i64> {
        let from = cpath(&self.resolve(mem, olddir, old)?)?;
        let to = cpath(&self.resolve(mem, newdir, new)?)?;
        // SAFETY: two NUL-terminated paths; renameat2 reads nothing else.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                flags as libc::c_uint,
            )
        };
        if r < 0 {
            Err(last_err())
        } else {
            Ok(0)
        }
    }

    /// link / linkat: a hard link on the host (AT_SYMLINK_FOLLOW as
    /// Linux's; AT_EMPTY_PATH, which needs a capability there, is EINVAL
    /// here).
    fn link(
        &mut self,
        mem: &dyn PhysMem,
        olddir: u64,
        old: u64,
        newdir: u64,
        new: u64,
        flags: u64,
    ) -> Result<i64, i64> {
        const AT_SYMLINK_FOLLOW: u64 = 0x400;
        if flags & !AT_SYMLINK_FOLLOW != 0 {
            return Err(EINVAL);
        }
        let from = cpath(&self.resolve(mem, olddir, old)?)?;
        let to = cpath(&self.resolve(mem, newdir, new)?)?;
        // SAFETY: two NUL-terminated paths.
        check(unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                flags as libc::c_int,
            )
        })
    }

    /// symlink / symlinkat: the link holds `target` as the program wrote
    /// it (not redirected: a link's text is data); the link's own path is
    /// resolved as every path is.
    fn symlink(
        &mut self,
        mem: &dyn PhysMem,
        target: u64,
        newdir: u64,
        link: u64,
    ) -> Result<i64, i64> {
        let t = self.space.read_cstr(mem, target, PATH_MAX)?;
        if t.is_empty() {
            return Err(ENOENT);
        }
        let t = std::ffi::CString::new(t).map_err(|_| EINVAL)?;
        let to = cpath(&self.resolve(mem, newdir, link)?)?;
        // SAFETY: two NUL-terminated strings.
        check(unsafe { libc::symlink(t.as_ptr(), to.as_ptr()) })
    }

    /// chmod / fchmodat / fchmodat2 (flags: AT_SYMLINK_NOFOLLOW, which the
    /// host may refuse for a link, as Linux does).
    fn chmod(
        &mut self,
        mem: &dyn PhysMem,
        dirfd: u64,
        path: u64,
        mode: u64,
        flags: u64,
    ) -> Result<i64, i64> {
        if flags & !AT_SYMLINK_NOFOLLOW != 0 {
            return Err(EINVAL);
        }
        let p = cpath(&self.resolve(mem, dirfd, path)?)?;
        // SAFETY: a NUL-terminated path.
        check(unsafe {
            libc::fchmodat(
                libc::AT_FDCWD,
                p.as_ptr(),
                (mode & 0o7777) as libc::mode_t,
                flags as libc::c_int,
            )
        })
    }

    /// fchmod: a host file's mode; pipes, eventfds and epoll instances
    /// have no file to keep it in (EINVAL).
    fn fchmod(&mut self, fd: u64, mode: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        let Object::Host(h) = &f.obj else {
            return Err(EINVAL);
        };
        // SAFETY: fchmod on a descriptor we own.
        check(unsafe { libc::fchmod(h.as_raw_fd(), (mode & 0o7777) as libc::mode_t) })
    }

    /// utimensat: a file's access and modification times. UTIME_NOW is
    /// the simulated wall clock (what clock_gettime(CLOCK_REALTIME) gives
    /// the program), so a file the program touches and then stats agrees
    /// with its own clock; UTIME_OMIT leaves a time alone. A null path
    /// means the file open at `dirfd` (futimens).
    fn utimensat(&mut self, mem: &dyn PhysMem, a: [u64; 6], clock: Clock) -> Result<i64, i64> {
        const UTIME_NOW: i64 = (1 << 30) - 1;
        const UTIME_OMIT: i64 = (1 << 30) - 2;
        let (dirfd, path, times, flags) = (a[0], a[1], a[2], a[3]);
        if flags & !(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH) != 0 {
            return Err(EINVAL);
        }
        let now_ns = clock.realtime_base_ns + clock.now / 1000;
        let now = libc::timespec {
            tv_sec: (now_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (now_ns % 1_000_000_000) as libc::c_long,
        };
        let mut ts = [now, now];
        if times != 0 {
            let mut b = [0u8; 32];
            self.space.read_user(mem, times, &mut b)?;
            for (i, t) in ts.iter_mut().enumerate() {
                let sec = i64::from_le_bytes(b[16 * i..16 * i + 8].try_into().unwrap_or_default());
                let nsec =
                    i64::from_le_bytes(b[16 * i + 8..16 * i + 16].try_into().unwrap_or_default());
                match nsec {
                    UTIME_NOW => {}
                    UTIME_OMIT => t.tv_nsec = UTIME_OMIT as libc::c_long,
                    0..=999_999_999 => {
                        *t = libc::timespec {
                            tv_sec: sec as libc::time_t,
                            tv_nsec: nsec as libc::c_long,
                        }
                    }
                    _ => return Err(EINVAL),
                }
            }
        }
        let empty = path != 0
            && flags & AT_EMPTY_PATH != 0
            && self.space.read_cstr(mem, path, PATH_MAX)?.is_empty();
        if path == 0 || empty {
            let f = self.files.get(dirfd)?;
            let Object::Host(h) = &f.obj else {
                return Err(EINVAL);
            };
            // SAFETY: futimens on a descriptor we own, with two timespecs.
            return check(unsafe { libc::futimens(h.as_raw_fd(), ts.as_ptr()) });
        }
        let p = cpath(&self.resolve(mem, dirfd, path)?)?;
        // SAFETY: a NUL-terminated path and two timespecs.
        check(unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                p.as_ptr(),
                ts.as_ptr(),
                (flags & AT_SYMLINK_NOFOLLOW) as libc::c_int,
            )
        })
    }

    fn ftruncate(&mut self, fd: u64, len: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        let Object::Host(h) = &f.obj else {
            return Err(EINVAL);
        };
        if len > i64::MAX as u64 {
            return Err(EINVAL);
        }
        // SAFETY: ftruncate on a descriptor we own.
        check(unsafe { libc::ftruncate(h.as_raw_fd(), len as libc::off_t) })
    }

    fn fsync(&mut self, fd: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        match &f.obj {
            Object::Host(h) => h.sync_all().map(|_| 0).map_err(host_err),
            _ => Err(EINVAL),
        }
    }

    /// statx: the host's, for a host path or descriptor; the standard
    /// streams are pipes (as fstat says).
    fn statx(
        &mut self,
        mem: &dyn PhysMem,
        dirfd: u64,
        path: u64,
        flags: u64,
        mask: u64,
        buf: u64,
    ) -> Result<i64, i64> {
        let mut out = [0u8; 256];
        let raw = self.space.read_cstr(mem, path, PATH_MAX)?;
        let flags = (flags as u32) & !(AT_EMPTY_PATH as u32);
        let r = if raw.is_empty() {
            let f = self.files.get(dirfd)?;
            match &f.obj {
                Object::Host(h) => {
                    // SAFETY: an empty NUL-terminated path, a descriptor we
                    // own and a 256-byte buffer (struct statx's size).
                    unsafe {
                        libc::syscall(
                            libc::SYS_statx,
                            h.as_raw_fd(),
                            c"".as_ptr(),
                            flags | AT_EMPTY_PATH as u32,
                            mask as u32,
                            out.as_mut_ptr(),
                        )
                    }
                }
                _ => {
                    // STATX_BASIC_STATS of a pipe.
                    out[0..4].copy_from_slice(&0x7ffu32.to_le_bytes());
                    out[4..8].copy_from_slice(&4096u32.to_le_bytes());
                    out[16..20].copy_from_slice(&1u32.to_le_bytes());
                    out[20..24].copy_from_slice(&UID.to_le_bytes());
                    out[24..28].copy_from_slice(&GID.to_le_bytes());
                    out[28..30].copy_from_slice(&((libc::S_IFIFO | 0o600) as u16).to_le_bytes());
                    0
                }
            }
        } else {
            let p = cpath(&self.resolve(mem, dirfd, path)?)?;
            // SAFETY: a NUL-terminated path and a 256-byte buffer.
            unsafe {
                libc::syscall(
                    libc::SYS_statx,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    flags,
                    mask as u32,
                    out.as_mut_ptr(),
                )
            }
        };
        if r < 0 {
            return Err(last_err());
        }
        self.space.write_user(mem, buf, &out)?;
        Ok(0)
    }

    /// statfs (a path) or fstatfs (a descriptor): the host file system's.
    fn statfs(
        &mut self,
        mem: &dyn PhysMem,
        path: Option<u64>,
        fd: u64,
        buf: u64,
    ) -> Result<i64, i64> {
        // SAFETY: all-zero is a valid `libc::statfs`.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        let r = match path {
            Some(path) => {
                let p = cpath(&self.resolve(mem, AT_FDCWD as u64, path)?)?;
                // SAFETY: a NUL-terminated path and a `statfs` to fill.
                unsafe { libc::statfs(p.as_ptr(), &mut st) }
            }
            None => {
                let f = self.files.get(fd)?;
                match &f.obj {
                    // SAFETY: fstatfs on a descriptor we own.
                    Object::Host(h) => unsafe { libc::fstatfs(h.as_raw_fd(), &mut st) },
                    _ => {
                        st.f_type = 0x5049_5045; // PIPEFS_MAGIC
                        st.f_bsize = 4096;
                        st.f_namelen = 255;
                        0
                    }
                }
            }
        };
        check(r)?;
        // SAFETY: `libc::statfs` is plain data in the x86-64 layout the
        // program expects.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&st as *const libc::statfs).cast::<u8>(),
                std::mem::size_of::<libc::statfs>(),
            )
        };
        self.space.write_user(mem, buf, bytes)?;
        Ok(0)
    }

    /// sysinfo: the process's RAM (guest RAM) and simulated uptime.
    fn sysinfo(&mut self, mem: &dyn PhysMem, buf: u64, clock: Clock) -> Result<i64, i64> {
        // SAFETY: all-zero is a valid `libc::sysinfo`.
        let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
        si.uptime = (clock.now / 1_000_000_000_000) as libc::c_long;
        let total = self.space.frames.total();
        si.totalram = total * PAGE;
        si.freeram = total.saturating_sub(self.space.frames.used()) * PAGE;
        si.procs = 1;
        si.mem_unit = 1;
        // SAFETY: `libc::sysinfo` is plain data in the program's layout.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&si as *const libc::sysinfo).cast::<u8>(),
                std::mem::size_of::<libc::sysinfo>(),
            )
        };
        self.space.write_user(mem, buf, bytes)?;
        Ok(0)
    }

    fn put_stat(&mut self, mem: &dyn PhysMem, buf: u64, st: &libc::stat) -> Result<i64, i64> {
        // SAFETY: `libc::stat` is plain data of this size (the host's
        // x86-64 layout, which is the program's).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (st as *const libc::stat).cast::<u8>(),
                std::mem::size_of::<libc::stat>(),
            )
        };
        self.space.write_user(mem, buf, bytes)?;
        Ok(0)
    }

    fn fstat(&mut self, mem: &dyn PhysMem, fd: u64, buf: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        // SAFETY: all-zero is a valid `libc::stat`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        match &f.obj {
            Object::Host(h) => {
                // SAFETY: fstat writes a `stat` into `st`.
                if unsafe { libc::fstat(h.as_raw_fd(), &mut st) } < 0 {
                    return Err(last_err());
                }
            }
            Object::Synthetic { .. } => {
                // As sysfs gives it: a read-only file of one page.
                st.st_mode = libc::S_IFREG | 0o444;
                st.st_size = 4096;
                st.st_blksize = 4096;
                st.st_nlink = 1;
            }
            // Anonymous inodes, as Linux gives them: no file type.
            Object::EventFd(_) | Object::Epoll(_) => {
                st.st_mode = 0o600;
                st.st_blksize = 4096;
                st.st_uid = UID;
                st.st_gid = GID;
                st.st_nlink = 1;
            }
            // The standard streams are pipes to the program (not
            // terminals), and pipes are pipes.
            _ => {
                st.st_mode = libc::S_IFIFO | 0o600;
                st.st_blksize = 4096;
                st.st_uid = UID;
                st.st_gid = GID;
                st.st_nlink = 1;
            }
        }
        self.put_stat(mem, buf, &st)
    }

    fn fstatat(
        &mut self,
        mem: &dyn PhysMem,
        dirfd: u64,
        path: u64,
        buf: u64,
        flags: u64,
    ) -> Result<i64, i64> {
        if flags & AT_EMPTY_PATH != 0 {
            let p = self.space.read_cstr(mem, path, PATH_MAX)?;
            if p.is_empty() {
                return self.fstat(mem, dirfd, buf);
            }
        }
        let p = self.resolve(mem, dirfd, path)?;
        let cpath = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| EINVAL)?;
        // SAFETY: all-zero is a valid `libc::stat`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a `stat` to fill.
        let r = unsafe {
            if flags & AT_SYMLINK_NOFOLLOW != 0 {
                libc::lstat(cpath.as_ptr(), &mut st)
            } else {
                libc::stat(cpath.as_ptr(), &mut st)
            }
        };
        if r < 0 {
            return Err(last_err());
        }
        self.put_stat(mem, buf, &st)
    }

    fn lseek(&mut self, fd: u64, off: i64, whence: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        match &f.obj {
            Object::Host(h) => {
                // SAFETY: lseek on a descriptor we own.
                let r = unsafe { libc::lseek(h.as_raw_fd(), off, whence as i32) };
                if r < 0 {
                    Err(last_err())
                } else {
                    Ok(r)
                }
            }
            Object::Synthetic { data, pos } => {
                let mut p = mem::lock(pos);
                let base = match whence {
                    0 => 0,
                    1 => *p as i64,
                    2 => data.len() as i64,
                    _ => return Err(EINVAL),
                };
                let to = base.checked_add(off).filter(|&t| t >= 0).ok_or(EINVAL)?;
                *p = usize::try_from(to).map_err(|_| EINVAL)?;
                Ok(to)
            }
            // Linux's noop_llseek: the position, which stays 0.
            Object::EventFd(_) | Object::Epoll(_) => Ok(0),
            _ => Err(ESPIPE),
        }
    }

    fn getdents64(&mut self, mem: &dyn PhysMem, fd: u64, buf: u64, count: u64) -> Result<i64, i64> {
        let f = self.files.get(fd)?;
        let Object::Host(h) = &f.obj else {
            return Err(ENOTDIR);
        };
        let n = (count as usize).min(64 << 10);
        self.space.check_user(mem, buf, n as u64, PROT_WRITE)?;
        let mut tmp = vec![0u8; n];
        // SAFETY: the host's getdents64 fills at most `n` bytes of `tmp`
        // with records in the layout the program expects (same ABI).
        let r = unsafe { libc::syscall(libc::SYS_getdents64, h.as_raw_fd(), tmp.as_mut_ptr(), n) };
        if r < 0 {
            return Err(last_err());
        }
        self.space.write_user(mem, buf, &tmp[..r as usize])?;
        Ok(r)
    }

    fn readlinkat(
        &mut self,
        mem: &dyn PhysMem,
        dirfd: u64,
        path: u64,
        buf: u64,
        size: u64,
    ) -> Result<i64, i64> {
        let raw = self.space.read_cstr(mem, path, PATH_MAX)?;
        let target = if raw == b"/proc/self/exe" || raw == format!("/proc/{PID}/exe").as_bytes() {
            self.exe.as_os_str().as_bytes().to_vec()
        } else {
            let p = self.resolve(mem, dirfd, path)?;
            std::fs::read_link(&p)
                .map_err(host_err)?
                .as_os_str()
                .as_bytes()
                .to_vec()
        };
        if size == 0 || size > i32::MAX as u64 {
            return Err(EINVAL);
        }
        let n = target.len().min(size as usize);
        self.space.write_user(mem, buf, &target[..n])?;
        Ok(n as i64)
    }

    /// chdir / fchdir: the process's own working folder (kvmsim's stays).
    fn chdir(&mut self, mem: &dyn PhysMem, path: Option<u64>, fd: u64) -> Result<i64, i64> {
        let p = match path {
            Some(path) => self.resolve(mem, AT_FDCWD as u64, path)?,
            None => {
                let f = self.files.get(fd)?;
                match &f.obj {
                    Object::Host(_) => f.path.clone(),
                    _ => return Err(ENOTDIR),
                }
            }
        };
        let meta = std::fs::metadata(&p).map_err(host_err)?;
        if !meta.is_dir() {
            return Err(ENOTDIR);
        }
        self.cwd = std::fs::canonicalize(&p).map_err(host_err)?;
        Ok(0)
    }

    fn getcwd(&mut self, mem: &dyn PhysMem, buf: u64, size: u64) -> Result<i64, i64> {
        let mut b = self.cwd.as_os_str().as_bytes().to_vec();
        b.push(0);
        if (b.len() as u64) > size {
            return Err(ERANGE);
        }
        self.space.write_user(mem, buf, &b)?;
        Ok(b.len() as i64)
    }

    fn faccessat(
        &mut self,
        mem: &dyn PhysMem,
        dirfd: u64,
        path: u64,
        mode: u64,
    ) -> Result<i64, i64> {
        let p = self.resolve(mem, dirfd, path)?;
        let cpath = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| EINVAL)?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::access(cpath.as_ptr(), (mode & 7) as i32) } < 0 {
            return Err(last_err());
        }
        Ok(0)
    }

    /// brk: grows or shrinks the heap after the program's segments; returns
    /// the new break, or the old one if the request cannot be met.
    pub fn set_brk(&mut self, mem: &dyn PhysMem, want: u64) -> u64 {
        if want < self.brk_start || want > self.brk_start + (1 << 40) {
            return self.brk;
        }
        let old_end = (self.brk + PAGE - 1) & !(PAGE - 1);
        let new_end = (want + PAGE - 1) & !(PAGE - 1);
        if new_end > old_end {
            if !self.space.is_free(old_end, new_end) {
                return self.brk;
            }
            // One heap mapping, grown in place (sbrk in small steps makes
            // no new mapping each time).
            if old_end > self.brk_start && self.space.extend(old_end, new_end) {
                self.brk = want;
                return want;
            }
            let v = Vma {
                end: new_end,
                prot: PROT_READ | PROT_WRITE,
                backing: Backing::Anon,
                kernel: false,
                name: "[heap]",
            };
            if self.space.map(mem, old_end, v).is_err() {
                return self.brk;
            }
        } else if new_end < old_end && self.space.unmap(mem, new_end, old_end).is_err() {
            return self.brk;
        }
        self.brk = want;
        want
    }

    #[allow(clippy::too_many_arguments)]
    fn mmap(
        &mut self,
        mem: &dyn PhysMem,
        addr: u64,
        len: u64,
        prot: u64,
        flags: u64,
        fd: u64,
        off: u64,
    ) -> Result<i64, i64> {
        const MAP_SHARED: u64 = 1;
        const MAP_PRIVATE: u64 = 2;
        const MAP_FIXED: u64 = 0x10;
        const MAP_ANONYMOUS: u64 = 0x20;
        const MAP_POPULATE: u64 = 0x8000;
        const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
        if len == 0 || !off.is_multiple_of(PAGE) || prot & !7 != 0 {
            return Err(EINVAL);
        }
        let len = len.checked_add(PAGE - 1).ok_or(ENOMEM)? & !(PAGE - 1);
        if len > crate::USER_TOP {
            return Err(ENOMEM);
        }
        let backing = if flags & MAP_ANONYMOUS != 0 {
            Backing::Anon
        } else {
            let f = self.files.get(fd)?;
            let Object::Host(h) = &f.obj else {
                return Err(libc::ENODEV as i64);
            };
            if flags & 3 == MAP_SHARED && prot & PROT_WRITE as u64 != 0 {
                // Writes through a shared mapping would have to reach the file.
                return Err(libc::ENODEV as i64);
            }
            Backing::File {
                file: Arc::new(h.try_clone().map_err(host_err)?),
                offset: off,
            }
        };
        if flags & 3 != MAP_PRIVATE && flags & 3 != MAP_SHARED {
            return Err(EINVAL);
        }
        let fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0;
        let start = if fixed {
            if !addr.is_multiple_of(PAGE)
                || addr < MMAP_MIN
                || addr.checked_add(len).is_none_or(|e| e > crate::USER_TOP)
            {
                return Err(if !addr.is_multiple_of(PAGE) {
                    EINVAL
                } else {
                    EPERM
                });
            }
            if !self.space.is_free(addr, addr + len) {
                if flags & MAP_FIXED_NOREPLACE != 0 {
                    return Err(libc::EEXIST as i64);
                }
                self.space.unmap(mem, addr, addr + len)?;
            }
            addr
        } else {
            let hint = (addr & !(PAGE - 1)).max(MMAP_MIN);
            if addr != 0
                && hint.checked_add(len).is_some_and(|e| e <= crate::USER_TOP)
                && self.space.is_free(hint, hint + len)
            {
                hint
            } else {
                // Below the lowest mmap so far first (Linux's old
                // free-area cache: no walk over every mapping), then anywhere.
                let floor = self.brk_start.max(MMAP_MIN);
                self.space
                    .find_free(len, floor, self.mmap_low)
                    .or_else(|| self.space.find_free(len, floor, crate::MMAP_TOP))
                    .ok_or(ENOMEM)?
            }
        };
        let v = Vma {
            end: start + len,
            prot: prot as u32,
            backing,
            kernel: false,
            name: "[mmap]",
        };
        self.space.map(mem, start, v)?;
        if !fixed && start < self.mmap_low {
            self.mmap_low = start;
        }
        if flags & MAP_POPULATE != 0 && prot != 0 {
            for va in (start..start + len).step_by(PAGE as usize) {
                if let Err(e) = self.space.populate(mem, va) {
                    // Nothing of a failed mmap stays behind.
                    let _ = self.space.unmap(mem, start, start + len);
                    return Err(e);
                }
            }
        }
        Ok(start as i64)
    }

    fn user_range(addr: u64, len: u64) -> Result<(u64, u64), i64> {
        if !addr.is_multiple_of(PAGE) {
            return Err(EINVAL);
        }
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_add(PAGE - 1))
            .ok_or(EINVAL)?
            & !(PAGE - 1);
        if end > crate::USER_TOP {
            return Err(EINVAL);
        }
        Ok((addr, end))
    }

    fn munmap(&mut self, mem: &dyn PhysMem, addr: u64, len: u64) -> Result<i64, i64> {
        if len == 0 {
            return Err(EINVAL);
        }
        let (s, e) = Self::user_range(addr, len)?;
        self.space.unmap(mem, s, e).map(|_| 0)
    }

    /// mincore: one byte per page of [addr, addr + len), 1 where the page
    /// is present in the process's memory (touched), 0 where it is mapped
    /// but not yet touched; ENOMEM if a page of the range is not mapped, as
    /// Linux gives it. The bytes are written in bounded chunks.
    fn mincore(&mut self, mem: &dyn PhysMem, addr: u64, len: u64, vec: u64) -> Result<i64, i64> {
        if !addr.is_multiple_of(PAGE) {
            return Err(EINVAL);
        }
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_add(PAGE - 1))
            .ok_or(ENOMEM)?
            & !(PAGE - 1);
        if end > crate::USER_TOP {
            return Err(ENOMEM);
        }
        // Every page must be mapped: check the mappings before writing.
        let mut va = addr;
        while va < end {
            match self.space.vma_at(va) {
                Some((_, v)) if !v.kernel => va = v.end,
                _ => return Err(ENOMEM),
            }
        }
        const CHUNK: u64 = 4096;
        let mut out = Vec::with_capacity(CHUNK as usize);
        let mut at = vec;
        let mut va = addr;
        while va < end {
            out.clear();
            while va < end && (out.len() as u64) < CHUNK {
                out.push(u8::from(self.space.translate(mem, va).is_some()));
                va += PAGE;
            }
            self.space.write_user(mem, at, &out)?;
            at = at.wrapping_add(out.len() as u64);
        }
        Ok(0)
    }

    fn mprotect(&mut self, mem: &dyn PhysMem, addr: u64, len: u64, prot: u64) -> Result<i64, i64> {
        if prot & !(7 | 0x0100_0000 | 0x0200_0000) != 0 {
            return Err(EINVAL);
        }
        let (s, e) = Self::user_range(addr, len)?;
        if s == e {
            return Ok(0);
        }
        self.space.protect(mem, s, e, (prot & 7) as u32).map(|_| 0)
    }

    fn arch_prctl(&mut self, mem: &dyn PhysMem, code: u64, addr: u64) -> Result<i64, i64> {
        const ARCH_SET_FS: u64 = 0x1002;
        const ARCH_GET_FS: u64 = 0x1003;
        match code {
            ARCH_SET_FS => {
                if addr >= crate::USER_TOP {
                    return Err(EPERM);
                }
                self.t.fs_base = addr;
                Ok(0)
            }
            ARCH_GET_FS => {
                self.space
                    .write_user(mem, addr, &self.t.fs_base.to_le_bytes())?;
                Ok(0)
            }
            _ => Err(EINVAL),
        }
    }

    fn prlimit(
        &mut self,
        mem: &dyn PhysMem,
        pid: u64,
        res: u64,
        new: u64,
        old: u64,
    ) -> Result<i64, i64> {
        if pid != 0 && pid != u64::from(PID) {
            return Err(ESRCH);
        }
        const INF: u64 = u64::MAX;
        let lim = match res {
            3 => (crate::STACK_SIZE, INF),         // RLIMIT_STACK
            7 => (MAX_FDS as u64, MAX_FDS as u64), // RLIMIT_NOFILE
            0..=15 => (INF, INF),
            _ => return Err(EINVAL),
        };
        if old != 0 {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&lim.0.to_le_bytes());
            b[8..].copy_from_slice(&lim.1.to_le_bytes());
            self.space.write_user(mem, old, &b)?;
        }
        if new != 0 {
            let mut b = [0u8; 16];
            self.space.read_user(mem, new, &mut b)?;
        }
        Ok(0)
    }

    /// prctl: the thread's name (PR_SET_NAME / PR_GET_NAME); nothing else.
    fn prctl(&mut self, mem: &dyn PhysMem, option: u64, arg: u64) -> Result<i64, i64> {
        const PR_SET_NAME: u64 = 15;
        const PR_GET_NAME: u64 = 16;
        match option {
            PR_SET_NAME => {
                let mut n = [0u8; 16];
                self.space.read_user(mem, arg, &mut n[..1])?;
                let name = self.space.read_cstr(mem, arg, PATH_MAX).unwrap_or_default();
                let k = name.len().min(15);
                n[..k].copy_from_slice(&name[..k]);
                n[k] = 0;
                self.t.comm = n;
                Ok(0)
            }
            PR_GET_NAME => {
                let c = self.t.comm;
                self.space.write_user(mem, arg, &c)?;
                Ok(0)
            }
            _ => Err(EINVAL),
        }
    }

    fn uname(&mut self, mem: &dyn PhysMem, buf: u64) -> Result<i64, i64> {
        let mut u = [0u8; 65 * 6];
        let fields: [&[u8]; 6] = [
            b"Linux",
            b"kvmsim",
            b"6.1.0-kvmsim-se",
            b"#1 SMP kvmsim syscall emulation",
            b"x86_64",
            b"(none)",
        ];
        for (i, f) in fields.iter().enumerate() {
            u[65 * i..65 * i + f.len()].copy_from_slice(f);
        }
        self.space.write_user(mem, buf, &u)?;
        Ok(0)
    }

    fn getrandom(&mut self, mem: &dyn PhysMem, buf: u64, len: u64) -> Result<i64, i64> {
        let n = (len as usize).min(MAX_IO);
        let mut tmp = vec![0u8; n];
        self.rng.fill(&mut tmp);
        self.space.write_user(mem, buf, &tmp)?;
        Ok(n as i64)
    }

    fn clock_ns(id: u64, clock: Clock) -> Result<u64, i64> {
        let mono = clock.now / 1000;
        match id {
            // REALTIME, REALTIME_COARSE, TAI
            0 | 5 | 11 => Ok(clock.realtime_base_ns + mono),
            // MONOTONIC, PROCESS/THREAD_CPUTIME, MONOTONIC_RAW/COARSE, BOOTTIME
            1 | 2 | 3 | 4 | 6 | 7 => Ok(mono),
            _ => Err(EINVAL),
        }
    }

    fn put_timespec(&mut self, mem: &dyn PhysMem, at: u64, ns: u64) -> Result<(), i64> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(ns / 1_000_000_000).to_le_bytes());
        b[8..].copy_from_slice(&(ns % 1_000_000_000).to_le_bytes());
        self.space.write_user(mem, at, &b)
    }

    fn clock_gettime(
        &mut self,
        mem: &dyn PhysMem,
        id: u64,
        ts: u64,
        clock: Clock,
    ) -> Result<i64, i64> {
        let ns = Self::clock_ns(id, clock)?;
        self.put_timespec(mem, ts, ns)?;
        Ok(0)
    }

    fn clock_getres(&mut self, mem: &dyn PhysMem, id: u64, ts: u64) -> Result<i64, i64> {
        Self::clock_ns(
            id,
            Clock {
                now: 0,
                realtime_base_ns: 0,
            },
        )?;
        if ts != 0 {
            self.put_timespec(mem, ts, 1)?;
        }
        Ok(0)
    }

    fn gettimeofday(&mut self, mem: &dyn PhysMem, tv: u64, clock: Clock) -> Result<i64, i64> {
        if tv != 0 {
            let ns = clock.realtime_base_ns + clock.now / 1000;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&(ns / 1_000_000_000).to_le_bytes());
            b[8..].copy_from_slice(&((ns % 1_000_000_000) / 1000).to_le_bytes());
            self.space.write_user(mem, tv, &b)?;
        }
        Ok(0)
    }

    /// nanosleep / clock_nanosleep: the call takes the requested simulated
    /// time (no host time).
    fn sleep(
        &mut self,
        mem: &dyn PhysMem,
        id: u64,
        flags: u64,
        req: u64,
        rem: u64,
        clock: Clock,
    ) -> Done {
        let mut b = [0u8; 16];
        if let Err(e) = self.space.read_user(mem, req, &mut b) {
            return ret(Err(e));
        }
        let sec = i64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let nsec = i64::from_le_bytes(b[8..].try_into().unwrap_or_default());
        if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
            return ret(Err(EINVAL));
        }
        let ns = (sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(nsec as u64);
        let wait_ns = if flags & 1 != 0 {
            // TIMER_ABSTIME
            match Self::clock_ns(id, clock) {
                Ok(now) => ns.saturating_sub(now),
                Err(e) => return ret(Err(e)),
            }
        } else {
            if let Err(e) = Self::clock_ns(id, clock) {
                return ret(Err(e));
            }
            ns
        };
        let wait = wait_ns.saturating_mul(1000);
        // A timer signal that would be acted on ends the sleep early (EINTR,
        // the time left in `rem` for a relative sleep).
        if let Some(deadline) = self.timer_interrupts(self.t.sigmask) {
            let cut = deadline.saturating_sub(clock.now);
            if cut < wait {
                if flags & 1 == 0 && rem != 0 {
                    let left_ns = (wait - cut) / 1000;
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&(left_ns / 1_000_000_000).to_le_bytes());
                    b[8..].copy_from_slice(&(left_ns % 1_000_000_000).to_le_bytes());
                    if let Err(e) = self.space.write_user(mem, rem, &b) {
                        return ret(Err(e));
                    }
                }
                return Done {
                    flow: Flow::Return(-EINTR),
                    sleep: cut,
                };
            }
        }
        Done {
            flow: Flow::Return(0),
            sleep: wait,
        }
    }

    fn getaffinity(&mut self, mem: &dyn PhysMem, size: u64, mask: u64) -> Result<i64, i64> {
        if size < 8 || !size.is_multiple_of(8) {
            return Err(EINVAL);
        }
        let n = (size as usize).min(128);
        let mut b = vec![0u8; n];
        for c in 0..self.cpus.min(8 * n) {
            b[c / 8] |= 1 << (c % 8);
        }
        self.space.write_user(mem, mask, &b)?;
        Ok(n as i64)
    }

    /// True if `rsp` lies on the alternate signal stack.
    pub fn on_altstack(&self, rsp: u64) -> bool {
        self.t
            .altstack
            .is_some_and(|(sp, size)| rsp > sp && rsp <= sp.wrapping_add(size))
    }

    /// The disposition of `sig`.
    pub fn action(&self, sig: i32) -> crate::signal::Action {
        self.sigactions
            .get(&(sig as u64))
            .map_or_else(Default::default, crate::signal::Action::from_bytes)
    }

    /// Sends `sig` to the process: pending until delivered, or dropped at
    /// once if it would be ignored.
    pub fn send(&mut self, sig: i32) {
        if !self.action(sig).ignores(sig) || self.t.sigmask & crate::signal::bit(sig) != 0 {
            self.pending |= crate::signal::bit(sig);
        }
    }

    /// Sends `sig` to the thread being serviced (tgkill, tkill).
    pub fn send_thread(&mut self, sig: i32) {
        if !self.action(sig).ignores(sig) || self.t.sigmask & crate::signal::bit(sig) != 0 {
            self.t.pending |= crate::signal::bit(sig);
        }
    }

    /// The lowest signal pending for the thread being serviced (its own
    /// or the process's) that it does not block.
    pub fn next_signal(&self) -> Option<i32> {
        let ready =
            (self.pending | self.t.pending) & (!self.t.sigmask | crate::signal::UNBLOCKABLE);
        (ready != 0).then(|| ready.trailing_zeros() as i32 + 1)
    }

    /// Takes `sig` off the pending sets (the thread's first).
    pub fn take_signal(&mut self, sig: i32) {
        let b = crate::signal::bit(sig);
        if self.t.pending & b != 0 {
            self.t.pending &= !b;
        } else {
            self.pending &= !b;
        }
    }

    /// Makes SIGALRM pending if ITIMER_REAL has expired by `now` (and
    /// re-arms a periodic timer past `now`).
    pub fn expire(&mut self, now: Tick) {
        let Some((deadline, interval)) = self.itimer else {
            return;
        };
        if deadline > now {
            return;
        }
        self.send(crate::signal::SIGALRM);
        self.itimer = (interval > 0).then(|| {
            let missed = (now - deadline) / interval + 1;
            (
                deadline.saturating_add(missed.saturating_mul(interval)),
                interval,
            )
        });
    }

    /// When the timer's SIGALRM would end a wait under `mask`: its
    /// deadline, if it is armed, not blocked and not ignored.
    fn timer_interrupts(&self, mask: u64) -> Option<Tick> {
        let sig = crate::signal::SIGALRM;
        let (deadline, _) = self.itimer?;
        (mask & crate::signal::bit(sig) == 0 && !self.action(sig).ignores(sig)).then_some(deadline)
    }

    /// pause / rt_sigsuspend: returns EINTR once a signal is there (a
    /// pending one at once; otherwise the timer's, after the simulated
    /// time until it expires). A wait that nothing could end (no timer,
    /// or its signal blocked or ignored) ends the process as SIGKILL would,
    /// saying so: one process has nobody else to send it a signal.
    fn wait_for_signal(&mut self, mask: u64, clock: Clock, what: &str) -> Done {
        let ready = (self.pending | self.t.pending) & !mask;
        if ready != 0 {
            return ret(Err(EINTR));
        }
        match self.timer_interrupts(mask) {
            Some(deadline) => Done {
                flow: Flow::Return(-EINTR),
                sleep: deadline.saturating_sub(clock.now),
            },
            None => Done {
                flow: Flow::Exit {
                    status: 128 + crate::signal::SIGKILL,
                    message: format!(
                        "the program waits for a signal ({what}) that nothing can send: no timer is armed, or its signal is blocked or ignored; ended as SIGKILL would"
                    ),
                },
                sleep: 0,
            },
        }
    }

    /// alarm: ITIMER_REAL once, in whole seconds; returns the seconds left
    /// of the previous one (rounded as Linux does).
    fn alarm(&mut self, secs: u64, clock: Clock) -> i64 {
        let left = self.itimer.map_or(0, |(d, _)| d.saturating_sub(clock.now));
        const SEC: u64 = 1_000_000_000_000;
        let old = if left == 0 {
            0
        } else {
            // Whole seconds, a half or more rounds up, never 0 when armed.
            ((left + SEC / 2) / SEC).max(1)
        };
        let secs = secs as u32;
        self.itimer = (secs > 0).then(|| {
            (
                clock
                    .now
                    .saturating_add(u64::from(secs).saturating_mul(SEC)),
                0,
            )
        });
        old as i64
    }

    fn read_timeval(&mut self, mem: &dyn PhysMem, at: u64) -> Result<Tick, i64> {
        let mut b = [0u8; 16];
        self.space.read_user(mem, at, &mut b)?;
        let sec = i64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let usec = i64::from_le_bytes(b[8..].try_into().unwrap_or_default());
        if sec < 0 || !(0..1_000_000).contains(&usec) {
            return Err(EINVAL);
        }
        Ok((sec as u64)
            .saturating_mul(1_000_000_000_000)
            .saturating_add(usec as u64 * 1_000_000))
    }

    /// The itimerval of ITIMER_REAL at `clock`: interval, then value left.
    fn itimer_bytes(&self, clock: Clock) -> [u8; 32] {
        let (left, interval) = self
            .itimer
            .map_or((0, 0), |(d, i)| (d.saturating_sub(clock.now).max(1), i));
        let mut b = [0u8; 32];
        for (i, t) in [interval, left].iter().enumerate() {
            let us = t / 1_000_000;
            b[16 * i..16 * i + 8].copy_from_slice(&(us / 1_000_000).to_le_bytes());
            b[16 * i + 8..16 * i + 16].copy_from_slice(&(us % 1_000_000).to_le_bytes());
        }
        b
    }

    /// getitimer: ITIMER_REAL only (ITIMER_VIRTUAL and ITIMER_PROF, which
    /// count CPU time, are not kept: EINVAL).
    fn getitimer(
        &mut self,
        mem: &dyn PhysMem,
        which: u64,
        out: u64,
        clock: Clock,
    ) -> Result<i64, i64> {
        if which != 0 {
            return Err(EINVAL);
        }
        let b = self.itimer_bytes(clock);
        self.space.write_user(mem, out, &b)?;
        Ok(0)
    }

    fn setitimer(
        &mut self,
        mem: &dyn PhysMem,
        which: u64,
        new: u64,
        old: u64,
        clock: Clock,
    ) -> Result<i64, i64> {
        if which != 0 {
            return Err(EINVAL);
        }
        let set = if new != 0 {
            Some((
                self.read_timeval(mem, new)?,
                self.read_timeval(mem, new + 16)?,
            ))
        } else {
            None
        };
        if old != 0 {
            let b = self.itimer_bytes(clock);
            self.space.write_user(mem, old, &b)?;
        }
        if let Some((interval, value)) = set {
            self.itimer = (value > 0).then(|| (clock.now.saturating_add(value), interval));
        }
        Ok(0)
    }

    /// sigaltstack: the alternate stack for SA_ONSTACK handlers.
    fn sigaltstack(&mut self, mem: &dyn PhysMem, new: u64, old: u64) -> Result<i64, i64> {
        use crate::signal::{MINSIGSTKSZ, SS_DISABLE, SS_ONSTACK};
        let on = self.on_altstack(self.t.user_rsp);
        if old != 0 {
            let (sp, size) = self.t.altstack.unwrap_or((0, 0));
            let flags = if self.t.altstack.is_none() {
                SS_DISABLE
            } else if on {
                SS_ONSTACK
            } else {
                0
            };
            let mut b = [0u8; 24];
            b[..8].copy_from_slice(&sp.to_le_bytes());
            b[8..12].copy_from_slice(&flags.to_le_bytes());
            b[16..].copy_from_slice(&size.to_le_bytes());
            self.space.write_user(mem, old, &b)?;
        }
        if new != 0 {
            let mut b = [0u8; 24];
            self.space.read_user(mem, new, &mut b)?;
            let sp = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
            let size = u64::from_le_bytes(b[16..].try_into().unwrap_or_default());
            if on {
                return Err(EPERM);
            }
            // SS_AUTODISARM (1 << 31) is accepted and not kept.
            match flags & !(1 << 31) {
                SS_DISABLE => self.t.altstack = None,
                0 | SS_ONSTACK => {
                    if size < MINSIGSTKSZ {
                        return Err(ENOMEM);
                    }
                    self.t.altstack = Some((sp, size));
                }
                _ => return Err(EINVAL),
            }
        }
        Ok(0)
    }

    fn sigaction(
        &mut self,
        mem: &dyn PhysMem,
        sig: u64,
        act: u64,
        old: u64,
        size: u64,
    ) -> Result<i64, i64> {
        if !(1..=64).contains(&sig) || sig == 9 || sig == 19 || size != 8 {
            return Err(EINVAL);
        }
        if old != 0 {
            let prev = self.sigactions.get(&sig).copied().unwrap_or([0; 32]);
            self.space.write_user(mem, old, &prev)?;
        }
        if act != 0 {
            let mut a = [0u8; 32];
            self.space.read_user(mem, act, &mut a)?;
            self.sigactions.insert(sig, a);
            // A signal now ignored is discarded if pending (as Linux does).
            if crate::signal::Action::from_bytes(&a).ignores(sig as i32) {
                self.pending &= !crate::signal::bit(sig as i32);
                self.t.pending &= !crate::signal::bit(sig as i32);
            }
        }
        Ok(0)
    }

    fn sigprocmask(
        &mut self,
        mem: &dyn PhysMem,
        how: u64,
        set: u64,
        old: u64,
        size: u64,
    ) -> Result<i64, i64> {
        if size != 8 {
            return Err(EINVAL);
        }
        if old != 0 {
            self.space
                .write_user(mem, old, &self.t.sigmask.to_le_bytes())?;
        }
        if set != 0 {
            let mut b = [0u8; 8];
            self.space.read_user(mem, set, &mut b)?;
            let s = u64::from_le_bytes(b) & !((1 << 8) | (1 << 18));
            self.t.sigmask = match how {
                0 => self.t.sigmask | s,
                1 => self.t.sigmask & !s,
                2 => s,
                _ => return Err(EINVAL),
            };
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::{self, ET_EXEC};
    use crate::mm::{VecMem, EFAULT};
    use crate::process::{Process, ProcessConfig};

    const RAM: usize = 8 << 20;

    fn process() -> (VecMem, Process) {
        let mem = VecMem::new(RAM);
        let image = elf::tests::tiny(ET_EXEC, 0x40_0000, &[0xf4; 64], &[]);
        let e = elf::parse(&image, "tiny").unwrap();
        let cfg = ProcessConfig {
            path: "/tiny".into(),
            argv: vec!["tiny".into()],
            envp: vec![],
            seed: 1,
            hwcap: 0,
            paths: Default::default(),
            interp: None,
            cpus: 1,
        };
        let sink = || Sink {
            echo: None,
            log: None,
        };
        let files = Files::stdio(false, sink(), sink());
        let (p, _) =
            Process::load(&mem, &[(0, RAM as u64)], &image, &e, &cfg, &[0; 10], files).unwrap();
        (mem, p)
    }

    fn call(p: &mut Process, mem: &VecMem, nr: u64, a: &[u64]) -> i64 {
        let mut args = [0u64; 6];
        args[..a.len()].copy_from_slice(a);
        let clock = Clock {
            now: 5_000_000_000_000,
            realtime_base_ns: 1_000_000_000,
        };
        match p.syscall(mem, nr, args, clock).expect("supported").flow {
            Flow::Return(v) => v,
            Flow::Exit { status, .. } => panic!("exit {status}"),
            Flow::SigReturn => panic!("sigreturn"),
            Flow::Block { key, .. } => panic!("blocks on {key:#x}"),
        }
    }

    #[test]
    fn pipes_in_one_thread_keep_linux_rules() {
        let (mem, mut p) = process();
        let buf = crate::STACK_TOP - 0x1_0000;
        let rd = |p: &mut Process, at: u64, n: usize| {
            let mut b = vec![0u8; n];
            p.space.read_user(&mem, at, &mut b).unwrap();
            b
        };
        // Bad flags, a bad pointer.
        assert_eq!(call(&mut p, &mem, nr::PIPE2, &[buf, 0x4000]), -EINVAL);
        assert_eq!(call(&mut p, &mem, nr::PIPE, &[0x10]), -crate::mm::EFAULT);
        assert_eq!(
            call(&mut p, &mem, nr::PIPE2, &[buf, libc::O_CLOEXEC as u64]),
            0
        );
        let fds = rd(&mut p, buf, 8);
        let (r, w) = (
            i32::from_le_bytes(fds[..4].try_into().unwrap()) as u64,
            i32::from_le_bytes(fds[4..].try_into().unwrap()) as u64,
        );
        assert_eq!((r, w), (3, 4));
        assert_eq!(call(&mut p, &mem, nr::FCNTL, &[r, libc::F_GETFD as u64]), 1);
        assert_eq!(
            call(&mut p, &mem, nr::FCNTL, &[w, libc::F_GETFL as u64]),
            i64::from(libc::O_WRONLY)
        );
        // Write then read in one thread; the wrong end is EBADF, a
        // positional call ESPIPE.
        p.space.write_user(&mem, buf + 64, b"hello pipe").unwrap();
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[w, buf + 64, 10]), 10);
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[r, buf + 64, 10]), -EBADF);
        assert_eq!(call(&mut p, &mem, nr::PREAD64, &[r, buf, 1, 0]), -ESPIPE);
        assert_eq!(call(&mut p, &mem, nr::LSEEK, &[r, 0, 0]), -ESPIPE);
        let avail = buf + 200;
        assert_eq!(call(&mut p, &mem, nr::IOCTL, &[r, 0x541b, avail]), 0);
        assert_eq!(rd(&mut p, avail, 4), 10u32.to_le_bytes());
        assert_eq!(
            call(&mut p, &mem, nr::READ, &[r, 0x10, 5]),
            -crate::mm::EFAULT
        );
        assert_eq!(call(&mut p, &mem, nr::READ, &[r, buf + 128, 5]), 5);
        assert_eq!(rd(&mut p, buf + 128, 5), b"hello");
        // readv takes the rest across two buffers.
        let iov = buf + 256;
        let mut v = Vec::new();
        for (base, len) in [(buf + 300, 2u64), (buf + 400, 10)] {
            v.extend_from_slice(&base.to_le_bytes());
            v.extend_from_slice(&len.to_le_bytes());
        }
        p.space.write_user(&mem, iov, &v).unwrap();
        assert_eq!(call(&mut p, &mem, nr::READV, &[r, iov, 2]), 5);
        assert_eq!(rd(&mut p, buf + 300, 2), b" p");
        assert_eq!(rd(&mut p, buf + 400, 3), b"ipe");
        // Empty with a write end open: a blocking read would wait (the
        // device parks the thread); non-blocking, EAGAIN.
        let d = p.syscall(
            &mem,
            nr::READ,
            [r, buf, 5, 0, 0, 0],
            Clock {
                now: 0,
                realtime_base_ns: 0,
            },
        );
        assert!(
            matches!(d.unwrap().flow, Flow::Block { key, fd: 3, deadline: None } if crate::pipe::parse_key(key).is_some())
        );
        assert_eq!(
            call(
                &mut p,
                &mem,
                nr::FCNTL,
                &[r, libc::F_SETFL as u64, libc::O_NONBLOCK as u64]
            ),
            0
        );
        assert_eq!(
            call(&mut p, &mem, nr::FCNTL, &[r, libc::F_GETFL as u64]),
            i64::from(libc::O_RDONLY | libc::O_NONBLOCK)
        );
        assert_eq!(call(&mut p, &mem, nr::READ, &[r, buf, 5]), -EAGAIN);
        // Full: a non-blocking write takes what fits, then EAGAIN.
        assert_eq!(
            call(
                &mut p,
                &mem,
                nr::FCNTL,
                &[w, libc::F_SETFL as u64, libc::O_NONBLOCK as u64]
            ),
            0
        );
        let big = 48 << 10;
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[w, buf, big]), big as i64);
        assert_eq!(
            call(&mut p, &mem, nr::WRITE, &[w, buf, big]),
            (16 << 10) as i64
        );
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[w, buf, 1]), -EAGAIN);
        // dup keeps the write end open; closing both gives end of file
        // after the data.
        let w2 = call(&mut p, &mem, nr::DUP, &[w]) as u64;
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[w]), 0);
        assert_eq!(
            call(&mut p, &mem, nr::READ, &[r, buf, 1 << 20]),
            (64 << 10) as i64
        );
        assert_eq!(call(&mut p, &mem, nr::READ, &[r, buf, 1]), -EAGAIN);
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[w2]), 0);
        assert_eq!(call(&mut p, &mem, nr::READ, &[r, buf, 1]), 0);
        // Every read end closed: EPIPE, and SIGPIPE for the thread.
        assert_eq!(call(&mut p, &mem, nr::PIPE2, &[buf, 0]), 0);
        let fds = rd(&mut p, buf, 8);
        let (r, w) = (u64::from(fds[0]), u64::from(fds[4]));
        assert_eq!(call(&mut p, &mem, nr::DUP2, &[w, 10]), 10);
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[r]), 0);
        assert_eq!(p.t.pending, 0);
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[10, buf, 1]), -EPIPE);
        assert_eq!(p.t.pending, crate::signal::bit(crate::signal::SIGPIPE));
    }

    #[test]
    fn poll_gives_pipe_states_and_waits_with_a_deadline() {
        let (mem, mut p) = process();
        let buf = crate::STACK_TOP - 0x1_0000;
        assert_eq!(call(&mut p, &mem, nr::PIPE2, &[buf, 0]), 0);
        let (r, w) = (3u64, 4u64);
        let pfd = buf + 0x100;
        let set = |p: &mut Process, fds: &[(i32, i16)]| {
            let mut b = Vec::new();
            for &(fd, ev) in fds {
                b.extend_from_slice(&fd.to_le_bytes());
                b.extend_from_slice(&ev.to_le_bytes());
                b.extend_from_slice(&0i16.to_le_bytes());
            }
            p.space.write_user(&mem, pfd, &b).unwrap();
        };
        let revents = |p: &mut Process, i: u64| {
            let mut b = [0u8; 2];
            p.space.read_user(&mem, pfd + 8 * i + 6, &mut b).unwrap();
            i16::from_le_bytes(b)
        };
        let (pin, pout) = (libc::POLLIN, libc::POLLOUT);
        // Empty: the read end is not ready, the write end is; a bad
        // descriptor is POLLNVAL, a negative one is skipped.
        set(
            &mut p,
            &[(r as i32, pin), (w as i32, pout), (77, pin), (-1, pin)],
        );
        assert_eq!(call(&mut p, &mem, nr::POLL, &[pfd, 4, 0]), 2);
        assert_eq!(revents(&mut p, 0), 0);
        assert_eq!(revents(&mut p, 1), pout, "only the events asked for");
        assert_eq!(revents(&mut p, 2), libc::POLLNVAL);
        assert_eq!(revents(&mut p, 3), 0);
        // Nothing ready with a timeout: a wait until the deadline (100 ms
        // from the call's time), on the poll key.
        set(&mut p, &[(r as i32, pin)]);
        let clock = Clock {
            now: 7_000,
            realtime_base_ns: 0,
        };
        let d = p
            .syscall(&mem, nr::POLL, [pfd, 1, 100, 0, 0, 0], clock)
            .unwrap();
        assert_eq!(
            d.flow,
            Flow::Block {
                key: crate::pipe::POLL_KEY,
                fd: 1,
                deadline: Some(7_000 + 100_000_000_000)
            }
        );
        // Made again after a wake, it keeps that deadline; past it, 0.
        let later = Clock {
            now: 7_000 + 100_000_000_000,
            realtime_base_ns: 0,
        };
        let d = p
            .syscall(&mem, nr::POLL, [pfd, 1, 100, 0, 0, 0], later)
            .unwrap();
        assert_eq!(d.flow, Flow::Return(0));
        assert_eq!(p.t.poll_deadline, None);
        // Data: POLLIN; the write end closed: POLLHUP too, unasked.
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[w, buf, 3]), 3);
        assert_eq!(call(&mut p, &mem, nr::POLL, &[pfd, 1, u64::MAX]), 1);
        assert_eq!(revents(&mut p, 0), pin);
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[w]), 0);
        assert_eq!(call(&mut p, &mem, nr::POLL, &[pfd, 1, 0]), 1);
        assert_eq!(revents(&mut p, 0), pin | libc::POLLHUP);
        // ppoll: the time left is written back; its mask is in force only
        // during the call.
        let ts = buf + 0x200;
        let mut t = Vec::new();
        t.extend_from_slice(&2i64.to_le_bytes());
        t.extend_from_slice(&0i64.to_le_bytes());
        p.space.write_user(&mem, ts, &t).unwrap();
        let mask = buf + 0x300;
        p.space
            .write_user(&mem, mask, &u64::MAX.to_le_bytes())
            .unwrap();
        p.t.sigmask = 0;
        assert_eq!(call(&mut p, &mem, nr::PPOLL, &[pfd, 1, ts, mask, 8]), 1);
        assert_eq!(p.t.sigmask, 0);
        assert_eq!(p.t.suspend_mask, None);
        let mut b = [0u8; 16];
        p.space.read_user(&mem, ts, &mut b).unwrap();
        assert_eq!(&b[..8], &2i64.to_le_bytes());
        assert_eq!(
            call(&mut p, &mem, nr::PPOLL, &[pfd, 1, ts, mask, 4]),
            -EINVAL
        );
        assert_eq!(call(&mut p, &mem, nr::POLL, &[pfd, 5000, 0]), -EINVAL);
    }

    /// Runs call `nr` at `now` (ps), returning its flow.
    fn flow_at(p: &mut Process, mem: &VecMem, nr: u64, a: &[u64], now: Tick) -> Flow {
        let mut args = [0u64; 6];
        args[..a.len()].copy_from_slice(a);
        let clock = Clock {
            now,
            realtime_base_ns: 0,
        };
        p.syscall(mem, nr, args, clock).expect("supported").flow
    }

    fn put(p: &mut Process, mem: &VecMem, at: u64, b: &[u8]) {
        p.space.write_user(mem, at, b).unwrap();
    }

    fn get(p: &mut Process, mem: &VecMem, at: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        p.space.read_user(mem, at, &mut b).unwrap();
        b
    }

    fn two(a: i64, b: i64) -> Vec<u8> {
        [a.to_le_bytes(), b.to_le_bytes()].concat()
    }

    #[test]
    fn select_gives_states_waits_and_writes_the_time_left() {
        let (mem, mut p) = process();
        let buf = crate::STACK_TOP - 0x1_0000;
        assert_eq!(call(&mut p, &mem, nr::PIPE2, &[buf, 0]), 0);
        let (r, w) = (3u64, 4u64);
        put(&mut p, &mem, buf, b"/dev/null\0");
        let host = call(&mut p, &mem, nr::OPEN, &[buf, 2]) as u64;
        assert_eq!(host, 5);
        let (rs, ws, es, tv) = (buf + 0x100, buf + 0x200, buf + 0x300, buf + 0x400);
        let set = |p: &mut Process, at: u64, fds: &[u64]| {
            let mut b = [0u8; 128];
            for &fd in fds {
                b[fd as usize / 8] |= 1 << (fd % 8);
            }
            p.space.write_user(&mem, at, &b).unwrap();
        };
        let bits = |p: &mut Process, at: u64| -> Vec<u64> {
            let b = get(p, &mem, at, 128);
            (0..1024)
                .filter(|&i| b[i / 8] & (1 << (i % 8)) != 0)
                .map(|i| i as u64)
                .collect()
        };
        // A regular file is always ready; an empty pipe's read end is
        // not, its write end is; nothing is exceptional.
        set(&mut p, rs, &[r, host]);
        set(&mut p, ws, &[w, host]);
        set(&mut p, es, &[r, w]);
        put(&mut p, &mem, tv, &two(0, 0));
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[6, rs, ws, es, tv]), 3);
        assert_eq!(bits(&mut p, rs), [host]);
        assert_eq!(bits(&mut p, ws), [w, host]);
        assert_eq!(bits(&mut p, es), Vec::<u64>::new());
        // Descriptors at or above nfds are not looked at; a closed one in
        // a set is EBADF; nfds beyond the table counts as the table.
        set(&mut p, rs, &[r, 9]);
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[9, rs, 0, 0, tv]), 0);
        set(&mut p, rs, &[r, 9]);
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[10, rs, 0, 0, tv]), -EBADF);
        set(&mut p, rs, &[host]);
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[5000, rs, 0, 0, tv]), 1);
        assert_eq!(
            call(&mut p, &mem, nr::SELECT, &[u64::MAX, rs, 0, 0, tv]),
            -EINVAL
        );
        // Bad pointers, bad timevals (microseconds carry over; a negative
        // time is EINVAL).
        assert_eq!(
            call(&mut p, &mem, nr::SELECT, &[6, 0x10, 0, 0, tv]),
            -EFAULT
        );
        assert_eq!(
            call(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, 0x10]),
            -EFAULT
        );
        put(&mut p, &mem, tv, &two(0, -1));
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, tv]), -EINVAL);
        put(&mut p, &mem, tv, &two(-1, 0));
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, tv]), -EINVAL);
        put(&mut p, &mem, tv, &two(0, 1_500_000));
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, tv]), 1);
        assert_eq!(get(&mut p, &mem, tv, 16), two(1, 500_000), "time left");
        // Nothing ready: a wait on the poll key until the deadline, the
        // sets as they were given (the call is made again).
        set(&mut p, rs, &[r]);
        let now = 1_000_000_000_000;
        let s = 1_000_000_000_000u64;
        assert_eq!(
            flow_at(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, tv], now),
            Flow::Block {
                key: crate::pipe::POLL_KEY,
                fd: 6,
                deadline: Some(now + 3 * s / 2)
            }
        );
        assert_eq!(bits(&mut p, rs), [r]);
        // Data came: made again half a second later, it returns with one
        // second left.
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[w, buf, 1]), 1);
        assert_eq!(
            flow_at(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, tv], now + s / 2),
            Flow::Return(1)
        );
        assert_eq!(get(&mut p, &mem, tv, 16), two(1, 0));
        assert_eq!(bits(&mut p, rs), [r]);
        let mut b = [0u8; 1];
        p.space.read_user(&mem, buf, &mut b).unwrap();
        assert_eq!(call(&mut p, &mem, nr::READ, &[r, buf + 0x800, 1]), 1);
        // The deadline passes: 0, the sets emptied, no time left.
        set(&mut p, rs, &[r]);
        put(&mut p, &mem, tv, &two(0, 1000));
        assert!(matches!(
            flow_at(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, tv], now),
            Flow::Block { .. }
        ));
        assert_eq!(
            flow_at(&mut p, &mem, nr::SELECT, &[6, rs, 0, 0, tv], now + s),
            Flow::Return(0)
        );
        assert_eq!(bits(&mut p, rs), Vec::<u64>::new());
        assert_eq!(get(&mut p, &mem, tv, 16), two(0, 0));
        assert_eq!(p.t.poll_deadline, None);
        // pselect6: a timespec (written back), and a mask in force only
        // while it waits ({pointer, size}; a size other than 8: EINVAL).
        let (ts, sig, mask) = (buf + 0x500, buf + 0x600, buf + 0x700);
        put(&mut p, &mem, ts, &two(2, 5));
        put(&mut p, &mem, mask, &u64::MAX.to_le_bytes());
        put(
            &mut p,
            &mem,
            sig,
            &[mask.to_le_bytes(), 8u64.to_le_bytes()].concat(),
        );
        set(&mut p, ws, &[w]);
        p.t.sigmask = 0;
        assert_eq!(call(&mut p, &mem, nr::PSELECT6, &[6, 0, ws, 0, ts, sig]), 1);
        assert_eq!(get(&mut p, &mem, ts, 16), two(2, 5));
        assert_eq!((p.t.sigmask, p.t.suspend_mask), (0, None));
        set(&mut p, rs, &[r]);
        assert!(matches!(
            flow_at(&mut p, &mem, nr::PSELECT6, &[6, rs, 0, 0, ts, sig], now),
            Flow::Block { .. }
        ));
        assert_eq!(p.t.sigmask, !crate::signal::UNBLOCKABLE);
        assert_eq!(p.t.suspend_mask, Some(0));
        assert_eq!(
            flow_at(
                &mut p,
                &mem,
                nr::PSELECT6,
                &[6, rs, 0, 0, ts, sig],
                now + 3 * s
            ),
            Flow::Return(0)
        );
        assert_eq!((p.t.sigmask, p.t.suspend_mask), (0, None));
        put(
            &mut p,
            &mem,
            sig,
            &[mask.to_le_bytes(), 4u64.to_le_bytes()].concat(),
        );
        assert_eq!(
            call(&mut p, &mem, nr::PSELECT6, &[6, 0, ws, 0, ts, sig]),
            -EINVAL
        );
        put(&mut p, &mem, ts, &two(0, 1_000_000_000));
        assert_eq!(
            call(&mut p, &mem, nr::PSELECT6, &[6, 0, ws, 0, ts, 0]),
            -EINVAL
        );
        // A write end whose readers are gone is ready both ways (POLLERR).
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[r]), 0);
        set(&mut p, rs, &[w]);
        set(&mut p, ws, &[w]);
        assert_eq!(call(&mut p, &mem, nr::SELECT, &[6, rs, ws, 0, 0]), 2);
    }

    #[test]
    fn eventfd_counts_waits_and_keeps_linux_rules() {
        use crate::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE};
        let (mem, mut p) = process();
        let buf = crate::STACK_TOP - 0x1_0000;
        assert_eq!(call(&mut p, &mem, nr::EVENTFD2, &[0, 0x10]), -EINVAL);
        let e = call(&mut p, &mem, nr::EVENTFD2, &[3, EFD_NONBLOCK | EFD_CLOEXEC]) as u64;
        assert_eq!(e, 3);
        assert_eq!(call(&mut p, &mem, nr::FCNTL, &[e, libc::F_GETFD as u64]), 1);
        assert_eq!(
            call(&mut p, &mem, nr::FCNTL, &[e, libc::F_GETFL as u64]),
            i64::from(libc::O_RDWR | libc::O_NONBLOCK)
        );
        // Reads take 8 bytes or nothing; the counter goes to 0.
        assert_eq!(call(&mut p, &mem, nr::READ, &[e, buf, 7]), -EINVAL);
        assert_eq!(call(&mut p, &mem, nr::READ, &[e, 0x10, 8]), -EFAULT);
        assert_eq!(call(&mut p, &mem, nr::PREAD64, &[e, buf, 8, 0]), -ESPIPE);
        assert_eq!(call(&mut p, &mem, nr::READ, &[e, buf, 100]), 8);
        assert_eq!(get(&mut p, &mem, buf, 8), 3u64.to_le_bytes());
        assert_eq!(call(&mut p, &mem, nr::READ, &[e, buf, 8]), -EAGAIN);
        // Writes add; u64::MAX and short buffers are EINVAL; past
        // 0xfffffffffffffffe a write waits (EAGAIN here).
        put(&mut p, &mem, buf, &u64::MAX.to_le_bytes());
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[e, buf, 8]), -EINVAL);
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[e, buf, 4]), -EINVAL);
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[e, 0x10, 8]), -EFAULT);
        put(&mut p, &mem, buf, &(u64::MAX - 2).to_le_bytes());
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[e, buf, 8]), 8);
        put(&mut p, &mem, buf, &2u64.to_le_bytes());
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[e, buf, 8]), -EAGAIN);
        put(&mut p, &mem, buf, &1u64.to_le_bytes());
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[e, buf, 8]), 8);
        // Full: readable only.
        let pfd = buf + 0x100;
        put(
            &mut p,
            &mem,
            pfd,
            &[(e as i32).to_le_bytes(), [5, 0, 0, 0]].concat(),
        );
        assert_eq!(call(&mut p, &mem, nr::POLL, &[pfd, 1, 0]), 1);
        assert_eq!(
            get(&mut p, &mem, pfd + 6, 2),
            libc::POLLIN.to_le_bytes().to_vec()
        );
        assert_eq!(call(&mut p, &mem, nr::READ, &[e, buf, 8]), 8);
        assert_eq!(get(&mut p, &mem, buf, 8), (u64::MAX - 1).to_le_bytes());
        // Semaphore mode: one at a time.
        let s = call(
            &mut p,
            &mem,
            nr::EVENTFD2,
            &[2, EFD_SEMAPHORE | EFD_NONBLOCK],
        ) as u64;
        for want in [8, 8, -EAGAIN] {
            assert_eq!(call(&mut p, &mem, nr::READ, &[s, buf, 8]), want);
        }
        assert_eq!(get(&mut p, &mem, buf, 8), 1u64.to_le_bytes());
        // Blocking: a read of 0 waits on the eventfd's reader key; a
        // write waits on its writer key; fcntl makes it non-blocking.
        let b = call(&mut p, &mem, nr::EVENTFD, &[0]) as u64;
        let Flow::Block { key, fd, deadline } = flow_at(&mut p, &mem, nr::READ, &[b, buf, 8], 0)
        else {
            panic!("a read of 0 waits");
        };
        assert_eq!((fd as u64, deadline), (b, None));
        let id = crate::eventfd::parse_key(key).expect("an eventfd key");
        assert!(!id.1);
        put(&mut p, &mem, buf, &(u64::MAX - 1).to_le_bytes());
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[b, buf, 8]), 8);
        assert_eq!(
            mem::lock(&p.pipe_events).last().copied(),
            Some(crate::eventfd::key(id.0, false)),
            "readers are woken"
        );
        let Flow::Block { key, .. } = flow_at(&mut p, &mem, nr::WRITE, &[b, buf, 8], 0) else {
            panic!("an overflowing write waits");
        };
        assert_eq!(key, crate::eventfd::key(id.0, true));
        let setfl = libc::F_SETFL as u64;
        assert_eq!(
            call(
                &mut p,
                &mem,
                nr::FCNTL,
                &[b, setfl, libc::O_NONBLOCK as u64]
            ),
            0
        );
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[b, buf, 8]), -EAGAIN);
        // An anonymous inode: mode 0600, no file type; lseek stays at 0.
        assert_eq!(call(&mut p, &mem, nr::FSTAT, &[b, buf]), 0);
        let st = get(&mut p, &mem, buf + 24, 4);
        assert_eq!(u32::from_le_bytes(st.try_into().unwrap()), 0o600);
        assert_eq!(call(&mut p, &mem, nr::LSEEK, &[b, 5, 0]), 0);
    }

    #[test]
    fn epoll_reports_ready_items_and_keeps_linux_rules() {
        use crate::epoll::*;
        let (mem, mut p) = process();
        let buf = crate::STACK_TOP - 0x1_0000;
        let ev = buf + 0x100;
        let out = buf + 0x200;
        let ctl = |p: &mut Process, ep: u64, op: u64, fd: u64, events: u32, data: u64| {
            p.space
                .write_user(
                    &mem,
                    ev,
                    &[&events.to_le_bytes()[..], &data.to_le_bytes()].concat(),
                )
                .unwrap();
            call(p, &mem, nr::EPOLL_CTL, &[ep, op, fd, ev])
        };
        let wait = |p: &mut Process, ep: u64, max: u64| -> Vec<(u32, u64)> {
            let n = call(p, &mem, nr::EPOLL_WAIT, &[ep, out, max, 0]);
            assert!(n >= 0, "epoll_wait: {n}");
            let b = get(p, &mem, out, 12 * n as usize);
            b.chunks(12)
                .map(|c| {
                    (
                        u32::from_le_bytes(c[..4].try_into().unwrap()),
                        u64::from_le_bytes(c[4..].try_into().unwrap()),
                    )
                })
                .collect()
        };
        assert_eq!(call(&mut p, &mem, nr::EPOLL_CREATE, &[0]), -EINVAL);
        assert_eq!(call(&mut p, &mem, nr::EPOLL_CREATE1, &[1]), -EINVAL);
        let ep = call(&mut p, &mem, nr::EPOLL_CREATE1, &[libc::O_CLOEXEC as u64]) as u64;
        assert_eq!(ep, 3);
        assert_eq!(call(&mut p, &mem, nr::EPOLL_CREATE, &[1]), 4);
        assert_eq!(call(&mut p, &mem, nr::PIPE2, &[buf, 0]), 0);
        let (r, w) = (5u64, 6u64);
        let e = call(
            &mut p,
            &mem,
            nr::EVENTFD2,
            &[0, crate::eventfd::EFD_NONBLOCK],
        ) as u64;
        put(&mut p, &mem, buf + 0x800, b"/dev/null\0");
        let host = call(&mut p, &mem, nr::OPEN, &[buf + 0x800, 0]) as u64;
        // The errors, in Linux's order.
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, r, EPOLLIN, 1), 0);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, r, EPOLLIN, 1), -EEXIST);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_MOD, w, EPOLLOUT, 1), -ENOENT);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_DEL, w, 0, 0), -ENOENT);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, host, EPOLLIN, 0), -EPERM);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, ep, EPOLLIN, 0), -EINVAL);
        assert_eq!(
            ctl(&mut p, ep, EPOLL_CTL_ADD, 4, EPOLLIN, 0),
            -EINVAL,
            "nesting"
        );
        assert_eq!(ctl(&mut p, r, EPOLL_CTL_ADD, w, EPOLLIN, 0), -EINVAL);
        assert_eq!(ctl(&mut p, 99, EPOLL_CTL_ADD, w, EPOLLIN, 0), -EBADF);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, 99, EPOLLIN, 0), -EBADF);
        assert_eq!(ctl(&mut p, ep, 7, w, EPOLLIN, 0), -EINVAL);
        assert_eq!(
            ctl(&mut p, ep, EPOLL_CTL_MOD, r, EPOLLIN | EPOLLEXCLUSIVE, 0),
            -EINVAL
        );
        assert_eq!(
            call(&mut p, &mem, nr::EPOLL_CTL, &[ep, EPOLL_CTL_ADD, w, 0x10]),
            -EFAULT
        );
        assert_eq!(
            call(&mut p, &mem, nr::EPOLL_WAIT, &[ep, out, 0, 0]),
            -EINVAL
        );
        assert_eq!(
            call(
                &mut p,
                &mem,
                nr::EPOLL_WAIT,
                &[ep, crate::USER_TOP - 12, 2, 0]
            ),
            -EFAULT
        );
        assert_eq!(call(&mut p, &mem, nr::EPOLL_WAIT, &[r, out, 1, 0]), -EINVAL);
        // Level-triggered: nothing, then the pipe's data at every wait.
        assert_eq!(wait(&mut p, ep, 8), []);
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[w, buf, 2]), 2);
        assert_eq!(wait(&mut p, ep, 8), [(EPOLLIN, 1)]);
        assert_eq!(wait(&mut p, ep, 8), [(EPOLLIN, 1)]);
        // Two ready with room for one: they take turns.
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, e, EPOLLIN | EPOLLOUT, 2), 0);
        assert_eq!(wait(&mut p, ep, 1), [(EPOLLIN, 1)]);
        assert_eq!(wait(&mut p, ep, 1), [(EPOLLOUT, 2)]);
        assert_eq!(wait(&mut p, ep, 1), [(EPOLLIN, 1)]);
        // One-shot: reported once, until MOD arms it again.
        assert_eq!(
            ctl(&mut p, ep, EPOLL_CTL_MOD, e, EPOLLOUT | EPOLLONESHOT, 3),
            0
        );
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_DEL, r, 0, 0), 0);
        assert_eq!(wait(&mut p, ep, 8), [(EPOLLOUT, 3)]);
        assert_eq!(wait(&mut p, ep, 8), []);
        assert_eq!(
            ctl(&mut p, ep, EPOLL_CTL_MOD, e, EPOLLIN | EPOLLONESHOT, 4),
            0
        );
        assert_eq!(wait(&mut p, ep, 8), []);
        put(&mut p, &mem, buf + 0x10, &5u64.to_le_bytes());
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[e, buf + 0x10, 8]), 8);
        assert_eq!(wait(&mut p, ep, 8), [(EPOLLIN, 4)]);
        assert_eq!(wait(&mut p, ep, 8), []);
        // Edge-triggered: once per wake that concerns it.
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_DEL, e, 0, 0), 0);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, r, EPOLLIN | EPOLLET, 5), 0);
        assert_eq!(wait(&mut p, ep, 8), [(EPOLLIN, 5)]);
        assert_eq!(wait(&mut p, ep, 8), [], "still data, no new wake");
        assert_eq!(call(&mut p, &mem, nr::READ, &[r, buf + 0x20, 1]), 1);
        assert_eq!(wait(&mut p, ep, 8), [], "a read wakes writers only");
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[w, buf, 1]), 1);
        assert_eq!(wait(&mut p, ep, 8), [(EPOLLIN, 5)]);
        // The epoll descriptor polls readable while a wait would report.
        let pfd = buf + 0x300;
        put(
            &mut p,
            &mem,
            pfd,
            &[(ep as i32).to_le_bytes(), [1, 0, 0, 0]].concat(),
        );
        assert_eq!(call(&mut p, &mem, nr::POLL, &[pfd, 1, 0]), 0);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, w, EPOLLOUT, 6), 0);
        assert_eq!(call(&mut p, &mem, nr::POLL, &[pfd, 1, 0]), 1);
        // Nothing ready and no timeout: a wait on the poll key, named by
        // the epoll descriptor; epoll_pwait's mask as ppoll's.
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_DEL, w, 0, 0), 0);
        assert_eq!(
            flow_at(&mut p, &mem, nr::EPOLL_WAIT, &[ep, out, 4, u64::MAX], 0),
            Flow::Block {
                key: crate::pipe::POLL_KEY,
                fd: ep as u32,
                deadline: None
            }
        );
        p.t.poll_deadline = None;
        let mask = buf + 0x400;
        put(&mut p, &mem, mask, &(1u64 << 9).to_le_bytes());
        p.t.sigmask = 0;
        assert!(matches!(
            flow_at(&mut p, &mem, nr::EPOLL_PWAIT, &[ep, out, 4, 10, mask, 8], 0),
            Flow::Block {
                deadline: Some(10_000_000_000),
                ..
            }
        ));
        assert_eq!(p.t.suspend_mask, Some(0));
        assert_eq!(
            flow_at(
                &mut p,
                &mem,
                nr::EPOLL_PWAIT,
                &[ep, out, 4, 10, mask, 8],
                10_000_000_000
            ),
            Flow::Return(0)
        );
        assert_eq!((p.t.sigmask, p.t.suspend_mask), (0, None));
        let ts = buf + 0x500;
        put(&mut p, &mem, ts, &two(0, 0));
        assert_eq!(
            call(&mut p, &mem, nr::EPOLL_PWAIT2, &[ep, out, 4, ts, 0, 0]),
            0
        );
        // A closed file's item goes with it (its last descriptor).
        assert_eq!(
            p.epoll_watches.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[r]), 0);
        assert_eq!(wait(&mut p, ep, 8), []);
        assert_eq!(
            p.epoll_watches.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        // Bounded: past MAX_WATCHES items in all, ENOSPC.
        p.epoll_watches
            .store(MAX_WATCHES, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, w, EPOLLOUT, 6), -ENOSPC);
        p.epoll_watches
            .store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(ctl(&mut p, ep, EPOLL_CTL_ADD, w, EPOLLOUT, 6), 0);
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[ep]), 0);
        assert_eq!(
            p.epoll_watches.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// select, pselect6, eventfd and epoll with hostile arguments (any
        /// numbers, pointers into and around a mapped buffer, descriptors
        /// of pipes, eventfds and epoll instances): never a panic, and the
        /// epoll items stay within their bound.
        #[test]
        fn event_calls_never_panic(
            calls in proptest::collection::vec(
                (0usize..12, proptest::prelude::any::<[u64; 6]>(), proptest::prelude::any::<u32>()),
                1..60,
            ),
            fill in proptest::collection::vec(proptest::prelude::any::<(u8, u8)>(), 0x400),
        ) {
            const CALLS: [u64; 12] = [
                nr::SELECT, nr::PSELECT6, nr::EVENTFD, nr::EVENTFD2, nr::EPOLL_CREATE,
                nr::EPOLL_CREATE1, nr::EPOLL_CTL, nr::EPOLL_WAIT, nr::EPOLL_PWAIT,
                nr::EPOLL_PWAIT2, nr::READ, nr::WRITE,
            ];
            let (mem, mut p) = process();
            let buf = crate::STACK_TOP - 0x1_0000;
            assert_eq!(call(&mut p, &mem, nr::PIPE2, &[buf, libc::O_NONBLOCK as u64]), 0);
            assert_eq!(call(&mut p, &mem, nr::EVENTFD2, &[1, 0]), 5);
            assert_eq!(call(&mut p, &mem, nr::EPOLL_CREATE1, &[0]), 6);
            // The buffer holds random sets, timeouts, events and masks,
            // mostly zero bytes (so that some timeouts are valid).
            let fill: Vec<u8> = fill.iter().map(|&(k, v)| if k % 8 == 0 { v } else { 0 }).collect();
            p.space.write_user(&mem, buf, &fill).unwrap();
            for (i, (which, mut a, sel)) in calls.into_iter().enumerate() {
                // Most arguments are made plausible: small numbers and
                // descriptors, pointers into the buffer (or just past the
                // stack's top); some stay as they came.
                for (k, arg) in a.iter_mut().enumerate() {
                    match (sel >> (3 * k)) & 7 {
                        0..=2 => *arg %= 9,
                        3..=5 => *arg = buf + (*arg % 0x400),
                        6 => *arg = crate::STACK_TOP + PAGE - (*arg % 64),
                        _ => {}
                    }
                }
                let clock = Clock {
                    now: 1_000_000 * i as u64,
                    realtime_base_ns: 0,
                };
                let done = p.syscall(&mem, CALLS[which], a, clock);
                proptest::prop_assert!(done.is_some());
                p.t.poll_deadline = None;
                p.t.suspend_mask = None;
                mem::lock(&p.pipe_events).clear();
                let watches = p.epoll_watches.load(std::sync::atomic::Ordering::Relaxed);
                proptest::prop_assert!(watches <= crate::epoll::MAX_WATCHES);
            }
        }
    }

    #[test]
    fn the_cpu_lists_give_the_process_cpus() {
        let (mem, mut p) = process();
        p.cpus = 3;
        let path = crate::STACK_TOP - 0x1_0000;
        let buf = path + 0x100;
        for name in [
            "/sys/devices/system/cpu/online",
            "/sys/devices/system/cpu/possible",
        ] {
            p.space
                .write_user(&mem, path, format!("{name}\0").as_bytes())
                .unwrap();
            let fd = call(&mut p, &mem, nr::OPENAT, &[AT_FDCWD as u64, path, 0]);
            assert!(fd >= 3, "{name}: {fd}");
            assert_eq!(call(&mut p, &mem, nr::READ, &[fd as u64, buf, 100]), 4);
            let mut b = [0u8; 4];
            p.space.read_user(&mem, buf, &mut b).unwrap();
            assert_eq!(&b, b"0-2\n");
            assert_eq!(call(&mut p, &mem, nr::READ, &[fd as u64, buf, 100]), 0);
            assert_eq!(call(&mut p, &mem, nr::LSEEK, &[fd as u64, 2, 0]), 2);
            assert_eq!(call(&mut p, &mem, nr::READ, &[fd as u64, buf, 100]), 2);
            assert_eq!(call(&mut p, &mem, nr::WRITE, &[fd as u64, buf, 1]), -EBADF);
            assert_eq!(call(&mut p, &mem, nr::CLOSE, &[fd as u64]), 0);
            assert_eq!(
                call(
                    &mut p,
                    &mem,
                    nr::OPENAT,
                    &[AT_FDCWD as u64, path, libc::O_WRONLY as u64]
                ),
                -EACCES
            );
        }
        // sched_getaffinity: the same 3 CPUs.
        assert_eq!(
            call(&mut p, &mem, nr::SCHED_GETAFFINITY, &[0, 128, buf]),
            128
        );
        let mut b = [0u8; 2];
        p.space.read_user(&mem, buf, &mut b).unwrap();
        assert_eq!(b, [0b111, 0]);
        p.cpus = 1;
        p.space
            .write_user(&mem, path, b"/sys/devices/system/cpu/online\0")
            .unwrap();
        let fd = call(&mut p, &mem, nr::OPENAT, &[AT_FDCWD as u64, path, 0]);
        assert_eq!(call(&mut p, &mem, nr::READ, &[fd as u64, buf, 100]), 2);
    }

    #[test]
    fn mincore_tells_touched_pages_and_creat_truncates() {
        let (mem, mut p) = process();
        let m = call(&mut p, &mem, nr::MMAP, &[0, 4 * PAGE, 3, 0x22, u64::MAX, 0]);
        assert!(m > 0, "{m}");
        let m = m as u64;
        p.space.write_user(&mem, m + PAGE, &[7]).unwrap();
        let buf = crate::STACK_TOP - 0x1_0000;
        p.space.write_user(&mem, buf, &[9; 5]).unwrap();
        // 3 pages and a part of the 4th: 4 bytes, one per page.
        assert_eq!(call(&mut p, &mem, nr::MINCORE, &[m, 3 * PAGE + 1, buf]), 0);
        let mut b = [0u8; 5];
        p.space.read_user(&mem, buf, &mut b).unwrap();
        assert_eq!(b, [0, 1, 0, 0, 9]);
        assert_eq!(
            call(&mut p, &mem, nr::MINCORE, &[m + 1, PAGE, buf]),
            -EINVAL
        );
        // A range reaching past the mapping, or not mapped at all.
        assert_eq!(
            call(&mut p, &mem, nr::MINCORE, &[m, 5 * PAGE, buf]),
            -ENOMEM
        );
        assert_eq!(
            call(&mut p, &mem, nr::MINCORE, &[0x1000, PAGE, buf]),
            -ENOMEM
        );
        assert_eq!(
            call(&mut p, &mem, nr::MINCORE, &[m, u64::MAX - m, buf]),
            -ENOMEM
        );
        assert_eq!(call(&mut p, &mem, nr::MINCORE, &[m, PAGE, 0]), -EFAULT);
        // creat: write-only, created, truncated.
        let dir = std::env::temp_dir().join(format!("kvmsim-se-creat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, b"old contents").unwrap();
        let path = buf + 0x100;
        p.space
            .write_user(&mem, path, format!("{}\0", file.display()).as_bytes())
            .unwrap();
        let fd = call(&mut p, &mem, nr::CREAT, &[path, 0o644]);
        assert!(fd >= 3, "{fd}");
        assert_eq!(std::fs::read(&file).unwrap(), b"");
        p.space.write_user(&mem, buf, b"new").unwrap();
        assert_eq!(call(&mut p, &mem, nr::WRITE, &[fd as u64, buf, 3]), 3);
        assert_eq!(call(&mut p, &mem, nr::READ, &[fd as u64, buf, 3]), -EBADF);
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[fd as u64]), 0);
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn links_modes_and_times_reach_the_host_file_system() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let (mem, mut p) = process();
        let dir = std::env::temp_dir().join(format!("kvmsim-se-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), b"x").unwrap();
        let base = crate::STACK_TOP - 0x1_0000;
        let mut at = base;
        let mut put = |p: &mut Process, s: &str| {
            let va = at;
            p.space
                .write_user(&mem, va, format!("{s}\0").as_bytes())
                .unwrap();
            at += 0x200;
            va
        };
        let f = put(&mut p, &dir.join("f").to_string_lossy());
        let target = put(&mut p, "f");
        let sl = put(&mut p, &dir.join("s").to_string_lossy());
        let hl = put(&mut p, &dir.join("h").to_string_lossy());
        let times = at;
        let fd = AT_FDCWD as u64;
        // symlink keeps the target's text; link makes a second name.
        assert_eq!(call(&mut p, &mem, nr::SYMLINKAT, &[target, fd, sl]), 0);
        assert_eq!(
            std::fs::read_link(dir.join("s")).unwrap(),
            std::path::Path::new("f")
        );
        assert_eq!(call(&mut p, &mem, nr::SYMLINK, &[target, sl]), -EEXIST);
        assert_eq!(call(&mut p, &mem, nr::LINK, &[f, hl]), 0);
        assert_eq!(std::fs::metadata(dir.join("h")).unwrap().nlink(), 2);
        assert_eq!(call(&mut p, &mem, nr::LINKAT, &[fd, f, fd, hl, 1]), -EINVAL);
        // chmod, fchmodat, fchmod.
        assert_eq!(call(&mut p, &mem, nr::CHMOD, &[f, 0o600]), 0);
        let mode = |d: &std::path::Path| {
            std::fs::metadata(d.join("f")).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&dir), 0o600);
        assert_eq!(call(&mut p, &mem, nr::FCHMODAT, &[fd, f, 0o640]), 0);
        assert_eq!(mode(&dir), 0o640);
        let ffd = call(&mut p, &mem, nr::OPENAT, &[fd, f, 0]);
        assert!(ffd >= 3);
        assert_eq!(call(&mut p, &mem, nr::FCHMOD, &[ffd as u64, 0o604]), 0);
        assert_eq!(mode(&dir), 0o604);
        assert_eq!(
            call(&mut p, &mem, nr::FCHMODAT2, &[fd, f, 0o600, 2]),
            -EINVAL
        );
        // utimensat: given times, UTIME_OMIT, and UTIME_NOW as the
        // simulated wall clock (1 s + 5 s of simulated time in `call`).
        let ts = |p: &mut Process, a: (i64, i64), m: (i64, i64)| {
            let mut b = Vec::new();
            for v in [a.0, a.1, m.0, m.1] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            p.space.write_user(&mem, times, &b).unwrap();
        };
        let (now, omit) = ((1 << 30) - 1, (1 << 30) - 2);
        ts(&mut p, (100, 5), (200, 7));
        assert_eq!(call(&mut p, &mem, nr::UTIMENSAT, &[fd, f, times, 0]), 0);
        let md = std::fs::metadata(dir.join("f")).unwrap();
        assert_eq!(
            (md.atime(), md.atime_nsec(), md.mtime(), md.mtime_nsec()),
            (100, 5, 200, 7)
        );
        ts(&mut p, (0, omit), (0, now));
        assert_eq!(call(&mut p, &mem, nr::UTIMENSAT, &[fd, f, times, 0]), 0);
        let md = std::fs::metadata(dir.join("f")).unwrap();
        assert_eq!((md.atime(), md.mtime(), md.mtime_nsec()), (100, 6, 0));
        // A null path: the open file (futimens); times null: both now.
        ts(&mut p, (300, 0), (0, omit));
        assert_eq!(
            call(&mut p, &mem, nr::UTIMENSAT, &[ffd as u64, 0, times, 0]),
            0
        );
        assert_eq!(std::fs::metadata(dir.join("f")).unwrap().atime(), 300);
        assert_eq!(call(&mut p, &mem, nr::UTIMENSAT, &[fd, f, 0, 0]), 0);
        assert_eq!(std::fs::metadata(dir.join("f")).unwrap().atime(), 6);
        ts(&mut p, (0, 1_000_000_000), (0, 0));
        assert_eq!(
            call(&mut p, &mem, nr::UTIMENSAT, &[fd, f, times, 0]),
            -EINVAL
        );
        assert_eq!(
            call(&mut p, &mem, nr::UTIMENSAT, &[fd, f, times, 4]),
            -EINVAL
        );
        assert_eq!(
            call(&mut p, &mem, nr::UTIMENSAT, &[fd, f, 0x1000, 0]),
            -EFAULT
        );
        // getgroups: the process's one group.
        assert_eq!(call(&mut p, &mem, nr::GETGROUPS, &[0, 0]), 1);
        assert_eq!(call(&mut p, &mem, nr::GETGROUPS, &[4, times]), 1);
        let mut g = [0u8; 4];
        p.space.read_user(&mem, times, &mut g).unwrap();
        assert_eq!(u32::from_le_bytes(g), GID);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostile_pointers_are_efault() {
        let (mem, mut p) = process();
        let stack = crate::STACK_TOP - 0x100;
        for bad in [
            0,
            0x1000,
            0x40_0000,
            crate::ENTRY_VA + 0x1000,
            crate::KBASE,
            u64::MAX - 7,
            1 << 63,
        ] {
            // Into the program: write(1, bad, 8) reads it; clock_gettime writes it.
            let w = call(&mut p, &mem, nr::WRITE, &[1, bad, 8]);
            let c = call(&mut p, &mem, nr::CLOCK_GETTIME, &[1, bad]);
            let u = call(&mut p, &mem, nr::UNAME, &[bad]);
            let o = call(&mut p, &mem, nr::OPENAT, &[AT_FDCWD as u64, bad, 0, 0]);
            // The program's text is readable: only the writes fail there.
            if bad == 0x40_0000 {
                assert_eq!((w, c, u), (8, -EFAULT, -EFAULT), "{bad:#x}");
            } else {
                assert_eq!(
                    (w, c, u, o),
                    (-EFAULT, -EFAULT, -EFAULT, -EFAULT),
                    "{bad:#x}"
                );
            }
        }
        // A buffer that runs off the end of the stack, and an enormous count.
        assert_eq!(
            call(
                &mut p,
                &mem,
                nr::GETRANDOM,
                &[crate::STACK_TOP + crate::mm::PAGE - 8, 16]
            ),
            -EFAULT
        );
        assert_eq!(call(&mut p, &mem, nr::GETRANDOM, &[stack, 16]), 16);
        assert_eq!(
            call(&mut p, &mem, nr::READ, &[0, stack, u64::MAX]),
            0,
            "stdin is empty, the count is capped"
        );
        assert_eq!(
            call(&mut p, &mem, nr::WRITEV, &[1, stack, 1 << 40]),
            -EINVAL
        );
        assert_eq!(call(&mut p, &mem, nr::CLOSE, &[77]), -EBADF);
        assert_eq!(
            call(&mut p, &mem, nr::WRITE, &[(1u64 << 32) | 77, stack, 1]),
            -EBADF
        );
        // A path with no NUL within PATH_MAX.
        let long = vec![b'a'; 2 * PAGE as usize];
        let at = crate::STACK_TOP - 3 * PAGE;
        p.space.write_user(&mem, at, &long).unwrap();
        let r = call(&mut p, &mem, nr::OPENAT, &[AT_FDCWD as u64, at, 0, 0]);
        assert!(r == -EFAULT || r == -ENAMETOOLONG, "{r}");
    }

    #[test]
    fn memory_calls_keep_the_rules() {
        let (mem, mut p) = process();
        let brk0 = call(&mut p, &mem, nr::BRK, &[0]) as u64;
        assert_eq!(brk0, 0x40_1000, "brk starts after the program");
        assert_eq!(
            call(&mut p, &mem, nr::BRK, &[brk0 + 10000]) as u64,
            brk0 + 10000
        );
        assert_eq!(
            call(&mut p, &mem, nr::BRK, &[1]) as u64,
            brk0 + 10000,
            "below the start: unchanged"
        );
        let m = call(&mut p, &mem, nr::MMAP, &[0, 3 * PAGE, 3, 0x22, u64::MAX, 0]);
        assert!(
            m > 0 && (m as u64) < crate::MMAP_TOP && (m as u64).is_multiple_of(PAGE),
            "{m:#x}"
        );
        assert_eq!(
            call(&mut p, &mem, nr::MMAP, &[0, 0, 3, 0x22, u64::MAX, 0]),
            -EINVAL
        );
        assert_eq!(
            call(&mut p, &mem, nr::MMAP, &[0, 1 << 50, 3, 0x22, u64::MAX, 0]),
            -ENOMEM
        );
        assert_eq!(
            call(
                &mut p,
                &mem,
                nr::MMAP,
                &[0x1000, PAGE, 3, 0x32, u64::MAX, 0]
            ),
            -EPERM,
            "fixed below mmap_min_addr"
        );
        // The kernel stub and the sim-ops window cannot be unmapped or changed.
        assert_eq!(
            call(&mut p, &mem, nr::MUNMAP, &[crate::SIMOPS_VA, PAGE]),
            -EINVAL
        );
        assert_eq!(
            call(&mut p, &mem, nr::MPROTECT, &[crate::KBASE, PAGE, 7]),
            -EINVAL
        );
        assert_eq!(call(&mut p, &mem, nr::MPROTECT, &[m as u64, PAGE, 1]), 0);
        assert_eq!(p.space.write_user(&mem, m as u64, &[1]), Err(EFAULT));
        assert_eq!(
            call(&mut p, &mem, nr::MUNMAP, &[m as u64 + 1, PAGE]),
            -EINVAL,
            "unaligned"
        );
        assert_eq!(call(&mut p, &mem, nr::MUNMAP, &[m as u64, 3 * PAGE]), 0);
        assert!(p.space.vma_at(m as u64).is_none());
        // Filling RAM is ENOMEM, never a panic, and leaves nothing mapped.
        let maps = p.space.vmas.len();
        let big = call(
            &mut p,
            &mem,
            nr::MMAP,
            &[0, 64 << 20, 3, 0x22 | 0x8000, u64::MAX, 0],
        );
        assert_eq!(big, -ENOMEM);
        assert_eq!(p.space.vmas.len(), maps);
        // sbrk in small steps grows one mapping.
        let b = call(&mut p, &mem, nr::BRK, &[0]) as u64;
        for i in 1..100 {
            call(&mut p, &mem, nr::BRK, &[b + i * PAGE]);
        }
        assert_eq!(p.space.vmas.len(), maps);
        // Mappings are limited in number (each costs host memory).
        let mut last = 0;
        for _ in 0..crate::mm::MAX_MAPS + 1 {
            last = call(&mut p, &mem, nr::MMAP, &[0, PAGE, 0, 0x22, u64::MAX, 0]);
            if last < 0 {
                break;
            }
        }
        assert_eq!(last, -ENOMEM);
        assert!(p.space.vmas.len() <= crate::mm::MAX_MAPS);
    }

    #[test]
    fn time_and_sleep_are_simulated() {
        let (mem, mut p) = process();
        let ts = crate::STACK_TOP - 0x200;
        assert_eq!(call(&mut p, &mem, nr::CLOCK_GETTIME, &[1, ts]), 0);
        let mut b = [0u8; 16];
        p.space.read_user(&mem, ts, &mut b).unwrap();
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            5,
            "tick 5e12 is 5 s"
        );
        assert_eq!(
            call(&mut p, &mem, nr::TIME, &[0]),
            6,
            "realtime starts at 1 s"
        );
        let mut req = [0u8; 16];
        req[..8].copy_from_slice(&2u64.to_le_bytes());
        req[8..].copy_from_slice(&250_000_000u64.to_le_bytes());
        p.space.write_user(&mem, ts, &req).unwrap();
        let clock = Clock {
            now: 0,
            realtime_base_ns: 0,
        };
        let d = p
            .syscall(&mem, nr::NANOSLEEP, [ts, 0, 0, 0, 0, 0], clock)
            .unwrap();
        assert_eq!(d.sleep, 2_250_000_000_000);
        req[8..].copy_from_slice(&2_000_000_000u64.to_le_bytes());
        p.space.write_user(&mem, ts, &req).unwrap();
        assert_eq!(call(&mut p, &mem, nr::NANOSLEEP, &[ts, 0]), -EINVAL);
    }

    #[test]
    fn timers_and_signals_keep_linux_rules() {
        use crate::signal::{bit, SIGALRM, SIGCHLD, SIGUSR1};
        let (mem, mut p) = process();
        let clock = Clock {
            now: 5_000_000_000_000,
            realtime_base_ns: 0,
        };
        // alarm: none before; 3 s armed, 2.4 s later one is left (rounded).
        assert_eq!(call(&mut p, &mem, nr::ALARM, &[3]), 0);
        assert_eq!(p.itimer, Some((8_000_000_000_000, 0)));
        let later = Clock {
            now: 5_600_000_000_000,
            ..clock
        };
        let d = p.syscall(&mem, nr::ALARM, [0; 6], later).unwrap();
        assert_eq!(d.flow, Flow::Return(2), "2.4 s left rounds to 2");
        assert_eq!(p.itimer, None, "alarm(0) cancels");
        // The largest alarm saturates, never overflows.
        assert_eq!(call(&mut p, &mem, nr::ALARM, &[u64::from(u32::MAX)]), 0);
        assert!(call(&mut p, &mem, nr::ALARM, &[0]) > 18_000_000);
        // setitimer / getitimer round trip (ITIMER_REAL; others EINVAL).
        let at = crate::STACK_TOP - 0x400;
        let mut it = [0u8; 32];
        it[8..16].copy_from_slice(&250_000u64.to_le_bytes()); // interval 0.25 s
        it[16..24].copy_from_slice(&1u64.to_le_bytes()); // value 1 s
        p.space.write_user(&mem, at, &it).unwrap();
        assert_eq!(call(&mut p, &mem, nr::SETITIMER, &[0, at, 0]), 0);
        assert_eq!(call(&mut p, &mem, nr::SETITIMER, &[1, at, 0]), -EINVAL);
        assert_eq!(call(&mut p, &mem, nr::GETITIMER, &[0, at + 64]), 0);
        let mut back = [0u8; 32];
        p.space.read_user(&mem, at + 64, &mut back).unwrap();
        assert_eq!(back, it);
        // Expiry: SIGALRM pending, the timer re-armed past `now` (missed
        // periods skipped).
        p.expire(clock.now + 1_600_000_000_000);
        assert_eq!(p.pending, bit(SIGALRM));
        assert_eq!(
            p.itimer,
            Some((clock.now + 1_750_000_000_000, 250_000_000_000))
        );
        assert_eq!(p.next_signal(), Some(SIGALRM));
        p.t.sigmask = bit(SIGALRM);
        assert_eq!(p.next_signal(), None, "blocked");
        // A signal whose default is to ignore it is dropped when sent.
        p.pending = 0;
        p.t.sigmask = 0;
        assert_eq!(
            call(&mut p, &mem, nr::KILL, &[u64::from(PID), SIGCHLD as u64]),
            0
        );
        assert_eq!(p.pending, 0);
        assert_eq!(
            call(
                &mut p,
                &mem,
                nr::TGKILL,
                &[u64::from(PID), u64::from(PID), SIGUSR1 as u64]
            ),
            0
        );
        assert_eq!(p.t.pending, bit(SIGUSR1), "tgkill: the thread's own");
        p.t.pending = 0;
        assert_eq!(call(&mut p, &mem, nr::KILL, &[4242, 10]), -ESRCH);
        // pause with nothing that could end it ends the process.
        p.itimer = None;
        p.pending = 0;
        let d = p.syscall(&mem, nr::PAUSE, [0; 6], clock).unwrap();
        assert!(
            matches!(&d.flow, Flow::Exit { status: 137, message } if message.contains("nothing can send")),
            "{d:?}"
        );
        // sigaltstack: too small is ENOMEM; the old one reads back.
        let ss = crate::STACK_TOP - 0x800;
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&0x10_0000u64.to_le_bytes());
        b[16..].copy_from_slice(&1024u64.to_le_bytes());
        p.space.write_user(&mem, ss, &b).unwrap();
        assert_eq!(call(&mut p, &mem, nr::SIGALTSTACK, &[ss, 0]), -ENOMEM);
        b[16..].copy_from_slice(&8192u64.to_le_bytes());
        p.space.write_user(&mem, ss, &b).unwrap();
        assert_eq!(call(&mut p, &mem, nr::SIGALTSTACK, &[ss, 0]), 0);
        assert_eq!(call(&mut p, &mem, nr::SIGALTSTACK, &[0, ss + 32]), 0);
        let mut o = [0u8; 24];
        p.space.read_user(&mem, ss + 32, &mut o).unwrap();
        assert_eq!(o, b);
    }
}
