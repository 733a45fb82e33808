//! Syscall-emulation mode (`kvmsim se`): real programs nobody here wrote
//! (busybox-static's applets, the host's coreutils), C programs compiled
//! here (tests/se/*.c: `gcc -static`, gcc against the host's glibc, and
//! `musl-gcc -static`), and bad input. Output is compared with a native
//! run of the same binary.
//!
//! busybox comes from `KVMSIM_BUSYBOX`, `/bin/busybox` (if statically
//! linked), `target/linux-guest/busybox/bin/busybox`, or is fetched once
//! into `target/se-cache` with `apt-get download busybox-static` (as
//! scripts/linux-guest.sh does). gcc is needed for the C program. Where
//! gcc, or both apt-get and `KVMSIM_BUSYBOX`, were missing when the tests
//! were built, the tests that need them are ignored with the reason (see
//! build.rs), and so are the musl tests where musl-gcc (musl-tools) was
//! missing; otherwise a tool that cannot be had is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::*;

fn is_static_elf(p: &Path) -> bool {
    // A static executable has no PT_INTERP: ask the loader-free way, by
    // looking for the interpreter path in the program headers' region.
    let Ok(b) = std::fs::read(p) else {
        return false;
    };
    b.starts_with(b"\x7fELF")
        && b.get(4) == Some(&2)
        && !b[..b.len().min(4096)]
            .windows(10)
            .any(|w| w == b"/lib64/ld-")
}

/// A static busybox, or why there is none.
fn busybox() -> Result<PathBuf, String> {
    static BB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BB.get_or_init(|| {
        if let Some(p) = std::env::var_os("KVMSIM_BUSYBOX") {
            return Ok(PathBuf::from(p));
        }
        let target = repo().join("target");
        for p in [
            PathBuf::from("/bin/busybox"),
            target.join("linux-guest/busybox/bin/busybox"),
            target.join("se-cache/bb/bin/busybox"),
        ] {
            if is_static_elf(&p) {
                return Ok(p);
            }
        }
        let cache = target.join("se-cache");
        let tmp = target.join(format!("se-cache.tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
        let fetched = Command::new("sh")
            .arg("-c")
            .arg("apt-get download busybox-static && dpkg-deb -x busybox-static_*.deb bb")
            .current_dir(&tmp)
            .output()
            .map_err(|e| format!("cannot run sh: {e}"))?;
        if !fetched.status.success() || !is_static_elf(&tmp.join("bb/bin/busybox")) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(format!(
                "no static busybox here and `apt-get download busybox-static` failed: {}",
                String::from_utf8_lossy(&fetched.stderr).trim()
            ));
        }
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::rename(&tmp, &cache).map_err(|e| e.to_string())?;
        Ok(cache.join("bb/bin/busybox"))
    })
    .clone()
}

/// The test C program, built once with `gcc -static`.
fn prog() -> Result<PathBuf, String> {
    static P: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    P.get_or_init(|| build_c("prog")).clone()
}

/// The signals test program (tests/se/signals.c), built once.
fn signals_prog() -> Result<PathBuf, String> {
    static P: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    P.get_or_init(|| build_c("signals")).clone()
}

/// Builds tests/se/NAME.c with `gcc -static`.
fn build_c(name: &str) -> Result<PathBuf, String> {
    build_c_with(name, true)
}

/// Builds tests/se/NAME.c with gcc, statically linked or not.
fn build_c_with(name: &str, static_link: bool) -> Result<PathBuf, String> {
    build_c_as(name, if static_link { Cc::Static } else { Cc::Dynamic })
}

/// How a test program is compiled and linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Cc {
    /// `gcc -static` (glibc).
    Static,
    /// gcc, dynamically linked against the host's glibc.
    Dynamic,
    /// `musl-gcc -static` (Debian's musl-tools).
    Musl,
}

