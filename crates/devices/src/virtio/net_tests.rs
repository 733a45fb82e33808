//! Device tests of the virtio network device: a driver written here
//! programs both queues in a guest RAM of its own, on a fake clock.

use std::sync::{Arc, Mutex};

use mem::{AccessCtx, BusDevice, Space, TimedDevice};
use sim::tick::{TICKS_PER_NS, TICKS_PER_US};
use sim::{Stats, Tick};
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::net::*;
use super::*;
use crate::irq::tests::Recorder;
use crate::irq::IrqLine;

const RAM: u64 = 1 << 20;
/// Rings of queue q at RINGS + q * 0x4000: descriptors, avail, used.
const RINGS: u64 = 0x1000;
const BUFS: u64 = 0x20000;
const MAC: [u8; 6] = [0x02, 0x6b, 0x76, 0x00, 0x00, 0x01];
/// 1 GB/s: one byte per ns.
const WIRE: Wire = Wire {
    latency: 10 * TICKS_PER_US,
    bandwidth: 1_000_000_000,
};

struct Rig {
    dev: VirtioMmio<Net>,
    mem: GuestMemoryMmap,
    irqs: Arc<Mutex<Recorder>>,
    stats: Stats,
    next_desc: [u16; 2],
    avail_idx: [u16; 2],
    now: Tick,
}

fn ring(q: usize) -> (u64, u64, u64) {
    let b = RINGS + q as u64 * 0x4000;
    (b, b + 0x1000, b + 0x2000)
}

impl Rig {
    fn new(wire: Option<Wire>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let mut stats = Stats::new();
        let net = Net::new(MAC, wire, &mut stats, "nic0").unwrap();
        let irqs = Arc::new(Mutex::new(Recorder::default()));
        let line = IrqLine::none().to(irqs.clone(), 17);
        let dev = VirtioMmio::new(net, mem.clone(), line, &mut stats, "nic0").unwrap();
        Rig {
            dev,
            mem,
            irqs,
            stats,
            next_desc: [0; 2],
            avail_idx: [0; 2],
            now: 0,
        }
    }

    fn w(&mut self, off: u32, v: u32) {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(self.now, &mut reqs);
        self.dev
            .write(Space::Mmio, u64::from(off), &v.to_le_bytes(), &mut ctx);
    }

    fn r(&mut self, off: u32) -> u32 {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(self.now, &mut reqs);
        let mut d = [0u8; 4];
        self.dev.read(Space::Mmio, u64::from(off), &mut d, &mut ctx);
        u32::from_le_bytes(d)
    }

    /// The Linux driver's sequence with both queues.
    fn ready(wire: Option<Wire>) -> Self {
        let mut r = Rig::new(wire);
        r.init();
        r
    }

