//! Virtio 1.x devices on the virtio-mmio transport (version 2, "modern").
//!
//! [`VirtioMmio`] is the register window a driver programs (virtio spec
//! 1.2, 4.2.2): magic, version, device and vendor IDs, the feature words,
//! queue selection, size, addresses and readiness, notification, interrupt
//! status and acknowledgement, device status, and the device's own
//! configuration space from offset 0x100. The split virtqueues themselves
//! are rust-vmm's `virtio_queue::Queue`, reading the rings in guest RAM
//! through vm-memory; register numbers and feature bits come from
//! `virtio-bindings`. What a device does with its buffers is a
//! [`VirtioDevice`] (the block device: [`blk::Block`]; the network
//! device: [`net::Net`]).
//!
//! Devices act in simulated time: a notification hands the available
//! buffers to the device, which names the tick at which it completes them
//! (its [`TimedDevice`] deadline); at that tick it puts them in the used
//! ring and the transport raises its interrupt (an edge on its line:
//! interrupt status bit 0, or bit 1 for a configuration change).
//!
//! A hostile driver: register accesses of any width and offset are
//! accepted (the spec's registers are 32-bit; other widths read as zero and
//! are ignored, the configuration space takes any width); queue settings
//! are taken only while the queue is not ready, and a size that is not a
//! power of two up to the maximum is refused (`Queue::set_size`); features
//! the device did not offer, or a driver without `VIRTIO_F_VERSION_1`,
//! leave FEATURES_OK clear (spec 3.1.1: the driver then sees the device
//! refused them). A queue whose rings are not in RAM, a malformed or
//! looping descriptor chain, or a used ring that cannot be written put the
//! device in the spec's error state: status DEVICE_NEEDS_RESET with a
//! configuration-change interrupt; it then ignores its queues until the
//! driver resets it (writes 0 to status). Nothing a driver does panics or
//! makes the device hold more than one queue's worth of requests.

pub mod blk;
pub mod net;

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space, TimedDevice};
use serde::{Deserialize, Serialize};
use sim::{Counter, Stats, Tick};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::irq::IrqLine;
use crate::state::check;

/// Size of one device's register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// "virt", the magic value.
pub const MAGIC: u32 = 0x7472_6976;
/// Transport version 2: virtio 1.x (modern) only.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("KVSM").
pub const VENDOR_ID: u32 = 0x4d53_564b;
/// Latency of a register access.
pub const VIRTIO_MMIO_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;

/// What a device reports after handling its queues.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Buffers were put in a used ring: interrupt the driver.
    pub used: bool,
    /// The device met something it cannot go on from (malformed chain,
    /// rings outside RAM): it needs a reset.
    pub broken: bool,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.used |= o.used;
        self.broken |= o.broken;
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (1: network, 2: block).
    fn device_id(&self) -> u32;
    /// The device-specific feature bits offered (VERSION_1 is added).
    fn features(&self) -> u64;
    /// How many virtqueues the device has.
    fn num_queues(&self) -> usize;
    /// The largest size of each queue.
    fn queue_max_size(&self) -> u16;
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver reset the device: drop everything in flight.
    fn reset(&mut self);
    /// The driver notified `queue` at `now`: take its available buffers.
    fn notify(
        &mut self,
        queues: &mut [Queue],
        queue: usize,
        mem: &GuestMemoryMmap,
        now: Tick,
    ) -> Outcome;
    /// The tick at which the next request completes, if any.
    fn next_deadline(&self) -> Option<Tick>;
    /// Completes what is due at `now` (and takes more buffers if it can).
    fn on_deadline(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap, now: Tick) -> Outcome;
    /// The device's own state (requests in flight, with their absolute
    /// completion ticks), for the transport's saved state.
    fn save(&self) -> SavedState;
    /// Puts back what [`VirtioDevice::save`] returned: validated first,
    /// unchanged on error (see [`BusDevice::restore`]).
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError>;
}

