//! Walking the guest's page tables in software (4- and 5-level long mode
//! paging), for dumps and traces: where a virtual address leads, and the
//! entry that stops it. Pure: guest memory comes in as a reader, so this is
//! tested without KVM and never trusts what the guest put in its tables.

use std::fmt::Write as _;

/// Present.
pub const P: u64 = 1;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User accessible.
pub const US: u64 = 1 << 2;
/// A large page (PDPTE: 1 GiB, PDE: 2 MiB).
pub const PS: u64 = 1 << 7;
/// Execute disable.
pub const NX: u64 = 1 << 63;
/// The physical-address bits of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// One level of a walk: the entry's guest-physical address and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// 5 = PML5, 4 = PML4, 3 = PDPT, 2 = PD, 1 = PT.
    pub level: u8,
    pub entry_addr: u64,
    pub entry: u64,
}

/// Why a walk stopped short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The entry at this level is not present.
    NotPresent(u8),
    /// The entry at this level lies outside guest memory.
    Unreadable(u8),
    /// Not long mode paging (CR0.PG, CR4.PAE or EFER.LMA clear).
    NotLongMode,
}

/// A walk of one virtual address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walk {
    pub va: u64,
    pub steps: Vec<Step>,
    /// The guest-physical address, or where the walk stopped.
    pub result: Result<u64, Stop>,
}

impl Walk {
    /// The effective permissions along the walk: (writable, user, executable).
    pub fn permissions(&self) -> (bool, bool, bool) {
        let all = |bit| self.steps.iter().all(|s| s.entry & bit != 0);
        (
            all(RW),
            all(US),
            self.steps.iter().all(|s| s.entry & NX == 0),
        )
    }

    /// One line per level, then the result.
    pub fn describe(&self) -> String {
        let mut s = format!("page walk of {:#x}:", self.va);
        let name = |l: u8| match l {
            5 => "pml5e",
            4 => "pml4e",
            3 => "pdpte",
            2 => "pde",
            _ => "pte",
        };
        for st in &self.steps {
            let _ = write!(
                s,
                " {}@{:#x}={:#x}",
                name(st.level),
                st.entry_addr,
                st.entry
            );
        }
        match self.result {
            Ok(pa) => {
                let (w, u, x) = self.permissions();
                let _ = write!(
                    s,
                    " -> {pa:#x} [{}{}{}]",
                    if w { "w" } else { "r" },
                    if u { "u" } else { "s" },
                    if x { "x" } else { "-" }
                );
            }
            Err(Stop::NotPresent(l)) => {
                let _ = write!(s, " -> not present at the {}", name(l));
            }
            Err(Stop::Unreadable(l)) => {
                let _ = write!(s, " -> the {} lies outside guest memory", name(l));
            }
            Err(Stop::NotLongMode) => s.push_str(" -> not in long mode paging"),
        }
        s
    }
}

