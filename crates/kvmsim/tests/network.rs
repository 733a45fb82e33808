//! Simulated Ethernet: two PC systems with a virtio-net NIC each, joined by
//! an Ethernet `[[link]]` with a latency and a bandwidth, captured in pcap;
//! three on a `[[switch]]` whose slow port drops what its queue cannot hold
//! (the `netpong` guest drives the NICs).

mod common;

use common::*;

/// 100 us of latency, 1 Gbit/s: a 60-byte frame (84 bytes on the wire)
/// takes 672 ns to send.
const LATENCY_NS: u64 = 100_000;
const SERIALIZE_NS: u64 = 672;

/// Runs examples/netpong.toml with `host_factor` (and `rounds` frames of
/// `len` bytes); returns the run and the pcap's bytes.
fn netpong(test: &str, host_factor: f64, rounds: u64, len: u64) -> (Run, Vec<u8>) {
    let text = std::fs::read_to_string(repo().join("examples/netpong.toml"))
        .unwrap()
        .replace(
            "platform = \"pc\"",
            &format!(
                "platform = \"pc\"\ncpu = {{ host_factor = {host_factor:?} }}\n\
                 serial = {{ stdout = false }}"
            ),
        )
        .replace(
            "args = [0, 10, 60]",
            &format!("args = [0, {rounds}, {len}]"),
        )
        .replace(
            "args = [1, 10, 60]",
            &format!("args = [1, {rounds}, {len}]"),
        );
    let (dir, cfg) = config(test, &text);
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let pcap = std::fs::read(r.out.join("link0.pcap")).expect("link0.pcap");
    (r, pcap)
}

