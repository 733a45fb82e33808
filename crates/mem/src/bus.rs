//! The IO bus: routes port-IO and MMIO accesses to devices by address range.
//!
//! A device claims one or more ranges in either space. An access is handed to
//! the device with the offset inside its range and an [`AccessCtx`]: the
//! current tick, the calling CPU's argument registers (for sim-ops) and a list
//! where the device may leave [`Request`]s for the simulator. The device
//! returns the access latency in ticks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sim::{Counter, Request, Stats, Tick};

/// The two x86 address spaces a device can live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// Port IO (`in`/`out`), 64 KiB of ports.
    Pio,
    /// Memory-mapped IO: physical addresses that are not RAM.
    Mmio,
}

/// Access to the registers that carry call arguments, and to the caller's
/// memory by virtual address, for devices that implement guest calls
/// (sim-ops). The CPU supplies it; devices never see the CPU itself.
pub trait CallArgs {
    /// The first six integer arguments of the guest's calling convention
    /// (x86-64: RDI, RSI, RDX, RCX, R8, R9).
    fn call_args(&mut self) -> [u64; 6];

    /// Reads the caller's memory at virtual address `va` (through its
    /// current page tables) into `buf`; returns how many bytes could be
    /// read: fewer at the first unmapped page, none without memory.
    fn read_virt(&mut self, _va: u64, _buf: &mut [u8]) -> usize {
        0
    }

    /// Writes `data` to the caller's memory at virtual address `va`;
    /// returns how many bytes were written (fewer at the first unmapped
    /// or read-only page).
    fn write_virt(&mut self, _va: u64, _data: &[u8]) -> usize {
        0
    }

    /// The caller's user-mode context (syscall emulation): every general
    /// register, RIP, RFLAGS, the FS/GS bases, CR2 and CR3. `None` where
    /// the CPU cannot give it.
    fn user_context(&mut self) -> Option<UserContext> {
        None
    }

    /// Replaces the caller's context with `ctx` and puts it in user mode
    /// (CPL3, the user code and data selectors), as `sysretq` or `iretq`
    /// would, before it next runs. A CR3 that differs from the current one
    /// is loaded (and the CPU's cached translations dropped). False where
    /// the CPU cannot do it.
    fn set_user_context(&mut self, _ctx: &UserContext) -> bool {
        false
    }

    /// As [`CallArgs::set_user_context`], but in kernel mode (CPL0, the
    /// kernel code and data selectors): for an emulated kernel that idles
    /// a CPU in its own code (`sti; hlt`). False where the CPU cannot.
    fn set_kernel_context(&mut self, _ctx: &UserContext) -> bool {
        false
    }

    /// The caller's floating-point and vector state (x86-64: the XSAVE
    /// area in the standard format, as KVM gives it), for a signal frame.
    /// `None` where the CPU cannot give it.
    fn fpu_state(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// Replaces the caller's floating-point and vector state with `area`
    /// (as [`CallArgs::fpu_state`] gave it, possibly changed by a guest);
    /// false if the CPU cannot, or refuses the area (its size or contents).
    fn set_fpu_state(&mut self, _area: &[u8]) -> bool {
        false
    }
}

/// A CPU's user-mode context, for devices that emulate an operating
/// system's kernel (syscall-emulation mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserContext {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8..R15 (x86-64 order).
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    /// The last page-fault address.
    pub cr2: u64,
    /// The page-table root.
    pub cr3: u64,
    /// The privilege level the CPU was at (the CS selector's RPL).
    pub cpl: u8,
}

impl UserContext {
    pub const RAX: usize = 0;
    pub const RBX: usize = 1;
    pub const RCX: usize = 2;
    pub const RDX: usize = 3;
    pub const RSI: usize = 4;
    pub const RDI: usize = 5;
    pub const RBP: usize = 6;
    pub const RSP: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R10: usize = 10;
    pub const R11: usize = 11;
}

/// What a device sees of the world during one access.
pub struct AccessCtx<'a> {
    /// The tick at which the access is serviced.
    pub now: Tick,
    /// The calling CPU's argument registers, when the access comes from a CPU.
    pub cpu: Option<&'a mut dyn CallArgs>,
    /// Requests for the simulator, serviced after the access.
    pub requests: &'a mut Vec<Request>,
    /// The index of the calling CPU in its system (0 when there is none):
    /// it selects the bank of a per-CPU device ([`IoBus::insert_banked`]).
    pub cpu_index: usize,
}

impl<'a> AccessCtx<'a> {
    /// A context with no CPU attached.
    pub fn new(now: Tick, requests: &'a mut Vec<Request>) -> Self {
        AccessCtx {
            now,
            cpu: None,
            requests,
            cpu_index: 0,
        }
    }