/// Walks `va` through the tables at `cr3`; `read` gives the 8-byte entry at
/// a guest-physical address (None outside memory).
pub fn walk(
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    va: u64,
    read: impl Fn(u64) -> Option<u64>,
) -> Walk {
    let mut w = Walk {
        va,
        steps: Vec::new(),
        result: Err(Stop::NotLongMode),
    };
    let long = cr0 & (1 << 31) != 0 && cr4 & (1 << 5) != 0 && efer & (1 << 10) != 0;
    if !long {
        return w;
    }
    let top: u8 = if cr4 & (1 << 12) != 0 { 5 } else { 4 };
    let mut table = cr3 & ADDR;
    for level in (1..=top).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let index = (va >> shift) & 0x1ff;
        let entry_addr = table + index * 8;
        let Some(entry) = read(entry_addr) else {
            w.result = Err(Stop::Unreadable(level));
            return w;
        };
        w.steps.push(Step {
            level,
            entry_addr,
            entry,
        });
        if entry & P == 0 {
            w.result = Err(Stop::NotPresent(level));
            return w;
        }
        if (level == 2 || level == 3) && entry & PS != 0 {
            let size_mask = (1u64 << shift) - 1;
            w.result = Ok((entry & ADDR & !size_mask) | (va & size_mask));
            return w;
        }
        table = entry & ADDR;
    }
    w.result = Ok(table | (va & 0xfff));
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const CR0: u64 = 1 << 31;
    const CR4: u64 = 1 << 5;
    const EFER: u64 = 1 << 10;

    fn reader(m: &HashMap<u64, u64>) -> impl Fn(u64) -> Option<u64> + '_ {
        move |a| m.get(&a).copied()
    }

    #[test]
    fn four_kib_page() {
        let va = 0xffff_8880_07a1_fb80u64;
        let mut m = HashMap::new();
        let (i4, i3, i2, i1) = (
            (va >> 39) & 0x1ff,
            (va >> 30) & 0x1ff,
            (va >> 21) & 0x1ff,
            (va >> 12) & 0x1ff,
        );
        m.insert(0x1000 + i4 * 8, 0x2000 | P | RW);
        m.insert(0x2000 + i3 * 8, 0x3000 | P | RW);
        m.insert(0x3000 + i2 * 8, 0x4000 | P | RW);
        m.insert(0x4000 + i1 * 8, 0x7a1f000 | P | NX);
        let w = walk(CR0, 0x1000, CR4, EFER, va, reader(&m));
        assert_eq!(w.result, Ok(0x7a1fb80));
        assert_eq!(w.steps.len(), 4);
        assert_eq!(w.permissions(), (false, false, false));
        assert!(
            w.describe().ends_with("-> 0x7a1fb80 [rs-]"),
            "{}",
            w.describe()
        );
    }

    #[test]
    fn large_pages_and_stops() {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x2000 | P | RW | US);
        m.insert(0x2000, 0x4000_0000 | P | RW | US | PS);
        let w = walk(CR0, 0x1000, CR4, EFER, 0x1234_5678, reader(&m));
        assert_eq!(w.result, Ok(0x5234_5678));
        assert_eq!(w.permissions(), (true, true, true));
        m.insert(0x2000, 0x3000 | P | RW);
        m.insert(0x3000 + 8, 0x20_0000 | P | PS);
        let w = walk(CR0, 0x1000, CR4, EFER, 0x0030_0010, reader(&m));
        assert_eq!(w.result, Ok(0x30_0010));
        let w = walk(CR0, 0x1000, CR4, EFER, 0x0050_0000, reader(&m));
        assert_eq!(w.result, Err(Stop::Unreadable(2)));
        m.insert(0x3000 + 16, 0);
        let w = walk(CR0, 0x1000, CR4, EFER, 0x0050_0000, reader(&m));
        assert_eq!(w.result, Err(Stop::NotPresent(2)));
        assert!(w.describe().contains("not present at the pde"));
        let w = walk(0, 0x1000, CR4, EFER, 0, reader(&m));
        assert_eq!(w.result, Err(Stop::NotLongMode));
    }

    #[test]
    fn five_level() {
        let mut m = HashMap::new();
        for t in [0x1000u64, 0x2000, 0x3000, 0x4000] {
            m.insert(t, (t + 0x1000) | P);
        }
        m.insert(0x5000, 0x9000 | P);
        let w = walk(CR0, 0x1000, CR4 | (1 << 12), EFER, 0x123, reader(&m));
        assert_eq!(w.steps.len(), 5);
        assert_eq!(w.result, Ok(0x9123));
    }

    proptest! {
        /// Hostile tables: any entries, any address; the walk ends, takes at
        /// most five steps and reads only 8-byte slots of the tables it named.
        #[test]
        fn any_tables(entries in proptest::collection::vec(any::<u64>(), 8),
                      va in any::<u64>(), cr3 in any::<u64>(), la57 in any::<bool>()) {
            let read = |a: u64| Some(entries[((a >> 3) % 8) as usize]);
            let cr4 = CR4 | if la57 { 1 << 12 } else { 0 };
            let w = walk(CR0, cr3, cr4, EFER, va, read);
            prop_assert!(w.steps.len() <= 5);
            prop_assert!(w.steps.iter().all(|s| s.entry_addr % 8 == 0));
            let _ = w.describe();
        }
    }
}