/// The records of a nanosecond pcap file: (ns, frame).
fn records(pcap: &[u8]) -> Vec<(u64, Vec<u8>)> {
    assert_eq!(&pcap[..4], &0xa1b2_3c4du32.to_le_bytes(), "nanosecond pcap");
    assert_eq!(u32::from_le_bytes(pcap[20..24].try_into().unwrap()), 1);
    let mut out = Vec::new();
    let mut at = 24;
    while at < pcap.len() {
        let w = |i: usize| u32::from_le_bytes(pcap[at + i..at + i + 4].try_into().unwrap());
        let ns = u64::from(w(0)) * 1_000_000_000 + u64::from(w(4));
        let (incl, orig) = (w(8) as usize, w(12) as usize);
        assert_eq!(incl, orig, "whole frames");
        out.push((ns, pcap[at + 16..at + 16 + incl].to_vec()));
        at += 16 + incl;
    }
    assert_eq!(at, pcap.len(), "no partial record");
    out
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn frames_cross_the_link_in_latency_plus_serialization_and_are_captured() {
    if !kvm_or_skip("netpong") {
        return;
    }
    let rounds = 10;
    let (r, pcap) = netpong("netpong", 1e-6, rounds, 60);
    let init = r.file("serial.system0.log");
    let resp = r.file("serial.system1.log");
    assert_eq!(field(&init, "n"), rounds, "{init}");
    assert_eq!(field(&resp, "n"), rounds, "{resp}");
    // Each system's NIC has its own MAC (02:6b:76:00:<system>:<nic>).
    assert_eq!(field(&init, "mac4"), 0);
    assert_eq!(field(&resp, "mac4"), 1);
    // Every round trip: two crossings of latency + serialization, and the
    // guests' work (a few 100 ns device accesses; host time counts 1e-6).
    let rtt = field(&init, "rtt_sum_ns");
    let wire = rounds * 2 * (LATENCY_NS + SERIALIZE_NS);
    assert!(rtt >= wire, "rtt {rtt} < {wire}");
    assert!(
        rtt - wire < rounds * 5_000,
        "rtt {rtt}: more than 5 us a round beyond the wire"
    );
    for (i, dir) in [(0, "0to1"), (1, "1to0")] {
        assert_eq!(r.stat(&format!("system{i}.nic0.txFrames")), rounds);
        assert_eq!(r.stat(&format!("system{i}.nic0.rxFrames")), rounds);
        assert_eq!(r.stat(&format!("system{i}.nic0.txBytes")), rounds * 60);
        assert_eq!(r.stat(&format!("system{i}.nic0.rxDropped")), 0);
        assert_eq!(r.stat(&format!("link0.frames{dir}")), rounds);
        assert_eq!(r.stat(&format!("link0.bytes{dir}")), rounds * 60);
    }
    // The capture: requests and answers alternate, stamped when their
    // first byte went on the wire; an answer leaves at least latency +
    // serialization after its request.
    let recs = records(&pcap);
    assert_eq!(recs.len() as u64, 2 * rounds);
    for (k, pair) in recs.chunks(2).enumerate() {
        let (t_req, req) = &pair[0];
        let (t_ans, ans) = &pair[1];
        assert_eq!(
            &req[6..12],
            &[2, 0x6b, 0x76, 0, 0, 0],
            "round {k}: from system0"
        );
        assert_eq!(
            &ans[6..12],
            &[2, 0x6b, 0x76, 0, 1, 0],
            "round {k}: from system1"
        );
        for f in [req, ans] {
            assert_eq!(f.len(), 60);
            assert_eq!(&f[12..14], &[0x88, 0xb5]);
            assert_eq!(u64::from_le_bytes(f[14..22].try_into().unwrap()), k as u64);
        }
        let d = t_ans - t_req;
        assert!(
            (LATENCY_NS + SERIALIZE_NS..LATENCY_NS + SERIALIZE_NS + 5_000).contains(&d),
            "round {k}: answer {d} ns after the request"
        );
    }
    // tcpdump reads it, with simulated timestamps.
    if let Ok(out) = std::process::Command::new("tcpdump")
        .args(["-n", "-tt", "--nano", "-e", "-r"])
        .arg(r.out.join("link0.pcap"))
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("0x88b5")).collect();
        assert_eq!(lines.len() as u64, 2 * rounds, "{text}");
        let first = format!("0.{:09} 02:6b:76:00:00:00 > ff:ff:ff:ff:ff:ff", recs[0].0);
        assert!(lines[0].starts_with(&first), "{}", lines[0]);
    } else {
        eprintln!("no tcpdump on this host: the capture was checked by parsing only");
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn captures_are_identical_when_host_time_does_not_count() {
    if !kvm_or_skip("netpong_exact") {
        return;
    }
    // With host time worth less than a tick, simulated time comes only
    // from the devices and the link: the same frames at the same ticks.
    let (r1, p1) = netpong("netpong-exact-1", 1e-12, 5, 1000);
    let (r2, p2) = netpong("netpong-exact-2", 1e-12, 5, 1000);
    assert_eq!(records(&p1).len(), 10);
    assert!(p1 == p2, "two runs wrote different captures");
    assert_eq!(r1.file("serial.system0.log"), r2.file("serial.system0.log"));
    // 1000 bytes + 24 at 1 Gbit/s: 8192 ns a crossing.
    let rtt = field(&r1.file("serial.system0.log"), "rtt_sum_ns");
    assert!(rtt >= 5 * 2 * (LATENCY_NS + 8_192), "rtt {rtt}");
}

/// examples/switch.toml: 10 frames of 1514 bytes flooded from port 0 to a
/// 10 Mbit/s port holding 4 frames and a 1 Gbit/s port.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_switch_floods_learns_and_drops_what_a_full_port_queue_cannot_hold() {
    if !kvm_or_skip("switch") {
        return;
    }
    let text = std::fs::read_to_string(repo().join("examples/switch.toml"))
        .unwrap()
        .replace(
            "platform = \"pc\"",
            "platform = \"pc\"\ncpu = { host_factor = 1e-6 }\nserial = { stdout = false }",
        );
    let (dir, cfg) = config("switch", &text);
    let r = kvmsim(&["run", &cfg], &dir.join("out"));
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let (frames, len, queue) = (10u64, 1514u64, 4u64);
    // 1514 + 24 bytes: 12.304 us at 1 Gbit/s, 1230.4 us at 10 Mbit/s. The
    // blaster's 10 frames reach the switch within 10 x 12.3 us plus its
    // few device accesses (host time counts 1e-6), long before port 1's
    // first frame has left: exactly 4 fit, 6 are dropped.
    let (fast_ns, slow_ns, latency_ns) = (12_304u64, 1_230_400u64, 50_000u64);
    let sink1 = r.file("serial.system1.log");
    let sink2 = r.file("serial.system2.log");
    assert_eq!(field(&sink1, "n"), queue, "{sink1}");
    assert_eq!(
        field(&sink1, "round_sum"),
        1 + 2 + 3,
        "drop tail: rounds 0-3"
    );
    assert_eq!(
        field(&sink2, "round_sum"),
        (0..frames).sum::<u64>(),
        "{sink2}"
    );
    // (Counters are integers; the peaks are values, written as floats.)
    let stat = |s: &str| r.stat(s).as_f64().unwrap_or_else(|| panic!("{s}")) as u64;
    assert_eq!(stat("sw0.port0.rxFrames"), frames);
    assert_eq!(stat("sw0.port0.rxBytes"), frames * len);
    assert_eq!(stat("sw0.port1.floodedFrames"), queue);
    assert_eq!(stat("sw0.port1.droppedFrames"), frames - queue);
    assert_eq!(stat("sw0.port1.droppedBytes"), (frames - queue) * len);
    assert_eq!(stat("sw0.port1.queuePeak"), queue);
    assert_eq!(stat("sw0.port2.floodedFrames"), frames);
    assert_eq!(stat("sw0.port2.droppedFrames"), 0);
    assert_eq!(stat("sw0.port2.queuePeak"), 1, "port 2 keeps up");
    assert_eq!(stat("sw0.port0.floodedFrames"), 0, "nobody sends to 0");
    assert_eq!(stat("sw0.learnedAddresses"), 1, "the blaster's address");
    assert_eq!(stat("system0.nic0.txFrames"), frames);
    assert_eq!(stat("system1.nic0.rxFrames"), queue);
    assert_eq!(stat("system2.nic0.rxFrames"), frames);
    // Each sink asked for a dump after its last frame: the switch's
    // statistics are in it, as of the last window boundary, by which the
    // switch had handled every frame.
    let dumps = r.json("stats.json");
    let dumps = dumps.as_array().unwrap();
    assert_eq!(dumps.len(), 3, "two guest dumps and the final one");
    for d in &dumps[..2] {
        assert_eq!(d["stats"]["sw0.port1.droppedFrames"], frames - queue);
        assert_eq!(d["stats"]["sw0.port2.floodedFrames"], frames);
    }
    // The captures parse: port 0 saw the blaster's frames go in, port 1
    // the 4 that came out, back to back at 10 Mbit/s, the first 12.304 us
    // + 50 us after it went in (store and forward); port 2 all 10, each
    // as soon as it was in. (Ticks are picoseconds; pcap keeps
    // nanoseconds, so a difference may be 1 ns off.)
    let read = |p: &str| records(&std::fs::read(r.out.join(p)).expect(p));
    let (p0, p1, p2) = (
        read("sw0.port0.pcap"),
        read("sw0.port1.pcap"),
        read("sw0.port2.pcap"),
    );
    assert_eq!(p0.len() as u64, frames);
    assert_eq!(p1.len() as u64, queue);
    assert_eq!(p2.len() as u64, frames);
    let near = |a: u64, b: u64| a.abs_diff(b) <= 1;
    for (k, (t, f)) in p0.iter().enumerate() {
        assert_eq!(f.len() as u64, len);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &[2, 0x6b, 0x76, 0, 0, 0]);
        assert_eq!(u64::from_le_bytes(f[14..22].try_into().unwrap()), k as u64);
        assert!(near(p2[k].0, t + fast_ns + latency_ns), "port 2, frame {k}");
        assert_eq!(&p2[k].1, f);
    }
    for (k, (t, f)) in p1.iter().enumerate() {
        assert_eq!(f, &p0[k].1, "port 1 carries frames 0-3");
        let want = p0[0].0 + fast_ns + latency_ns + k as u64 * slow_ns;
        assert!(near(*t, want), "port 1, frame {k}: {t} ns, want {want}");
    }
    assert!(p1.windows(2).all(|w| w[0].0 < w[1].0));
}

