//! Distributed runs over MPI (the `mpi` feature): a config's systems on
//! two ranks of `mpirun` give the same frames at the same ticks, the same
//! guest output and the same final statistics as the run in one process.
//!
//! Built without the feature, these tests check that a multi-process
//! launch is refused. With it (`cargo test -p kvmsim --features mpi --test
//! mpi`, which .ci/run runs), they need `mpirun` (Debian's openmpi-bin):
//! without it they are skipped, or fail with KVMSIM_REQUIRE_MPI=1.

mod common;

use common::*;

/// examples/netpong.toml with host time worth nothing (simulated time comes
/// from the devices and the link only: the run is exactly reproducible),
/// `rounds` round trips of `len`-byte frames.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn netpong_config(rounds: u64, len: u64) -> String {
    std::fs::read_to_string(repo().join("examples/netpong.toml"))
        .unwrap()
        .replace(
            "platform = \"pc\"",
            "platform = \"pc\"\ncpu = { host_factor = 1e-12 }\nserial = { stdout = false }",
        )
        .replace(
            "args = [0, 10, 60]",
            &format!("args = [0, {rounds}, {len}]"),
        )
        .replace(
            "args = [1, 10, 60]",
            &format!("args = [1, {rounds}, {len}]"),
        )
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_be_one_of_several_mpi_processes() {
    let (dir, cfg) = config("mpi-refused", &netpong_config(1, 60));
    let r = kvmsim_env(
        &["run", &cfg],
        &dir.join("out"),
        &[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1")],
    );
    assert_eq!(r.no_panic().status, 254, "stderr:\n{}", r.stderr);
    assert!(
        r.stderr.contains("built without MPI") && r.stderr.contains("--features mpi"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("out").exists(), "nothing is written");
    if std::env::var("KVMSIM_REQUIRE_MPI").as_deref() == Ok("1") {
        eprintln!(
            "KVMSIM_REQUIRE_MPI=1: the distributed tests run in the build with the mpi feature \
             (cargo test -p kvmsim --features mpi --test mpi)"
        );
    }
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::*;
    use std::process::Command;

    /// The last block of stats.txt without what depends on the host.
    fn final_stats(r: &Run) -> Vec<String> {
        let text = r.file("stats.txt");
        let last = text
            .rsplit("---------- Begin Simulation Statistics ----------")
            .next()
            .unwrap();
        last.lines()
            .filter(|l| {
                let name = l.split_whitespace().next().unwrap_or("");
                !name.starts_with("host")
                    && !name.ends_with("Seconds")
                    && !name.ends_with("PerHostSecond")
                    && !name.ends_with("Rate")
            })
            .map(str::to_string)
            .collect()
    }

    /// Both runs wrote the same `files`, byte for byte, and the same final
    /// statistics and exits.
    fn same(one: &Run, two: &Run, files: &[&str]) {
        for f in files {
            let (a, b) = (
                std::fs::read(one.out.join(f)).unwrap(),
                std::fs::read(two.out.join(f)).unwrap(),
            );
            assert!(!a.is_empty(), "{f} is empty");
            assert!(a == b, "{f} differs between one process and two ranks");
        }
        assert_eq!(final_stats(one), final_stats(two));
        let exits = |r: &Run| r.json("exit.json")["systems"].clone();
        assert_eq!(exits(one), exits(two));
    }

    #[test]
    #[cfg_attr(
        kvmsim_no_kvm,
        ignore = "needs KVM, which was not usable when this test was built"
    )]
    fn two_ranks_carry_the_same_frames_at_the_same_ticks_as_one_process() {
        if !kvm_or_skip("mpi_netpong") || !mpirun_or_skip("mpi_netpong") {
            return;
        }
        let (dir, cfg) = config("mpi-netpong", &netpong_config(5, 1000));
        let one = kvmsim(&["run", &cfg], &dir.join("one"));
        assert_eq!(one.no_panic().status, 0, "stderr:\n{}", one.stderr);
        let two = mpirun(2, &["run", &cfg], &dir.join("two"));
        assert_eq!(two.no_panic().status, 0, "stderr:\n{}", two.stderr);
        // Really two processes, one system each (round-robin).
        assert!(
            two.stderr.contains("rank 0 of 2 runs system0 ")
                && two.stderr.contains("rank 1 of 2 runs system1 "),
            "{}",
            two.stderr
        );
        same(
            &one,
            &two,
            &["link0.pcap", "serial.system0.log", "serial.system1.log"],
        );
        // 5 round trips: 10 frames crossed the ranks.
        assert!(one.file("serial.system0.log").contains("rtt_sum_ns="));
        assert_eq!(
            final_stats(&two)
                .iter()
                .filter(|l| l.starts_with("link0.frames0to1 ") || l.starts_with("link0.frames1to0 "))
                .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
                .sum::<u64>(),
            10
        );
    }

    #[test]
    #[cfg_attr(
        kvmsim_no_kvm,
        ignore = "needs KVM, which was not usable when this test was built"
    )]
    fn a_switch_on_the_other_rank_forwards_and_drops_as_in_one_process() {
        if !kvm_or_skip("mpi_switch") || !mpirun_or_skip("mpi_switch") {
            return;
        }
        // The switch lives with system0 (its lowest system), placed on rank
        // 1; the blaster's frames and the sinks' on rank 0 cross to it and
        // back.
        let text = std::fs::read_to_string(repo().join("examples/switch.toml"))
            .unwrap()
            .replace(
                "platform = \"pc\"",
                "platform = \"pc\"\ncpu = { host_factor = 1e-12 }\nserial = { stdout = false }",
            )
            .replacen("args = [2, 10, 1514]", "args = [2, 10, 1514]\nrank = 1", 1)
            .replacen("args = [3, 4, 1514]", "args = [3, 4, 1514]\nrank = 0", 1);
        let (dir, cfg) = config("mpi-switch", &text);
        let one = kvmsim(&["run", &cfg], &dir.join("one"));
        assert_eq!(one.no_panic().status, 0, "stderr:\n{}", one.stderr);
        let two = mpirun(2, &["run", &cfg], &dir.join("two"));
        assert_eq!(two.no_panic().status, 0, "stderr:\n{}", two.stderr);
        assert!(
            two.stderr.contains("rank 1 of 2 runs system0 ")
                && two.stderr.contains("rank 0 of 2 runs system1, system2 "),
            "{}",
            two.stderr
        );
        same(
            &one,
            &two,
            &[
                "sw0.port0.pcap",
                "sw0.port1.pcap",
                "sw0.port2.pcap",
                "serial.system0.log",
                "serial.system1.log",
                "serial.system2.log",
            ],
        );
        assert!(final_stats(&two)
            .iter()
            .any(|l| l.starts_with("sw0.port1.droppedFrames ") && l.contains(" 6 ")));
    }

    #[test]
    fn an_srun_without_pmi_is_refused_instead_of_running_the_config_twice() {
        if !mpirun_or_skip("mpi_no_pmi") {
            return;
        }
        // What each of `srun -n 2` without PMI's processes sees: Slurm's
        // task count, and MPI's world of one (a singleton).
        let (dir, cfg) = config("mpi-no-pmi", &netpong_config(1, 60));
        let r = kvmsim_env(
            &["run", &cfg],
            &dir.join("out"),
            &[
                ("SLURM_NTASKS", "2"),
                ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
                ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
            ],
        );
        assert_eq!(r.no_panic().status, 254, "stderr:\n{}", r.stderr);
        assert!(
            r.stderr
                .contains("Slurm started 2 tasks, but MPI sees a world of 1 process")
                && r.stderr.contains("srun --mpi=pmix"),
            "{}",
            r.stderr
        );
        assert!(!dir.join("out").exists(), "nothing is written");
    }

    /// examples/mpi.slurm's command line, run here: `srun` is a stand-in
    /// that starts the same command under `mpirun -np $SLURM_NTASKS` (no
    /// Slurm on this machine).
    #[test]
    #[cfg_attr(
        kvmsim_no_kvm,
        ignore = "needs KVM, which was not usable when this test was built"
    )]
    fn the_slurm_job_script_runs_netpong_on_two_ranks() {
        if !kvm_or_skip("mpi_slurm") || !mpirun_or_skip("mpi_slurm") {
            return;
        }
        let script = repo().join("examples/mpi.slurm");
        let text = std::fs::read_to_string(&script).unwrap();
        for line in ["#SBATCH --ntasks=2", "#SBATCH --nodes=2", "srun --mpi=pmix"] {
            assert!(
                text.contains(line),
                "{line} missing from examples/mpi.slurm"
            );
        }
        let (dir, cfg) = config("mpi-slurm", &netpong_config(2, 60));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let srun = bin.join("srun");
        std::fs::write(
            &srun,
            "#!/bin/sh\n# srun --mpi=X --cpu-bind=Y CMD...: CMD under mpirun\n\
             while [ \"${1#--}\" != \"$1\" ]; do shift; done\n\
             exec mpirun -np \"$SLURM_NTASKS\" --oversubscribe --bind-to none \
             --mca mpi_yield_when_idle 1 \"$@\"\n",
        )
        .unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&srun)
            .status()
            .unwrap();
        let out = dir.join("out");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let o = Command::new("bash")
            .arg(&script)
            .env("PATH", path)
            .env("SLURM_JOB_ID", "7")
            .env("SLURM_NTASKS", "2")
            .env("KVMSIM", env!("CARGO_BIN_EXE_kvmsim"))
            .env("CONFIG", &cfg)
            .env("OUTDIR", &out)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert!(stderr.contains("rank 1 of 2 runs system1 "), "{stderr}");
        let exit: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("exit.json")).unwrap()).unwrap();
        assert_eq!(exit["status"], 0);
        assert!(std::fs::read_to_string(out.join("serial.system1.log"))
            .unwrap()
            .contains("netpong"));
    }

    #[test]
    fn a_placement_on_a_missing_rank_is_refused_by_every_rank() {
        if !mpirun_or_skip("mpi_placement") {
            return;
        }
        let text =
            netpong_config(1, 60).replacen("args = [1, 1, 60]", "args = [1, 1, 60]\nrank = 2", 1);
        let (dir, cfg) = config("mpi-placement", &text);
        let r = mpirun(2, &["run", &cfg], &dir.join("out"));
        assert_ne!(r.status, 0);
        assert!(
            r.stderr
                .contains("config.toml: system[1].rank = 2: the run has 2 processes"),
            "{}",
            r.stderr
        );
        assert!(!dir.join("out").exists(), "nothing is written");
    }
}
