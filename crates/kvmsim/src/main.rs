//! kvmsim: run a guest on a KVM CPU inside a discrete-event simulator.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use platform::units::{Duration, Size};
use platform::{status, Config, OutDir, PlatformError, Simulation};
use sim::tick::ticks_to_seconds;

mod bench;
#[cfg(feature = "mpi")]
mod mpi;
mod sweep;

#[derive(Parser)]
#[command(
    name = "kvmsim",
    version,
    about = "A full-system simulator whose CPU runs guest code natively through KVM, in simulated time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a simulation from a config file, or from --kernel.
    Run(Box<RunArgs>),
    /// Syscall emulation: run an x86-64 Linux program (static or dynamically
    /// linked) at CPL3 with its system calls serviced by kvmsim, in
    /// simulated time.
    Se(Box<SeArgs>),
    /// List the built-in guests, or write them out as ELF files.
    Guests {
        /// Write every built-in guest to DIR/NAME.elf.
        #[arg(long, value_name = "DIR")]
        extract: Option<PathBuf>,
    },
    /// Probe what this host's KVM can do, and what kvmsim adds or repairs.
    Doctor {
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: kvmsim against native code and bare KVM loops, side by
    /// side in one run; without a subcommand every figure, into bench.json.
    Bench(BenchArgs),
    /// Checkpoints (folders holding a whole simulated machine).
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Run a parameter grid (SWEEP.toml): one `kvmsim run` per point,
    /// each into OUTDIR/run-NNN, locally or as a Slurm array job.
    Sweep(sweep::SweepArgs),
    /// Gather the run folders under DIR... (parameters, exit and final
    /// statistics) into one CSV table.
    Collect(sweep::CollectArgs),
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Print what a checkpoint folder holds: format version, simulated
    /// time, systems, CPUs, devices, RAM size and bytes on disk.
    Info {
        /// The checkpoint folder.
        dir: PathBuf,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// The config file (TOML). Without it, --kernel is required.
    config: Option<PathBuf>,
    /// The guest image: a static x86-64 ELF, or builtin:NAME (overrides the config).
    #[arg(long)]
    kernel: Option<String>,
    /// Guest RAM, e.g. 128MiB (overrides the config).
    #[arg(long)]
    memory: Option<String>,
    /// CPUs per system (overrides the config's system.cpus).
    #[arg(long)]
    cpus: Option<u32>,
    /// An initramfs for a Linux kernel (overrides the config).
    #[arg(long)]
    initrd: Option<String>,
    /// Text appended to the Linux command line (overrides the config).
    #[arg(long)]
    append: Option<String>,
    /// A raw disk image the guest may write, as a virtio block device
    /// (/dev/vda, then /dev/vdb, ...; repeat for more; replaces the
    /// config's disks).
    #[arg(long = "disk", value_name = "PATH")]
    disks: Vec<String>,
    /// Boot argument passed in RDI, RSI, ... (repeat for more; overrides the config).
    #[arg(long = "arg", value_name = "N")]
    args: Vec<u64>,
    /// Stop after this much simulated time, e.g. 10s (overrides the config).
    #[arg(long)]
    max_time: Option<String>,
    /// The output folder.
    #[arg(long, default_value = "kvmsim-out")]
    outdir: PathBuf,
    /// Do not echo the guest's console to stdout (it still goes to serial.log).
    #[arg(long)]
    quiet: bool,
    /// Never read stdin: the guest's console gets no input (overrides the
    /// config's system.serial.stdin). For runs inside a shell loop that
    /// reads the same stdin.
    #[arg(long)]
    no_stdin: bool,
    /// At the end, print the full vCPU state (also written to cpu-dump.txt).
    #[arg(long)]
    dump_on_exit: bool,
    /// Trace N instructions into trace.txt, from simulated time TIME on
    /// (N or N@TIME, e.g. 5000@120s; overrides the config).
    #[arg(long, value_name = "N[@TIME]")]
    trace: Option<String>,
    /// Take a checkpoint at this simulated time, into OUTDIR/cpt.TICK
    /// (overrides the config's sim.checkpoint_at).
    #[arg(long, value_name = "TIME")]
    checkpoint_at: Option<String>,
    /// End the run once a checkpoint is taken (sim.checkpoint_exit).
    #[arg(long)]
    checkpoint_exit: bool,
    /// Simulated time per host time spent inside KVM, for every CPU
    /// (overrides the config's system.cpu.host_factor; also after
    /// --restore, see README "Checkpoints").
    #[arg(long, value_name = "FACTOR")]
    host_factor: Option<f64>,
    /// The host file the guest reads with the readfile sim-op (gem5's
    /// `m5 readfile`; overrides the config's system.readfile). With
    /// --restore, each restore of a checkpoint can run its own script.
    #[arg(long, value_name = "PATH")]
    readfile: Option<String>,
    /// Restore the checkpoint in DIR and run on from its simulated time.
    /// The config comes from the checkpoint; --max-time, --outdir,
    /// --quiet, --no-stdin, --readfile and the checkpoint flags may change
    /// it.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "kernel", "memory", "cpus", "initrd", "append", "disks", "args", "trace", "pc_events"])]
    restore: Option<PathBuf>,
    /// Debug the guest with GDB: serve the remote protocol on HOST:PORT
    /// (port 0: a free one, printed) and wait for GDB before the first
    /// guest instruction (overrides the config's sim.gdb).
    #[arg(long, value_name = "HOST:PORT")]
    gdb: Option<String>,
    /// A PC event, as `[[system.cpu.pc_event]]` (repeat for more; added to
    /// every system's, after the config's): AT is an address (0x... or
    /// decimal) or a symbol, ACTION one of dump_stats, reset_stats,
    /// dump_reset_stats, exit, checkpoint, count; NAME the event's name in
    /// the statistics (default AT).
    #[arg(long = "pc-event", value_name = "AT:ACTION[:NAME]")]
    pc_events: Vec<String>,
}

/// `kvmsim se`.
#[derive(Args)]
struct SeArgs {
    /// A config file whose system has platform = "se" (PROGRAM and ARGS,
    /// if given, replace its program and arguments).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Guest RAM for the process (default 512MiB).
    #[arg(long)]
    memory: Option<String>,
    /// An environment variable for the program, KEY=VALUE (repeat for
    /// more; the environment is otherwise empty).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Simulated time every system call costs (default 1us).
    #[arg(long, value_name = "TIME")]
    syscall_latency: Option<String>,
    /// Seed of AT_RANDOM and getrandom (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// CPUs of the process, one per thread: at most this many threads
    /// exist at once (se.cpus; default 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// A folder holding the target's root file system: a dynamically
    /// linked program's interpreter comes from it, and so does every
    /// absolute path the program names that exists in it (overrides
    /// se.sysroot).
    #[arg(long, value_name = "DIR")]
    sysroot: Option<String>,
    /// Open the program's paths under GUEST (a folder or file) from HOST
    /// instead (gem5's --redirects; repeat for more; the longest GUEST wins).
    #[arg(long = "redirect", value_name = "GUEST=HOST")]
    redirect: Vec<String>,
    /// With several CPUs: how far apart in simulated time their threads may
    /// run before they meet (sim.quantum; default 100us), e.g. 1ms. Longer
    /// windows cost fewer forced exits; a futex wake or signal from another
    /// thread may arrive up to one window late.
    #[arg(long)]
    quantum: Option<String>,
    /// Stop after this much simulated time, e.g. 10s.
    #[arg(long)]
    max_time: Option<String>,
    /// The output folder (stdout.txt, stderr.txt, stats.txt, ...).
    #[arg(long, default_value = "kvmsim-out")]
    outdir: PathBuf,
    /// Do not echo the program's stdout and stderr (they still go to
    /// stdout.txt and stderr.txt in the output folder).
    #[arg(long)]
    quiet: bool,
    /// The program reads nothing from stdin (end of file at once).
    #[arg(long)]
    no_stdin: bool,
    /// At the end, print the full vCPU state (also written to cpu-dump.txt).
    #[arg(long)]
    dump_on_exit: bool,
    /// The program: an x86-64 Linux ELF, static or dynamically linked.
    program: Option<String>,
    /// Its arguments (argv[1..]).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// The config of `kvmsim se`.
fn se_config(a: &SeArgs) -> Result<Config, PlatformError> {
    let cli = Path::new("command line");
    let bad = |field: &str, value: &str, message: String| platform::ConfigError::Invalid {
        path: cli.into(),
        field: field.into(),
        value: value.into(),
        message,
    };
    let mut cfg = match (&a.config, &a.program) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(p)) => {
            let mut c = Config::for_kernel(p);
            for s in &mut c.system {
                s.platform = "se".into();
                s.memory = Size(512 << 20);
            }
            c
        }
        (None, None) => {
            return Err(PlatformError::Setup(
                "nothing to run: kvmsim se PROGRAM [ARGS...] (or --config FILE)".into(),
            ))
        }
    };
    for e in &a.env {
        if !e.contains('=') {
            return Err(bad("--env", e, "an environment entry is KEY=VALUE".into()).into());
        }
    }
    let latency = a
        .syscall_latency
        .as_deref()
        .map(|t| {
            platform::units::parse_duration(t)
                .map(Duration)
                .map_err(|e| bad("--syscall-latency", t, e))
        })
        .transpose()?;
    if let Some(t) = &a.max_time {
        cfg.sim.max_time = Some(Duration(
            platform::units::parse_duration(t).map_err(|e| bad("--max-time", t, e))?,
        ));
    }
    if let Some(t) = &a.quantum {
        let q = platform::units::parse_duration(t).map_err(|e| bad("--quantum", t, e))?;
        if q == 0 {
            return Err(bad("--quantum", t, "the quantum must be longer than 0".into()).into());
        }
        cfg.sim.quantum = Some(Duration(q));
    }
    for s in &mut cfg.system {
        if let Some(p) = &a.program {
            s.kernel = p.clone();
        }
        if let Some(m) = &a.memory {
            s.memory = Size(platform::units::parse_size(m).map_err(|e| bad("--memory", m, e))?);
        }
        let se = s.se.get_or_insert_with(Default::default);
        if a.program.is_some() {
            se.args = a.args.clone();
        }
        se.env.extend(a.env.iter().cloned());
        if let Some(l) = latency {
            se.syscall_latency = l;
        }
        if let Some(seed) = a.seed {
            se.seed = seed;
        }
        if let Some(n) = a.cpus {
            se.cpus = Some(n);
            s.cpus = n;
        }
        if let Some(r) = &a.sysroot {
            se.sysroot = Some(r.clone());
        }
        se.redirects.extend(a.redirect.iter().cloned());
        if a.quiet {
            s.serial.stdout = false;
        }
        if a.no_stdin {
            s.serial.stdin = false;
        }
    }
    let source = a.config.as_deref().unwrap_or(cli);
    cfg.apply_se_cpus();
    if cfg.system.iter().any(|s| s.platform != "se") {
        return Err(bad(
            "platform",
            "not \"se\"",
            format!("{}: kvmsim se needs platform = \"se\"", source.display()),
        )
        .into());
    }
    cfg.validate(source)?;
    if let Some(host) = platform::config::HostMemory::probe() {
        if let Some(warning) = cfg.check_host_memory(&host, source)? {
            tracing::warn!("{warning}");
        }
    }
    Ok(cfg)
}

