//! The process image: loading a static ELF, the initial stack, and the
//! process's state (memory, brk, files, identity, signal dispositions).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::elf::{self, Elf, PF_R, PF_W, PF_X, PT_LOAD};
use crate::mm::{
    AddressSpace, Backing, Frames, PhysMem, Vma, MMAP_MIN, PAGE, PROT_EXEC, PROT_READ, PROT_WRITE,
};
use crate::sys::Files;
use crate::*;

/// Auxiliary-vector keys (Linux's values).
pub const AT_NULL: u64 = 0;
pub const AT_PHDR: u64 = 3;
pub const AT_PHENT: u64 = 4;
pub const AT_PHNUM: u64 = 5;
pub const AT_PAGESZ: u64 = 6;
pub const AT_BASE: u64 = 7;
pub const AT_FLAGS: u64 = 8;
pub const AT_ENTRY: u64 = 9;
pub const AT_UID: u64 = 11;
pub const AT_EUID: u64 = 12;
pub const AT_GID: u64 = 13;
pub const AT_EGID: u64 = 14;
pub const AT_PLATFORM: u64 = 15;
pub const AT_HWCAP: u64 = 16;
pub const AT_CLKTCK: u64 = 17;
pub const AT_SECURE: u64 = 23;
pub const AT_RANDOM: u64 = 25;
pub const AT_HWCAP2: u64 = 26;
pub const AT_EXECFN: u64 = 31;

/// The most bytes of argument and environment strings (Linux: a quarter
/// of the 8 MiB stack limit).
pub const MAX_ARG_BYTES: usize = 2 << 20;

/// What a run gives the program.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The program as given (its path on the host).
    pub path: PathBuf,
    pub argv: Vec<String>,
    pub envp: Vec<String>,
    /// Seeds AT_RANDOM and getrandom.
    pub seed: u64,
    /// CPUID.1:EDX, for AT_HWCAP.
    pub hwcap: u64,
    /// How the program's paths reach the host (redirects, sysroot).
    pub paths: PathMap,
    /// A dynamically linked program's interpreter ([`find_interp`]).
    pub interp: Option<Interp>,
    /// CPUs (threads that may run at once), 1 to [`MAX_SE_CPUS`]: each
    /// gets a TSS and a kernel stack of its own.
    pub cpus: usize,
}

/// A dynamically linked program's interpreter (ld.so), read from the host.
#[derive(Debug, Clone)]
pub struct Interp {
    /// PT_INTERP's path.
    pub name: String,
    /// Where it was found on the host.
    pub host: PathBuf,
    pub image: Vec<u8>,
    pub elf: Elf,
}

/// Reads and checks the interpreter `program` (parsed as `elf`) names,
/// looked up through `paths`; `None` for a static program.
pub fn find_interp(elf: &Elf, paths: &PathMap, program: &Path) -> Result<Option<Interp>, String> {
    let Some(name) = &elf.interp else {
        return Ok(None);
    };
    let host = paths.host(Path::new(name));
    let which = if host.as_os_str() == std::ffi::OsStr::new(name) {
        name.clone()
    } else {
        format!("{name} (looked up as {})", host.display())
    };
    let image = read_interp(&host).map_err(|e| {
        format!(
            "{}: its interpreter {which}: {e}; give the folder that holds it with --sysroot or --redirect",
            program.display()
        )
    })?;
    let ie = elf::parse(&image, &host.to_string_lossy())
        .map_err(|e| format!("{}: its interpreter: {e}", program.display()))?;
    if ie.interp.is_some() || ie.kind != elf::ET_DYN {
        return Err(format!(
            "{}: its interpreter {which} is not a position-independent loader without an interpreter of its own",
            program.display()
        ));
    }
    Ok(Some(Interp {
        name: name.clone(),
        host,
        image,
        elf: ie,
    }))
}

/// How a path the program names becomes a host path (gem5's path
/// redirects and QEMU's `-L` sysroot): the longest redirect whose guest
/// folder holds the path replaces that folder by its host folder;
/// otherwise, with a sysroot, an absolute path that exists inside the
/// sysroot (symbolic links followed inside it) is taken from there;
/// otherwise the host's own path is used.
#[derive(Debug, Clone, Default)]
pub struct PathMap {
    /// (guest folder or file, host folder or file), both absolute.
    pub redirects: Vec<(PathBuf, PathBuf)>,
    pub sysroot: Option<PathBuf>,
}

