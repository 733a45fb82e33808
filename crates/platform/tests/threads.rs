//! Signals reach the right thread: each system's CPU runs on its own thread
//! with its own run timer and kick signal. Real /dev/kvm.

use std::sync::mpsc;
use std::time::Duration;

use platform::{Config, OutDir, System};

/// True if KVM can be used here (see `kvm::usable_or_skip`).
fn kvm_or_skip(test: &str) -> bool {
    kvm::usable_or_skip(test)
}

struct Result {
    serial: String,
    stats: serde_json::Value,
}

impl Result {
    fn stat(&self, name: &str) -> u64 {
        let last = self.stats.as_array().unwrap().last().unwrap();
        last["stats"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}"))
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

/// Builds and runs a system for builtin guest `guest` on the calling
/// thread; `ready` receives its kick handle before it runs.
fn run_here(
    test: &str,
    guest: &str,
    args: &[u64],
    ready: Option<mpsc::Sender<kvm::timer::KickHandle>>,
) -> Result {
    let dir = std::env::temp_dir().join(format!("kvmsim-threads-{}-{test}", std::process::id()));
    let mut cfg = Config::for_kernel(&format!("builtin:{guest}"));
    let sc = &mut cfg.system[0];
    sc.args = args.to_vec();
    sc.serial.stdout = false;
    sc.serial.stdin = false;
    sc.cpu.timer = "posix".into();
    let mut sys = System::build(&mut cfg, OutDir::create(&dir).unwrap()).unwrap();
    if let Some(tx) = ready {
        tx.send(sys.kick_handle()).unwrap();
    }
    let exit = sys.run().unwrap();
    assert_eq!(exit.cause, sim::ExitCause::GuestExit, "{exit:?}");
    sys.finish(&exit, 0).unwrap();
    let r = Result {
        serial: std::fs::read_to_string(dir.join("serial.log")).unwrap(),
        stats: serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap())
            .unwrap(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Each CPU's forced exits match its own timer periods.
fn check_own_quanta(r: &Result) {
    let count = r.field("count");
    let signals = r.stat("system.cpu.numExitSignal");
    assert!(count >= 20, "{}", r.serial);
    assert!(
        signals + 2 >= count && signals <= count + count / 10 + 5,
        "numExitSignal {signals} for {count} periods: {}",
        r.serial
    );
}

#[test]
fn two_cpus_on_two_threads_each_get_their_own_exits() {
    if !kvm_or_skip("two_threads") {
        return;
    }
    // Different periods, so the counts tell the CPUs apart.
    let a = std::thread::spawn(|| run_here("a", "ticks", &[50_000, 30_000_000], None));
    let b = std::thread::spawn(|| run_here("b", "ticks", &[200_000, 30_000_000], None));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    check_own_quanta(&a);
    check_own_quanta(&b);
    // Neither starved: both finished their loops with the right result.
    let want = guests::compute_loop_reference(30_000_000);
    assert_eq!(a.field("result"), want);
    assert_eq!(b.field("result"), want);
    assert!(a.field("count") > b.field("count"));
}

#[test]
fn kick_signal_is_unmasked_inside_kvm_even_if_inherited_blocked() {
    if !kvm_or_skip("inherited_mask") {
        return;
    }
    let r = std::thread::spawn(|| {
        // The thread starts with the kick signal blocked.
        vmm_sys_util::signal::block_signal(vmm_sys_util::signal::SIGRTMIN()).unwrap();
        run_here("blocked", "ticks", &[100_000, 20_000_000], None)
    })
    .join()
    .unwrap();
    check_own_quanta(&r);
}

#[test]
fn kicks_from_another_thread_force_exits() {
    if !kvm_or_skip("kick") {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // compute schedules no events, so no run timer is armed: only kicks
    // can force exits.
    let sim = std::thread::spawn(move || {
        let r = run_here("kick", "compute", &[400_000_000], Some(tx));
        let _ = done_tx.send(());
        r
    });
    let kick = rx.recv().unwrap();
    let mut sent = 0u64;
    while done_rx.recv_timeout(Duration::from_millis(5)).is_err() {
        kick.kick();
        sent += 1;
    }
    let r = sim.join().unwrap();
    let signals = r.stat("system.cpu.numExitSignal");
    assert!(
        sent >= 10,
        "the guest ran too briefly for the test ({sent} kicks)"
    );
    assert!(
        signals >= sent / 4 && signals <= sent,
        "{signals} forced exits for {sent} kicks"
    );
}
