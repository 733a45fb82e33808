//! A system in a checkpoint: what the simulator keeps besides KVM's CPU
//! state and the devices' own (the event queues with every pending event,
//! the CPUs' places in simulated time, the statistics), and putting it all
//! back into a freshly built system.
//!
//! Events are saved in the order they would run and scheduled again in that
//! order into queues set to the saved ticks, so a restored system runs the
//! same events in the same order at the same ticks. What the configuration
//! schedules (the `max_time` end, the periodic drain, `checkpoint_at`) is
//! scheduled again from the configuration of the restored run, which may
//! override it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sim::stats::StatsSaved;
use sim::Priority;

use super::*;

/// Where a system is restored from: a checkpoint folder and its state of
/// the system.
pub struct Restore<'a> {
    pub dir: &'a Path,
    pub state: &'a ckpt::SystemState,
}

impl Restore<'_> {
    /// The checkpoint's RAM, mapped copy-on-write, which must be the
    /// layout of `memory` bytes (the configured size).
    pub(super) fn map_ram(&self, memory: u64) -> Result<GuestRam, PlatformError> {
        let want = MemoryMap::for_size(memory).map_err(PlatformError::Ram)?;
        let ram = ckpt::map_guest_ram(self.dir, &self.state.ram)?;
        if ram.map().total() != want.total() {
            return Err(PlatformError::Checkpoint(format!(
                "{}: system {} has {} bytes of RAM in the checkpoint, the config says {memory}",
                self.dir.display(),
                self.state.name,
                ram.map().total()
            )));
        }
        Ok(ram)
    }
}

/// One pending event.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved<E> {
    tick: Tick,
    pri: Priority,
    event: E,
}

/// The simulator's side of a system.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimSaved {
    /// The system queue's current tick.
    now: Tick,
    /// The latest tick a shared device has seen.
    device_time: Tick,
    /// The system queue's events in run order.
    events: Vec<Saved<SysEvent>>,
    /// Which of `events` is the periodic stats dump and reset, if any.
    periodic_dump: Option<usize>,
    periodic_reset: Option<usize>,
    /// Link values sent and not yet handed to the link.
    outgoing: Vec<Outgoing>,
    stats: StatsSaved,
    /// A bare single-CPU system's interrupt controller (pending vectors,
    /// NMI); none where the controllers are devices on the bus.
    intc: Option<mem::SavedState>,
    /// Each CPU's queue and place, in index order.
    cpus: Vec<SlotSaved>,
}

/// A CPU's queue and its place in simulated time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlotSaved {
    now: Tick,
    /// The simulated time the CPU has run up to.
    next: Tick,
    /// An AP that has not been started (or was INIT'ed).
    waiting_sipi: bool,
    events: Vec<Saved<CpuEvent>>,
    /// Arrivals posted by other threads and not yet taken.
    inbox: Vec<(Tick, Arrival)>,
}

fn bad(what: String) -> PlatformError {
    PlatformError::Checkpoint(what)
}

impl System {
    /// True once every CPU drained for a checkpoint (the run stopped for it).
    pub fn checkpoint_ready(&self) -> bool {
        self.shared.ckpt_ready.load(Ordering::Acquire)
    }

    /// After a checkpoint: every CPU goes on from where it stopped.
    pub fn resume_after_checkpoint(&mut self) -> Result<(), PlatformError> {
        self.shared.ckpt_ready.store(false, Ordering::Release);
        for slot in &mut self.cpus {
            let at = slot.queue.cur_tick();
            // The run goes on in new threads (several CPUs or systems): each
            // binds its CPU's run timer and counters to itself again, as at
            // the start (without it, nothing forces a guest spinning in
            // ring 3 out of KVM: the old thread's timer is gone).
            slot.queue.schedule(at, STARTUP_PRI, CpuEvent::Startup)?;
            post(&self.shared.inboxes[slot.index], at, Arrival::Resume, false);
        }
        Ok(())
    }

