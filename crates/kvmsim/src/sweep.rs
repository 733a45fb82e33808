//! `kvmsim sweep`: a parameter grid expanded into runs, one output folder
//! each, run locally as child `kvmsim run` processes or written out as a
//! Slurm array job; and `kvmsim collect`: every run's parameters, exit and
//! final statistics in one CSV table.
//!
//! A sweep file names a base config (`config = "PATH"`) or a checkpoint
//! (`restore = "DIR"`) and `[[param]]` tables, each a config key (`key =
//! "system.cpu.host_factor"`) or a `kvmsim run` flag (`flag =
//! "--max-time"`) with a list of `values`. The runs are the cartesian
//! product of the values, the last param varying fastest. Every run is
//! prepared and checked (by the same parsing `kvmsim run` does) before the
//! first one starts.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use platform::{status, Config};
use serde::Deserialize;

/// The flags a param may set: what `kvmsim run --restore` accepts (a
/// config run accepts them too).
const FLAGS: [&str; 3] = ["--max-time", "--readfile", "--host-factor"];

/// Refuses a grid larger than this (a typo in a list of lists).
const MAX_RUNS: usize = 100_000;

/// `kvmsim sweep`.
#[derive(clap::Args)]
pub struct SweepArgs {
    /// The sweep file (TOML; see README "Sweeps").
    sweep: PathBuf,
    /// Runs at a time (default: the host's available cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    jobs: Option<u32>,
    /// The sweep's folder: OUTDIR/run-NNN per run and sweep.json. It must
    /// not exist yet, or be empty.
    #[arg(long, default_value = "sweep-out")]
    outdir: PathBuf,
    /// Write a Slurm array job script to FILE (one array task per run,
    /// the run folders prepared in OUTDIR) and run nothing.
    #[arg(long, value_name = "FILE")]
    slurm: Option<PathBuf>,
}

/// `kvmsim collect`.
#[derive(clap::Args)]
pub struct CollectArgs {
    /// Folders holding run folders (searched recursively), or run folders.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// The CSV table; its column types go next to it, in NAME.types.json.
    #[arg(long, default_value = "table.csv")]
    out: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    /// The base config, relative to the sweep file.
    config: Option<String>,
    /// A checkpoint folder to restore, relative to the sweep file.
    restore: Option<String>,
    #[serde(default)]
    param: Vec<ParamSpec>,
    /// Exit statuses that count as success (default: 0 only).
    #[serde(default = "default_ok")]
    ok_status: Vec<i32>,
    /// Extra `#SBATCH` options for the Slurm script, e.g. "--time=1:00:00".
    #[serde(default)]
    slurm: Vec<String>,
}

