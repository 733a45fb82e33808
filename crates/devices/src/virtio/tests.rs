//! Device tests of the virtio-mmio transport and the block device: a
//! driver written here programs the registers and the rings in a guest
//! RAM of its own, on a fake clock (no KVM).

use std::sync::{Arc, Mutex};

use mem::{AccessCtx, BusDevice, Space, TimedDevice};
use sim::tick::{TICKS_PER_SECOND, TICKS_PER_US};
use sim::{Stats, Tick};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::blk::{BlkTiming, Block, QUEUE_SIZE};
use super::*;
use crate::disk::{Disk, MemDisk};
use crate::irq::tests::Recorder;
use crate::irq::IrqLine;

pub const RAM: u64 = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
pub const DATA: u64 = 0x10000;

/// A disk the test can look at while the device owns it.
#[derive(Clone)]
pub struct Shared(pub Arc<Mutex<MemDisk>>);

impl Disk for Shared {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().size()
    }
    fn read_only(&self) -> bool {
        self.0.lock().unwrap().read_only()
    }
    fn read_at(&mut self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().read_at(o, b)
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().write_at(o, b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().flush()
    }
}

pub const TIMING: BlkTiming = BlkTiming {
    latency: 50 * TICKS_PER_US,
    bandwidth: 100_000_000, // 100 MB/s: 10 ns per byte
};

pub struct Rig {
    pub dev: VirtioMmio<Block>,
    pub mem: GuestMemoryMmap,
    pub disk: Shared,
    pub irqs: Arc<Mutex<Recorder>>,
    pub stats: Stats,
    /// Next free descriptor index and the driver's avail index.
    next_desc: u16,
    avail_idx: u16,
    pub now: Tick,
}