    /// The calling CPU's arguments, or zeros when there is no CPU.
    pub fn call_args(&mut self) -> [u64; 6] {
        self.cpu.as_mut().map(|c| c.call_args()).unwrap_or([0; 6])
    }

    /// Reads the calling CPU's memory by virtual address (nothing when
    /// there is no CPU); see [`CallArgs::read_virt`].
    pub fn read_virt(&mut self, va: u64, buf: &mut [u8]) -> usize {
        self.cpu.as_mut().map_or(0, |c| c.read_virt(va, buf))
    }

    /// Writes the calling CPU's memory by virtual address (nothing when
    /// there is no CPU); see [`CallArgs::write_virt`].
    pub fn write_virt(&mut self, va: u64, data: &[u8]) -> usize {
        self.cpu.as_mut().map_or(0, |c| c.write_virt(va, data))
    }

    /// The calling CPU's user-mode context (none without a CPU); see
    /// [`CallArgs::user_context`].
    pub fn user_context(&mut self) -> Option<UserContext> {
        self.cpu.as_mut().and_then(|c| c.user_context())
    }

    /// Sets the calling CPU's user-mode context; see
    /// [`CallArgs::set_user_context`].
    pub fn set_user_context(&mut self, ctx: &UserContext) -> bool {
        self.cpu.as_mut().is_some_and(|c| c.set_user_context(ctx))
    }

    /// Sets the calling CPU's context in kernel mode; see
    /// [`CallArgs::set_kernel_context`].
    pub fn set_kernel_context(&mut self, ctx: &UserContext) -> bool {
        self.cpu.as_mut().is_some_and(|c| c.set_kernel_context(ctx))
    }

    /// The calling CPU's floating-point state; see [`CallArgs::fpu_state`].
    pub fn fpu_state(&mut self) -> Option<Vec<u8>> {
        self.cpu.as_mut().and_then(|c| c.fpu_state())
    }

    /// Sets the calling CPU's floating-point state; see
    /// [`CallArgs::set_fpu_state`].
    pub fn set_fpu_state(&mut self, area: &[u8]) -> bool {
        self.cpu.as_mut().is_some_and(|c| c.set_fpu_state(area))
    }
}