/// Builds tests/se/NAME.c as `cc` says.
fn build_c_as(name: &str, cc: Cc) -> Result<PathBuf, String> {
    let src = repo().join(format!("crates/kvmsim/tests/se/{name}.c"));
    let (compiler, kind, flags): (&str, &str, &[&str]) = match cc {
        Cc::Static => ("gcc", "", &["-static"]),
        Cc::Dynamic => ("gcc", "-dyn", &[]),
        Cc::Musl => ("musl-gcc", "-musl", &["-static"]),
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("se-{name}{kind}"));
    let o = Command::new(compiler)
        .args(flags)
        .args(["-O1", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .arg("-lm")
        .output()
        .map_err(|e| format!("cannot run {compiler}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{compiler} {}failed: {}",
            flags.join(" "),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(out)
}

/// tests/se/NAME.c built as `cc` says, once per test binary.
fn c_prog(name: &str, cc: Cc) -> Result<PathBuf, String> {
    type Built = std::collections::HashMap<(String, Cc), Result<PathBuf, String>>;
    static BUILT: std::sync::Mutex<Option<Built>> = std::sync::Mutex::new(None);
    let mut b = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    b.get_or_insert_with(Default::default)
        .entry((name.to_string(), cc))
        .or_insert_with(|| build_c_as(name, cc))
        .clone()
}

fn native(prog: &Path, args: &[&str], cwd: &Path) -> (i32, String) {
    let o = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // A process killed by a signal: 128 + the signal, as a shell says.
    let status = o.status.code().unwrap_or_else(|| {
        std::os::unix::process::ExitStatusExt::signal(&o.status).map_or(-1, |sig| 128 + sig)
    });
    (status, String::from_utf8_lossy(&o.stdout).into_owned())
}

fn se(test: &str, prog: &Path, args: &[&str], extra: &[&str]) -> Run {
    let out = outdir(test);
    let mut a = vec!["se", "--quiet", "--no-stdin"];
    a.extend_from_slice(extra);
    a.push("--outdir");
    let o = out.to_string_lossy().into_owned();
    a.push(&o);
    let p = prog.to_string_lossy().into_owned();
    a.push(&p);
    a.extend_from_slice(args);
    let r = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(&a)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        status: r.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        out: out.to_path_buf(),
        dir: Some(out),
    }
}

/// The prerequisite, else a failure with its reason: the build decided
/// that the tools are there (build.rs, `kvmsim_no_se_tools`; where they
/// are not, these tests are ignored with the reason in the summary).
macro_rules! need {
    ($what:expr, $test:expr) => {
        match $what {
            Ok(p) => p,
            Err(why) => panic!("{}: {why}", $test),
        }
    };
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn busybox_applets_print_what_they_print_natively() {
    if !kvm_or_skip("se_busybox") {
        return;
    }
    let bb = need!(busybox(), "se_busybox");
    let data = outdir("se_busybox_data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    let text: String = (0..2000)
        .map(|i| format!("line {} {}\n", (i * 7919) % 2000, i % 13))
        .collect();
    std::fs::write(data.join("in.txt"), &text).unwrap();
    std::fs::write(data.join("sub/a"), "a").unwrap();
    let f = data.join("in.txt").to_string_lossy().into_owned();
    let d = data.to_string_lossy().into_owned();
    let cases: Vec<Vec<&str>> = vec![
        vec!["echo", "hello", "from", "SE"],
        vec!["wc", &f],
        vec!["md5sum", &f],
        vec!["sha256sum", &f],
        vec!["sort", &f],
        vec!["sort", "-n", "-k", "3", &f],
        vec!["ls", "-a", &d],
        vec!["cat", &f],
        vec!["head", "-n", "3", &f],
        vec!["false"],
    ];
    for (i, args) in cases.iter().enumerate() {
        let (nst, nout) = native(&bb, args, &data);
        let r = se(&format!("se_busybox_{i}"), &bb, args, &[]);
        r.no_panic();
        assert_eq!(r.status, nst, "busybox {args:?}: status\n{}", r.stderr);
        assert_eq!(
            r.file("stdout.txt"),
            nout,
            "busybox {args:?}: stdout\n{}",
            r.stderr
        );
        let syscalls = r.stat("system.se.syscalls::total").as_u64().unwrap();
        assert!(syscalls >= 3, "{args:?}: {syscalls} system calls counted");
        assert_eq!(r.json("exit.json")["cause"], "process_exit");
    }
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn busybox_sleep_takes_simulated_time_not_host_time() {
    if !kvm_or_skip("se_sleep") {
        return;
    }
    let bb = need!(busybox(), "se_sleep");
    let r = se("se_sleep", &bb, &["sleep", "2"], &[]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    let sim = r.stat("simSeconds").as_f64().unwrap();
    let host = r.stat("hostSeconds").as_f64().unwrap();
    assert!((2.0..2.5).contains(&sim), "simSeconds {sim}");
    // The sleep is simulated time only: the whole run takes less host time
    // than the sleep (were it a host sleep, it would take at least 2 s).
    assert!(host < 2.0, "hostSeconds {host}");
    let slept = r
        .stat("system.se.syscallTicks::clock_nanosleep")
        .as_u64()
        .or_else(|| r.stat("system.se.syscallTicks::nanosleep").as_u64());
    assert!(slept.unwrap_or(0) >= 2_000_000_000_000, "{slept:?}");
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_static_c_program_matches_its_native_run() {
    if !kvm_or_skip("se_prog") {
        return;
    }
    let p = need!(prog(), "se_prog");
    let work = outdir("se_prog_work");
    std::fs::create_dir_all(&work).unwrap();
    let w = work.to_string_lossy().into_owned();
    for args in [
        vec!["hello", "a b", "-x"],
        vec!["files", &w],
        vec!["memory"],
    ] {
        let (nst, nout) = native(&p, &args, &work);
        let r = se(&format!("se_prog_{}", args[0]), &p, &args, &[]);
        r.no_panic();
        assert_eq!(
            (r.status, r.file("stdout.txt")),
            (nst, nout),
            "{args:?}\n{}",
            r.stderr
        );
    }
    // The environment is what --env gives.
    let r = se(
        "se_prog_env",
        &p,
        &["hello"],
        &["--env", "A=1", "--env", "B=x y"],
    );
    assert_eq!(r.file("stdout.txt"), "hello argc=2 env: A=1 B=x y\n");
    // Sleeping 1.5 s advances the monotonic clock by 1.5 s of simulated time.
    let r = se("se_prog_time", &p, &["time"], &[]);
    let ms: i64 = r
        .file("stdout.txt")
        .trim()
        .strip_prefix("slept_ms ")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1500..1600).contains(&ms), "slept {ms} ms");
    // The auxiliary vector, /proc/self/exe, and seeded randomness: the same
    // seed repeats, another differs.
    let a = se("se_prog_aux1", &p, &["auxv"], &["--seed", "5"]).file("stdout.txt");
    let b = se("se_prog_aux2", &p, &["auxv"], &["--seed", "5"]).file("stdout.txt");
    let c = se("se_prog_aux3", &p, &["auxv"], &["--seed", "6"]).file("stdout.txt");
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(
        a.starts_with(&format!(
            "pagesz 4096 random 1 execfn {} platform x86_64\n",
            p.display()
        )),
        "{a}"
    );
    assert!(
        a.contains(&format!(
            "exe {} {}\n",
            p.to_string_lossy().len(),
            p.display()
        )),
        "{a}"
    );
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn faults_end_the_run_as_linux_signals_would() {
    if !kvm_or_skip("se_faults") {
        return;
    }
    let p = need!(prog(), "se_faults");
    for (mode, status, words, printed) in [
        (
            "null",
            139,
            "SIGSEGV (11): invalid read at address 0x1234 (not mapped)",
            "",
        ),
        ("jump", 139, "invalid execute at address 0x7fff00001000", ""),
        ("ud2", 132, "SIGILL (4): invalid opcode", ""),
        // kvmsim edits the page tables: a page made read-only or unmapped
        // faults at once (the TLB flush works).
        ("mprotect", 139, "invalid write at address", "read 1\n"),
        ("munmap", 139, "invalid write at address", "kept 2\n"),
    ] {
        let r = se(&format!("se_fault_{mode}"), &p, &[mode], &[]);
        r.no_panic();
        assert_eq!(r.status, status, "{mode}: {}", r.stderr);
        assert!(r.stderr.contains(words), "{mode}: {}", r.stderr);
        assert_eq!(r.file("stdout.txt"), printed, "{mode}");
        let exit = r.json("exit.json");
        assert_eq!(exit["cause"], "process_exit");
        assert_eq!(exit["code"], status);
    }
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn bad_pointers_are_efault_and_unknown_calls_enosys() {
    if !kvm_or_skip("se_efault") {
        return;
    }
    let p = need!(prog(), "se_efault");
    let r = se("se_efault", &p, &["efault"], &[]);
    r.no_panic();
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "-1 14 -1 14 -1\n");
    let r = se("se_unknown", &p, &["unknown"], &[]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(
        r.file("stdout.txt"),
        "unknown -1 Function not implemented\nagain -1\nbeyond the table -1\n"
    );
    // Reported once by name (number, when it has none), counted each time.
    assert_eq!(
        r.stderr
            .matches("unsupported system call #400 (400)")
            .count(),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(
        r.stderr.matches("unsupported system call #100000").count(),
        1,
        "{}",
        r.stderr
    );
    assert_eq!(r.stat("system.se.unsupportedSyscalls"), 3);
    assert_eq!(r.stat("system.se.syscalls::nr400"), 2);
    assert_eq!(r.stat("system.se.syscalls::unknown"), 1);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn sim_ops_work_from_the_program() {
    if !kvm_or_skip("se_simops") {
        return;
    }
    let p = need!(prog(), "se_simops");
    let r = se("se_simops", &p, &["simops"], &[]);
    r.no_panic();
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(
        r.file("stdout.txt"),
        "dumped stats\nafter checkpoint\n",
        "the sim-ops exit ends the run at once"
    );
    // The checkpoint sim-op is declined, by name, and nothing is written.
    assert!(
        r.stderr
            .contains("an SE-mode process cannot be checkpointed yet"),
        "{}",
        r.stderr
    );
    assert!(
        !std::fs::read_dir(&r.out).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("cpt.")),
        "a checkpoint folder was written"
    );
    assert_eq!(r.json("exit.json")["cause"], "guest_exit");
    // A dump from the program, then the final one.
    let dumps = r.json("stats.json");
    assert_eq!(dumps.as_array().unwrap().len(), 2);
}

#[test]
fn programs_kvmsim_cannot_run_are_refused_by_name() {
    let dir = outdir("se_refused");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    // A 64-bit ELF with its class byte made 32-bit.
    let mut elf = std::fs::read(env!("CARGO_BIN_EXE_kvmsim")).unwrap();
    elf.truncate(4096);
    elf[4] = 1;
    let elf32 = dir.join("elf32");
    std::fs::write(&elf32, &elf).unwrap();
    // A dynamically linked program (kvmsim itself) whose interpreter's
    // folder is redirected to one that does not exist.
    let dynamic = env!("CARGO_BIN_EXE_kvmsim");
    let image = std::fs::read(dynamic).unwrap();
    let at = image
        .windows(5)
        .position(|w| w == b"/lib6" || w == b"/lib/")
        .expect("kvmsim names its interpreter");
    let end = at + image[at..].iter().position(|&b| b == 0).unwrap();
    let interp = std::str::from_utf8(&image[at..end]).unwrap().to_string();
    let folder = Path::new(&interp).parent().unwrap().to_string_lossy();
    let redirect = format!("{folder}=/nonexistent/kvmsim-test");
    for (path, words, extra) in [
        (
            script.to_string_lossy().into_owned(),
            "not an ELF file",
            vec![],
        ),
        (elf32.to_string_lossy().into_owned(), "a 32-bit ELF", vec![]),
        (
            dynamic.to_string(),
            "its interpreter",
            vec!["--redirect", &redirect],
        ),
        (
            "/nonexistent/prog".to_string(),
            "program /nonexistent/prog",
            vec![],
        ),
    ] {
        let r = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
            .args(["se", "--outdir"])
            .arg(dir.join("out"))
            .args(&extra)
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(254), "{path}: {err}");
        assert!(err.contains(words) && err.contains(&path), "{path}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !dir.join("out").exists(),
            "a refused run creates no output folder"
        );
    }
    let r = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["se", "--redirect", "lib=/x", "/bin/true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(254));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("se.redirects") && err.contains("lib=/x"),
        "{err}"
    );
    let r = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["se", "--env", "NOEQUALS", "/bin/true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(254));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--env"));
    for q in ["0", "soon"] {
        let r = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
            .args(["se", "--quantum", q, "/bin/true"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(254));
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("--quantum") && err.contains(q), "{err}");
    }
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn the_config_form_gives_arguments_environment_and_argv0() {
    if !kvm_or_skip("se_config") {
        return;
    }
    let p = need!(prog(), "se_config");
    let (dir, cfg) = config(
        "se_config",
        &format!(
            "[system]\nplatform = \"se\"\nkernel = \"{}\"\nmemory = \"64MiB\"\n\n[system.se]\n\
             args = [\"hello\", \"x\"]\nargv0 = \"renamed\"\nenv = [\"K=v\"]\nsyscall_latency = \"5us\"\n",
            p.display()
        ),
    );
    let r = kvmsim(
        &["se", "--quiet", "--no-stdin", "--config", &cfg],
        &dir.join("out"),
    );
    r.no_panic();
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "hello argc=3 [x] env: K=v\n");
    // Every call cost 5 us of simulated time.
    let calls = r.stat("system.se.syscalls::total").as_u64().unwrap();
    let ticks = r.stat("system.se.syscallTicks::total").as_u64().unwrap();
    assert_eq!(ticks, calls * 5_000_000);
    let resolved = r.json("config.json");
    assert_eq!(resolved["system"][0]["se"]["argv0"], "renamed");
    // A config that is not SE is refused by kvmsim se; checkpoints are refused.
    let (d2, bare) = config("se_config_bare", "[system]\nkernel = \"builtin:hello\"\n");
    let r = kvmsim(&["se", "--config", &bare], &d2.join("out"));
    assert_eq!(r.status, 254);
    assert!(r.stderr.contains("platform"), "{}", r.stderr);
    let (d3, ck) = config(
        "se_config_ckpt",
        &format!(
            "[sim]\ncheckpoint_at = \"1ms\"\n[system]\nplatform = \"se\"\nkernel = \"{}\"\n",
            p.display()
        ),
    );
    let r = kvmsim(&["se", "--config", &ck], &d3.join("out"));
    assert_eq!(r.status, 254);
    assert!(r.stderr.contains("checkpoint"), "{}", r.stderr);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_host_dynamic),
    ignore = "needs the host's glibc loader (/lib64/ld-linux-x86-64.so.2) and coreutils, which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn dynamically_linked_host_programs_match_their_native_runs() {
    if !kvm_or_skip("se_dynamic") {
        return;
    }
    let top = outdir("se_dynamic_data");
    // A folder of its own: `ls -a` lists `..`, which must not be the
    // shared /tmp.
    let data = top.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    let text: String = (0..3000)
        .map(|i| format!("{} {} w{}\n", (i * 7919) % 3000, i % 13, i % 7))
        .collect();
    std::fs::write(data.join("in.txt"), &text).unwrap();
    std::fs::write(data.join("sub/a"), "a\n").unwrap();
    std::fs::write(data.join("b"), "bb\n").unwrap();
    let f = data.join("in.txt").to_string_lossy().into_owned();
    let d = data.to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("ls", vec!["-l", &d]),
        ("ls", vec!["-laR", &d]),
        ("sha256sum", vec![&f]),
        ("md5sum", vec![&f]),
        ("sort", vec!["-n", &f]),
        ("sort", vec!["-k2,2n", "-k1,1nr", &f]),
        ("cat", vec![&f, "/nonexistent/file"]),
        ("wc", vec![&f]),
    ];
    for (i, (tool, args)) in cases.iter().enumerate() {
        let prog = Path::new("/usr/bin").join(tool);
        // Is it dynamically linked? (It is on Debian; the test says so if not.)
        let image = std::fs::read(&prog).unwrap();
        assert!(
            elf_interp(&image).is_some(),
            "{} is not dynamically linked here",
            prog.display()
        );
        let (nst, nout) = native(&prog, args, &data);
        let r = se(&format!("se_dynamic_{i}"), &prog, args, &[]);
        r.no_panic();
        assert_eq!(r.status, nst, "{tool} {args:?}: status\n{}", r.stderr);
        assert_eq!(
            r.file("stdout.txt"),
            nout,
            "{tool} {args:?}: stdout\n{}",
            r.stderr
        );
        assert_eq!(r.json("exit.json")["cause"], "process_exit");
        // ld.so mapped the C library from its file.
        assert!(
            r.stat("system.se.syscalls::mmap").as_u64().unwrap() >= 4,
            "{tool}"
        );
        assert!(r.stat("system.se.syscalls::openat").as_u64().unwrap() >= 2);
    }
    // Changing the file system, and a working folder of the program's own
    // (mkdir -p changes into each folder it makes).
    let r = se(
        "se_dynamic_mkdir",
        Path::new("/usr/bin/mkdir"),
        &["-p", &format!("{d}/m/n/o")],
        &[],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert!(data.join("m/n/o").is_dir());
    let chdirs = r.stat("system.se.syscalls::chdir").as_u64().unwrap_or(0)
        + r.stat("system.se.syscalls::fchdir").as_u64().unwrap_or(0)
        + r.stat("system.se.syscalls::mkdirat").as_u64().unwrap_or(0)
        + r.stat("system.se.syscalls::mkdir").as_u64().unwrap_or(0);
    assert!(chdirs >= 3, "{chdirs}");
    // coreutils that change names, modes and times, and grep (which asks
    // mincore): each does its work with no unsupported call.
    let t = format!("{d}/t");
    let (sl, hl) = (format!("{d}/s"), format!("{d}/h"));
    let steps: Vec<(&str, Vec<&str>)> = vec![
        ("touch", vec!["-d", "@1234567890", &t]),
        ("ln", vec!["-s", "in.txt", &sl]),
        ("ln", vec![&f, &hl]),
        ("chmod", vec!["640", &t]),
        ("grep", vec!["-c", "w3", &f]),
    ];
    for (i, (tool, args)) in steps.iter().enumerate() {
        let r = se(
            &format!("se_dynamic_fs_{i}"),
            &Path::new("/usr/bin").join(tool),
            args,
            &[],
        );
        assert_eq!(r.status, 0, "{tool} {args:?}\n{}", r.stderr);
        assert!(
            !r.stderr.contains("unsupported system call"),
            "{tool} {args:?}\n{}",
            r.stderr
        );
        if *tool == "grep" {
            assert_eq!(
                r.file("stdout.txt"),
                format!("{}\n", text.matches("w3\n").count())
            );
        }
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = std::fs::metadata(&t).unwrap();
    assert_eq!(md.mtime(), 1234567890);
    assert_eq!(md.permissions().mode() & 0o777, 0o640);
    assert_eq!(
        std::fs::read_link(data.join("s")).unwrap(),
        Path::new("in.txt")
    );
    assert_eq!(std::fs::metadata(data.join("h")).unwrap().nlink(), 2);
}

/// PT_INTERP's path, if the ELF has one.
fn elf_interp(image: &[u8]) -> Option<String> {
    let u64_at = |o: usize| u64::from_le_bytes(image[o..o + 8].try_into().unwrap());
    let phoff = u64_at(32) as usize;
    let phnum = u16::from_le_bytes([image[56], image[57]]) as usize;
    (0..phnum).find_map(|i| {
        let p = phoff + 56 * i;
        (u32::from_le_bytes(image[p..p + 4].try_into().unwrap()) == 3).then(|| {
            let (off, len) = (u64_at(p + 8) as usize, u64_at(p + 32) as usize);
            String::from_utf8_lossy(&image[off..off + len])
                .trim_end_matches('\0')
                .to_string()
        })
    })
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_host_dynamic),
    ignore = "needs the host's glibc loader (/lib64/ld-linux-x86-64.so.2) and coreutils, which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn the_sysroot_and_redirects_decide_where_paths_lead() {
    if !kvm_or_skip("se_sysroot") {
        return;
    }
    let cat = Path::new("/usr/bin/cat");
    let interp = elf_interp(&std::fs::read(cat).unwrap()).unwrap();
    let root = outdir("se_sysroot_root");
    // A sysroot with the loader (a copy, behind a symbolic link that is
    // absolute, as Debian's /lib64 one is: it is followed inside the
    // sysroot) and a file of its own.
    let real = root.join("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2");
    std::fs::create_dir_all(real.parent().unwrap()).unwrap();
    std::fs::copy(&interp, &real).unwrap();
    let link = root.join(interp.trim_start_matches('/'));
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    if link != real {
        std::os::unix::fs::symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", &link).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/kvmsim-sysroot.txt"), "from the sysroot\n").unwrap();
    let sysroot = root.to_string_lossy().into_owned();
    let r = se(
        "se_sysroot",
        cat,
        &["/etc/kvmsim-sysroot.txt"],
        &["--sysroot", &sysroot],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "from the sysroot\n");
    // The loader comes from the sysroot: a broken one there is named.
    let broken = outdir("se_sysroot_broken");
    let bl = broken.join(interp.trim_start_matches('/'));
    std::fs::create_dir_all(bl.parent().unwrap()).unwrap();
    std::fs::write(&bl, "not a loader").unwrap();
    let r = se(
        "se_sysroot_bad",
        cat,
        &["/etc/hostname"],
        &["--sysroot", &broken.to_string_lossy()],
    );
    assert_eq!(r.status, 254, "{}", r.stderr);
    assert!(
        r.stderr.contains("its interpreter")
            && r.stderr.contains(&*bl.to_string_lossy())
            && r.stderr.contains("not an ELF"),
        "{}",
        r.stderr
    );
    // A redirect: a guest folder opened from a host one (the longest wins).
    let host = outdir("se_redirect_host");
    std::fs::create_dir_all(host.join("deeper")).unwrap();
    std::fs::write(host.join("x.txt"), "redirected\n").unwrap();
    std::fs::write(host.join("deeper/y.txt"), "deeper\n").unwrap();
    let h = host.to_string_lossy().into_owned();
    let r = se(
        "se_redirect",
        cat,
        &["/guest/x.txt", "/guest/sub/y.txt"],
        &[
            "--redirect",
            &format!("/guest={h}"),
            "--redirect",
            &format!("/guest/sub={h}/deeper"),
        ],
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "redirected\ndeeper\n");
    // The config form: a sysroot relative to the config's folder.
    let (dir, cfg) = config(
        "se_sysroot_config",
        "[system]\nplatform = \"se\"\nkernel = \"/usr/bin/cat\"\n\n[system.se]\n\
             args = [\"/etc/kvmsim-sysroot.txt\"]\nsysroot = \"root\"\n",
    );
    std::os::unix::fs::symlink(&*root, dir.join("root")).unwrap();
    let r = kvmsim(
        &["se", "--quiet", "--no-stdin", "--config", &cfg],
        &dir.join("out"),
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "from the sysroot\n");
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn signal_handlers_run_as_under_linux() {
    if !kvm_or_skip("se_signals") {
        return;
    }
    let p = need!(signals_prog(), "se_signals");
    let work = outdir("se_signals_work");
    std::fs::create_dir_all(&work).unwrap();
    // Handlers for SIGSEGV (siglongjmp out), SIGFPE, SIGILL; SIGALRM from
    // alarm() in pause() and in nanosleep(); a periodic ITIMER_REAL that
    // interrupts a computation (the handler's return restores every
    // register, the vector ones too); blocked, pending, unblocked and
    // ignored signals on an alternate stack; default actions (SIGALRM and
    // SIGABRT end the process with 128 + the signal).
    for mode in [
        "faults",
        "alarm",
        "sleep",
        "timer",
        "altstack",
        "alarm-default",
        "abort",
    ] {
        let (nst, nout) = native(&p, &[mode], &work);
        let r = se(&format!("se_signals_{mode}"), &p, &[mode], &[]);
        r.no_panic();
        assert_eq!(
            (r.status, r.file("stdout.txt")),
            (nst, nout),
            "{mode}\n{}",
            r.stderr
        );
        let delivered = r.stat("system.se.signalsDelivered").as_u64().unwrap();
        let want = match mode {
            "faults" => 4,
            "alarm" | "sleep" | "altstack" => 1,
            "timer" => 5,
            _ => 0,
        };
        assert!(
            delivered >= want && (mode == "timer" || delivered == want),
            "{mode}: {delivered} signals delivered"
        );
        let sim = r.stat("simSeconds").as_f64().unwrap();
        match mode {
            // The alarm's 2 s are simulated time, not host time.
            "alarm" => {
                assert!((2.0..2.5).contains(&sim), "alarm: simSeconds {sim}");
                let host = r.stat("hostSeconds").as_f64().unwrap();
                assert!(host < 2.0, "alarm: hostSeconds {host}");
            }
            // The 5 s sleep ends at the 1 s alarm.
            "sleep" => assert!((1.0..1.5).contains(&sim), "sleep: simSeconds {sim}"),
            // The uncaught alarm ends the run when it expires, saying so.
            "alarm-default" => {
                assert!((1.0..1.5).contains(&sim), "alarm-default: {sim}");
                assert!(r.stderr.contains("killed by SIGALRM (14)"), "{}", r.stderr);
            }
            _ => {}
        }
    }
    // fork (glibc's makes a clone call) is refused with EAGAIN, said once
    // by name.
    let r = se("se_signals_fork", &p, &["fork"], &[]);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "fork=-1 errno=EAGAIN\n");
    assert!(
        r.stderr.contains("clone with flags")
            && r.stderr
                .contains("SE mode runs threads of one process only"),
        "{}",
        r.stderr
    );
}

/// The threads test program (tests/se/threads.c), static and dynamic.
fn threads_prog(dynamic: bool) -> Result<PathBuf, String> {
    static S: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static D: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if dynamic {
        D.get_or_init(|| build_c_with("threads", false)).clone()
    } else {
        S.get_or_init(|| build_c_with("threads", true)).clone()
    }
}

/// A run of threads.c in SE mode with `cpus` CPUs next to its native run.
fn threads_run(test: &str, p: &Path, mode: &str, cpus: u32) -> (Run, (i32, String)) {
    threads_run_with(test, p, mode, cpus, &[])
}

/// As [`threads_run`], with more `kvmsim se` options.
fn threads_run_with(
    test: &str,
    p: &Path,
    mode: &str,
    cpus: u32,
    extra: &[&str],
) -> (Run, (i32, String)) {
    let work = outdir(&format!("{test}_work"));
    std::fs::create_dir_all(&work).unwrap();
    let native = native(p, &[mode], &work);
    let n = cpus.to_string();
    let mut opts = vec!["--cpus", &n];
    opts.extend_from_slice(extra);
    let r = se(test, p, &[mode], &opts);
    r.no_panic();
    (r, native)
}

/// 4 threads on 4 more CPUs share work through an atomic counter, a
/// mutex and a condition variable, and are joined; statically linked and
/// dynamically linked against the host's glibc, as the native run. The
/// static run has 1 ms windows (`--quantum`), the dynamic one the default.
fn threads_work(dynamic: bool) {
    let test = if dynamic {
        "se_threads_dynamic"
    } else {
        "se_threads_static"
    };
    let p = need!(threads_prog(dynamic), test);
    let extra: &[&str] = if dynamic { &[] } else { &["--quantum", "1ms"] };
    let (r, (nst, nout)) = threads_run_with(test, &p, "work", 5, extra);
    let config = r.json("config.json");
    assert_eq!(
        config["sim"].get("quantum").and_then(|q| q.as_str()),
        (!dynamic).then_some("1000000000ps"),
        "{config}"
    );
    assert_eq!(
        (r.status, r.file("stdout.txt")),
        (nst, nout.clone()),
        "{}",
        r.stderr
    );
    assert!(
        nout.contains("atomic 8000002004000 (want 8000002004000)"),
        "{nout}"
    );
    assert_eq!(r.stat("system.se.threadsCreated").as_u64(), Some(4));
    // Each worker made its calls on a CPU of its own.
    for cpu in 1..=4 {
        let calls = r
            .stat(&format!("system.se.cpuSyscalls::cpu{cpu}"))
            .as_u64()
            .unwrap();
        assert!(calls > 0, "cpu{cpu} made no system call\n{}", r.stderr);
        let exits = r
            .stat(&format!("system.cpu{cpu}.numMMIO"))
            .as_u64()
            .unwrap();
        assert!(
            exits >= calls,
            "cpu{cpu}: {exits} MMIO exits, {calls} calls"
        );
    }
    assert!(r.stat("system.se.futexWaits").as_u64().unwrap() >= 1);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn threads_run_on_cpus_of_their_own_static() {
    if !kvm_or_skip("se_threads_static") {
        return;
    }
    threads_work(false);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), any(kvmsim_no_se_tools, kvmsim_no_host_dynamic)),
    ignore = "needs gcc and the host's dynamically linked glibc, which were not found when this test was built"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn threads_run_on_cpus_of_their_own_dynamic() {
    if !kvm_or_skip("se_threads_dynamic") {
        return;
    }
    threads_work(true);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn threads_beyond_the_cpus_timeouts_signals_and_deadlock() {
    if !kvm_or_skip("se_threads_more") {
        return;
    }
    let p = need!(threads_prog(false), "se_threads_more");
    // More threads than CPUs: with 3 CPUs the main thread and 2 more run;
    // the third pthread_create gets EAGAIN, said once by name.
    let (r, (nst, nout)) = threads_run("se_threads_toomany", &p, "toomany", 3);
    assert_eq!(
        (nst, nout.as_str()),
        (0, "created 8, then no error\njoined 8\n")
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(
        r.file("stdout.txt"),
        "created 2, then Resource temporarily unavailable\njoined 2\n"
    );
    assert_eq!(
        r.stderr
            .matches("more threads than it has CPUs (se.cpus = 3")
            .count(),
        1,
        "{}",
        r.stderr
    );
    // A timed condition-variable wait times out in simulated time, and a
    // thread that sleeps 300 ms wakes the main thread from another CPU.
    let (r, native) = threads_run("se_threads_timeout", &p, "timeout", 2);
    assert_eq!((r.status, r.file("stdout.txt")), native, "{}", r.stderr);
    let sim = r.stat("simSeconds").as_f64().unwrap();
    assert!((0.5..0.6).contains(&sim), "simSeconds {sim}");
    let waited = r
        .stat("system.se.cpuFutexWaitTicks::cpu0")
        .as_u64()
        .unwrap();
    assert!(waited >= 450_000_000_000, "cpu0 waited {waited} ticks");
    // Signals to threads: pthread_kill to a waiting thread, a process
    // signal the other thread blocks, sigsuspend ended by pthread_kill.
    let (r, native) = threads_run("se_threads_signals", &p, "signals", 2);
    assert_eq!((r.status, r.file("stdout.txt")), native, "{}", r.stderr);
    // Page tables change under running threads (mmap, mprotect, munmap on
    // 3 CPUs at once): every check holds, the others reload the tables.
    let (r, native) = threads_run("se_threads_memory", &p, "memory", 4);
    assert_eq!((r.status, r.file("stdout.txt")), native, "{}", r.stderr);
    assert!(r.stat("system.se.tlbFlushes").as_u64().unwrap() > 100);
    // One CPU, one thread: a futex timeout parks and wakes the only CPU.
    let (r, native) = threads_run("se_threads_alone", &p, "alone", 1);
    assert_eq!((r.status, r.file("stdout.txt")), native, "{}", r.stderr);
    let sim = r.stat("simSeconds").as_f64().unwrap();
    assert!((0.05..0.1).contains(&sim), "simSeconds {sim}");
    // Every thread waits forever: the run ends at once, saying so.
    let r = se("se_threads_deadlock", &p, &["deadlock"], &["--cpus", "3"]);
    r.no_panic();
    assert_eq!(r.status, 137, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "waiting\n");
    assert!(
        r.stderr
            .contains("deadlock: every thread of the program waits")
            && r.stderr.contains("thread 1001 on the futex at"),
        "{}",
        r.stderr
    );
    let sim = r.stat("simSeconds").as_f64().unwrap();
    assert!(sim < 0.1, "simSeconds {sim}");
}

/// A run of pipes.c (`mode`) in SE mode with `cpus` CPUs next to its native run.
fn pipes_run(test: &str, p: &Path, mode: &str, cpus: u32) -> (Run, (i32, String)) {
    let work = outdir(&format!("{test}_work"));
    std::fs::create_dir_all(&work).unwrap();
    let native = native(p, &[mode], &work);
    let n = cpus.to_string();
    let r = se(test, p, &[mode], &["--cpus", &n]);
    r.no_panic();
    (r, native)
}

/// tests/se/pipes.c built as `cc` says: 4 MiB from a producer thread to a
/// consumer thread through a pipe (checksummed on both sides), readers
/// and writers woken by the other end's close; one thread writing and
/// reading its own pipe with O_NONBLOCK, dup, EOF, EPIPE and SIGPIPE;
/// SIGPIPE's default action. Each against its native run.
fn pipes(cc: Cc) {
    let test = format!("se_pipes_{cc:?}").to_lowercase();
    let p = need!(c_prog("pipes", cc), test);
    let (r, (nst, nout)) = pipes_run(&format!("{test}_stream"), &p, "stream", 3);
    assert_eq!(
        (nst, nout.contains("checksums")),
        (0, true),
        "native: {nout}"
    );
    assert_eq!(
        (r.status, r.file("stdout.txt")),
        (nst, nout.clone()),
        "{}",
        r.stderr
    );
    assert!(nout.contains("passed 4194304 bytes of 4194304") && nout.contains("match"));
    assert!(nout.contains("blocked reader: read returned 0"), "{nout}");
    // Writes of more than the pipe holds (64 KiB) cannot finish without
    // waiting for the reader: the writer's CPU parked at least once.
    assert!(r.stat("system.se.pipeWaits").as_u64().unwrap() >= 1);
    assert_eq!(r.stat("system.se.unsupportedSyscalls").as_u64(), Some(0));
    let (r, (nst, nout)) = pipes_run(&format!("{test}_self"), &p, "self", 1);
    assert!(
        nst == 0 && nout.ends_with("self done\n") && !nout.contains("FAILED"),
        "native: {nout}"
    );
    assert_eq!(
        (r.status, r.file("stdout.txt")),
        (nst, nout),
        "{}",
        r.stderr
    );
    let (r, native) = pipes_run(&format!("{test}_sigpipe"), &p, "sigpipe", 1);
    assert_eq!(native, (141, "writing\n".to_string()));
    assert_eq!((r.status, r.file("stdout.txt")), native, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("killed by SIGPIPE (13): it wrote to a pipe whose read ends are all closed"),
        "{}",
        r.stderr
    );
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn pipes_between_threads_and_within_one_static() {
    if !kvm_or_skip("se_pipes_static") {
        return;
    }
    pipes(Cc::Static);
    // One thread reads an empty pipe, the other polls one: the run ends
    // at once, naming the waits.
    let p = need!(c_prog("pipes", Cc::Static), "se_pipes_deadlock");
    let r = se("se_pipes_deadlock", &p, &["deadlock"], &["--cpus", "2"]);
    r.no_panic();
    assert_eq!(r.status, 137, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "waiting\n");
    assert!(
        r.stderr
            .contains("deadlock: every thread of the program waits")
            && r.stderr
                .contains("thread 1000 polls 1 descriptor(s) with no timeout")
            && r.stderr
                .contains("thread 1001 reads from the empty pipe at fd 3"),
        "{}",
        r.stderr
    );
    assert!(r.stat("simSeconds").as_f64().unwrap() < 0.1);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), any(kvmsim_no_se_tools, kvmsim_no_host_dynamic)),
    ignore = "needs gcc and the host's dynamically linked glibc, which were not found when this test was built"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn pipes_between_threads_and_within_one_dynamic() {
    if !kvm_or_skip("se_pipes_dynamic") {
        return;
    }
    pipes(Cc::Dynamic);
}

/// A run of events.c (`mode`) in SE mode with `cpus` CPUs next to its native run.
fn events_run(test: &str, p: &Path, mode: &str, cpus: u32) -> (Run, (i32, String)) {
    pipes_run(test, p, mode, cpus)
}

/// tests/se/events.c built as `cc` says: eventfd, epoll and select between
/// threads (blocked readers and writers woken, a semaphore shared by two
/// consumers, epoll_wait and select woken by producer threads, timeouts)
/// and in one thread (each call's rules and errors). Each against its
/// native run, byte for byte.
fn events(cc: Cc) {
    let test = format!("se_events_{cc:?}").to_lowercase();
    let p = need!(c_prog("events", cc), test);
    let (r, (nst, nout)) = events_run(&format!("{test}_threads"), &p, "threads", 4);
    assert!(
        nst == 0 && nout.ends_with("threads done\n") && !nout.contains("FAILED"),
        "native: {nout}"
    );
    assert_eq!(
        (r.status, r.file("stdout.txt")),
        (nst, nout.clone()),
        "{}",
        r.stderr
    );
    assert!(
        nout.contains("consumers took 50 and 50 tokens")
            && nout.contains("epoll_wait got \"msg0;msg1;msg2;msg3;msg4;\""),
        "{nout}"
    );
    // The blocked reader, writer and consumers slept on the eventfds;
    // epoll_wait, select and the timeouts slept on the poll key.
    assert!(r.stat("system.se.eventfdWaits").as_u64().unwrap() >= 1);
    assert!(r.stat("system.se.pollWaits").as_u64().unwrap() >= 4);
    assert_eq!(r.stat("system.se.unsupportedSyscalls").as_u64(), Some(0));
    let (r, (nst, nout)) = events_run(&format!("{test}_self"), &p, "self", 1);
    assert!(
        nst == 0 && nout.ends_with("self done\n") && !nout.contains("FAILED"),
        "native: {nout}"
    );
    assert_eq!(
        (r.status, r.file("stdout.txt")),
        (nst, nout),
        "{}",
        r.stderr
    );
    assert_eq!(r.stat("system.se.unsupportedSyscalls").as_u64(), Some(0));
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn eventfd_epoll_and_select_static() {
    if !kvm_or_skip("se_events_static") {
        return;
    }
    events(Cc::Static);
    // A thread reads an eventfd of 0, the main thread waits in epoll_wait
    // on an empty pipe: the run ends at once, naming the waits.
    let p = need!(c_prog("events", Cc::Static), "se_events_deadlock");
    let r = se("se_events_deadlock", &p, &["deadlock"], &["--cpus", "2"]);
    r.no_panic();
    assert_eq!(r.status, 137, "{}", r.stderr);
    assert_eq!(r.file("stdout.txt"), "waiting\n");
    assert!(
        r.stderr
            .contains("deadlock: every thread of the program waits")
            && r.stderr.contains(
                "thread 1000 waits in epoll_wait on the epoll instance at fd 6 with no timeout"
            )
            && r.stderr
                .contains("thread 1001 reads the eventfd at fd 3 (its counter is 0)"),
        "{}",
        r.stderr
    );
    assert!(r.stat("simSeconds").as_f64().unwrap() < 0.1);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), any(kvmsim_no_se_tools, kvmsim_no_host_dynamic)),
    ignore = "needs gcc and the host's dynamically linked glibc, which were not found when this test was built"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn eventfd_epoll_and_select_dynamic() {
    if !kvm_or_skip("se_events_dynamic") {
        return;
    }
    events(Cc::Dynamic);
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_musl),
    ignore = "needs musl-gcc (Debian's musl-tools), which was not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1 or CI=true: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn musl_programs_threads_pipes_and_events() {
    if !kvm_or_skip("se_musl") {
        return;
    }
    pipes(Cc::Musl);
    events(Cc::Musl);
    let p = need!(c_prog("threads", Cc::Musl), "se_musl_threads");
    for (mode, cpus) in [("work", 5), ("timeout", 2), ("signals", 2), ("memory", 4)] {
        let (r, (nst, nout)) = threads_run(&format!("se_musl_threads_{mode}"), &p, mode, cpus);
        assert_eq!(nst, 0, "native {mode}: {nout}");
        assert_eq!(
            (r.status, r.file("stdout.txt")),
            (nst, nout.clone()),
            "{mode}: {}",
            r.stderr
        );
        assert_eq!(r.stat("system.se.unsupportedSyscalls").as_u64(), Some(0));
        if mode == "work" {
            assert!(nout.contains("atomic 8000002004000 (want 8000002004000)"));
            assert_eq!(r.stat("system.se.threadsCreated").as_u64(), Some(4));
        }
    }
}

/// The CPU count a program is told (`cpus` mode of threads.c) in SE mode
/// with `n` CPUs.
fn told_cpus(test: &str, p: &Path, n: u32) -> String {
    let r = se(test, p, &["cpus"], &["--cpus", &n.to_string()]);
    r.no_panic();
    assert_eq!(r.status, 0, "{}", r.stderr);
    r.file("stdout.txt")
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_se_tools),
    ignore = "needs gcc and a static busybox (apt-get download busybox-static), which were not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn the_program_is_told_its_own_cpu_count() {
    if !kvm_or_skip("se_nproc") {
        return;
    }
    // Two counts, so that at least one differs from the host's.
    let p = need!(c_prog("threads", Cc::Static), "se_nproc");
    for n in [3, 7] {
        assert_eq!(
            told_cpus(&format!("se_nproc_glibc{n}"), &p, n),
            format!("online {n} configured {n} get_nprocs {n} get_nprocs_conf {n}\n")
        );
    }
    let bb = need!(busybox(), "se_nproc");
    let r = se("se_nproc_busybox", &bb, &["nproc"], &["--cpus", "3"]);
    assert_eq!(
        (r.status, r.file("stdout.txt").as_str()),
        (0, "3\n"),
        "{}",
        r.stderr
    );
    // Debian's coreutils nproc (glibc, dynamically linked).
    if Path::new("/usr/bin/nproc").is_file() && Path::new("/lib64/ld-linux-x86-64.so.2").exists() {
        let r = se(
            "se_nproc_coreutils",
            Path::new("/usr/bin/nproc"),
            &[],
            &["--cpus", "3"],
        );
        assert_eq!(
            (r.status, r.file("stdout.txt").as_str()),
            (0, "3\n"),
            "{}",
            r.stderr
        );
    } else {
        eprintln!(
            "se_nproc: this host has no /usr/bin/nproc with its glibc loader: that case is skipped"
        );
    }
}

#[test]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_musl),
    ignore = "needs musl-gcc (Debian's musl-tools), which was not found when this test was built (KVMSIM_REQUIRE_SE_TOOLS=1 or CI=true: required)"
)]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_musl_program_is_told_its_own_cpu_count() {
    if !kvm_or_skip("se_nproc_musl") {
        return;
    }
    let p = need!(c_prog("threads", Cc::Musl), "se_nproc_musl");
    for n in [3, 7] {
        assert_eq!(
            told_cpus(&format!("se_nproc_musl{n}"), &p, n),
            format!("online {n} configured {n} get_nprocs {n} get_nprocs_conf {n}\n")
        );
    }
}
