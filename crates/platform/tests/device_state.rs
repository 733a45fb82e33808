//! Every device of a system has saved state (checkpoints): a walk over the
//! bus of a PC system with every kind of device kvmsim attaches (two local
//! APICs, the I/O APIC, 8259 pair, PIT, RTC, i8042, POST port, UART,
//! sim-ops, interval timer, QEMU's test devices, a virtio disk and a link
//! mailbox), after a guest ran on it. Real /dev/kvm (a system needs a VM).

use platform::config::{DiskConfig, QemuDevices};
use platform::system::LinkEnd;
use platform::{Config, OutDir, System};

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn every_device_saves_state_that_restores() {
    if !kvm::usable_or_skip("device_state") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kvmsim-devstate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 64 << 10]).unwrap();
    let mut cfg = Config::for_kernel("builtin:pcirq");
    let sim = cfg.sim.clone();
    let sc = &mut cfg.system[0];
    sc.platform = "pc".into();
    sc.cpus = 2;
    sc.serial.stdout = false;
    sc.serial.stdin = false;
    sc.disk = vec![DiskConfig::writable(image.to_str().unwrap())];
    sc.qemu = QemuDevices {
        debug_exit: Some(true),
        testdev: Some(true),
        fw_cfg: Some(true),
    };
    let link = LinkEnd {
        port: 0,
        latency: 1_000_000,
        nic: None,
    };
    let out = OutDir::create(&dir.join("out")).unwrap();
    let mut sys = System::build_named("sys", sc, &sim, &[link], out).unwrap();
    // The guest programs the PIT, the 8259 pair, the I/O APIC and the
    // local APIC timer: their states are not the reset ones.
    let exit = sys.run().unwrap();
    assert_eq!(exit.cause, sim::ExitCause::GuestExit, "{exit:?}");

    let owners = sys.state_owners();
    let names: Vec<&str> = owners.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "pic-master",
        "pit",
        "rtc",
        "i8042",
        "post",
        "uart",
        "isa-debug-exit",
        "pc-testdev",
        "fw_cfg",
        "ioapic",
        "lapic.0",
        "lapic.1",
        "simops",
        "timer",
        "link0",
        "disk0",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // One owner per device: the PIC's second and third ranges, port 0x61,
    // the i8042's command port and pc-testdev's interrupt ports are the
    // same devices.
    for again in ["pic-slave", "elcr", "port61", "i8042-cmd", "pc-testdev-irq"] {
        assert!(!names.contains(&again), "{again} listed twice: {names:?}");
    }
    for (name, dev) in &owners {
        let state = mem::lock(dev).save();
        // Only devices with nothing to keep save null.
        assert_eq!(state.is_null(), name == "isa-debug-exit", "{name}: {state}");
        // Through a string, as a checkpoint file holds it, and back into
        // the device itself: taken, and saved again the same.
        let text = serde_json::to_string(&state).unwrap();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut d = mem::lock(dev);
        d.restore(&back)
            .unwrap_or_else(|e| panic!("{name}: its own state is refused: {e}\n{text}"));
        assert_eq!(d.save(), state, "{name}");
        // A state of another shape is refused, naming what is wrong.
        if !state.is_null() {
            let err = d.restore(&serde_json::json!({"bogus": 1})).unwrap_err();
            assert!(err.0.contains("bogus"), "{name}: {err}");
            assert_eq!(d.save(), state, "{name}: a refused state changed it");
        }
    }
    // The guest left something behind: the local APIC's timer ran.
    let lapic0 = &owners.iter().find(|(n, _)| n == "lapic.0").unwrap().1;
    let s = mem::lock(lapic0).save();
    assert_ne!(s["timer_initial"], 0, "{s}");
    let _ = std::fs::remove_dir_all(&dir);
}