fn se_cmd(a: SeArgs) -> i32 {
    platform::console::install_interrupt_handler();
    let cfg = match se_config(&a) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    execute(
        cfg,
        None,
        &a.outdir,
        a.config.as_deref(),
        None,
        a.dump_on_exit,
        None,
    )
}

/// `kvmsim bench`: every figure, or one of them.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    /// One figure alone (its row of the table; bench.json is not written).
    #[command(subcommand)]
    only: Option<Bench>,
    /// Runs of each side of each figure, interleaved (the best is reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Multiplies every figure's work (iterations, reads, forced exits);
    /// e.g. 0.1 for a quick look.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The folder bench.json is written to.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Bench {
    /// Aggregate guest throughput of 2 independent systems (one thread
    /// each) as a ratio to 1 system, side by side.
    Parallel {
        /// Loop iterations per system.
        #[arg(long, default_value_t = 1_000_000_000)]
        iterations: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Aggregate ring-3 throughput of 2 CPUs of one system (smpboot) as a
    /// ratio to 1 CPU, side by side.
    Smp {
        /// Loop iterations per CPU.
        #[arg(long, default_value_t = 1_000_000_000)]
        iterations: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// sim.quantum of both sides, e.g. 1ms [default: 1ms, or 100 times
        /// this host's forced-exit cost (kvmsim doctor) if more]
        #[arg(long, value_parser = parse_quantum)]
        quantum: Option<Duration>,
    },
    /// Cost of one window's barrier (two threads): kvmsim's spin-then-park
    /// barrier against std::sync::Barrier, side by side.
    Window {
        /// Windows (each two barrier waits per thread).
        #[arg(long, default_value_t = 20_000)]
        windows: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Cost of one forced exit (timer kick + interrupt) in kvmsim against a
    /// bare KVM run loop doing the same, side by side.
    Kick {
        /// Timer period in simulated (and host) microseconds.
        #[arg(long, default_value_t = 100)]
        period_us: u64,
        /// Forced exits (interrupts the guest waits for).
        #[arg(long, default_value_t = 2_000)]
        exits: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// The `compute` guest's loop, natively and inside kvmsim, side by side.
    Compute {
        /// Loop iterations.
        #[arg(long, default_value_t = 1_000_000_000)]
        iterations: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Port reads at CPL0: kvmsim against a bare KVM loop, side by side.
    Pio {
        /// Port reads.
        #[arg(long, default_value_t = 20_000)]
        reads: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// A distributed run's window between 2 MPI ranks (exchange + sum)
    /// against the window of 2 threads of one process, and the simulated
    /// time per host second of a 2-rank run against one process (the
    /// `mpi` feature; starts `mpirun -np 2` itself).
    #[cfg(feature = "mpi")]
    Mpi {
        /// Windows timed.
        #[arg(long, default_value_t = 20_000)]
        windows: u64,
        /// Round trips of the netpong pair whose throughput is compared.
        #[arg(long, default_value_t = 200)]
        rounds: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// One rank of the window measurement (started by the figure).
        #[arg(long, hide = true)]
        worker: bool,
    },
    /// Restore latency: reading a checkpoint to the first guest
    /// instruction, and the checkpoint's size on disk.
    Restore {
        /// The checkpoint (default: one of the ckpt guest with 128 MiB of
        /// RAM, taken first).
        #[arg(long, value_name = "DIR")]
        checkpoint: Option<PathBuf>,
        /// Restores (the best is reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// A static Linux program's compute loop in SE mode against the same
    /// file run natively, side by side.
    SeCompute {
        /// Loop iterations.
        #[arg(long, default_value_t = 1_000_000_000)]
        iterations: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// One system call (getppid) in SE mode against the same call made
    /// natively, side by side (the ratio is reported; there is no goal).
    SeSyscall {
        /// System calls.
        #[arg(long, default_value_t = 20_000)]
        calls: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// MMIO reads at CPL0: kvmsim against a bare KVM loop, side by side.
    Mmio {
        /// MMIO reads.
        #[arg(long, default_value_t = 20_000)]
        reads: u64,
        /// Repetitions of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
}

/// `N` or `N@TIME`: a trace of N instructions from TIME (default 0) on.
fn parse_trace(t: &str) -> Result<platform::config::TraceConfig, String> {
    let (n, from) = t.split_once('@').unwrap_or((t, "0s"));
    let insts = n
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("{n:?} is not an instruction count"))?;
    let from = Duration(platform::units::parse_duration(from.trim())?);
    Ok(platform::config::TraceConfig { from, insts })
}

/// A `--pc-event AT:ACTION[:NAME]` value.
fn parse_pc_event(v: &str) -> Result<platform::config::PcEventConfig, String> {
    use platform::config::{PcAction, PcAddr, PcEventConfig};
    let parts: Vec<&str> = v.split(':').collect();
    let (at, action, name) = match parts.as_slice() {
        [at, action] => (*at, *action, None),
        [at, action, name] => (*at, *action, Some(*name)),
        _ => return Err("expected AT:ACTION or AT:ACTION:NAME".into()),
    };
    if at.is_empty() || at.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{at:?} is not an address (0x... or decimal) or a symbol name"
        ));
    }
    let at = match at.parse::<u64>() {
        Ok(n) => PcAddr::Number(n),
        Err(_) => PcAddr::Text(at.to_string()),
    };
    at.literal()?;
    let action: PcAction = serde_json::from_value(serde_json::Value::String(action.into()))
        .map_err(|_| {
            format!(
                "{action:?} is not an action (dump_stats, reset_stats, dump_reset_stats, exit, \
                 checkpoint, count)"
            )
        })?;
    if let Some(n) = name {
        if n.is_empty() || n.len() > 200 || n.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "the name {n:?} must be 1 to 200 characters without spaces (it becomes a \
                 statistic's name)"
            ));
        }
    }
    Ok(PcEventConfig {
        at,
        action,
        name: name.map(String::from),
        address: None,
    })
}

fn main() -> ExitCode {
    // Test builds only: FAILPOINTS arms fault injection (tests/failpoints.rs).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // Usage errors are kvmsim errors (254, as the README says); --help
    // and --version succeed.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                status::SIM_ERROR as u8
            } else {
                0
            });
        }
    };
    // The bench builds many systems: their start-up notes would bury the table.
    let default_level = if matches!(cli.command, Command::Bench(_)) {
        "warn"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVMSIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour codes only on a terminal: a log captured in a file or a pipe
    // stays plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let code = match cli.command {
        Command::Run(args) => run(*args),
        Command::Se(args) => se_cmd(*args),
        Command::Guests { extract } => guests_cmd(extract),
        Command::Doctor { json } => doctor(json),
        Command::Bench(b) => match bench_cmd(b) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        Command::Checkpoint(CheckpointCmd::Info { dir, json }) => checkpoint_info(&dir, json),
        Command::Sweep(a) => sweep::sweep_cmd(a),
        Command::Collect(a) => sweep::collect_cmd(a),
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

/// `kvmsim checkpoint info DIR`.
fn checkpoint_info(dir: &Path, json: bool) -> i32 {
    let info = match ckpt::info(dir) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    if json {
        match serde_json::to_string_pretty(&info) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(e),
        }
        return 0;
    }
    println!("checkpoint {}", dir.display());
    println!("  format version  {}", info.format_version);
    println!("  written by      kvmsim {}", info.kvmsim_version);
    println!(
        "  simulated time  {} ticks ({:.9} s)",
        info.tick,
        ticks_to_seconds(info.tick)
    );
    println!("  state file      {} bytes", info.state_bytes);
    let total: u64 = info.systems.iter().map(|s| s.ram_bytes).sum();
    let disk: u64 = info.systems.iter().map(|s| s.ram_bytes_on_disk).sum();
    println!(
        "  systems         {} ({} CPUs, RAM {} bytes, {} bytes on disk)",
        info.systems.len(),
        info.systems.iter().map(|s| s.cpus).sum::<usize>(),
        total,
        disk
    );
    for s in &info.systems {
        println!(
            "  {}: {} CPUs ({} halted), {} devices, RAM {} bytes in {} ({} bytes on disk)",
            s.name, s.cpus, s.halted_cpus, s.devices, s.ram_bytes, s.ram_file, s.ram_bytes_on_disk
        );
        for d in &s.disks {
            let saved = match &d.saved_file {
                Some(f) => format!(
                    "; written sectors {} bytes in {f} ({} bytes on disk)",
                    d.saved_bytes, d.saved_bytes_on_disk
                ),
                None if d.mode == "writable" => "; contents not saved (writable image)".into(),
                None => String::new(),
            };
            println!(
                "    {}.{}: {}, image {} ({} bytes){saved}",
                s.name, d.name, d.mode, d.image, d.image_bytes
            );
        }
    }
    0
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("kvmsim: error: {msg}");
    status::SIM_ERROR
}

