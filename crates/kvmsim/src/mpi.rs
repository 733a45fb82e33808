//! The MPI transport of a distributed run (the `mpi` feature): one
//! simulation's systems spread over the ranks of `mpirun -np N` or `srun`
//! ([`platform::distributed`] does the rest).

use std::sync::Mutex;

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use platform::distributed::Transport;

/// True if this process was started by an MPI launcher (mpirun, or srun
/// with PMI): kvmsim then joins the run's other processes.
pub fn launched() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "PMI_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
        || slurm_tasks().is_some_and(|n| n > 1)
}

/// The number of tasks Slurm started for this step, if under srun.
pub fn slurm_tasks() -> Option<usize> {
    ["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// MPI, initialised for this process (finalised when dropped).
pub struct Mpi {
    // Dropped after `world` (fields drop in order): MPI_Finalize last.
    world: Mutex<Buffers>,
    rank: usize,
    size: usize,
    _universe: Universe,
}

/// The world communicator with the buffers an exchange reuses. They are
/// never empty: an empty `Vec`'s pointer is 1, which OpenMPI takes for its
/// `MPI_IN_PLACE` sentinel.
struct Buffers {
    comm: SimpleCommunicator,
    send: Vec<u8>,
    recv: Vec<u8>,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED (checked in
// `Mpi::init`): any thread may call it as long as no two do at once. The
// communicator is only reached through the `Mutex` around it, which
// serialises the calls.
unsafe impl Send for Buffers {}

impl Mpi {
    /// Initialises MPI; an error names what went wrong (a world of one
    /// process under an srun that started several: srun without PMI).
    pub fn init() -> Result<Self, String> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or("MPI was already initialised")?;
        if threading < Threading::Serialized {
            return Err(format!(
                "the MPI library offers thread level {threading:?}; kvmsim needs Serialized \
                 (its CPU threads take turns at the window exchange)"
            ));
        }
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        if let Some(n) = slurm_tasks().filter(|&n| n > 1 && size == 1) {
            return Err(format!(
                "Slurm started {n} tasks, but MPI sees a world of 1 process: srun did not \
                 connect them (no PMI), so each would run the whole config alone; launch with \
                 `srun --mpi=pmix` (or pmi2; `srun --mpi=list` shows what this cluster has) or \
                 with mpirun inside the allocation"
            ));
        }
        Ok(Mpi {
            world: Mutex::new(Buffers {
                comm,
                send: vec![0; 1],
                recv: vec![0; 1],
            }),
            rank,
            size,
            _universe: universe,
        })
    }

    /// Waits for every process.
    pub fn barrier(&self) {
        self.world
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .comm
            .barrier();
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or_else(|_| {
        // One window's messages to one process beyond 2 GiB: MPI counts
        // are 32 bits. No link carries that much in a window.
        panic!("a window exchange of {n} bytes exceeds MPI's 2 GiB count")
    })
}

impl Transport for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn exchange(&self, to: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut g = self.world.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *g;
        let n = self.size;
        // The counts first.
        let send_counts: Vec<i32> = (0..n)
            .map(|r| count(to.get(r).map_or(0, Vec::len)))
            .collect();
        let mut recv_counts = vec![0i32; n];
        b.comm
            .all_to_all_into(&send_counts[..], &mut recv_counts[..]);
        // Then the bytes.
        let displs = |c: &[i32]| -> Vec<i32> {
            c.iter()
                .scan(0i32, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect()
        };
        let send_displs = displs(&send_counts);
        let recv_displs = displs(&recv_counts);
        let send_total: usize = send_counts.iter().map(|&c| c as usize).sum();
        let recv_total: usize = recv_counts.iter().map(|&c| c as usize).sum();
        b.send.clear();
        for v in &to {
            b.send.extend_from_slice(v);
        }
        b.send.resize(send_total.max(1), 0);
        b.recv.resize(recv_total.max(1), 0);
        {
            let send = Partition::new(&b.send[..], &send_counts[..], &send_displs[..]);
            let mut recv = PartitionMut::new(&mut b.recv[..], &recv_counts[..], &recv_displs[..]);
            b.comm.all_to_all_varcount_into(&send, &mut recv);
        }
        (0..n)
            .map(|r| {
                let (d, c) = (recv_displs[r] as usize, recv_counts[r] as usize);
                b.recv[d..d + c].to_vec()
            })
            .collect()
    }

    fn abort(&self, code: i32) {
        // The thread that failed may have held the lock (poisoned, free
        // again after its unwind); no other thread of this process is in
        // MPI then: the exchange is made by the last thread to reach the
        // window's end, and the failed one never reaches it.
        let g = self.world.lock().unwrap_or_else(|p| p.into_inner());
        g.comm.abort(code)
    }

    fn sum(&self, v: &mut [u64]) {
        let g = self.world.lock().unwrap_or_else(|p| p.into_inner());
        // Never empty (see Buffers).
        let mut send = v.to_vec();
        send.push(0);
        let mut recv = vec![0u64; send.len()];
        g.comm
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        v.copy_from_slice(&recv[..v.len()]);
    }
}

/// `kvmsim bench mpi`: what a window costs between 2 MPI ranks against two
/// threads of one process, and the simulated-time throughput of a
/// distributed run against the same config in one process.
pub mod bench {
    use std::path::Path;
    use std::process::Command;
    use std::time::Instant;

    use platform::distributed::Transport;

    /// The window of a distributed run with `systems` systems, `n` times:
    /// one exchange (each rank sends `bytes` to the other) and one sum of
    /// `systems + 4` values, as `Run::decide_distributed` does. Returns
    /// seconds per window, and per exchange and per sum alone.
    fn mpi_windows(m: &super::Mpi, n: u64, bytes: usize, systems: usize) -> [f64; 3] {
        let size = m.size();
        let msg = vec![0x5au8; bytes];
        let mut v = vec![0u64; systems + 4];
        // One message for every other rank (none to itself).
        let messages = |m: &super::Mpi| -> Vec<Vec<u8>> {
            (0..size)
                .map(|r| {
                    if r == m.rank() {
                        Vec::new()
                    } else {
                        msg.clone()
                    }
                })
                .collect()
        };
        let window = |m: &super::Mpi, v: &mut [u64]| {
            std::hint::black_box(m.exchange(messages(m)));
            m.sum(v);
        };
        // Warm-up: connections are made on first use.
        for _ in 0..100 {
            window(m, &mut v);
        }
        m.barrier();
        let t = Instant::now();
        for _ in 0..n {
            window(m, &mut v);
        }
        let both = t.elapsed().as_secs_f64() / n as f64;
        m.barrier();
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(m.exchange(messages(m)));
        }
        let exchange = t.elapsed().as_secs_f64() / n as f64;
        m.barrier();
        let t = Instant::now();
        for _ in 0..n {
            m.sum(&mut v);
        }
        let sum = t.elapsed().as_secs_f64() / n as f64;
        [both, exchange, sum]
    }

    /// One rank of `mpirun -np 2 kvmsim bench mpi --worker`: rank 0 prints
    /// `window exchange sum` in seconds, best of `runs`.
    pub fn worker(windows: u64, runs: u32) -> Result<(), String> {
        let m = super::Mpi::init()?;
        if m.size() < 2 {
            return Err("the window figure needs 2 or more MPI ranks".into());
        }
        let mut best = [f64::INFINITY; 3];
        for _ in 0..runs.max(1) {
            let r = mpi_windows(&m, windows, 64, 2);
            for (b, x) in best.iter_mut().zip(r) {
                *b = b.min(x);
            }
        }
        if m.rank() == 0 {
            println!("{} {} {}", best[0], best[1], best[2]);
        }
        Ok(())
    }

    /// The in-process window: two threads at `SpinBarrier::wait_then`, as a
    /// run's CPU threads meet; seconds per window, best of `runs`.
    fn local_window(n: u64, runs: u32) -> f64 {
        let mut best = f64::INFINITY;
        for _ in 0..runs.max(1) {
            let b = sim::barrier::SpinBarrier::new(2);
            let decided = std::sync::atomic::AtomicU64::new(0);
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..n {
                            b.wait_then(|| {
                                decided.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            });
                        }
                    });
                }
            });
            best = best.min(t.elapsed().as_secs_f64() / n as f64);
        }
        best
    }

    /// `mpirun -np 2` with what a shared host needs: as root (CI), and
    /// oversubscribed when fewer than 2 cores are free to bind.
    fn mpirun(np: usize) -> Command {
        let mut c = Command::new("mpirun");
        c.args(["-np", &np.to_string()]);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 * np {
            // Each rank has a CPU thread and MPI's progress: with fewer
            // cores than that, bound ranks starve each other.
            c.args(["--oversubscribe", "--bind-to", "none"]);
            c.args(["--mca", "mpi_yield_when_idle", "1"]);
        } else {
            c.args(["--bind-to", "core"]);
        }
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        c
    }

    /// simSeconds per hostSecond of the final stats of the run in `out`.
    fn throughput(out: &Path) -> Result<(f64, f64), String> {
        let text = std::fs::read_to_string(out.join("stats.json"))
            .map_err(|e| format!("{}: {e}", out.join("stats.json").display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let last = v.as_array().and_then(|a| a.last()).ok_or("no stats dump")?;
        let sim = last["stats"]["simSeconds"]
            .as_f64()
            .ok_or("no simSeconds")?;
        let host = last["stats"]["hostSeconds"]
            .as_f64()
            .ok_or("no hostSeconds")?;
        Ok((sim, host))
    }

    /// Runs `kvmsim run CONFIG` alone or under `mpirun -np 2`; (simulated
    /// seconds, host seconds).
    fn run(cfg: &Path, out: &Path, ranks: usize) -> Result<(f64, f64), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut c = if ranks > 1 {
            let mut c = mpirun(ranks);
            c.arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        c.args(["run", "--quiet"])
            .arg(cfg)
            .arg("--outdir")
            .arg(out)
            .env("KVMSIM_LOG", "warn")
            .stdin(std::process::Stdio::null());
        let o = c.output().map_err(|e| format!("cannot start {c:?}: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "{c:?} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim_end()
            ));
        }
        throughput(out)
    }

    /// The whole figure (run outside mpirun: it starts the ranks itself).
    pub fn driver(windows: u64, rounds: u64, runs: u32) -> Result<(), String> {
        if Command::new("mpirun").arg("--version").output().is_err() {
            return Err("mpirun is not on PATH (Debian: apt-get install openmpi-bin)".into());
        }
        let local = local_window(windows, runs);
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut c = mpirun(2);
        c.arg(&exe).args([
            "bench",
            "mpi",
            "--worker",
            "--windows",
            &windows.to_string(),
            "--runs",
            &runs.to_string(),
        ]);
        let o = c
            .output()
            .map_err(|e| format!("cannot start mpirun: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "{c:?} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim_end()
            ));
        }
        let line = String::from_utf8_lossy(&o.stdout);
        let f: Vec<f64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let [window, exchange, sum] = f[..] else {
            return Err(format!("the MPI ranks reported {line:?}"));
        };
        let dir = std::env::temp_dir().join(format!("kvmsim-bench-mpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cfg = dir.join("netpong.toml");
        // Two netpong systems on a 100 us link, host time counted as
        // simulated time (host_factor 1): a round trip is two windows at
        // least, so the window's cost shows.
        let text = format!(
            "[sim]\nquantum = \"100us\"\n\
             [[system]]\nmemory = \"32MiB\"\nkernel = \"builtin:netpong\"\nplatform = \"pc\"\n\
             args = [0, {rounds}, 1000]\nserial = {{ stdout = false, stdin = false }}\n\
             [[system]]\nmemory = \"32MiB\"\nkernel = \"builtin:netpong\"\nplatform = \"pc\"\n\
             args = [1, {rounds}, 1000]\nserial = {{ stdout = false, stdin = false }}\n\
             [[link]]\nkind = \"ethernet\"\nsystems = [0, 1]\nlatency = \"100us\"\n\
             bandwidth = \"1Gbit/s\"\n"
        );
        std::fs::write(&cfg, text).map_err(|e| format!("{}: {e}", cfg.display()))?;
        let mut best = [f64::INFINITY; 2];
        let mut sims = [0.0; 2];
        for _ in 0..runs.max(1) {
            for (k, ranks) in [1usize, 2].into_iter().enumerate() {
                let (sim, host) = run(&cfg, &dir.join(format!("out{ranks}")), ranks)?;
                if host < best[k] {
                    best[k] = host;
                    sims[k] = sim;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let us = 1e6;
        println!(
            "window, 2 threads of one process (SpinBarrier):   {:>9.2} us",
            local * us
        );
        println!(
            "window, 2 MPI ranks (exchange + sum):            {:>9.2} us ({:.1}x)",
            window * us,
            window / local
        );
        println!(
            "  exchange alone (Alltoall + Alltoallv, 64 B):   {:>9.2} us",
            exchange * us
        );
        println!(
            "  sum alone (Allreduce of 6 values):             {:>9.2} us",
            sum * us
        );
        let rate = |k: usize| sims[k] / best[k];
        println!(
            "netpong, {rounds} round trips ({:.6} s simulated): 1 process {:.3} s host, 2 ranks \
             {:.3} s host",
            sims[0], best[0], best[1]
        );
        println!(
            "simulated time per host second: 1 process {:.6}, 2 ranks {:.6} ({:.2}x)",
            rate(0),
            rate(1),
            rate(1) / rate(0)
        );
        println!(
            "(best of {runs}; host: {} cores, load {})",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(())
    }
}
