//! Named statistics in gem5's style.
//!
//! Each statistic has a dotted name (`system.cpu.numVMExits`), a description
//! and a unit. Objects keep cheap, thread-safe handles ([`Counter`],
//! [`Value`], [`Vector`]) and update them; the registry ([`Stats`]) dumps all
//! of them, with gem5's built-in statistics (`simSeconds`, `hostSeconds`,
//! `simInsts`, `hostMemory`, ...), as a stats.txt block in gem5's text layout
//! or as JSON, and resets them.

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
    /// True if both handles update the same statistic.
    fn is_same(&self, other: &Counter) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
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
    /// A value that holds an index into its labels (an enumeration).
    Labelled(Value, Vec<String>),
    /// Cells with their names; `true`: zero cells are left out of dumps
    /// (gem5's `nozero` flag).
    Vector(Vector, Vec<String>, bool),
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
    /// For an enumeration: the name of the value, and every value's name
    /// (index = value).
    pub label: Option<(String, Vec<String>)>,
}

impl DumpEntry {
    /// The description as stats.txt shows it: an enumeration adds the name
    /// of its value and the meaning of every value.
    fn text_desc(&self) -> String {
        match &self.label {
            None => self.desc.clone(),
            Some((label, all)) => {
                let legend: Vec<String> = all
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("{i} {l}"))
                    .collect();
                format!("{}: {label} ({})", self.desc, legend.join(", "))
            }
        }
    }
}

/// The built-in statistics every dump starts with, in gem5's order.
pub const BUILTINS: &[&str] = &[
    "simSeconds",
    "simTicks",
    "finalTick",
    "simFreq",
    "hostSeconds",
    "hostTickRate",
    "hostMemory",
    "simInsts",
    "simOps",
    "hostInstRate",
    "hostOpRate",
];

/// gem5's name column: at least this wide (longer names widen it for the
/// whole block, so that the values stay in one column).
const NAME_WIDTH: usize = 40;

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

    /// The block in gem5's stats.txt layout: name, value (right-aligned in
    /// 12 columns), two empty 10-column fields (gem5's pdf and cdf), then
    /// `# description (unit)`. The name column is 40 wide, as in gem5, or as
    /// wide as the block's longest name (gem5 lets a longer name push its
    /// own value out of line instead).
    pub fn to_text(&self) -> String {
        let width = self
            .entries
            .iter()
            .map(|e| e.name.len())
            .max()
            .unwrap_or(0)
            .max(NAME_WIDTH);
        let mut s = String::from("\n---------- Begin Simulation Statistics ----------\n");
        for e in &self.entries {
            let _ = writeln!(
                s,
                "{:<width$} {:>12} {:>10} {:>10} # {} ({})",
                e.name,
                e.value.text(),
                "",
                "",
                e.text_desc(),
                e.unit
            );
        }
        s.push_str("\n---------- End Simulation Statistics   ----------\n");
        s
    }

    /// The dump as a JSON object: `{"tick": .., "stats": {name: value}}`,
    /// plus `"labels": {name: label}` for enumerations (their value in
    /// `stats` stays the number).
    pub fn to_json(&self) -> Json {
        let mut stats = Map::new();
        let mut labels = Map::new();
        for e in &self.entries {
            stats.insert(e.name.clone(), e.value.json());
            if let Some((label, _)) = &e.label {
                labels.insert(e.name.clone(), Json::from(label.as_str()));
            }
        }
        let mut o = Map::new();
        o.insert("tick".into(), Json::from(self.tick));
        o.insert("stats".into(), Json::Object(stats));
        if !labels.is_empty() {
            o.insert("labels".into(), Json::Object(labels));
        }
        Json::Object(o)
    }

    /// One block for several systems' dumps at `tick`: the built-ins once
    /// (from the first dump), with `simInsts` and `simOps` summed over all
    /// of them (gem5 counts every CPU of the simulation) and the host rates
    /// recomputed from the sums; then every dump's own statistics.
    pub fn combine(tick: Tick, dumps: Vec<Dump>) -> Dump {
        let sum = |name: &str| -> StatValue {
            let mut total = 0u64;
            for d in &dumps {
                match d.get(name) {
                    Some(StatValue::Int(v)) => total = total.saturating_add(v),
                    _ => return StatValue::Float(f64::NAN),
                }
            }
            StatValue::Int(total)
        };
        let insts = sum("simInsts");
        let ops = sum("simOps");
        let host_seconds = dumps
            .first()
            .and_then(|d| d.get("hostSeconds"))
            .map_or(f64::NAN, |v| v.as_f64());
        let mut entries = Vec::new();
        for (i, d) in dumps.into_iter().enumerate() {
            for mut e in d.entries {
                if BUILTINS.contains(&e.name.as_str()) {
                    if i > 0 {
                        continue;
                    }
                    match e.name.as_str() {
                        "simInsts" => e.value = insts,
                        "simOps" => e.value = ops,
                        "hostInstRate" => e.value = rate(insts, host_seconds),
                        "hostOpRate" => e.value = rate(ops, host_seconds),
                        _ => {}
                    }
                }
                entries.push(e);
            }
        }
        Dump { tick, entries }
    }
}