/// The most symbolic links followed resolving one path in the sysroot
/// (Linux's MAXSYMLINKS).
const MAX_LINKS: u32 = 40;

impl PathMap {
    /// From the config's `GUEST=HOST` redirects and sysroot: GUEST must be
    /// absolute; HOST and the sysroot are taken as given (relative to
    /// kvmsim's working folder when relative).
    pub fn from_config(redirects: &[String], sysroot: Option<&str>) -> Result<PathMap, String> {
        let mut map = PathMap {
            redirects: Vec::new(),
            sysroot: sysroot.map(PathBuf::from),
        };
        for r in redirects {
            let Some((g, h)) = r.split_once('=') else {
                return Err(format!("redirect {r:?}: expected GUEST=HOST"));
            };
            if !g.starts_with('/') || h.is_empty() {
                return Err(format!(
                    "redirect {r:?}: GUEST must be an absolute path and HOST a path"
                ));
            }
            let host = std::path::absolute(h).unwrap_or_else(|_| PathBuf::from(h));
            map.redirects.push((PathBuf::from(g), host));
        }
        if let Some(root) = &mut map.sysroot {
            if root.as_os_str().is_empty() {
                return Err("the sysroot is an empty path".into());
            }
            *root = std::path::absolute(&*root).unwrap_or_else(|_| root.clone());
        }
        Ok(map)
    }

    /// The host path for the program's `guest` path.
    pub fn host(&self, guest: &Path) -> PathBuf {
        if !guest.is_absolute() {
            return guest.to_path_buf();
        }
        let best = self
            .redirects
            .iter()
            .filter(|(g, _)| guest.starts_with(g))
            .max_by_key(|(g, _)| g.components().count());
        if let Some((g, h)) = best {
            return match guest.strip_prefix(g) {
                Ok(rest) if !rest.as_os_str().is_empty() => h.join(rest),
                _ => h.clone(),
            };
        }
        if let Some(root) = &self.sysroot {
            if let Some(p) = Self::in_root(root, guest) {
                return p;
            }
        }
        guest.to_path_buf()
    }

    /// `guest` inside `root`, following symbolic links as if `root` were
    /// `/`; `None` if some part of it does not exist there.
    fn in_root(root: &Path, guest: &Path) -> Option<PathBuf> {
        fn parts(p: &Path) -> VecDeque<OsString> {
            p.components()
                .filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_os_string()),
                    Component::ParentDir => Some("..".into()),
                    _ => None,
                })
                .collect()
        }
        let mut todo = parts(guest);
        let mut cur = PathBuf::new();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                cur.pop();
                continue;
            }
            let cand = cur.join(&c);
            let full = root.join(&cand);
            let meta = std::fs::symlink_metadata(&full).ok()?;
            if meta.file_type().is_symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                let target = std::fs::read_link(&full).ok()?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                let mut next = parts(&target);
                next.extend(todo);
                todo = next;
            } else {
                cur = cand;
            }
        }
        Some(root.join(cur))
    }
}

/// The first state of the process's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rip: u64,
    pub rsp: u64,
    pub cr3: u64,
}

