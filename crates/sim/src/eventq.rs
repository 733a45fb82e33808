//! An event queue ordered by (tick, priority, insertion order).
//!
//! Events carry a payload of the owner's choosing (typically an enum that the
//! owner dispatches). Each scheduled event has a stable [`EventId`] that can be
//! used to deschedule or reschedule it. Descheduling is O(1) (the heap entry is
//! dropped lazily when it surfaces).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::tick::Tick;

/// Order among events of the same tick: lower values run first.
pub type Priority = i32;

/// Default priority of ordinary events.
pub const DEFAULT_PRI: Priority = 0;
/// Priority of CPU ticks: after devices' events of the same tick, so that the
/// CPU sees the device state of that tick.
pub const CPU_TICK_PRI: Priority = 50;
/// Priority of stats dumps and resets: after everything else of that tick.
pub const STAT_EVENT_PRI: Priority = 90;
/// Priority of simulation exit events: last in their tick.
pub const SIM_EXIT_PRI: Priority = 100;

/// Handle of a scheduled event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(u64);

/// Why an event could not be scheduled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Scheduling in the past would make simulated time go back.
    #[error("event scheduled at tick {when}, before the current tick {now}")]
    InThePast { when: Tick, now: Tick },
    /// The id does not name a scheduled event.
    #[error("event {0:?} is not scheduled")]
    NotScheduled(EventId),
}

#[derive(Debug)]
struct Slot<E> {
    tick: Tick,
    priority: Priority,
    seq: u64,
    payload: E,
}