    fn init(&mut self) {
        let r = self;
        r.next_desc = [0; 2];
        r.avail_idx = [0; 2];
        let f = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);
        r.w(VIRTIO_MMIO_STATUS, 0);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        r.w(VIRTIO_MMIO_STATUS, s);
        r.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        r.w(VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
        r.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        r.w(VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        r.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        for q in 0..2 {
            let (d, a, u) = ring(q);
            r.w(VIRTIO_MMIO_QUEUE_SEL, q as u32);
            r.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
            r.w(VIRTIO_MMIO_QUEUE_DESC_LOW, d as u32);
            r.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, a as u32);
            r.w(VIRTIO_MMIO_QUEUE_USED_LOW, u as u32);
            r.w(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        r.w(
            VIRTIO_MMIO_STATUS,
            s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_ne!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(ring(q).0 + 16 * u64::from(i));
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    fn publish(&mut self, q: usize, head: u16, notify: bool) {
        let avail = ring(q).1;
        let slot = u64::from(self.avail_idx[q] % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx[q], GuestAddress(avail + 2))
            .unwrap();
        if notify {
            self.w(VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
        }
    }

    /// Puts a chain of (addr, len, device-writable) on queue `q`.
    fn submit(&mut self, q: usize, parts: &[(u64, u32, bool)], notify: bool) -> u16 {
        let head = self.next_desc[q];
        for (k, &(addr, len, wr)) in parts.iter().enumerate() {
            let i = self.next_desc[q];
            self.next_desc[q] = (self.next_desc[q] + 1) % QUEUE_SIZE;
            let more = k + 1 < parts.len();
            let flags = (if wr { 2 } else { 0 }) | (if more { 1 } else { 0 });
            self.desc(q, i, addr, len, flags, self.next_desc[q]);
        }
        self.publish(q, head, notify);
        head
    }

    /// Writes a header (flags, gso) and frame at `at` and submits them as
    /// one transmit buffer.
    fn send(&mut self, at: u64, frame: &[u8], flags: u8, gso: u8) -> u16 {
        let mut hdr = [0u8; HDR_LEN];
        hdr[0] = flags;
        hdr[1] = gso;
        self.mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(at + HDR_LEN as u64))
            .unwrap();
        self.submit(
            TX_QUEUE,
            &[(at, (HDR_LEN + frame.len()) as u32, false)],
            true,
        )
    }

    fn run_until(&mut self, until: Tick) {
        while let Some(d) = mem::service_tick(self.dev.next_deadline(), self.now) {
            if d > until {
                break;
            }
            self.now = d;
            let mut reqs = vec![];
            let mut ctx = AccessCtx::new(d, &mut reqs);
            self.dev.on_deadline(&mut ctx);
            assert!(self.dev.next_deadline().is_none_or(|n| n > d));
        }
        self.now = self.now.max(until);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(ring(q).2 + 2)).unwrap()
    }

    fn used(&self, q: usize, n: u16) -> (u32, u32) {
        let a = ring(q).2 + 4 + 8 * u64::from(n % QUEUE_SIZE);
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    fn stat(&self, name: &str) -> f64 {
        self.stats
            .dump(self.now)
            .get(&format!("nic0.{name}"))
            .unwrap()
            .as_f64()
    }

    fn deliver(&mut self, frame: &[u8]) {
        let f: Arc<[u8]> = frame.into();
        self.dev.act(|d, q, m, live| d.deliver(f, q, m, live));
    }

    fn needs_reset(&mut self) -> bool {
        self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    fn pulses(&self) -> usize {
        self.irqs.lock().unwrap().0.iter().filter(|e| e.1).count()
    }
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&[0x02, 0x6b, 0x76, 0, 0, 2]);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f
}

#[test]
fn identifies_itself_and_reports_its_mac_and_link() {
    let mut r = Rig::new(None);
    assert_eq!(r.r(VIRTIO_MMIO_DEVICE_ID), 1);
    r.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let f = r.r(VIRTIO_MMIO_DEVICE_FEATURES);
    assert_eq!(f, (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS));
    r.w(VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(r.r(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    r.w(VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(r.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "two queues only");
    let mut cfg = [0u8; 8];
    let mut reqs = vec![];
    let mut ctx = AccessCtx::new(0, &mut reqs);
    r.dev.read(Space::Mmio, 0x100, &mut cfg, &mut ctx);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    // Byte reads at any offset, past the end reads zero.
    let mut b = [0u8; 1];
    r.dev.read(Space::Mmio, 0x105, &mut b, &mut ctx);
    assert_eq!(b[0], MAC[5]);
    r.dev.read(Space::Mmio, 0x1ff, &mut b, &mut ctx);
    assert_eq!(b[0], 0);
    assert_eq!(format_mac(&MAC), "02:6b:76:00:00:01");
    assert_eq!(parse_mac("02:6b:76:00:00:01"), Some(MAC));
    assert_eq!(parse_mac("02:6b:76:00:00"), None);
    assert_eq!(parse_mac("02:6b:76:00:00:01:07"), None);
    assert_eq!(parse_mac("02:6b:76:00:00:zz"), None);
}

#[test]
fn a_frame_leaves_after_its_serialization_and_arrives_after_the_latency() {
    let mut r = Rig::ready(Some(WIRE));
    r.now = 1000;
    let f = frame(1000, 0xab);
    let head = r.send(BUFS, &f, 0, 0);
    // (1000 + 24 bytes) at one byte per ns.
    let ser = 1024 * TICKS_PER_NS;
    assert_eq!(r.dev.next_deadline(), Some(1000 + ser));
    let sent = r.dev.device_mut().take_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].at, 1000 + ser + WIRE.latency);
    assert_eq!(sent[0].sent, 1000);
    assert_eq!(&*sent[0].data, &f[..]);
    assert_eq!(r.used_idx(TX_QUEUE), 0, "the buffer is still on the wire");
    r.run_until(1000 + ser - 1);
    assert_eq!(r.used_idx(TX_QUEUE), 0);
    r.run_until(1000 + ser);
    assert_eq!(r.used_idx(TX_QUEUE), 1);
    assert_eq!(r.used(TX_QUEUE, 0), (u32::from(head), 0));
    assert!(r.pulses() >= 1);
    assert_eq!(r.stat("txFrames"), 1.0);
    assert_eq!(r.stat("txBytes"), 1000.0);
    assert!(r.dev.device_mut().take_sent().is_empty(), "taken once");
}

#[test]
fn back_to_back_frames_share_the_wire() {
    let mut r = Rig::ready(Some(WIRE));
    for k in 0..3u64 {
        r.send(BUFS + k * 0x1000, &frame(476, k as u8), 0, 0);
    }
    let ser = 500 * TICKS_PER_NS;
    let at: Vec<Tick> = r
        .dev
        .device_mut()
        .take_sent()
        .iter()
        .map(|f| f.at)
        .collect();
    assert_eq!(
        at,
        vec![
            ser + WIRE.latency,
            2 * ser + WIRE.latency,
            3 * ser + WIRE.latency
        ]
    );
    assert_eq!(r.stat("txQueue"), 3.0);
    r.run_until(2 * ser);
    assert_eq!(r.used_idx(TX_QUEUE), 2);
    r.run_until(3 * ser);
    assert_eq!(r.used_idx(TX_QUEUE), 3);
}

#[test]
fn a_received_frame_lands_in_a_buffer_with_a_header() {
    let mut r = Rig::ready(Some(WIRE));
    let buf = BUFS;
    let head = r.submit(RX_QUEUE, &[(buf, (HDR_LEN + 1518) as u32, true)], true);
    let f = frame(100, 0x5a);
    let before = r.pulses();
    r.deliver(&f);
    assert_eq!(r.used_idx(RX_QUEUE), 1);
    assert_eq!(
        r.used(RX_QUEUE, 0),
        (u32::from(head), (HDR_LEN + 100) as u32)
    );
    let mut hdr = [0xffu8; HDR_LEN];
    r.mem.read_slice(&mut hdr, GuestAddress(buf)).unwrap();
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers 1");
    let mut got = vec![0u8; 100];
    r.mem
        .read_slice(&mut got, GuestAddress(buf + HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, f);
    assert!(r.pulses() > before, "the driver is interrupted");
    assert_eq!(r.stat("rxFrames"), 1.0);
    assert_eq!(r.stat("rxBytes"), 100.0);
    // A chain of two writable parts (header apart) works too.
    r.submit(
        RX_QUEUE,
        &[(buf, HDR_LEN as u32, true), (buf + 0x100, 1518, true)],
        true,
    );
    r.deliver(&f);
    r.mem
        .read_slice(&mut got, GuestAddress(buf + 0x100))
        .unwrap();
    assert_eq!(got, f);
}

#[test]
fn frames_wait_for_buffers_in_a_bounded_backlog() {
    let mut r = Rig::ready(Some(WIRE));
    for k in 0..RX_BACKLOG + 10 {
        r.deliver(&frame(60, k as u8));
    }
    assert_eq!(r.dev.device().backlog(), RX_BACKLOG);
    assert_eq!(r.stat("rxDropped"), 10.0);
    assert_eq!(r.stat("rxBacklogPeak"), RX_BACKLOG as f64);
    // Buffers posted without a notification are found at the next one.
    for k in 0..4u64 {
        r.submit(RX_QUEUE, &[(BUFS + k * 0x800, 0x800, true)], k == 3);
    }
    assert_eq!(r.used_idx(RX_QUEUE), 4);
    assert_eq!(r.dev.device().backlog(), RX_BACKLOG - 4);
    let mut first = [0u8; 1];
    r.mem
        .read_slice(&mut first, GuestAddress(BUFS + HDR_LEN as u64 + 59))
        .unwrap();
    assert_eq!(first[0], 0, "the oldest frame first");
    assert_eq!(r.stat("rxFrames"), 4.0);
}

#[test]
fn malformed_transmissions_are_dropped_and_counted_not_fatal() {
    let mut r = Rig::ready(Some(WIRE));
    r.send(BUFS, &frame(MIN_FRAME, 0)[..MIN_FRAME - 1], 0, 0);
    r.send(BUFS, &vec![0u8; MAX_FRAME + 1], 0, 0);
    r.send(BUFS, &frame(60, 0), 1, 0); // NEEDS_CSUM, not offered
    r.send(BUFS, &frame(60, 0), 0, 1); // GSO TCPv4, not offered
    r.submit(TX_QUEUE, &[(BUFS, 4, false)], true); // shorter than a header
    r.submit(
        TX_QUEUE,
        &[(BUFS, 80, false), (BUFS + 0x1000, 10, true)],
        true,
    );
    r.submit(TX_QUEUE, &[(RAM - 16, 80, false)], true); // past RAM
    assert_eq!(r.stat("txShortFrames"), 1.0);
    assert_eq!(r.stat("txLongFrames"), 1.0);
    assert_eq!(r.stat("badHeaders"), 3.0);
    assert_eq!(r.stat("badChains"), 2.0);
    assert_eq!(r.stat("txDropped"), 7.0);
    assert_eq!(r.stat("txFrames"), 0.0);
    assert!(r.dev.device_mut().take_sent().is_empty());
    r.run_until(0);
    assert_eq!(r.used_idx(TX_QUEUE), 7, "every buffer back, at once");
    assert!(!r.needs_reset());
    // A good frame still goes.
    r.send(BUFS, &frame(60, 1), 0, 0);
    assert_eq!(r.dev.device_mut().take_sent().len(), 1);
}

#[test]
fn unusable_receive_buffers_drop_the_frame_and_come_back_empty() {
    let mut r = Rig::ready(Some(WIRE));
    r.submit(RX_QUEUE, &[(BUFS, 64, true)], true); // too small for 100 + 12
    r.submit(RX_QUEUE, &[(BUFS, 0x800, false)], true); // readable
    r.submit(RX_QUEUE, &[(RAM - 8, 0x800, true)], true); // past RAM
    for _ in 0..3 {
        r.deliver(&frame(100, 1));
    }
    assert_eq!(r.used_idx(RX_QUEUE), 3);
    for n in 0..3 {
        assert_eq!(r.used(RX_QUEUE, n).1, 0);
    }
    assert_eq!(r.stat("rxSmallBuffers"), 1.0);
    assert_eq!(r.stat("badChains"), 2.0);
    assert_eq!(r.stat("rxDropped"), 3.0);
    // Frames from the wire that are not frames are dropped on arrival.
    r.deliver(&[0u8; 10]);
    r.deliver(&vec![0u8; MAX_FRAME + 1]);
    assert_eq!(r.stat("rxDropped"), 5.0);
    assert!(!r.needs_reset());
}

#[test]
fn a_looping_chain_needs_a_reset_and_a_reset_recovers() {
    let mut r = Rig::ready(Some(WIRE));
    r.desc(TX_QUEUE, 0, BUFS, 80, 1, 1);
    r.desc(TX_QUEUE, 1, BUFS, 80, 1, 0);
    r.publish(TX_QUEUE, 0, true);
    assert!(r.needs_reset());
    assert_eq!(r.stat("needsReset"), 1.0);
    // Frames arriving now are dropped: the driver does not run.
    r.deliver(&frame(60, 0));
    assert_eq!(r.dev.device().backlog(), 0);
    let mut r2 = Rig::ready(Some(WIRE));
    r2.submit(RX_QUEUE, &[(BUFS, 0x800, true)], true);
    r2.desc(RX_QUEUE, 1, BUFS, 80, 3, 1);
    r2.publish(RX_QUEUE, 1, true);
    r2.deliver(&frame(60, 0));
    r2.deliver(&frame(60, 0));
    assert!(r2.needs_reset(), "a receive chain looping");
    // The driver resets and sets the device up again: it works.
    r.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r.r(VIRTIO_MMIO_STATUS), 0);
    for q in 0..2 {
        let (d, a, u) = ring(q);
        for at in [d, a, u] {
            r.mem.write_slice(&[0u8; 0x1000], GuestAddress(at)).unwrap();
        }
    }
    r.init();
    assert!(!r.needs_reset());
    r.submit(RX_QUEUE, &[(BUFS, 0x800, true)], true);
    r.deliver(&frame(60, 0));
    assert_eq!(r.used_idx(RX_QUEUE), 1);
}

#[test]
fn an_unconnected_nic_drops_what_it_sends() {
    let mut r = Rig::ready(None);
    r.send(BUFS, &frame(60, 0), 0, 0);
    assert_eq!(r.stat("txNoLink"), 1.0);
    assert_eq!(r.stat("txDropped"), 1.0);
    assert!(r.dev.device_mut().take_sent().is_empty());
    r.run_until(0);
    assert_eq!(r.used_idx(TX_QUEUE), 1);
}

#[test]
fn transmission_is_bounded_by_the_queue() {
    // A slow wire: the guest cannot have more than a queue's worth out.
    let slow = Wire {
        latency: WIRE.latency,
        bandwidth: 1000,
    };
    let mut r = Rig::ready(Some(slow));
    for k in 0..300u32 {
        r.send(BUFS + u64::from(k) * 0x80, &frame(60, k as u8), 0, 0);
    }
    assert_eq!(r.dev.device().tx_in_flight(), usize::from(QUEUE_SIZE));
    assert_eq!(r.stat("txFrames"), f64::from(QUEUE_SIZE));
    assert_eq!(r.stat("txDropped"), 0.0, "the rest waits in the ring");
    // As buffers come back, the waiting ones are taken.
    let one = slow.serialize(60);
    r.run_until(one);
    assert_eq!(r.used_idx(TX_QUEUE), 1);
    assert_eq!(r.stat("txFrames"), f64::from(QUEUE_SIZE) + 1.0);
}

#[test]
fn saved_state_round_trips_and_bad_states_are_refused() {
    let mut r = Rig::ready(Some(WIRE));
    r.send(BUFS, &frame(200, 7), 0, 0);
    r.deliver(&frame(80, 9));
    let saved = VirtioDevice::save(r.dev.device());
    let text = serde_json::to_string(&saved).unwrap();
    let mut fresh = Rig::ready(Some(WIRE));
    let back: mem::SavedState = serde_json::from_str(&text).unwrap();
    VirtioDevice::restore(fresh.dev.device_mut(), &back).unwrap();
    assert_eq!(fresh.dev.device().save_state(), r.dev.device().save_state());
    assert_eq!(fresh.dev.device().backlog(), 1);
    assert_eq!(fresh.dev.next_deadline(), r.dev.next_deadline());
    let good = r.dev.device().save_state();
    let sent = fresh.dev.device_mut().take_sent();
    assert_eq!(sent, r.dev.device_mut().take_sent());
    assert_eq!(sent.len(), 1);

    let refuse = |f: &dyn Fn(&mut NetSaved), what: &str| {
        let mut s = good.clone();
        f(&mut s);
        let mut n = Rig::ready(Some(WIRE));
        let before = n.dev.device().save_state();
        let e = VirtioDevice::restore(n.dev.device_mut(), &serde_json::to_value(&s).unwrap())
            .unwrap_err();
        assert!(e.0.contains(what), "{what}: {e}");
        assert_eq!(n.dev.device().save_state(), before, "left as it was");
    };
    refuse(&|s| s.mac = "02:00:00:00:00:09".into(), "mac");
    refuse(&|s| s.tx.push((QUEUE_SIZE, 0)), "tx[1]");
    refuse(&|s| s.tx.push((1, 0)), "before tx[0]");
    refuse(&|s| s.backlog.push("zz".into()), "backlog[1]");
    refuse(
        &|s| s.backlog.push("00".into()),
        "backlog[1]: a frame of 1 bytes",
    );
    refuse(
        &|s| s.backlog = vec!["00".repeat(60); RX_BACKLOG + 1],
        "backlog:",
    );
    refuse(&|s| s.outbox[0].2.push('0'), "outbox[0]");
    let mut n = Rig::ready(Some(WIRE));
    let e = VirtioDevice::restore(n.dev.device_mut(), &serde_json::json!({"mac": 1})).unwrap_err();
    assert!(e.0.contains("mac"), "{e}");
    // The whole transport (registers, both queues, the NIC) round-trips,
    // and garbage is refused.
    let mut fresh = Rig::ready(Some(WIRE));
    crate::state::tests::round_trip(&r.dev, &mut fresh.dev);
    crate::state::tests::refuses_garbage(&mut fresh.dev);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random descriptors, rings and frames: no panic, bounded queues,
        /// deadlines move forward.
        #[test]
        fn hostile_driver_is_safe(
            ops in proptest::collection::vec(
                (0u8..6, any::<u16>(), any::<u64>(), any::<u32>(), any::<u16>()),
                1..80,
            )
        ) {
            let mut r = Rig::ready(Some(WIRE));
            for (op, i, addr, len, flags) in ops {
                let q = usize::from(i & 1);
                match op {
                    0 => r.desc(q, i % QUEUE_SIZE, addr % (RAM + 0x1000), len % 4096, flags & 7, i.rotate_right(3) % QUEUE_SIZE),
                    1 => r.publish(q, i, true),
                    2 => r.deliver(&vec![0x11; (len % 2000) as usize]),
                    3 => r.run_until(r.now + u64::from(len % 100_000)),
                    4 => r.w(VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(i % 3)),
                    _ => {
                        let mut d = [0u8; 4];
                        let mut reqs = vec![];
                        let mut ctx = AccessCtx::new(r.now, &mut reqs);
                        r.dev.read(Space::Mmio, u64::from(i) % 0x200, &mut d, &mut ctx);
                    }
                }
                prop_assert!(r.dev.device().backlog() <= RX_BACKLOG);
                prop_assert!(r.dev.device().tx_in_flight() <= usize::from(QUEUE_SIZE));
            }
        }
    }
}