/// A splitmix64 generator: AT_RANDOM and getrandom repeat from run to run
/// for a given seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6b76_6d73_696d_5345)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The initial stack as Linux lays it out, below `top`: argc, argv
/// pointers, NULL, envp pointers, NULL, auxv pairs ending in AT_NULL,
/// then (higher) the 16 AT_RANDOM bytes, the platform string, the argument
/// and environment strings and the executable's name. `auxv` holds the
/// entries that do not point into the stack; AT_RANDOM, AT_PLATFORM and
/// AT_EXECFN are added here. Returns the stack pointer (16-byte aligned)
/// and the bytes from there to `top`.
pub fn build_stack(
    top: u64,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    execfn: &[u8],
    auxv: &[(u64, u64)],
    random: [u8; 16],
) -> Result<(u64, Vec<u8>), String> {
    let strings: usize =
        argv.iter().chain(envp).map(|s| s.len() + 1).sum::<usize>() + execfn.len() + 1;
    if strings > MAX_ARG_BYTES {
        return Err(format!(
            "the arguments and environment take {strings} bytes; at most {MAX_ARG_BYTES} fit (E2BIG)"
        ));
    }
    // Strings from the top down; an 8-byte zero end marker at the very top.
    let mut p = top - 8;
    let mut hi: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut push = |p: &mut u64, bytes: &[u8]| -> u64 {
        *p -= bytes.len() as u64;
        hi.push((*p, bytes.to_vec()));
        *p
    };
    let z = |s: &[u8]| {
        let mut v = s.to_vec();
        v.push(0);
        v
    };
    let execfn_at = push(&mut p, &z(execfn));
    let env_at: Vec<u64> = envp
        .iter()
        .rev()
        .map(|s| push(&mut p, &z(s)))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let arg_at: Vec<u64> = argv
        .iter()
        .rev()
        .map(|s| push(&mut p, &z(s)))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let platform_at = push(&mut p, b"x86_64\0");
    p &= !15;
    let random_at = push(&mut p, &random);
    let mut aux: Vec<(u64, u64)> = auxv.to_vec();
    aux.push((AT_RANDOM, random_at));
    aux.push((AT_PLATFORM, platform_at));
    aux.push((AT_EXECFN, execfn_at));
    aux.push((AT_NULL, 0));
    let words = 1 + argv.len() + 1 + envp.len() + 1 + 2 * aux.len();
    let sp = (p - 8 * words as u64) & !15;
    let mut out = vec![0u8; (top - sp) as usize];
    let mut put = |at: u64, bytes: &[u8]| {
        let o = (at - sp) as usize;
        out[o..o + bytes.len()].copy_from_slice(bytes);
    };
    let mut w = sp;
    let mut word = |v: u64| {
        let at = w;
        w += 8;
        (at, v)
    };
    let mut table = vec![word(argv.len() as u64)];
    table.extend(arg_at.iter().map(|&a| word(a)));
    table.push(word(0));
    table.extend(env_at.iter().map(|&a| word(a)));
    table.push(word(0));
    for (k, v) in aux {
        table.push(word(k));
        table.push(word(v));
    }
    for (at, v) in table {
        put(at, &v.to_le_bytes());
    }
    for (at, bytes) in hi {
        put(at, &bytes);
    }
    Ok((sp, out))
}

/// A process.
pub struct Process {
    pub space: AddressSpace,
    pub brk_start: u64,
    pub brk: u64,
    /// The lowest address an mmap was placed at (the next goes below it).
    pub mmap_low: u64,
    pub files: Files,
    /// The program's absolute path (readlink /proc/self/exe).
    pub exe: PathBuf,
    pub rng: Rng,
    pub sigactions: std::collections::BTreeMap<u64, [u8; 32]>,
    /// Signals sent to the process (kill, the timer) and not yet
    /// delivered (bit `sig - 1`); any thread that does not block one may
    /// take it.
    pub pending: u64,
    /// ITIMER_REAL (alarm, setitimer): the next expiry and the interval
    /// (0: once), in simulated time.
    pub itimer: Option<(sim::Tick, sim::Tick)>,
    /// The thread whose system call or exception is being serviced (the
    /// device swaps the others in and out: `dev::SeDevice`).
    pub t: ThreadState,
    /// How the program's paths reach the host.
    pub paths: PathMap,
    /// The working folder (a host path; kvmsim's own at the start).
    pub cwd: PathBuf,
    /// CPUs the process may run threads on (sched_getaffinity).
    pub cpus: usize,
    /// The tables a CPU with no thread to run idles on
    /// ([`AddressSpace::park_root`]).
    pub park_cr3: u64,
    /// Wait keys of pipes that changed (data, room, an end closed): the
    /// device wakes their waiters after the call.
    pub pipe_events: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    /// The id of the last pipe or eventfd made.
    pub next_pipe: u64,
    /// Items in all the process's epoll sets (bounded by
    /// [`crate::epoll::MAX_WATCHES`]).
    pub epoll_watches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// What the call being serviced would block on (wait key, descriptor),
    /// with [`crate::sys::ERESTARTSYS`].
    pub blocked: Option<(u64, u32, Option<sim::Tick>)>,
}

