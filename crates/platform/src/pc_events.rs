//! PC events (`[[system.cpu.pc_event]]`): an action each time a CPU is
//! about to execute the instruction at an address.
//!
//! An event's address is a number or a symbol, looked up in `system.symbols`
//! (a System.map) or else in the kernel's ELF symbol table (a built-in
//! guest, an ELF given with `--kernel`, a Linux kernel's vmlinux when it has
//! symbols). Every distinct address takes one hardware execution breakpoint
//! on every CPU of the system, through the CPU's one guest-debug owner
//! (`kvm::arch::x86_64::guest_debug`): there are four debug registers, and
//! the SYSCALL repair keeps one where it runs, so at most 4 (or 3)
//! distinct addresses; more are refused before the guest starts. Software
//! breakpoints are not used: they write `int3` into guest memory (which the
//! guest can read, checksum or overwrite) and need the code in place before
//! the run starts.
//!
//! When a breakpoint fires, the KVM CPU reports the address; the system
//! counts the event in `CPU.pcEvents::NAME` and schedules its action on the
//! system's queue at the tick the CPU reached the address (the tick its
//! next event is at, as for an IO access). The CPU steps over the
//! instruction with the breakpoint off and no interrupt injected, then arms
//! it again.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{PcAction, PcAddr, SystemConfig};
use crate::PlatformError;

/// The largest System.map kvmsim reads (Debian's is about 5 MiB).
pub const MAX_SYSTEM_MAP: u64 = 256 << 20;

/// One PC event, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcEvent {
    /// Its name in the statistics.
    pub name: String,
    pub addr: u64,
    pub action: PcAction,
}

/// A system's PC events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PcEvents {
    pub events: Vec<PcEvent>,
}

impl PcEvents {
    /// The distinct addresses, in the order of their first event.
    pub fn addresses(&self) -> Vec<u64> {
        let mut v: Vec<u64> = Vec::new();
        for e in &self.events {
            if !v.contains(&e.addr) {
                v.push(e.addr);
            }
        }
        v
    }

    /// The events at `addr`, with their index.
    pub fn at(&self, addr: u64) -> impl Iterator<Item = (usize, &PcEvent)> {
        self.events
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.addr == addr)
    }

    /// The events' names, in order (the statistics' subnames).
    pub fn names(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.name.as_str()).collect()
    }
}

/// A symbol table: each name with its address, or the addresses of a name
/// defined more than once (ambiguous).
#[derive(Debug, Default)]
pub struct Symbols {
    /// Where the symbols came from (for messages).
    pub source: String,
    map: HashMap<String, Vec<u64>>,
}

impl Symbols {
    fn insert(&mut self, name: &str, addr: u64) {
        let v = self.map.entry(name.to_string()).or_default();
        if !v.contains(&addr) {
            v.push(addr);
        }
    }

    /// The number of names.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if there are no symbols.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The address of `name`, or why there is none.
    pub fn lookup(&self, name: &str) -> Result<u64, String> {
        match self.map.get(name).map(Vec::as_slice) {
            Some([a]) => Ok(*a),
            Some(many) => {
                let v: Vec<String> = many.iter().map(|a| format!("{a:#x}")).collect();
                Err(format!(
                    "{name} is defined at several addresses in {} ({}): give the address instead",
                    self.source,
                    v.join(", ")
                ))
            }
            None => Err(format!(
                "no symbol {name:?} in {} ({} symbols)",
                self.source,
                self.len()
            )),
        }
    }

    /// The defined symbols of an ELF image (`file` names it in messages):
    /// functions, objects and plain labels; sections, files and undefined
    /// symbols are left out.
    pub fn from_elf(image: &[u8], file: &str) -> Result<Self, String> {
        use object::{Object, ObjectSymbol, SymbolKind};
        let f = object::File::parse(image)
            .map_err(|e| format!("{file} is not an ELF file kvmsim can read symbols from: {e}"))?;
        let mut s = Symbols {
            source: format!("the ELF symbol table of {file}"),
            map: HashMap::new(),
        };
        for sym in f.symbols() {
            if sym.is_undefined() || matches!(sym.kind(), SymbolKind::Section | SymbolKind::File) {
                continue;
            }
            if let Ok(name) = sym.name() {
                if !name.is_empty() {
                    s.insert(name, sym.address());
                }
            }
        }
        if s.is_empty() {
            return Err(format!(
                "{file} has no symbol table (stripped?): give the address, or a System.map \
                 in system.symbols"
            ));
        }
        Ok(s)
    }

