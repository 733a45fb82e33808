//! The PC platform's interrupt paths on a real vCPU, in simulated time.

mod common;

use common::*;

#[test]
fn pc_interrupt_paths_tick_in_simulated_time() {
    if !kvm_or_skip("pcirq") {
        return;
    }
    let (dir, cfg) = config(
        "pcirq",
        "[sim]\nmax_time = \"1s\"\n[system]\nkernel = \"builtin:pcirq\"\nplatform = \"pc\"\n\
         serial = { stdout = false }\n",
    );
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let line = r.file("serial.log");
    // Ten 1 ms periods each: PIT through the 8259 pair (virtual wire), PIT
    // through the I/O APIC, and the local APIC timer.
    for key in ["pic_ns", "ioapic_ns", "apic_timer_ns"] {
        let ns = field(&line, key);
        assert!(
            (9_000_000..12_000_000).contains(&ns),
            "{key} = {ns}: {line}"
        );
    }
    assert_eq!(r.stat("system.apic.timerInterrupts"), 10);
    assert_eq!(r.stat("system.ioapic.interrupts"), 10);
    assert_eq!(r.stat("system.cpu.numInterrupts"), 30);
}