/// What each thread has of its own.
#[derive(Debug, Clone, Default)]
pub struct ThreadState {
    /// Its thread id (the main thread's is the process id).
    pub tid: u32,
    /// FS base (arch_prctl, CLONE_SETTLS): its TLS.
    pub fs_base: u64,
    pub sigmask: u64,
    /// Signals sent to this thread (tgkill, tkill) and not yet delivered.
    pub pending: u64,
    /// The alternate signal stack (sigaltstack): base and size.
    pub altstack: Option<(u64, u64)>,
    /// The mask to put back once a handler returns from a sigsuspend.
    pub suspend_mask: Option<u64>,
    /// RSP at the system call being serviced.
    pub user_rsp: u64,
    /// set_tid_address / CLONE_CHILD_CLEARTID: zeroed and woken (futex)
    /// when the thread exits.
    pub tid_address: u64,
    pub robust_list: u64,
    /// The thread's name (prctl PR_SET_NAME), NUL-padded.
    pub comm: [u8; 16],
    /// Bytes a blocking pipe write already wrote before it waited: the
    /// call, made again, goes on after them and returns them too.
    pub pipe_done: u64,
    /// Its pending SIGPIPE came from a write to a pipe without readers.
    pub sigpipe: bool,
    /// The deadline of a poll that waits (kept when it is made again).
    pub poll_deadline: Option<sim::Tick>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("exe", &self.exe)
            .field("brk", &self.brk)
            .finish()
    }
}

fn prot_of(flags: u32) -> u32 {
    let mut p = 0;
    if flags & PF_R != 0 {
        p |= PROT_READ;
    }
    if flags & PF_W != 0 {
        p |= PROT_WRITE;
    }
    if flags & PF_X != 0 {
        p |= PROT_EXEC;
    }
    p
}