impl Rig {
    pub fn new(sectors: u64, read_only: bool) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let mut md = MemDisk::new(sectors);
        md.read_only = read_only;
        let disk = Shared(Arc::new(Mutex::new(md)));
        let mut stats = Stats::new();
        let blk = Block::new(
            Box::new(disk.clone()),
            TIMING,
            "kvmsim-test",
            &mut stats,
            "disk0",
        )
        .unwrap();
        let irqs = Arc::new(Mutex::new(Recorder::default()));
        let line = IrqLine::none().to(irqs.clone(), 16);
        let dev = VirtioMmio::new(blk, mem.clone(), line, &mut stats, "disk0").unwrap();
        Rig {
            dev,
            mem,
            disk,
            irqs,
            stats,
            next_desc: 0,
            avail_idx: 0,
            now: 0,
        }
    }

    pub fn w(&mut self, off: u32, v: u32) {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(self.now, &mut reqs);
        self.dev
            .write(Space::Mmio, u64::from(off), &v.to_le_bytes(), &mut ctx);
    }

    pub fn r(&mut self, off: u32) -> u32 {
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(self.now, &mut reqs);
        let mut d = [0u8; 4];
        self.dev.read(Space::Mmio, u64::from(off), &mut d, &mut ctx);
        u32::from_le_bytes(d)
    }

    /// The Linux driver's sequence: reset, ACK, DRIVER, features,
    /// FEATURES_OK, the queue, DRIVER_OK.
    pub fn init(&mut self, features: u64) -> u32 {
        self.w(VIRTIO_MMIO_STATUS, 0);
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.w(VIRTIO_MMIO_STATUS, s);
        if self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return self.r(VIRTIO_MMIO_STATUS);
        }
        self.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
        self.w(VIRTIO_MMIO_QUEUE_DESC_LOW, DESC as u32);
        self.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        self.w(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        self.w(VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        self.w(VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        self.w(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        self.next_desc = 0;
        self.avail_idx = 0;
        self.r(VIRTIO_MMIO_STATUS)
    }

    pub fn ready(sectors: u64) -> Self {
        let mut r = Rig::new(sectors, false);
        let s = r.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH));
        assert_ne!(s & VIRTIO_CONFIG_S_DRIVER_OK, 0, "status {s:#x}");
        r
    }

    /// Writes raw descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Makes head `head` available and notifies.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    /// Puts a chain of (addr, len, device-writable) in fresh descriptors
    /// and publishes it; returns its head.
    pub fn submit(&mut self, parts: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, wr)) in parts.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
            let more = k + 1 < parts.len();
            let flags = (if wr { 2 } else { 0 }) | (if more { 1 } else { 0 });
            self.desc(i, addr, len, flags, self.next_desc);
        }
        self.publish(head);
        head
    }

    /// A request header at `at`.
    pub fn header(&self, at: u64, ty: u32, sector: u64) {
        self.mem.write_obj(ty, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Runs the device's deadlines up to `until`.
    pub fn run_until(&mut self, until: Tick) {
        while let Some(d) = mem::service_tick(self.dev.next_deadline(), self.now) {
            if d > until {
                break;
            }
            self.now = d;
            let mut reqs = vec![];
            let mut ctx = AccessCtx::new(d, &mut reqs);
            self.dev.on_deadline(&mut ctx);
            assert!(
                self.dev.next_deadline().is_none_or(|n| n > d),
                "a deadline after on_deadline is later"
            );
        }
        self.now = self.now.max(until);
    }

    /// Runs until nothing is in flight (at most 10 simulated seconds on).
    pub fn settle(&mut self) {
        let t = self.now.saturating_add(10 * TICKS_PER_SECOND);
        self.run_until(t);
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used element `n`: (id, len).
    pub fn used(&self, n: u16) -> (u32, u32) {
        let a = USED + 4 + 8 * u64::from(n % QUEUE_SIZE);
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    pub fn stat(&self, name: &str) -> f64 {
        self.stats
            .dump(self.now)
            .get(&format!("disk0.{name}"))
            .unwrap()
            .as_f64()
    }

    pub fn status_byte(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// A read (IN) or write (OUT) request of `len` bytes at `sector`,
    /// header at `hdr`, data at `data`, status after the data.
    pub fn rw(&mut self, ty: u32, sector: u64, hdr: u64, data: u64, len: u32) -> u64 {
        self.header(hdr, ty, sector);
        let status = data + u64::from(len);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        self.submit(&[
            (hdr, 16, false),
            (data, len, ty == VIRTIO_BLK_T_IN),
            (status, 1, true),
        ]);
        status
    }

    fn needs_reset(&mut self) -> bool {
        self.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }
}

#[test]
fn identifies_itself_as_a_modern_block_device() {
    let mut r = Rig::new(8, false);
    assert_eq!(r.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r.r(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r.r(VIRTIO_MMIO_DEVICE_ID), 2);
    r.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(r.r(VIRTIO_MMIO_DEVICE_FEATURES), 1, "VERSION_1 (bit 32)");
    r.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let f = r.r(VIRTIO_MMIO_DEVICE_FEATURES);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(r.r(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    // Capacity in sectors at config offset 0, in any width.
    let mut reqs = vec![];
    let mut ctx = AccessCtx::new(0, &mut reqs);
    let mut d = [0u8; 8];
    r.dev.read(Space::Mmio, 0x100, &mut d, &mut ctx);
    assert_eq!(u64::from_le_bytes(d), 8);
    let mut b = [0u8; 1];
    r.dev.read(Space::Mmio, 0x100, &mut b, &mut ctx);
    assert_eq!(b[0], 8);
    let mut ro = Rig::new(8, true);
    assert_ne!(
        ro.r(VIRTIO_MMIO_DEVICE_FEATURES) & (1 << VIRTIO_BLK_F_RO),
        0
    );
}

#[test]
fn features_not_offered_or_legacy_drivers_are_refused() {
    let mut r = Rig::new(8, false);
    let s = r.init(1 << VIRTIO_BLK_F_FLUSH); // no VERSION_1
    assert_eq!(s & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    let s = r.init((1 << VIRTIO_F_VERSION_1) | (1 << 40));
    assert_eq!(s & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK is not taken: notifications do nothing.
    r.w(VIRTIO_MMIO_STATUS, 0);
    r.w(VIRTIO_MMIO_STATUS, 1 | 2 | 4);
    assert_eq!(r.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
}

#[test]
fn write_then_read_round_trip() {
    let mut r = Rig::ready(64);
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7 % 256) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let st = r.rw(VIRTIO_BLK_T_OUT, 3, 0x8000, DATA, 2048);
    assert_eq!(r.dev.device().inflight(), 1);
    assert!(
        r.disk.0.lock().unwrap().data[3 * 512..]
            .iter()
            .all(|&b| b == 0),
        "not before completion"
    );
    r.settle();
    assert_eq!(r.status_byte(st), VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        &r.disk.0.lock().unwrap().data[3 * 512..3 * 512 + 2048],
        &pattern[..]
    );
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used(0), (0, 1), "a write puts only the status byte");
    assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert_eq!(
        r.irqs.lock().unwrap().0,
        vec![(16, true), (16, false)],
        "one edge"
    );
    r.w(VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(r.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);

    let st = r.rw(VIRTIO_BLK_T_IN, 3, 0x8000, DATA + 0x4000, 2048);
    r.settle();
    assert_eq!(r.status_byte(st), VIRTIO_BLK_S_OK as u8);
    let mut back = vec![0u8; 2048];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x4000))
        .unwrap();
    assert_eq!(back, pattern);
    assert_eq!(r.used(1).1, 2049, "read data and status");
    assert_eq!(r.stat("reads"), 1.0);
    assert_eq!(r.stat("writes"), 1.0);
    assert_eq!(r.stat("bytesRead"), 2048.0);
    assert_eq!(r.stat("bytesWritten"), 2048.0);
    assert_eq!(r.stat("inflight"), 0.0);
}

#[test]
fn a_read_of_n_bytes_completes_at_latency_plus_n_over_bandwidth() {
    let mut r = Rig::ready(1024);
    r.now = 1_000_000;
    let n: u32 = 64 * 1024;
    let st = r.rw(VIRTIO_BLK_T_IN, 0, 0x8000, DATA, n);
    let want = 1_000_000 + TIMING.latency + u64::from(n) * TICKS_PER_SECOND / TIMING.bandwidth;
    assert_eq!(r.dev.next_deadline(), Some(want));
    assert_eq!(r.stat("inflight"), 1.0);
    r.run_until(want - 1);
    assert_eq!(r.status_byte(st), 0xff, "not complete one tick early");
    assert_eq!(r.used_idx(), 0);
    r.run_until(want);
    assert_eq!(r.status_byte(st), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.stat("totalLatency"), (want - 1_000_000) as f64);
}

#[test]
fn queued_requests_share_the_bandwidth() {
    let mut r = Rig::ready(1024);
    let n: u32 = 4096;
    let xfer = u64::from(n) * TICKS_PER_SECOND / TIMING.bandwidth;
    r.rw(VIRTIO_BLK_T_IN, 0, 0x8000, DATA, n);
    r.rw(VIRTIO_BLK_T_IN, 8, 0x8100, DATA + 0x2000, n);
    assert_eq!(r.dev.device().inflight(), 2);
    r.run_until(xfer + TIMING.latency);
    assert_eq!(r.used_idx(), 1);
    r.run_until(2 * xfer + TIMING.latency);
    assert_eq!(r.used_idx(), 2, "the second transfer follows the first");
    // A flush moves nothing: latency only.
    let t0 = r.now + 5;
    r.now = t0;
    r.header(0x8200, VIRTIO_BLK_T_FLUSH, 0);
    r.submit(&[(0x8200, 16, false), (0x8300, 1, true)]);
    assert_eq!(r.dev.next_deadline(), Some(t0 + TIMING.latency));
    r.run_until(t0 + TIMING.latency);
    assert_eq!(r.status_byte(0x8300), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.disk.0.lock().unwrap().flushes, 1);
    assert_eq!(r.stat("flushes"), 1.0);
}

#[test]
fn requests_past_the_end_fail_and_leave_the_disk_alone() {
    let mut r = Rig::ready(8);
    r.mem
        .write_slice(&[0xAB; 1024], GuestAddress(DATA))
        .unwrap();
    // Sector 7 + 2 sectors ends past sector 8.
    let a = r.rw(VIRTIO_BLK_T_OUT, 7, 0x8000, DATA, 1024);
    // A sector whose byte offset overflows.
    let b = r.rw(VIRTIO_BLK_T_IN, u64::MAX, 0x8100, DATA + 0x1000, 512);
    // Data that is not whole sectors.
    let c = r.rw(VIRTIO_BLK_T_OUT, 0, 0x8200, DATA, 100);
    // Data outside RAM.
    r.header(0x8300, VIRTIO_BLK_T_IN, 0);
    r.submit(&[
        (0x8300, 16, false),
        (RAM - 256, 512, true),
        (0x8400, 1, true),
    ]);
    // Unknown type.
    r.header(0x8500, 0x77, 0);
    r.submit(&[(0x8500, 16, false), (0x8600, 1, true)]);
    r.settle();
    for s in [a, b, c, 0x8400] {
        assert_eq!(r.status_byte(s), VIRTIO_BLK_S_IOERR as u8, "{s:#x}");
    }
    assert_eq!(r.status_byte(0x8600), VIRTIO_BLK_S_UNSUPP as u8);
    assert!(r.disk.0.lock().unwrap().data.iter().all(|&b| b == 0));
    assert_eq!(r.used_idx(), 5);
    assert!(
        !r.needs_reset(),
        "bad requests are answered, the device goes on"
    );
    assert_eq!(r.stat("errors"), 5.0);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let mut r = Rig::new(8, true);
    r.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_RO));
    r.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    let s = r.rw(VIRTIO_BLK_T_OUT, 0, 0x8000, DATA, 512);
    r.settle();
    assert_eq!(r.status_byte(s), VIRTIO_BLK_S_IOERR as u8);
    assert!(r.disk.0.lock().unwrap().data.iter().all(|&b| b == 0));
}

#[test]
fn get_id_returns_the_serial() {
    let mut r = Rig::ready(8);
    r.header(0x8000, VIRTIO_BLK_T_GET_ID, 0);
    r.submit(&[(0x8000, 16, false), (DATA, 20, true), (0x8100, 1, true)]);
    r.settle();
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"kvmsim-test");
    assert_eq!(r.used(0).1, 21);
}

#[test]
fn a_looping_chain_needs_a_reset_and_a_reset_recovers() {
    let mut r = Rig::ready(8);
    r.header(0x8000, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    r.desc(0, 0x8000, 16, 1, 1);
    r.desc(1, DATA, 512, 3, 0);
    r.publish(0);
    assert!(r.needs_reset());
    assert_ne!(
        r.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    assert_eq!(r.stat("needsReset"), 1.0);
    assert_eq!(r.dev.next_deadline(), None);
    // Further notifications are ignored until the driver resets.
    let s = r.rw(VIRTIO_BLK_T_IN, 0, 0x8100, DATA, 512);
    r.settle();
    assert_eq!(r.status_byte(s), 0xff);
    let st = r.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH));
    assert_eq!(st & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(st & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    let s = r.rw(VIRTIO_BLK_T_IN, 0, 0x8100, DATA, 512);
    r.settle();
    assert_eq!(r.status_byte(s), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn malformed_chains_need_a_reset() {
    // Readable after writable.
    let mut r = Rig::ready(8);
    r.header(0x8000, VIRTIO_BLK_T_IN, 0);
    r.submit(&[(0x8000, 16, false), (DATA, 512, true), (0x8100, 1, false)]);
    assert!(r.needs_reset());
    // No status byte (nothing writable).
    let mut r = Rig::ready(8);
    r.header(0x8000, VIRTIO_BLK_T_OUT, 0);
    r.submit(&[(0x8000, 16, false), (DATA, 512, false)]);
    assert!(r.needs_reset());
    // A header shorter than 16 bytes.
    let mut r = Rig::ready(8);
    r.submit(&[(0x8000, 8, false), (0x8100, 1, true)]);
    assert!(r.needs_reset());
    // A head index past the table.
    let mut r = Rig::ready(8);
    r.publish(QUEUE_SIZE + 3);
    assert!(r.needs_reset() || r.used_idx() == 0);
    // Rings outside RAM.
    let mut r = Rig::new(8, false);
    r.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH));
    r.w(VIRTIO_MMIO_STATUS, 0);
    r.w(VIRTIO_MMIO_STATUS, 1 | 2);
    r.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    r.w(VIRTIO_MMIO_DRIVER_FEATURES, 1);
    r.w(VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    r.w(VIRTIO_MMIO_QUEUE_NUM, 256);
    r.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_0000);
    r.w(VIRTIO_MMIO_QUEUE_READY, 1);
    r.w(VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    r.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert!(r.needs_reset());
}

#[test]
fn queue_settings_are_frozen_while_ready_and_sizes_checked() {
    let mut r = Rig::ready(8);
    // Moving the ring of a live queue is ignored: requests still work.
    r.w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0xdead_0000);
    r.w(VIRTIO_MMIO_QUEUE_NUM, 3);
    let s = r.rw(VIRTIO_BLK_T_IN, 0, 0x8000, DATA, 512);
    r.settle();
    assert_eq!(r.status_byte(s), VIRTIO_BLK_S_OK as u8);
    assert!(r.stat("badRegisterAccesses") >= 2.0);
    // Odd widths and offsets are ignored, never panic.
    let mut reqs = vec![];
    let mut ctx = AccessCtx::new(0, &mut reqs);
    for off in [0u64, 1, 0x33, 0x50, 0xff, 0x100, 0x1ff, u64::MAX] {
        for len in [0usize, 1, 2, 3, 8, 16] {
            let mut d = vec![0xa5u8; len];
            r.dev.read(Space::Mmio, off, &mut d, &mut ctx);
            r.dev.write(Space::Mmio, off, &d, &mut ctx);
        }
    }
}

proptest::proptest! {
    /// Any sequence of register writes, descriptor table contents and
    /// notifications: no panic, the in-flight list stays bounded, every
    /// deadline moves forward, and a read-only disk is never written.
    #[test]
    fn hostile_driver_is_safe(
        ops in proptest::collection::vec(
            (0u8..6, proptest::prelude::any::<u16>(), proptest::prelude::any::<u64>(), proptest::prelude::any::<u32>()),
            0..80),
        ro in proptest::prelude::any::<bool>(),
    ) {
        let mut r = Rig::new(16, ro);
        r.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | if ro { 1 << VIRTIO_BLK_F_RO } else { 0 });
        for (op, a, b, c) in ops {
            match op {
                0 => r.w(u32::from(a) & 0x1fc, c),
                1 => r.desc(a % QUEUE_SIZE, b % (RAM + 0x1000), c % 0x4000, a >> 8, (c >> 16) as u16),
                2 => r.header(DATA + u64::from(a % 64) * 32, c % 16, b % 24),
                3 => r.publish(a),
                4 => { let t = r.now + u64::from(c); r.run_until(t); }
                _ => { let _ = r.mem.write_obj(b, GuestAddress(u64::from(a) % RAM)); }
            }
            proptest::prop_assert!(r.dev.device().inflight() <= usize::from(QUEUE_SIZE));
        }
        r.settle();
        if ro {
            proptest::prop_assert!(r.disk.0.lock().unwrap().data.iter().all(|&b| b == 0));
        }
    }
}

/// A second rig showing what `a` shows: the same guest RAM and disk
/// contents (a checkpoint saves those elsewhere) and `a`'s saved state,
/// sent through a string.
fn restored_copy(a: &Rig) -> Rig {
    let sectors = a.disk.0.lock().unwrap().size() / crate::disk::SECTOR_SIZE;
    let mut b = Rig::new(sectors, false);
    let mut ram = vec![0u8; RAM as usize];
    a.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
    b.mem.write_slice(&ram, GuestAddress(0)).unwrap();
    let contents = a.disk.0.lock().unwrap().data.clone();
    b.disk.0.lock().unwrap().data = contents;
    crate::state::tests::round_trip(&a.dev, &mut b.dev);
    (b.next_desc, b.avail_idx, b.now) = (a.next_desc, a.avail_idx, a.now);
    b
}

#[test]
fn saved_state_restores_identically() {
    let mut a = Rig::ready(64);
    a.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    let w = a.rw(VIRTIO_BLK_T_OUT, 4, 0x8000, DATA, 1024);
    a.run_until(20 * TICKS_PER_US);
    // Two reads and a write in flight, the first write done (used,
    // interrupt status set and not acknowledged).
    let r1 = a.rw(VIRTIO_BLK_T_IN, 4, 0x8100, DATA + 0x1000, 512);
    let r2 = a.rw(VIRTIO_BLK_T_IN, 5, 0x8200, DATA + 0x2000, 1024);
    a.run_until(a.dev.next_deadline().unwrap());
    assert_eq!(a.status_byte(w), VIRTIO_BLK_S_OK as u8);
    let w2 = a.rw(VIRTIO_BLK_T_OUT, 60, 0x8300, DATA, 2048);
    assert!(a.dev.device().inflight() >= 2, "requests in flight");
    assert_ne!(a.dev.interrupt_status(), 0);
    let mut b = restored_copy(&a);
    assert!(
        b.irqs.lock().unwrap().0.is_empty(),
        "a restore raises nothing"
    );
    assert_eq!(b.dev.next_deadline(), a.dev.next_deadline());
    for reg in [
        VIRTIO_MMIO_STATUS,
        VIRTIO_MMIO_INTERRUPT_STATUS,
        VIRTIO_MMIO_QUEUE_READY,
    ] {
        assert_eq!(b.r(reg), a.r(reg), "register {reg:#x}");
    }
    // From here on both complete the same requests at the same ticks.
    let mut ticks = (vec![], vec![]);
    for (rig, t) in [(&mut a, &mut ticks.0), (&mut b, &mut ticks.1)] {
        while let Some(d) = rig.dev.next_deadline() {
            t.push(d);
            rig.run_until(d);
        }
        // And take a new request alike.
        let r3 = rig.rw(VIRTIO_BLK_T_IN, 60, 0x8400, DATA + 0x4000, 2048);
        rig.settle();
        assert_eq!(rig.status_byte(r3), VIRTIO_BLK_S_OK as u8);
    }
    assert_eq!(ticks.0, ticks.1);
    assert_eq!(b.used_idx(), a.used_idx());
    for n in 0..a.used_idx() {
        assert_eq!(b.used(n), a.used(n), "used element {n}");
    }
    for s in [r1, r2, w2] {
        assert_eq!(b.status_byte(s), a.status_byte(s));
    }
    let mut data = [[0u8; 0x5000]; 2];
    a.mem.read_slice(&mut data[0], GuestAddress(DATA)).unwrap();
    b.mem.read_slice(&mut data[1], GuestAddress(DATA)).unwrap();
    assert!(data[0] == data[1], "the same data read");
    assert!(
        data[1][0x4000..0x4400] == [0x5a; 1024],
        "w2's data read back"
    );
    assert_eq!(
        b.irqs.lock().unwrap().0.len(),
        2 * ticks.1.len() + 2,
        "an interrupt per completion"
    );
}

#[test]
fn a_failed_request_in_flight_restores() {
    // Found by fuzzing (fuzz/, target dev_restore): a read past the end
    // of the disk is in flight as a failure that keeps its data buffers,
    // and its own saved state was refused ("a failed request has no data
    // buffers").
    let mut a = Rig::ready(64);
    let s = a.rw(VIRTIO_BLK_T_IN, 1000, 0x8000, DATA, 512);
    assert_eq!(a.dev.device().inflight(), 1);
    let mut b = restored_copy(&a);
    a.settle();
    b.settle();
    assert_eq!(a.status_byte(s), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(b.status_byte(s), a.status_byte(s));
    assert_eq!((b.used_idx(), b.used(0)), (a.used_idx(), a.used(0)));
}

#[test]
fn hostile_saved_states_are_refused() {
    use crate::state::tests::*;
    use serde_json::json;
    let mut a = Rig::ready(64);
    a.rw(VIRTIO_BLK_T_IN, 4, 0x8100, DATA, 512);
    a.rw(VIRTIO_BLK_T_IN, 5, 0x8200, DATA + 0x1000, 512);
    let d = &mut a.dev;
    refuses_garbage(d);
    refused_edit(d, &["interrupt_status"], json!(4), "interrupt_status");
    refused_edit(d, &["status"], json!(4), "status");
    refused_edit(
        d,
        &["driver_features"],
        json!(1u64 << 40),
        "driver_features",
    );
    refused_edit(d, &["queues"], json!([]), "queues");
    refused_edit(
        d,
        &["queues", "0", "max_size"],
        json!(128),
        "queues[0].max_size",
    );
    refused_edit(d, &["queues", "0", "size"], json!(100), "queues[0]");
    refused_edit(d, &["queues", "0", "size"], json!(512), "queues[0]");
    refused_edit(
        d,
        &["queues", "0", "desc_table"],
        json!(0x1001),
        "queues[0]",
    );
    refused_edit(
        d,
        &["queues", "0", "event_idx_enabled"],
        json!(true),
        "event_idx",
    );
    refused_edit(
        d,
        &["queues", "0", "next_avail"],
        json!(70000),
        "queues[0].next_avail",
    );
    let inf = ["device", "inflight"];
    fn at(k: &'static str) -> [&'static str; 4] {
        ["device", "inflight", "0", k]
    }
    let one = d.save()["device"]["inflight"][0].clone();
    refused_edit(d, &inf, json!(vec![one; 257]), "device.inflight");
    refused_edit(d, &at("head"), json!(256), "device.inflight[0].head");
    refused_edit(
        d,
        &at("kind"),
        json!({"read": {"offset": 64 * 512}}),
        "device.inflight[0].kind",
    );
    refused_edit(
        d,
        &at("kind"),
        json!({"read": {"offset": 100}}),
        "device.inflight[0].kind",
    );
    refused_edit(
        d,
        &at("kind"),
        json!({"read": {"offset": u64::MAX - 511}}),
        "device.inflight[0].kind",
    );
    refused_edit(
        d,
        &at("kind"),
        json!({"fail": {"status": 0}}),
        "device.inflight[0].kind",
    );
    refused_edit(
        d,
        &at("kind"),
        json!({"erase": {}}),
        "device.inflight[0].kind",
    );
    refused_edit(d, &at("kind"), json!("flush"), "device.inflight[0].data");
    refused_edit(d, &at("start"), json!(u64::MAX), "device.inflight[0].done");
    refused_edit(
        d,
        &["device", "inflight", "1", "done"],
        json!(1),
        "device.inflight[1].done",
    );
    refused_edit(
        d,
        &at("data"),
        json!([{"addr": u64::MAX, "len": 512}]),
        "device.inflight[0].data[0]",
    );
    refused_edit(
        d,
        &at("data"),
        json!([{"addr": 0, "len": 1}]),
        "device.inflight[0].kind",
    );
    refused_edit(d, &["device", "free"], json!(-1), "device.free");
    let mut ro = Rig::new(64, true);
    ro.init((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_RO));
    let mut state = d.save();
    state["device"]["inflight"][0]["kind"] = json!({"write": {"offset": 0}});
    refused(&mut ro.dev, state, "device.inflight[0].kind");
}