    /// Saves the system into checkpoint folder `dir` (its RAM as
    /// `ram.{index}.bin`). Every CPU must be drained (the run stopped for a
    /// checkpoint) and no thread may be running the system.
    pub fn save(
        &mut self,
        dir: &Path,
        index: usize,
    ) -> Result<(ckpt::SystemState, ckpt::RamWritten), PlatformError> {
        let name = self.shared.name.clone();
        let mut cpus = Vec::with_capacity(self.cpus.len());
        let mut slots = Vec::with_capacity(self.cpus.len());
        for slot in &mut self.cpus {
            cpus.push(slot.cpu.save_state()?);
            let events = slot
                .queue
                .pending()
                .into_iter()
                // Per-thread set-up and window ends belong to the run that
                // is going on, not to the machine.
                .filter(|(.., e)| !matches!(e, CpuEvent::Startup | CpuEvent::WindowEnd))
                .map(|(tick, pri, _, e)| Saved {
                    tick,
                    pri,
                    event: e.clone(),
                })
                .collect();
            let inbox = mem::lock(&self.shared.inboxes[slot.index].items).clone();
            slots.push(SlotSaved {
                now: slot.queue.cur_tick(),
                next: slot.next,
                waiting_sipi: slot.waiting_sipi,
                events,
                inbox,
            });
        }
        let sim = {
            let core = mem::lock(&self.shared.core);
            let pending = core.queue.pending();
            let index_of = |id: Option<EventId>| {
                id.and_then(|id| pending.iter().position(|(_, _, i, _)| *i == id))
            };
            SimSaved {
                now: core.queue.cur_tick(),
                device_time: self.shared.bus.device_time(),
                events: pending
                    .iter()
                    .map(|&(tick, pri, _, e)| Saved {
                        tick,
                        pri,
                        event: e.clone(),
                    })
                    .collect(),
                periodic_dump: index_of(core.periodic_dump),
                periodic_reset: index_of(core.periodic_reset),
                outgoing: core.outgoing.clone(),
                stats: core.stats.save(),
                intc: self
                    .shared
                    .vector_intc
                    .as_ref()
                    .map(|v| mem::lock(v).save()),
                cpus: slots,
            }
        };
        let mut devices = BTreeMap::new();
        for (dev_name, dev) in self.shared.bus.state_owners() {
            let state = mem::lock(&dev).save();
            devices.insert(dev_name, state);
        }
        let (ram, written) = ckpt::write_ram(dir, &format!("ram.{index}.bin"), self._ram.memory())?;
        let disks = crate::disks::save(&name, &self.shared.disks, dir)?;
        let sim = serde_json::to_value(&sim)
            .map_err(|e| bad(format!("{name}: saving the simulator's state: {e}")))?;
        Ok((
            ckpt::SystemState {
                name,
                ram,
                cpus,
                devices,
                sim,
                disks,
            },
            written,
        ))
    }