impl Process {
    /// Builds the process image of `image` (parsed as `elf`) in `mem`,
    /// whose RAM is `regions`; the kernel stub's GDT is `gdt` (kvmsim's
    /// selectors, TSS at [`TSS_VA`]).
    pub fn load(
        mem: &dyn PhysMem,
        regions: &[(u64, u64)],
        image: &[u8],
        elf: &Elf,
        cfg: &ProcessConfig,
        gdt: &[u64; 10],
        files: Files,
    ) -> Result<(Process, Entry), String> {
        let oom = || "guest RAM is too small for the process image (raise --memory)".to_string();
        // Page 0 stays unused.
        let regions: Vec<(u64, u64)> = regions
            .iter()
            .map(|&(b, s)| {
                if b == 0 {
                    (PAGE, s.saturating_sub(PAGE))
                } else {
                    (b, s)
                }
            })
            .collect();
        let mut frames = Frames::new(&regions);
        // The kernel stub's pages.
        let mut kpage = |bytes: &[u8]| -> Result<u64, String> {
            let f = frames.alloc(mem).ok_or_else(oom)?;
            mem.write(f, bytes);
            Ok(f)
        };
        let mut gdt_page = vec![0u8; PAGE as usize];
        for (i, e) in gdt.iter().enumerate() {
            gdt_page[8 * i..8 * i + 8].copy_from_slice(&e.to_le_bytes());
        }
        // TSS: RSP0 at +4, I/O map base past the end.
        let t = (TSS_VA - GDT_VA) as usize;
        gdt_page[t + 4..t + 12].copy_from_slice(&KSTACK_TOP.to_le_bytes());
        gdt_page[t + 0x66..t + 0x68].copy_from_slice(&0x68u16.to_le_bytes());
        let gdt_f = kpage(&gdt_page)?;
        let mut idt = vec![0u8; PAGE as usize];
        for v in 0..IDT_VECTORS {
            // int3 and into may be used from user mode (SIGTRAP, not SIGSEGV).
            let dpl = if v == 3 || v == 4 { 3 } else { 0 };
            idt[16 * v as usize..16 * v as usize + 16]
                .copy_from_slice(&idt_gate(TRAPS_VA + 16 * v, dpl));
        }
        let idt_f = kpage(&idt)?;
        let traps_f = kpage(&trap_stubs())?;
        let entry_f = kpage(&entry_page())?;
        let mut kstack = Vec::new();
        for _ in 0..4 {
            kstack.push(kpage(&[0u8; PAGE as usize])?);
        }
        // Threads: the park page, and for CPUs 1 and up a TSS each (RSP0
        // = its own kernel stack) and a kernel stack of 2 pages.
        let cpus = cfg.cpus.clamp(1, MAX_SE_CPUS);
        let park_f = kpage(&park_page())?;
        let tss_bytes = 0x80 * cpus;
        let mut tss_area = vec![0u8; tss_bytes.div_ceil(PAGE as usize) * PAGE as usize];
        for c in 1..cpus {
            let o = (tss_va(c) - TSS_AREA_VA) as usize;
            tss_area[o + 4..o + 12].copy_from_slice(&kstack_top(c).to_le_bytes());
            tss_area[o + 0x66..o + 0x68].copy_from_slice(&0x68u16.to_le_bytes());
        }
        let mut tss_frames = Vec::new();
        if cpus > 1 {
            for chunk in tss_area.chunks(PAGE as usize) {
                tss_frames.push(kpage(chunk)?);
            }
        }
        let mut ap_stacks = Vec::new();
        for c in 1..cpus {
            let top = kstack_top(c);
            for i in 0..2u64 {
                ap_stacks.push((top - PAGE * (2 - i), kpage(&[0u8; PAGE as usize])?));
            }
        }
        let mut space = AddressSpace::new(mem, frames).ok_or_else(oom)?;
        let fixed = |phys: u64, end: u64, prot: u32, kernel: bool, uncached: bool, name| Vma {
            end,
            prot,
            backing: Backing::Fixed { phys, uncached },
            kernel,
            name,
        };
        let map = |space: &mut AddressSpace, at: u64, v: Vma| {
            space
                .map(mem, at, v)
                .map_err(|e| format!("cannot map the kernel stub at {at:#x}: errno {e}"))
        };
        map(
            &mut space,
            GDT_VA,
            fixed(
                gdt_f,
                GDT_VA + PAGE,
                PROT_READ | PROT_WRITE,
                true,
                false,
                "gdt",
            ),
        )?;
        map(
            &mut space,
            IDT_VA,
            fixed(idt_f, IDT_VA + PAGE, PROT_READ, true, false, "idt"),
        )?;
        map(
            &mut space,
            TRAPS_VA,
            fixed(
                traps_f,
                TRAPS_VA + PAGE,
                PROT_READ | PROT_EXEC,
                true,
                false,
                "traps",
            ),
        )?;
        map(
            &mut space,
            ENTRY_VA,
            fixed(
                entry_f,
                ENTRY_VA + PAGE,
                PROT_READ | PROT_EXEC,
                false,
                false,
                "[syscall]",
            ),
        )?;
        for (i, f) in kstack.iter().enumerate() {
            let va = KSTACK_VA + PAGE * i as u64;
            map(
                &mut space,
                va,
                fixed(*f, va + PAGE, PROT_READ | PROT_WRITE, true, false, "kstack"),
            )?;
        }
        map(
            &mut space,
            PARK_VA,
            fixed(
                park_f,
                PARK_VA + PAGE,
                PROT_READ | PROT_EXEC,
                false,
                false,
                "[park]",
            ),
        )?;
        for (i, f) in tss_frames.iter().enumerate() {
            let va = TSS_AREA_VA + PAGE * i as u64;
            map(
                &mut space,
                va,
                fixed(*f, va + PAGE, PROT_READ | PROT_WRITE, true, false, "tss"),
            )?;
        }
        for &(va, f) in &ap_stacks {
            map(
                &mut space,
                va,
                fixed(f, va + PAGE, PROT_READ | PROT_WRITE, true, false, "kstack"),
            )?;
        }
        map(
            &mut space,
            MMIO_VA,
            fixed(
                SE_MMIO_BASE,
                MMIO_VA + PAGE,
                PROT_READ | PROT_WRITE,
                false,
                true,
                "[se]",
            ),
        )?;
        map(
            &mut space,
            FAULT_VA,
            fixed(
                SE_MMIO_BASE + FAULT_DOORBELL,
                FAULT_VA + PAGE,
                PROT_READ | PROT_WRITE,
                true,
                true,
                "[se-fault]",
            ),
        )?;
        map(
            &mut space,
            SIMOPS_VA,
            fixed(
                SIMOPS_PHYS,
                SIMOPS_VA + SIMOPS_SIZE,
                PROT_READ | PROT_WRITE,
                false,
                true,
                "[simops]",
            ),
        )?;

        let bias = if elf.kind == elf::ET_DYN {
            PIE_BASE - elf.span().0
        } else {
            0
        };
        let brk_start = load_segments(&mut space, mem, image, elf, bias, &cfg.path, "[program]")?;
        // A dynamically linked program: its interpreter (ld.so) is loaded
        // too, where an mmap would go, and runs first (AT_BASE says where
        // it is, AT_PHDR and AT_ENTRY where the program is).
        let (start_rip, interp_base) = match &cfg.interp {
            None => (elf.entry + bias, 0),
            Some(i) => {
                let (lo, hi) = i.elf.span();
                let base = space
                    .find_free(hi - lo, MMAP_MIN, MMAP_TOP)
                    .ok_or_else(oom)?;
                load_segments(
                    &mut space,
                    mem,
                    &i.image,
                    &i.elf,
                    base - lo,
                    &i.host,
                    "[interp]",
                )?;
                (i.elf.entry + base - lo, base)
            }
        };

        // The stack: 8 MiB reserved, pages appear as touched.
        let stack_lo = STACK_TOP + PAGE - STACK_SIZE;
        let v = Vma {
            end: STACK_TOP + PAGE,
            prot: PROT_READ | PROT_WRITE,
            backing: Backing::Anon,
            kernel: false,
            name: "[stack]",
        };
        space
            .map(mem, stack_lo, v)
            .map_err(|e| format!("cannot map the stack: errno {e}"))?;
        let mut rng = Rng::new(cfg.seed);
        let mut random = [0u8; 16];
        rng.fill(&mut random);
        let auxv = [
            (AT_PHDR, elf.phdr_addr(bias)),
            (AT_PHENT, u64::from(elf.phentsize)),
            (AT_PHNUM, elf.phdrs.len() as u64),
            (AT_PAGESZ, PAGE),
            (AT_BASE, interp_base),
            (AT_FLAGS, 0),
            (AT_ENTRY, elf.entry + bias),
            (AT_UID, u64::from(crate::sys::UID)),
            (AT_EUID, u64::from(crate::sys::UID)),
            (AT_GID, u64::from(crate::sys::GID)),
            (AT_EGID, u64::from(crate::sys::GID)),
            (AT_SECURE, 0),
            (AT_HWCAP, cfg.hwcap),
            (AT_HWCAP2, 0),
            (AT_CLKTCK, 100),
        ];
        let argv: Vec<Vec<u8>> = cfg.argv.iter().map(|s| s.as_bytes().to_vec()).collect();
        let envp: Vec<Vec<u8>> = cfg.envp.iter().map(|s| s.as_bytes().to_vec()).collect();
        let execfn = cfg
            .argv
            .first()
            .map_or(Vec::new(), |s| s.as_bytes().to_vec());
        let execfn = if execfn.is_empty() {
            cfg.path.to_string_lossy().as_bytes().to_vec()
        } else {
            execfn
        };
        let (sp, bytes) = build_stack(STACK_TOP, &argv, &envp, &execfn, &auxv, random)?;
        space.poke(mem, sp, &bytes).map_err(|_| oom())?;
        let exe = std::path::absolute(&cfg.path).unwrap_or_else(|_| cfg.path.clone());
        let park_cr3 = space.park_root(mem).ok_or_else(oom)?;
        let cr3 = space.cr3();
        let paths = cfg.paths.clone();
        Ok((
            Process {
                space,
                brk_start,
                brk: brk_start,
                mmap_low: if interp_base != 0 {
                    interp_base
                } else {
                    MMAP_TOP
                },
                files,
                exe,
                rng,
                sigactions: Default::default(),
                pending: 0,
                itimer: None,
                paths,
                cwd: std::env::current_dir().unwrap_or_else(|_| "/".into()),
                cpus,
                park_cr3,
                pipe_events: Default::default(),
                next_pipe: 0,
                epoll_watches: Default::default(),
                blocked: None,
                t: ThreadState {
                    tid: crate::sys::PID,
                    comm: {
                        let mut c = [0u8; 16];
                        let base = cfg
                            .path
                            .file_name()
                            .map(|n| n.as_encoded_bytes().to_vec())
                            .unwrap_or_default();
                        let k = base.len().min(15);
                        c[..k].copy_from_slice(&base[..k]);
                        c
                    },
                    ..Default::default()
                },
            },
            Entry {
                rip: start_rip,
                rsp: sp,
                cr3,
            },
        ))
    }
}