    /// The symbols of a System.map text (`ADDRESS TYPE NAME` per line, as
    /// `nm` writes them); `file` names it in messages. A line that is not
    /// in that form is an error naming its number.
    pub fn from_system_map(text: &str, file: &str) -> Result<Self, String> {
        let mut s = Symbols {
            source: file.to_string(),
            map: HashMap::new(),
        };
        for (i, line) in text.lines().enumerate() {
            let mut w = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name), None) =
                (w.next(), w.next(), w.next(), w.next())
            else {
                if line.trim().is_empty() {
                    continue;
                }
                return Err(format!(
                    "{file}:{}: not a System.map line (ADDRESS TYPE NAME): {:?}",
                    i + 1,
                    line.chars().take(80).collect::<String>()
                ));
            };
            let addr = u64::from_str_radix(addr, 16)
                .map_err(|_| format!("{file}:{}: {addr:?} is not a hexadecimal address", i + 1))?;
            // Undefined (U, w, v) symbols have no address of their own.
            if !matches!(kind, "U" | "w" | "v") {
                s.insert(name, addr);
            }
        }
        if s.is_empty() {
            return Err(format!("{file} holds no symbols"));
        }
        Ok(s)
    }
}

/// Resolves the PC events of system `name` (config `sc`): numbers as they
/// are, symbols through `system.symbols` or the kernel's ELF symbols
/// (`elf()` gives the image, read only if a symbol needs it). Fills in each
/// event's `address`. Errors name the field, the value and the file.
pub fn resolve<'a>(
    name: &str,
    sc: &mut SystemConfig,
    elf: impl FnOnce() -> Result<std::borrow::Cow<'a, [u8]>, PlatformError>,
) -> Result<Arc<PcEvents>, PlatformError> {
    let field = |k: usize| {
        if name == "system" {
            format!("system.cpu.pc_event[{k}].at")
        } else {
            format!("{name}.cpu.pc_event[{k}].at")
        }
    };
    let needs_symbols = sc
        .cpu
        .pc_event
        .iter()
        .any(|e| matches!(e.at.literal(), Ok(None)));
    let symbols = if !needs_symbols {
        None
    } else if let Some(map) = &sc.symbols {
        let limit = crate::input::Limit {
            bytes: MAX_SYSTEM_MAP,
            why: "the limit for symbol files".into(),
        };
        let bytes = crate::input::read_file(map, "system.symbols file", &limit)?;
        let text = String::from_utf8_lossy(&bytes);
        Some(
            Symbols::from_system_map(&text, map)
                .map_err(|e| PlatformError::Setup(format!("system.symbols = {map:?}: {e}")))?,
        )
    } else {
        let image = elf()?;
        Some(
            Symbols::from_elf(&image, &sc.kernel)
                .map_err(|e| PlatformError::Setup(format!("system.cpu.pc_event: {e}")))?,
        )
    };
    let mut events = Vec::with_capacity(sc.cpu.pc_event.len());
    for (k, e) in sc.cpu.pc_event.iter_mut().enumerate() {
        let addr = match e.at.literal() {
            Ok(Some(a)) => a,
            Ok(None) => {
                let PcAddr::Text(sym) = &e.at else {
                    unreachable!("a number is always a literal")
                };
                let Some(s) = &symbols else {
                    unreachable!("symbols are read when a name needs them")
                };
                s.lookup(sym)
                    .map_err(|why| PlatformError::Setup(format!("{} = {sym:?}: {why}", field(k))))?
            }
            Err(why) => {
                return Err(PlatformError::Setup(format!(
                    "{} = {:?}: {why}",
                    field(k),
                    e.at
                )))
            }
        };
        e.address = Some(addr);
        events.push(PcEvent {
            name: e.stat_name(),
            addr,
            action: e.action,
        });
    }
    Ok(Arc::new(PcEvents { events }))
}