/// Builds the config from the file (or the checkpoint) and the flags.
fn make_config(
    a: &RunArgs,
) -> Result<(Config, Option<platform::simulation::Checkpoint>), PlatformError> {
    let cli = Path::new("command line");
    let restore = a
        .restore
        .as_deref()
        .map(platform::simulation::Checkpoint::read)
        .transpose()?;
    let mut cfg = match (&restore, &a.config, &a.kernel) {
        (Some(c), _, _) => c.config.clone(),
        (None, Some(path), _) => Config::load(path)?,
        (None, None, Some(k)) => Config::for_kernel(k),
        (None, None, None) => {
            return Err(PlatformError::Setup(
                "nothing to run: give a config file (kvmsim run CONFIG.toml) or --kernel FILE"
                    .into(),
            ))
        }
    };
    let bad = |field: &str, value: &str, message: String| platform::ConfigError::Invalid {
        path: cli.into(),
        field: field.into(),
        value: value.into(),
        message,
    };
    // Flags apply to every system of the config.
    if let Some(k) = &a.kernel {
        cfg.system.iter_mut().for_each(|s| s.kernel = k.clone());
    }
    if let Some(m) = &a.memory {
        let size = Size(platform::units::parse_size(m).map_err(|e| bad("--memory", m, e))?);
        cfg.system.iter_mut().for_each(|s| s.memory = size);
    }
    if let Some(n) = a.cpus {
        cfg.system.iter_mut().for_each(|s| s.cpus = n);
    }
    if let Some(t) = &a.max_time {
        cfg.sim.max_time = Some(Duration(
            platform::units::parse_duration(t).map_err(|e| bad("--max-time", t, e))?,
        ));
    }
    if let Some(t) = &a.checkpoint_at {
        cfg.sim.checkpoint_at = Some(Duration(
            platform::units::parse_duration(t).map_err(|e| bad("--checkpoint-at", t, e))?,
        ));
    }
    if a.checkpoint_exit {
        cfg.sim.checkpoint_exit = true;
    }
    if let Some(g) = &a.gdb {
        cfg.sim.gdb = Some(g.clone());
    }
    let pc_events = a
        .pc_events
        .iter()
        .map(|v| parse_pc_event(v).map_err(|e| bad("--pc-event", v, e)))
        .collect::<Result<Vec<_>, _>>()?;
    let trace = a
        .trace
        .as_deref()
        .map(|t| parse_trace(t).map_err(|e| bad("--trace", t, e)))
        .transpose()?;
    for s in &mut cfg.system {
        s.cpu.pc_event.extend(pc_events.iter().cloned());
        if trace.is_some() {
            s.cpu.trace = trace.clone();
        }
        if let Some(i) = &a.initrd {
            s.initrd = Some(i.clone());
        }
        if let Some(x) = &a.append {
            s.append = Some(x.clone());
        }
        if !a.disks.is_empty() {
            s.disk = a
                .disks
                .iter()
                .map(|p| platform::config::DiskConfig::writable(p))
                .collect();
        }
        if !a.args.is_empty() {
            s.args = a.args.clone();
        }
        if a.quiet {
            s.serial.stdout = false;
        }
        if a.no_stdin {
            s.serial.stdin = false;
        }
        if let Some(r) = &a.readfile {
            s.readfile = Some(r.clone());
        }
        if let Some(f) = a.host_factor {
            s.cpu.host_factor = Some(f);
        }
    }
    let source = a.restore.as_deref().or(a.config.as_deref()).unwrap_or(cli);
    cfg.validate(source)?;
    if let Some(c) = &restore {
        if let Some(max) = cfg.sim.max_time.filter(|m| m.0 < c.state.tick) {
            return Err(bad(
                "--max-time",
                &format!("{} ticks", max.0),
                format!(
                    "the checkpoint is at tick {}: the limit must not lie before it",
                    c.state.tick
                ),
            )
            .into());
        }
        // A guest that calibrated its TSC against the checkpoint's factor
        // (a Linux kernel: tsc_early_khz) keeps that calibration.
        if a.host_factor.is_some() {
            for (i, (now, then)) in cfg.system.iter().zip(&c.config.system).enumerate() {
                let (now, then) = (
                    now.cpu.resolved_host_factor(),
                    then.cpu.resolved_host_factor(),
                );
                if now != then {
                    tracing::warn!(
                        "system {i}: host_factor {now} after a checkpoint taken at {then}: \
                         simulated time now advances {:.3}x as fast per host second inside KVM, \
                         but the guest's TSC still runs at the host's rate, so a guest that \
                         timed it at boot (Linux's tsc_early_khz) sees its TSC clock run \
                         {:.3}x simulated time",
                        now / then,
                        then / now
                    );
                }
            }
        }
        // A restore maps its RAM from the checkpoint: it needs no more host
        // memory than the pages the guest touches.
        return Ok((cfg, restore));
    }
    if let Some(host) = platform::config::HostMemory::probe() {
        if let Some(warning) = cfg.check_host_memory(&host, source)? {
            tracing::warn!("{warning}");
        }
    }
    Ok((cfg, None))
}