/// A count per host second, as an integer (gem5 prints rates with
/// precision 0); nan when the count is unavailable.
fn rate(count: StatValue, host_seconds: f64) -> StatValue {
    match count {
        StatValue::Int(n) => rounded(n as f64 / host_seconds),
        StatValue::Float(_) => StatValue::Float(f64::NAN),
    }
}

/// `v` rounded to an integer (gem5's precision 0), unless it is not finite.
fn rounded(v: f64) -> StatValue {
    if v.is_finite() && v >= 0.0 && v < u64::MAX as f64 {
        StatValue::Int(v.round() as u64)
    } else {
        StatValue::Float(v)
    }
}

/// The peak resident memory of this process in bytes (VmHWM in
/// /proc/self/status), if the host tells.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The values of a registry's statistics in a checkpoint ([`Stats::save`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsSaved {
    /// The tick of the last reset (simTicks counts from there).
    pub reset_tick: Tick,
    /// What resets took from the instruction counter behind simInsts.
    pub insts_before_reset: u64,
    /// Each statistic with a value of its own (formulas are computed), by name.
    pub values: std::collections::BTreeMap<String, SavedStat>,
}

/// One statistic's saved value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SavedStat {
    /// A counter.
    Count(u64),
    /// A floating-point value, as its IEEE-754 bits (NaN and infinities
    /// survive JSON).
    Bits(u64),
    /// A vector's elements.
    Vector(Vec<u64>),
}

/// Why a statistic could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatsError {
    #[error("statistic {0:?} is registered twice")]
    Duplicate(String),
    #[error("statistic name {0:?} is not a dotted name (letters, digits, '_' and '.')")]
    BadName(String),
    #[error("the instruction count for simInsts must be a counter of this registry")]
    NotRegistered,
}

/// The registry of one simulated system's statistics.
pub struct Stats {
    entries: Vec<Entry>,
    reset_tick: Tick,
    reset_host: Instant,
    /// The registered counter of guest instructions behind `simInsts`.
    insts: Option<(Counter, Availability)>,
    /// What resets have taken from that counter (`simInsts` is never reset,
    /// as in gem5).
    insts_before_reset: u64,
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
            insts: None,
            insts_before_reset: 0,
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

    /// Registers an enumeration: a value whose integer `i` means
    /// `labels[i]`. Dumps keep the number and add the label (see
    /// [`Dump::to_text`], [`Dump::to_json`]).
    pub fn labelled_value(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
        labels: &[&str],
    ) -> Result<Value, StatsError> {
        let v = Value::default();
        let labels = labels.iter().map(|l| l.to_string()).collect();
        self.add(name, desc, unit, Kind::Labelled(v.clone(), labels))?;
        Ok(v)
    }