/// Checks that `events` fit this host: enough free debug registers
/// (`repair`: the SYSCALL repair holds one), and breakpoints that trap at
/// all. Says once, at start, where they cannot trap (user-mode code on a
/// host whose KVM runs it natively).
pub fn check_host(name: &str, events: &PcEvents, repair: bool) -> Result<(), PlatformError> {
    if events.events.is_empty() {
        return Ok(());
    }
    let addrs = events.addresses();
    let slots = kvm::arch::x86_64::guest_debug::HW_SLOTS - usize::from(repair);
    if addrs.len() > slots {
        let list: Vec<String> = addrs.iter().map(|a| format!("{a:#x}")).collect();
        let why = if repair {
            format!(
                "{} debug registers, one of them held by the SYSCALL repair this host needs \
                 (system.cpu.syscall_repair = false frees it, for guests that make no system \
                 calls from user mode)",
                kvm::arch::x86_64::guest_debug::HW_SLOTS
            )
        } else {
            format!(
                "{} debug registers",
                kvm::arch::x86_64::guest_debug::HW_SLOTS
            )
        };
        return Err(PlatformError::Setup(format!(
            "{name}.cpu.pc_event: {} distinct addresses ({}) need a hardware breakpoint each; \
             a CPU has {why}: at most {slots} addresses (several events may share one)",
            addrs.len(),
            list.join(", ")
        )));
    }
    if !kvm::probe::hw_breakpoint_works(0)? {
        return Err(PlatformError::Setup(format!(
            "{name}.cpu.pc_event: this host's KVM does not stop guest code at hardware \
             breakpoints (probe at CPL0), so no PC event could fire"
        )));
    }
    if !kvm::probe::hw_breakpoint_works(3)? && crate::console::first_time("pc-event-cpl3") {
        tracing::warn!(
            "{name}.cpu.pc_event: this host's KVM runs user-mode (CPL3) guest code natively \
             and does not stop it at hardware breakpoints (probe at CPL3): PC events fire only \
             where the guest reaches them in kernel mode (CPL0); {} never fire in user mode",
            events.names().join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PcEventConfig, SystemConfig};

    #[test]
    fn system_map_lines_and_ambiguous_names() {
        let text = "ffffffff81000000 T _text\n\
                    ffffffff81001000 t helper\n\
                    ffffffff81002000 t helper\n\
                    0000000000000000 U undefined_here\n\
                    \n\
                    ffffffff81003000 T kernel_init\n";
        let s = Symbols::from_system_map(text, "System.map").unwrap();
        assert_eq!(s.lookup("kernel_init").unwrap(), 0xffff_ffff_8100_3000);
        let e = s.lookup("helper").unwrap_err();
        assert!(
            e.contains("several addresses") && e.contains("0xffffffff81002000"),
            "{e}"
        );
        let e = s.lookup("undefined_here").unwrap_err();
        assert!(
            e.contains("no symbol \"undefined_here\" in System.map"),
            "{e}"
        );
        let e = Symbols::from_system_map("ffff T a\ntwo words\n", "m").unwrap_err();
        assert!(e.starts_with("m:2: not a System.map line"), "{e}");
        let e = Symbols::from_system_map("zz T a\n", "m").unwrap_err();
        assert!(
            e.contains("m:1: \"zz\" is not a hexadecimal address"),
            "{e}"
        );
        assert!(Symbols::from_system_map("", "m").is_err());
    }

    #[test]
    fn builtin_guests_have_symbols() {
        let elf = guests::builtin("gdbdemo").unwrap();
        let s = Symbols::from_elf(elf, "builtin:gdbdemo").unwrap();
        let triple = s.lookup("triple").unwrap();
        assert!(triple >= 0x10_0000, "{triple:#x}");
        assert!(s.lookup("nosuch").unwrap_err().contains("no symbol"));
        assert!(Symbols::from_elf(b"not an elf", "x")
            .unwrap_err()
            .contains("not an ELF"));
    }

    fn config(at: &[(PcAddr, PcAction)]) -> SystemConfig {
        let mut c = crate::Config::for_kernel("builtin:gdbdemo")
            .system
            .remove(0);
        c.cpu.pc_event = at
            .iter()
            .map(|(at, action)| PcEventConfig {
                at: at.clone(),
                action: *action,
                name: None,
                address: None,
            })
            .collect();
        c
    }

    #[test]
    fn resolves_numbers_and_symbols_and_names_the_field() {
        let mut sc = config(&[
            (PcAddr::Number(0x10_0000), PcAction::Count),
            (PcAddr::Text("0x100010".into()), PcAction::DumpStats),
            (PcAddr::Text("triple".into()), PcAction::Count),
        ]);
        let image = || crate::system::read_image("builtin:gdbdemo").map(Into::into);
        let ev = resolve("system", &mut sc, image).unwrap();
        assert_eq!(ev.events.len(), 3);
        assert_eq!(ev.events[0].name, "0x100000");
        assert_eq!(ev.events[1].addr, 0x10_0010);
        assert_eq!(ev.events[2].name, "triple");
        assert_eq!(sc.cpu.pc_event[2].address, Some(ev.events[2].addr));
        assert_eq!(ev.addresses().len(), 3);
        // Numbers only: the image is never read.
        let mut sc = config(&[(PcAddr::Number(5), PcAction::Exit)]);
        resolve("system", &mut sc, || panic!("read")).unwrap();
        // An unknown symbol names the field, the value and the file.
        let mut sc = config(&[
            (PcAddr::Number(5), PcAction::Exit),
            (PcAddr::Text("nosuch".into()), PcAction::Count),
        ]);
        let e = resolve("system", &mut sc, image).unwrap_err().to_string();
        assert!(
            e.contains("system.cpu.pc_event[1].at = \"nosuch\"") && e.contains("builtin:gdbdemo"),
            "{e}"
        );
    }

    #[test]
    fn too_many_addresses_are_refused() {
        let ev = PcEvents {
            events: (0..4)
                .map(|i| PcEvent {
                    name: format!("e{i}"),
                    addr: 0x1000 * (i + 1),
                    action: PcAction::Count,
                })
                .collect(),
        };
        // Four fit without the repair (checked before any probe runs only
        // when they do not fit).
        let e = check_host("system", &ev, true).unwrap_err().to_string();
        assert!(
            e.contains("4 distinct addresses") && e.contains("SYSCALL repair"),
            "{e}"
        );
    }
}
