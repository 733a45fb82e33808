//! The sim-ops device: guest-to-simulator operations, binary compatible with
//! gem5's "address" m5ops.
//!
//! The guest reads (or writes) at `base + (func << 8)`; arguments are in the
//! first six argument registers (x86-64: RDI, RSI, RDX, RCX, R8, R9) and the
//! result comes back as the read's data (so a `mov` lands it in RAX, as
//! gem5's `m5` library expects). Delays and periods are in simulated
//! nanoseconds, counted from the tick at which the operation is serviced.

use std::collections::HashSet;

use mem::{AccessCtx, BusDevice, RestoreError, SavedState, Space};
use serde::{Deserialize, Serialize};
use sim::tick::ns_to_ticks;
use sim::{Counter, Request, Stats, Tick, Value, Vector};

/// The default base address of the window (gem5's `m5ops_base` on x86).
pub const SIMOPS_BASE: u64 = 0xFFFF_0000;
/// Size of the window: 256 functions of 256 bytes.
pub const SIMOPS_SIZE: u64 = 0x1_0000;

/// Function numbers (gem5's `include/gem5/asm/generic/m5ops.h`).
pub mod func {
    pub const EXIT: u8 = 0x21;
    pub const FAIL: u8 = 0x22;
    pub const SUM: u8 = 0x23;
    pub const RESET_STATS: u8 = 0x40;
    pub const DUMP_STATS: u8 = 0x41;
    pub const DUMP_RESET_STATS: u8 = 0x42;
    pub const CHECKPOINT: u8 = 0x43;
    pub const READ_FILE: u8 = 0x50;
    pub const WORK_BEGIN: u8 = 0x5a;
    pub const WORK_END: u8 = 0x5b;
}

/// Latency of one operation.
pub const SIMOPS_LATENCY: Tick = sim::tick::TICKS_PER_NS;

/// Work items open at once at most (the oldest is forgotten beyond).
const MAX_OPEN_WORK: usize = 1024;

/// `readfile` copies the host file through a buffer of this size, so a
/// guest asking for any length costs bounded host memory.
const READ_FILE_CHUNK: usize = 64 * 1024;

/// A work item begun and not yet ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenWork {
    pub work_id: u64,
    pub thread_id: u64,
    /// The tick of its `work_begin`.
    pub begin: Tick,
}

/// The sim-ops device's saved state: the open work items, oldest first
/// (its counters are statistics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimOpsState {
    pub open_work: Vec<OpenWork>,
}

/// The sim-ops device and its statistics.
pub struct SimOps {
    ops: Counter,
    unknown: Counter,
    work_items: Counter,
    work_ticks: Value,
    reported: HashSet<u8>,
    /// Open work items: (work id, thread id) -> begin tick.
    open_work: Vec<((u64, u64), Tick)>,
    /// Work items begun and ended on each CPU (several CPUs only).
    per_cpu: Option<(Vector, Vector)>,
    /// The host file of `readfile` (none: the guest reads nothing).
    readfile: Option<std::path::PathBuf>,
    readfile_failed: bool,
    read_bytes: Counter,
}

impl SimOps {
    /// A device whose statistics live under `prefix` (e.g. `system.simops`).
    pub fn new(stats: &mut Stats, prefix: &str) -> Result<Self, sim::stats::StatsError> {
        Ok(SimOps {
            ops: stats.counter(&format!("{prefix}.numOps"), "Sim-ops serviced", "Count")?,
            unknown: stats.counter(
                &format!("{prefix}.numUnknownOps"),
                "Sim-ops with an unknown function number (returned 0)",
                "Count",
            )?,
            work_items: stats.counter(
                &format!("{prefix}.workItems"),
                "Work items completed (work_begin followed by work_end)",
                "Count",
            )?,
            work_ticks: stats.value(
                &format!("{prefix}.workItemSeconds"),
                "Simulated time spent inside completed work items",
                "Second",
            )?,
            reported: HashSet::new(),
            open_work: Vec::new(),
            per_cpu: None,
            readfile: None,
            readfile_failed: false,
            read_bytes: stats.counter(
                &format!("{prefix}.readFileBytes"),
                "Bytes the guest read from the host with readfile",
                "Byte",
            )?,
        })
    }

    /// The host file the guest reads with `readfile` (gem5's
    /// `system.readfile`).
    pub fn set_readfile(&mut self, path: Option<std::path::PathBuf>) {
        self.readfile = path;
    }

