//! The run configuration: a TOML file (unknown keys are errors), or the same
//! structure built from command-line flags. After the host has been probed
//! every default is filled in and the result is written as `config.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::{Bandwidth, Duration, Frequency, Size};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Simulation-wide settings.
    #[serde(default)]
    pub sim: SimConfig,
    /// The simulated systems: one `[system]` table or several `[[system]]`.
    #[serde(deserialize_with = "one_or_many")]
    pub system: Vec<SystemConfig>,
    /// Links between systems (`[[link]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<LinkConfig>,
    /// Ethernet switches joining several systems (`[[switch]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub switch: Vec<SwitchConfig>,
}

/// A link between two systems: a mailbox device in each, carrying values
/// with `latency` of simulated time (`kind = "mailbox"`, the default), or
/// an Ethernet wire between a virtio-net NIC in each (`kind =
/// "ethernet"`), carrying frames at `bandwidth` with `latency`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// The two systems, by index in the `[[system]]` list.
    pub systems: [usize; 2],
    /// One-way latency (at least `sim.quantum`, the lookahead).
    pub latency: Duration,
    /// What the link joins.
    #[serde(default)]
    pub kind: LinkKind,
    /// Ethernet: bytes per second each way (default 1 Gbit/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Ethernet: the two NICs' MAC addresses (default: derived from the
    /// system's index and the NIC's, [`default_mac`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macs: Option<[String; 2]>,
    /// Ethernet: write every frame to `link{i}.pcap` in the output
    /// directory, stamped with simulated time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pcap: bool,
}

/// What a link joins.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// A mailbox device in each system (bare-metal guests, 64-bit values).
    #[default]
    Mailbox,
    /// A virtio-net NIC in each system, joined by an Ethernet wire.
    Ethernet,
}

/// Default Ethernet bandwidth: 1 Gbit/s.
pub const DEFAULT_ETHERNET_BANDWIDTH: u64 = 125_000_000;

/// A learning Ethernet switch: one port per system it joins, each port a
/// virtio-net NIC in that system and a cable to the switch with its own
/// latency and bandwidth (both directions), and an output queue at the
/// switch that drops frames when full. Port settings default to the
/// switch's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// The switch's name: its statistics are `{name}.port{p}.*`, its
    /// captures `{name}.port{p}.pcap`.
    pub name: String,
    /// Default one-way latency of a port's cable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Duration>,
    /// Default bandwidth of a port's cable (default 1 Gbit/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Default size of a port's output queue in frames (default
    /// [`DEFAULT_SWITCH_QUEUE_FRAMES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_frames: Option<u32>,
    /// Default size of a port's output queue in bytes (default: no limit
    /// besides the frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_bytes: Option<Size>,
    /// How long a learned address is used after its last frame (default
    /// [`DEFAULT_SWITCH_AGEING`], IEEE 802.1D's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ageing: Option<Duration>,
    /// Capture every port (`{name}.port{p}.pcap`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pcap: bool,
    /// The ports, in order (`[[switch.port]]`).
    pub port: Vec<SwitchPortConfig>,
}

/// One port of a switch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwitchPortConfig {
    /// The system whose new NIC this port joins (index in `[[system]]`).
    pub system: usize,
    /// The NIC's MAC address (default [`default_mac`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_frames: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_bytes: Option<Size>,
    /// Capture this port (also on when the switch's `pcap` is).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pcap: bool,
}

/// A switch port's settings with the switch's defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchPort {
    pub system: usize,
    pub latency: sim::Tick,
    pub bandwidth: u64,
    pub queue_frames: u32,
    pub queue_bytes: Option<u64>,
    pub pcap: bool,
}

/// Default output queue of a switch port: 64 frames.
pub const DEFAULT_SWITCH_QUEUE_FRAMES: u32 = 64;
/// The largest output queue of a switch port, in frames.
pub const MAX_SWITCH_QUEUE_FRAMES: u32 = 65_536;
/// Default ageing time of a learned address: 300 s.
pub const DEFAULT_SWITCH_AGEING: sim::Tick = 300 * sim::tick::TICKS_PER_SECOND;

impl SwitchConfig {
    /// Port `p` with the switch's defaults (a latency set nowhere is 0,
    /// which validation refuses).
    pub fn resolved(&self, p: usize) -> SwitchPort {
        let c = &self.port[p];
        SwitchPort {
            system: c.system,
            latency: c.latency.or(self.latency).map_or(0, |d| d.0),
            bandwidth: c
                .bandwidth
                .or(self.bandwidth)
                .map_or(DEFAULT_ETHERNET_BANDWIDTH, |b| b.0),
            queue_frames: c
                .queue_frames
                .or(self.queue_frames)
                .unwrap_or(DEFAULT_SWITCH_QUEUE_FRAMES),
            queue_bytes: c.queue_bytes.or(self.queue_bytes).map(|s| s.0),
            pcap: self.pcap || c.pcap,
        }
    }

    /// The ageing time of a learned address.
    pub fn ageing_time(&self) -> sim::Tick {
        self.ageing.map_or(DEFAULT_SWITCH_AGEING, |d| d.0)
    }

    /// The smallest port latency: twice it is the switch's lookahead.
    pub fn min_latency(&self) -> sim::Tick {
        (0..self.port.len())
            .map(|p| self.resolved(p).latency)
            .min()
            .unwrap_or(0)
    }
}

/// What a system's NIC is joined to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicOwner {
    /// End `end` of `[[link]]` number `link`.
    Link { link: usize, end: usize },
    /// Port `port` of `[[switch]]` number `switch`.
    Switch { switch: usize, port: usize },
}

/// The MAC address of NIC `nic` of system `system` when the config gives
/// none: locally administered, unicast, `02:6b:76:SS:SS:NN`.
pub fn default_mac(system: usize, nic: usize) -> [u8; 6] {
    [
        0x02,
        0x6b,
        0x76,
        (system >> 8) as u8,
        system as u8,
        nic as u8,
    ]
}

impl Config {
    /// The NICs of system `system`: its Ethernet link ends in link order,
    /// then its switch ports in switch and port order, each with its MAC
    /// address.
    pub fn nics_of(&self, system: usize) -> Vec<(NicOwner, [u8; 6])> {
        let mut out = Vec::new();
        for (i, l) in self.link.iter().enumerate() {
            if l.kind != LinkKind::Ethernet {
                continue;
            }
            for end in 0..2 {
                if l.systems[end] == system {
                    let mac = l
                        .macs
                        .as_ref()
                        .and_then(|m| devices::virtio::net::parse_mac(&m[end]))
                        .unwrap_or_else(|| default_mac(system, out.len()));
                    out.push((NicOwner::Link { link: i, end }, mac));
                }
            }
        }
        for (i, sw) in self.switch.iter().enumerate() {
            for (p, port) in sw.port.iter().enumerate() {
                if port.system == system {
                    let mac = port
                        .mac
                        .as_deref()
                        .and_then(devices::virtio::net::parse_mac)
                        .unwrap_or_else(|| default_mac(system, out.len()));
                    out.push((NicOwner::Switch { switch: i, port: p }, mac));
                }
            }
        }
        out
    }
}

/// Accepts one table (`[system]`) or an array of tables (`[[system]]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SystemConfig>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<SystemConfig>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a [system] table or [[system]] tables")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            SystemConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                .map(|s| vec![s])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::<SystemConfig>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V)
}

/// Simulation-wide settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// Stop after this much simulated time (exit cause "max tick").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_time: Option<Duration>,
    /// Drain and resume every CPU this often (simulated time). A testing aid
    /// for the drain path that checkpoints use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_period: Option<Duration>,
    /// Record the CPU's RIP, CPL, RFLAGS and pending events into
    /// cpu-samples.txt this often (simulated time): a debugging aid for
    /// guests that go quiet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_period: Option<Duration>,
    /// With several systems: the lock-step window (gem5's sim_quantum).
    /// Default: the shortest link latency, or 10 ms without links (then it
    /// only bounds how far the systems drift apart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantum: Option<Duration>,
    /// With several systems: end the whole run at the first system that
    /// faults (default: run until every system has exited).
    #[serde(default)]
    pub stop_on_fault: bool,
    /// Take a checkpoint at this simulated time (into OUTDIR/cpt.TICK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_at: Option<Duration>,
    /// End the run once a checkpoint is taken (exit cause "checkpoint",
    /// status 0); by default the run goes on after it.
    #[serde(default)]
    pub checkpoint_exit: bool,
    /// Serve a GDB remote stub on this address (HOST:PORT; port 0 picks a
    /// free one, printed on stderr): the run waits for GDB before the first
    /// guest instruction. Each CPU of the debugged system is a GDB thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdb: Option<String>,
    /// With several systems: the index of the one GDB debugs (default 0).
    /// The others run in the same lock-step windows and stand still with
    /// it while GDB holds the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdb_system: Option<usize>,
    /// When the debugger's connection fails: "continue" (default: the run
    /// goes on without it) or "exit" (the run ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdb_on_disconnect: Option<String>,
}

