//! Named statistics in gem5's style.
//!
//! Each statistic has a dotted name (`system.cpu.numVMExits`), a description
//! and a unit. Objects keep cheap, thread-safe handles ([`Counter`],
//! [`Value`], [`Vector`]) and update them; the registry ([`Stats`]) dumps all
//! of them, with the built-in formulas (`simSeconds`, `hostSeconds`, ...), as
//! a stats.txt block in gem5's text layout or as JSON, and resets them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value as Json};

use crate::tick::{ticks_to_seconds, Tick, TICKS_PER_SECOND};

/// An integer statistic that counts events.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// A counter not attached to any registry (useful in tests).
    pub fn detached() -> Self {
        Self::default()
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// A floating-point statistic (seconds, ratios, ...).
#[derive(Debug, Clone)]
pub struct Value(Arc<AtomicU64>);

impl Default for Value {
    fn default() -> Self {
        Value(Arc::new(AtomicU64::new(0f64.to_bits())))
    }
}

impl Value {
    pub fn detached() -> Self {
        Self::default()
    }
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn add(&self, v: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    fn reset(&self) {
        self.set(0.0);
    }
}

/// A fixed-size vector of counters, dumped as `name::sub` lines plus `name::total`.
#[derive(Debug, Clone)]
pub struct Vector {
    cells: Arc<[AtomicU64]>,
}

impl Vector {
    pub fn detached(len: usize) -> Self {
        Vector {
            cells: (0..len).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub fn len(&self) -> usize {
        self.cells.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
    /// Adds `n` to element `i`; out-of-range indices are ignored.
    pub fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.cells.get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn get(&self, i: usize) -> u64 {
        self.cells
            .get(i)
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }
    fn reset(&self) {
        for c in self.cells.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// What a formula can see besides the handles it captured.
#[derive(Debug, Clone, Copy)]
pub struct FormulaCtx {
    /// Simulated ticks since the last reset.
    pub sim_ticks: Tick,
    /// Host seconds since the last reset.
    pub host_seconds: f64,
}

type Formula = Box<dyn Fn(&FormulaCtx) -> f64 + Send + Sync>;

/// Whether a statistic can be measured on this host. An unavailable
/// statistic is dumped as `nan` (text) and `null` (JSON), never as 0.
#[derive(Debug, Clone, Default)]
pub struct Availability(Arc<AtomicBool>);

impl Availability {
    pub fn set(&self, available: bool) {
        self.0.store(available, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

enum Kind {
    Counter(Counter),
    MaybeCounter(Counter, Availability),
    Value(Value),
    Vector(Vector, Vec<String>),
    Formula(Formula),
}

struct Entry {
    name: String,
    desc: String,
    unit: &'static str,
    kind: Kind,
}

/// One statistic's value in a dump.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatValue {
    Int(u64),
    Float(f64),
}

impl StatValue {
    fn text(&self) -> String {
        match self {
            StatValue::Int(v) => v.to_string(),
            StatValue::Float(v) if v.is_nan() => "nan".into(),
            StatValue::Float(v) if v.is_infinite() => if *v > 0.0 { "inf" } else { "-inf" }.into(),
            StatValue::Float(v) => format!("{v:.6}"),
        }
    }
    fn json(&self) -> Json {
        match self {
            StatValue::Int(v) => Json::from(*v),
            // NaN and infinities (for example a rate over zero host time) become null.
            StatValue::Float(v) => serde_json::Number::from_f64(*v)
                .map(Json::Number)
                .unwrap_or(Json::Null),
        }
    }
    /// The value as a float.
    pub fn as_f64(&self) -> f64 {
        match self {
            StatValue::Int(v) => *v as f64,
            StatValue::Float(v) => *v,
        }
    }
}

/// One line of a dump.
#[derive(Debug, Clone, PartialEq)]
pub struct DumpEntry {
    pub name: String,
    pub value: StatValue,
    pub desc: String,
    pub unit: &'static str,
}

/// All statistics at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Dump {
    /// The tick of the dump.
    pub tick: Tick,
    pub entries: Vec<DumpEntry>,
}

impl Dump {
    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<StatValue> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.value)
    }

    /// The block in gem5's stats.txt layout.
    pub fn to_text(&self) -> String {
        let mut s = String::from("\n---------- Begin Simulation Statistics ----------\n");
        for e in &self.entries {
            let _ = writeln!(
                s,
                "{:<40} {:>12} {:>10} {:>10} # {} ({})",
                e.name,
                e.value.text(),
                "",
                "",
                e.desc,
                e.unit
            );
        }
        s.push_str("\n---------- End Simulation Statistics   ----------\n");
        s
    }

    /// The dump as a JSON object: `{"tick": .., "stats": {name: value}}`.
    pub fn to_json(&self) -> Json {
        let mut stats = Map::new();
        for e in &self.entries {
            stats.insert(e.name.clone(), e.value.json());
        }
        let mut o = Map::new();
        o.insert("tick".into(), Json::from(self.tick));
        o.insert("stats".into(), Json::Object(stats));
        Json::Object(o)
    }
}

/// Why a statistic could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatsError {
    #[error("statistic {0:?} is registered twice")]
    Duplicate(String),
    #[error("statistic name {0:?} is not a dotted name (letters, digits, '_' and '.')")]
    BadName(String),
}

/// The registry of one simulated system's statistics.
pub struct Stats {
    entries: Vec<Entry>,
    reset_tick: Tick,
    reset_host: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("entries", &self.entries.len())
            .field("reset_tick", &self.reset_tick)
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            entries: Vec::new(),
            reset_tick: 0,
            reset_host: Instant::now(),
        }
    }

    fn add(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
        kind: Kind,
    ) -> Result<(), StatsError> {
        if !valid_name(name) {
            return Err(StatsError::BadName(name.into()));
        }
        if self.entries.iter().any(|e| e.name == name) {
            return Err(StatsError::Duplicate(name.into()));
        }
        self.entries.push(Entry {
            name: name.into(),
            desc: desc.into(),
            unit,
            kind,
        });
        Ok(())
    }

    /// Registers a counter.
    pub fn counter(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
    ) -> Result<Counter, StatsError> {
        let c = Counter::default();
        self.add(name, desc, unit, Kind::Counter(c.clone()))?;
        Ok(c)
    }

    /// Registers a counter that may be unavailable on this host (starts unavailable).
    pub fn maybe_counter(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
    ) -> Result<(Counter, Availability), StatsError> {
        let c = Counter::default();
        let a = Availability::default();
        self.add(name, desc, unit, Kind::MaybeCounter(c.clone(), a.clone()))?;
        Ok((c, a))
    }

    /// Registers a floating-point value.
    pub fn value(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
    ) -> Result<Value, StatsError> {
        let v = Value::default();
        self.add(name, desc, unit, Kind::Value(v.clone()))?;
        Ok(v)
    }

    /// Registers a vector with one element per subname.
    pub fn vector(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
        subnames: &[&str],
    ) -> Result<Vector, StatsError> {
        let v = Vector::detached(subnames.len());
        let subs = subnames.iter().map(|s| s.to_string()).collect();
        self.add(name, desc, unit, Kind::Vector(v.clone(), subs))?;
        Ok(v)
    }

    /// Registers a formula, evaluated at each dump.
    pub fn formula(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
        f: impl Fn(&FormulaCtx) -> f64 + Send + Sync + 'static,
    ) -> Result<(), StatsError> {
        self.add(name, desc, unit, Kind::Formula(Box::new(f)))
    }

    /// The tick of the last reset.
    pub fn reset_tick(&self) -> Tick {
        self.reset_tick
    }

    /// Zeroes every statistic; simulated and host time restart at `now`.
    pub fn reset(&mut self, now: Tick) {
        for e in &self.entries {
            match &e.kind {
                Kind::Counter(c) | Kind::MaybeCounter(c, _) => c.reset(),
                Kind::Value(v) => v.reset(),
                Kind::Vector(v, _) => v.reset(),
                Kind::Formula(_) => {}
            }
        }
        self.reset_tick = now;
        self.reset_host = Instant::now();
    }

    /// Takes a snapshot of every statistic at `now`, built-in formulas first.
    pub fn dump(&self, now: Tick) -> Dump {
        let sim_ticks = now.saturating_sub(self.reset_tick);
        let host_seconds = self.reset_host.elapsed().as_secs_f64();
        let ctx = FormulaCtx {
            sim_ticks,
            host_seconds,
        };
        let mut entries = Vec::with_capacity(self.entries.len() + 8);
        let mut push = |name: &str, value: StatValue, desc: &str, unit: &'static str| {
            entries.push(DumpEntry {
                name: name.into(),
                value,
                desc: desc.into(),
                unit,
            })
        };
        push(
            "simSeconds",
            StatValue::Float(ticks_to_seconds(sim_ticks)),
            "Number of seconds simulated",
            "Second",
        );
        push(
            "simTicks",
            StatValue::Int(sim_ticks),
            "Number of ticks simulated",
            "Tick",
        );
        push(
            "finalTick",
            StatValue::Int(now),
            "Number of ticks from beginning of simulation",
            "Tick",
        );
        push(
            "simFreq",
            StatValue::Int(TICKS_PER_SECOND),
            "The number of ticks per simulated second",
            "Tick/Second",
        );
        push(
            "hostSeconds",
            StatValue::Float(host_seconds),
            "Real time elapsed on the host",
            "Second",
        );
        push(
            "hostTickRate",
            StatValue::Float(sim_ticks as f64 / host_seconds),
            "The number of ticks simulated per host second",
            "Tick/Second",
        );
        for e in &self.entries {
            match &e.kind {
                Kind::Counter(c) => push(&e.name, StatValue::Int(c.get()), &e.desc, e.unit),
                Kind::MaybeCounter(c, a) => {
                    let v = if a.get() {
                        StatValue::Int(c.get())
                    } else {
                        StatValue::Float(f64::NAN)
                    };
                    push(&e.name, v, &e.desc, e.unit)
                }
                Kind::Value(v) => push(&e.name, StatValue::Float(v.get()), &e.desc, e.unit),
                Kind::Formula(f) => push(&e.name, StatValue::Float(f(&ctx)), &e.desc, e.unit),
                Kind::Vector(v, subs) => {
                    let mut total = 0u64;
                    for (i, sub) in subs.iter().enumerate() {
                        let x = v.get(i);
                        total = total.wrapping_add(x);
                        push(
                            &format!("{}::{}", e.name, sub),
                            StatValue::Int(x),
                            &e.desc,
                            e.unit,
                        );
                    }
                    push(
                        &format!("{}::total", e.name),
                        StatValue::Int(total),
                        &e.desc,
                        e.unit,
                    );
                }
            }
        }
        Dump { tick: now, entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_text_layout() {
        let mut s = Stats::new();
        let c = s
            .counter("system.cpu.numVMExits", "Number of VM exits", "Count")
            .unwrap();
        c.add(41);
        c.inc();
        let d = s.dump(2_000_000);
        let text = d.to_text();
        assert!(text.starts_with("\n---------- Begin Simulation Statistics ----------\n"));
        assert!(text.ends_with("---------- End Simulation Statistics   ----------\n"));
        let line = text
            .lines()
            .find(|l| l.starts_with("system.cpu.numVMExits"))
            .unwrap();
        assert_eq!(
            line,
            format!(
                "{:<40} {:>12} {:>10} {:>10} # Number of VM exits (Count)",
                "system.cpu.numVMExits", "42", "", ""
            )
        );
        assert_eq!(d.get("simTicks"), Some(StatValue::Int(2_000_000)));
        assert_eq!(d.get("simSeconds"), Some(StatValue::Float(2e-6)));
        assert!(text.contains("simSeconds                                   0.000002"));
    }

    #[test]
    fn vectors_formulas_and_reset() {
        let mut s = Stats::new();
        let v = s
            .vector("system.bus.acc", "Accesses", "Count", &["pio", "mmio"])
            .unwrap();
        let c = s.counter("system.cpu.n", "n", "Count").unwrap();
        let c2 = c.clone();
        s.formula(
            "system.cpu.nPerTick",
            "n per tick",
            "Count/Tick",
            move |ctx| c2.get() as f64 / ctx.sim_ticks as f64,
        )
        .unwrap();
        v.add(0, 3);
        v.add(1, 4);
        v.add(7, 100); // ignored
        c.add(10);
        let d = s.dump(5);
        assert_eq!(d.get("system.bus.acc::pio"), Some(StatValue::Int(3)));
        assert_eq!(d.get("system.bus.acc::total"), Some(StatValue::Int(7)));
        assert_eq!(d.get("system.cpu.nPerTick"), Some(StatValue::Float(2.0)));
        s.reset(5);
        let d = s.dump(10);
        assert_eq!(d.get("system.bus.acc::total"), Some(StatValue::Int(0)));
        assert_eq!(d.get("system.cpu.n"), Some(StatValue::Int(0)));
        assert_eq!(d.get("simTicks"), Some(StatValue::Int(5)));
        assert_eq!(d.get("finalTick"), Some(StatValue::Int(10)));
        let j = d.to_json();
        assert_eq!(j["tick"], 10);
        assert_eq!(j["stats"]["system.cpu.n"], 0);
        // Nothing counted over the 5 ticks since the reset: a rate of 0
        // (a rate over zero ticks would be NaN; see nan_is_text_nan_and_json_null).
        assert_eq!(j["stats"]["system.cpu.nPerTick"], 0.0);
    }

    #[test]
    fn rejects_duplicates_and_bad_names() {
        let mut s = Stats::new();
        s.counter("a.b", "", "Count").unwrap();
        assert_eq!(
            s.counter("a.b", "", "Count").unwrap_err(),
            StatsError::Duplicate("a.b".into())
        );
        assert!(s.counter("a..b", "", "Count").is_err());
        assert!(s.counter("a b", "", "Count").is_err());
        assert!(s.counter("", "", "Count").is_err());
    }

    #[test]
    fn unavailable_counters_are_nan_not_zero() {
        let mut s = Stats::new();
        let (c, a) = s
            .maybe_counter("system.cpu.numInsts", "insts", "Count")
            .unwrap();
        c.add(5);
        let d = s.dump(0);
        assert!(d.get("system.cpu.numInsts").unwrap().as_f64().is_nan());
        assert!(d.to_json()["stats"]["system.cpu.numInsts"].is_null());
        a.set(true);
        assert_eq!(
            s.dump(0).get("system.cpu.numInsts"),
            Some(StatValue::Int(5))
        );
        s.reset(0);
        assert_eq!(
            s.dump(0).get("system.cpu.numInsts"),
            Some(StatValue::Int(0))
        );
    }

    #[test]
    fn nan_is_text_nan_and_json_null() {
        let mut s = Stats::new();
        s.formula("x", "", "Ratio", |_| f64::NAN).unwrap();
        let d = s.dump(0);
        assert!(d
            .to_text()
            .lines()
            .any(|l| l.starts_with("x ") && l.contains(" nan ")));
        assert!(d.to_json()["stats"]["x"].is_null());
    }
}
