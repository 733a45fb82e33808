//! Drives a device with an access script ([`crate::script`]) the way a
//! system does, and checks what must hold whatever the guest does.
//!
//! Each step first lets simulated time pass: every deadline the device
//! names ([`TimedDevice::next_deadline`]) up to the new time is serviced
//! with [`TimedDevice::on_deadline`] at that tick, as the system's event
//! queue does ([`mem::service_tick`]: a deadline already past is due at
//! once, one at the end of time never). Then the step's access goes through [`BusDevice`] with an
//! [`AccessCtx`] (the sim-ops call arguments come from the record), or an
//! event happens that does not come from the bus (an interrupt line, the
//! CPU acknowledging an interrupt, input arriving). Requests the device
//! leaves are serviced as the system would (an EOI reaches the I/O APIC).
//!
//! Two instances of the device run the same script side by side. Reads
//! hand one instance a buffer of 0x00 bytes and the other one of 0xff
//! bytes: any difference in what they return means a read left requested
//! bytes unwritten (or that the device is not deterministic).
//!
//! Checked after every step, besides "no panic" (the targets are built
//! with debug assertions, so arithmetic overflow panics too):
//! * a read defines every byte it was asked for (the two instances agree);
//! * both instances return the same latency, requests and deadline;
//! * an access leaves at most one request per byte accessed (bounded);
//! * after `on_deadline` at tick T the next deadline is none or later than
//!   T (else the system would service the device at T forever);
//! * per device: an interrupt controller that reports a pending maskable
//!   interrupt hands out a vector when acknowledged, and one that reports
//!   none hands out nothing; interrupt line levels agree with the
//!   device's registers; queues stay within their documented bounds.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::i8042::I8042;
use devices::intc::VectorIntc;
use devices::ioapic::IoApic;
use devices::irq::{InterruptSink, IrqLine};
use devices::lapic::Lapic;
use devices::mailbox::{Mailbox, RX_CAPACITY};
use devices::pic::PicPair;
use devices::pit::{Pit, PORT_B_OFFSET};
use devices::rtc::Rtc;
use devices::simops::SimOps;
use devices::timer::IntervalTimer;
use devices::uart::{InputQueue, SerialInput, Uart16550, UART_PORTS};
use mem::{AccessCtx, BusDevice, CallArgs, RestoreError, SavedState, Space, TimedDevice};
use sim::intr::{InterruptController, Pending};
use sim::{Request, Stats, Tick};

use crate::script::{Kind, Op, Script};

/// Deadlines serviced per input at most; past that, simulated time stops
/// advancing (so a 1 ns timer and a day-long advance stay fast).
const MAX_EVENTS: usize = 4096;

/// A device (and what it is wired to) as one system holds it.
pub trait Rig {
    /// The device's name in messages.
    const NAME: &'static str;
    /// Its address windows as the device sees offsets: (space, first
    /// offset, length). A device attached through [`mem::Rebased`] sees
    /// its extra ranges at offsets of their own.
    const WINDOWS: &'static [(Space, u64, u64)];
    /// Builds the device; `param` is the script's header.
    fn build(param: u64) -> Self;
    /// The device's saved state ([`BusDevice::save`]).
    fn save(&self) -> SavedState;
    /// [`BusDevice::restore`] on the device.
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError>;
    fn read(&mut self, space: Space, offset: u64, data: &mut [u8], ctx: &mut AccessCtx) -> Tick;
    fn write(&mut self, space: Space, offset: u64, data: &[u8], ctx: &mut AccessCtx) -> Tick;
    /// Something that does not come through the bus.
    fn event(&mut self, _op: &Op, _ctx: &mut AccessCtx) {}
    fn next_deadline(&self) -> Option<Tick> {
        None
    }
    fn on_deadline(&mut self, _ctx: &mut AccessCtx) {}
    /// What the system does with a request the device left.
    fn service(&mut self, _req: &Request, _now: Tick) {}
    /// Device-specific checks after a step.
    fn check(&mut self, _now: Tick) {}
}

/// The calling CPU's argument registers, from a record.
struct Args([u64; 6]);

impl CallArgs for Args {
    fn call_args(&mut self) -> [u64; 6] {
        self.0
    }
}

fn args_of(op: &Op) -> Args {
    let (v, a) = (op.value, op.aux);
    Args([
        v,
        a,
        v.rotate_left(32),
        a.rotate_left(32),
        v ^ a,
        v.wrapping_add(a),
    ])
}

/// Runs `data` as a script on two instances of `R`; panics on a broken invariant.
pub fn run<R: Rig>(data: &[u8]) {
    let script = Script::decode(data);
    let mut pair = Pair {
        a: R::build(script.param),
        b: R::build(script.param),
        now: 0,
        events: MAX_EVENTS,
    };
    for op in &script.ops {
        pair.advance(pair.now.saturating_add(op.advance_ticks()));
        pair.step(op);
    }
}