/// A device on the bus. Implementations must accept any offset inside their
/// claimed range and any access size, since the guest chooses both.
pub trait BusDevice: Send {
    /// Fills `data` for a read at `offset` (relative to the claimed range's
    /// base) and returns the latency in ticks.
    fn read(&mut self, space: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick;
    /// Takes a write at `offset` and returns the latency in ticks.
    fn write(&mut self, space: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick;

    /// The device's whole state for a checkpoint, taken at a drained point
    /// (no access in flight): everything a guest could observe later and
    /// every pending deadline (as absolute ticks; a restore continues at the
    /// checkpoint's tick). Wiring (interrupt lines, output sinks, files) and
    /// statistics are not part of it. A device without state of its own
    /// returns [`SavedState::Null`]. There is no default: a device cannot
    /// be added without saying what its state is.
    fn save(&self) -> SavedState;

    /// Puts back what [`BusDevice::save`] returned, into a device built from
    /// the same configuration. The state comes from a file: anything
    /// malformed or out of range is an error naming the field, never a
    /// panic, and leaves the device as it was. A restore drives no
    /// interrupt line: every controller restores its own input levels.
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError>;

    /// The device that owns this one's state: itself, or, for a device
    /// reached through another range ([`Rebased`]), the device behind it.
    /// A checkpoint saves each owner once ([`IoBus::state_owners`]).
    fn state_owner(&self) -> usize {
        (self as *const Self).cast::<()>() as usize
    }
}

/// A device's saved state in a checkpoint: self-describing (serde JSON),
/// so a field that is missing, unknown or out of range can be named.
pub type SavedState = serde_json::Value;

/// The restore of a device without state of its own: accepts only
/// [`SavedState::Null`] (anything else was saved by another device).
pub fn null_state(state: &SavedState) -> Result<(), RestoreError> {
    match state {
        SavedState::Null => Ok(()),
        other => Err(RestoreError(format!(
            "this device keeps no state, found {}",
            kind_of(other)
        ))),
    }
}

fn kind_of(v: &SavedState) -> &'static str {
    match v {
        SavedState::Null => "null",
        SavedState::Bool(_) => "a boolean",
        SavedState::Number(_) => "a number",
        SavedState::String(_) => "a string",
        SavedState::Array(_) => "an array",
        SavedState::Object(_) => "an object",
    }
}

/// Why a device refused a saved state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RestoreError(pub String);

/// A shared handle to a device.
pub type DeviceHandle = Arc<Mutex<dyn BusDevice>>;

/// Gives a device a second (or third) port range: accesses are passed on
/// with `add` added to their offset, so the device sees offsets relative to
/// its main range (for example the i8042's 0x64 as offset 4 of 0x60).
pub struct Rebased {
    pub dev: DeviceHandle,
    pub add: u64,
}

impl BusDevice for Rebased {
    fn read(&mut self, space: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
        lock(&self.dev).read(space, offset.wrapping_add(self.add), data, ctx)
    }
    fn write(&mut self, space: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        lock(&self.dev).write(space, offset.wrapping_add(self.add), data, ctx)
    }
    fn save(&self) -> SavedState {
        lock(&self.dev).save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        lock(&self.dev).restore(state)
    }
    fn state_owner(&self) -> usize {
        lock(&self.dev).state_owner()
    }
}

/// A device that acts at simulated times of its own (timers). Devices keep
/// time lazily: they compute their state from elapsed ticks and name only the
/// next tick at which something must happen; the system schedules one event
/// for it and asks again after every access.
pub trait TimedDevice: Send {
    /// The tick of the next thing this device must do, if any. A deadline
    /// already past is due at once; one at [`sim::tick::MAX_TICK`] (where a
    /// device's time arithmetic saturates) is never serviced: nothing
    /// happens at the end of time.
    fn next_deadline(&self) -> Option<Tick>;
    /// Does what is due at `ctx.now`. Afterwards the next deadline is later
    /// than `ctx.now` (or none): the system would otherwise service the
    /// device at the same tick forever.
    fn on_deadline(&mut self, ctx: &mut AccessCtx);
}

/// A shared handle to a timed device.
pub type TimedHandle = Arc<Mutex<dyn TimedDevice>>;

/// The tick at which a system services a timed device whose next deadline
/// is `deadline`, at tick `now`: at the deadline, at once if it is past,
/// never if there is none or it is [`sim::tick::MAX_TICK`].
pub fn service_tick(deadline: Option<Tick>, now: Tick) -> Option<Tick> {
    deadline
        .filter(|&d| d < sim::tick::MAX_TICK)
        .map(|d| d.max(now))
}

/// Errors registering devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{space:?} range [{base:#x}, {end:#x}) of {name} overlaps {other}")]
    Overlap {
        space: Space,
        base: u64,
        end: u64,
        name: String,
        other: String,
    },
    #[error("{space:?} range of {name} at {base:#x} has length 0 or wraps around")]
    BadRange {
        space: Space,
        base: u64,
        name: String,
    },
}

struct Mapping {
    end: u64,
    name: String,
    /// One device, or one per CPU (chosen by [`AccessCtx::cpu_index`]).
    devs: Vec<DeviceHandle>,
    /// How many of `devs` are real devices (the rest answer as unclaimed).
    real: usize,
    /// Per bank, where the guest moved it ([`IoBus::insert_banked_movable`]).
    bases: Vec<MovableBase>,
}

/// Where a movable per-CPU range currently starts, shared by the device
/// that moves it (the guest programs the address) and the bus that routes
/// to it (a local APIC whose IA32_APIC_BASE the guest rewrites).
#[derive(Debug, Clone)]
pub struct MovableBase(Arc<AtomicU64>);

impl MovableBase {
    /// A range at `base`.
    pub fn new(base: u64) -> Self {
        MovableBase(Arc::new(AtomicU64::new(base)))
    }

    /// Where the range starts now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Moves the range to `base` (from the next access on).
    pub fn set(&self, base: u64) {
        self.0.store(base, Ordering::Release)
    }
}

impl Mapping {
    /// The device that answers CPU `cpu`; `None` for a banked device
    /// without a bank for it. Banked devices are per-CPU (each CPU sees
    /// its own, at its own time); a single device is shared.
    fn device(&self, cpu: usize) -> Option<(&DeviceHandle, bool)> {
        match self.devs.as_slice() {
            [one] => Some((one, true)),
            many => many.get(cpu).map(|d| (d, false)),
        }
    }
}

/// Latency charged for an access nobody claims.
pub const UNCLAIMED_LATENCY: Tick = 100 * sim::tick::TICKS_PER_NS;