/// The run was interrupted before it started: nothing was written.
fn interrupted_in_setup() -> i32 {
    eprintln!("kvmsim: interrupted during set-up; the output folder was not changed");
    status::USER_INTERRUPT
}

fn run(a: RunArgs) -> i32 {
    // Before anything slow: Ctrl-C and SIGTERM set a flag that set-up
    // checks between its phases (and while it reads images).
    platform::console::install_interrupt_handler();
    // Every input is checked before the output folder is touched.
    let (cfg, restore) = match make_config(&a) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let transport = match join_mpi() {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    if let (Some(_), Some(r)) = (&transport, &a.restore) {
        return fail(format!(
            "--restore {}: a distributed (MPI) run takes and restores no checkpoint; restore it \
             in one process",
            r.display()
        ));
    }
    execute(
        cfg,
        restore.as_ref(),
        &a.outdir,
        a.config.as_deref(),
        a.restore.as_deref(),
        a.dump_on_exit,
        transport,
    )
}

/// The other processes of a distributed run: under mpirun or srun (with
/// PMI) and more than one process, MPI's (the `mpi` feature).
#[cfg(feature = "mpi")]
fn join_mpi() -> Result<Option<std::sync::Arc<dyn platform::distributed::Transport>>, String> {
    if !mpi::launched() {
        return Ok(None);
    }
    let m = mpi::Mpi::init()?;
    if platform::distributed::Transport::size(&m) == 1 {
        return Ok(None);
    }
    Ok(Some(std::sync::Arc::new(m)))
}

/// Without the `mpi` feature: a launch of several MPI processes is refused
/// (each would run the whole config alone).
#[cfg(not(feature = "mpi"))]
fn join_mpi() -> Result<Option<std::sync::Arc<dyn platform::distributed::Transport>>, String> {
    let size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find_map(|v| v.trim().parse::<usize>().ok());
    match size {
        Some(n) if n > 1 => Err(format!(
            "started as one of {n} MPI processes, but this kvmsim was built without MPI: \
             build it with `cargo build --release --features mpi` (needs an MPI library such as \
             Debian's libopenmpi-dev, and libclang) to spread a config's systems over them"
        )),
        _ => Ok(None),
    }
}

/// Runs a checked config (or a restore) into `outdir`: the common part of
/// `kvmsim run` and `kvmsim se`.
fn execute(
    mut cfg: Config,
    restore: Option<&platform::simulation::Checkpoint>,
    outdir: &Path,
    config_file: Option<&Path>,
    restored_from: Option<&Path>,
    dump_on_exit: bool,
    transport: Option<std::sync::Arc<dyn platform::distributed::Transport>>,
) -> i32 {
    let interrupted = platform::console::interrupted;
    let dist = match transport {
        None => None,
        Some(t) => match platform::distributed::Dist::new(t, &cfg) {
            Ok(d) => Some(d),
            Err(e) => {
                return fail(match config_file {
                    Some(f) => format!("{}: {e}", f.display()),
                    None => e.to_string(),
                })
            }
        },
    };
    let rank = dist.as_ref().map_or(0, |d| d.rank());
    if let Some(d) = &dist {
        let mine: Vec<String> = cfg
            .system_names()
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| d.is_local(i))
            .map(|(_, n)| n)
            .collect();
        tracing::info!(
            "distributed run: rank {rank} of {} runs {} (quantum {} ticks)",
            d.size(),
            mine.join(", "),
            cfg.quantum()
        );
    }
    // In a distributed run, every process takes each step only once all
    // did the one before (one failing process stops all).
    let all_ok = |ok: bool| dist.as_ref().is_none_or(|d| d.all_ok(ok));
    if restore.is_none() {
        if let Err(e) = Simulation::check_inputs(&cfg) {
            return fail(e);
        }
    }
    if interrupted() {
        return interrupted_in_setup();
    }
    // Locked for this run; what set-up writes is staged, so a run that
    // fails before it starts leaves an earlier run's results as they were.
    // A distributed run's process 0 holds the folder; the others add
    // their systems' files to it once process 0 has committed.
    let staged = match rank {
        0 => OutDir::stage(outdir),
        r => OutDir::stage_rank(outdir, r),
    };
    let out = match (staged, all_ok(true)) {
        (Ok(o), true) => o,
        (Err(e), _) => {
            all_ok(false);
            return fail(e);
        }
        (Ok(_), false) => {
            return fail("another process of the run could not take the output folder")
        }
    };
    let host_start = Instant::now();
    let built = match (restore, &dist) {
        (None, None) => Simulation::build(&mut cfg, out.clone()),
        (None, Some(d)) => Simulation::build_distributed(&mut cfg, out.clone(), d.clone()),
        (Some(c), _) => Simulation::restore(&mut cfg, out.clone(), c),
    };
    let others = "another process of the run failed during set-up (its error above)";
    let built = match built {
        Ok(s) if all_ok(!interrupted()) => Ok(s),
        Ok(_) if interrupted() => return interrupted_in_setup(),
        Ok(_) => return fail(others),
        Err(e) => {
            all_ok(false);
            Err(e)
        }
    };
    let mut simulation = match built {
        Ok(s) => s,
        Err(_) if interrupted() => return interrupted_in_setup(),
        Err(e) => return fail(e),
    };
    if interrupted() {
        return interrupted_in_setup();
    }
    // The run starts: its files replace the earlier run's (process 0's
    // commit first: it removes them).
    let committed = if rank == 0 { out.commit() } else { Ok(()) };
    if !all_ok(committed.is_ok()) {
        return fail(
            committed
                .err()
                .map_or(others.to_string(), |e| e.to_string()),
        );
    }
    if let Err(e) = out.commit() {
        return fail(e);
    }
    let resolved = serde_json::json!({
        "kvmsim_version": env!("CARGO_PKG_VERSION"),
        "config_file": config_file.map(|p| p.display().to_string()),
        "restored_from": restored_from.map(|p| p.display().to_string()),
        "sim": cfg.sim,
        "system": cfg.system,
        "link": cfg.link,
        "switch": cfg.switch,
    });
    if rank == 0 {
        if let Err(e) = out.write_json("config.json", &resolved) {
            return fail(e);
        }
    }
    let exits = match simulation.run() {
        Ok(e) => e,
        Err(e) => {
            // Keep what the run produced: stats up to now.
            for sys in simulation.systems_mut() {
                let now = sys.cur_tick();
                let _ = sys.dump_stats(now);
            }
            return fail(format!("simulation failed: {e}"));
        }
    };
    let (st, deciding) = Simulation::status(&exits);
    if let Err(e) = simulation.finish(&exits, st) {
        return fail(e);
    }
    let names = simulation.names().to_vec();
    let many = names.len() > 1;
    // Process 0 reports for all.
    let report = if rank == 0 { exits.as_slice() } else { &[] };
    for (name, exit) in names.iter().zip(report) {
        let code = if matches!(
            exit.cause,
            sim::ExitCause::GuestExit | sim::ExitCause::DebugExit | sim::ExitCause::ProcessExit
        ) {
            format!(" (code {})", exit.code)
        } else {
            String::new()
        };
        let who = if many {
            format!("{name} ")
        } else {
            String::new()
        };
        eprintln!(
            "kvmsim: {who}exiting @ tick {} ({:.6} s simulated, {:.3} s host) because {}{}",
            exit.tick,
            ticks_to_seconds(exit.tick),
            host_start.elapsed().as_secs_f64(),
            exit.cause.describe(),
            code
        );
        if !exit.message.is_empty() {
            eprintln!("{}", exit.message.trim_end());
        }
    }
    if let (true, Some(i), 0) = (many, deciding, rank) {
        eprintln!("kvmsim: status {st} comes from {}", names[i]);
    }
    if dump_on_exit {
        let mut all = String::new();
        let local = simulation.local_names();
        for (name, sys) in local.iter().zip(simulation.systems_mut()) {
            all.push_str(&format!("{name}.cpu:\n{}", sys.dump_cpu()));
        }
        let path = out.file(&match rank {
            0 => "cpu-dump.txt".to_string(),
            r => format!("cpu-dump.rank{r}.txt"),
        });
        if let Err(e) = std::fs::write(&path, &all) {
            return fail(format!("cannot write {}: {e}", path.display()));
        }
        eprintln!("kvmsim: CPU state at exit:\n{}", all.trim_end());
    }
    st
}