fn default_ok() -> Vec<i32> {
    vec![0]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamSpec {
    /// A dotted config key.
    key: Option<String>,
    /// A `kvmsim run` flag.
    flag: Option<String>,
    /// The column name (default: the key, or the flag without dashes).
    name: Option<String>,
    values: Vec<toml::Value>,
}

/// One param, checked.
struct Param {
    name: String,
    what: ParamKind,
    values: Vec<toml::Value>,
}

enum ParamKind {
    Key(String),
    Flag(&'static str),
}

impl Param {
    fn describe(&self, v: &toml::Value) -> String {
        match &self.what {
            ParamKind::Key(k) => format!("key {k} = {v}"),
            ParamKind::Flag(f) => format!("flag {f} {v}"),
        }
    }
}

/// One prepared run.
struct Run {
    dir: PathBuf,
    /// Index into each param's values.
    choice: Vec<usize>,
    /// `kvmsim run` arguments (after `run`).
    args: Vec<String>,
}

/// A sweep error: names the file and what in it is wrong.
struct Bad(String);

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(msg: impl Into<String>) -> Bad {
    Bad(msg.into())
}

/// Sets the dotted `key` in a config table. A list of tables on the way
/// (`[[system]]`) takes an index (`system.1.memory`), or, without one,
/// the rest of the key is set in every element; a single table
/// (`[system]`) accepts index 0.
fn set_key(table: &mut toml::Table, key: &str, value: &toml::Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("a key is dot-separated names, e.g. system.cpu.host_factor".into());
    }
    set_in_table(table, &parts, value)
}

fn set_in_table(t: &mut toml::Table, parts: &[&str], v: &toml::Value) -> Result<(), String> {
    let Some((first, rest)) = parts.split_first() else {
        return Err("empty key".into());
    };
    if first.parse::<usize>().is_ok() {
        return Err(format!("{first}: an index follows a list's name"));
    }
    if rest.is_empty() {
        t.insert((*first).into(), v.clone());
        return Ok(());
    }
    let entry = t
        .entry(*first)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    set_in_value(entry, first, rest, v)
}

fn set_in_value(
    e: &mut toml::Value,
    name: &str,
    parts: &[&str],
    v: &toml::Value,
) -> Result<(), String> {
    let index = parts.first().and_then(|p| p.parse::<usize>().ok());
    match (e, index) {
        (toml::Value::Array(a), Some(i)) => {
            let n = a.len();
            let el = a
                .get_mut(i)
                .ok_or_else(|| format!("{name}.{i}: the config has {n} {name} entries"))?;
            if parts.len() == 1 {
                *el = v.clone();
                Ok(())
            } else {
                set_in_value(el, name, &parts[1..], v)
            }
        }
        (toml::Value::Array(a), None) => {
            if a.is_empty() {
                return Err(format!("the config's {name} list is empty"));
            }
            a.iter_mut()
                .try_for_each(|el| set_in_value(el, name, parts, v))
        }
        (e @ toml::Value::Table(_), Some(i)) => {
            if i != 0 {
                return Err(format!("{name}.{i}: the config has one {name}"));
            }
            if parts.len() == 1 {
                *e = v.clone();
                Ok(())
            } else {
                set_in_value(e, name, &parts[1..], v)
            }
        }
        (toml::Value::Table(t), None) => set_in_table(t, parts, v),
        (_, _) => Err(format!("{name} is a value, not a table")),
    }
}

/// Parses and checks a config table as `kvmsim run` would a file at
/// `path` (relative paths resolved against its folder).
fn config_of(table: &toml::Table, path: &Path) -> Result<Config, String> {
    let mut cfg: Config = table
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| e.message().trim_end().to_string())?;
    cfg.resolve_paths(path.parent().unwrap_or(Path::new("")));
    cfg.validate(path).map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// A flag's value as its command-line text.
fn flag_text(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

fn to_json(v: &toml::Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Single-quotes a word for sh unless it needs none.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=+,@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A prepared sweep: every run's folder holds config.toml (config
/// sweeps) and params.json.
struct Prepared {
    sweep: PathBuf,
    outdir: PathBuf,
    params: Vec<Param>,
    runs: Vec<Run>,
    ok_status: Vec<i32>,
    slurm: Vec<String>,
}

impl Prepared {
    fn params_json(&self, r: &Run) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (p, &c) in self.params.iter().zip(&r.choice) {
            m.insert(p.name.clone(), to_json(&p.values[c]));
        }
        serde_json::Value::Object(m)
    }
}

/// Reads the sweep file and expands it into runs; writes nothing.
#[allow(clippy::type_complexity)]
fn read_sweep(
    path: &Path,
    outdir: &Path,
) -> Result<(Prepared, Option<(PathBuf, toml::Table)>), Bad> {
    let sweep = absolute(path);
    let p = sweep.display();
    let text = std::fs::read_to_string(&sweep)
        .map_err(|e| bad(format!("cannot read sweep file {p}: {e}")))?;
    let file: SweepFile = toml::from_str(&text).map_err(|e| bad(format!("{p}: {e}")))?;
    let base_dir = sweep.parent().unwrap_or(Path::new("/")).to_path_buf();
    let base = match (&file.config, &file.restore) {
        (Some(c), None) => {
            let path = base_dir.join(c);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                bad(format!(
                    "{p}: config = {c:?}: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            let table: toml::Table = toml::from_str(&text)
                .map_err(|e| bad(format!("{p}: config = {c:?}: {}: {e}", path.display())))?;
            // The base config alone must be a good config.
            config_of(&table, &path)
                .map_err(|e| bad(format!("{p}: config = {c:?}: {}: {e}", path.display())))?;
            Some((path, table))
        }
        (None, Some(r)) => {
            let dir = base_dir.join(r);
            if !dir.is_dir() {
                return Err(bad(format!(
                    "{p}: restore = {r:?}: {} is not a checkpoint folder",
                    dir.display()
                )));
            }
            None
        }
        _ => {
            let want = "config = \"BASE.toml\" or restore = \"CHECKPOINT-DIR\"";
            return Err(bad(format!("{p}: give either {want} (one of them)")));
        }
    };
    let mut params = Vec::new();
    let mut names = BTreeSet::new();
    for (i, spec) in file.param.into_iter().enumerate() {
        let n = i + 1;
        let what = match (&spec.key, &spec.flag) {
            (Some(k), None) => {
                if base.is_none() {
                    return Err(bad(format!(
                        "{p}: param {n}: key = {k:?}: a restore takes its config from the \
                         checkpoint; use flag = one of {FLAGS:?}"
                    )));
                }
                ParamKind::Key(k.clone())
            }
            (None, Some(f)) => match FLAGS.iter().find(|x| **x == f) {
                Some(x) => ParamKind::Flag(x),
                None => {
                    return Err(bad(format!(
                        "{p}: param {n}: flag = {f:?}: a sweep can set {FLAGS:?}"
                    )))
                }
            },
            _ => {
                return Err(bad(format!(
                    "{p}: param {n}: give either key = \"a.config.key\" or flag = \"--flag\""
                )))
            }
        };
        let name = spec.name.clone().unwrap_or_else(|| match &what {
            ParamKind::Key(k) => k.clone(),
            ParamKind::Flag(f) => f.trim_start_matches('-').replace('-', "_"),
        });
        if matches!(name.as_str(), "run" | "exit_status" | "exit_cause")
            || !names.insert(name.clone())
        {
            return Err(bad(format!(
                "{p}: param {n}: the name {name:?} is taken (by another param or a column of \
                 kvmsim collect's table); give the param a name = \"...\""
            )));
        }
        if spec.values.is_empty() {
            return Err(bad(format!(
                "{p}: param {n} ({name}): values = []: give at least one value"
            )));
        }
        let param = Param {
            name,
            what,
            values: spec.values,
        };
        // Each value on its own, so that an error names it.
        for v in &param.values {
            let at = || format!("{p}: param {n} ({})", param.describe(v));
            match (&param.what, &base) {
                (ParamKind::Key(k), Some((path, table))) => {
                    let mut t = table.clone();
                    set_key(&mut t, k, v).map_err(|e| bad(format!("{}: {e}", at())))?;
                    config_of(&t, path).map_err(|e| bad(format!("{}: {e}", at())))?;
                }
                (ParamKind::Flag(f), _) => {
                    let text = flag_text(v).ok_or_else(|| {
                        bad(format!("{}: a flag's value is a string or a number", at()))
                    })?;
                    // The flag alone, parsed by kvmsim run's own parser.
                    let cli = crate::Cli::try_parse_from(["kvmsim", "run", f, &text])
                        .map_err(|e| bad(format!("{}: {}", at(), e.to_string().trim_end())))?;
                    let crate::Command::Run(a) = cli.command else {
                        unreachable!("parsed as run")
                    };
                    if let Some(t) = &a.max_time {
                        platform::units::parse_duration(t)
                            .map_err(|e| bad(format!("{}: {e}", at())))?;
                    }
                    if let Some(h) = a.host_factor {
                        let mut c = Config::for_kernel("builtin:hello");
                        c.system[0].cpu.host_factor = Some(h);
                        c.validate(Path::new("command line"))
                            .map_err(|e| bad(format!("{}: {e}", at())))?;
                    }
                }
                (ParamKind::Key(_), None) => unreachable!("refused above"),
            }
        }
        params.push(param);
    }
    let count = params
        .iter()
        .try_fold(1usize, |a, p| a.checked_mul(p.values.len()))
        .filter(|&n| n <= MAX_RUNS)
        .ok_or_else(|| bad(format!("{p}: the grid has more than {MAX_RUNS} runs")))?;
    let outdir = absolute(outdir);
    let width = (count.saturating_sub(1)).to_string().len().max(3);
    let mut runs = Vec::with_capacity(count);
    for i in 0..count {
        // Mixed radix, the last param fastest.
        let mut rest = i;
        let mut choice = vec![0; params.len()];
        for (j, prm) in params.iter().enumerate().rev() {
            choice[j] = rest % prm.values.len();
            rest /= prm.values.len();
        }
        let dir = outdir.join(format!("run-{i:0width$}"));
        let mut args = Vec::new();
        match (&base, &file.restore) {
            (Some(_), _) => args.push(dir.join("config.toml").display().to_string()),
            (None, Some(r)) => {
                args.push("--restore".into());
                args.push(base_dir.join(r).display().to_string());
            }
            (None, None) => unreachable!("refused above"),
        }
        for (prm, &c) in params.iter().zip(&choice) {
            if let ParamKind::Flag(f) = prm.what {
                let mut v = flag_text(&prm.values[c]).unwrap_or_default();
                if f == "--readfile" && !v.is_empty() && Path::new(&v).is_relative() {
                    v = base_dir.join(v).display().to_string();
                }
                args.push(f.into());
                args.push(v);
            }
        }
        args.extend([
            "--outdir".into(),
            dir.display().to_string(),
            "--quiet".into(),
            "--no-stdin".into(),
        ]);
        runs.push(Run { dir, choice, args });
    }
    Ok((
        Prepared {
            sweep,
            outdir,
            params,
            runs,
            ok_status: file.ok_status,
            slurm: file.slurm,
        },
        base,
    ))
}

/// Writes every run's folder (config.toml, params.json) and checks each
/// run as `kvmsim run` will. On an error, OUTDIR is removed again.
fn prepare(path: &Path, outdir: &Path) -> Result<Prepared, Bad> {
    let (prep, base) = read_sweep(path, outdir)?;
    let out = &prep.outdir;
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(bad(format!(
                "--outdir {}: exists and is not empty (a sweep writes a fresh folder; remove \
                 it or choose another)",
                out.display()
            )));
        }
    }
    let result = write_runs(&prep, base.as_ref());
    if result.is_err() {
        let _ = std::fs::remove_dir_all(out);
    }
    result.map(|()| prep)
}

fn write_runs(prep: &Prepared, base: Option<&(PathBuf, toml::Table)>) -> Result<(), Bad> {
    let sweep = prep.sweep.display();
    for r in &prep.runs {
        std::fs::create_dir_all(&r.dir)
            .map_err(|e| bad(format!("cannot create {}: {e}", r.dir.display())))?;
        let settings = prep
            .params
            .iter()
            .zip(&r.choice)
            .map(|(p, &c)| p.describe(&p.values[c]))
            .collect::<Vec<_>>()
            .join(", ");
        let at = format!("{sweep}: {} ({settings})", r.dir.display());
        if let Some((base_path, base)) = base {
            let mut t = base.clone();
            for (p, &c) in prep.params.iter().zip(&r.choice) {
                if let ParamKind::Key(k) = &p.what {
                    set_key(&mut t, k, &p.values[c]).map_err(|e| bad(format!("{at}: {e}")))?;
                }
            }
            let cfg = config_of(&t, base_path).map_err(|e| bad(format!("{at}: {e}")))?;
            // The resolved config (relative paths made absolute), as TOML:
            // it must read back as the same config.
            let path = r.dir.join("config.toml");
            let text = toml::to_string(&cfg)
                .map_err(|e| bad(format!("{at}: the config cannot be written as TOML: {e}")))?;
            let back: toml::Table = toml::from_str(&text)
                .map_err(|e| bad(format!("{at}: the written config does not read back: {e}")))?;
            if config_of(&back, &path).ok().as_ref() != Some(&cfg) {
                return Err(bad(format!(
                    "{at}: the written config does not read back as the same config"
                )));
            }
            let header = format!(
                "# {} of the sweep {sweep}: {} with {}\n",
                r.dir.file_name().unwrap_or_default().to_string_lossy(),
                base_path.display(),
                if settings.is_empty() {
                    "no changes"
                } else {
                    &settings
                }
            );
            std::fs::write(&path, header + &text)
                .map_err(|e| bad(format!("cannot write {}: {e}", path.display())))?;
        }
        let params = serde_json::json!({
            "sweep": prep.sweep.display().to_string(),
            "run": r.dir.file_name().unwrap_or_default().to_string_lossy(),
            "params": prep.params_json(r),
            "param_order": prep.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
            "command": std::iter::once("run".to_string()).chain(r.args.iter().cloned()).collect::<Vec<_>>(),
        });
        let pj = r.dir.join("params.json");
        std::fs::write(
            &pj,
            serde_json::to_string_pretty(&params).unwrap_or_default() + "\n",
        )
        .map_err(|e| bad(format!("cannot write {}: {e}", pj.display())))?;
        // The run's whole command line, checked by kvmsim run's own code.
        let argv = ["kvmsim", "run"]
            .into_iter()
            .map(String::from)
            .chain(r.args.iter().cloned());
        let cli = crate::Cli::try_parse_from(argv)
            .map_err(|e| bad(format!("{at}: {}", e.to_string().trim_end())))?;
        let crate::Command::Run(a) = cli.command else {
            unreachable!("parsed as run")
        };
        crate::make_config(&a).map_err(|e| bad(format!("{at}: {e}")))?;
    }
    Ok(())
}

/// What became of one run, for sweep.json.
#[derive(Clone, Default)]
struct Outcome {
    /// The exit status; None while pending, or if a signal ended it.
    status: Option<i32>,
    signal: Option<i32>,
    /// Could not be started.
    error: Option<String>,
    host_seconds: Option<f64>,
    done: bool,
}

fn summary(prep: &Prepared, outcomes: &[Outcome], slurm: Option<&Path>) -> serde_json::Value {
    let runs: Vec<serde_json::Value> = prep
        .runs
        .iter()
        .zip(outcomes)
        .map(|(r, o)| {
            serde_json::json!({
                "run": r.dir.file_name().unwrap_or_default().to_string_lossy(),
                "params": prep.params_json(r),
                "state": if o.done { if ok(prep, o) { "ok" } else { "failed" } } else { "pending" },
                "status": o.status,
                "signal": o.signal,
                "error": o.error,
                "host_seconds": o.host_seconds,
            })
        })
        .collect();
    let failed = outcomes.iter().filter(|o| o.done && !ok(prep, o)).count();
    serde_json::json!({
        "sweep": prep.sweep.display().to_string(),
        "outdir": prep.outdir.display().to_string(),
        "params": prep.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
        "ok_status": prep.ok_status,
        "slurm_script": slurm.map(|s| s.display().to_string()),
        "runs": runs,
        "finished": outcomes.iter().filter(|o| o.done).count(),
        "failed": failed,
    })
}

fn ok(prep: &Prepared, o: &Outcome) -> bool {
    o.status.is_some_and(|s| prep.ok_status.contains(&s))
}

fn write_summary(prep: &Prepared, outcomes: &[Outcome], slurm: Option<&Path>) {
    let path = prep.outdir.join("sweep.json");
    let text = serde_json::to_string_pretty(&summary(prep, outcomes, slurm)).unwrap_or_default();
    // Written aside and renamed: a reader never sees half a file.
    let tmp = prep.outdir.join(".sweep.json.tmp");
    if let Err(e) = std::fs::write(&tmp, text + "\n").and_then(|()| std::fs::rename(&tmp, &path)) {
        eprintln!("kvmsim: warning: cannot write {}: {e}", path.display());
    }
}

/// `kvmsim sweep`.
pub fn sweep_cmd(a: SweepArgs) -> i32 {
    // Ctrl-C reaches the runs too (one process group): they end with
    // their statistics, and no further run starts.
    platform::console::install_interrupt_handler();
    let prep = match prepare(&a.sweep, &a.outdir) {
        Ok(p) => p,
        Err(e) => return crate::fail(e),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return crate::fail(format!("cannot find kvmsim's own executable: {e}")),
    };
    let n = prep.runs.len();
    let outcomes = vec![Outcome::default(); n];
    if let Some(script) = &a.slurm {
        let text = slurm_script(&prep, &exe);
        if let Err(e) = std::fs::write(script, text) {
            let _ = std::fs::remove_dir_all(&prep.outdir);
            return crate::fail(format!("cannot write {}: {e}", script.display()));
        }
        write_summary(&prep, &outcomes, Some(&absolute(script)));
        eprintln!(
            "kvmsim: wrote {} ({n} runs, prepared in {}); submit it with sbatch, then: kvmsim collect {}",
            script.display(),
            prep.outdir.display(),
            prep.outdir.display()
        );
        return 0;
    }
    let jobs = a
        .jobs
        .map(|j| j as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .min(n)
        .max(1);
    write_summary(&prep, &outcomes, None);
    eprintln!(
        "kvmsim: sweep of {n} runs into {}, {jobs} at a time",
        prep.outdir.display()
    );
    let next = AtomicUsize::new(0);
    let state = Mutex::new(outcomes);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || platform::console::interrupted() {
                    break;
                }
                let o = run_one(&exe, &prep.runs[i]);
                let mut all = state.lock().unwrap_or_else(|p| p.into_inner());
                let r = &prep.runs[i];
                let name = r.dir.file_name().unwrap_or_default().to_string_lossy();
                let how = match (&o.error, o.status, o.signal) {
                    (Some(e), _, _) => format!("not started: {e}"),
                    (_, Some(st), _) => format!("status {st}"),
                    (_, _, Some(sig)) => format!("killed by signal {sig}"),
                    _ => "unknown".into(),
                };
                all[i] = o;
                let done = all.iter().filter(|o| o.done).count();
                eprintln!("kvmsim: [{done}/{n}] {name}: {how}");
                write_summary(&prep, &all, None);
            });
        }
    });
    let outcomes = state.into_inner().unwrap_or_else(|p| p.into_inner());
    let failed: Vec<usize> = (0..n).filter(|&i| !ok(&prep, &outcomes[i])).collect();
    if platform::console::interrupted() {
        eprintln!("kvmsim: sweep interrupted; sweep.json lists the runs that did not run");
        return status::USER_INTERRUPT;
    }
    match failed.first() {
        None => {
            eprintln!(
                "kvmsim: all {n} runs succeeded; kvmsim collect {}",
                prep.outdir.display()
            );
            0
        }
        Some(&i) => {
            eprintln!(
                "kvmsim: {} of {n} runs failed (see {}/sweep.json and each run's kvmsim.log)",
                failed.len(),
                prep.outdir.display()
            );
            // The first failed run's status (a run killed by a signal, or
            // not started: 254).
            match outcomes[i].status {
                Some(s) if s != 0 => s,
                _ => status::SIM_ERROR,
            }
        }
    }
}