/// The largest interpreter read (glibc's ld.so is about 200 KiB).
const MAX_INTERP: u64 = 64 << 20;

fn read_interp(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_INTERP {
        return Err(format!(
            "{} bytes; an interpreter of at most {MAX_INTERP} is loaded",
            meta.len()
        ));
    }
    std::fs::read(path).map_err(|e| e.to_string())
}

/// Maps the PT_LOAD segments of `elf` (the file `path`, bytes `image`)
/// at `bias`, page by page with the union of the protections of the
/// segments sharing a page, and copies their file bytes in. Returns the
/// end of the highest page (where brk starts).
fn load_segments(
    space: &mut AddressSpace,
    mem: &dyn PhysMem,
    image: &[u8],
    elf: &Elf,
    bias: u64,
    path: &Path,
    name: &'static str,
) -> Result<u64, String> {
    let cfg_path = path;
    let oom = || "guest RAM is too small for the process image (raise --memory)".to_string();
    let mut pages: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    for p in elf
        .phdrs
        .iter()
        .filter(|p| p.kind == PT_LOAD && p.memsz > 0)
    {
        let lo = (p.vaddr + bias) & !(PAGE - 1);
        let hi = (p.vaddr + bias + p.memsz + PAGE - 1) & !(PAGE - 1);
        if lo < MMAP_MIN {
            return Err(format!(
                "{}: segment at {:#x} lies below {MMAP_MIN:#x} (Linux's mmap_min_addr)",
                cfg_path.display(),
                p.vaddr
            ));
        }
        if hi.saturating_sub(lo) > 1 << 36 {
            return Err(format!(
                "{}: a segment of {:#x} bytes",
                cfg_path.display(),
                p.memsz
            ));
        }
        for va in (lo..hi).step_by(PAGE as usize) {
            *pages.entry(va).or_insert(0) |= prot_of(p.flags);
        }
    }
    let mut run: Option<(u64, u64, u32)> = None;
    let mut runs = Vec::new();
    for (&va, &prot) in &pages {
        match &mut run {
            Some((_, end, p)) if *end == va && *p == prot => *end += PAGE,
            _ => {
                runs.extend(run.take());
                run = Some((va, va + PAGE, prot));
            }
        }
    }
    runs.extend(run);
    for (start, end, prot) in runs {
        let v = Vma {
            end,
            prot,
            backing: Backing::Anon,
            kernel: false,
            name,
        };
        space.map(mem, start, v).map_err(|e| {
            format!(
                "{}: cannot map a segment at {start:#x}: errno {e}",
                cfg_path.display()
            )
        })?;
    }
    for p in elf
        .phdrs
        .iter()
        .filter(|p| p.kind == PT_LOAD && p.filesz > 0)
    {
        let data = &image[p.offset as usize..(p.offset + p.filesz) as usize];
        space.poke(mem, p.vaddr + bias, data).map_err(|_| oom())?;
    }
    Ok(pages.keys().next_back().map_or(0, |&v| v + PAGE))
}

