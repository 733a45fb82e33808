//! Debugging a guest with GDB (`--gdb`): the real `/usr/bin/gdb` in batch
//! mode against the `gdbdemo` guest, and a hostile client speaking the
//! remote protocol by hand.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// A kvmsim run waiting for (or serving) GDB.
struct Served {
    child: Child,
    port: u16,
    /// The rest of stderr, collected until the run ends.
    stderr: mpsc::Receiver<String>,
}

impl Served {
    /// Starts `kvmsim run ARGS --gdb 127.0.0.1:0` (unless the args name a
    /// config that sets it) and waits for the port it listens on.
    fn start(args: &[&str], out: &Path) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
            .args(["run", "--no-stdin", "--outdir"])
            .arg(out)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kvmsim runs");
        let stderr = child.stderr.take().expect("stderr");
        let (port_tx, port_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("waiting for GDB on 127.0.0.1:").nth(1) {
                    let port: u16 = rest
                        .split(|c: char| !c.is_ascii_digit())
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    let _ = port_tx.send(port);
                }
                all.push_str(&line);
                all.push('\n');
            }
            let _ = tx.send(all);
        });
        let port = port_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("kvmsim says where it waits for GDB");
        Served {
            child,
            port,
            stderr: rx,
        }
    }

    /// Waits for the run to end (at most `limit`): status, stdout, stderr.
    fn finish(mut self, limit: Duration) -> (i32, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("kvmsim did not end within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stdout = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut stdout);
        }
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_default();
        (status.code().unwrap_or(-1), stdout, stderr)
    }
}

