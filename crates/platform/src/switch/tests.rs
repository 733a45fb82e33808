//! The switch on a fake clock: frames are posted with the ticks a NIC
//! would give them, and serviced with explicit horizons.

use super::*;
use sim::tick::TICKS_PER_US;

const US: Tick = TICKS_PER_US;
/// 1 Gbit/s.
const GBIT: u64 = 125_000_000;

fn port(system: usize, queue_frames: u32) -> SwitchPort {
    SwitchPort {
        system,
        latency: 10 * US,
        bandwidth: GBIT,
        queue_frames,
        queue_bytes: None,
        pcap: false,
    }
}

fn switch(ports: &[SwitchPort], ageing: Tick) -> (Switch, Stats) {
    let mut stats = Stats::new();
    let s = Switch::new("sw", ports, ageing, Vec::new(), &mut stats).unwrap();
    (s, stats)
}

fn mac(n: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, n]
}

const BROADCAST: [u8; 6] = [0xff; 6];

fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Arc<[u8]> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f.into()
}

fn stat(stats: &Stats, name: &str) -> f64 {
    stats
        .dump(0)
        .get(name)
        .unwrap_or_else(|| panic!("{name}"))
        .as_f64()
}

/// Posts `f` on `port` as fully received at `at`, then services
/// everything before `horizon`.
fn send(s: &mut Switch, port: usize, at: Tick, f: Arc<[u8]>, horizon: Tick) -> Vec<Egress> {
    s.post(port, 0, at, at, f);
    s.service(horizon, 0)
}

fn ports_of(out: &[Egress]) -> Vec<usize> {
    out.iter().map(|e| e.port).collect()
}

#[test]
fn learns_sources_forwards_known_unicast_and_floods_the_rest() {
    let (mut s, stats) = switch(&[port(0, 8), port(1, 8), port(2, 8)], Tick::MAX);
    let far = Tick::MAX;
    // A broadcast from 1 (port 0): every other port; 1 is learned.
    let out = send(&mut s, 0, 100 * US, frame(BROADCAST, mac(1), 60), far);
    assert_eq!(ports_of(&out), vec![1, 2]);
    // 2 (port 1) to 1: known, out of port 0 only; 2 is learned.
    let out = send(&mut s, 1, 200 * US, frame(mac(1), mac(2), 60), far);
    assert_eq!(ports_of(&out), vec![0]);
    // 1 to 2: known on port 1.
    let out = send(&mut s, 0, 300 * US, frame(mac(2), mac(1), 60), far);
    assert_eq!(ports_of(&out), vec![1]);
    // 1 to 3, never seen: flooded.
    let out = send(&mut s, 0, 400 * US, frame(mac(3), mac(1), 60), far);
    assert_eq!(ports_of(&out), vec![1, 2]);
    // Multicast is flooded even when... nobody can learn a multicast source.
    let mcast = [0x01, 0, 0x5e, 0, 0, 1];
    let out = send(&mut s, 2, 500 * US, frame(mcast, mac(3), 60), far);
    assert_eq!(ports_of(&out), vec![0, 1]);
    // 1 moved to port 2: learned there now; a frame for it from port 2 is
    // filtered.
    let out = send(&mut s, 2, 600 * US, frame(mac(9), mac(1), 60), far);
    assert_eq!(ports_of(&out), vec![0, 1], "9 is unknown: flooded");
    let out = send(&mut s, 2, 700 * US, frame(mac(1), mac(3), 60), far);
    assert!(out.is_empty(), "1 is on port 2, where the frame came from");
    assert_eq!(stat(&stats, "sw.port2.filteredFrames"), 1.0);
    let out = send(&mut s, 1, 800 * US, frame(mac(1), mac(2), 60), far);
    assert_eq!(ports_of(&out), vec![2]);
    // Counts: port 0 sent the unicast from 2 once, flooded 3 frames.
    assert_eq!(stat(&stats, "sw.port0.forwardedFrames"), 1.0);
    assert_eq!(stat(&stats, "sw.port0.floodedFrames"), 2.0);
    assert_eq!(stat(&stats, "sw.port0.floodedBytes"), 120.0);
    assert_eq!(stat(&stats, "sw.port1.forwardedFrames"), 1.0);
    assert_eq!(stat(&stats, "sw.port1.floodedFrames"), 4.0);
    assert_eq!(stat(&stats, "sw.port2.forwardedFrames"), 1.0);
    assert_eq!(stat(&stats, "sw.port2.floodedFrames"), 2.0);
    assert_eq!(stat(&stats, "sw.port0.rxFrames"), 3.0);
    assert_eq!(stat(&stats, "sw.port2.rxBytes"), 180.0);
    // Learned: 1, 2, 3, then 1 again on another port.
    assert_eq!(stat(&stats, "sw.learnedAddresses"), 4.0);
    assert_eq!(stat(&stats, "sw.port0.droppedFrames"), 0.0);
}