/// Keeps `Arc` in scope for users of [`Backing::File`].
pub type SharedFile = Arc<std::fs::File>;

#[cfg(test)]
mod tests {
    use super::*;

    fn word(b: &[u8], sp: u64, at: u64) -> u64 {
        let o = (at - sp) as usize;
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn cstr(b: &[u8], sp: u64, at: u64) -> String {
        let o = (at - sp) as usize;
        let end = b[o..].iter().position(|&c| c == 0).unwrap();
        String::from_utf8(b[o..o + end].to_vec()).unwrap()
    }

    #[test]
    fn the_stack_is_laid_out_as_linux_does() {
        let top = 0x7fff_ffff_e000;
        let argv = vec![b"prog".to_vec(), b"a b".to_vec()];
        let envp = vec![b"X=1".to_vec()];
        let (sp, b) = build_stack(
            top,
            &argv,
            &envp,
            b"prog",
            &[(AT_PAGESZ, 4096), (AT_ENTRY, 0x401000)],
            [7; 16],
        )
        .unwrap();
        assert_eq!(sp % 16, 0);
        assert_eq!(sp + b.len() as u64, top);
        assert_eq!(word(&b, sp, sp), 2, "argc");
        assert_eq!(cstr(&b, sp, word(&b, sp, sp + 8)), "prog");
        assert_eq!(cstr(&b, sp, word(&b, sp, sp + 16)), "a b");
        assert_eq!(word(&b, sp, sp + 24), 0, "argv ends");
        assert_eq!(cstr(&b, sp, word(&b, sp, sp + 32)), "X=1");
        assert_eq!(word(&b, sp, sp + 40), 0, "envp ends");
        let mut aux = std::collections::BTreeMap::new();
        let mut at = sp + 48;
        loop {
            let (k, v) = (word(&b, sp, at), word(&b, sp, at + 8));
            at += 16;
            if k == AT_NULL {
                break;
            }
            aux.insert(k, v);
        }
        assert_eq!(aux[&AT_PAGESZ], 4096);
        assert_eq!(aux[&AT_ENTRY], 0x401000);
        assert_eq!(cstr(&b, sp, aux[&AT_PLATFORM]), "x86_64");
        assert_eq!(cstr(&b, sp, aux[&AT_EXECFN]), "prog");
        let r = aux[&AT_RANDOM];
        assert_eq!(&b[(r - sp) as usize..(r - sp) as usize + 16], &[7; 16]);
        assert_eq!(word(&b, sp, top - 8), 0, "end marker");
    }

    #[test]
    fn too_many_argument_bytes_are_refused() {
        let big = vec![vec![b'x'; MAX_ARG_BYTES]];
        let e = build_stack(0x7fff_ffff_e000, &big, &[], b"p", &[], [0; 16]).unwrap_err();
        assert!(e.contains("E2BIG"), "{e}");
    }

    #[test]
    fn paths_go_through_redirects_then_the_sysroot() {
        let root = std::env::temp_dir().join(format!("se-pathmap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("lib/real")).unwrap();
        std::fs::write(root.join("lib/real/ld.so"), "x").unwrap();
        // An absolute link, as Debian's /lib64 -> /lib/... ones: followed
        // inside the sysroot, never out to the host's /lib.
        std::os::unix::fs::symlink("/lib/real", root.join("lib64")).unwrap();
        std::os::unix::fs::symlink("../lib/real/ld.so", root.join("lib/rel")).unwrap();
        let m = PathMap::from_config(
            &[
                "/g=/h".into(),
                "/g/deep=/other".into(),
                "/f=/host/file".into(),
            ],
            Some(root.to_str().unwrap()),
        )
        .unwrap();
        let h = |p: &str| m.host(Path::new(p));
        assert_eq!(h("/g/a/b"), Path::new("/h/a/b"));
        assert_eq!(h("/g/deep/c"), Path::new("/other/c"), "the longest wins");
        assert_eq!(h("/gx/a"), Path::new("/gx/a"), "whole components only");
        assert_eq!(h("/f"), Path::new("/host/file"), "a file, no slash added");
        assert_eq!(h("/lib64/ld.so"), root.join("lib/real/ld.so"));
        assert_eq!(h("/lib/rel"), root.join("lib/real/ld.so"));
        assert_eq!(h("/etc/passwd"), Path::new("/etc/passwd"), "not in it");
        assert_eq!(h("rel/x"), Path::new("rel/x"), "relative: untouched");
        // A loop of links is not followed forever.
        std::os::unix::fs::symlink("/loop", root.join("loop")).unwrap();
        assert_eq!(h("/loop"), Path::new("/loop"));
        for bad in ["g=/h", "/g", "/g="] {
            assert!(PathMap::from_config(&[bad.into()], None).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_generator_repeats_for_a_seed() {
        let (mut a, mut b, mut c) = (Rng::new(1), Rng::new(1), Rng::new(2));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(a.next_u64(), c.next_u64());
    }
}