    /// gem5's `readfile(buffer, len, offset)`: copies up to `len` bytes of
    /// the host file, from `offset` on, to the caller's buffer at virtual
    /// address `va`; returns how many were copied (0 at the end of the
    /// file, without a file, or when the buffer is not mapped). A host
    /// error is reported once and reads as the end of the file.
    fn read_file(&mut self, va: u64, len: u64, offset: u64, ctx: &mut AccessCtx) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let Some(path) = &self.readfile else {
            return 0;
        };
        let opened = std::fs::File::open(path).and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            Ok(f)
        });
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => {
                if !self.readfile_failed {
                    self.readfile_failed = true;
                    tracing::error!(
                        "sim-ops readfile: {}: {e} (the guest reads nothing; reported once)",
                        path.display()
                    );
                }
                return 0;
            }
        };
        let mut buf = vec![0u8; READ_FILE_CHUNK.min(len.try_into().unwrap_or(usize::MAX))];
        let mut done: u64 = 0;
        while done < len {
            let want = buf.len().min((len - done).try_into().unwrap_or(usize::MAX));
            let got = match file.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !self.readfile_failed {
                        self.readfile_failed = true;
                        tracing::error!(
                            "sim-ops readfile: {}: {e} (read as the end of the file; reported once)",
                            path.display()
                        );
                    }
                    break;
                }
            };
            let put = ctx.write_virt(va.wrapping_add(done), &buf[..got]);
            done += put as u64;
            if put < got {
                break;
            }
        }
        self.read_bytes.add(done);
        done
    }

    /// Counts work items per CPU of a system with `cpus` CPUs, under
    /// `{prefix}.workBegins` and `{prefix}.workEnds` (one element per CPU,
    /// named `cpu0`, `cpu1`, ...): which CPU called `work_begin` and
    /// `work_end`.
    pub fn count_per_cpu(
        &mut self,
        stats: &mut Stats,
        prefix: &str,
        cpus: usize,
    ) -> Result<(), sim::stats::StatsError> {
        let names: Vec<String> = (0..cpus).map(|i| format!("cpu{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let begins = stats.vector(
            &format!("{prefix}.workBegins"),
            "work_begin calls, by the CPU that made them",
            "Count",
            &names,
        )?;
        let ends = stats.vector(
            &format!("{prefix}.workEnds"),
            "work_end calls that completed a work item, by the CPU that made them",
            "Count",
            &names,
        )?;
        self.per_cpu = Some((begins, ends));
        Ok(())
    }

    /// Services function `func` with `args`; returns the result.
    fn call(&mut self, func: u8, args: [u64; 6], ctx: &mut AccessCtx) -> u64 {
        self.ops.inc();
        let now = ctx.now;
        match func {
            func::EXIT => {
                ctx.requests.push(Request::Exit {
                    delay: ns_to_ticks(args[0]),
                    code: 0,
                });
                0
            }
            func::FAIL => {
                ctx.requests.push(Request::Exit {
                    delay: ns_to_ticks(args[0]),
                    code: args[1] as i64,
                });
                0
            }
            func::SUM => args.iter().fold(0u64, |a, &b| a.wrapping_add(b)),
            func::RESET_STATS => {
                ctx.requests.push(Request::ResetStats {
                    delay: ns_to_ticks(args[0]),
                    period: ns_to_ticks(args[1]),
                });
                0
            }
            func::DUMP_STATS | func::DUMP_RESET_STATS => {
                ctx.requests.push(Request::DumpStats {
                    delay: ns_to_ticks(args[0]),
                    period: ns_to_ticks(args[1]),
                    reset: func == func::DUMP_RESET_STATS,
                });
                0
            }
            func::CHECKPOINT => {
                ctx.requests.push(Request::Checkpoint {
                    delay: ns_to_ticks(args[0]),
                    period: ns_to_ticks(args[1]),
                });
                0
            }
            func::READ_FILE => self.read_file(args[0], args[1], args[2], ctx),
            func::WORK_BEGIN => {
                let key = (args[0], args[1]);
                self.open_work.retain(|(k, _)| *k != key);
                // Bound the table: a guest that never ends its items cannot grow it forever.
                if self.open_work.len() >= MAX_OPEN_WORK {
                    self.open_work.remove(0);
                }
                self.open_work.push((key, now));
                if let Some((begins, _)) = &self.per_cpu {
                    if ctx.cpu_index < begins.len() {
                        begins.add(ctx.cpu_index, 1);
                    }
                }
                0
            }
            func::WORK_END => {
                let key = (args[0], args[1]);
                if let Some(pos) = self.open_work.iter().position(|(k, _)| *k == key) {
                    let (_, begin) = self.open_work.remove(pos);
                    self.work_items.inc();
                    self.work_ticks
                        .add(sim::tick::ticks_to_seconds(now.saturating_sub(begin)));
                    if let Some((_, ends)) = &self.per_cpu {
                        if ctx.cpu_index < ends.len() {
                            ends.add(ctx.cpu_index, 1);
                        }
                    }
                }
                0
            }
            other => {
                self.unknown.inc();
                if self.reported.insert(other) {
                    tracing::warn!(
                        "sim-ops: unknown function {other:#04x} (reported once; it returns 0)"
                    );
                }
                0
            }
        }
    }
}