/// Edits per `dev_restore` input at most.
const MAX_EDITS: usize = 8;
/// Bytes of one edit: a node (u16), an operation (u8), a value (u64).
const EDIT: usize = 11;

/// The `dev_restore` target on device `R`. The input: a count of edits
/// (byte 0, at most [`MAX_EDITS`]), the edits, then an access script.
/// The script runs on two instances, as in [`run`]; then one instance's
/// saved state, sent through a JSON string, must restore into a fresh
/// instance that saves exactly that state again. Then the edits change
/// the state (a node of the JSON tree, chosen by number: a number, a
/// negative or fractional one, a string, a boolean, null, an array cut
/// short, a field removed, an element repeated, a field added) and it is
/// restored into another fresh instance: refused, leaving that instance
/// as it was, or taken, when it saves exactly the state it took and runs
/// the script again from there (on two instances restored alike, with
/// every check of [`run`]). Never a panic.
pub fn run_restore<R: Rig>(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n) % (MAX_EDITS + 1);
    let (edits, script) = rest.split_at((n * EDIT).min(rest.len()));
    let script = Script::decode(script);
    let mut pair = Pair {
        a: R::build(script.param),
        b: R::build(script.param),
        now: 0,
        events: MAX_EVENTS,
    };
    for op in &script.ops {
        pair.advance(pair.now.saturating_add(op.advance_ticks()));
        pair.step(op);
    }
    let saved = pair.a.save();
    let text = serde_json::to_string(&saved).expect("a saved state is JSON");
    let back: SavedState = serde_json::from_str(&text).expect("JSON reads back");
    let mut fresh = R::build(script.param);
    if let Err(e) = fresh.restore(&back) {
        panic!("{}: its own saved state is refused: {e}\n{text}", R::NAME);
    }
    assert_eq!(
        fresh.save(),
        saved,
        "{}: a restored state saves differently",
        R::NAME
    );

    let mut edited = saved;
    for e in edits.chunks_exact(EDIT) {
        let node = usize::from(u16::from_le_bytes([e[0], e[1]]));
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[3..11]);
        edit(&mut edited, node, e[2], u64::from_le_bytes(v));
    }
    let mut other = R::build(script.param);
    let before = other.save();
    if other.restore(&edited).is_err() {
        assert_eq!(
            other.save(),
            before,
            "{}: a refused state changed the device",
            R::NAME
        );
        return;
    }
    assert_eq!(
        other.save(),
        edited,
        "{}: a state taken saves differently",
        R::NAME
    );
    let mut pair = Pair {
        a: other,
        b: R::build(script.param),
        now: pair.now,
        events: MAX_EVENTS,
    };
    pair.b
        .restore(&edited)
        .expect("the same state restores twice");
    for op in &script.ops {
        pair.advance(pair.now.saturating_add(op.advance_ticks()));
        pair.step(op);
    }
}