/// One simulated system.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    /// Guest RAM.
    #[serde(default = "default_memory")]
    pub memory: Size,
    /// The guest image: a path to a static x86-64 ELF (relative to the config
    /// file), or `builtin:NAME` for a guest built into kvmsim.
    pub kernel: String,
    /// Boot arguments, passed in RDI, RSI, RDX, RCX, R8, R9 (at most six).
    #[serde(default)]
    pub args: Vec<u64>,
    /// Initial stack pointer (default 0x80000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<u64>,
    #[serde(default)]
    pub cpu: CpuConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    /// MMIO ranges `[base, size]` whose writes KVM buffers in the
    /// coalesced-MMIO ring instead of exiting (drained after every run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coalesced_mmio: Vec<[u64; 2]>,
    /// The machine: "bare" (UART, sim-ops, interval timer, a minimal
    /// interrupt controller), "pc" (adds the 8259 pair, PIT, RTC, i8042,
    /// port 0x80, I/O APIC and a local APIC), or "auto" (default: "pc" for
    /// a Linux kernel, "bare" otherwise).
    #[serde(default = "default_platform")]
    pub platform: String,
    /// In a distributed run (`mpirun -np N kvmsim run`), the process (MPI
    /// rank) that runs this system; default: system i on rank i mod N. A
    /// run in one process ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// An initramfs for a Linux kernel (path relative to the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Text appended to the Linux command line kvmsim builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// The Linux command line used (filled in by kvmsim; not an input).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// The RTC's date and time at tick 0, in Unix seconds (default: the
    /// host's clock when the run starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtc_start: Option<i64>,
    /// CPUs in the system (default 1, at most [`MAX_CPUS`]). With more than
    /// one, each has its own host thread, queue and local APIC; CPU 0 starts
    /// at the entry point, the others wait for INIT and SIPI.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// How long an inter-processor interrupt takes to reach its target
    /// (default 1 us). IPIs arrive exactly then when this is at least
    /// `sim.quantum`; below it, an IPI to a CPU that has run ahead arrives
    /// at that CPU's current time instead.
    #[serde(default = "default_ipi_latency")]
    pub ipi_latency: Duration,
    /// Disks (`[[system.disk]]`): virtio block devices, in order
    /// /dev/vda, /dev/vdb, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<DiskConfig>,
    /// QEMU's test devices, a compatibility layer for kernels written for
    /// QEMU (see [`QemuDevices`]).
    #[serde(default, skip_serializing_if = "QemuDevices::is_unset")]
    pub qemu: QemuDevices,
    /// Offer x2APIC (CPUID.1:ECX bit 21) and give the local APICs their
    /// x2APIC mode (default false). Needs local APICs (platform "pc", or
    /// several CPUs) and a host whose KVM honours the user-space MSR
    /// filter (`kvmsim doctor`). Off by default: Linux switches to x2APIC
    /// when offered, and every APIC access then becomes an MSR exit.
    #[serde(default)]
    pub x2apic: bool,
    /// The host file the guest reads with the `readfile` sim-op (gem5's
    /// `m5 readfile`, 0x50), relative to the config file; without it the
    /// guest reads nothing. A restore may name another (`--readfile`), so
    /// one checkpoint can run many scripts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readfile: Option<String>,
    /// A System.map file (`ADDRESS TYPE NAME` lines, as `nm` writes them)
    /// that PC events' symbols are looked up in, instead of the kernel's
    /// ELF symbol table (path relative to the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbols: Option<String>,
    /// Syscall emulation (`platform = "se"`): how the program in `kernel`
    /// runs (`[system.se]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub se: Option<SeConfig>,
}

/// `[system.se]`: the program's arguments, environment and the emulated
/// kernel's timing (syscall-emulation mode).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SeConfig {
    /// argv[1..] (argv[0] is `argv0`, default: the program's path).
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv0: Option<String>,
    /// The environment, KEY=VALUE each (default: empty).
    #[serde(default)]
    pub env: Vec<String>,
    /// Simulated time every system call costs (default 1us).
    #[serde(default = "default_syscall_latency")]
    pub syscall_latency: Duration,
    /// Simulated time a first touch of a page costs (default 1us).
    #[serde(default = "default_syscall_latency")]
    pub fault_latency: Duration,
    /// Seeds AT_RANDOM and getrandom (default 0): runs repeat.
    #[serde(default)]
    pub seed: u64,
    /// CLOCK_REALTIME at tick 0, in Unix seconds (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realtime_start: Option<i64>,
    /// A folder holding the target's root file system: a dynamically
    /// linked program's interpreter is looked up in it, and so is every
    /// absolute path the program names (the host's own path where the
    /// sysroot has none). Relative to the config's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sysroot: Option<String>,
    /// Path redirects, `GUEST=HOST` each (gem5's `--redirects`): a path
    /// under GUEST is opened under HOST instead (the longest GUEST wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirects: Vec<String>,
    /// CPUs of the process: each thread runs on one of its own, so this
    /// many threads may exist at once (a clone beyond them is EAGAIN).
    /// Sets system.cpus (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
}

fn default_syscall_latency() -> Duration {
    Duration(1_000_000)
}

impl Default for SeConfig {
    fn default() -> Self {
        SeConfig {
            args: vec![],
            argv0: None,
            env: vec![],
            syscall_latency: default_syscall_latency(),
            fault_latency: default_syscall_latency(),
            seed: 0,
            realtime_start: None,
            sysroot: None,
            redirects: vec![],
            cpus: None,
        }
    }
}

/// QEMU's test devices (`[system.qemu]`): each switch defaults to on for
/// a Multiboot kernel and off otherwise; the run fills in the value used.
/// They are QEMU's interface, offered for compatibility; kvmsim's own is
/// sim-ops.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QemuDevices {
    /// isa-debug-exit at ports 0xf4-0xf7: a write of v ends the run with
    /// status v * 2 + 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_exit: Option<bool>,
    /// pc-testdev: ports 0xe0 (scratch), 0xe4 (page flush), 0x2000 + n
    /// (interrupt line n's level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub testdev: Option<bool>,
    /// fw_cfg at ports 0x510/0x511 (signature, RAM size, CPU count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fw_cfg: Option<bool>,
}

impl QemuDevices {
    fn is_unset(&self) -> bool {
        *self == QemuDevices::default()
    }

    /// Fills every unset switch with `default` (on for a Multiboot kernel).
    pub fn resolve(&mut self, default: bool) {
        for s in [&mut self.debug_exit, &mut self.testdev, &mut self.fw_cfg] {
            s.get_or_insert(default);
        }
    }
}

fn default_cpus() -> u32 {
    1
}

fn default_ipi_latency() -> Duration {
    Duration(sim::tick::TICKS_PER_US)
}

/// The most CPUs a system may have (xAPIC IDs are 8 bits, 0xFF is the
/// broadcast, and the I/O APIC takes the ID after the last CPU's).
pub const MAX_CPUS: u32 = 254;

/// One disk: a raw image file behind a virtio block device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The raw image (path relative to the config file).
    pub path: String,
    /// The guest may only read (default false: it may write the image).
    #[serde(default)]
    pub readonly: bool,
    /// Copy-on-write: the image is never written; the guest's writes go to
    /// this new file (which must not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
    /// Time from the end of a request's transfer to its completion.
    #[serde(default = "default_disk_latency")]
    pub latency: Duration,
    /// Transfer rate, one request after another (e.g. "500MiB/s").
    #[serde(default = "default_disk_bandwidth")]
    pub bandwidth: Bandwidth,
}

impl DiskConfig {
    /// A writable disk at `path` with the default timing.
    pub fn writable(path: &str) -> Self {
        DiskConfig {
            path: path.into(),
            readonly: false,
            overlay: None,
            latency: default_disk_latency(),
            bandwidth: default_disk_bandwidth(),
        }
    }

    /// How the device uses the image.
    pub fn mode(&self) -> devices::disk::DiskMode {
        use devices::disk::DiskMode;
        match (&self.overlay, self.readonly) {
            (Some(o), _) => DiskMode::Overlay(o.into()),
            (None, true) => DiskMode::ReadOnly,
            (None, false) => DiskMode::Writable,
        }
    }
}

/// Default disk latency: 100 us (a SATA SSD's read).
pub fn default_disk_latency() -> Duration {
    Duration(100 * sim::tick::TICKS_PER_US)
}

/// Default disk bandwidth: 500 MiB/s.
pub fn default_disk_bandwidth() -> Bandwidth {
    Bandwidth(500 << 20)
}

/// At most this many disks per system (I/O APIC pins 16-23).
pub const MAX_DISKS: usize = 8;

fn default_platform() -> String {
    "auto".into()
}

/// The accepted values of `system.platform` ("auto": "pc" for a Linux
/// kernel, "bare" otherwise; "se": syscall emulation of a Linux program).
pub const PLATFORMS: &[&str] = &["auto", "bare", "pc", "se"];

fn default_memory() -> Size {
    Size(128 << 20)
}

/// The KVM CPU.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// The simulated CPU clock.
    #[serde(default = "default_clock")]
    pub clock: Frequency,
    /// Rate of the host counter used for time accounting (the TSC). Default:
    /// what KVM reports (KVM_GET_TSC_KHZ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_freq: Option<Frequency>,
    /// Simulated time per host time inside KVM (target CPI / host CPI).
    /// Default 1.0; for a Linux kernel on a host whose KVM emulates kernel
    /// mode, [`LINUX_EMULATED_HOST_FACTOR`] (see
    /// [`SystemConfig::adapt_linux_to_host`]). Filled in when the system is
    /// built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_factor: Option<f64>,
    /// What forces exits from KVM: "auto" (a perf cycle counter with a PMU,
    /// else a POSIX timer), "posix", "perf-cycles", "perf-task-clock".
    #[serde(default = "default_timer")]
    pub timer: String,
    /// Stop after this many guest instructions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_insts: Option<u64>,
    /// Repair a broken SYSCALL entry where `kvmsim doctor`'s probe finds one
    /// (default true; never needed on a host with VMX/SVM).
    #[serde(default = "default_true")]
    pub syscall_repair: bool,
    /// On a host whose KVM does not exit when kernel-mode guest code opens an
    /// interrupt window (`kvmsim doctor`: "interrupt-window exit at CPL0"),
    /// single-step that code while an interrupt waits, so that it is taken at
    /// the exact instruction where the guest can take it. Default: on for
    /// bare-metal and Multiboot kernels (tests such as kvm-unit-tests' look
    /// for that instruction), off for Linux kernels (a waiting interrupt is
    /// then taken at the next exit where interrupts are enabled; stepping
    /// nearly doubles a boot's host time there), and off under the GDB stub
    /// (the assist's steps and the debugger's share the guest-debug state;
    /// a breakpoint hit on one of several CPUs was seen to go missing with
    /// both). Nothing is stepped on hosts
    /// with the exit (VMX/SVM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq_window_step: Option<bool>,
    /// An instruction trace into trace.txt (by single-stepping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceConfig>,
    /// PC events (`[[system.cpu.pc_event]]`): an action each time a CPU
    /// reaches an address (see [`PcEventConfig`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pc_event: Vec<PcEventConfig>,
}