    /// Makes `simInsts` and `simOps` count the guest instructions that
    /// `counter` (a counter registered here, e.g. a system's total) counts:
    /// since the start of the run, across resets, as gem5 does; `nan` while
    /// `available` says the count is unavailable.
    pub fn count_sim_insts(
        &mut self,
        counter: &Counter,
        available: &Availability,
    ) -> Result<(), StatsError> {
        let registered = self.entries.iter().any(|e| match &e.kind {
            Kind::Counter(c) | Kind::MaybeCounter(c, _) => c.is_same(counter),
            _ => false,
        });
        if !registered {
            return Err(StatsError::NotRegistered);
        }
        self.insts = Some((counter.clone(), available.clone()));
        self.insts_before_reset = 0;
        Ok(())
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
        self.add(name, desc, unit, Kind::Vector(v.clone(), subs, false))?;
        Ok(v)
    }

    /// Registers a vector whose zero cells are left out of dumps (gem5's
    /// `nozero`): for long vectors of which a run uses few cells, such as
    /// one cell per system call. The total is always printed.
    pub fn sparse_vector(
        &mut self,
        name: &str,
        desc: &str,
        unit: &'static str,
        subnames: &[&str],
    ) -> Result<Vector, StatsError> {
        let v = Vector::detached(subnames.len());
        let subs = subnames.iter().map(|s| s.to_string()).collect();
        self.add(name, desc, unit, Kind::Vector(v.clone(), subs, true))?;
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

    /// Every statistic's value, for a checkpoint: a restored run goes on
    /// counting from there, as gem5's do (host time restarts: hostSeconds
    /// covers the restored run only).
    pub fn save(&self) -> StatsSaved {
        let mut values = std::collections::BTreeMap::new();
        for e in &self.entries {
            let v = match &e.kind {
                Kind::Counter(c) | Kind::MaybeCounter(c, _) => SavedStat::Count(c.get()),
                Kind::Value(v) | Kind::Labelled(v, _) => SavedStat::Bits(v.get().to_bits()),
                Kind::Vector(v, ..) => SavedStat::Vector((0..v.len()).map(|i| v.get(i)).collect()),
                Kind::Formula(_) => continue,
            };
            values.insert(e.name.clone(), v);
        }
        StatsSaved {
            reset_tick: self.reset_tick,
            insts_before_reset: self.insts_before_reset,
            values,
        }
    }

    /// Puts back what [`Stats::save`] returned, into a registry built from
    /// the same configuration: every statistic must be there with a value
    /// of its kind, and nothing else (an error names the first that is
    /// not, and nothing is changed).
    pub fn restore(&mut self, saved: &StatsSaved) -> Result<(), String> {
        let mut seen = 0usize;
        for e in &self.entries {
            let ok = match (&e.kind, saved.values.get(&e.name)) {
                (Kind::Formula(_), _) => continue,
                (Kind::Counter(_) | Kind::MaybeCounter(..), Some(SavedStat::Count(_))) => true,
                (Kind::Value(_) | Kind::Labelled(..), Some(SavedStat::Bits(_))) => true,
                (Kind::Vector(v, ..), Some(SavedStat::Vector(x))) => x.len() == v.len(),
                (_, None) => return Err(format!("statistic {} is missing", e.name)),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "statistic {} has a value of another kind or size",
                    e.name
                ));
            }
            seen += 1;
        }
        if seen != saved.values.len() {
            let extra = saved
                .values
                .keys()
                .find(|k| !self.entries.iter().any(|e| &e.name == *k))
                .cloned()
                .unwrap_or_default();
            return Err(format!("statistic {extra} does not exist in this system"));
        }
        for e in &self.entries {
            match (&e.kind, saved.values.get(&e.name)) {
                (Kind::Counter(c) | Kind::MaybeCounter(c, _), Some(SavedStat::Count(n))) => {
                    c.0.store(*n, Ordering::Relaxed)
                }
                (Kind::Value(v) | Kind::Labelled(v, _), Some(SavedStat::Bits(b))) => {
                    v.set(f64::from_bits(*b))
                }
                (Kind::Vector(v, ..), Some(SavedStat::Vector(x))) => {
                    for (c, n) in v.cells.iter().zip(x) {
                        c.store(*n, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
        self.reset_tick = saved.reset_tick;
        self.insts_before_reset = saved.insts_before_reset;
        self.reset_host = Instant::now();
        Ok(())
    }

    /// Zeroes every statistic; simulated and host time restart at `now`.
    pub fn reset(&mut self, now: Tick) {
        if let Some((c, _)) = &self.insts {
            self.insts_before_reset = self.insts_before_reset.saturating_add(c.get());
        }
        for e in &self.entries {
            match &e.kind {
                Kind::Counter(c) | Kind::MaybeCounter(c, _) => c.reset(),
                Kind::Value(v) | Kind::Labelled(v, _) => v.reset(),
                Kind::Vector(v, ..) => v.reset(),
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
        let insts = match &self.insts {
            Some((c, a)) if a.get() => {
                StatValue::Int(self.insts_before_reset.saturating_add(c.get()))
            }
            _ => StatValue::Float(f64::NAN),
        };
        let memory = peak_resident_bytes().map_or(StatValue::Float(f64::NAN), StatValue::Int);
        // gem5's Root and BaseCPU global statistics, in gem5's order (BUILTINS).
        let builtins: [(&str, StatValue, &str, &'static str); 11] = [
            (
                "simSeconds",
                StatValue::Float(ticks_to_seconds(sim_ticks)),
                "Number of seconds simulated",
                "Second",
            ),
            (
                "simTicks",
                StatValue::Int(sim_ticks),
                "Number of ticks simulated",
                "Tick",
            ),
            (
                "finalTick",
                StatValue::Int(now),
                "Number of ticks from beginning of simulation",
                "Tick",
            ),
            (
                "simFreq",
                StatValue::Int(TICKS_PER_SECOND),
                "The number of ticks per simulated second",
                "Tick/Second",
            ),
            (
                "hostSeconds",
                StatValue::Float(host_seconds),
                "Real time elapsed on the host",
                "Second",
            ),
            (
                "hostTickRate",
                rounded(sim_ticks as f64 / host_seconds),
                "The number of ticks simulated per host second (ticks/s)",
                "Tick/Second",
            ),
            (
                "hostMemory",
                memory,
                "Peak resident host memory of the process",
                "Byte",
            ),
            (
                "simInsts",
                insts,
                "Number of instructions simulated, since the start (nan: not countable here)",
                "Count",
            ),
            (
                "simOps",
                insts,
                "Number of ops (including micro ops) simulated (KVM: the instructions)",
                "Count",
            ),
            (
                "hostInstRate",
                rate(insts, host_seconds),
                "Simulator instruction rate (inst/s)",
                "Count/Second",
            ),
            (
                "hostOpRate",
                rate(insts, host_seconds),
                "Simulator op (including micro ops) rate (op/s)",
                "Count/Second",
            ),
        ];
        let entry = |name: &str, value: StatValue, desc: &str, unit: &'static str| DumpEntry {
            name: name.into(),
            value,
            desc: desc.into(),
            unit,
            label: None,
        };
        let mut entries = Vec::with_capacity(self.entries.len() + builtins.len());
        for (name, value, desc, unit) in builtins {
            entries.push(entry(name, value, desc, unit));
        }
        for e in &self.entries {
            let value = match &e.kind {
                Kind::Counter(c) => StatValue::Int(c.get()),
                Kind::MaybeCounter(c, a) if a.get() => StatValue::Int(c.get()),
                Kind::MaybeCounter(..) => StatValue::Float(f64::NAN),
                Kind::Value(v) => StatValue::Float(v.get()),
                Kind::Formula(f) => StatValue::Float(f(&ctx)),
                Kind::Labelled(v, labels) => {
                    let x = v.get();
                    let index = (x >= 0.0 && x.fract() == 0.0 && x < labels.len() as f64)
                        .then_some(x as usize);
                    let label = index.map_or_else(|| "unknown".to_string(), |i| labels[i].clone());
                    entries.push(DumpEntry {
                        label: Some((label, labels.clone())),
                        ..entry(
                            &e.name,
                            index.map_or(StatValue::Float(x), |i| StatValue::Int(i as u64)),
                            &e.desc,
                            e.unit,
                        )
                    });
                    continue;
                }
                Kind::Vector(v, subs, nozero) => {
                    let mut total = 0u64;
                    for (i, sub) in subs.iter().enumerate() {
                        let x = v.get(i);
                        total = total.wrapping_add(x);
                        if *nozero && x == 0 {
                            continue;
                        }
                        entries.push(entry(
                            &format!("{}::{}", e.name, sub),
                            StatValue::Int(x),
                            &e.desc,
                            e.unit,
                        ));
                    }
                    entries.push(entry(
                        &format!("{}::total", e.name),
                        StatValue::Int(total),
                        &e.desc,
                        e.unit,
                    ));
                    continue;
                }
            };
            entries.push(entry(&e.name, value, &e.desc, e.unit));
        }
        Dump { tick: now, entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (Stats, Counter, Value, Vector) {
        let mut s = Stats::new();
        let c = s.counter("sys.cpu.n", "n", "Count").unwrap();
        let v = s.value("sys.cpu.t", "t", "Second").unwrap();
        let x = s
            .vector("sys.bus.acc", "a", "Count", &["pio", "mmio"])
            .unwrap();
        let c2 = c.clone();
        s.formula("sys.cpu.twice", "2n", "Count", move |_| {
            2.0 * c2.get() as f64
        })
        .unwrap();
        s.count_sim_insts(&c, &Availability::default()).unwrap();
        (s, c, v, x)
    }

    #[test]
    fn saved_values_go_on_counting_in_a_fresh_registry() {
        let (mut s, c, v, x) = registry();
        c.add(7);
        s.reset(100);
        c.add(5);
        v.set(f64::NAN);
        x.add(1, 3);
        let saved: StatsSaved =
            serde_json::from_str(&serde_json::to_string(&s.save()).unwrap()).unwrap();
        let (mut r, rc, rv, rx) = registry();
        r.restore(&saved).unwrap();
        rc.inc();
        assert_eq!(rc.get(), 6);
        assert!(rv.get().is_nan());
        assert_eq!(rx.get(1), 3);
        assert_eq!(r.reset_tick(), 100);
        let d = r.dump(300);
        assert_eq!(d.get("simTicks"), Some(StatValue::Int(200)));
        assert_eq!(d.get("sys.cpu.twice"), Some(StatValue::Float(12.0)));
    }

    #[test]
    fn a_saved_state_of_another_registry_is_refused_unchanged() {
        let (s, c, ..) = registry();
        c.add(9);
        let mut saved = s.save();
        saved.values.remove("sys.cpu.t");
        let (mut r, rc, ..) = registry();
        let e = r.restore(&saved).unwrap_err();
        assert!(e.contains("sys.cpu.t"), "{e}");
        assert_eq!(rc.get(), 0, "nothing changed");
        let mut saved = s.save();
        saved.values.insert("sys.other".into(), SavedStat::Count(1));
        assert!(r.restore(&saved).unwrap_err().contains("sys.other"));
        let mut saved = s.save();
        saved
            .values
            .insert("sys.bus.acc".into(), SavedStat::Vector(vec![1]));
        assert!(r.restore(&saved).unwrap_err().contains("sys.bus.acc"));
        let mut saved = s.save();
        saved.values.insert("sys.cpu.n".into(), SavedStat::Bits(1));
        assert!(r.restore(&saved).unwrap_err().contains("sys.cpu.n"));
    }

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
    fn sparse_vectors_leave_zero_cells_out() {
        let mut s = Stats::new();
        let v = s
            .sparse_vector(
                "system.se.syscalls",
                "Calls",
                "Count",
                &["read", "write", "open"],
            )
            .unwrap();
        v.add(1, 2);
        let d = s.dump(1);
        assert_eq!(d.get("system.se.syscalls::write"), Some(StatValue::Int(2)));
        assert_eq!(d.get("system.se.syscalls::read"), None);
        assert_eq!(d.get("system.se.syscalls::total"), Some(StatValue::Int(2)));
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

    #[test]
    fn builtins_come_first_in_gem5_order() {
        let d = Stats::new().dump(0);
        let names: Vec<&str> = d.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, BUILTINS);
    }

    #[test]
    fn host_rates_print_as_integers() {
        let s = Stats::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let d = s.dump(3 * TICKS_PER_SECOND);
        let StatValue::Int(rate) = d.get("hostTickRate").unwrap() else {
            panic!(
                "hostTickRate is not an integer: {:?}",
                d.get("hostTickRate")
            );
        };
        assert!(rate > 0);
        let line = d
            .to_text()
            .lines()
            .find(|l| l.starts_with("hostTickRate "))
            .unwrap()
            .to_string();
        let value = line.split_whitespace().nth(1).unwrap();
        assert_eq!(value, rate.to_string(), "{line}");
        assert!(d.to_json()["stats"]["hostTickRate"].is_u64());
    }

    #[test]
    fn sim_insts_count_since_the_start_across_resets() {
        let mut s = Stats::new();
        let (total, avail) = s
            .maybe_counter("system.totalNumInsts", "insts", "Count")
            .unwrap();
        s.count_sim_insts(&total, &avail).unwrap();
        total.add(100);
        // Unavailable: nan (null), never 0, and so are the rates.
        let d = s.dump(10);
        for name in ["simInsts", "simOps", "hostInstRate", "hostOpRate"] {
            assert!(d.get(name).unwrap().as_f64().is_nan(), "{name}");
            assert!(d.to_json()["stats"][name].is_null(), "{name}");
            let line = d.to_text();
            let line = line.lines().find(|l| l.starts_with(name)).unwrap();
            assert_eq!(line.split_whitespace().nth(1), Some("nan"), "{line}");
        }
        avail.set(true);
        assert_eq!(s.dump(10).get("simInsts"), Some(StatValue::Int(100)));
        // A reset zeroes the system's count, not simInsts (gem5).
        s.reset(10);
        total.add(5);
        let d = s.dump(20);
        assert_eq!(d.get("system.totalNumInsts"), Some(StatValue::Int(5)));
        assert_eq!(d.get("simInsts"), Some(StatValue::Int(105)));
        assert_eq!(d.get("simOps"), Some(StatValue::Int(105)));
        assert!(matches!(d.get("hostInstRate"), Some(StatValue::Int(_))));
        // Only a counter of this registry can be the source.
        let mut other = Stats::new();
        assert_eq!(
            other.count_sim_insts(&total, &avail),
            Err(StatsError::NotRegistered)
        );
        assert!(other.dump(0).get("simInsts").unwrap().as_f64().is_nan());
    }

    #[test]
    fn host_memory_is_the_peak_resident_size() {
        let before = peak_resident_bytes().expect("VmHWM in /proc/self/status");
        // Touch 64 MiB more than the peak so far, then free it: the peak
        // stays (a current-size measure would drop by 64 MiB again). The
        // kernel's resident counts are approximate by a few pages.
        let n = before as usize + (64 << 20);
        let buf = vec![1u8; n];
        assert_eq!(std::hint::black_box(&buf)[n - 1], 1);
        let during = Stats::new().dump(0).get("hostMemory");
        drop(buf);
        let after = Stats::new().dump(0).get("hostMemory");
        let (Some(StatValue::Int(during)), Some(StatValue::Int(after))) = (during, after) else {
            panic!("hostMemory is not a byte count: {during:?} {after:?}");
        };
        let slack = 4 << 20;
        assert!(during + slack >= n as u64, "{during} < {n}");
        assert!(
            after + slack >= n as u64,
            "the peak fell to {after} after freeing {n}"
        );
    }

    #[test]
    fn enumerations_keep_the_number_and_add_the_name() {
        let mut s = Stats::new();
        let v = s
            .labelled_value(
                "system.cpu.instCountMethod",
                "How instructions are counted",
                "Unspecified",
                &["unavailable", "perf-counter", "single-step"],
            )
            .unwrap();
        v.set(2.0);
        let d = s.dump(0);
        assert_eq!(d.get("system.cpu.instCountMethod"), Some(StatValue::Int(2)));
        let text = d.to_text();
        let line = text
            .lines()
            .find(|l| l.starts_with("system.cpu.instCountMethod"))
            .unwrap();
        assert_eq!(line.split_whitespace().nth(1), Some("2"), "{line}");
        assert!(
            line.ends_with(
                "# How instructions are counted: single-step \
                 (0 unavailable, 1 perf-counter, 2 single-step) (Unspecified)"
            ),
            "{line}"
        );
        let j = d.to_json();
        assert_eq!(j["stats"]["system.cpu.instCountMethod"], 2);
        assert_eq!(j["labels"]["system.cpu.instCountMethod"], "single-step");
        // A value outside the enumeration is shown as it is.
        v.set(7.0);
        let d = s.dump(0);
        assert_eq!(
            d.to_json()["labels"]["system.cpu.instCountMethod"],
            "unknown"
        );
        assert_eq!(
            d.get("system.cpu.instCountMethod"),
            Some(StatValue::Float(7.0))
        );
    }

    #[test]
    fn long_names_widen_the_name_column_for_the_whole_block() {
        let mut s = Stats::new();
        let long = "system.cpu.completedInstructions::syscall-entry-and-more";
        s.counter("system.cpu.short", "short", "Count").unwrap();
        s.vector(
            "system.cpu.completedInstructions",
            "long",
            "Count",
            &["syscall-entry-and-more"],
        )
        .unwrap();
        let text = s.dump(0).to_text();
        let value_end = |name: &str| {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            // The value ends where the first run of spaces after it starts.
            let rest = &line[name.len()..];
            let start = name.len() + rest.find(|c: char| c != ' ').unwrap();
            start + line[start..].find(' ').unwrap()
        };
        let end = value_end(long);
        assert_eq!(end, long.len() + 1 + 12, "{text}");
        for name in ["simSeconds", "system.cpu.short", "simTicks"] {
            assert_eq!(value_end(name), end, "{name} out of line:\n{text}");
        }
        // Without long names the layout is gem5's: a 40-column name field.
        let mut s = Stats::new();
        s.counter("system.cpu.short", "short", "Count").unwrap();
        let text = s.dump(0).to_text();
        let line = text
            .lines()
            .find(|l| l.starts_with("system.cpu.short"))
            .unwrap();
        assert_eq!(
            line.find(" # "),
            Some(40 + 1 + 12 + 1 + 10 + 1 + 10),
            "{line}"
        );
    }

    #[test]
    fn combined_blocks_sum_instructions_over_systems() {
        let dump = |insts: Option<u64>, name: &str| {
            let mut s = Stats::new();
            let (c, a) = s
                .maybe_counter(&format!("{name}.totalNumInsts"), "", "Count")
                .unwrap();
            s.count_sim_insts(&c, &a).unwrap();
            if let Some(n) = insts {
                c.add(n);
                a.set(true);
            }
            s.dump(7)
        };
        let d = Dump::combine(7, vec![dump(Some(3), "system0"), dump(Some(4), "system1")]);
        assert_eq!(d.entries.iter().filter(|e| e.name == "simInsts").count(), 1);
        assert_eq!(d.get("simInsts"), Some(StatValue::Int(7)));
        assert_eq!(d.get("simOps"), Some(StatValue::Int(7)));
        assert_eq!(d.get("system1.totalNumInsts"), Some(StatValue::Int(4)));
        let d = Dump::combine(7, vec![dump(Some(3), "system0"), dump(None, "system1")]);
        assert!(d.get("simInsts").unwrap().as_f64().is_nan());
        assert!(d.get("hostInstRate").unwrap().as_f64().is_nan());
    }
}