/// A checkpoint of examples/switch.toml while port 1's frames are still on
/// their way holds the switch (its table, its queues) and its statistics;
/// a restore finishes the run with the same counts.
#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_switch_is_checkpointed_and_restored() {
    if !kvm_or_skip("switch_restore") {
        return;
    }
    let text = std::fs::read_to_string(repo().join("examples/switch.toml"))
        .unwrap()
        .replace(
            "platform = \"pc\"",
            "platform = \"pc\"\ncpu = { host_factor = 1e-6 }\nserial = { stdout = false }",
        );
    let (dir, cfg) = config("switch-restore", &text);
    // Asked at 60 us, while the blaster is still sending (it drains
    // there: a system that has ended cannot be checkpointed), taken at the
    // window boundary (100 us), before port 1 has sent its second frame.
    let r = kvmsim(
        &["run", &cfg, "--checkpoint-at", "60us", "--checkpoint-exit"],
        &dir.join("orig"),
    );
    assert_eq!(r.no_panic().status, 0, "stderr:\n{}", r.stderr);
    let cp = std::fs::read_dir(dir.join("orig"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("cpt."))
        .expect("a checkpoint");
    let b = std::fs::read(cp.join("state.ckpt")).unwrap();
    let st: serde_json::Value = serde_json::from_slice(&b[32..]).unwrap();
    let sw = &st["network"]["switches"][0];
    assert_eq!(sw["name"], "sw0");
    assert_eq!(sw["table"][0][0], "02:6b:76:00:00:00");
    assert_eq!(sw["table"][0][1], 0, "learned on port 0");
    let queued = sw["ports"][1]["queue"].as_array().unwrap().len();
    assert!(
        (1..=4).contains(&queued),
        "{queued} frames queued on port 1"
    );
    let flooded = &st["network"]["stats"]["values"]["sw0.port1.floodedFrames"]["count"];
    assert!(flooded.as_u64().unwrap() >= 1, "{flooded}");
    let r2 = kvmsim(
        &["run", "--restore", cp.to_str().unwrap()],
        &dir.join("restored"),
    );
    assert_eq!(r2.no_panic().status, 0, "stderr:\n{}", r2.stderr);
    let sink1 = r2.file("serial.system1.log");
    let sink2 = r2.file("serial.system2.log");
    assert_eq!(field(&sink1, "round_sum"), 6, "{sink1}");
    assert_eq!(field(&sink2, "round_sum"), 45, "{sink2}");
    let stat = |s: &str| r2.stat(s).as_f64().unwrap_or_else(|| panic!("{s}")) as u64;
    assert_eq!(stat("sw0.port1.droppedFrames"), 6);
    assert_eq!(stat("sw0.port1.floodedFrames"), 4);
    assert_eq!(stat("system1.nic0.rxFrames"), 4);
    // The restored capture of port 1 holds the frames that left after
    // the checkpoint, still 1230.4 us apart.
    let p1 = records(&std::fs::read(r2.out.join("sw0.port1.pcap")).unwrap());
    assert!(!p1.is_empty() && p1.len() < 4, "{} frames", p1.len());
    assert!(p1
        .windows(2)
        .all(|w| (w[1].0 - w[0].0).abs_diff(1_230_400) <= 1));
}