/// One virtqueue's saved state: virtio-queue's [`QueueState`] (which has
/// no serde support), field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSaved {
    pub max_size: u16,
    /// The driver's next available-ring index the device will read.
    pub next_avail: u16,
    /// The next used-ring index the device will write.
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSaved {
    fn from(q: QueueState) -> Self {
        QueueSaved {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl QueueSaved {
    /// The queue, if this state is one a device with queues of
    /// `max_size` and features `offered` can have; the error names the
    /// field (`at`: the queue's path).
    fn to_queue(&self, at: &str, max_size: u16, offered: u64) -> Result<Queue, RestoreError> {
        check(
            self.max_size == max_size,
            &format!("{at}.max_size"),
            format_args!("{} but this device's queues hold {max_size}", self.max_size),
        )?;
        check(
            !self.event_idx_enabled
                || offered & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0,
            &format!("{at}.event_idx_enabled"),
            "this device does not offer EVENT_IDX",
        )?;
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| {
            RestoreError(format!(
                "{at}: {e:?} (size {} of at most {max_size}, a power of two; descriptor table \
                 16-byte, available ring 2-byte, used ring 4-byte aligned)",
                self.size
            ))
        })
    }
}

/// The virtio-mmio transport's saved state, with its device's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioMmioState {
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    /// Bit 0: used buffers, bit 1: configuration change.
    pub interrupt_status: u32,
    /// One per virtqueue of the device.
    pub queues: Vec<QueueSaved>,
    /// The device's own state ([`VirtioDevice::save`]).
    pub device: SavedState,
}

/// The virtio-mmio transport around device `D`.
pub struct VirtioMmio<D: VirtioDevice> {
    dev: D,
    mem: GuestMemoryMmap,
    irq: IrqLine,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    bad_accesses: Counter,
    needs_reset: Counter,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Device `dev` reading and writing guest RAM `mem`, interrupting on
    /// `irq`; statistics under `prefix`.
    pub fn new(
        dev: D,
        mem: GuestMemoryMmap,
        irq: IrqLine,
        stats: &mut Stats,
        prefix: &str,
    ) -> Result<Self, sim::stats::StatsError> {
        let queues = (0..dev.num_queues())
            .map(|_| Queue::new(dev.queue_max_size()).expect("a valid queue size"))
            .collect();
        Ok(VirtioMmio {
            dev,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            bad_accesses: stats.counter(
                &format!("{prefix}.badRegisterAccesses"),
                "Register accesses the transport ignored (wrong width, read-only or unknown register)",
                "Count",
            )?,
            needs_reset: stats.counter(
                &format!("{prefix}.needsReset"),
                "Times the device entered the error state (DEVICE_NEEDS_RESET)",
                "Count",
            )?,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device behind the transport, to change.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Lets the device act on its queues from outside a register access
    /// (a frame arriving from a link): `f` gets the device, its queues,
    /// guest RAM and whether the driver runs (DRIVER_OK, no reset
    /// needed); its outcome interrupts the driver or flags the error state
    /// as a notification's would.
    pub fn act(&mut self, f: impl FnOnce(&mut D, &mut [Queue], &GuestMemoryMmap, bool) -> Outcome) {
        let live = self.live();
        let o = f(&mut self.dev, &mut self.queues, &self.mem, live);
        if live {
            self.apply(o);
        }
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The interrupt status register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    fn offered(&self) -> u64 {
        self.dev.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.dev.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn apply(&mut self, o: Outcome) {
        if o.broken && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            tracing::debug!("virtio device {} needs a reset", self.dev.device_id());
            self.needs_reset.inc();
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
            self.irq.pulse();
        }
        if o.used {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            self.irq.pulse();
        }
    }

    fn read_reg(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.dev.device_id(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered() as u32,
                1 => (self.offered() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                self.bad_accesses.inc();
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32, now: Tick) {
        // Queue settings are only taken while the queue is not ready.
        let settable = self.selected().is_some_and(|q| !q.ready());
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => self.bad_accesses.inc(),
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if settable => {
                let q = self.selected().expect("settable implies a queue");
                if v > u32::from(q.max_size()) || !v.is_power_of_two() {
                    self.bad_accesses.inc();
                } else {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                let ready = v == 1;
                if let Some(q) = self.selected() {
                    q.set_ready(ready);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if settable => {
                self.selected()
                    .expect("settable")
                    .set_desc_table_address(Some(v), None);
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if settable => {
                self.selected()
                    .expect("settable")
                    .set_desc_table_address(None, Some(v));
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if settable => {
                self.selected()
                    .expect("settable")
                    .set_avail_ring_address(Some(v), None);
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if settable => {
                self.selected()
                    .expect("settable")
                    .set_avail_ring_address(None, Some(v));
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if settable => {
                self.selected()
                    .expect("settable")
                    .set_used_ring_address(Some(v), None);
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if settable => {
                self.selected()
                    .expect("settable")
                    .set_used_ring_address(None, Some(v));
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v as usize, now),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status &= !v;
            }
            VIRTIO_MMIO_STATUS => self.write_status(v),
            _ => self.bad_accesses.inc(),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK only for features the device offered, VERSION_1 among them.
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.offered() == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        // DRIVER_OK needs FEATURES_OK; the device keeps NEEDS_RESET until a reset.
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v &= !VIRTIO_CONFIG_S_DRIVER_OK;
            self.bad_accesses.inc();
        }
        self.status = v | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    fn notify(&mut self, queue: usize, now: Tick) {
        if !self.live() || queue >= self.queues.len() {
            return;
        }
        let q = &self.queues[queue];
        if !q.ready() {
            return;
        }
        if !q.is_valid(&self.mem) {
            self.apply(Outcome {
                used: false,
                broken: true,
            });
            return;
        }
        let o = self.dev.notify(&mut self.queues, queue, &self.mem, now);
        self.apply(o);
    }
}

impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&mut self, _space: Space, offset: u64, data: &mut [u8], _ctx: &mut AccessCtx) -> Tick {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.dev
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = self.read_reg(offset as u32);
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            self.bad_accesses.inc();
        }
        VIRTIO_MMIO_LATENCY
    }

    fn write(&mut self, _space: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // The devices' configurations are read-only (no writable
            // fields are offered).
            self.bad_accesses.inc();
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset as u32, v, ctx.now);
        } else {
            self.bad_accesses.inc();
        }
        VIRTIO_MMIO_LATENCY
    }

    fn save(&self) -> SavedState {
        crate::state::save(&VirtioMmioState {
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device: self.dev.save(),
        })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: VirtioMmioState = crate::state::parse(state)?;
        let ints = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
        check(
            s.interrupt_status & !ints == 0,
            "interrupt_status",
            format_args!("{:#x} sets bits outside {ints:#x}", s.interrupt_status),
        )?;
        let features_ok = s.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        check(
            s.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 || features_ok,
            "status",
            format_args!("{:#x}: DRIVER_OK without FEATURES_OK", s.status),
        )?;
        let offered = self.offered();
        check(
            !features_ok
                || (s.driver_features & !offered == 0
                    && s.driver_features & (1 << VIRTIO_F_VERSION_1) != 0),
            "driver_features",
            format_args!(
                "{:#x} accepted (FEATURES_OK) but the device offers {offered:#x}, VERSION_1 needed",
                s.driver_features
            ),
        )?;
        check(
            s.queues.len() == self.queues.len(),
            "queues",
            format_args!(
                "{} queues, this device has {}",
                s.queues.len(),
                self.queues.len()
            ),
        )?;
        let max = self.dev.queue_max_size();
        let queues = s
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.to_queue(&format!("queues[{i}]"), max, offered))
            .collect::<Result<Vec<Queue>, _>>()?;
        self.dev
            .restore(&s.device)
            .map_err(|e| RestoreError(format!("device.{}", e.0)))?;
        self.queues = queues;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.interrupt_status = s.interrupt_status;
        Ok(())
    }
}

impl<D: VirtioDevice> TimedDevice for VirtioMmio<D> {
    fn next_deadline(&self) -> Option<Tick> {
        if self.live() {
            self.dev.next_deadline()
        } else {
            None
        }
    }

    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        if !self.live() {
            return;
        }
        let mut o = Outcome::default();
        o.merge(self.dev.on_deadline(&mut self.queues, &self.mem, ctx.now));
        self.apply(o);
    }
}

#[cfg(test)]
mod net_tests;
#[cfg(test)]
pub(crate) mod tests;