/// Runs one `kvmsim run` child, its stdout and stderr into the run's
/// kvmsim.log.
fn run_one(exe: &Path, r: &Run) -> Outcome {
    let log = r.dir.join("kvmsim.log");
    let start = Instant::now();
    let spawned = std::fs::File::create(&log).and_then(|f| {
        let f2 = f.try_clone()?;
        std::process::Command::new(exe)
            .arg("run")
            .args(&r.args)
            .stdin(std::process::Stdio::null())
            .stdout(f)
            .stderr(f2)
            .status()
    });
    match spawned {
        Ok(st) => {
            use std::os::unix::process::ExitStatusExt;
            Outcome {
                status: st.code(),
                signal: st.signal(),
                error: None,
                host_seconds: Some(start.elapsed().as_secs_f64()),
                done: true,
            }
        }
        Err(e) => Outcome {
            error: Some(format!("{}: {e}", exe.display())),
            done: true,
            ..Default::default()
        },
    }
}

/// A Slurm array job: task I runs run I, exactly as `kvmsim sweep` would.
fn slurm_script(prep: &Prepared, exe: &Path) -> String {
    let n = prep.runs.len();
    let out = prep.outdir.display().to_string();
    let mut s = String::new();
    s.push_str("#!/bin/bash\n");
    s.push_str(&format!(
        "# Written by kvmsim {} sweep from {}: {n} runs, one per array task.\n\
         # Submit: sbatch THIS-FILE; then: kvmsim collect {}\n\
         # The paths are absolute: the cluster's nodes must see them (a shared file system).\n",
        env!("CARGO_PKG_VERSION"),
        prep.sweep.display(),
        shell_quote(&out)
    ));
    s.push_str("#SBATCH --job-name=kvmsim-sweep\n");
    s.push_str(&format!("#SBATCH --array=0-{}\n", n - 1));
    s.push_str("#SBATCH --ntasks=1\n");
    s.push_str(&format!(
        "#SBATCH --output={}\n",
        shell_quote(&format!("{out}/slurm-%A_%a.out"))
    ));
    for o in &prep.slurm {
        s.push_str(&format!("#SBATCH {o}\n"));
    }
    s.push_str("set -u\n");
    s.push_str("case \"${SLURM_ARRAY_TASK_ID:?not a Slurm array task}\" in\n");
    for (i, r) in prep.runs.iter().enumerate() {
        let words: Vec<String> = std::iter::once(exe.display().to_string())
            .chain(std::iter::once("run".to_string()))
            .chain(r.args.iter().cloned())
            .map(|w| shell_quote(&w))
            .collect();
        s.push_str(&format!(
            "{i}) exec {} </dev/null >{} 2>&1 ;;\n",
            words.join(" "),
            shell_quote(&r.dir.join("kvmsim.log").display().to_string())
        ));
    }
    s.push_str(&format!(
        "*) echo \"kvmsim sweep: no run $SLURM_ARRAY_TASK_ID (0-{})\" >&2; exit 254 ;;\n",
        n - 1
    ));
    s.push_str("esac\n");
    s
}