fn doctor(json: bool) -> i32 {
    let mut rep = kvm::doctor::run();
    if rep.findings.first().is_some_and(|f| f.ok) {
        rep.findings.push(kvm::doctor::window_cost());
        rep.findings.push(kvm::doctor::hypercall());
    }
    if json {
        let findings: Vec<serde_json::Value> = rep
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({"probe": f.name, "ok": f.ok, "detail": f.detail, "consequence": f.consequence})
            })
            .collect();
        let v = serde_json::json!({"findings": findings, "linux_flags": rep.linux_flags});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for f in &rep.findings {
            let mark = if f.ok { "ok  " } else { "NO  " };
            println!("{mark} {:<32} {}", f.name, f.detail);
            if !f.ok && !f.consequence.is_empty() {
                println!("     {:<32} -> {}", "", f.consequence);
            }
        }
        if rep.linux_flags.is_empty() {
            println!("\nLinux needs no extra kernel command-line flags on this host.");
        } else {
            println!(
                "\nkvmsim will add to a Linux command line on this host: {}",
                rep.linux_flags.join(" ")
            );
        }
    }
    if rep
        .findings
        .first()
        .is_some_and(|f| f.name == "kvm" && !f.ok)
    {
        status::SIM_ERROR
    } else {
        0
    }
}