/// A queue of timed events. Its current tick only moves forward.
#[derive(Debug)]
pub struct EventQueue<E> {
    now: Tick,
    heap: BinaryHeap<Reverse<(Tick, Priority, u64, EventId)>>,
    live: HashMap<EventId, Slot<E>>,
    next_seq: u64,
    next_id: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> EventQueue<E> {
    /// An empty queue at tick 0.
    pub fn new() -> Self {
        EventQueue {
            now: 0,
            heap: BinaryHeap::new(),
            live: HashMap::new(),
            next_seq: 0,
            next_id: 0,
        }
    }

    /// The current tick: the tick of the event being (or last) serviced.
    pub fn cur_tick(&self) -> Tick {
        self.now
    }

    /// Number of scheduled events.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Schedules `payload` at `when` with `priority`.
    pub fn schedule(
        &mut self,
        when: Tick,
        priority: Priority,
        payload: E,
    ) -> Result<EventId, ScheduleError> {
        if when < self.now {
            return Err(ScheduleError::InThePast {
                when,
                now: self.now,
            });
        }
        let id = EventId(self.next_id);
        self.next_id += 1;
        let seq = self.bump_seq();
        self.heap.push(Reverse((when, priority, seq, id)));
        self.live.insert(
            id,
            Slot {
                tick: when,
                priority,
                seq,
                payload,
            },
        );
        Ok(id)
    }

    /// Removes a scheduled event and returns its payload.
    pub fn deschedule(&mut self, id: EventId) -> Result<E, ScheduleError> {
        self.live
            .remove(&id)
            .map(|s| s.payload)
            .ok_or(ScheduleError::NotScheduled(id))
    }

    /// Moves a scheduled event to `when`. It keeps its id and payload and is
    /// ordered as if scheduled now (after events already at that tick and priority).
    pub fn reschedule(&mut self, id: EventId, when: Tick) -> Result<(), ScheduleError> {
        if when < self.now {
            return Err(ScheduleError::InThePast {
                when,
                now: self.now,
            });
        }
        let seq = self.bump_seq();
        let slot = self
            .live
            .get_mut(&id)
            .ok_or(ScheduleError::NotScheduled(id))?;
        slot.tick = when;
        slot.seq = seq;
        let priority = slot.priority;
        self.heap.push(Reverse((when, priority, seq, id)));
        Ok(())
    }

    /// True if `id` is scheduled.
    pub fn is_scheduled(&self, id: EventId) -> bool {
        self.live.contains_key(&id)
    }

    /// The tick at which `id` will run, if scheduled.
    pub fn when(&self, id: EventId) -> Option<Tick> {
        self.live.get(&id).map(|s| s.tick)
    }

    /// The tick of the next event, if any.
    pub fn next_tick(&mut self) -> Option<Tick> {
        self.skip_stale();
        self.heap.peek().map(|Reverse((t, ..))| *t)
    }

    /// The (tick, priority, insertion order) of the next event, if any:
    /// what two queues merged into one order compare.
    pub fn peek_key(&mut self) -> Option<(Tick, Priority, u64)> {
        self.skip_stale();
        self.heap.peek().map(|Reverse((t, p, s, _))| (*t, *p, *s))
    }

    /// Removes the next event, advances the current tick to it and returns it.
    pub fn pop(&mut self) -> Option<(Tick, EventId, E)> {
        self.skip_stale();
        let Reverse((tick, _, _, id)) = self.heap.pop()?;
        let slot = self.live.remove(&id)?;
        debug_assert!(tick >= self.now);
        self.now = tick;
        Some((tick, id, slot.payload))
    }

    /// Like [`pop`](Self::pop), but only if the next event is at or before `limit`.
    pub fn pop_until(&mut self, limit: Tick) -> Option<(Tick, EventId, E)> {
        match self.next_tick() {
            Some(t) if t <= limit => self.pop(),
            _ => None,
        }
    }

    /// Every scheduled event in the order they would run (tick, priority,
    /// insertion order): what a checkpoint saves. Scheduling them again in
    /// this order into a queue at the same tick runs them in the same order.
    pub fn pending(&self) -> Vec<(Tick, Priority, EventId, &E)> {
        let mut v: Vec<_> = self
            .live
            .iter()
            .map(|(id, s)| (s.tick, s.priority, s.seq, *id, &s.payload))
            .collect();
        v.sort_by_key(|&(t, p, seq, ..)| (t, p, seq));
        v.into_iter()
            .map(|(t, p, _, id, e)| (t, p, id, e))
            .collect()
    }

    /// Advances the current tick to `to` without servicing anything. Fails if
    /// an event is due before `to` or if `to` is in the past.
    pub fn advance_to(&mut self, to: Tick) -> Result<(), ScheduleError> {
        if to < self.now {
            return Err(ScheduleError::InThePast {
                when: to,
                now: self.now,
            });
        }
        if let Some(next) = self.next_tick() {
            if next < to {
                return Err(ScheduleError::InThePast {
                    when: next,
                    now: to,
                });
            }
        }
        self.now = to;
        Ok(())
    }

    fn bump_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Drops heap entries whose event was descheduled or rescheduled.
    fn skip_stale(&mut self) {
        while let Some(Reverse((tick, pri, seq, id))) = self.heap.peek() {
            match self.live.get(id) {
                Some(s) if s.seq == *seq && s.tick == *tick && s.priority == *pri => break,
                _ => {
                    self.heap.pop();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn orders_by_tick_priority_then_insertion() {
        let mut q = EventQueue::new();
        q.schedule(10, 0, "c").unwrap();
        q.schedule(5, 1, "b").unwrap();
        q.schedule(5, 0, "a1").unwrap();
        q.schedule(5, 0, "a2").unwrap();
        q.schedule(5, -1, "first").unwrap();
        let order: Vec<_> = std::iter::from_fn(|| q.pop().map(|(_, _, p)| p)).collect();
        assert_eq!(order, vec!["first", "a1", "a2", "b", "c"]);
        assert_eq!(q.cur_tick(), 10);
    }

    #[test]
    fn pending_lists_events_in_run_order_and_refills_a_queue_alike() {
        let mut q = EventQueue::new();
        q.schedule(10, 0, "c").unwrap();
        let b = q.schedule(5, 1, "b").unwrap();
        q.schedule(5, 0, "a1").unwrap();
        q.schedule(5, 0, "a2").unwrap();
        q.schedule(7, 0, "gone")
            .map(|id| q.deschedule(id))
            .unwrap()
            .unwrap();
        q.reschedule(b, 6).unwrap();
        q.pop();
        let saved: Vec<(Tick, Priority, &str)> = q
            .pending()
            .into_iter()
            .map(|(t, p, _, e)| (t, p, *e))
            .collect();
        assert_eq!(saved, [(5, 0, "a2"), (6, 1, "b"), (10, 0, "c")]);
        let mut r = EventQueue::new();
        r.advance_to(q.cur_tick()).unwrap();
        for &(t, p, e) in &saved {
            r.schedule(t, p, e).unwrap();
        }
        fn order(q: &mut EventQueue<&'static str>) -> Vec<(Tick, &'static str)> {
            std::iter::from_fn(|| q.pop().map(|(t, _, e)| (t, e))).collect()
        }
        assert_eq!(order(&mut q), order(&mut r));
    }

    #[test]
    fn deschedule_and_reschedule() {
        let mut q = EventQueue::new();
        let a = q.schedule(10, 0, 'a').unwrap();
        let b = q.schedule(20, 0, 'b').unwrap();
        let c = q.schedule(30, 0, 'c').unwrap();
        assert_eq!(q.deschedule(b), Ok('b'));
        assert_eq!(q.deschedule(b), Err(ScheduleError::NotScheduled(b)));
        q.reschedule(a, 40).unwrap();
        assert_eq!(q.when(a), Some(40));
        assert_eq!(q.next_tick(), Some(30));
        assert_eq!(q.pop(), Some((30, c, 'c')));
        assert_eq!(q.pop().map(|(t, _, p)| (t, p)), Some((40, 'a')));
        assert!(q.pop().is_none());
        assert!(q.is_empty());
    }

    #[test]
    fn rescheduled_event_goes_after_peers() {
        let mut q = EventQueue::new();
        let a = q.schedule(5, 0, 'a').unwrap();
        q.schedule(5, 0, 'b').unwrap();
        q.reschedule(a, 5).unwrap();
        assert_eq!(q.pop().unwrap().2, 'b');
        assert_eq!(q.pop().unwrap().2, 'a');
    }

    #[test]
    fn time_never_goes_back() {
        let mut q = EventQueue::new();
        q.schedule(100, 0, ()).unwrap();
        q.pop().unwrap();
        assert_eq!(
            q.schedule(99, 0, ()),
            Err(ScheduleError::InThePast { when: 99, now: 100 })
        );
        let id = q.schedule(100, 0, ()).unwrap();
        assert!(q.reschedule(id, 50).is_err());
        assert!(q.advance_to(200).is_err(), "an event is due at 100");
        q.pop().unwrap();
        q.advance_to(200).unwrap();
        assert_eq!(q.cur_tick(), 200);
        assert!(q.advance_to(150).is_err());
    }

    #[test]
    fn pop_until_respects_limit() {
        let mut q = EventQueue::new();
        q.schedule(10, 0, 1).unwrap();
        q.schedule(20, 0, 2).unwrap();
        assert_eq!(q.pop_until(15).map(|e| e.2), Some(1));
        assert_eq!(q.pop_until(15).map(|e| e.2), None);
        assert_eq!(q.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Schedule(u16, i8),
        Deschedule(usize),
        Reschedule(usize, u16),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<u16>(), -3i8..3).prop_map(|(t, p)| Op::Schedule(t, p)),
            any::<usize>().prop_map(Op::Deschedule),
            (any::<usize>(), any::<u16>()).prop_map(|(i, t)| Op::Reschedule(i, t)),
            Just(Op::Pop),
        ]
    }

    proptest! {
        /// The queue behaves like a reference model: a list of live events
        /// from which the minimum (tick, priority, seq) is popped.
        #[test]
        fn matches_reference_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut q = EventQueue::new();
            // (id, tick, priority, seq, payload)
            let mut model: Vec<(EventId, Tick, Priority, u64, usize)> = Vec::new();
            let mut ids: Vec<EventId> = Vec::new();
            let mut seq = 0u64;
            for (n, op) in ops.into_iter().enumerate() {
                let now = q.cur_tick();
                match op {
                    Op::Schedule(t, p) => {
                        let when = now + t as Tick;
                        let id = q.schedule(when, p as Priority, n).unwrap();
                        model.push((id, when, p as Priority, seq, n));
                        seq += 1;
                        ids.push(id);
                    }
                    Op::Deschedule(i) if !ids.is_empty() => {
                        let id = ids[i % ids.len()];
                        let in_model = model.iter().position(|e| e.0 == id);
                        let r = q.deschedule(id);
                        match in_model {
                            Some(pos) => prop_assert_eq!(r, Ok(model.remove(pos).4)),
                            None => prop_assert!(r.is_err()),
                        }
                    }
                    Op::Reschedule(i, t) if !ids.is_empty() => {
                        let id = ids[i % ids.len()];
                        let when = now + t as Tick;
                        let r = q.reschedule(id, when);
                        match model.iter_mut().find(|e| e.0 == id) {
                            Some(e) => { prop_assert!(r.is_ok()); e.1 = when; e.3 = seq; seq += 1; }
                            None => prop_assert!(r.is_err()),
                        }
                    }
                    Op::Pop => {
                        let expect = model
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, e)| (e.1, e.2, e.3))
                            .map(|(i, _)| i);
                        let got = q.pop();
                        match expect {
                            Some(i) => {
                                let e = model.remove(i);
                                let (t, id, p) = got.unwrap();
                                prop_assert_eq!((t, id, p), (e.1, e.0, e.4));
                                prop_assert!(t >= now, "time went back");
                            }
                            None => prop_assert!(got.is_none()),
                        }
                    }
                    _ => {}
                }
                prop_assert_eq!(q.len(), model.len());
            }
            // Draining pops in non-decreasing tick order.
            let mut last = q.cur_tick();
            while let Some((t, _, _)) = q.pop() {
                prop_assert!(t >= last);
                last = t;
            }
        }
    }
}