/// Every run folder (one holding params.json) under `dir`; a run folder's
/// own sub-folders (checkpoints) are not searched, nor hidden folders or
/// symbolic links.
fn find_runs(dir: &Path, depth: u32, found: &mut Vec<PathBuf>) -> Result<(), String> {
    if dir.join("params.json").is_file() {
        found.push(dir.to_path_buf());
        return Ok(());
    }
    if depth > 16 {
        return Ok(());
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut subs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    subs.sort();
    for s in subs {
        find_runs(&s, depth + 1, found)?;
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// One row of the table.
struct Row {
    run: String,
    /// The params' names in the sweep file's order.
    order: Vec<String>,
    params: serde_json::Map<String, serde_json::Value>,
    exit: Option<serde_json::Value>,
    stats: serde_json::Map<String, serde_json::Value>,
}

fn read_row(dir: &Path) -> Result<Row, String> {
    let pj = dir.join("params.json");
    let pv = read_json(&pj)?.unwrap_or_default();
    let params = pv
        .get("params")
        .and_then(|p| p.as_object())
        .cloned()
        .ok_or_else(|| format!("{}: no \"params\" object", pj.display()))?;
    let order = pv
        .get("param_order")
        .and_then(|o| o.as_array())
        .map(|o| {
            o.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let exit = read_json(&dir.join("exit.json"))?;
    let sj = dir.join("stats.json");
    let stats = match read_json(&sj)? {
        None => serde_json::Map::new(),
        Some(v) => v
            .as_array()
            .map(|dumps| {
                dumps
                    .last()
                    .and_then(|d| d.get("stats"))
                    .and_then(|s| s.as_object())
                    .cloned()
                    .unwrap_or_default()
            })
            .ok_or_else(|| format!("{}: not a list of dumps", sj.display()))?,
    };
    Ok(Row {
        run: dir.display().to_string(),
        order,
        params,
        exit,
        stats,
    })
}

fn cell(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// The pandas dtype of a column's values.
fn dtype<'a>(values: impl Iterator<Item = Option<&'a serde_json::Value>>) -> &'static str {
    let present: Vec<&serde_json::Value> = values.flatten().filter(|v| !v.is_null()).collect();
    if present.is_empty() {
        "float64"
    } else if present.iter().all(|v| v.is_boolean()) {
        "boolean"
    } else if present.iter().all(|v| v.is_i64() || v.is_u64()) {
        "Int64"
    } else if present.iter().all(|v| v.is_number()) {
        "float64"
    } else {
        "string"
    }
}

/// `kvmsim collect`.
pub fn collect_cmd(a: CollectArgs) -> i32 {
    match collect(&a) {
        Ok(n) => {
            eprintln!("kvmsim: {n} runs into {}", a.out.display());
            0
        }
        Err(e) => crate::fail(e),
    }
}

fn collect(a: &CollectArgs) -> Result<usize, String> {
    let mut found = Vec::new();
    for d in &a.dirs {
        if !d.is_dir() {
            return Err(format!("{}: not a folder", d.display()));
        }
        find_runs(d, 0, &mut found)?;
    }
    found.dedup();
    if found.is_empty() {
        return Err(format!(
            "no run folders (a folder holding params.json, as kvmsim sweep writes) under {}",
            a.dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let rows = found
        .iter()
        .map(|d| read_row(d))
        .collect::<Result<Vec<_>, _>>()?;
    // Columns in first-seen order.
    let mut params: Vec<String> = Vec::new();
    let mut stats: Vec<String> = Vec::new();
    let mut seen = HashMap::new();
    for r in &rows {
        let listed = r.order.iter().filter(|k| r.params.contains_key(*k));
        for k in listed.chain(r.params.keys()) {
            if seen.insert(k.clone(), true).is_none() {
                params.push(k.clone());
            }
        }
    }
    for r in &rows {
        for k in r.stats.keys() {
            match seen.insert(k.clone(), false) {
                None => stats.push(k.clone()),
                Some(true) => {
                    return Err(format!(
                        "{}: the parameter {k:?} has the name of a statistic; name it \
                         otherwise in the sweep file (name = \"...\")",
                        r.run
                    ))
                }
                Some(false) => {}
            }
        }
    }
    let exit_field = |r: &Row, f: &str| r.exit.as_ref().and_then(|e| e.get(f)).cloned();
    let mut header = vec!["run".to_string()];
    header.extend(params.iter().cloned());
    header.extend(["exit_status".to_string(), "exit_cause".to_string()]);
    header.extend(stats.iter().cloned());
    let mut w = csv::Writer::from_path(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let werr = |e: csv::Error| format!("cannot write {}: {e}", a.out.display());
    w.write_record(&header).map_err(werr)?;
    for r in &rows {
        let mut rec = vec![r.run.clone()];
        rec.extend(params.iter().map(|p| cell(r.params.get(p))));
        rec.push(cell(exit_field(r, "status").as_ref()));
        rec.push(cell(exit_field(r, "cause").as_ref()));
        rec.extend(stats.iter().map(|s| cell(r.stats.get(s))));
        w.write_record(&rec).map_err(werr)?;
    }
    w.flush()
        .map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
    let mut types = vec![serde_json::json!({"name": "run", "dtype": "string"})];
    for p in &params {
        let t = dtype(rows.iter().map(|r| r.params.get(p)));
        types.push(serde_json::json!({"name": p, "dtype": t}));
    }
    let st: Vec<_> = rows.iter().map(|r| exit_field(r, "status")).collect();
    types.push(
        serde_json::json!({"name": "exit_status", "dtype": dtype(st.iter().map(|v| v.as_ref()))}),
    );
    types.push(serde_json::json!({"name": "exit_cause", "dtype": "string"}));
    for s in &stats {
        let t = dtype(rows.iter().map(|r| r.stats.get(s)));
        types.push(serde_json::json!({"name": s, "dtype": t}));
    }
    let tp = types_path(&a.out);
    std::fs::write(
        &tp,
        serde_json::to_string_pretty(&types).unwrap_or_default() + "\n",
    )
    .map_err(|e| format!("cannot write {}: {e}", tp.display()))?;
    Ok(rows.len())
}

/// table.csv -> table.types.json.
pub fn types_path(out: &Path) -> PathBuf {
    out.with_extension("types.json")
}