#[test]
fn learned_addresses_age_out() {
    let ageing = 1000 * US;
    let (mut s, _stats) = switch(&[port(0, 8), port(1, 8), port(2, 8)], ageing);
    let far = Tick::MAX;
    send(&mut s, 1, 0, frame(BROADCAST, mac(2), 60), far);
    // Used until `ageing` after its last frame...
    let out = send(&mut s, 0, ageing - 1, frame(mac(2), mac(1), 60), far);
    assert_eq!(ports_of(&out), vec![1]);
    // ...then forgotten: flooded.
    let out = send(&mut s, 0, ageing, frame(mac(2), mac(1), 60), far);
    assert_eq!(ports_of(&out), vec![1, 2]);
    // A frame from it refreshes the entry.
    send(&mut s, 1, 5000 * US, frame(mac(1), mac(2), 60), far);
    let out = send(
        &mut s,
        0,
        5000 * US + ageing - 1,
        frame(mac(2), mac(1), 60),
        far,
    );
    assert_eq!(ports_of(&out), vec![1]);
}

#[test]
fn timing_is_serialization_plus_latency_per_hop_and_queues_wait() {
    let mut slow = port(1, 8);
    slow.bandwidth = GBIT / 10;
    slow.latency = 7 * US;
    let (mut s, _stats) = switch(&[port(0, 8), slow], Tick::MAX);
    // (60 + 24) bytes at 1 Gbit/s: 672 ns; at 100 Mbit/s: 6.72 us.
    assert_eq!(s.wire(0).serialize(60), 672_000);
    assert_eq!(s.wire(1).serialize(60), 6_720_000);
    let t = 50 * US;
    let out = send(&mut s, 0, t, frame(BROADCAST, mac(1), 60), Tick::MAX);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].start, t, "store and forward: out as soon as in");
    assert_eq!(out[0].at, t + 6_720_000 + 7 * US);
    // Three more arriving 1 us apart wait for the cable, back to back.
    for k in 1..4u64 {
        s.post(0, k, 0, t + k * US, frame(BROADCAST, mac(1), 60));
    }
    let out = s.service(Tick::MAX, 0);
    let starts: Vec<Tick> = out.iter().map(|e| e.start).collect();
    assert_eq!(
        starts,
        vec![t + 6_720_000, t + 2 * 6_720_000, t + 3 * 6_720_000]
    );
    assert!(out.iter().all(|e| e.at == e.start + 6_720_000 + 7 * US));
    // Once the queue has drained, a frame starts at its arrival again.
    let later = t + 100 * US;
    let out = send(&mut s, 0, later, frame(BROADCAST, mac(1), 60), Tick::MAX);
    assert_eq!(out[0].start, later);
}