/// The IO bus of one system.
///
/// Accesses to shared devices (everything not banked per CPU) are
/// serialized by the bus's device clock: a lock that also holds the latest
/// tick any shared device has seen. An access at tick `t` is serviced at
/// `max(t, clock)` and moves the clock there, so with several CPUs, whose
/// own times differ by up to a quantum, no shared device ever sees time go
/// backwards; a CPU that is behind the clock has its access seen at the
/// clock's tick instead (late by at most the CPUs' drift). With one CPU the
/// clock never changes an access's tick (its accesses come in tick order).
pub struct IoBus {
    maps: BTreeMap<(Space, u64), Mapping>,
    /// The keys in `maps` of the movable per-CPU ranges.
    movable: Vec<(Space, u64)>,
    unclaimed_pio: Counter,
    unclaimed_mmio: Counter,
    clock: Mutex<Tick>,
    /// Accesses to shared devices so far (a device's deadline can change
    /// only through one).
    shared_accesses: std::sync::atomic::AtomicU64,
}

impl IoBus {
    /// A bus whose statistics are registered under `prefix` (e.g. `system.iobus`).
    pub fn new(stats: &mut Stats, prefix: &str) -> Result<Self, sim::stats::StatsError> {
        Ok(IoBus {
            maps: BTreeMap::new(),
            movable: Vec::new(),
            unclaimed_pio: stats.counter(
                &format!("{prefix}.unclaimedPio"),
                "Port-IO accesses no device claims (reads return all-ones, writes are dropped)",
                "Count",
            )?,
            unclaimed_mmio: stats.counter(
                &format!("{prefix}.unclaimedMmio"),
                "MMIO accesses no device claims (reads return all-ones, writes are dropped)",
                "Count",
            )?,
            clock: Mutex::new(0),
            shared_accesses: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Runs `f` as the shared devices' owner at `now` (or later: see the
    /// type's description): device deadlines serviced outside an access go
    /// through here, so they are ordered with the CPUs' accesses. Returns
    /// what `f` returns.
    pub fn with_device_clock<R>(&self, now: Tick, f: impl FnOnce(Tick) -> R) -> R {
        let mut clock = lock(&self.clock);
        *clock = (*clock).max(now);
        let r = f(*clock);
        self.shared_accesses
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        r
    }

    /// How many accesses shared devices have had (deadlines serviced
    /// through [`IoBus::with_device_clock`] included).
    pub fn shared_accesses(&self) -> u64 {
        self.shared_accesses
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// The latest tick a shared device has seen.
    pub fn device_time(&self) -> Tick {
        *lock(&self.clock)
    }

    /// Attaches one device per CPU at `[base, base+len)`: CPU `i`'s accesses
    /// reach `devs[i]`, at that CPU's own time (a local APIC). CPUs without
    /// a bank see the range as unclaimed.
    pub fn insert_banked(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        name: &str,
        devs: Vec<DeviceHandle>,
    ) -> Result<(), BusError> {
        if devs.len() == 1 {
            // One bank: the CPU index must still select it (CPU 0 only).
            let mut devs = devs;
            devs.push(Arc::new(Mutex::new(Absent)));
            return self.insert_devs(space, base, len, name, devs, 1);
        }
        let real = devs.len();
        self.insert_devs(space, base, len, name, devs, real)
    }

    /// Like [`IoBus::insert_banked`], with each bank at the address its
    /// [`MovableBase`] holds (`bases[k]` for `devs[k]`, all at `base` to
    /// start with): a CPU whose bank moved reaches it at its new address,
    /// before any fixed device there, and no longer at `base`. Checkpoints
    /// name the banks as [`IoBus::insert_banked`]'s. Only MMIO addresses
    /// outside guest RAM reach the bus at all: a bank moved onto RAM is not
    /// reachable until it moves again.
    pub fn insert_banked_movable(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        name: &str,
        devs: Vec<DeviceHandle>,
        bases: Vec<MovableBase>,
    ) -> Result<(), BusError> {
        if bases.len() != devs.len() {
            return Err(BusError::BadRange {
                space,
                base,
                name: format!("{name} ({} banks, {} bases)", devs.len(), bases.len()),
            });
        }
        self.insert_banked(space, base, len, name, devs)?;
        if let Some(m) = self.maps.get_mut(&(space, base)) {
            m.bases = bases;
            self.movable.push((space, base));
        }
        Ok(())
    }

    /// Attaches `dev` at `[base, base+len)` in `space`.
    pub fn insert(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        name: &str,
        dev: DeviceHandle,
    ) -> Result<(), BusError> {
        self.insert_devs(space, base, len, name, vec![dev], 1)
    }

    fn insert_devs(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        name: &str,
        devs: Vec<DeviceHandle>,
        real: usize,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange {
                space,
                base,
                name: name.into(),
            })?;
        // The mapping starting at or before `base`, and the one after it.
        let before = self.maps.range(..=(space, base)).next_back();
        let after = self.maps.range((space, base)..).next();
        for (&(s, b), m) in before.into_iter().chain(after) {
            if s == space && b < end && base < m.end {
                return Err(BusError::Overlap {
                    space,
                    base,
                    end,
                    name: name.into(),
                    other: m.name.clone(),
                });
            }
        }
        self.maps.insert(
            (space, base),
            Mapping {
                end,
                name: name.into(),
                devs,
                real,
                bases: Vec::new(),
            },
        );
        Ok(())
    }

    fn find(&self, space: Space, addr: u64, len: u64) -> Option<(u64, &Mapping)> {
        let (&(s, base), m) = self.maps.range(..=(space, addr)).next_back()?;
        let last = addr.checked_add(len.max(1) - 1)?;
        (s == space && last < m.end).then_some((base, m))
    }

    /// The bank CPU `cpu` reaches at `addr` (its base and device) if a
    /// movable range ([`IoBus::insert_banked_movable`]) claims it for that
    /// CPU; `Err(())` if `addr` is where a movable range of this CPU
    /// started but it moved away (nothing of it answers there).
    fn find_movable(
        &self,
        space: Space,
        addr: u64,
        len: u64,
        cpu: usize,
    ) -> Result<Option<(u64, &DeviceHandle)>, ()> {
        let last = addr.checked_add(len.max(1) - 1).ok_or(())?;
        let mut moved_away = false;
        for key in &self.movable {
            let Some(m) = self.maps.get(key) else {
                continue;
            };
            let (Some(b), Some(dev)) = (m.bases.get(cpu), m.devs.get(cpu)) else {
                continue;
            };
            if cpu >= m.real {
                continue;
            }
            let size = m.end - key.1;
            let now = b.get();
            if key.0 == space && addr >= now && last - now < size {
                return Ok(Some((now, dev)));
            }
            if now != key.1 && key.0 == space && addr >= key.1 && last < m.end {
                moved_away = true;
            }
        }
        if moved_away {
            Err(())
        } else {
            Ok(None)
        }
    }

    /// Every device whose state a checkpoint holds, once each, named by
    /// its first range's name (`name`, or `name.K` for bank K of a per-CPU
    /// device), in address order (port IO first). A device reached through
    /// several ranges ([`Rebased`]) appears once, under its first range;
    /// the banks of a per-CPU device that answer no CPU are left out.
    pub fn state_owners(&self) -> Vec<(String, DeviceHandle)> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for m in self.maps.values() {
            let banked = m.devs.len() > 1;
            for (k, dev) in m.devs.iter().enumerate() {
                let owner = lock(dev).state_owner();
                if !seen.insert(owner) {
                    continue;
                }
                let name = if banked {
                    format!("{}.{k}", m.name)
                } else {
                    m.name.clone()
                };
                if k >= m.real {
                    // The placeholder bank of a single-CPU per-CPU device.
                    continue;
                }
                out.push((name, dev.clone()));
            }
        }
        out
    }

    /// Sets the device clock (the latest tick a shared device has seen):
    /// a restore continues at the checkpoint's tick.
    pub fn set_device_time(&self, now: Tick) {
        *lock(&self.clock) = now;
    }

    /// The name of the device that claims `addr`, if any.
    pub fn claimant(&self, space: Space, addr: u64) -> Option<&str> {
        self.find(space, addr, 1).map(|(_, m)| m.name.as_str())
    }

    fn unclaimed(&self, space: Space) -> &Counter {
        match space {
            Space::Pio => &self.unclaimed_pio,
            Space::Mmio => &self.unclaimed_mmio,
        }
    }

    /// Reads `data.len()` bytes at `addr`. Unclaimed: all-ones.
    pub fn read(&self, space: Space, addr: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
        let len = data.len() as u64;
        self.access(space, addr, len, ctx, |dev, off, ctx| {
            dev.read(space, off, data, ctx)
        })
        .unwrap_or_else(|| {
            data.fill(0xff);
            UNCLAIMED_LATENCY
        })
    }

    /// Writes `data` at `addr`. Unclaimed: dropped.
    pub fn write(&self, space: Space, addr: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick {
        self.access(space, addr, data.len() as u64, ctx, |dev, off, ctx| {
            dev.write(space, off, data, ctx)
        })
        .unwrap_or(UNCLAIMED_LATENCY)
    }

    /// Hands an access of `len` bytes at `addr` to the device that claims
    /// it (`f` gets the device, the offset and the context): a shared
    /// device under the device clock (see the type's description), a
    /// banked one at the calling CPU's own time. `None` (counted) if no
    /// device claims it.
    fn access(
        &self,
        space: Space,
        addr: u64,
        len: u64,
        ctx: &mut AccessCtx,
        f: impl FnOnce(&mut dyn BusDevice, u64, &mut AccessCtx) -> Tick,
    ) -> Option<Tick> {
        if !self.movable.is_empty() {
            match self.find_movable(space, addr, len, ctx.cpu_index) {
                Ok(Some((base, dev))) => return Some(f(&mut *lock(dev), addr - base, ctx)),
                Ok(None) => {}
                Err(()) => {
                    self.unclaimed(space).inc();
                    return None;
                }
            }
        }
        let found = self
            .find(space, addr, len)
            .and_then(|(base, m)| Some((base, m.device(ctx.cpu_index)?)));
        let Some((base, (dev, shared))) = found else {
            self.unclaimed(space).inc();
            return None;
        };
        if !shared {
            return Some(f(&mut *lock(dev), addr - base, ctx));
        }
        let mut clock = lock(&self.clock);
        *clock = (*clock).max(ctx.now);
        ctx.now = *clock;
        let latency = f(&mut *lock(dev), addr - base, ctx);
        self.shared_accesses
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Some(latency)
    }
}

/// The bank of a per-CPU device for a CPU that has none: unclaimed.
struct Absent;

impl BusDevice for Absent {
    fn read(&mut self, _: Space, _: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
        data.fill(0xff);
        UNCLAIMED_LATENCY
    }
    fn write(&mut self, _: Space, _: u64, _: &[u8], _: &mut AccessCtx) -> Tick {
        UNCLAIMED_LATENCY
    }
    fn save(&self) -> SavedState {
        SavedState::Null
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        null_state(state)
    }
}

/// Locks a device. A device that panicked while locked is still usable: its
/// state is whatever it was, which is all a guest could observe anyway.
pub fn lock<T: ?Sized>(dev: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset's low byte.
    struct Probe {
        log: Vec<(Space, u64, usize, bool)>,
        latency: Tick,
    }

    impl BusDevice for Probe {
        fn read(&mut self, s: Space, off: u64, data: &mut [u8], _: &mut AccessCtx) -> Tick {
            self.log.push((s, off, data.len(), false));
            data.fill(off as u8);
            self.latency
        }
        fn write(&mut self, s: Space, off: u64, data: &[u8], _: &mut AccessCtx) -> Tick {
            self.log.push((s, off, data.len(), true));
            self.latency
        }
        fn save(&self) -> SavedState {
            SavedState::Null
        }
        fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
            null_state(state)
        }
    }

    fn probe(latency: Tick) -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe {
            log: vec![],
            latency,
        }))
    }

    #[test]
    fn routes_by_space_and_range() {
        let mut stats = Stats::new();
        let mut bus = IoBus::new(&mut stats, "system.iobus").unwrap();
        let a = probe(7);
        let b = probe(9);
        bus.insert(Space::Pio, 0x3f8, 8, "uart", a.clone()).unwrap();
        bus.insert(Space::Mmio, 0x3f8, 8, "other", b.clone())
            .unwrap();
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        let mut d = [0u8; 1];
        assert_eq!(bus.read(Space::Pio, 0x3fd, &mut d, &mut ctx), 7);
        assert_eq!(d, [5]);
        assert_eq!(bus.write(Space::Mmio, 0x3f8, &[1, 2], &mut ctx), 9);
        assert_eq!(a.lock().unwrap().log, vec![(Space::Pio, 5, 1, false)]);
        assert_eq!(b.lock().unwrap().log, vec![(Space::Mmio, 0, 2, true)]);
        assert_eq!(bus.claimant(Space::Pio, 0x3ff), Some("uart"));
        assert_eq!(bus.claimant(Space::Pio, 0x400), None);
    }

    /// Records the tick of every access it sees.
    struct Clocked(Vec<Tick>);

    impl BusDevice for Clocked {
        fn read(&mut self, _: Space, _: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
            self.0.push(ctx.now);
            data.fill(0);
            1
        }
        fn write(&mut self, _: Space, _: u64, _: &[u8], ctx: &mut AccessCtx) -> Tick {
            self.0.push(ctx.now);
            1
        }
        fn save(&self) -> SavedState {
            SavedState::Null
        }
        fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
            null_state(state)
        }
    }

    #[test]
    fn a_movable_bank_answers_its_cpu_at_its_new_base_only() {
        let mut stats = Stats::new();
        let mut bus = IoBus::new(&mut stats, "b").unwrap();
        let banks = [probe(1), probe(1)];
        let bases = [MovableBase::new(0xfee0_0000), MovableBase::new(0xfee0_0000)];
        bus.insert_banked_movable(
            Space::Mmio,
            0xfee0_0000,
            0x1000,
            "lapic",
            banks.iter().map(|b| b.clone() as DeviceHandle).collect(),
            bases.to_vec(),
        )
        .unwrap();
        let other = probe(5);
        bus.insert(Space::Mmio, 0xfed4_0000, 0x1000, "other", other.clone())
            .unwrap();
        let read = |cpu: usize, addr: u64| {
            let mut reqs = vec![];
            let mut ctx = AccessCtx::new(0, &mut reqs);
            ctx.cpu_index = cpu;
            let mut d = [0u8; 4];
            bus.read(Space::Mmio, addr, &mut d, &mut ctx)
        };
        // CPU 0 moves its bank over the other device.
        bases[0].set(0xfed4_0000);
        assert_eq!(read(0, 0xfed4_0030), 1, "CPU 0's bank at its new base");
        assert_eq!(
            read(0, 0xfee0_0030),
            UNCLAIMED_LATENCY,
            "nothing at the old"
        );
        assert_eq!(read(1, 0xfee0_0020), 1, "CPU 1's bank stays");
        assert_eq!(read(1, 0xfed4_0040), 5, "CPU 1 reaches the other device");
        assert_eq!(
            banks[0].lock().unwrap().log,
            vec![(Space::Mmio, 0x30, 4, false)]
        );
        assert_eq!(
            banks[1].lock().unwrap().log,
            vec![(Space::Mmio, 0x20, 4, false)]
        );
        assert_eq!(
            other.lock().unwrap().log,
            vec![(Space::Mmio, 0x40, 4, false)]
        );
        // An access across the moved range's end is not the bank's.
        assert_eq!(read(0, 0xfed4_0ffe), UNCLAIMED_LATENCY);
        assert_eq!(banks[0].lock().unwrap().log.len(), 1);
        // Back home.
        bases[0].set(0xfee0_0000);
        assert_eq!(read(0, 0xfee0_0030), 1);
        // Checkpoints name the banks as before.
        let names: Vec<String> = bus.state_owners().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"lapic.0".to_string()) && names.contains(&"lapic.1".to_string()));
        // Bases must match the banks.
        let mut bus2 = IoBus::new(&mut stats, "c").unwrap();
        assert!(bus2
            .insert_banked_movable(Space::Mmio, 0, 0x10, "x", vec![probe(1)], vec![])
            .is_err());
    }

    #[test]
    fn banked_devices_answer_their_own_cpu_at_its_own_time() {
        let mut stats = Stats::new();
        let mut bus = IoBus::new(&mut stats, "b").unwrap();
        let banks: Vec<Arc<Mutex<Clocked>>> = (0..2)
            .map(|_| Arc::new(Mutex::new(Clocked(vec![]))))
            .collect();
        bus.insert_banked(
            Space::Mmio,
            0xfee0_0000,
            0x1000,
            "lapic",
            banks.iter().map(|b| b.clone() as DeviceHandle).collect(),
        )
        .unwrap();
        let mut reqs = vec![];
        for (cpu, now) in [(1, 500), (0, 100), (2, 50)] {
            let mut ctx = AccessCtx::new(now, &mut reqs);
            ctx.cpu_index = cpu;
            bus.write(Space::Mmio, 0xfee0_00b0, &[0; 4], &mut ctx);
        }
        assert_eq!(banks[0].lock().unwrap().0, vec![100], "CPU 0 at its time");
        assert_eq!(banks[1].lock().unwrap().0, vec![500]);
        // A CPU without a bank finds nothing there.
        assert_eq!(stats.dump(0).get("b.unclaimedMmio").unwrap().as_f64(), 1.0);
        // Banked accesses do not move the shared devices' clock.
        assert_eq!(bus.device_time(), 0);
    }

    #[test]
    fn a_shared_device_never_sees_time_go_backwards() {
        // CPUs of one system reach a shared device out of tick order
        // (they drift apart within a window): the device sees the latest
        // tick seen so far instead of an earlier one.
        let mut stats = Stats::new();
        let mut bus = IoBus::new(&mut stats, "b").unwrap();
        let dev = Arc::new(Mutex::new(Clocked(vec![])));
        bus.insert(Space::Pio, 0x3f8, 8, "uart", dev.clone())
            .unwrap();
        let mut reqs = vec![];
        for (cpu, now) in [(0, 100), (1, 300), (0, 200), (1, 400)] {
            let mut ctx = AccessCtx::new(now, &mut reqs);
            ctx.cpu_index = cpu;
            let mut d = [0u8];
            bus.read(Space::Pio, 0x3f8, &mut d, &mut ctx);
        }
        // Deadlines serviced outside an access go through the same clock.
        let seen = bus.with_device_clock(250, |now| now);
        assert_eq!(seen, 400);
        assert_eq!(dev.lock().unwrap().0, vec![100, 300, 300, 400]);
        assert_eq!(bus.device_time(), 400);
    }

    #[test]
    fn unclaimed_reads_all_ones_and_counts() {
        let mut stats = Stats::new();
        let bus = IoBus::new(&mut stats, "system.iobus").unwrap();
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        let mut d = [0u8; 4];
        bus.read(Space::Pio, 0x80, &mut d, &mut ctx);
        assert_eq!(d, [0xff; 4]);
        bus.write(Space::Pio, 0x80, &[1], &mut ctx);
        bus.read(Space::Mmio, 0xfee0_0000, &mut d, &mut ctx);
        let dump = stats.dump(0);
        assert_eq!(dump.get("system.iobus.unclaimedPio").unwrap().as_f64(), 2.0);
        assert_eq!(
            dump.get("system.iobus.unclaimedMmio").unwrap().as_f64(),
            1.0
        );
    }

    #[test]
    fn access_straddling_the_end_is_unclaimed() {
        let mut stats = Stats::new();
        let mut bus = IoBus::new(&mut stats, "b").unwrap();
        let a = probe(1);
        bus.insert(Space::Mmio, 0x1000, 0x10, "a", a.clone())
            .unwrap();
        let mut reqs = vec![];
        let mut ctx = AccessCtx::new(0, &mut reqs);
        let mut d = [0u8; 8];
        bus.read(Space::Mmio, 0x100c, &mut d, &mut ctx);
        assert_eq!(d, [0xff; 8]);
        bus.read(Space::Mmio, u64::MAX, &mut d, &mut ctx);
        assert!(a.lock().unwrap().log.is_empty());
    }

    #[test]
    fn deadlines_are_serviced_on_time_at_once_or_never() {
        assert_eq!(service_tick(Some(50), 10), Some(50));
        assert_eq!(
            service_tick(Some(5), 10),
            Some(10),
            "a past deadline is due now"
        );
        assert_eq!(service_tick(None, 10), None);
        // A timer whose arithmetic saturated: servicing it at the end of
        // time would leave it due at the same tick again, forever.
        assert_eq!(service_tick(Some(Tick::MAX), 10), None);
        assert_eq!(
            service_tick(Some(Tick::MAX - 1), Tick::MAX),
            Some(Tick::MAX)
        );
    }

    #[test]
    fn state_owners_once_each_with_banks_named() {
        let mut stats = Stats::new();
        let mut bus = IoBus::new(&mut stats, "t").unwrap();
        let a = probe(1);
        bus.insert(Space::Pio, 0x60, 1, "kbd", a.clone()).unwrap();
        let again: DeviceHandle = Arc::new(Mutex::new(Rebased {
            dev: a.clone(),
            add: 4,
        }));
        bus.insert(Space::Pio, 0x64, 1, "kbd-cmd", again.clone())
            .unwrap();
        bus.insert_banked(Space::Mmio, 0x1000, 0x10, "apic", vec![probe(1), probe(1)])
            .unwrap();
        bus.insert_banked(Space::Mmio, 0x2000, 0x10, "one", vec![probe(1)])
            .unwrap();
        let names: Vec<String> = bus.state_owners().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["kbd", "apic.0", "apic.1", "one.0"]);
        // A stateless device saves null and takes nothing else back,
        // also through a second range.
        assert_eq!(lock(&a).save(), SavedState::Null);
        assert!(lock(&a).restore(&SavedState::Null).is_ok());
        let err = lock(&a).restore(&serde_json::json!({"x": 1})).unwrap_err();
        assert!(err.0.contains("an object"), "{err}");
        assert!(lock(&again).restore(&serde_json::json!(3)).is_err());
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut stats = Stats::new();
        let mut bus = IoBus::new(&mut stats, "b").unwrap();
        bus.insert(Space::Pio, 0x40, 4, "pit", probe(1)).unwrap();
        assert!(matches!(
            bus.insert(Space::Pio, 0x42, 4, "x", probe(1)),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(Space::Pio, 0x3c, 5, "y", probe(1)),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(Space::Pio, 0x3c, 4, "z", probe(1)).unwrap();
        bus.insert(Space::Pio, 0x44, 4, "w", probe(1)).unwrap();
        assert!(matches!(
            bus.insert(Space::Pio, 0x50, 0, "e", probe(1)),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(Space::Mmio, u64::MAX, 2, "e", probe(1)),
            Err(BusError::BadRange { .. })
        ));
    }
}