/// A PC event: each time any CPU of the system is about to execute the
/// instruction at `at`, the event is counted and its action happens at
/// that simulated tick. A hardware execution breakpoint (a debug register)
/// per distinct address: at most 4, 3 where the SYSCALL repair holds one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PcEventConfig {
    /// The address: an integer, a "0x..." string, or a symbol name (from
    /// `system.symbols`, else the kernel's ELF symbol table).
    pub at: PcAddr,
    /// What happens there.
    pub action: PcAction,
    /// The event's name in the statistics (`CPU.pcEvents::NAME`); default:
    /// `at` as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The address used (filled in by kvmsim; not an input).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub address: Option<u64>,
}

impl PcEventConfig {
    /// The event's name in the statistics.
    pub fn stat_name(&self) -> String {
        match (&self.name, &self.at) {
            (Some(n), _) => n.clone(),
            (None, PcAddr::Number(n)) => format!("{n:#x}"),
            (None, PcAddr::Text(t)) => t.clone(),
        }
    }
}

/// Where a PC event is: a number, or text ("0x..." or a symbol name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PcAddr {
    Number(u64),
    Text(String),
}

impl PcAddr {
    /// The address if it is written as one (a number or "0x..." text);
    /// `Err` for "0x" text that is not a 64-bit hex number; `Ok(None)` for
    /// a symbol name.
    pub fn literal(&self) -> Result<Option<u64>, String> {
        match self {
            PcAddr::Number(n) => Ok(Some(*n)),
            PcAddr::Text(t) => match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(&h.replace('_', ""), 16)
                    .map(Some)
                    .map_err(|e| format!("not a 64-bit hex address ({e})")),
                None => Ok(None),
            },
        }
    }
}

impl Serialize for PcAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PcAddr::Number(n) => s.serialize_u64(*n),
            PcAddr::Text(t) => s.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for PcAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PcAddr;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "an address (a non-negative integer or a \"0x...\" string) or a symbol name"
                )
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PcAddr, E> {
                Ok(PcAddr::Number(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PcAddr, E> {
                u64::try_from(v)
                    .map(PcAddr::Number)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PcAddr, E> {
                Ok(PcAddr::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a PC event does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PcAction {
    /// Append a statistics dump (stats.txt, stats.json).
    DumpStats,
    /// Reset the statistics.
    ResetStats,
    /// Dump, then reset.
    DumpResetStats,
    /// End the run (exit cause "pc_event", status 0).
    Exit,
    /// Take a checkpoint (as `sim.checkpoint_at` does).
    Checkpoint,
    /// Only count (every event is counted in `CPU.pcEvents::NAME`).
    Count,
}

/// An instruction trace: every instruction the CPU executes from a moment
/// of simulated time on, one line each, into the system's trace.txt.
/// Single-stepping costs an exit per instruction; on a host whose KVM does
/// not single-step user-mode code, user mode shows up only at its exits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TraceConfig {
    /// Simulated time the trace starts at (default: the start).
    #[serde(default)]
    pub from: Duration,
    /// How many instructions to trace.
    pub insts: u64,
}

fn default_true() -> bool {
    true
}

fn default_timer() -> String {
    "auto".into()
}

/// The largest `system.cpu.host_factor`: simulated time is a 64-bit count
/// of picoseconds (about 213 days), and at this factor 5 hours of guest
/// execution on the host reach it.
pub const MAX_HOST_FACTOR: f64 = 1000.0;

/// Checks an initial stack pointer against the memory map of `memory`
/// bytes of RAM: the stack grows down from `stack`, so the words below it
/// must be RAM above the boot area and inside the identity-mapped 4 GiB.
pub fn check_stack(stack: u64, memory: u64) -> Result<(), String> {
    use kvm::arch::x86_64::boot::BOOT_AREA_END;
    let map = mem::MemoryMap::for_size(memory).map_err(|e| e.to_string())?;
    let ram: Vec<String> = map
        .regions()
        .iter()
        .map(|r| format!("[{:#x}, {:#x})", r.base, r.end()))
        .collect();
    let in_ram = stack
        .checked_sub(8)
        .is_some_and(|low| map.regions().iter().any(|r| r.contains_range(low, 8)));
    if !in_ram {
        return Err(format!(
            "the stack grows down from this address, which must lie in guest RAM ({})",
            ram.join(", ")
        ));
    }
    if stack < BOOT_AREA_END + 8 {
        return Err(format!(
            "below {BOOT_AREA_END:#x} kvmsim keeps the boot GDT, TSS and page tables; \
             the stack must start above them"
        ));
    }
    if stack > 1 << 32 {
        return Err("must be at most 4 GiB: the boot page tables map the first 4 GiB".into());
    }
    Ok(())
}

/// The lock-step window of systems without links.
pub const DEFAULT_QUANTUM: sim::Tick = 10 * sim::tick::TICKS_PER_MS;
/// The default quantum when a system has several CPUs: how far CPUs of
/// one system may drift apart, and so how late an interrupt from another
/// CPU's thread can arrive.
pub const DEFAULT_SMP_QUANTUM: sim::Tick = 100 * sim::tick::TICKS_PER_US;

/// The accepted values of `system.cpu.timer`.
pub const TIMERS: &[&str] = &["auto", "posix", "perf-cycles", "perf-task-clock"];

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            clock: default_clock(),
            host_freq: None,
            host_factor: None,
            timer: default_timer(),
            max_insts: None,
            syscall_repair: true,
            irq_window_step: None,
            trace: None,
            pc_event: Vec::new(),
        }
    }
}

fn default_clock() -> Frequency {
    Frequency(2e9)
}

/// `system.cpu.host_factor` when nothing else applies: the host CPU's speed.
pub const DEFAULT_HOST_FACTOR: f64 = 1.0;

impl CpuConfig {
    /// The host factor in effect: the configured one, else the default.
    pub fn resolved_host_factor(&self) -> f64 {
        self.host_factor.unwrap_or(DEFAULT_HOST_FACTOR)
    }
}

/// What a Linux kernel gets on a host whose KVM emulates kernel mode (`kvmsim
/// doctor`: "native speed at CPL0 and CPL3" fails), unless the user chose:
/// the `host_factor` of examples/linux.toml. Every kernel instruction costs
/// about a microsecond there; at 1.0 the kernel's timer tick takes longer
/// than its period and the boot crawls.
pub const LINUX_EMULATED_HOST_FACTOR: f64 = 0.1;

/// The `append` of examples/linux.toml, for the same hosts: no boot-time
/// crypto self-tests, no zeroing of every allocation, no speculation
/// mitigations, no AppArmor (each costs minutes where kernel mode is
/// emulated).
pub const LINUX_EMULATED_APPEND: &str =
    "lsm=capability init_on_alloc=0 init_on_free=0 mitigations=off cryptomgr.notests";

impl SystemConfig {
    /// For a Linux kernel on a host whose KVM emulates kernel mode: fills
    /// in what examples/linux.toml picks ([`LINUX_EMULATED_HOST_FACTOR`],
    /// [`LINUX_EMULATED_APPEND`]) where the user set neither `host_factor`
    /// nor `append`. Returns one line saying what was picked and how to
    /// choose otherwise, or `None` if nothing changed (a host with VMX/SVM,
    /// or both set by the user).
    pub fn adapt_linux_to_host(&mut self, kernel_mode_emulated: bool) -> Option<String> {
        if !kernel_mode_emulated {
            return None;
        }
        let mut picked = Vec::new();
        let mut keys = Vec::new();
        if self.cpu.host_factor.is_none() {
            self.cpu.host_factor = Some(LINUX_EMULATED_HOST_FACTOR);
            picked.push(format!("host_factor = {LINUX_EMULATED_HOST_FACTOR}"));
            keys.push("system.cpu.host_factor");
        }
        if self.append.is_none() {
            self.append = Some(LINUX_EMULATED_APPEND.into());
            picked.push(format!("append = \"{LINUX_EMULATED_APPEND}\""));
            keys.push("system.append (or --append)");
        }
        (!picked.is_empty()).then(|| {
            format!(
                "kernel mode is emulated on this host (kvmsim doctor), so Linux gets {}, as \
                 examples/linux.toml; set {} to choose otherwise",
                picked.join(" and "),
                keys.join(" or ")
            )
        })
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Echo the guest's console to kvmsim's stdout (it always goes to serial.log).
    #[serde(default = "yes")]
    pub stdout: bool,
    /// Feed kvmsim's stdin to the guest when it is a terminal or a pipe.
    #[serde(default = "yes")]
    pub stdin: bool,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            stdout: true,
            stdin: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// The host's memory, as /proc/meminfo reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// MemTotal, in bytes.
    pub total: u64,
    /// MemAvailable, in bytes.
    pub available: u64,
}

impl HostMemory {
    /// Reads /proc/meminfo; None where it cannot be read or parsed.
    pub fn probe() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }

    /// Parses the text of /proc/meminfo.
    pub fn parse(meminfo: &str) -> Option<Self> {
        let field = |name: &str| {
            meminfo.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
                kib.checked_mul(1024)
            })
        };
        let total = field("MemTotal")?;
        Some(HostMemory {
            total,
            available: field("MemAvailable").unwrap_or(total),
        })
    }
}

/// `bytes` in the largest binary unit that keeps it readable.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field} = {value}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        value: String,
        message: String,
    },
}