#[test]
fn a_full_output_queue_drops_and_counts() {
    // Port 1 is ten times slower and holds 4 frames; port 2 is fast and
    // holds 64.
    let mut slow = port(1, 4);
    slow.bandwidth = GBIT / 10;
    let (mut s, stats) = switch(&[port(0, 64), slow, port(2, 64)], Tick::MAX);
    // Ten 1514-byte broadcasts back to back at 1 Gbit/s (12.304 us apart).
    let ser = s.wire(0).serialize(1514);
    assert_eq!(ser, 12_304_000);
    for k in 0..10u64 {
        s.post(
            0,
            k,
            k * ser,
            (k + 1) * ser + 10 * US,
            frame(BROADCAST, mac(1), 1514),
        );
    }
    let out = s.service(Tick::MAX, 0);
    // Port 1 drains one frame per 123.04 us: the first 4 fit, the other 6
    // (all arriving within 123 us of the first) find the queue full.
    let to1: Vec<&Egress> = out.iter().filter(|e| e.port == 1).collect();
    assert_eq!(to1.len(), 4);
    assert_eq!(stat(&stats, "sw.port1.floodedFrames"), 4.0);
    assert_eq!(stat(&stats, "sw.port1.droppedFrames"), 6.0);
    assert_eq!(stat(&stats, "sw.port1.droppedBytes"), 6.0 * 1514.0);
    assert_eq!(stat(&stats, "sw.port1.queuePeak"), 4.0);
    assert_eq!(stat(&stats, "sw.port1.queueBytesPeak"), 4.0 * 1514.0);
    // Drop tail: the frames that got through are the first four.
    let firsts: Vec<u64> = to1.iter().map(|e| e.seq).collect();
    assert!(firsts.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(to1[0].start, ser + 10 * US);
    // Port 2 keeps up.
    assert_eq!(stat(&stats, "sw.port2.floodedFrames"), 10.0);
    assert_eq!(stat(&stats, "sw.port2.droppedFrames"), 0.0);
    assert_eq!(stat(&stats, "sw.port2.queuePeak"), 1.0);
    // When the first frame has left port 1, one more fits.
    let gone = to1[0].start + s.wire(1).serialize(1514);
    let out = send(&mut s, 0, gone, frame(BROADCAST, mac(1), 1514), Tick::MAX);
    assert_eq!(ports_of(&out), vec![1, 2]);
    let out = send(&mut s, 0, gone, frame(BROADCAST, mac(1), 1514), Tick::MAX);
    assert_eq!(ports_of(&out), vec![2], "full again");
}

#[test]
fn a_byte_limit_drops_what_does_not_fit() {
    let mut p1 = port(1, 64);
    p1.queue_bytes = Some(3000);
    p1.bandwidth = GBIT / 100;
    let (mut s, stats) = switch(&[port(0, 64), p1], Tick::MAX);
    for k in 0..3u64 {
        s.post(0, k, 0, US + k, frame(BROADCAST, mac(1), 1400));
    }
    // Two of 1400 fit in 3000 bytes; a small one still fits after them.
    s.post(0, 3, 0, US + 3, frame(BROADCAST, mac(1), 100));
    let out = s.service(Tick::MAX, 0);
    assert_eq!(out.len(), 3);
    assert_eq!(stat(&stats, "sw.port1.droppedFrames"), 1.0);
    assert_eq!(stat(&stats, "sw.port1.queueBytesPeak"), 2900.0);
}

#[test]
fn frames_are_handled_in_arrival_order_up_to_the_horizon_whatever_the_posting_order() {
    let run = |order: &[usize]| {
        let ports = [port(0, 2), port(1, 2), port(2, 2), port(3, 2)];
        let (mut s, _stats) = switch(&ports, Tick::MAX);
        // Three senders aim at port 3 (a queue of 2, 672 ns a frame) with
        // frames arriving together, 100 ns later, and much later.
        let posts = [
            (0usize, 0u64, 40 * US),
            (1, 0, 40 * US),
            (2, 0, 40 * US + 100_000),
            (1, 1, 90 * US),
        ];
        for &i in order {
            let (p, o, at) = posts[i];
            s.post(p, o, 0, at, frame(mac(9), mac(p as u8 + 1), 60));
        }
        // The horizon leaves the frame at 90 us waiting.
        let out = s.service(50 * US, 0);
        assert!(s.busy());
        assert_eq!(s.next_activity(), Some(80 * US), "90 us less 10 us");
        let rest = s.service(100 * US, 0);
        assert!(!s.busy() && s.next_activity().is_none());
        (out, rest)
    };
    let (a, rest_a) = run(&[0, 1, 2, 3]);
    let (b, rest_b) = run(&[3, 2, 1, 0]);
    assert_eq!(a, b);
    assert_eq!(rest_a, rest_b);
    // Port 0's frame and port 1's arrived together: port 0 first; the
    // third found port 3's queue full.
    let to3 = |out: &[Egress]| {
        out.iter()
            .filter(|e| e.port == 3)
            .map(|e| e.frame[11])
            .collect::<Vec<_>>()
    };
    assert_eq!(to3(&a), vec![1, 2]);
    assert_eq!(to3(&rest_a), vec![2]);
}

#[test]
fn the_table_is_bounded() {
    let (mut s, stats) = switch(&[port(0, 64), port(1, 64)], Tick::MAX);
    for k in 0..MAC_TABLE_CAPACITY as u32 + 10 {
        let b = k.to_be_bytes();
        let src = [2, 0, b[0], b[1], b[2], b[3]];
        s.post(0, u64::from(k), 0, US, frame(BROADCAST, src, 60));
    }
    s.service(Tick::MAX, 0);
    assert_eq!(s.table.len(), MAC_TABLE_CAPACITY);
    assert_eq!(stat(&stats, "sw.macTableFull"), 10.0);
}

#[test]
fn saved_state_restores_identically() {
    let ports = [port(0, 3), port(1, 3), port(2, 3)];
    let (mut a, _sa) = switch(&ports, 500 * US);
    a.post(1, 0, 0, 10 * US, frame(BROADCAST, mac(2), 200));
    a.post(0, 0, 0, 11 * US, frame(mac(2), mac(1), 300));
    a.post(0, 1, 0, 12 * US, frame(mac(2), mac(1), 300));
    a.post(0, 2, 0, 80 * US, frame(mac(2), mac(1), 300));
    a.service(50 * US, 0);
    let saved = a.save();
    let json = serde_json::to_string(&saved).unwrap();
    let (mut b, _sb) = switch(&ports, 500 * US);
    b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(b.save(), saved);
    // Both go on the same way.
    for s in [&mut a, &mut b] {
        s.post(2, 0, 0, 60 * US, frame(mac(1), mac(3), 100));
    }
    assert_eq!(a.service(Tick::MAX, 0), b.service(Tick::MAX, 0));
    assert_eq!(a.save(), b.save());
}

#[test]
fn hostile_saved_states_are_refused() {
    let ports = [port(0, 3), port(1, 3)];
    let (mut a, _sa) = switch(&ports, 500 * US);
    a.post(0, 0, 0, 10 * US, frame(BROADCAST, mac(1), 200));
    a.post(0, 1, 0, 90 * US, frame(BROADCAST, mac(1), 200));
    a.service(50 * US, 0);
    let good = a.save();
    type Edit = Box<dyn Fn(&mut SwitchSaved)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("name", Box::new(|s| s.name = "other".into())),
        ("ports", Box::new(|s| s.ports.pop().map(|_| ()).unwrap())),
        ("table[0]", Box::new(|s| s.table[0].1 = 7)),
        ("table[0]", Box::new(|s| s.table[0].0 = "zz".into())),
        (
            "table",
            Box::new(|s| {
                s.table = (0..=MAC_TABLE_CAPACITY)
                    .map(|k| (format!("02:00:00:00:{:02x}:{:02x}", k >> 8, k & 255), 0, 0))
                    .collect()
            }),
        ),
        (
            "ports[1].queue",
            Box::new(|s| s.ports[1].queue = vec![(1, 60); 4]),
        ),
        (
            "ports[1].queue[0]",
            Box::new(|s| s.ports[1].queue[0].1 = 9000),
        ),
        ("ports[1].queue[0]", Box::new(|s| s.ports[1].free = 0)),
        ("pending[0]", Box::new(|s| s.pending[0].port = 2)),
        (
            "pending[0]",
            Box::new(|s| s.pending[0].frame = vec![0u8; 3].into()),
        ),
        (
            "ports[0].records[0]",
            Box::new(|s| s.ports[0].records = vec![(0, 0, 0, "x".into())]),
        ),
    ];
    for (field, edit) in cases {
        let mut bad = good.clone();
        edit(&mut bad);
        let (mut b, _sb) = switch(&ports, 500 * US);
        let before = b.save();
        let e = b.restore(&bad).unwrap_err();
        assert!(e.starts_with(field), "{field}: {e}");
        assert_eq!(b.save(), before, "{field}: nothing changed");
    }
}