impl Drop for Served {
    /// A test that fails while the run serves GDB does not leave it running
    /// (a guest like `steps` never ends by itself).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gdb_or_skip(test: &str) -> bool {
    // The build decided that GDB is there (build.rs, `kvmsim_no_gdb`: where
    // it is not, the test is ignored with the reason in the summary).
    if Path::new("/usr/bin/gdb").exists() {
        return true;
    }
    panic!("{test}: /usr/bin/gdb is missing (install it, then touch crates/kvmsim/build.rs)");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_gdb),
    ignore = "needs /usr/bin/gdb (Debian: apt-get install gdb), which was not there when this test was built"
)]
fn gdb_breaks_reads_steps_and_changes_the_guests_result() {
    let test = "gdb_breaks";
    if !kvm_or_skip(test) || !gdb_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    std::fs::create_dir_all(&dir).unwrap();
    // The guest with its symbols, as GDB reads it.
    let r = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["guests", "--extract"])
        .arg(dir.join("elf"))
        .output()
        .expect("kvmsim guests runs");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let elf = dir.join("elf/gdbdemo.elf");
    let served = Served::start(
        &["--kernel", "builtin:gdbdemo", "--gdb", "127.0.0.1:0"],
        &dir.join("out"),
    );
    let script = format!(
        "set pagination off\n\
         target remote 127.0.0.1:{port}\n\
         info registers rip fs_base gs_base\n\
         break triple\n\
         continue\n\
         print $rdi\n\
         print *(long *)&result\n\
         stepi\n\
         print $rax\n\
         set $rdi = 5\n\
         break done\n\
         continue\n\
         print *(long *)&result\n\
         monitor time\n\
         continue\n",
        port = served.port
    );
    let cmds = dir.join("cmds.gdb");
    std::fs::write(&cmds, script).unwrap();
    let gdb = Command::new("/usr/bin/gdb")
        .args(["-batch", "-nx", "-x"])
        .arg(&cmds)
        .arg(&elf)
        .stdin(Stdio::null())
        .output()
        .expect("gdb runs");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&gdb.stdout),
        String::from_utf8_lossy(&gdb.stderr)
    );
    let (status, stdout, stderr) = served.finish(Duration::from_secs(120));
    let lines: Vec<&str> = out.lines().collect();
    let has = |want: &str| lines.iter().any(|l| l.contains(want));
    // Stopped before the first instruction, at the entry point.
    assert!(
        has("rip            0x100000"),
        "gdb:\n{out}\nkvmsim:\n{stderr}"
    );
    assert!(has("fs_base        0x0"), "gdb:\n{out}");
    // The breakpoint on the function, the argument and the variable there.
    assert!(has("Breakpoint 1, ") && has(" in triple ()"), "gdb:\n{out}");
    assert!(has("$1 = 14"), "gdb:\n{out}");
    assert!(has("$2 = 0"), "gdb:\n{out}");
    // One instruction later (mov %rdi, %rax): RAX holds the argument.
    assert!(has("$3 = 14"), "gdb:\n{out}");
    // 14 + 5 + 5 after the register change, stored in the variable.
    assert!(has("Breakpoint 2, ") && has("$4 = 24"), "gdb:\n{out}");
    assert!(has("simulated time: tick "), "gdb:\n{out}");
    assert!(has("exited with code 030"), "gdb:\n{out}");
    // The run's own result shows the change.
    assert_eq!(status, 24, "kvmsim:\n{stderr}");
    assert!(stdout.contains("gdbdemo: result=24"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A remote-protocol packet with its checksum.
fn packet(body: &str) -> Vec<u8> {
    let sum = body.bytes().fold(0u8, |s, b| s.wrapping_add(b));
    format!("${body}#{sum:02x}").into_bytes()
}

/// Reads from `s` until `want` appears (at most `limit`); returns what came.
fn read_until(s: &mut TcpStream, want: &str, limit: Duration) -> String {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains(want) {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads until the packet whose start `got` holds is whole (`#` and its
/// two checksum digits after the last `$`), so that the next read starts
/// with the next reply.
fn finish_packet(s: &mut TcpStream, mut got: String, limit: Duration) -> String {
    let whole = |g: &str| {
        g.rfind('$')
            .and_then(|i| g[i..].find('#').map(|j| i + j))
            .is_some_and(|h| g.len() >= h + 3)
    };
    let start = Instant::now();
    while !whole(&got) && start.elapsed() < limit {
        got.push_str(&read_until(s, "#", Duration::from_millis(500)));
        if whole(&got) {
            break;
        }
        let mut b = [0u8; 2];
        if let Ok(n) = s.read(&mut b) {
            got.push_str(&String::from_utf8_lossy(&b[..n]));
        }
    }
    got
}

/// Undoes the protocol's run-length encoding (`X*N`: N - 29 more X).
fn unrle(body: &str) -> String {
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == '*' {
            let n = chars.next().map_or(0, |n| n as usize - 29);
            let last = out.chars().last().unwrap_or('0');
            out.extend(std::iter::repeat_n(last, n));
        } else {
            out.push(c);
        }
    }
    out
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the stub");
    s.set_nodelay(true).unwrap();
    s
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_malformed_packet_ends_the_session_and_the_run_goes_on() {
    let test = "gdb_garbage";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    let served = Served::start(
        &["--kernel", "builtin:gdbdemo", "--gdb", "127.0.0.1:0"],
        &dir,
    );
    let mut s = connect(served.port);
    // An unknown command: the empty reply (unsupported), the session lives.
    s.write_all(&packet("vKvmsimNoSuchThing")).unwrap();
    let got = read_until(&mut s, "$#00", Duration::from_secs(30));
    assert!(got.contains("$#00"), "{got:?}");
    // A memory read at the entry point: the guest's first bytes.
    s.write_all(b"+").unwrap();
    s.write_all(&packet("m100000,1")).unwrap();
    let got = read_until(&mut s, "#", Duration::from_secs(30));
    assert!(
        got.contains("$48#"),
        "the first byte of `test %rdi, %rdi`: {got:?}"
    );
    // A memory read whose address is not a number: gdbstub ends the
    // session on a packet it cannot parse (as on a bad checksum or bytes
    // outside a packet), and kvmsim goes on without the debugger.
    s.write_all(b"+").unwrap();
    s.write_all(&packet("mzz,qq")).unwrap();
    let _ = read_until(&mut s, "#", Duration::from_secs(5));
    drop(s);
    let (status, stdout, stderr) = served.finish(Duration::from_secs(120));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("the GDB connection ended"), "{stderr}");
    // sim.gdb_on_disconnect defaults to "continue": the guest finished.
    assert_eq!(status, 42, "{stderr}");
    assert!(stdout.contains("gdbdemo: result=42"), "{stdout}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_disconnect_ends_the_run_when_configured() {
    let test = "gdb_disconnect_exit";
    if !kvm_or_skip(test) {
        return;
    }
    let (dir, cfg) = config(
        test,
        "[sim]\ngdb = \"127.0.0.1:0\"\ngdb_on_disconnect = \"exit\"\n\
         [[system]]\nkernel = \"builtin:gdbdemo\"\n",
    );
    let served = Served::start(&[&cfg], &dir.join("out"));
    let mut s = connect(served.port);
    s.write_all(b"$g#6").unwrap();
    drop(s);
    let (status, stdout, stderr) = served.finish(Duration::from_secs(120));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status, 130, "{stderr}");
    assert!(stderr.contains("the debugger went away"), "{stderr}");
    assert!(!stdout.contains("result="), "the guest ran on: {stdout}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn ctrl_c_stops_a_running_guest_and_kill_ends_the_run() {
    let test = "gdb_ctrl_c";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    // `steps` loops for ever at ring 0.
    let served = Served::start(&["--kernel", "builtin:steps", "--gdb", "127.0.0.1:0"], &dir);
    let mut s = connect(served.port);
    s.write_all(&packet("c")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"\x03").unwrap();
    // A stop with SIGINT (2): `S02`, or `T02...` with the thread.
    let got = read_until(&mut s, "02", Duration::from_secs(60));
    let got = finish_packet(&mut s, got, Duration::from_secs(30));
    assert!(
        got.contains("$S02") || got.contains("$T02"),
        "no SIGINT stop after Ctrl-C: {got:?}"
    );
    // The registers are readable there; then the debugger kills the run.
    s.write_all(b"+").unwrap();
    s.write_all(&packet("g")).unwrap();
    let regs = read_until(&mut s, "#", Duration::from_secs(30));
    let body = regs
        .split('$')
        .nth(1)
        .and_then(|b| b.split('#').next())
        .unwrap_or_default();
    // Core, SSE, fs_base and gs_base: 0x228 bytes, in hex.
    assert_eq!(unrle(body).len(), 2 * 0x228, "register reply {regs:?}");
    s.write_all(b"+").unwrap();
    s.write_all(&packet("k")).unwrap();
    let (status, _, stderr) = served.finish(Duration::from_secs(120));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status, 130, "{stderr}");
    assert!(stderr.contains("killed by the debugger"), "{stderr}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn an_address_gdb_cannot_reach_is_refused_before_the_run() {
    let test = "gdb_bad_address";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    let r = kvmsim(
        &[
            "run",
            "--kernel",
            "builtin:hello",
            "--gdb",
            "127.0.0.1:notaport",
        ],
        &dir.join("out"),
    );
    assert_eq!(r.status, 254, "{}", r.stderr);
    assert!(
        r.stderr.contains("sim.gdb") && r.stderr.contains("127.0.0.1:notaport"),
        "{}",
        r.stderr
    );
    // Nothing ran: no output folder.
    assert!(!dir.join("out").exists());
}

/// The built-in guests with their symbols, as GDB reads them, in DIR/elf.
fn extract(dir: &Path) -> std::path::PathBuf {
    let r = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(["guests", "--extract"])
        .arg(dir.join("elf"))
        .output()
        .expect("kvmsim guests runs");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    dir.join("elf")
}

/// Runs `/usr/bin/gdb -batch` with `script` (its commands, after
/// `target remote` to `port`) against `elf`; returns stdout and stderr.
/// GDB waits up to 60 s for a reply (not 2 s: a debug build writing a
/// checkpoint on a loaded host takes longer).
fn gdb_batch(dir: &Path, port: u16, script: &str, elf: &Path) -> String {
    let cmds = dir.join("cmds.gdb");
    std::fs::write(
        &cmds,
        format!(
            "set pagination off\nset remotetimeout 60\ntarget remote 127.0.0.1:{port}\n{script}"
        ),
    )
    .unwrap();
    let gdb = Command::new("/usr/bin/gdb")
        .args(["-batch", "-nx", "-x"])
        .arg(&cmds)
        .arg(elf)
        .stdin(Stdio::null())
        .output()
        .expect("gdb runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&gdb.stdout),
        String::from_utf8_lossy(&gdb.stderr)
    )
}

/// The thread GDB said hit breakpoint `n` ("Thread K hit Breakpoint n").
fn hit_thread(out: &str, n: u32) -> Option<u32> {
    out.lines().find_map(|l| {
        let rest = l.strip_prefix("Thread ")?;
        let (t, tail) = rest.split_once(' ')?;
        tail.starts_with(&format!("hit Breakpoint {n},"))
            .then(|| t.parse().ok())
            .flatten()
    })
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_gdb),
    ignore = "needs /usr/bin/gdb (Debian: apt-get install gdb), which was not there when this test was built"
)]
fn every_cpu_is_a_thread_and_an_aps_breakpoint_stops_all() {
    let test = "gdb_smp";
    if !kvm_or_skip(test) || !gdb_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    std::fs::create_dir_all(&dir).unwrap();
    let elf = extract(&dir).join("smpboot.elf");
    // smpboot on 3 CPUs, 1000 ring-3 iterations each.
    let served = Served::start(
        &[
            "--kernel",
            "builtin:smpboot",
            "--cpus",
            "3",
            "--arg",
            "3",
            "--arg",
            "1000",
            "--gdb",
            "127.0.0.1:0",
        ],
        &dir.join("out"),
    );
    // ap_main runs only on the APs; `record` on every CPU, once each.
    let out = gdb_batch(
        &dir,
        served.port,
        "info threads\n\
         break ap_main\n\
         continue\n\
         set $ap = $_thread\n\
         info threads\n\
         print/x $rip\n\
         stepi\n\
         print/x $rip\n\
         thread 1\n\
         print/x $rip\n\
         print $_thread\n\
         eval \"thread %d\", $ap\n\
         delete\n\
         break record\n\
         set scheduler-locking on\n\
         monitor time\n\
         continue\n\
         print $_thread == $ap\n\
         thread 1\n\
         print/x $rip\n\
         monitor time\n\
         set scheduler-locking off\n\
         continue\n\
         continue\n\
         delete\n\
         continue\n",
        &elf,
    );
    let (status, stdout, stderr) = served.finish(Duration::from_secs(180));
    let ctx = format!("gdb:\n{out}\nkvmsim:\n{stderr}");
    // Three threads, one per CPU, before the first instruction: the BSP at
    // the entry point, the APs at the reset vector waiting for SIPI.
    assert!(
        out.contains("Thread 1.1 (CPU 0) 0x0000000000100000 in _start"),
        "{ctx}"
    );
    assert!(out.contains("Thread 1.2 (CPU 1)"), "{ctx}");
    assert!(out.contains("Thread 1.3 (CPU 2)"), "{ctx}");
    // The breakpoint only the APs reach reports an AP's thread.
    let ap = hit_thread(&out, 1).unwrap_or_else(|| panic!("no hit of breakpoint 1\n{ctx}"));
    assert!(ap == 2 || ap == 3, "{ctx}");
    // GDB's value history: $N = VALUE.
    let value = |n: u32| -> u64 {
        let v = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("${n} = ")))
            .unwrap_or_else(|| panic!("no ${n}\n{ctx}"))
            .trim();
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => v.parse().unwrap(),
        }
    };
    let ap_main = value(1);
    // The AP is at ap_main; a step moves it one instruction (mov %edi,
    // %ebx: two bytes); the BSP is elsewhere (waiting for the reports).
    assert_eq!(value(2), ap_main + 2, "{ctx}");
    let bsp = value(3);
    assert_ne!(bsp, ap_main, "{ctx}");
    assert_eq!(value(4), 1, "thread 1 is selected\n{ctx}");
    // With scheduler locking the AP runs alone to `record`: it is the one
    // reported, and the BSP, held, has not moved.
    assert_eq!(value(5), 1, "the AP hit record first\n{ctx}");
    assert_eq!(value(6), bsp, "the held BSP moved\n{ctx}");
    // Each CPU's time (`monitor time`), before and after: the held CPUs'
    // stood still, the AP's went on.
    let times: Vec<Vec<u64>> = out
        .split("simulated time: tick ")
        .skip(1)
        .map(|t| {
            (0..3)
                .map(|c| {
                    let key = format!("CPU {c}: tick ");
                    let at = t.find(&key).unwrap_or_else(|| panic!("{key}\n{ctx}"));
                    t[at + key.len()..]
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or_else(|| panic!("{key}\n{ctx}"))
                })
                .collect()
        })
        .collect();
    assert_eq!(times.len(), 2, "{ctx}");
    let me = ap as usize - 1;
    let other = 3 - me;
    assert_eq!(times[1][0], times[0][0], "CPU 0 was held\n{ctx}");
    assert_eq!(
        times[1][other], times[0][other],
        "CPU {other} was held\n{ctx}"
    );
    assert!(times[1][me] > times[0][me], "the AP ran\n{ctx}");
    // `record` is reached by each CPU once: three hits, three threads.
    let mut hits: Vec<u32> = out
        .lines()
        .filter(|l| l.contains("hit Breakpoint 2,"))
        .filter_map(|l| l.strip_prefix("Thread ")?.split(' ').next()?.parse().ok())
        .collect();
    hits.sort();
    assert_eq!(hits, [1, 2, 3], "{ctx}");
    // Then to the end: every CPU reported and the guest exited with 0.
    assert!(out.contains("exited normally"), "{ctx}");
    assert_eq!(status, 0, "{ctx}");
    assert!(stdout.contains("smpboot: 3 of 3 CPUs started"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_gdb),
    ignore = "needs /usr/bin/gdb (Debian: apt-get install gdb), which was not there when this test was built"
)]
fn monitor_checkpoint_writes_one_that_restores_to_the_same_end() {
    let test = "gdb_ckpt";
    if !kvm_or_skip(test) || !gdb_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    std::fs::create_dir_all(&dir).unwrap();
    let elf = extract(&dir).join("smpboot.elf");
    let ck = dir.join("ck");
    let served = Served::start(
        &[
            "--kernel",
            "builtin:smpboot",
            "--cpus",
            "2",
            "--arg",
            "2",
            "--arg",
            "1000",
            "--quiet",
            "--gdb",
            "127.0.0.1:0",
        ],
        &dir.join("out"),
    );
    // Stopped with the AP at ap_main (GDB's int3 planted there); the
    // checkpoint must hold neither the breakpoint nor GDB's socket.
    let out = gdb_batch(
        &dir,
        served.port,
        &format!(
            "break ap_main\n\
             continue\n\
             print/x $rip\n\
             monitor checkpoint {ck}\n\
             print/x $rip\n\
             monitor checkpoint {ck}\n\
             delete\n\
             continue\n",
            ck = ck.display()
        ),
        &elf,
    );
    let (status, _, stderr) = served.finish(Duration::from_secs(180));
    let ctx = format!("gdb:\n{out}\nkvmsim:\n{stderr}");
    assert!(hit_thread(&out, 1) == Some(2), "{ctx}");
    let line = out
        .lines()
        .find(|l| l.starts_with("checkpoint at tick "))
        .unwrap_or_else(|| panic!("no checkpoint\n{ctx}"));
    assert!(
        line.ends_with(&format!("written to {}", ck.display())),
        "{ctx}"
    );
    // The drain ran no guest code: the AP is where it stopped.
    let rips: Vec<&str> = out.lines().filter(|l| l.starts_with("$")).collect();
    assert_eq!(rips.len(), 2, "{ctx}");
    assert_eq!(rips[0][4..], rips[1][4..], "{ctx}");
    // A second one into the same folder is refused, naming it.
    assert!(
        out.contains(&format!(
            "no checkpoint: {} already holds a checkpoint",
            ck.display()
        )),
        "{ctx}"
    );
    assert!(out.contains("exited normally"), "{ctx}");
    assert_eq!(status, 0, "{ctx}");
    let orig = std::fs::read_to_string(dir.join("out/serial.log")).unwrap();
    assert!(orig.contains("smpboot: 2 of 2 CPUs started"), "{orig}");
    // The restore runs to the same end without a debugger.
    let r = kvmsim(
        &[
            "run",
            "--no-stdin",
            "--quiet",
            "--restore",
            &ck.to_string_lossy(),
        ],
        &dir.join("restored"),
    );
    assert_eq!(r.no_panic().status, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("waiting for GDB"), "{}", r.stderr);
    let serial = r.file("serial.log");
    assert!(serial.contains("smpboot: 2 of 2 CPUs started"), "{serial}");
    assert!(serial.contains("apic=1 cpu=1 result="), "{serial}");
    assert_eq!(r.json("exit.json")["status"], 0);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_gdb),
    ignore = "needs /usr/bin/gdb (Debian: apt-get install gdb), which was not there when this test was built"
)]
fn pc_events_count_exactly_with_the_debugger_attached() {
    let test = "gdb_pcev";
    if !kvm_or_skip(test) || !gdb_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    std::fs::create_dir_all(&dir).unwrap();
    let elf = extract(&dir).join("smpboot.elf");
    // A PC event counts `record` (each CPU calls it once) while GDB stops
    // every CPU at the AP's ap_main, steps it (the BSP held), then stops
    // each CPU at `record` itself (GDB's int3 where the event's debug
    // register points), and lets the run go on to the end.
    let served = Served::start(
        &[
            "--kernel",
            "builtin:smpboot",
            "--cpus",
            "2",
            "--arg",
            "2",
            "--arg",
            "1000",
            "--quiet",
            "--pc-event",
            "record:count",
            "--gdb",
            "127.0.0.1:0",
        ],
        &dir.join("out"),
    );
    let out = gdb_batch(
        &dir,
        served.port,
        "break ap_main\n\
         continue\n\
         stepi\n\
         delete\n\
         break record\n\
         continue\n\
         continue\n\
         delete\n\
         continue\n",
        &elf,
    );
    let (status, _, stderr) = served.finish(Duration::from_secs(180));
    let ctx = format!("gdb:\n{out}\nkvmsim:\n{stderr}");
    assert_eq!(hit_thread(&out, 1), Some(2), "{ctx}");
    // GDB's breakpoint on the event's own address: both stop there once.
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("hit Breakpoint 2,"))
            .count(),
        2,
        "{ctx}"
    );
    assert!(out.contains("exited normally"), "{ctx}");
    assert_eq!(status, 0, "{ctx}");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/stats.json")).unwrap())
            .unwrap();
    let last = &stats.as_array().unwrap().last().unwrap()["stats"];
    assert_eq!(last["system.cpu0.pcEvents::record"], 1, "{ctx}");
    assert_eq!(last["system.cpu1.pcEvents::record"], 1, "{ctx}");
}