/// Nodes of a JSON tree (depth first, the root first).
fn count_nodes(v: &SavedState) -> usize {
    1 + match v {
        SavedState::Array(a) => a.iter().map(count_nodes).sum(),
        SavedState::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Node `n` of a JSON tree (depth first, the root first).
fn nth_node(v: &mut SavedState, n: usize) -> Option<&mut SavedState> {
    if n == 0 {
        return Some(v);
    }
    let mut n = n - 1;
    let children: Vec<&mut SavedState> = match v {
        SavedState::Array(a) => a.iter_mut().collect(),
        SavedState::Object(o) => o.values_mut().collect(),
        _ => return None,
    };
    for c in children {
        let size = count_nodes(c);
        if n < size {
            return nth_node(c, n);
        }
        n -= size;
    }
    None
}

/// Applies one hostile edit to node `node` (modulo the tree's size).
fn edit(state: &mut SavedState, node: usize, op: u8, value: u64) {
    let node = node % count_nodes(state);
    let Some(v) = nth_node(state, node) else {
        return;
    };
    let small = value % 512;
    *v = match (op % 9, std::mem::take(v)) {
        (0, _) => SavedState::from(value),
        (1, _) => SavedState::from(small),
        (2, _) => SavedState::from(-1 - (small as i64)),
        (3, _) => SavedState::from(value as f64 / 3.0),
        (4, _) => SavedState::from(format!("{value}")),
        (5, _) => SavedState::from(value & 1 != 0),
        (6, _) => SavedState::Null,
        (7, SavedState::Array(mut a)) => {
            a.truncate(value as usize % (a.len() + 1));
            SavedState::Array(a)
        }
        (7, SavedState::Object(mut o)) => {
            if let Some(k) = o.keys().nth(value as usize % o.len().max(1)).cloned() {
                o.remove(&k);
            }
            SavedState::Object(o)
        }
        (_, SavedState::Array(mut a)) => {
            if let Some(e) = a.get(value as usize % a.len().max(1)).cloned() {
                a.extend(std::iter::repeat_n(e, 1 + (value >> 32) as usize % 300));
            }
            SavedState::Array(a)
        }
        (_, SavedState::Object(mut o)) => {
            o.insert(format!("x{}", value % 4), SavedState::from(small));
            SavedState::Object(o)
        }
        (_, other) => other,
    };
}

struct Pair<R> {
    a: R,
    b: R,
    now: Tick,
    /// Deadlines left to service in this input.
    events: usize,
}

impl<R: Rig> Pair<R> {
    /// Services every deadline up to `to`, then moves the clock there.
    fn advance(&mut self, to: Tick) {
        loop {
            let d = self.a.next_deadline();
            assert_eq!(d, self.b.next_deadline(), "{}: deadlines differ", R::NAME);
            let at = match mem::service_tick(d, self.now) {
                Some(at) if at <= to => at,
                _ => break,
            };
            if self.events == 0 {
                return; // out of budget: time stops here
            }
            self.events -= 1;
            self.now = at;
            let (ra, rb) = (deadline(&mut self.a, at), deadline(&mut self.b, at));
            assert_eq!(ra, rb, "{}: on_deadline requests differ", R::NAME);
            self.serve(&ra, at);
            if let Some(next) = mem::service_tick(self.a.next_deadline(), 0) {
                assert!(
                    next > at,
                    "{}: after on_deadline at tick {at} the next deadline is {next}, not later: \
                     the system would service the device at tick {at} forever",
                    R::NAME
                );
            }
            self.a.check(at);
            self.b.check(at);
        }
        self.now = to;
    }

    fn serve(&mut self, reqs: &[Request], now: Tick) {
        for r in reqs {
            self.a.service(r, now);
            self.b.service(r, now);
        }
    }

    fn step(&mut self, op: &Op) {
        let now = self.now;
        let reqs = match op.kind {
            Kind::Idle => Vec::new(),
            Kind::Event => {
                let (ra, rb) = (event(&mut self.a, op, now), event(&mut self.b, op, now));
                assert_eq!(ra, rb, "{}: event requests differ", R::NAME);
                ra
            }
            Kind::Read | Kind::Write => {
                let (space, base, len) = R::WINDOWS[usize::from(op.window) % R::WINDOWS.len()];
                let size = u64::from(op.size).min(len);
                let offset = base + u64::from(op.offset) % (len - size + 1);
                let size = size as usize;
                let (ra, rb) = if op.kind == Kind::Read {
                    let mut da = [0x00u8; 8];
                    let mut db = [0xffu8; 8];
                    let ra = access(&mut self.a, op, now, |d, ctx| {
                        d.read(space, offset, &mut da[..size], ctx)
                    });
                    let rb = access(&mut self.b, op, now, |d, ctx| {
                        d.read(space, offset, &mut db[..size], ctx)
                    });
                    assert_eq!(
                        da[..size],
                        db[..size],
                        "{}: a {size}-byte read at offset {offset:#x} left bytes unwritten \
                         (0x00-filled and 0xff-filled buffers read back differently)",
                        R::NAME
                    );
                    (ra, rb)
                } else {
                    let bytes = op.value.to_le_bytes();
                    let ra = access(&mut self.a, op, now, |d, ctx| {
                        d.write(space, offset, &bytes[..size], ctx)
                    });
                    let rb = access(&mut self.b, op, now, |d, ctx| {
                        d.write(space, offset, &bytes[..size], ctx)
                    });
                    (ra, rb)
                };
                assert_eq!(ra, rb, "{}: latency or requests differ", R::NAME);
                assert!(
                    ra.1.len() <= size,
                    "{}: a {size}-byte access left {} requests: {:?}",
                    R::NAME,
                    ra.1.len(),
                    ra.1
                );
                ra.1
            }
        };
        self.serve(&reqs, now);
        self.a.check(now);
        self.b.check(now);
    }
}

fn access<R: Rig>(
    dev: &mut R,
    op: &Op,
    now: Tick,
    f: impl FnOnce(&mut R, &mut AccessCtx) -> Tick,
) -> (Tick, Vec<Request>) {
    let mut reqs = Vec::new();
    let mut args = args_of(op);
    let mut ctx = AccessCtx {
        now,
        cpu: Some(&mut args),
        requests: &mut reqs,
        cpu_index: 0,
    };
    let latency = f(dev, &mut ctx);
    (latency, reqs)
}

fn event<R: Rig>(dev: &mut R, op: &Op, now: Tick) -> Vec<Request> {
    let mut reqs = Vec::new();
    dev.event(op, &mut AccessCtx::new(now, &mut reqs));
    reqs
}

fn deadline<R: Rig>(dev: &mut R, now: Tick) -> Vec<Request> {
    let mut reqs = Vec::new();
    dev.on_deadline(&mut AccessCtx::new(now, &mut reqs));
    reqs
}

/// Checks the CPU's view of an interrupt controller: Maskable means a
/// vector on acknowledge, None means nothing. Acknowledges if `take`.
fn check_controller(c: &mut dyn InterruptController, take: bool, name: &str) -> Option<u8> {
    let pending = c.pending();
    if !take && pending != Pending::None {
        return None;
    }
    let v = c.acknowledge();
    match pending {
        Pending::Maskable => assert!(
            v.is_some(),
            "{name}: pending() says a maskable interrupt waits, acknowledge() returns none"
        ),
        Pending::None => assert!(
            v.is_none(),
            "{name}: pending() says nothing waits, acknowledge() returns vector {v:?}"
        ),
        Pending::Nmi => {}
    }
    v
}

/// An interrupt sink that keeps each line's level and counts rising edges.
#[derive(Default)]
pub struct Lines {
    levels: u64,
    rises: u64,
}

impl InterruptSink for Lines {
    fn set_line(&mut self, line: u32, level: bool) {
        let bit = 1u64 << (line % 64);
        if level && self.levels & bit == 0 {
            self.rises += 1;
        }
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
    }
}

impl Lines {
    fn level(&self, line: u32) -> bool {
        self.levels & (1 << line) != 0
    }
}

fn line_to(lines: &Arc<Mutex<Lines>>, n: u32) -> IrqLine {
    IrqLine::none().to(lines.clone(), n)
}

// ---------------------------------------------------------------------------
// The rigs.

/// A byte sink that keeps what was written (bounded by the script length).
#[derive(Clone, Default)]
pub struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        mem::lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// COM1: ports 0x3f8-0x3ff, IRQ4; events feed its input (as the host's
/// stdin does: at most what the guest is ready for).
pub struct UartRig {
    dev: Uart16550,
    input: InputQueue,
    lines: Arc<Mutex<Lines>>,
    _stats: Stats,
}

impl Rig for UartRig {
    const NAME: &'static str = "uart";
    const WINDOWS: &'static [(Space, u64, u64)] = &[(Space::Pio, 0, UART_PORTS)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_: u64) -> Self {
        let mut stats = Stats::new();
        let input: InputQueue = Arc::new(SerialInput::default());
        let lines = Arc::new(Mutex::new(Lines::default()));
        let mut dev = Uart16550::new(
            Box::new(Sink::default()),
            Some(input.clone()),
            &mut stats,
            "uart",
        )
        .expect("stats");
        dev.set_irq_line(line_to(&lines, 4));
        UartRig {
            dev,
            input,
            lines,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        let t = self.dev.read(s, o, d, c);
        self.check_line();
        t
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        let t = self.dev.write(s, o, d, c);
        self.check_line();
        t
    }
    fn event(&mut self, op: &Op, _: &mut AccessCtx) {
        // As the stdin feeder: no more than the guest is ready for.
        let n = usize::from(op.size).min(self.input.wanted());
        self.input.push(&op.value.to_le_bytes()[..n]);
    }
}

impl UartRig {
    /// After a guest access, IRQ4 is at the level the registers call for.
    fn check_line(&mut self) {
        let want = self.dev.irq_level();
        let have = mem::lock(&self.lines).level(4);
        assert_eq!(
            have,
            want,
            "uart: after the access IRQ4 is {have}, but IIR says an interrupt is {}",
            if want { "pending" } else { "not pending" }
        );
    }
}

/// Sim-ops: the 64 KiB MMIO window at 0xffff0000; call arguments from the record.
pub struct SimOpsRig {
    dev: SimOps,
    _stats: Stats,
}

impl Rig for SimOpsRig {
    const NAME: &'static str = "simops";
    const WINDOWS: &'static [(Space, u64, u64)] = &[(Space::Mmio, 0, devices::simops::SIMOPS_SIZE)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_: u64) -> Self {
        let mut stats = Stats::new();
        let dev = SimOps::new(&mut stats, "simops").expect("stats");
        SimOpsRig { dev, _stats: stats }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
}

/// The interval timer (MMIO) raising vectors into the bare platform's controller.
pub struct TimerRig {
    dev: IntervalTimer,
    intc: Arc<Mutex<VectorIntc>>,
    _stats: Stats,
}

impl Rig for TimerRig {
    const NAME: &'static str = "timer";
    const WINDOWS: &'static [(Space, u64, u64)] = &[(Space::Mmio, 0, devices::timer::TIMER_SIZE)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_: u64) -> Self {
        let mut stats = Stats::new();
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let dev = IntervalTimer::new(intc.clone(), &mut stats, "timer").expect("stats");
        TimerRig {
            dev,
            intc,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn event(&mut self, op: &Op, _: &mut AccessCtx) {
        let mut intc = mem::lock(&self.intc);
        if op.aux & 1 != 0 {
            intc.take_nmi();
        }
        check_controller(&mut *intc, true, "timer's controller");
    }
    fn next_deadline(&self) -> Option<Tick> {
        self.dev.next_deadline()
    }
    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.dev.on_deadline(ctx)
    }
    fn check(&mut self, _: Tick) {
        check_controller(&mut *mem::lock(&self.intc), false, "timer's controller");
    }
}

/// A link's mailbox; events are values arriving from the other end
/// (`aux % 5000` of them, past the receive queue's capacity).
pub struct MailboxRig {
    dev: Mailbox,
    _intc: Arc<Mutex<VectorIntc>>,
    _stats: Stats,
}

impl Rig for MailboxRig {
    const NAME: &'static str = "mailbox";
    const WINDOWS: &'static [(Space, u64, u64)] =
        &[(Space::Mmio, 0, devices::mailbox::MAILBOX_SIZE)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(param: u64) -> Self {
        let mut stats = Stats::new();
        let intc = Arc::new(Mutex::new(VectorIntc::new()));
        let dev = Mailbox::new(
            (param & 0xff) as u32,
            param >> 8,
            intc.clone(),
            &mut stats,
            "link",
        )
        .expect("stats");
        MailboxRig {
            dev,
            _intc: intc,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn event(&mut self, op: &Op, _: &mut AccessCtx) {
        for i in 0..op.aux % 5000 {
            self.dev.deliver(op.value.wrapping_add(i));
        }
    }
    fn check(&mut self, now: Tick) {
        // RX_COUNT (+0x10) reads without side effects.
        let mut d = [0u8; 8];
        let mut reqs = Vec::new();
        self.dev.read(
            Space::Mmio,
            0x10,
            &mut d,
            &mut AccessCtx::new(now, &mut reqs),
        );
        let n = u64::from_le_bytes(d);
        assert!(
            n <= RX_CAPACITY as u64,
            "mailbox: {n} values waiting, more than the capacity {RX_CAPACITY}"
        );
    }
}

/// The 8259 pair at 0x20, 0xa0 and the ELCR at 0x4d0 (absolute ports as
/// offsets, as the system attaches it). Events: an ISA line changes
/// (`aux` bit 0 set; line `value % 20`, so also lines it does not have,
/// level `aux` bit 1) or the CPU acknowledges (INTA).
pub struct PicRig {
    dev: PicPair,
}

impl Rig for PicRig {
    const NAME: &'static str = "pic";
    const WINDOWS: &'static [(Space, u64, u64)] = &[
        (Space::Pio, devices::pic::MASTER_BASE, 2),
        (Space::Pio, devices::pic::SLAVE_BASE, 2),
        (Space::Pio, devices::pic::ELCR_BASE, 2),
    ];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_: u64) -> Self {
        PicRig {
            dev: PicPair::new(),
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn event(&mut self, op: &Op, _: &mut AccessCtx) {
        if op.aux & 1 != 0 {
            self.dev.set_line((op.value % 20) as u32, op.aux & 2 != 0);
        } else {
            check_controller(&mut self.dev, true, "pic");
        }
    }
    fn check(&mut self, _: Tick) {
        check_controller(&mut self.dev, false, "pic");
    }
}

/// The PIT at 0x40-0x43 and port B (0x61, at offset 0x21); channel 0's
/// output drives IRQ0.
pub struct PitRig {
    dev: Pit,
    _lines: Arc<Mutex<Lines>>,
    _stats: Stats,
}

impl Rig for PitRig {
    const NAME: &'static str = "pit";
    const WINDOWS: &'static [(Space, u64, u64)] =
        &[(Space::Pio, 0, 4), (Space::Pio, PORT_B_OFFSET, 1)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_: u64) -> Self {
        let mut stats = Stats::new();
        let lines = Arc::new(Mutex::new(Lines::default()));
        let dev = Pit::new(line_to(&lines, 0), &mut stats, "pit").expect("stats");
        PitRig {
            dev,
            _lines: lines,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn next_deadline(&self) -> Option<Tick> {
        self.dev.next_deadline()
    }
    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.dev.on_deadline(ctx)
    }
}

/// The CMOS RTC at 0x70-0x71 (IRQ8), starting at Unix time `param`.
pub struct RtcRig {
    dev: Rtc,
    _lines: Arc<Mutex<Lines>>,
    _stats: Stats,
}

impl Rig for RtcRig {
    const NAME: &'static str = "rtc";
    const WINDOWS: &'static [(Space, u64, u64)] = &[(Space::Pio, 0, 2)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(param: u64) -> Self {
        let mut stats = Stats::new();
        let lines = Arc::new(Mutex::new(Lines::default()));
        let dev = Rtc::new(param as i64, line_to(&lines, 8), &mut stats, "rtc").expect("stats");
        RtcRig {
            dev,
            _lines: lines,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn next_deadline(&self) -> Option<Tick> {
        self.dev.next_deadline()
    }
    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.dev.on_deadline(ctx)
    }
}

/// The i8042 at 0x60 and 0x64 (at offset 4), IRQ1.
pub struct I8042Rig {
    dev: I8042,
    _lines: Arc<Mutex<Lines>>,
}

impl Rig for I8042Rig {
    const NAME: &'static str = "i8042";
    const WINDOWS: &'static [(Space, u64, u64)] = &[(Space::Pio, 0, 1), (Space::Pio, 4, 1)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_: u64) -> Self {
        let lines = Arc::new(Mutex::new(Lines::default()));
        I8042Rig {
            dev: I8042::new(line_to(&lines, 1)),
            _lines: lines,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
}

/// Writes a 32-bit local APIC register.
fn lapic_write(lapic: &mut Lapic, reg: u64, v: u32, now: Tick) -> Vec<Request> {
    let mut reqs = Vec::new();
    lapic.write(
        Space::Mmio,
        reg,
        &v.to_le_bytes(),
        &mut AccessCtx::new(now, &mut reqs),
    );
    reqs
}

/// The I/O APIC (MMIO) delivering to one local APIC (software-enabled).
/// Events: a pin changes (`aux` bit 0 set; pin `value % 32`, so also pins
/// it does not have, level `aux` bit 1), or the CPU acknowledges the local
/// APIC's interrupt and writes its EOI (the EOI broadcast reaches the I/O
/// APIC as in a system).
pub struct IoApicRig {
    dev: Arc<Mutex<IoApic>>,
    lapic: Arc<Mutex<Lapic>>,
    _stats: Stats,
}

impl Rig for IoApicRig {
    const NAME: &'static str = "ioapic";
    const WINDOWS: &'static [(Space, u64, u64)] = &[(Space::Mmio, 0, devices::ioapic::IOAPIC_SIZE)];
    fn save(&self) -> SavedState {
        mem::lock(&self.dev).save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        mem::lock(&self.dev).restore(state)
    }
    fn build(_: u64) -> Self {
        let mut stats = Stats::new();
        let lapic = Arc::new(Mutex::new(
            Lapic::new(0, 1_000_000_000, None, &mut stats, "apic").expect("stats"),
        ));
        lapic_write(&mut mem::lock(&lapic), 0xf0, 0x1ff, 0);
        let dev = Arc::new(Mutex::new(
            IoApic::new(1, vec![lapic.clone()], &mut stats, "ioapic").expect("stats"),
        ));
        IoApicRig {
            dev,
            lapic,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        mem::lock(&self.dev).read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        mem::lock(&self.dev).write(s, o, d, c)
    }
    fn event(&mut self, op: &Op, ctx: &mut AccessCtx) {
        if op.aux & 1 != 0 {
            mem::lock(&self.dev).set_line((op.value % 32) as u32, op.aux & 2 != 0);
        } else {
            let mut lapic = mem::lock(&self.lapic);
            lapic.take_nmi();
            check_controller(&mut *lapic, true, "ioapic's local apic");
            let reqs = lapic_write(&mut lapic, 0xb0, 0, ctx.now);
            ctx.requests.extend(reqs);
        }
    }
    fn service(&mut self, req: &Request, _: Tick) {
        if let Request::Eoi { vector } = req {
            mem::lock(&self.dev).eoi(*vector);
        }
    }
    fn check(&mut self, _: Tick) {
        check_controller(&mut *mem::lock(&self.lapic), false, "ioapic's local apic");
    }
}

/// The local APIC (MMIO) with the 8259 pair behind LINT0, as on a PC.
/// Events, by `aux % 8`: a fixed interrupt arrives (vector `value`,
/// level-triggered if `aux` bit 3), an NMI, INIT, SIPI, the CPU
/// acknowledges (and takes an NMI), the CPU writes CR8, an 8259 line
/// changes or an 8259 port is written (so ExtINT can be reached).
pub struct LapicRig {
    dev: Lapic,
    pic: Arc<Mutex<PicPair>>,
    _stats: Stats,
}

impl Rig for LapicRig {
    const NAME: &'static str = "lapic";
    const WINDOWS: &'static [(Space, u64, u64)] = &[(Space::Mmio, 0, devices::lapic::LAPIC_SIZE)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_: u64) -> Self {
        let mut stats = Stats::new();
        let pic = Arc::new(Mutex::new(PicPair::new()));
        let dev =
            Lapic::new(0, 1_000_000_000, Some(pic.clone()), &mut stats, "apic").expect("stats");
        LapicRig {
            dev,
            pic,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn event(&mut self, op: &Op, _: &mut AccessCtx) {
        let v = op.value as u8;
        match op.aux % 8 {
            0 => self.dev.deliver(v, op.aux & 8 != 0),
            1 => self.dev.deliver_nmi(),
            2 => self.dev.deliver_init(),
            3 => self.dev.deliver_sipi(v),
            4 => {
                self.dev.take_nmi();
                check_controller(&mut self.dev, true, "lapic");
            }
            5 => self.dev.set_task_priority(v),
            6 => mem::lock(&self.pic).set_line(u32::from(v % 16), op.aux & 16 != 0),
            _ => {
                let port = [0x20, 0x21, 0xa0, 0xa1][usize::from(v % 4)];
                mem::lock(&self.pic).write_port_for_test(port, (op.value >> 8) as u8);
            }
        }
    }
    fn next_deadline(&self) -> Option<Tick> {
        self.dev.next_deadline()
    }
    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.dev.on_deadline(ctx)
    }
    fn check(&mut self, _: Tick) {
        check_controller(&mut self.dev, false, "lapic");
    }
}

/// RAM of the virtio rig: small, so that addresses from a script land in it.
const VIRTIO_RAM: u64 = 0x10000;

/// A virtio-mmio block device over a 64-sector disk in memory, with 64 KiB
/// of guest RAM. Events write guest RAM (`value`, 8 bytes at `aux` modulo
/// the RAM; `aux` bit 63 set: at the queue's places, descriptor table
/// 0x1000, available ring 0x2000, used ring 0x3000, plus `aux` bits 0-11),
/// so a script can build rings and chains. The header's bit 0 makes the
/// disk read-only. Checked: requests in flight stay within the queue's
/// size; a read-only disk is never written.
pub struct VirtioBlkRig {
    dev: devices::virtio::VirtioMmio<devices::virtio::blk::Block>,
    mem: vm_memory::GuestMemoryMmap,
    disk: Arc<Mutex<devices::disk::MemDisk>>,
    read_only: bool,
    _stats: Stats,
}

/// The rig's disk, shared so that checks can see it.
struct SharedDisk(Arc<Mutex<devices::disk::MemDisk>>);

impl devices::disk::Disk for SharedDisk {
    fn size(&self) -> u64 {
        mem::lock(&self.0).size()
    }
    fn read_only(&self) -> bool {
        mem::lock(&self.0).read_only()
    }
    fn read_at(&mut self, o: u64, b: &mut [u8]) -> std::io::Result<()> {
        mem::lock(&self.0).read_at(o, b)
    }
    fn write_at(&mut self, o: u64, b: &[u8]) -> std::io::Result<()> {
        mem::lock(&self.0).write_at(o, b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        mem::lock(&self.0).flush()
    }
}

impl Rig for VirtioBlkRig {
    const NAME: &'static str = "virtio-blk";
    const WINDOWS: &'static [(Space, u64, u64)] =
        &[(Space::Mmio, 0, devices::virtio::VIRTIO_MMIO_SIZE)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(param: u64) -> Self {
        use devices::disk::Disk;
        let mut stats = Stats::new();
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(
            vm_memory::GuestAddress(0),
            VIRTIO_RAM as usize,
        )])
        .expect("RAM");
        let read_only = param & 1 != 0;
        let mut d = devices::disk::MemDisk::new(64);
        d.read_only = read_only;
        let disk = Arc::new(Mutex::new(d));
        assert_eq!(mem::lock(&disk).size(), 64 * 512);
        let blk = devices::virtio::blk::Block::new(
            Box::new(SharedDisk(disk.clone())),
            devices::virtio::blk::BlkTiming {
                latency: 10_000_000,
                bandwidth: 100_000_000,
            },
            "fuzz",
            &mut stats,
            "disk0",
        )
        .expect("stats");
        let dev = devices::virtio::VirtioMmio::new(
            blk,
            mem.clone(),
            IrqLine::none(),
            &mut stats,
            "disk0",
        )
        .expect("stats");
        VirtioBlkRig {
            dev,
            mem,
            disk,
            read_only,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn event(&mut self, op: &Op, _: &mut AccessCtx) {
        use vm_memory::Bytes;
        let addr = if op.aux >> 63 != 0 {
            [0x1000u64, 0x2000, 0x3000][(op.aux >> 12) as usize % 3] + (op.aux & 0xfff)
        } else {
            op.aux % VIRTIO_RAM
        };
        let _ = self
            .mem
            .write_slice(&op.value.to_le_bytes(), vm_memory::GuestAddress(addr));
    }
    fn next_deadline(&self) -> Option<Tick> {
        self.dev.next_deadline()
    }
    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.dev.on_deadline(ctx)
    }
    fn check(&mut self, _: Tick) {
        let n = self.dev.device().inflight();
        assert!(
            n <= usize::from(devices::virtio::blk::QUEUE_SIZE),
            "virtio-blk: {n} requests in flight"
        );
        if self.read_only {
            assert!(
                mem::lock(&self.disk).data.iter().all(|&b| b == 0),
                "virtio-blk: a read-only disk was written"
            );
        }
    }
}

/// A virtio-mmio network device connected to a 1 GB/s wire with 10 us of
/// latency, with 64 KiB of guest RAM. Events write guest RAM (`value`, 8
/// bytes at `aux` modulo the RAM; `aux` bit 63 set: at the queues' places,
/// receive queue 0x1000/0x2000/0x3000 and transmit queue
/// 0x4000/0x5000/0x6000, plus `aux` bits 0-11), or, with `aux` bit 62
/// set, deliver a frame from the wire (`value` bits 0-10 its length, bits
/// 16-23 its bytes). Checked: frames in transmission, waiting for a buffer
/// and sent stay within their bounds; every frame sent has a valid length
/// and arrives after it was sent, at or after the wire's latency.
pub struct VirtioNetRig {
    dev: devices::virtio::VirtioMmio<devices::virtio::net::Net>,
    mem: vm_memory::GuestMemoryMmap,
    _stats: Stats,
}

const NET_WIRE: devices::virtio::net::Wire = devices::virtio::net::Wire {
    latency: 10_000_000,
    bandwidth: 1_000_000_000,
};

impl Rig for VirtioNetRig {
    const NAME: &'static str = "virtio-net";
    const WINDOWS: &'static [(Space, u64, u64)] =
        &[(Space::Mmio, 0, devices::virtio::VIRTIO_MMIO_SIZE)];
    fn save(&self) -> SavedState {
        self.dev.save()
    }
    fn restore(&mut self, state: &SavedState) -> Result<(), RestoreError> {
        self.dev.restore(state)
    }
    fn build(_param: u64) -> Self {
        let mut stats = Stats::new();
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(
            vm_memory::GuestAddress(0),
            VIRTIO_RAM as usize,
        )])
        .expect("RAM");
        let net =
            devices::virtio::net::Net::new([2, 0, 0, 0, 0, 1], Some(NET_WIRE), &mut stats, "nic0")
                .expect("stats");
        let dev =
            devices::virtio::VirtioMmio::new(net, mem.clone(), IrqLine::none(), &mut stats, "nic0")
                .expect("stats");
        VirtioNetRig {
            dev,
            mem,
            _stats: stats,
        }
    }
    fn read(&mut self, s: Space, o: u64, d: &mut [u8], c: &mut AccessCtx) -> Tick {
        self.dev.read(s, o, d, c)
    }
    fn write(&mut self, s: Space, o: u64, d: &[u8], c: &mut AccessCtx) -> Tick {
        self.dev.write(s, o, d, c)
    }
    fn event(&mut self, op: &Op, _: &mut AccessCtx) {
        use vm_memory::Bytes;
        if op.aux >> 62 == 1 {
            let len = (op.value & 0x7ff) as usize;
            let frame: Arc<[u8]> = vec![(op.value >> 16) as u8; len].into();
            self.dev.act(|d, q, m, live| d.deliver(frame, q, m, live));
            return;
        }
        let addr = if op.aux >> 63 != 0 {
            [0x1000u64, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000][(op.aux >> 12) as usize % 6]
                + (op.aux & 0xfff)
        } else {
            op.aux % VIRTIO_RAM
        };
        let _ = self
            .mem
            .write_slice(&op.value.to_le_bytes(), vm_memory::GuestAddress(addr));
    }
    fn next_deadline(&self) -> Option<Tick> {
        self.dev.next_deadline()
    }
    fn on_deadline(&mut self, ctx: &mut AccessCtx) {
        self.dev.on_deadline(ctx)
    }
    fn check(&mut self, _: Tick) {
        use devices::virtio::net::*;
        let n = self.dev.device();
        assert!(
            n.tx_in_flight() <= usize::from(QUEUE_SIZE),
            "virtio-net: tx"
        );
        assert!(n.backlog() <= RX_BACKLOG, "virtio-net: backlog");
        for f in self.dev.device_mut().take_sent() {
            assert!(
                (MIN_FRAME..=MAX_FRAME).contains(&f.data.len()),
                "virtio-net: a frame of {} bytes sent",
                f.data.len()
            );
            assert!(
                f.at >= f.sent.saturating_add(NET_WIRE.latency),
                "virtio-net: a frame arrives before it could"
            );
        }
    }
}
