//! The MPI transport of a distributed run (the `mpi` feature): one
//! simulation's systems spread over the ranks of `mpirun -np N` or `srun`
//! ([`platform::distributed`] does the rest).

use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// Exchanges and sums so far, and the host time spent in them.
    calls: u64,
    spent: Duration,
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
                calls: 0,
                spent: Duration::ZERO,
            }),
            rank,
            size,
            _universe: universe,
        })
    }

    /// Collective calls made so far, and the host time spent in them.
    pub fn spent(&self) -> (u64, Duration) {
        let b = self.world.lock().unwrap_or_else(|p| p.into_inner());
        (b.calls, b.spent)
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
        let start = Instant::now();
        let n = self.size;
        // The counts first.
        let send_counts: Vec<i32> = (0..n)
            .map(|r| count(to.get(r).map_or(0, Vec::len)))
            .collect();
        let mut recv_counts = vec![0i32; n];
        b.comm.all_to_all_into(&send_counts[..], &mut recv_counts[..]);
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
        let out = (0..n)
            .map(|r| {
                let (d, c) = (recv_displs[r] as usize, recv_counts[r] as usize);
                b.recv[d..d + c].to_vec()
            })
            .collect();
        b.calls += 1;
        b.spent += start.elapsed();
        out
    }

    fn sum(&self, v: &mut [u64]) {
        let mut g = self.world.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        // Never empty (see Buffers).
        let mut send = v.to_vec();
        send.push(0);
        let mut recv = vec![0u64; send.len()];
        g.comm
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        v.copy_from_slice(&recv[..v.len()]);
        g.calls += 1;
        g.spent += start.elapsed();
    }
}