/// Two `smpboot` systems of 2 CPUs (`iterations` ring-3 loop rounds in
/// system 1), GDB on system 1.
fn two_systems(dir: &Path, iterations: u64) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("two.toml");
    std::fs::write(
        &cfg,
        format!(
            "[sim]\ngdb = \"127.0.0.1:0\"\ngdb_system = 1\n\
             [[system]]\nkernel = \"builtin:smpboot\"\ncpus = 2\nargs = [2, 1000]\n\
             [system.serial]\nstdout = false\n\
             [[system]]\nkernel = \"builtin:smpboot\"\ncpus = 2\nargs = [2, {iterations}]\n\
             [system.serial]\nstdout = false\n"
        ),
    )
    .unwrap();
    cfg.to_string_lossy().into_owned()
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
#[cfg_attr(
    all(not(kvmsim_no_kvm), kvmsim_no_gdb),
    ignore = "needs /usr/bin/gdb (Debian: apt-get install gdb), which was not there when this test was built"
)]
fn with_two_systems_gdb_debugs_the_chosen_one_and_detach_lets_both_finish() {
    let test = "gdb_two";
    if !kvm_or_skip(test) || !gdb_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    let cfg = two_systems(&dir, 1000);
    let elf = extract(&dir).join("smpboot.elf");
    let served = Served::start(&[&cfg], &dir.join("out"));
    // The int3 goes into system 1's memory only: system 0 runs the same
    // code at the same addresses and must not meet it.
    let out = gdb_batch(
        &dir,
        served.port,
        "info threads\n\
         break ap_main\n\
         continue\n\
         monitor time\n\
         detach\n",
        &elf,
    );
    let (status, _, stderr) = served.finish(Duration::from_secs(180));
    let ctx = format!("gdb:\n{out}\nkvmsim:\n{stderr}");
    assert!(
        stderr.contains("GDB debugs system1 (sim.gdb_system = 1)"),
        "{ctx}"
    );
    assert!(out.contains("Thread 1.2 (CPU 1)"), "{ctx}");
    assert!(!out.contains("Thread 1.3"), "{ctx}");
    assert_eq!(hit_thread(&out, 1), Some(2), "{ctx}");
    assert!(out.contains("CPU 1: tick "), "{ctx}");
    assert_eq!(status, 0, "{ctx}");
    for sys in ["system0", "system1"] {
        let serial = std::fs::read_to_string(dir.join(format!("out/serial.{sys}.log"))).unwrap();
        assert!(
            serial.contains("smpboot: 2 of 2 CPUs started"),
            "{sys}: {serial}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn ctrl_c_stops_every_cpu_of_every_system_and_names_a_thread() {
    let test = "gdb_ctrl_c_smp";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    // System 1's CPUs loop at ring 3 for far longer than the test.
    let cfg = two_systems(&dir, 1 << 40);
    let served = Served::start(&[&cfg], &dir.join("out"));
    let mut s = connect(served.port);
    s.write_all(&packet("qfThreadInfo")).unwrap();
    let got = read_until(&mut s, "#", Duration::from_secs(30));
    let got = finish_packet(&mut s, got, Duration::from_secs(30));
    assert!(
        got.contains("$m1,2#") || got.contains("$m01,02#"),
        "{got:?}"
    );
    s.write_all(b"+").unwrap();
    s.write_all(&packet("vCont;c")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.write_all(b"\x03").unwrap();
    let got = read_until(&mut s, "T02", Duration::from_secs(60));
    let got = finish_packet(&mut s, got, Duration::from_secs(30));
    assert!(
        got.contains("$T02thread:"),
        "no SIGINT stop with a thread: {got:?}"
    );
    s.write_all(b"+").unwrap();
    s.write_all(&packet("k")).unwrap();
    let (status, _, stderr) = served.finish(Duration::from_secs(120));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status, 130, "{stderr}");
    assert!(stderr.contains("killed by the debugger"), "{stderr}");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_resume_of_threads_that_do_not_exist_ends_the_session_not_the_run() {
    let test = "gdb_bad_thread";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = outdir(test);
    let served = Served::start(
        &[
            "--kernel",
            "builtin:smpboot",
            "--cpus",
            "2",
            "--arg",
            "2",
            "--arg",
            "1000",
            "--gdb",
            "127.0.0.1:0",
        ],
        &dir,
    );
    let mut s = connect(served.port);
    // Registers of a thread that does not exist: an error reply, the
    // session lives.
    s.write_all(&packet("Hg9")).unwrap();
    let got = read_until(&mut s, "#", Duration::from_secs(30));
    let got = finish_packet(&mut s, got, Duration::from_secs(30));
    s.write_all(b"+").unwrap();
    assert!(got.contains('$'), "{got:?}");
    // A step of thread 7 alone would hold both CPUs with nothing to run:
    // refused, which ends the session; the run goes on without GDB.
    s.write_all(&packet("vCont;s:7")).unwrap();
    let _ = read_until(&mut s, "#", Duration::from_secs(5));
    drop(s);
    let (status, stdout, stderr) = served.finish(Duration::from_secs(120));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("names none of the 2 threads"), "{stderr}");
    assert_eq!(status, 0, "{stderr}");
    assert!(stdout.contains("smpboot: 2 of 2 CPUs started"), "{stdout}");
}
