//! Signals reach the right thread: each system's CPU runs on its own thread
//! with its own run timer and kick signal. Real /dev/kvm.
//!
//! Every assertion here holds however busy the host is: the tests count
//! forced exits against what can cause them (a system without a run timer
//! and without kicks has none; one whose ring-3 loop outlasts its timer
//! period has some), never against host-time rates.

use std::sync::mpsc;
use std::time::Duration;

use platform::{Config, OutDir, System};

/// True if KVM can be used here (see `kvm::usable_or_skip`).
fn kvm_or_skip(test: &str) -> bool {
    kvm::usable_or_skip(test)
}

struct Result {
    name: String,
    serial: String,
    stats: serde_json::Value,
}

impl Result {
    /// The system's statistic `stat` (e.g. `cpu.numExitSignal`) at the end.
    fn stat(&self, stat: &str) -> u64 {
        let last = self.stats.as_array().unwrap().last().unwrap();
        let name = format!("{}.{stat}", self.name);
        last["stats"][&name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}"))
    }
    fn signals(&self) -> u64 {
        self.stat("cpu.numExitSignal")
    }
    fn field(&self, key: &str) -> u64 {
        let v = self
            .serial
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing from {:?}", self.serial));
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => v.parse().unwrap(),
        }
    }
}

/// Builds system `name` for builtin guest `guest` and runs it on the
/// calling thread; `ready` receives its kick handle before it runs. The
/// name is never `system`, so no progress line kicks the CPU (that is only
/// for a run's single system on a terminal): every forced exit here comes
/// from the system's own run timer or from the test's kicks.
fn run_here(
    name: &str,
    guest: &str,
    args: &[u64],
    ready: Option<mpsc::Sender<kvm::timer::KickHandle>>,
) -> Result {
    assert_ne!(name, "system");
    let dir = std::env::temp_dir().join(format!("kvmsim-threads-{}-{name}", std::process::id()));
    let mut cfg = Config::for_kernel(&format!("builtin:{guest}"));
    let sim = cfg.sim.clone();
    let sc = &mut cfg.system[0];
    sc.args = args.to_vec();
    sc.serial.stdout = false;
    sc.serial.stdin = false;
    sc.cpu.timer = "posix".into();
    let mut sys = System::build_named(name, sc, &sim, &[], OutDir::create(&dir).unwrap()).unwrap();
    if let Some(tx) = ready {
        tx.send(sys.kick_handle()).unwrap();
    }
    let exit = sys.run().unwrap();
    assert_eq!(exit.cause, sim::ExitCause::GuestExit, "{exit:?}");
    sys.finish(&exit, 0).unwrap();
    let r = Result {
        name: name.into(),
        serial: std::fs::read_to_string(dir.join(format!("serial.{name}.log"))).unwrap(),
        stats: serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap())
            .unwrap(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The `ticks` guest's run: its timer forced exits on its own thread.
fn check_own_timer_exits(r: &Result, iterations: u64) {
    assert_eq!(
        r.field("result"),
        guests::compute_loop_reference(iterations),
        "{}",
        r.serial
    );
    // Ring 3 computes far longer than one period, and nothing but the run
    // timer ends a run there: the timer's signal reached this thread, and
    // the guest took the interrupt of a period that ended. (How many forced
    // exits a period costs is not fixed: a timer kept armed across entries
    // may expire a little before the event and cost one more.)
    assert!(r.signals() >= 1, "no forced exit: {}", r.serial);
    assert!(r.field("interrupts") >= 1, "{}", r.serial);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn two_cpus_on_two_threads_each_get_their_own_exits() {
    if !kvm_or_skip("two_threads") {
        return;
    }
    // Two CPUs with run timers (periods far above what any host needs per
    // run, so that loaded hosts still progress) and one without: compute
    // schedules no events, so no run timer is armed for it and nothing may
    // force it out of KVM while the other two take their timer exits.
    let iterations = 30_000_000;
    let a = std::thread::spawn(move || run_here("a", "ticks", &[500_000, iterations], None));
    let b = std::thread::spawn(move || run_here("b", "ticks", &[2_000_000, iterations], None));
    let c = std::thread::spawn(|| run_here("c", "compute", &[100_000_000], None));
    let (a, b, c) = (a.join().unwrap(), b.join().unwrap(), c.join().unwrap());
    eprintln!(
        "a: {} signals, count {}; b: {} signals, count {}; c: {} signals",
        a.signals(),
        a.field("count"),
        b.signals(),
        b.field("count"),
        c.signals()
    );
    check_own_timer_exits(&a, iterations);
    check_own_timer_exits(&b, iterations);
    assert_eq!(c.signals(), 0, "another thread's timer signal reached c");
    assert!(
        c.serial.contains(&format!(
            "result=0x{:016x}",
            guests::compute_loop_reference(100_000_000)
        )),
        "{}",
        c.serial
    );
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn kick_signal_is_unmasked_inside_kvm_even_if_inherited_blocked() {
    if !kvm_or_skip("inherited_mask") {
        return;
    }
    let r = std::thread::spawn(|| {
        // The thread starts with the kick signal blocked.
        vmm_sys_util::signal::block_signal(vmm_sys_util::signal::SIGRTMIN()).unwrap();
        run_here("blocked", "ticks", &[500_000, 20_000_000], None)
    })
    .join()
    .unwrap();
    check_own_timer_exits(&r, 20_000_000);
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn kicks_from_another_thread_force_exits() {
    if !kvm_or_skip("kick") {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // compute schedules no events, so no run timer is armed: only kicks
    // can force exits. `quiet` computes at the same time and is never
    // kicked.
    let iterations = 400_000_000;
    let sim = std::thread::spawn(move || {
        let r = run_here("kicked", "compute", &[iterations], Some(tx));
        let _ = done_tx.send(());
        r
    });
    let quiet = std::thread::spawn(move || run_here("quiet", "compute", &[iterations], None));
    let kick = rx.recv().unwrap();
    let mut sent = 0u64;
    while let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_millis(2))
    {
        kick.kick();
        sent += 1;
    }
    let r = sim.join().unwrap();
    let quiet = quiet.join().unwrap();
    let want = format!(
        "result=0x{:016x}",
        guests::compute_loop_reference(iterations)
    );
    assert!(r.serial.contains(&want), "{}", r.serial);
    assert!(quiet.serial.contains(&want), "{}", quiet.serial);
    // Every forced exit of the kicked CPU is one of the kicks (a kick
    // arriving outside KVM ends the next entry, or is discarded after a
    // run; it is never counted twice), and the kicks of a computation of
    // this length reached it; none reached the other CPU's thread.
    let signals = r.signals();
    assert!(
        signals >= 1 && signals <= sent,
        "{signals} forced exits for {sent} kicks"
    );
    assert_eq!(
        quiet.signals(),
        0,
        "a kick for another CPU reached this one"
    );
}