impl BusDevice for SimOps {
    fn read(&mut self, _: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick {
        let args = ctx.call_args();
        let result = self.call((offset >> 8) as u8, args, ctx);
        crate::put_le_value(data, result);
        SIMOPS_LATENCY
    }

    fn write(&mut self, _: Space, offset: u64, _data: &[u8], ctx: &mut AccessCtx) -> Tick {
        let args = ctx.call_args();
        self.call((offset >> 8) as u8, args, ctx);
        SIMOPS_LATENCY
    }

    fn save(&self) -> SavedState {
        let open_work = self
            .open_work
            .iter()
            .map(|&((work_id, thread_id), begin)| OpenWork {
                work_id,
                thread_id,
                begin,
            })
            .collect();
        crate::state::save(&SimOpsState { open_work })
    }

    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        let s: SimOpsState = crate::state::parse(state)?;
        crate::state::check(
            s.open_work.len() <= MAX_OPEN_WORK,
            "open_work",
            format_args!("{} items, at most {MAX_OPEN_WORK}", s.open_work.len()),
        )?;
        let mut seen = HashSet::new();
        for (i, w) in s.open_work.iter().enumerate() {
            crate::state::check(
                seen.insert((w.work_id, w.thread_id)),
                &format!("open_work[{i}]"),
                format_args!("item ({}, {}) is open twice", w.work_id, w.thread_id),
            )?;
        }
        self.open_work = s
            .open_work
            .into_iter()
            .map(|w| ((w.work_id, w.thread_id), w.begin))
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mem::CallArgs;
    use sim::tick::TICKS_PER_NS;

    struct Regs([u64; 6]);
    impl CallArgs for Regs {
        fn call_args(&mut self) -> [u64; 6] {
            self.0
        }
    }

    fn op(dev: &mut SimOps, now: Tick, func: u8, args: [u64; 6]) -> (u64, Vec<Request>) {
        let mut reqs = vec![];
        let mut regs = Regs(args);
        let mut ctx = AccessCtx {
            now,
            cpu: Some(&mut regs),
            requests: &mut reqs,
            cpu_index: 0,
        };
        let mut data = [0u8; 8];
        assert_eq!(
            dev.read(Space::Mmio, u64::from(func) << 8, &mut data, &mut ctx),
            SIMOPS_LATENCY
        );
        (u64::from_le_bytes(data), reqs)
    }

    /// A caller with memory at virtual addresses [base, base + len).
    struct Caller {
        args: [u64; 6],
        base: u64,
        mem: Vec<u8>,
    }
    impl CallArgs for Caller {
        fn call_args(&mut self) -> [u64; 6] {
            self.args
        }
        fn write_virt(&mut self, va: u64, data: &[u8]) -> usize {
            let Some(off) = va.checked_sub(self.base) else {
                return 0;
            };
            let off = off as usize;
            let n = data.len().min(self.mem.len().saturating_sub(off));
            if n > 0 {
                self.mem[off..off + n].copy_from_slice(&data[..n]);
            }
            n
        }
    }

    fn read_file(dev: &mut SimOps, caller: &mut Caller) -> u64 {
        let mut reqs = vec![];
        let mut ctx = AccessCtx {
            now: 0,
            cpu: Some(caller),
            requests: &mut reqs,
            cpu_index: 0,
        };
        let mut data = [0u8; 8];
        dev.read(
            Space::Mmio,
            u64::from(func::READ_FILE) << 8,
            &mut data,
            &mut ctx,
        );
        assert!(reqs.is_empty());
        u64::from_le_bytes(data)
    }

    #[test]
    fn readfile_copies_the_host_file_into_the_callers_buffer() {
        let dir = std::env::temp_dir().join(format!("kvmsim-readfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("script");
        // Longer than one chunk, so the copy takes several.
        let text: Vec<u8> = (0..READ_FILE_CHUNK * 2 + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &text).unwrap();
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        let mut c = Caller {
            args: [0x1000, 10, 0, 0, 0, 0],
            base: 0x1000,
            mem: vec![0; text.len() + 16],
        };
        // No file: nothing is read.
        assert_eq!(read_file(&mut d, &mut c), 0);
        d.set_readfile(Some(path.clone()));
        assert_eq!(read_file(&mut d, &mut c), 10);
        assert_eq!(&c.mem[..10], &text[..10]);
        assert_eq!(c.mem[10], 0);
        // From an offset, more than is left: the rest of the file.
        c.args = [0x1000, u64::MAX, 7, 0, 0, 0];
        let n = read_file(&mut d, &mut c);
        assert_eq!(n as usize, text.len() - 7);
        assert_eq!(&c.mem[..n as usize], &text[7..]);
        // At or past the end: 0 (how a guest's loop ends).
        c.args = [0x1000, 64, text.len() as u64, 0, 0, 0];
        assert_eq!(read_file(&mut d, &mut c), 0);
        c.args = [0x1000, 64, u64::MAX, 0, 0, 0];
        assert_eq!(read_file(&mut d, &mut c), 0);
        // A buffer that runs into unmapped memory: what fit.
        c.args = [0x1000 + c.mem.len() as u64 - 5, 64, 0, 0, 0, 0];
        assert_eq!(read_file(&mut d, &mut c), 5);
        // Unmapped entirely.
        c.args = [0, 64, 0, 0, 0, 0];
        assert_eq!(read_file(&mut d, &mut c), 0);
        let read = stats.dump(0).get("s.readFileBytes").unwrap().as_f64();
        assert_eq!(read as usize, 10 + text.len() - 7 + 5);
        // The file vanished: nothing, no panic.
        std::fs::remove_file(&path).unwrap();
        c.args = [0x1000, 64, 0, 0, 0, 0];
        assert_eq!(read_file(&mut d, &mut c), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn work_items_are_counted_per_cpu() {
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        d.count_per_cpu(&mut stats, "s", 2).unwrap();
        let mut call = |cpu: usize, func: u8, now: Tick| {
            let mut reqs = vec![];
            let mut regs = Regs([7, 1, 0, 0, 0, 0]);
            let mut ctx = AccessCtx {
                now,
                cpu: Some(&mut regs),
                requests: &mut reqs,
                cpu_index: cpu,
            };
            let mut data = [0u8; 8];
            d.read(Space::Mmio, u64::from(func) << 8, &mut data, &mut ctx);
        };
        call(0, func::WORK_BEGIN, 10);
        call(1, func::WORK_END, 30); // the thread moved to CPU 1
        call(5, func::WORK_BEGIN, 40); // no such CPU: not counted per CPU
        let dump = stats.dump(50);
        let get = |n: &str| dump.get(n).unwrap().as_f64();
        assert_eq!(get("s.workBegins::cpu0"), 1.0);
        assert_eq!(get("s.workBegins::cpu1"), 0.0);
        assert_eq!(get("s.workEnds::cpu1"), 1.0);
        assert_eq!(get("s.workEnds::cpu0"), 0.0);
        assert_eq!(get("s.workItems"), 1.0);
    }

    #[test]
    fn sum_returns_the_sum_of_six_args() {
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        assert_eq!(op(&mut d, 0, func::SUM, [1, 2, 3, 4, 5, 6]).0, 21);
        assert_eq!(op(&mut d, 0, func::SUM, [u64::MAX, 2, 0, 0, 0, 0]).0, 1);
    }

    #[test]
    fn exit_and_fail_request_an_exit_after_the_delay() {
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        let (_, r) = op(&mut d, 5, func::EXIT, [10, 99, 0, 0, 0, 0]);
        assert_eq!(
            r,
            vec![Request::Exit {
                delay: 10 * TICKS_PER_NS,
                code: 0
            }]
        );
        let (_, r) = op(&mut d, 5, func::FAIL, [0, 3, 0, 0, 0, 0]);
        assert_eq!(r, vec![Request::Exit { delay: 0, code: 3 }]);
    }

    #[test]
    fn checkpoint_asks_for_one_after_the_delay_then_every_period() {
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        let (_, r) = op(&mut d, 5, func::CHECKPOINT, [10, 2000, 0, 0, 0, 0]);
        assert_eq!(
            r,
            vec![Request::Checkpoint {
                delay: 10 * TICKS_PER_NS,
                period: 2000 * TICKS_PER_NS
            }]
        );
    }

    #[test]
    fn stats_ops() {
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        let (_, r) = op(&mut d, 0, func::DUMP_RESET_STATS, [1, 2, 0, 0, 0, 0]);
        assert_eq!(
            r,
            vec![Request::DumpStats {
                delay: 1000,
                period: 2000,
                reset: true
            }]
        );
        let (_, r) = op(&mut d, 0, func::DUMP_STATS, [0, 0, 0, 0, 0, 0]);
        assert_eq!(
            r,
            vec![Request::DumpStats {
                delay: 0,
                period: 0,
                reset: false
            }]
        );
        let (_, r) = op(&mut d, 0, func::RESET_STATS, [3, 0, 0, 0, 0, 0]);
        assert_eq!(
            r,
            vec![Request::ResetStats {
                delay: 3000,
                period: 0
            }]
        );
    }

    #[test]
    fn work_items_measure_simulated_time() {
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        op(&mut d, 1_000, func::WORK_BEGIN, [7, 0, 0, 0, 0, 0]);
        op(&mut d, 2_000, func::WORK_END, [8, 0, 0, 0, 0, 0]); // never begun: ignored
        op(&mut d, 3_000_000, func::WORK_END, [7, 0, 0, 0, 0, 0]);
        let dump = stats.dump(0);
        assert_eq!(dump.get("s.workItems").unwrap().as_f64(), 1.0);
        assert!((dump.get("s.workItemSeconds").unwrap().as_f64() - 2.999e-6).abs() < 1e-15);
    }

    #[test]
    fn unknown_functions_return_zero_and_are_counted() {
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        assert_eq!(op(&mut d, 0, 0x99, [1; 6]), (0, vec![]));
        assert_eq!(op(&mut d, 0, 0x99, [1; 6]), (0, vec![]));
        assert_eq!(stats.dump(0).get("s.numUnknownOps").unwrap().as_f64(), 2.0);
    }

    #[test]
    fn saved_state_restores_identically() {
        use crate::state::tests::*;
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        op(&mut d, 1_000, func::WORK_BEGIN, [7, 0, 0, 0, 0, 0]);
        op(&mut d, 2_000, func::WORK_BEGIN, [8, 1, 0, 0, 0, 0]);
        let mut stats2 = Stats::new();
        let mut e = SimOps::new(&mut stats2, "s").unwrap();
        round_trip(&d, &mut e);
        // Ending the item measures from the saved begin tick.
        op(&mut e, 3_000_000, func::WORK_END, [7, 0, 0, 0, 0, 0]);
        op(&mut d, 3_000_000, func::WORK_END, [7, 0, 0, 0, 0, 0]);
        let (a, b) = (stats.dump(0), stats2.dump(0));
        for n in ["s.workItems", "s.workItemSeconds"] {
            assert_eq!(
                a.get(n).unwrap().as_f64(),
                b.get(n).unwrap().as_f64(),
                "{n}"
            );
        }
        assert_eq!(b.get("s.workItems").unwrap().as_f64(), 1.0);
        assert_eq!(e.save(), d.save());
    }

    #[test]
    fn hostile_saved_states_are_refused() {
        use crate::state::tests::*;
        use serde_json::json;
        let mut stats = Stats::new();
        let mut d = SimOps::new(&mut stats, "s").unwrap();
        op(&mut d, 1_000, func::WORK_BEGIN, [7, 0, 0, 0, 0, 0]);
        refuses_garbage(&mut d);
        let item = d.save()["open_work"][0].clone();
        refused(&mut d, json!({"open_work": [item, item]}), "open_work[1]");
        let many: Vec<SavedState> = (0..=MAX_OPEN_WORK)
            .map(|i| json!({"work_id": i, "thread_id": 0, "begin": 0}))
            .collect();
        refused(&mut d, json!({ "open_work": many }), "open_work");
        refused_edit(
            &mut d,
            &["open_work", "0", "begin"],
            json!(-1),
            "open_work[0].begin",
        );
        refused_edit(&mut d, &["open_work", "0", "tid"], json!(0), "tid");
    }

    proptest::proptest! {
        #[test]
        fn any_access_is_safe(off in 0u64..SIMOPS_SIZE, len in 0usize..16, write: bool, args: [u64; 6]) {
            let mut stats = Stats::new();
            let mut d = SimOps::new(&mut stats, "s").unwrap();
            let mut reqs = vec![];
            let mut regs = Regs(args);
            let mut ctx = AccessCtx { now: 0, cpu: Some(&mut regs), requests: &mut reqs, cpu_index: 0 };
            let mut data = vec![0u8; len];
            if write { d.write(Space::Mmio, off, &data, &mut ctx); } else { d.read(Space::Mmio, off, &mut data, &mut ctx); }
            proptest::prop_assert!(reqs.len() <= 1);
        }
    }
}