impl Config {
    /// A config for `kernel` with every other setting at its default.
    pub fn for_kernel(kernel: &str) -> Self {
        Config {
            sim: SimConfig::default(),
            link: vec![],
            switch: vec![],
            system: vec![SystemConfig {
                memory: default_memory(),
                kernel: kernel.into(),
                args: vec![],
                stack: None,
                cpu: CpuConfig::default(),
                serial: SerialConfig::default(),
                coalesced_mmio: vec![],
                platform: default_platform(),
                rank: None,
                rtc_start: None,
                disk: vec![],
                initrd: None,
                append: None,
                cmdline: None,
                cpus: default_cpus(),
                ipi_latency: default_ipi_latency(),
                qemu: QemuDevices::default(),
                x2apic: false,
                readfile: None,
                symbols: None,
                se: None,
            }],
        }
    }

    /// The systems' dotted names: `system` alone, else `system0`, `system1`, ...
    pub fn system_names(&self) -> Vec<String> {
        if self.system.len() == 1 {
            vec!["system".into()]
        } else {
            (0..self.system.len())
                .map(|i| format!("system{i}"))
                .collect()
        }
    }

    /// The lock-step window of a multi-system run.
    pub fn quantum(&self) -> sim::Tick {
        if let Some(q) = self.sim.quantum {
            return q.0;
        }
        let smp = self.system.iter().any(|s| s.cpus > 1);
        // A switch's lookahead is twice its smallest port latency (a frame
        // crosses two cables).
        let link = self
            .link
            .iter()
            .map(|l| l.latency.0)
            .chain(
                self.switch
                    .iter()
                    .map(|s| s.min_latency().saturating_mul(2))
                    .filter(|&l| l > 0),
            )
            .min();
        match (link, smp) {
            (Some(l), true) => l.min(DEFAULT_SMP_QUANTUM),
            (Some(l), false) => l,
            (None, true) => DEFAULT_SMP_QUANTUM,
            (None, false) => DEFAULT_QUANTUM,
        }
    }

    /// Parses TOML `text` read from `path` (used in messages and to resolve
    /// relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            // toml's message names the line, the column and the key.
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.resolve_paths(path.parent().unwrap_or(Path::new("")));
        cfg.apply_se_cpus();
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// An SE system's `se.cpus` becomes its `system.cpus` (where that was
    /// left at 1; [`Config::validate`] refuses two different counts).
    pub fn apply_se_cpus(&mut self) {
        for s in &mut self.system {
            if let Some(n) = s.se.as_ref().and_then(|c| c.cpus) {
                if s.platform == "se" && s.cpus == 1 {
                    s.cpus = n;
                }
            }
        }
    }