    /// Puts `from`'s saved state into this freshly built system (built
    /// from the checkpoint's config and RAM); `sim` is the restored run's
    /// configuration (its limits are scheduled anew).
    pub(super) fn restore(
        &mut self,
        from: &Restore<'_>,
        sim: &SimConfig,
    ) -> Result<(), PlatformError> {
        let st = from.state;
        let whose = format!("{}: system {}", from.dir.display(), st.name);
        let saved: SimSaved = serde_json::from_value(st.sim.clone()).map_err(|e| {
            bad(format!(
                "{whose}: the simulator's state does not parse: {e}"
            ))
        })?;
        if st.cpus.len() != self.cpus.len() || saved.cpus.len() != self.cpus.len() {
            return Err(bad(format!(
                "{whose}: {} CPUs in the checkpoint, {} in the config (the CPU count cannot \
                 change on a restore)",
                st.cpus.len(),
                self.cpus.len()
            )));
        }

        // Devices: the same set, each taking its own state.
        let owners = self.shared.bus.state_owners();
        for (dev_name, _) in &owners {
            if !st.devices.contains_key(dev_name) {
                return Err(bad(format!(
                    "{whose}: device {dev_name} has no saved state in the checkpoint"
                )));
            }
        }
        if let Some(extra) = st
            .devices
            .keys()
            .find(|k| !owners.iter().any(|(n, _)| n == *k))
        {
            return Err(bad(format!(
                "{whose}: the checkpoint holds device {extra}, which this system does not have"
            )));
        }
        for (dev_name, dev) in &owners {
            mem::lock(dev)
                .restore(&st.devices[dev_name])
                .map_err(|e| bad(format!("{whose}: device {dev_name}: {e}")))?;
        }
        self.shared.bus.set_device_time(saved.device_time);
        match (&self.shared.vector_intc, &saved.intc) {
            (Some(v), Some(s)) => mem::lock(v)
                .restore(s)
                .map_err(|e| bad(format!("{whose}: the interrupt controller: {e}")))?,
            (None, None) => {}
            _ => {
                return Err(bad(format!(
                    "{whose}: the checkpoint's interrupt controller is not this system's"
                )))
            }
        }

        // The system's queue, statistics and link values.
        {
            let mut core = mem::lock(&self.shared.core);
            let core = &mut *core;
            core.stats
                .restore(&saved.stats)
                .map_err(|e| bad(format!("{whose}: {e}")))?;
            let now = saved.now;
            let mut q = EventQueue::new();
            q.advance_to(now)?;
            for t in &mut core.timed {
                t.event = None;
            }
            core.periodic_dump = None;
            core.periodic_reset = None;
            for (k, e) in saved.events.iter().enumerate() {
                if e.tick < now {
                    return Err(bad(format!(
                        "{whose}: event {:?} at tick {} lies before the queue's tick {now}",
                        e.event, e.tick
                    )));
                }
                match e.event {
                    // What the configuration schedules is scheduled anew.
                    SysEvent::MaxTick | SysEvent::Drain { .. } => continue,
                    SysEvent::Device(i) if i >= core.timed.len() => {
                        return Err(bad(format!(
                            "{whose}: a deadline of timed device {i}, which does not exist"
                        )))
                    }
                    _ => {}
                }
                let id = q.schedule(e.tick, e.pri, e.event.clone())?;
                if let SysEvent::Device(i) = e.event {
                    core.timed[i].event = Some((id, e.tick));
                }
                if saved.periodic_dump == Some(k) {
                    core.periodic_dump = Some(id);
                }
                if saved.periodic_reset == Some(k) {
                    core.periodic_reset = Some(id);
                }
            }
            if let Some(max) = sim.max_time {
                if max.0 < now {
                    return Err(bad(format!(
                        "sim.max_time ({} ticks) lies before the checkpoint's tick {now}",
                        max.0
                    )));
                }
                q.schedule(max.0, SIM_EXIT_PRI, SysEvent::MaxTick)?;
            }
            if let Some(p) = sim.drain_period.filter(|p| p.0 > 0) {
                let at = (now / p.0 + 1).saturating_mul(p.0);
                q.schedule(at, DEFAULT_PRI, SysEvent::Drain { period: p.0 })?;
            }
            if let Some(t) = sim.checkpoint_at.filter(|t| t.0 > now) {
                q.schedule(t.0, DEFAULT_PRI, SysEvent::Checkpoint { period: 0 })?;
            }
            core.queue = q;
            core.outgoing = saved.outgoing.clone();
            core.draining = false;
            core.checkpoint_pending = false;
        }

        // Every CPU: KVM's state, its queue, and a resume at its tick.
        for (slot, (cs, ss)) in self.cpus.iter_mut().zip(st.cpus.iter().zip(&saved.cpus)) {
            if cs.name != slot.cpu.name() {
                return Err(bad(format!(
                    "{whose}: CPU {} in the checkpoint is {} here",
                    cs.name,
                    slot.cpu.name()
                )));
            }
            slot.cpu.restore_state(cs)?;
            let now = ss.now;
            let mut q = EventQueue::new();
            q.advance_to(now)?;
            q.schedule(now, STARTUP_PRI, CpuEvent::Startup)?;
            slot.tick_event = None;
            slot.timer_event = None;
            for e in &ss.events {
                if e.tick < now {
                    return Err(bad(format!(
                        "{whose}: {} event {:?} at tick {} lies before its queue's tick {now}",
                        cs.name, e.event, e.tick
                    )));
                }
                if matches!(e.event, CpuEvent::Startup | CpuEvent::WindowEnd) {
                    continue;
                }
                let id = q.schedule(e.tick, e.pri, e.event.clone())?;
                match e.event {
                    CpuEvent::Tick => slot.tick_event = Some(id),
                    CpuEvent::ApicTimer => slot.timer_event = Some((id, e.tick)),
                    _ => {}
                }
            }
            // Saved drained: it goes on as a drained CPU does when resumed.
            q.schedule(now, DEFAULT_PRI, CpuEvent::Arrive(Arrival::Resume))?;
            slot.queue = q;
            slot.next = ss.next;
            slot.waiting_sipi = ss.waiting_sipi;
            slot.drain_stopped = true;
            slot.posted = Tick::MAX;
            let inbox = &self.shared.inboxes[slot.index];
            *mem::lock(&inbox.items) = ss.inbox.clone();
            inbox.full.store(!ss.inbox.is_empty(), Ordering::Release);
        }
        self.shared.ckpt_ready.store(false, Ordering::Release);
        Ok(())
    }
}