fn guests_cmd(extract: Option<PathBuf>) -> i32 {
    match extract {
        None => {
            let width = guests::GUESTS
                .iter()
                .map(|(n, _)| n.len() + "builtin:".len())
                .max()
                .unwrap_or(0);
            for (name, _) in guests::GUESTS {
                let (about, args) = guests::about(name).map_or(("", "-"), |a| (a.about, a.args));
                println!("{:<width$}  {about}", format!("builtin:{name}"));
                println!("{:<width$}  args: {args}", "");
            }
            println!(
                "\nArguments go in RDI, RSI, RDX, ... (--arg N, repeated, or args = [..]); \
                 0 takes the default in parentheses."
            );
            0
        }
        Some(dir) => {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                return fail(format!("cannot create {}: {e}", dir.display()));
            }
            for (name, elf) in guests::GUESTS {
                let p = dir.join(format!("{name}.elf"));
                if let Err(e) = std::fs::write(&p, elf) {
                    return fail(format!("cannot write {}: {e}", p.display()));
                }
                println!("{}", p.display());
            }
            0
        }
    }
}

/// `kvmsim bench`: every figure, or the one a subcommand names.
fn bench_cmd(b: BenchArgs) -> Result<(), String> {
    let mut w = bench::Work::scaled(b.scale, b.runs)?;
    let figure = match b.only {
        None => return bench::all(&w, &b.out),
        Some(Bench::Compute { iterations, runs }) => {
            (w.compute_iterations, w.runs) = (iterations, runs);
            bench::Figure::Compute
        }
        Some(Bench::Parallel { iterations, runs }) => {
            (w.parallel_iterations, w.runs) = (iterations, runs);
            bench::Figure::Parallel
        }
        Some(Bench::Kick {
            period_us,
            exits,
            runs,
        }) => {
            (w.kick_period_us, w.kick_exits, w.runs) = (period_us, exits, runs);
            bench::Figure::Kick
        }
        Some(Bench::Pio { reads, runs }) => {
            (w.pio_reads, w.runs) = (reads, runs);
            bench::Figure::Pio
        }
        Some(Bench::Smp {
            iterations,
            runs,
            quantum,
        }) => {
            (w.smp_iterations, w.runs) = (iterations, runs);
            w.smp_quantum_ns = quantum.map(|q| q.0 / 1000); // ps to ns
            bench::Figure::Smp
        }
        Some(Bench::Window { windows, runs }) => {
            (w.windows, w.runs) = (windows, runs);
            bench::Figure::Window
        }
        #[cfg(feature = "mpi")]
        Some(Bench::Mpi {
            windows,
            rounds,
            runs,
            worker,
        }) => {
            return if worker {
                mpi::bench::worker(windows, runs)
            } else {
                mpi::bench::driver(windows, rounds, runs)
            };
        }
        Some(Bench::Restore { checkpoint, runs }) => {
            return bench::restore(checkpoint.as_deref(), runs);
        }
        Some(Bench::Mmio { reads, runs }) => {
            (w.mmio_reads, w.runs) = (reads, runs);
            bench::Figure::Mmio
        }
        Some(Bench::SeCompute { iterations, runs }) => {
            (w.se_iterations, w.runs) = (iterations, runs);
            bench::Figure::SeCompute
        }
        Some(Bench::SeSyscall { calls, runs }) => {
            (w.se_calls, w.runs) = (calls, runs);
            bench::Figure::SeSyscall
        }
    };
    w.runs = w.runs.max(1);
    bench::one(figure, &w)
}

/// `--quantum` of `kvmsim bench smp`: a simulated duration above zero.
fn parse_quantum(s: &str) -> Result<Duration, String> {
    match platform::units::parse_duration(s.trim()) {
        Ok(ps) if ps < 1_000_000 => Err("the quantum must be at least 1us".into()),
        Ok(ns) => Ok(Duration(ns)),
        Err(e) => Err(e.to_string()),
    }
}