    /// Reads and parses the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Makes relative kernel and initrd paths relative to `base` (the
    /// config's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        if base.as_os_str().is_empty() {
            return;
        }
        let fix = |p: &mut String| {
            if !p.starts_with("builtin:") && Path::new(p.as_str()).is_relative() {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        };
        for s in &mut self.system {
            fix(&mut s.kernel);
            if let Some(i) = &mut s.initrd {
                // One file, or Multiboot modules: `PATH [ARGS],PATH...`.
                *i = crate::multiboot::resolve_initrd(i, base);
            }
            if let Some(r) = &mut s.readfile {
                fix(r);
            }
            if let Some(m) = &mut s.symbols {
                fix(m);
            }
            if let Some(se) = &mut s.se {
                if let Some(r) = &mut se.sysroot {
                    fix(r);
                }
                for r in &mut se.redirects {
                    if let Some((g, h)) = r.split_once('=') {
                        let mut h = h.to_string();
                        if !h.is_empty() {
                            fix(&mut h);
                        }
                        *r = format!("{g}={h}");
                    }
                }
            }
            for d in &mut s.disk {
                fix(&mut d.path);
                if let Some(o) = &mut d.overlay {
                    fix(o);
                }
            }
        }
    }

    /// Compares the guest RAM of every system together with the host's
    /// memory. Guest RAM is allocated as the guest touches it, so a run
    /// whose guests use more than the host has ends in the host's OOM
    /// killer (possibly taking other processes with it): more than the
    /// host's total RAM is refused; more than what is available now is
    /// accepted, and the returned warning says so.
    pub fn check_host_memory(
        &self,
        host: &HostMemory,
        path: &Path,
    ) -> Result<Option<String>, ConfigError> {
        let guest: u64 = self
            .system
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.memory.0));
        let field = if self.system.len() == 1 {
            "system.memory".to_string()
        } else {
            "system[*].memory (all systems together)".to_string()
        };
        if guest > host.total {
            return Err(ConfigError::Invalid {
                path: path.into(),
                field,
                value: human_size(guest),
                message: format!(
                    "more than this host's RAM ({}): a guest that uses it would end in the \
                     host's OOM killer",
                    human_size(host.total)
                ),
            });
        }
        Ok((guest > host.available).then(|| {
            format!(
                "{field} = {}: more than the host has available now ({} of {}); the run fails \
                 if the guest uses it all",
                human_size(guest),
                human_size(host.available),
                human_size(host.total)
            )
        }))
    }

    /// Checks values that parse but cannot be used. `path` names the source.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: String, value: String, message: &str| ConfigError::Invalid {
            path: path.into(),
            field,
            value,
            message: message.into(),
        };
        if self.system.is_empty() {
            return Err(bad(
                "system".into(),
                "[]".into(),
                "at least one system is needed",
            ));
        }
        if let Some(i) = self.sim.gdb_system {
            if i >= self.system.len() {
                return Err(bad(
                    "sim.gdb_system".into(),
                    i.to_string(),
                    &format!(
                        "no such system: the config has {} (numbered from 0)",
                        self.system.len()
                    ),
                ));
            }
        }
        if let Some(d) = &self.sim.gdb_on_disconnect {
            if d != "continue" && d != "exit" {
                return Err(bad(
                    "sim.gdb_on_disconnect".into(),
                    format!("{d:?}"),
                    "must be \"continue\" or \"exit\"",
                ));
            }
        }
        let many = self.system.len() > 1;
        for (i, s) in self.system.iter().enumerate() {
            let f = |name: &str| {
                if many {
                    format!("system[{i}].{name}")
                } else {
                    format!("system.{name}")
                }
            };
            if let Some(r) = &s.readfile {
                match std::fs::metadata(r) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(bad(f("readfile"), r.clone(), "is not a regular file"));
                    }
                    Err(e) => {
                        return Err(bad(
                            f("readfile"),
                            r.clone(),
                            &format!("cannot be read: {e}"),
                        ));
                    }
                }
            }
            if s.args.len() > 6 {
                return Err(bad(
                    f("args"),
                    format!("{:?}", s.args),
                    "at most six boot arguments fit in registers",
                ));
            }
            if let Err(e) = mem::MemoryMap::for_size(s.memory.0) {
                return Err(bad(f("memory"), s.memory.0.to_string(), &e.to_string()));
            }
            if let Some(hf) = s.cpu.host_factor {
                if !(hf.is_finite() && hf > 0.0 && hf <= MAX_HOST_FACTOR) {
                    let shown = if hf.is_finite() && hf != 0.0 && !(1e-4..1e6).contains(&hf.abs()) {
                        format!("{hf:e}")
                    } else {
                        hf.to_string()
                    };
                    return Err(bad(
                        f("cpu.host_factor"),
                        shown,
                        &format!(
                            "must be a number in (0, {MAX_HOST_FACTOR}]: simulated time counts \
                             picoseconds in 64 bits (213 days), which at host_factor \
                             {MAX_HOST_FACTOR} is about 5 hours of guest execution on the host"
                        ),
                    ));
                }
            }
            if let Some(stack) = s.stack {
                if let Err(why) = check_stack(stack, s.memory.0) {
                    return Err(bad(f("stack"), format!("{stack:#x}"), &why));
                }
            }
            if let Some(name) = s.kernel.strip_prefix("builtin:") {
                if guests::builtin(name).is_none() {
                    let known: Vec<&str> = guests::GUESTS.iter().map(|(n, _)| *n).collect();
                    return Err(bad(
                        f("kernel"),
                        format!("{:?}", s.kernel),
                        &format!("no such built-in guest (built-in: {})", known.join(", ")),
                    ));
                }
            }
            if !TIMERS.contains(&s.cpu.timer.as_str()) {
                return Err(bad(
                    f("cpu.timer"),
                    format!("{:?}", s.cpu.timer),
                    &format!("unknown timer (one of: {})", TIMERS.join(", ")),
                ));
            }
            if !PLATFORMS.contains(&s.platform.as_str()) {
                return Err(bad(
                    f("platform"),
                    format!("{:?}", s.platform),
                    &format!("unknown platform (one of: {})", PLATFORMS.join(", ")),
                ));
            }
            if s.platform == "se" {
                let refuse = |field: &str, value: String, why: &str| Err(bad(f(field), value, why));
                if let Some(n) = s.se.as_ref().and_then(|c| c.cpus) {
                    if n != s.cpus {
                        return refuse(
                            "se.cpus",
                            n.to_string(),
                            &format!(
                                "system.cpus is {}: give the SE process's CPUs once (se.cpus)",
                                s.cpus
                            ),
                        );
                    }
                }
                if s.cpus == 0 || s.cpus as usize > se::MAX_SE_CPUS {
                    return refuse(
                        "cpus",
                        s.cpus.to_string(),
                        &format!(
                            "an SE process runs on 1 to {} CPUs (one thread each)",
                            se::MAX_SE_CPUS
                        ),
                    );
                }
                if !s.disk.is_empty() {
                    return refuse(
                        "disk",
                        format!("{} disks", s.disk.len()),
                        "SE mode has no devices: the program's files are the host's",
                    );
                }
                if self.link.iter().any(|l| l.systems.contains(&i)) {
                    return refuse(
                        "platform",
                        "\"se\"".into(),
                        "SE-mode systems cannot be linked",
                    );
                }
                if self.sim.checkpoint_at.is_some() {
                    return refuse(
                        "platform",
                        "\"se\"".into(),
                        "SE-mode processes cannot be checkpointed yet (sim.checkpoint_at)",
                    );
                }
                if s.kernel.starts_with("builtin:") {
                    return refuse(
                        "kernel",
                        format!("{:?}", s.kernel),
                        "SE mode runs a Linux program (a path), not a built-in guest",
                    );
                }
                if let Some(e) =
                    s.se.as_ref()
                        .and_then(|c| c.env.iter().find(|e| !e.contains('=')))
                {
                    return refuse(
                        "se.env",
                        format!("{e:?}"),
                        "an environment entry is KEY=VALUE",
                    );
                }
                if let Some(c) = &s.se {
                    if let Err(why) =
                        se::process::PathMap::from_config(&c.redirects, c.sysroot.as_deref())
                    {
                        return if why.starts_with("redirect") {
                            refuse("se.redirects", format!("{:?}", c.redirects), &why)
                        } else {
                            refuse("se.sysroot", format!("{:?}", c.sysroot), &why)
                        };
                    }
                }
            } else if s.se.is_some() {
                return Err(bad(
                    f("se"),
                    "[system.se]".into(),
                    "needs platform = \"se\"",
                ));
            }
            if s.cpus == 0 || s.cpus > MAX_CPUS {
                return Err(bad(
                    f("cpus"),
                    s.cpus.to_string(),
                    &format!("must be 1 to {MAX_CPUS}"),
                ));
            }
            if s.cpus > 1 {
                for (what, set) in [("coalesced_mmio", !s.coalesced_mmio.is_empty())] {
                    if set {
                        return Err(bad(
                            f("cpus"),
                            s.cpus.to_string(),
                            &format!("{what} is not supported yet with more than one CPU"),
                        ));
                    }
                }
            }
            if s.x2apic && (s.platform == "se" || (s.platform == "bare" && s.cpus == 1)) {
                return Err(bad(
                    f("x2apic"),
                    "true".into(),
                    &format!(
                        "needs local APICs: platform \"pc\" or \"auto\", or more than one CPU \
                         (platform is \"{}\" with {} CPU)",
                        s.platform, s.cpus
                    ),
                ));
            }
            if s.ipi_latency.0 == 0 {
                return Err(bad(
                    f("ipi_latency"),
                    "0".into(),
                    "must be longer than zero",
                ));
            }
            if s.disk.len() > MAX_DISKS {
                return Err(bad(
                    f("disk"),
                    format!("{} disks", s.disk.len()),
                    &format!("at most {MAX_DISKS} disks per system"),
                ));
            }
            for (k, d) in s.disk.iter().enumerate() {
                if d.readonly && d.overlay.is_some() {
                    return Err(bad(
                        f(&format!("disk[{k}].overlay")),
                        format!("{:?}", d.overlay.as_deref().unwrap_or_default()),
                        "a read-only disk takes no writes: give readonly = true or an overlay, \
                         not both",
                    ));
                }
                if s.platform == "bare" {
                    return Err(bad(
                        f("platform"),
                        "\"bare\"".into(),
                        "disks need the pc platform (their interrupts go through the I/O APIC)",
                    ));
                }
            }
            if s.cpu.max_insts == Some(0) {
                return Err(bad(f("cpu.max_insts"), "0".into(), "must be at least 1"));
            }
            let mut names: Vec<String> = Vec::new();
            for (k, e) in s.cpu.pc_event.iter().enumerate() {
                let field = |key: &str| f(&format!("cpu.pc_event[{k}].{key}"));
                if let PcAddr::Text(t) = &e.at {
                    if t.trim().is_empty() || t.chars().any(char::is_whitespace) {
                        return Err(bad(
                            field("at"),
                            format!("{t:?}"),
                            "must be an address (an integer or \"0x...\") or a symbol name \
                             (no spaces)",
                        ));
                    }
                    if let Err(why) = e.at.literal() {
                        return Err(bad(field("at"), format!("{t:?}"), &why));
                    }
                }
                if let Some(n) = &e.name {
                    if n.is_empty()
                        || n.len() > 200
                        || n.chars().any(|c| c.is_whitespace() || c.is_control())
                    {
                        return Err(bad(
                            field("name"),
                            format!("{n:?}"),
                            "must be 1 to 200 characters without spaces (it becomes a \
                             statistic's name in stats.txt)",
                        ));
                    }
                }
                let name = e.stat_name();
                if names.contains(&name) {
                    return Err(bad(
                        field("name"),
                        format!("{name:?}"),
                        "two PC events have this name in the statistics: give each a \
                         different `name`",
                    ));
                }
                names.push(name);
            }
            if let Some(m) = &s.symbols {
                if m.is_empty() {
                    return Err(bad(
                        f("symbols"),
                        "\"\"".into(),
                        "must name a System.map file",
                    ));
                }
            }
            if let Some(t) = &s.cpu.trace {
                if t.insts == 0 {
                    return Err(bad(f("cpu.trace.insts"), "0".into(), "must be at least 1"));
                }
            }
            for r in &s.coalesced_mmio {
                let [base, size] = *r;
                let ok = size > 0
                    && base.checked_add(size).is_some()
                    && !mem::MemoryMap::for_size(s.memory.0)
                        .map(|m| {
                            m.regions()
                                .iter()
                                .any(|g| base < g.end() && g.base < base + size)
                        })
                        .unwrap_or(true);
                if !ok {
                    return Err(bad(
                        f("coalesced_mmio"),
                        format!("[{base:#x}, {size:#x}]"),
                        "must be a non-empty range outside RAM",
                    ));
                }
            }
        }
        for (name, d) in [
            ("sim.max_time", self.sim.max_time),
            ("sim.drain_period", self.sim.drain_period),
            ("sim.sample_period", self.sim.sample_period),
            ("sim.quantum", self.sim.quantum),
        ] {
            if let Some(Duration(0)) = d {
                return Err(bad(name.into(), "0".into(), "must be longer than zero"));
            }
        }
        let quantum = self.quantum();
        for (i, l) in self.link.iter().enumerate() {
            let [a, b] = l.systems;
            if a >= self.system.len() || b >= self.system.len() || a == b {
                return Err(bad(
                    format!("link[{i}].systems"),
                    format!("{:?}", l.systems),
                    &format!("must name two different systems (0..{})", self.system.len()),
                ));
            }
            if l.latency.0 == 0 {
                return Err(bad(
                    format!("link[{i}].latency"),
                    "0".into(),
                    "must be longer than zero: the latency is the lookahead that lets systems \
                     run in parallel, and a zero lookahead never lets simulated time advance",
                ));
            }
            let field = |k: &str| format!("link[{i}].{k}");
            if l.kind == LinkKind::Mailbox {
                let set = [
                    ("bandwidth", l.bandwidth.is_some()),
                    ("macs", l.macs.is_some()),
                    ("pcap", l.pcap),
                ];
                if let Some((k, _)) = set.iter().find(|(_, on)| *on) {
                    return Err(bad(
                        field(k),
                        "set".into(),
                        "only an Ethernet link (kind = \"ethernet\") has it",
                    ));
                }
            }
            if let Some(macs) = &l.macs {
                for (end, m) in macs.iter().enumerate() {
                    check_mac(m).map_err(|msg| {
                        bad(format!("link[{i}].macs[{end}]"), format!("{m:?}"), msg)
                    })?;
                }
                if macs[0].eq_ignore_ascii_case(&macs[1]) {
                    return Err(bad(
                        field("macs"),
                        format!("{macs:?}"),
                        "the two ends need different addresses",
                    ));
                }
            }
            if l.latency.0 < quantum {
                return Err(bad(
                    format!("link[{i}].latency"),
                    format!("{} ps", l.latency.0),
                    &format!(
                        "must be at least sim.quantum ({quantum} ps): the quantum is the lookahead \
                         that lets systems run in parallel"
                    ),
                ));
            }
        }
        self.validate_switches(&bad)?;
        // Disks and NICs share the virtio-mmio slots (I/O APIC pins 16-23).
        for (k, s) in self.system.iter().enumerate() {
            let nics = self.nics_of(k).len();
            if nics > 0 && s.platform == "bare" {
                return Err(bad(
                    format!("system[{k}].platform"),
                    "\"bare\"".into(),
                    "an Ethernet link or switch port needs the pc platform (a Linux kernel, or \
                     platform = \"pc\")",
                ));
            }
            if s.disk.len() + nics > MAX_DISKS {
                return Err(bad(
                    format!("system[{k}]"),
                    format!(
                        "{} disks and {nics} NICs (Ethernet links and switch ports)",
                        s.disk.len()
                    ),
                    &format!("at most {MAX_DISKS} virtio devices (disks and NICs) per system"),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a configured MAC address: six hex bytes, unicast, not zero.
fn check_mac(m: &str) -> Result<(), &'static str> {
    match devices::virtio::net::parse_mac(m) {
        None => Err("is not a MAC address (six hex bytes: 02:00:00:00:00:01)"),
        Some(b) if b[0] & 1 != 0 || b == [0; 6] => {
            Err("must be a unicast address (first byte even, not all zeros)")
        }
        Some(_) => Ok(()),
    }
}

/// Whether `name` can name a switch: a letter, then letters, digits and
/// '_' (one part of a statistic's dotted name, and a file name).
fn valid_switch_name(name: &str) -> bool {
    let mut c = name.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl Config {
    /// Checks every `[[switch]]` (see [`Config::validate`]).
    fn validate_switches(
        &self,
        bad: &dyn Fn(String, String, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        let quantum = self.quantum();
        let systems = self.system_names();
        for (i, sw) in self.switch.iter().enumerate() {
            let f = |k: &str| format!("switch[{i}].{k}");
            if !valid_switch_name(&sw.name) {
                return Err(bad(
                    f("name"),
                    format!("{:?}", sw.name),
                    "must be a letter followed by letters, digits or '_'",
                ));
            }
            let taken = systems.contains(&sw.name)
                || sw
                    .name
                    .strip_prefix("link")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if taken {
                return Err(bad(
                    f("name"),
                    format!("{:?}", sw.name),
                    "is the name of a system's or a link's statistics",
                ));
            }
            if let Some(j) = self.switch[..i].iter().position(|o| o.name == sw.name) {
                return Err(bad(
                    f("name"),
                    format!("{:?}", sw.name),
                    &format!("switch[{j}] has the same name"),
                ));
            }
            if sw.port.len() < 2 {
                return Err(bad(
                    f("port"),
                    format!("{} ports", sw.port.len()),
                    "a switch needs at least two ports ([[switch.port]] with system = N)",
                ));
            }
            if let Some(Duration(0)) = sw.ageing {
                return Err(bad(f("ageing"), "0".into(), "must be longer than zero"));
            }
            let mut macs: Vec<(usize, [u8; 6])> = Vec::new();
            for (p, port) in sw.port.iter().enumerate() {
                let pf = |k: &str| format!("switch[{i}].port[{p}].{k}");
                if port.system >= self.system.len() {
                    return Err(bad(
                        pf("system"),
                        port.system.to_string(),
                        &format!("is not a system (0..{})", self.system.len()),
                    ));
                }
                if let Some(q) = sw.port[..p].iter().position(|o| o.system == port.system) {
                    return Err(bad(
                        pf("system"),
                        port.system.to_string(),
                        &format!(
                            "the system's NIC on this switch is port[{q}] already (one port per \
                             system)"
                        ),
                    ));
                }
                if let Some(m) = &port.mac {
                    check_mac(m).map_err(|msg| bad(pf("mac"), format!("{m:?}"), msg))?;
                }
                let r = sw.resolved(p);
                if r.latency == 0 {
                    let (field, value) = match (port.latency, sw.latency) {
                        (Some(_), _) => (pf("latency"), "0".to_string()),
                        (None, Some(_)) => (f("latency"), "0".to_string()),
                        (None, None) => (pf("latency"), "unset".to_string()),
                    };
                    return Err(bad(
                        field,
                        value,
                        "a switch port needs a latency longer than zero (on the port or the \
                         switch): the latency is the lookahead that lets systems run in parallel",
                    ));
                }
                if r.bandwidth == 0 {
                    let field = if port.bandwidth.is_some() {
                        pf("bandwidth")
                    } else {
                        f("bandwidth")
                    };
                    return Err(bad(field, "0".into(), "must be more than zero"));
                }
                if r.queue_frames == 0 || r.queue_frames > MAX_SWITCH_QUEUE_FRAMES {
                    let field = if port.queue_frames.is_some() {
                        pf("queue_frames")
                    } else {
                        f("queue_frames")
                    };
                    return Err(bad(
                        field,
                        r.queue_frames.to_string(),
                        &format!("must be 1 to {MAX_SWITCH_QUEUE_FRAMES} frames"),
                    ));
                }
                let max_frame = devices::virtio::net::MAX_FRAME as u64;
                if let Some(b) = r.queue_bytes.filter(|&b| b < max_frame) {
                    let field = if port.queue_bytes.is_some() {
                        pf("queue_bytes")
                    } else {
                        f("queue_bytes")
                    };
                    return Err(bad(
                        field,
                        b.to_string(),
                        &format!(
                            "must hold at least one frame of the longest size ({max_frame} bytes)"
                        ),
                    ));
                }
                if r.latency.saturating_mul(2) < quantum {
                    return Err(bad(
                        pf("latency"),
                        format!("{} ps", r.latency),
                        &format!(
                            "twice a switch port's latency must be at least sim.quantum \
                             ({quantum} ps): a frame crosses two cables, and the shortest such \
                             path is the lookahead that lets systems run in parallel"
                        ),
                    ));
                }
            }
            for (p, port) in sw.port.iter().enumerate() {
                let me = NicOwner::Switch { switch: i, port: p };
                let Some((_, mac)) = self
                    .nics_of(port.system)
                    .into_iter()
                    .find(|(o, _)| *o == me)
                else {
                    continue;
                };
                if let Some(&(q, _)) = macs.iter().find(|(_, m)| *m == mac) {
                    return Err(bad(
                        format!("switch[{i}].port[{p}].mac"),
                        devices::virtio::net::format_mac(&mac),
                        &format!("port[{q}] has the same address"),
                    ));
                }
                macs.push((p, mac));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("dir/test.toml"))
    }

    #[test]
    fn se_cpus_sets_the_system_cpus_once() {
        let se = |extra: &str, se: &str| {
            parse(&format!(
                "[system]\nplatform = \"se\"\nkernel = \"/bin/true\"\n{extra}[system.se]\n{se}"
            ))
        };
        let c = se("", "cpus = 4\n").unwrap();
        assert_eq!(c.system[0].cpus, 4);
        assert_eq!(c.system[0].se.as_ref().unwrap().cpus, Some(4));
        // Given as system.cpus alone, or both the same: accepted.
        assert_eq!(se("cpus = 3\n", "").unwrap().system[0].cpus, 3);
        assert_eq!(se("cpus = 3\n", "cpus = 3\n").unwrap().system[0].cpus, 3);
        for (extra, sec, field, why) in [
            ("cpus = 2\n", "cpus = 4\n", "se.cpus", "system.cpus is 2"),
            ("", "cpus = 65\n", "cpus", "1 to 64 CPUs"),
            ("", "cpus = 0\n", "cpus", "1 to 64 CPUs"),
        ] {
            let e = se(extra, sec).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains(why), "{extra}{sec}: {e}");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("[system]\nkernel = \"builtin:hello\"\n").unwrap();
        assert_eq!(c.system.len(), 1);
        assert_eq!(c.system[0].memory, Size(128 << 20));
        assert_eq!(c.system[0].cpu.clock, Frequency(2e9));
        assert_eq!(c.system[0].cpu.host_factor, None);
        assert_eq!(c.system[0].cpu.resolved_host_factor(), 1.0);
        assert!(c.system[0].serial.stdout);
        assert_eq!(c.system_names(), vec!["system"]);
        assert_eq!(c.sim.max_time, None);
    }

    #[test]
    fn disks_parse_with_defaults_and_resolve_paths() {
        let c = Config::parse(
            "[system]\nkernel = \"vmlinuz\"\n[[system.disk]]\npath = \"root.img\"\n\
             [[system.disk]]\npath = \"/abs/data.img\"\noverlay = \"data.cow\"\n\
             latency = \"1ms\"\nbandwidth = \"100MB/s\"\n",
            Path::new("/cfg/k.toml"),
        )
        .unwrap();
        let d = &c.system[0].disk;
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].path, "/cfg/root.img");
        assert_eq!(d[0].mode(), devices::disk::DiskMode::Writable);
        assert_eq!(d[0].latency, default_disk_latency());
        assert_eq!(d[0].bandwidth.0, 500 << 20);
        assert_eq!(d[1].path, "/abs/data.img");
        assert_eq!(
            d[1].mode(),
            devices::disk::DiskMode::Overlay("/cfg/data.cow".into())
        );
        assert_eq!(d[1].latency.0, sim::tick::TICKS_PER_SECOND / 1000);
        assert_eq!(d[1].bandwidth.0, 100_000_000);
        let e = parse("[system]\nkernel = \"k\"\n[[system.disk]]\npath = \"a\"\nsize = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("size"), "{e}");
        let many = "[[system.disk]]\npath = \"a\"\n".repeat(MAX_DISKS + 1);
        let e = parse(&format!("[system]\nkernel = \"k\"\n{many}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 8 disks"), "{e}");
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
            [sim]
            max_time = "2s"
            [system]
            memory = "64MiB"
            kernel = "guest.elf"
            args = [1, 2]
            stack = 0x70000
            [system.cpu]
            clock = "3GHz"
            host_freq = "2.5GHz"
            host_factor = 2.0
            [system.serial]
            stdout = false
            stdin = false
            "#,
        )
        .unwrap();
        assert_eq!(c.sim.max_time, Some(Duration(2_000_000_000_000)));
        assert_eq!(c.system[0].kernel, "dir/guest.elf");
        assert_eq!(c.system[0].stack, Some(0x70000));
        assert_eq!(c.system[0].cpu.host_freq, Some(Frequency(2.5e9)));
    }

    #[test]
    fn several_systems_and_links() {
        let c = parse(
            r#"
            [sim]
            quantum = "100us"
            [[system]]
            kernel = "builtin:hello"
            [[system]]
            kernel = "builtin:compute"
            memory = "32MiB"
            [[link]]
            systems = [0, 1]
            latency = "1ms"
            "#,
        )
        .unwrap();
        assert_eq!(c.system.len(), 2);
        assert_eq!(c.system[1].memory, Size(32 << 20));
        assert_eq!(c.system_names(), vec!["system0", "system1"]);
        assert_eq!(c.quantum(), 100_000_000);
        assert_eq!(c.link[0].latency, Duration(1_000_000_000));
        // The quantum defaults to the shortest link latency.
        let c = parse(
            "[[system]]\nkernel = \"builtin:hello\"\n[[system]]\nkernel = \"builtin:hello\"\n\
             [[link]]\nsystems = [1, 0]\nlatency = \"50us\"\n",
        )
        .unwrap();
        assert_eq!(c.quantum(), 50_000_000);
    }

    #[test]
    fn ethernet_links() {
        let pc = "[[system]]\nkernel = \"builtin:netpong\"\nplatform = \"pc\"\n";
        let two = format!("{pc}{pc}{pc}");
        let c = parse(&format!(
            "{two}[[link]]\nkind = \"ethernet\"\nsystems = [0, 1]\nlatency = \"1ms\"\n\
             bandwidth = \"10Gbit/s\"\npcap = true\n\
             [[link]]\nkind = \"ethernet\"\nsystems = [2, 1]\nlatency = \"1ms\"\n\
             macs = [\"02:00:00:00:00:0a\", \"02:00:00:00:00:0B\"]\n\
             [[link]]\nsystems = [0, 1]\nlatency = \"1ms\"\n"
        ))
        .unwrap();
        assert_eq!(c.link[0].kind, LinkKind::Ethernet);
        assert_eq!(c.link[0].bandwidth.unwrap().0, 1_250_000_000);
        assert!(c.link[0].pcap && !c.link[1].pcap);
        assert_eq!(c.link[2].kind, LinkKind::Mailbox);
        // NICs in link order; MACs given or derived from system and NIC.
        let link = |link, end| NicOwner::Link { link, end };
        assert_eq!(c.nics_of(0), vec![(link(0, 0), default_mac(0, 0))]);
        assert_eq!(
            c.nics_of(1),
            vec![
                (link(0, 1), [2, 0x6b, 0x76, 0, 1, 0]),
                (link(1, 1), [2, 0, 0, 0, 0, 0x0b])
            ]
        );
        assert_eq!(c.nics_of(2), vec![(link(1, 0), [2, 0, 0, 0, 0, 0x0a])]);
        let bad = |link: &str, want: &str| {
            let e = parse(&format!(
                "{two}[[link]]\nsystems = [0, 1]\nlatency = \"1ms\"\n{link}"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{link}: {e}");
        };
        bad("pcap = true\n", "link[0].pcap");
        bad("bandwidth = \"1Gbps\"\n", "link[0].bandwidth");
        bad("kind = \"token-ring\"\n", "kind");
        let eth = "kind = \"ethernet\"\n";
        bad(
            &format!("{eth}macs = [\"02:00:00:00:00:01\", \"nope\"]\n"),
            "link[0].macs[1]",
        );
        bad(
            &format!("{eth}macs = [\"03:00:00:00:00:01\", \"02:00:00:00:00:02\"]\n"),
            "unicast",
        );
        bad(
            &format!("{eth}macs = [\"02:00:00:00:00:01\", \"02:00:00:00:00:01\"]\n"),
            "different",
        );
        bad(&format!("{eth}bandwidth = \"0bit/s\"\n"), "bandwidth");
        // NICs need the pc platform, and share the virtio slots with disks.
        let e = parse(
            "[[system]]\nkernel = \"builtin:hello\"\nplatform = \"bare\"\n\
             [[system]]\nkernel = \"builtin:hello\"\n\
             [[link]]\nkind = \"ethernet\"\nsystems = [0, 1]\nlatency = \"1ms\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("system[0].platform"), "{e}");
        let links = "[[link]]\nkind = \"ethernet\"\nsystems = [0, 1]\nlatency = \"1ms\"\n"
            .repeat(MAX_DISKS + 1);
        let e = parse(&format!("{pc}{pc}{links}")).unwrap_err().to_string();
        assert!(e.contains("at most 8 virtio devices"), "{e}");
    }

    #[test]
    fn switches() {
        let pc = "[[system]]\nkernel = \"builtin:netpong\"\nplatform = \"pc\"\n";
        let three = format!("{pc}{pc}{pc}");
        let c = parse(&format!(
            "{three}[[link]]\nkind = \"ethernet\"\nsystems = [0, 1]\nlatency = \"1ms\"\n\
             [[switch]]\nname = \"sw0\"\nlatency = \"100us\"\nqueue_frames = 8\npcap = true\n\
             [[switch.port]]\nsystem = 2\n\
             [[switch.port]]\nsystem = 0\nlatency = \"300us\"\nbandwidth = \"10Mbit/s\"\n\
             queue_bytes = \"4KiB\"\nmac = \"02:00:00:00:00:07\"\n\
             [[switch.port]]\nsystem = 1\nqueue_frames = 2\n"
        ))
        .unwrap();
        let sw = &c.switch[0];
        assert_eq!(sw.port.len(), 3);
        let p0 = sw.resolved(0);
        assert_eq!(
            (
                p0.system,
                p0.latency,
                p0.bandwidth,
                p0.queue_frames,
                p0.queue_bytes
            ),
            (
                2,
                100 * sim::tick::TICKS_PER_US,
                DEFAULT_ETHERNET_BANDWIDTH,
                8,
                None
            )
        );
        assert!(p0.pcap);
        let p1 = sw.resolved(1);
        assert_eq!(
            (p1.latency, p1.bandwidth, p1.queue_bytes),
            (300 * sim::tick::TICKS_PER_US, 1_250_000, Some(4096))
        );
        assert_eq!(sw.resolved(2).queue_frames, 2);
        assert_eq!(sw.ageing_time(), DEFAULT_SWITCH_AGEING);
        // The quantum: the shortest of the link's latency and twice the
        // switch's smallest port latency.
        assert_eq!(c.quantum(), 200 * sim::tick::TICKS_PER_US);
        // NICs: link ends first, then switch ports; MACs given or derived.
        let at = |switch, port| NicOwner::Switch { switch, port };
        assert_eq!(
            c.nics_of(0),
            vec![
                (NicOwner::Link { link: 0, end: 0 }, default_mac(0, 0)),
                (at(0, 1), [2, 0, 0, 0, 0, 7])
            ]
        );
        assert_eq!(c.nics_of(2), vec![(at(0, 0), default_mac(2, 0))]);
        // Bad switches name the field and the value.
        let bad = |sw: &str, want: &[&str]| {
            let e = parse(&format!("{three}{sw}")).unwrap_err().to_string();
            assert!(e.starts_with("dir/test.toml: "), "{sw}: {e}");
            for w in want {
                assert!(e.contains(w), "{sw}: {e}");
            }
        };
        let ports = "[[switch.port]]\nsystem = 0\n[[switch.port]]\nsystem = 1\n";
        let named = |head: &str| format!("[[switch]]\nname = \"s\"\n{head}");
        bad(
            &format!(
                "{}{ports}[[switch.port]]\nsystem = 3\n",
                named("latency = \"1ms\"\n")
            ),
            &["switch[0].port[2].system = 3", "not a system"],
        );
        bad(
            &format!(
                "{}{ports}[[switch.port]]\nsystem = 0\n",
                named("latency = \"1ms\"\n")
            ),
            &["switch[0].port[2].system = 0", "port[0]"],
        );
        bad(
            &format!("{}{ports}", named("")),
            &["switch[0].port[0].latency = unset"],
        );
        bad(
            &format!("{}{ports}", named("latency = \"0s\"\n")),
            &["switch[0].latency = 0"],
        );
        bad(
            &format!(
                "{}{ports}",
                named("latency = \"1ms\"\nbandwidth = \"0bit/s\"\n")
            ),
            &["bandwidth"],
        );
        bad(
            &format!("{}{ports}", named("latency = \"1ms\"\nqueue_frames = 0\n")),
            &["switch[0].queue_frames = 0", "1 to 65536"],
        );
        bad(
            &format!("{}{ports}", named("latency = \"1ms\"\nqueue_bytes = 100\n")),
            &["switch[0].queue_bytes = 100", "1518"],
        );
        bad(
            &format!("{}{ports}", named("latency = \"1ms\"\nageing = \"0s\"\n")),
            &["switch[0].ageing = 0"],
        );
        bad(
            &named("latency = \"1ms\"\n[[switch.port]]\nsystem = 0\n"),
            &["switch[0].port = 1 ports", "at least two"],
        );
        bad(
            "[[switch]]\nname = \"system1\"\nlatency = \"1ms\"\n[[switch.port]]\nsystem = 0\n\
             [[switch.port]]\nsystem = 1\n",
            &["switch[0].name = \"system1\""],
        );
        bad(
            &format!("[[switch]]\nname = \"a.b\"\nlatency = \"1ms\"\n{ports}"),
            &["switch[0].name = \"a.b\""],
        );
        let dup = format!("{}{ports}", named("latency = \"1ms\"\n"));
        bad(
            &format!("{dup}{dup}"),
            &["switch[1].name", "switch[0] has the same name"],
        );
        bad(
            &format!(
                "{}[[switch.port]]\nsystem = 0\nmac = \"02:00:00:00:00:01\"\n\
                 [[switch.port]]\nsystem = 1\nmac = \"02:00:00:00:00:01\"\n",
                named("latency = \"1ms\"\n")
            ),
            &["switch[0].port[1].mac = 02:00:00:00:00:01", "port[0]"],
        );
        bad(
            &format!(
                "{}[[switch.port]]\nsystem = 0\nmac = \"ff:ff:ff:ff:ff:ff\"\n\
                 [[switch.port]]\nsystem = 1\n",
                named("latency = \"1ms\"\n")
            ),
            &["switch[0].port[0].mac", "unicast"],
        );
        bad(
            &format!(
                "{}[[switch.port]]\nsystem = 0\nmac = \"02:00:00:00:00:01\"\n\
                 [[switch.port]]\nsystem = 1\nspeed = 3\n",
                named("latency = \"1ms\"\n")
            ),
            &["speed"],
        );
        // The lookahead: twice the smallest port latency covers the quantum.
        bad(
            &format!(
                "[sim]\nquantum = \"3ms\"\n{three}{}{ports}",
                named("latency = \"1ms\"\n")
            )[..],
            &["switch[0].port[0].latency", "twice", "sim.quantum"],
        );
        // A bare system has no NIC.
        let e = parse(&format!(
            "{pc}[[system]]\nkernel = \"builtin:hello\"\nplatform = \"bare\"\n{}{ports}",
            named("latency = \"1ms\"\n")
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("system[1].platform"), "{e}");
    }

    #[test]
    fn bad_links_and_systems() {
        let two =
            "[[system]]\nkernel = \"builtin:hello\"\n[[system]]\nkernel = \"builtin:hello\"\n";
        let e = parse(&format!(
            "{two}[[link]]\nsystems = [0, 2]\nlatency = \"1ms\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("link[0].systems"), "{e}");
        let e = parse(&format!(
            "[sim]\nquantum = \"2ms\"\n{two}[[link]]\nsystems = [0, 1]\nlatency = \"1ms\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("link[0].latency") && e.contains("lookahead"),
            "{e}"
        );
        let e = parse(&format!("{two}[[system]]\nkernel = \"builtin:nope\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("system[2].kernel"), "{e}");
        let e = parse("[[system]]\nkernel = \"builtin:hello\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn the_gdb_stub_serves_an_existing_system_and_knows_its_disconnect_action() {
        let one = "[[system]]\nkernel = \"builtin:hello\"\n";
        let c = parse(&format!("[sim]\ngdb = \"127.0.0.1:0\"\n{one}")).unwrap();
        assert_eq!(c.sim.gdb.as_deref(), Some("127.0.0.1:0"));
        // Several CPUs and several systems are served (one system each run).
        let c = parse(&format!("[sim]\ngdb = \"127.0.0.1:0\"\n{one}cpus = 2\n")).unwrap();
        assert_eq!(c.system[0].cpus, 2);
        let c = parse(&format!(
            "[sim]\ngdb = \"127.0.0.1:0\"\ngdb_system = 1\n{one}{one}"
        ))
        .unwrap();
        assert_eq!(c.sim.gdb_system, Some(1));
        let e = parse(&format!(
            "[sim]\ngdb = \"127.0.0.1:0\"\ngdb_system = 2\n{one}{one}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sim.gdb_system") && e.contains("no such system"),
            "{e}"
        );
        let e = parse(&format!("[sim]\ngdb_on_disconnect = \"explode\"\n{one}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("sim.gdb_on_disconnect") && e.contains("explode"),
            "{e}"
        );
    }

    #[test]
    fn zero_latency_links_are_refused() {
        let two =
            "[[system]]\nkernel = \"builtin:hello\"\n[[system]]\nkernel = \"builtin:hello\"\n";
        // A zero latency makes a zero quantum: the run would never advance.
        let e = parse(&format!(
            "{two}[[link]]\nsystems = [0, 1]\nlatency = \"0s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("link[0].latency = 0") && e.contains("longer than zero"),
            "{e}"
        );
        let e = parse(&format!(
            "[sim]\nquantum = \"0ns\"\n{two}[[link]]\nsystems = [0, 1]\nlatency = \"1ms\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("sim.quantum = 0"), "{e}");
    }

    #[test]
    fn stack_must_lie_in_ram() {
        let cfg = |stack: &str, memory: &str| {
            parse(&format!(
                "[system]\nkernel = \"builtin:hello\"\nmemory = \"{memory}\"\nstack = {stack}\n"
            ))
        };
        assert!(cfg("0x80000", "64MiB").is_ok());
        // The top of RAM is a valid start: the first push goes below it.
        assert!(cfg("0x4000000", "64MiB").is_ok());
        let e = cfg("0x4000008", "64MiB").unwrap_err().to_string();
        assert!(
            e.contains("system.stack = 0x4000008") && e.contains("[0x0, 0x4000000)"),
            "{e}"
        );
        let e = cfg("0x10000000000", "64MiB").unwrap_err().to_string();
        assert!(e.contains("guest RAM"), "{e}");
        let e = cfg("0x2000", "64MiB").unwrap_err().to_string();
        assert!(e.contains("page tables"), "{e}");
        let e = cfg("0", "64MiB").unwrap_err().to_string();
        assert!(e.contains("system.stack = 0x0"), "{e}");
        // RAM above 3 GiB continues at 4 GiB, but only 4 GiB are mapped.
        let e = cfg("0x100001000", "4GiB").unwrap_err().to_string();
        assert!(e.contains("4 GiB"), "{e}");
        let e = cfg("0xd0000000", "4GiB").unwrap_err().to_string();
        assert!(e.contains("guest RAM"), "{e}");
    }

    #[test]
    fn host_factor_is_bounded() {
        let cfg = |hf: &str| {
            parse(&format!(
                "[system]\nkernel = \"builtin:hello\"\n[system.cpu]\nhost_factor = {hf}\n"
            ))
        };
        assert!(cfg("1e-6").is_ok());
        assert!(cfg("1000.0").is_ok());
        for (bad, shown) in [
            ("1e300", "1e300"),
            ("1000.5", "1000.5"),
            ("0.0", "0"),
            ("inf", "inf"),
            ("nan", "NaN"),
        ] {
            let e = cfg(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("system.cpu.host_factor = {shown}:"))
                    && e.contains("(0, 1000]"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn guest_memory_against_the_host() {
        let host = HostMemory::parse(
            "MemTotal:        4194304 kB\nMemFree:  100 kB\nMemAvailable:    2097152 kB\n",
        )
        .unwrap();
        assert_eq!(host.total, 4 << 30);
        assert_eq!(host.available, 2 << 30);
        let p = Path::new("t.toml");
        let one = |m: &str| {
            parse(&format!(
                "[system]\nkernel = \"builtin:hello\"\nmemory = \"{m}\"\n"
            ))
            .unwrap()
        };
        assert_eq!(one("1GiB").check_host_memory(&host, p).unwrap(), None);
        let w = one("3GiB").check_host_memory(&host, p).unwrap().unwrap();
        assert!(w.contains("available") && w.contains("2 GiB"), "{w}");
        let e = one("5GiB")
            .check_host_memory(&host, p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("system.memory = 5 GiB") && e.contains("this host's RAM (4 GiB)"),
            "{e}"
        );
        // Several systems share the host.
        let two = parse(
            "[[system]]\nkernel = \"builtin:hello\"\nmemory = \"3GiB\"\n\
             [[system]]\nkernel = \"builtin:hello\"\nmemory = \"3GiB\"\n",
        )
        .unwrap();
        let e = two.check_host_memory(&host, p).unwrap_err().to_string();
        assert!(
            e.contains("all systems together") && e.contains("6 GiB"),
            "{e}"
        );
        assert!(HostMemory::parse("nonsense").is_none());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("[system]\nkernel = \"builtin:hello\"\nmemroy = \"1G\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("dir/test.toml: "), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("memroy"), "{e}");
    }

    #[test]
    fn x2apic_is_off_by_default_and_needs_local_apics() {
        let sys = |extra: &str| parse(&format!("[system]\nkernel = \"builtin:hello\"\n{extra}"));
        let c = sys("").unwrap();
        assert!(!c.system[0].x2apic);
        // config.json says which was used.
        let json = serde_json::to_value(&c.system[0]).unwrap();
        assert_eq!(json["x2apic"], serde_json::json!(false));
        assert!(sys("x2apic = true\nplatform = \"pc\"\n").unwrap().system[0].x2apic);
        assert!(sys("x2apic = true\ncpus = 2\nplatform = \"bare\"\n").is_ok());
        // "auto" may become a PC: the run checks it once resolved.
        assert!(sys("x2apic = true\n").is_ok());
        let e = sys("x2apic = true\nplatform = \"bare\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("system.x2apic = true") && e.contains("needs local APICs"),
            "{e}"
        );
        let e = sys("x2apic = 1\n").unwrap_err().to_string();
        assert!(e.contains("x2apic") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn bad_value_names_line_and_problem() {
        let e = parse("[system]\nkernel = \"builtin:hello\"\nmemory = \"12XB\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("unknown size unit"),
            "{e}"
        );
        let e = parse("[system]\n").unwrap_err().to_string();
        assert!(e.contains("kernel"), "{e}");
        let e = parse("[system\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let e = parse("[system]\nkernel = \"builtin:nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("system.kernel") && e.contains("hello"), "{e}");
        let e = parse("[system]\nkernel = \"builtin:hello\"\nargs = [1,2,3,4,5,6,7]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("system.args"), "{e}");
        let e = parse("[system]\nkernel = \"builtin:hello\"\nmemory = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("system.memory") && e.contains("too small"),
            "{e}"
        );
        let e = parse("[system]\nkernel = \"builtin:hello\"\n[system.cpu]\nhost_factor = -1.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host_factor"), "{e}");
    }

    #[test]
    fn linux_on_an_emulating_host_gets_the_examples_settings_unless_chosen() {
        let linux = || {
            parse("[system]\nkernel = \"vmlinuz\"\ninitrd = \"initrd.gz\"\n")
                .unwrap()
                .system
                .remove(0)
        };
        // Nothing chosen: both filled in, and one line says so and how to
        // choose otherwise.
        let mut s = linux();
        let note = s.adapt_linux_to_host(true).unwrap();
        assert_eq!(s.cpu.host_factor, Some(LINUX_EMULATED_HOST_FACTOR));
        assert_eq!(s.append.as_deref(), Some(LINUX_EMULATED_APPEND));
        assert!(!note.contains('\n'), "{note}");
        for part in [
            "host_factor = 0.1",
            LINUX_EMULATED_APPEND,
            "system.cpu.host_factor",
            "--append",
        ] {
            assert!(note.contains(part), "{part:?} missing from {note:?}");
        }
        // A host with VMX/SVM: nothing changes.
        let mut s = linux();
        assert_eq!(s.adapt_linux_to_host(false), None);
        assert_eq!((s.cpu.host_factor, s.append), (None, None));
        // The user's choices win, each on its own (an empty append too).
        let mut s = linux();
        s.cpu.host_factor = Some(1.0);
        let note = s.adapt_linux_to_host(true).unwrap();
        assert_eq!(s.cpu.host_factor, Some(1.0));
        assert_eq!(s.append.as_deref(), Some(LINUX_EMULATED_APPEND));
        assert!(!note.contains("host_factor"), "{note}");
        let mut s = linux();
        s.append = Some(String::new());
        let note = s.adapt_linux_to_host(true).unwrap();
        assert_eq!(s.append.as_deref(), Some(""));
        assert_eq!(s.cpu.host_factor, Some(LINUX_EMULATED_HOST_FACTOR));
        assert!(!note.contains("append"), "{note}");
        let mut s = linux();
        s.cpu.host_factor = Some(0.5);
        s.append = Some("quiet".into());
        assert_eq!(s.adapt_linux_to_host(true), None);
        assert_eq!(
            (s.cpu.host_factor, s.append.as_deref()),
            (Some(0.5), Some("quiet"))
        );
    }

    #[test]
    fn the_linux_defaults_are_the_examples() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/linux.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(
            c.system[0].cpu.host_factor,
            Some(LINUX_EMULATED_HOST_FACTOR)
        );
        assert_eq!(c.system[0].append.as_deref(), Some(LINUX_EMULATED_APPEND));
    }
}
