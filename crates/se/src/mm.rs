//! The process's memory: physical frames of guest RAM, four-level page
//! tables that kvmsim writes, and the list of mappings (VMAs).
//!
//! Frames are taken from guest RAM as pages are first touched (a page
//! fault on a mapped but absent page, or kvmsim copying into it); a
//! mapping's pages are present only once populated. Every change to a
//! present entry marks the address space for a TLB flush, which the
//! syscall device performs by loading a fresh copy of the whole tree (see
//! [`AddressSpace::flush`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PAGE: u64 = 4096;

/// Guest physical memory as the process image sees it.
pub trait PhysMem {
    /// Reads `buf.len()` bytes at `pa`; false if any lies outside RAM.
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool;
    /// Writes `data` at `pa`; false if any lies outside RAM.
    fn write(&self, pa: u64, data: &[u8]) -> bool;
}

impl PhysMem for GuestMemoryMmap {
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        self.read_slice(buf, GuestAddress(pa)).is_ok()
    }
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        self.write_slice(data, GuestAddress(pa)).is_ok()
    }
}

/// RAM in a vector (tests).
#[derive(Debug)]
pub struct VecMem(pub std::sync::Mutex<Vec<u8>>);

impl VecMem {
    pub fn new(size: usize) -> Self {
        VecMem(std::sync::Mutex::new(vec![0; size]))
    }
}

impl PhysMem for VecMem {
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
        let m = mem::lock(&self.0);
        let Some(src) = usize::try_from(pa)
            .ok()
            .and_then(|a| m.get(a..a.checked_add(buf.len())?))
        else {
            return false;
        };
        buf.copy_from_slice(src);
        true
    }
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        let mut m = mem::lock(&self.0);
        let Some(dst) = usize::try_from(pa)
            .ok()
            .and_then(|a| m.get_mut(a..a.checked_add(data.len())?))
        else {
            return false;
        };
        dst.copy_from_slice(data);
        true
    }
}

/// Hands out 4 KiB frames of guest RAM: never-used frames in address
/// order, then freed ones. Frames that once held page tables are only
/// ever reused as data (see [`AddressSpace::flush`]).
#[derive(Debug, Clone)]
pub struct Frames {
    /// Unused RAM: [next, end) ranges, in order.
    ranges: Vec<(u64, u64)>,
    free: Vec<u64>,
    /// Former page-table frames: data pages only.
    retired: Vec<u64>,
    used: u64,
    total: u64,
    /// Several CPUs share the tables ([`Frames::set_hold`]): freed frames
    /// wait in `held` until every CPU has loaded page tables that no
    /// longer reach them.
    hold: bool,
    /// (frame, held a page table, the table generation from which on it
    /// is unreachable).
    held: Vec<(u64, bool, u64)>,
    /// The generation of the current tables ([`AddressSpace::flush`]
    /// counts them).
    pub epoch: u64,
}

impl Frames {
    /// Frames from `regions` ([base, base + size) each), page-aligned.
    pub fn new(regions: &[(u64, u64)]) -> Self {
        let ranges: Vec<(u64, u64)> = regions
            .iter()
            .map(|&(b, s)| ((b + PAGE - 1) & !(PAGE - 1), (b + s) & !(PAGE - 1)))
            .filter(|(b, e)| b < e)
            .collect();
        let total = ranges.iter().map(|(b, e)| (e - b) / PAGE).sum();
        Frames {
            ranges,
            free: Vec::new(),
            retired: Vec::new(),
            used: 0,
            total,
            hold: false,
            held: Vec::new(),
            epoch: 0,
        }
    }

    /// With several CPUs on the same tables, a frame freed by one may
    /// still be reached by another through translations it cached, or
    /// through the old tables it runs on until it loads the new ones:
    /// such frames are held until [`Frames::release`] says no CPU can.
    pub fn set_hold(&mut self, hold: bool) {
        self.hold = hold;
    }

    /// Every CPU now runs on tables of generation `loaded` or later:
    /// frames unreachable from those are handed out again.
    pub fn release(&mut self, loaded: u64) {
        let mut i = 0;
        while i < self.held.len() {
            let (f, table, from) = self.held[i];
            if from <= loaded {
                self.held.swap_remove(i);
                if table {
                    self.retired.push(f);
                } else {
                    self.free.push(f);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Frames held for other CPUs (tests, reports).
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A zeroed frame for data, or `None` when RAM is exhausted.
    pub fn alloc(&mut self, mem: &dyn PhysMem) -> Option<u64> {
        match self.retired.pop() {
            Some(f) if mem.write(f, &[0; PAGE as usize]) => {
                self.used += 1;
                Some(f)
            }
            _ => self.alloc_table(mem),
        }
    }

    /// A zeroed frame that never held a page table.
    pub fn alloc_table(&mut self, mem: &dyn PhysMem) -> Option<u64> {
        let f = match self.free.pop() {
            Some(f) => f,
            None => {
                let r = self.ranges.iter_mut().find(|(b, e)| b < e)?;
                let f = r.0;
                r.0 += PAGE;
                f
            }
        };
        if !mem.write(f, &[0; PAGE as usize]) {
            return None;
        }
        self.used += 1;
        Some(f)
    }

    pub fn free(&mut self, f: u64) {
        self.used = self.used.saturating_sub(1);
        if self.hold {
            // Unreachable from the tables of the next flush on.
            self.held.push((f, false, self.epoch + 1));
        } else {
            self.free.push(f);
        }
    }

    /// Gives back a frame that held a page table: data only from now on.
    pub fn retire_table(&mut self, f: u64) {
        self.used = self.used.saturating_sub(1);
        if self.hold {
            // Called by a flush after it counted the new generation.
            self.held.push((f, true, self.epoch));
        } else {
            self.retired.push(f);
        }
    }

    /// Frames in use.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Frames of RAM in all.
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Page-table entry bits.
pub const PTE_P: u64 = 1;
pub const PTE_W: u64 = 1 << 1;
pub const PTE_U: u64 = 1 << 2;
pub const PTE_PCD: u64 = 1 << 4;
pub const PTE_NX: u64 = 1 << 63;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// mmap protections (Linux's values).
pub const PROT_READ: u32 = 1;
pub const PROT_WRITE: u32 = 2;
pub const PROT_EXEC: u32 = 4;

/// What backs a mapping's pages.
#[derive(Debug, Clone)]
pub enum Backing {
    /// Zero-filled on first touch.
    Anon,
    /// A private copy of a host file from `offset` (bytes past its end read as zero).
    File {
        file: Arc<std::fs::File>,
        offset: u64,
    },
    /// Fixed physical pages (the kernel stub, device windows): present from
    /// the start, never freed, never changed by the program.
    Fixed { phys: u64, uncached: bool },
}

/// One mapping: [start, end) with its protection.
#[derive(Debug, Clone)]
pub struct Vma {
    pub end: u64,
    pub prot: u32,
    pub backing: Backing,
    /// Kernel-only (supervisor) pages: the program cannot touch them.
    pub kernel: bool,
    pub name: &'static str,
}

/// Errors of memory operations, as errno values.
pub type Errno = i64;
pub const EFAULT: Errno = 14;
pub const ENOMEM: Errno = 12;
pub const EINVAL: Errno = 22;

/// The address space: page tables in guest RAM and the mappings.
#[derive(Debug)]
pub struct AddressSpace {
    pub frames: Frames,
    /// The PML4 to load.
    root: u64,
    /// A present entry changed since the last flush.
    pub flush_needed: bool,
    pub vmas: BTreeMap<u64, Vma>,
}

/// The lowest address a program may map (Linux's default vm.mmap_min_addr).
pub const MMAP_MIN: u64 = 0x10000;
/// The most mappings a process may have (Linux's default vm.max_map_count):
/// mappings cost host memory even before they hold a page.
pub const MAX_MAPS: usize = 65530;

impl AddressSpace {
    pub fn new(mem: &dyn PhysMem, mut frames: Frames) -> Option<Self> {
        let root = frames.alloc_table(mem)?;
        Some(AddressSpace {
            frames,
            root,
            flush_needed: false,
            vmas: BTreeMap::new(),
        })
    }

    /// The CR3 to load.
    pub fn cr3(&self) -> u64 {
        self.root
    }

    /// Makes kvmsim's changes to present entries visible to the CPU: the
    /// whole tree is copied into frames that never held a page table, and
    /// the copy's root is the CR3 to load; the old tables' frames become
    /// data frames. Why not reload the same tables: KVM's MMU may cache
    /// translations by the guest frame of each table and learns of changes
    /// only from the guest's own writes (it write-protects them), never
    /// from kvmsim's writes through its mapping of guest RAM; measured here,
    /// a CR3 reload, even to a fresh PML4 over the same lower tables, left
    /// a page made read-only by mprotect writable. Fresh frames at every
    /// level have no cached state. Tables are few (a static program has
    /// about a dozen), so a flush copies tens of KiB. If RAM runs out, the
    /// tables stay as they are (a stale permission then shows as a repeated
    /// fault, which ends the run).
    pub fn flush(&mut self, mem: &dyn PhysMem) -> u64 {
        self.flush_needed = false;
        let mut old = Vec::new();
        match self.copy_tree(mem, self.root, 4, &mut old) {
            Some(new) => {
                self.root = new;
                self.frames.epoch += 1;
                for f in old {
                    self.frames.retire_table(f);
                }
            }
            None => tracing::warn!("SE: out of guest RAM copying the page tables for a TLB flush"),
        }
        self.root
    }

    /// Page tables that map only the top 512 GiB (the kernel stub, the
    /// park page, the SE window) as they are now, in frames of their own
    /// that no flush ever copies or frees: a CPU with no thread to run
    /// idles on them, so that the process's tables may change and their
    /// old frames be reused without that CPU ever reaching them.
    pub fn park_root(&mut self, mem: &dyn PhysMem) -> Option<u64> {
        let top = Self::entry(mem, self.root, 511);
        let root = self.frames.alloc_table(mem)?;
        if top & PTE_P != 0 {
            let mut ignored = Vec::new();
            let copy = self.copy_tree(mem, top & ADDR_MASK, 3, &mut ignored)?;
            self.set_entry(mem, root, 511, copy | (top & !ADDR_MASK));
        }
        Some(root)
    }

    /// Copies the table at `table` (of `level`, 4 = PML4) and the tables
    /// below it; collects the old tables' frames in `old`.
    fn copy_tree(
        &mut self,
        mem: &dyn PhysMem,
        table: u64,
        level: u32,
        old: &mut Vec<u64>,
    ) -> Option<u64> {
        let mut buf = [0u8; PAGE as usize];
        if !mem.read(table, &mut buf) {
            return None;
        }
        let new = self.frames.alloc_table(mem)?;
        for i in 0..512 {
            let e = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or_default());
            if level > 1 && e & PTE_P != 0 {
                let c = self.copy_tree(mem, e & ADDR_MASK, level - 1, old)?;
                buf[i * 8..i * 8 + 8].copy_from_slice(&(c | (e & !ADDR_MASK)).to_le_bytes());
            }
        }
        mem.write(new, &buf);
        old.push(table);
        Some(new)
    }

    fn entry(mem: &dyn PhysMem, table: u64, idx: u64) -> u64 {
        let mut b = [0u8; 8];
        if mem.read(table + idx * 8, &mut b) {
            u64::from_le_bytes(b)
        } else {
            0
        }
    }

    fn set_entry(&mut self, mem: &dyn PhysMem, table: u64, idx: u64, e: u64) {
        mem.write(table + idx * 8, &e.to_le_bytes());
    }

    /// The leaf entry's table and index for `va`, creating the levels
    /// above it when `create`.
    fn leaf(&mut self, mem: &dyn PhysMem, va: u64, create: bool) -> Option<(u64, u64)> {
        let mut table = self.cr3();
        for shift in [39u32, 30, 21] {
            let idx = (va >> shift) & 511;
            let e = Self::entry(mem, table, idx);
            table = if e & PTE_P != 0 {
                e & ADDR_MASK
            } else if create {
                let f = self.frames.alloc_table(mem)?;
                self.set_entry(mem, table, idx, f | PTE_P | PTE_W | PTE_U);
                f
            } else {
                return None;
            };
        }
        Some((table, (va >> 12) & 511))
    }

    /// The leaf entry for `va` (0 if none).
    pub fn pte(&mut self, mem: &dyn PhysMem, va: u64) -> u64 {
        self.leaf(mem, va, false)
            .map_or(0, |(t, i)| Self::entry(mem, t, i))
    }

    /// The physical address `va` translates to, if present.
    pub fn translate(&mut self, mem: &dyn PhysMem, va: u64) -> Option<u64> {
        let e = self.pte(mem, va);
        (e & PTE_P != 0).then_some((e & ADDR_MASK) | (va & (PAGE - 1)))
    }

    fn pte_bits(vma: &Vma) -> u64 {
        let mut bits = PTE_P;
        if vma.prot & PROT_WRITE != 0 {
            bits |= PTE_W;
        }
        if !vma.kernel {
            bits |= PTE_U;
        }
        if vma.prot & PROT_EXEC == 0 {
            bits |= PTE_NX;
        }
        if let Backing::Fixed { uncached: true, .. } = vma.backing {
            bits |= PTE_PCD;
        }
        bits
    }

    /// The mapping holding `va`.
    pub fn vma_at(&self, va: u64) -> Option<(u64, &Vma)> {
        self.vmas
            .range(..=va)
            .next_back()
            .filter(|(_, v)| va < v.end)
            .map(|(&s, v)| (s, v))
    }

    /// True if nothing is mapped in [start, end).
    pub fn is_free(&self, start: u64, end: u64) -> bool {
        self.vmas
            .range(..end)
            .next_back()
            .is_none_or(|(_, v)| v.end <= start)
    }

    /// Adds a mapping over free space; fixed pages are made present now.
    pub fn map(&mut self, mem: &dyn PhysMem, start: u64, vma: Vma) -> Result<(), Errno> {
        if !start.is_multiple_of(PAGE) || !vma.end.is_multiple_of(PAGE) || vma.end <= start {
            return Err(EINVAL);
        }
        if !self.is_free(start, vma.end) {
            return Err(EINVAL);
        }
        if self.vmas.len() >= MAX_MAPS {
            return Err(ENOMEM);
        }
        if let Backing::Fixed { phys, .. } = vma.backing {
            let bits = Self::pte_bits(&vma);
            for va in (start..vma.end).step_by(PAGE as usize) {
                let (t, i) = self.leaf(mem, va, true).ok_or(ENOMEM)?;
                self.set_entry(mem, t, i, (phys + (va - start)) | bits);
            }
        }
        self.vmas.insert(start, vma);
        Ok(())
    }

    /// Makes the page holding `va` present (a fresh zeroed frame, filled
    /// from the mapping's file); `Ok(false)` if it was present already.
    pub fn populate(&mut self, mem: &dyn PhysMem, va: u64) -> Result<bool, Errno> {
        let page = va & !(PAGE - 1);
        let (start, vma) = self.vma_at(page).ok_or(EFAULT)?;
        let vma = vma.clone();
        let old = self.pte(mem, page);
        if old & PTE_P != 0 {
            return Ok(false);
        }
        if vma.prot == 0 && !matches!(vma.backing, Backing::Fixed { .. }) {
            return Err(EFAULT);
        }
        let (t, i) = self.leaf(mem, page, true).ok_or(ENOMEM)?;
        let frame = match &vma.backing {
            // A page made PROT_NONE keeps its frame in the absent entry.
            _ if old & ADDR_MASK != 0 => old & ADDR_MASK,
            Backing::Fixed { phys, .. } => phys + (page - start),
            Backing::Anon => self.frames.alloc(mem).ok_or(ENOMEM)?,
            Backing::File { file, offset } => {
                let f = self.frames.alloc(mem).ok_or(ENOMEM)?;
                let mut buf = vec![0u8; PAGE as usize];
                let at = offset + (page - start);
                let mut got = 0;
                while got < buf.len() {
                    match std::os::unix::fs::FileExt::read_at(
                        &**file,
                        &mut buf[got..],
                        at + got as u64,
                    ) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                mem.write(f, &buf);
                f
            }
        };
        self.set_entry(mem, t, i, frame | Self::pte_bits(&vma));
        Ok(true)
    }

    /// Writes `data` at physical frames behind `va`, as the loader does
    /// (ignores protection; populates the pages).
    pub fn poke(&mut self, mem: &dyn PhysMem, mut va: u64, mut data: &[u8]) -> Result<(), Errno> {
        while !data.is_empty() {
            self.populate(mem, va)?;
            let pa = self.translate(mem, va).ok_or(EFAULT)?;
            let n = ((PAGE - (va & (PAGE - 1))) as usize).min(data.len());
            if !mem.write(pa, &data[..n]) {
                return Err(EFAULT);
            }
            data = &data[n..];
            va += n as u64;
        }
        Ok(())
    }

    /// Grows the anonymous mapping that ends at `at` to `end` (brk), if
    /// there is one and [at, end) is free.
    pub fn extend(&mut self, at: u64, end: u64) -> bool {
        let Some((s, v)) = self.vma_at(at.wrapping_sub(1)) else {
            return false;
        };
        if v.end != at || !matches!(v.backing, Backing::Anon) || v.kernel || !self.is_free(at, end)
        {
            return false;
        }
        if let Some(v) = self.vmas.get_mut(&s) {
            v.end = end;
        }
        true
    }

    /// Splits the mappings so that none straddles `at`.
    fn split(&mut self, at: u64) {
        let Some((start, vma)) = self.vma_at(at).map(|(s, v)| (s, v.clone())) else {
            return;
        };
        if start == at {
            return;
        }
        let mut tail = vma.clone();
        if let Backing::File { offset, .. } = &mut tail.backing {
            *offset += at - start;
        }
        if let Backing::Fixed { phys, .. } = &mut tail.backing {
            *phys += at - start;
        }
        if let Some(v) = self.vmas.get_mut(&start) {
            v.end = at;
        }
        self.vmas.insert(at, tail);
    }

    /// The user mappings overlapping [start, end); kernel ones make it an error.
    fn user_range(&self, start: u64, end: u64) -> Result<Vec<u64>, Errno> {
        let mut out = Vec::new();
        for (&s, v) in self.vmas.range(..end) {
            if v.end > start {
                if v.kernel || matches!(v.backing, Backing::Fixed { .. }) {
                    return Err(EINVAL);
                }
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Removes every user mapping in [start, end), freeing its frames.
    pub fn unmap(&mut self, mem: &dyn PhysMem, start: u64, end: u64) -> Result<(), Errno> {
        self.user_range(start, end)?;
        self.split(start);
        self.split(end);
        let starts: Vec<u64> = self.vmas.range(start..end).map(|(&s, _)| s).collect();
        for s in starts {
            let Some(v) = self.vmas.remove(&s) else {
                continue;
            };
            for va in (s..v.end).step_by(PAGE as usize) {
                if let Some((t, i)) = self.leaf(mem, va, false) {
                    let e = Self::entry(mem, t, i);
                    if e & ADDR_MASK != 0 {
                        self.set_entry(mem, t, i, 0);
                        self.frames.free(e & ADDR_MASK);
                        self.flush_needed |= e & PTE_P != 0;
                    }
                }
            }
        }
        Ok(())
    }

    /// Changes the protection of [start, end), which must be mapped whole.
    pub fn protect(
        &mut self,
        mem: &dyn PhysMem,
        start: u64,
        end: u64,
        prot: u32,
    ) -> Result<(), Errno> {
        let starts = self.user_range(start, end)?;
        // Every byte must be mapped (Linux: ENOMEM otherwise).
        let mut at = start;
        for s in &starts {
            if *s > at {
                return Err(ENOMEM);
            }
            at = at.max(self.vmas[s].end);
        }
        if at < end {
            return Err(ENOMEM);
        }
        self.split(start);
        self.split(end);
        let starts: Vec<u64> = self.vmas.range(start..end).map(|(&s, _)| s).collect();
        for s in starts {
            let Some(v) = self.vmas.get_mut(&s) else {
                continue;
            };
            v.prot = prot;
            let v = v.clone();
            let bits = Self::pte_bits(&v);
            for va in (s..v.end).step_by(PAGE as usize) {
                if let Some((t, i)) = self.leaf(mem, va, false) {
                    let e = Self::entry(mem, t, i);
                    if e & PTE_P != 0 {
                        if prot == 0 {
                            // PROT_NONE: keep the frame, make the page absent
                            // to the program (a fault finds PROT_NONE).
                            // (the frame stays in the absent entry: populate reuses it).
                            self.set_entry(mem, t, i, e & ADDR_MASK);
                        } else {
                            self.set_entry(mem, t, i, (e & ADDR_MASK) | bits);
                        }
                        self.flush_needed = true;
                    } else if e & ADDR_MASK != 0 && prot != 0 {
                        // A PROT_NONE page that kept its frame.
                        self.set_entry(mem, t, i, (e & ADDR_MASK) | bits);
                    }
                }
            }
        }
        Ok(())
    }

    /// A free range of `len` bytes, the highest below `top` (top-down, as
    /// Linux places mmaps), at or above `floor`.
    pub fn find_free(&self, len: u64, floor: u64, top: u64) -> Option<u64> {
        let mut hi = top;
        for (&s, v) in self.vmas.range(..top).rev() {
            if v.end <= hi && hi - v.end >= len {
                return Some(hi - len).filter(|&a| a >= floor);
            }
            hi = hi.min(s);
            if hi < floor + len {
                return None;
            }
        }
        hi.checked_sub(len).filter(|&a| a >= floor)
    }

    /// Checks that [va, va + len) is mapped for the program with `need`
    /// (PROT_READ or PROT_WRITE) and populates it.
    pub fn check_user(
        &mut self,
        mem: &dyn PhysMem,
        va: u64,
        len: u64,
        need: u32,
    ) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        let end = va.checked_add(len).ok_or(EFAULT)?;
        let mut page = va & !(PAGE - 1);
        while page < end {
            let (_, v) = self.vma_at(page).ok_or(EFAULT)?;
            if v.kernel || v.prot & need != need || v.prot == 0 {
                return Err(EFAULT);
            }
            let (_, vend) = (0, v.end);
            // Populate what the copy touches in this mapping.
            let stop = vend.min(end);
            while page < stop {
                self.populate(mem, page)?;
                page += PAGE;
            }
        }
        Ok(())
    }

    /// Copies the program's memory at `va` into `buf` (EFAULT if any byte
    /// is not readable by the program).
    pub fn read_user(&mut self, mem: &dyn PhysMem, va: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.check_user(mem, va, buf.len() as u64, PROT_READ)?;
        let mut done = 0;
        while done < buf.len() {
            let at = va + done as u64;
            let pa = self.translate(mem, at).ok_or(EFAULT)?;
            let n = ((PAGE - (at & (PAGE - 1))) as usize).min(buf.len() - done);
            if !mem.read(pa, &mut buf[done..done + n]) {
                return Err(EFAULT);
            }
            done += n;
        }
        Ok(())
    }

    /// Copies `data` into the program's memory at `va` (EFAULT if any byte
    /// is not writable by the program).
    pub fn write_user(&mut self, mem: &dyn PhysMem, va: u64, data: &[u8]) -> Result<(), Errno> {
        self.check_user(mem, va, data.len() as u64, PROT_WRITE)?;
        let mut done = 0;
        while done < data.len() {
            let at = va + done as u64;
            let pa = self.translate(mem, at).ok_or(EFAULT)?;
            let n = ((PAGE - (at & (PAGE - 1))) as usize).min(data.len() - done);
            if !mem.write(pa, &data[done..done + n]) {
                return Err(EFAULT);
            }
            done += n;
        }
        Ok(())
    }

    /// A NUL-terminated string of at most `max` bytes at `va`.
    pub fn read_cstr(&mut self, mem: &dyn PhysMem, va: u64, max: usize) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut at = va;
        loop {
            let n = (PAGE - (at & (PAGE - 1))) as usize;
            let mut chunk = vec![0u8; n];
            self.read_user(mem, at, &mut chunk)?;
            if let Some(z) = chunk.iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..z]);
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
            if out.len() > max {
                return Err(crate::sys::ENAMETOOLONG);
            }
            at += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> (VecMem, AddressSpace) {
        let mem = VecMem::new(4 << 20);
        let frames = Frames::new(&[(0x1000, (4 << 20) - 0x1000)]);
        let s = AddressSpace::new(&mem, frames).unwrap();
        (mem, s)
    }

    fn anon(end: u64, prot: u32) -> Vma {
        Vma {
            end,
            prot,
            backing: Backing::Anon,
            kernel: false,
            name: "anon",
        }
    }

    #[test]
    fn pages_appear_on_first_touch_with_the_mapping_protection() {
        let (mem, mut s) = space();
        s.map(&mem, 0x40_0000, anon(0x40_2000, PROT_READ)).unwrap();
        assert_eq!(s.pte(&mem, 0x40_0000), 0, "nothing present before a touch");
        let mut b = [1u8; 16];
        s.read_user(&mem, 0x40_0ff8, &mut b).unwrap();
        assert_eq!(b, [0; 16]);
        let e = s.pte(&mem, 0x40_1000);
        assert_eq!(e & (PTE_P | PTE_U | PTE_W | PTE_NX), PTE_P | PTE_U | PTE_NX);
        assert_eq!(
            s.write_user(&mem, 0x40_0000, &[1]),
            Err(EFAULT),
            "read-only"
        );
        assert_eq!(
            s.read_user(&mem, 0x40_1ff8, &mut b),
            Err(EFAULT),
            "runs past the end"
        );
        assert_eq!(
            s.read_user(&mem, u64::MAX - 4, &mut b),
            Err(EFAULT),
            "wraps"
        );
    }

    #[test]
    fn with_several_cpus_freed_frames_wait_until_every_cpu_reloaded() {
        let (mem, mut s) = space();
        s.frames.set_hold(true);
        s.map(&mem, 0x10_0000, anon(0x10_2000, PROT_READ | PROT_WRITE))
            .unwrap();
        s.write_user(&mem, 0x10_0000, &[7u8; 0x2000]).unwrap();
        let data = s.translate(&mem, 0x10_0000).unwrap() & !(PAGE - 1);
        s.unmap(&mem, 0x10_0000, 0x10_2000).unwrap();
        assert_eq!(s.frames.held(), 2, "the two data frames");
        let tables_before = s.cr3();
        s.flush(&mem);
        assert_eq!(s.frames.epoch, 1);
        let held = s.frames.held();
        assert!(held > 2, "the old tables too: {held}");
        // A CPU still on generation 0 may reach them: nothing comes back.
        s.frames.release(0);
        assert_eq!(s.frames.held(), held);
        s.map(&mem, 0x20_0000, anon(0x20_1000, PROT_READ | PROT_WRITE))
            .unwrap();
        s.write_user(&mem, 0x20_0000, &[1]).unwrap();
        let fresh = s.translate(&mem, 0x20_0000).unwrap() & !(PAGE - 1);
        assert_ne!(fresh, data, "a held frame is not handed out");
        assert_ne!(fresh, tables_before);
        // Every CPU runs on generation 1: all of them come back.
        s.frames.release(1);
        assert_eq!(s.frames.held(), 0);
    }

    #[test]
    fn unmap_and_protect_split_mappings_and_free_frames() {
        let (mem, mut s) = space();
        s.map(&mem, 0x10_0000, anon(0x10_4000, PROT_READ | PROT_WRITE))
            .unwrap();
        s.write_user(&mem, 0x10_0000, &[7u8; 0x4000]).unwrap();
        let used = s.frames.used();
        s.unmap(&mem, 0x10_1000, 0x10_2000).unwrap();
        assert!(s.flush_needed);
        assert_eq!(s.frames.used(), used - 1);
        assert_eq!(s.vmas.len(), 2);
        assert_eq!(s.write_user(&mem, 0x10_1000, &[1]), Err(EFAULT));
        s.protect(&mem, 0x10_2000, 0x10_3000, PROT_READ).unwrap();
        assert_eq!(s.write_user(&mem, 0x10_2000, &[1]), Err(EFAULT));
        s.write_user(&mem, 0x10_3000, &[1]).unwrap();
        assert_eq!(
            s.protect(&mem, 0x10_0000, 0x10_3000, PROT_READ),
            Err(ENOMEM),
            "a hole"
        );
        let mut b = [0u8; 1];
        s.read_user(&mem, 0x10_2000, &mut b).unwrap();
        assert_eq!(b, [7]);
        let old = s.cr3();
        assert_ne!(s.flush(&mem), old);
        assert!(
            s.translate(&mem, 0x10_2000).is_some(),
            "same mappings after the switch"
        );
    }

    #[test]
    fn a_flush_moves_every_table_to_fresh_frames_and_never_reuses_old_ones_as_tables() {
        let (mem, mut s) = space();
        s.map(&mem, 0x10_0000, anon(0x10_2000, PROT_READ | PROT_WRITE))
            .unwrap();
        s.write_user(&mem, 0x10_0000, &[5u8; 0x2000]).unwrap();
        let tables = |s: &mut AddressSpace| {
            let mut t = vec![s.cr3()];
            let mut table = s.cr3();
            for shift in [39u32, 30, 21] {
                table = AddressSpace::entry(&mem, table, (0x10_0000 >> shift) & 511) & ADDR_MASK;
                t.push(table);
            }
            t
        };
        let old = tables(&mut s);
        let used = s.frames.used();
        s.flush(&mem);
        let new = tables(&mut s);
        assert!(old.iter().all(|f| !new.contains(f)), "{old:x?} {new:x?}");
        assert_eq!(s.frames.used(), used, "the old tables were given back");
        let mut b = [0u8; 2];
        s.read_user(&mem, 0x10_0fff, &mut b).unwrap();
        assert_eq!(b, [5, 5], "the same pages behind the new tables");
        // Old table frames come back as data, never as tables.
        let t = s.frames.alloc_table(&mem).unwrap();
        assert!(!old.contains(&t));
        let d = s.frames.alloc(&mem).unwrap();
        assert!(old.contains(&d));
    }

    #[test]
    fn find_free_goes_top_down_around_mappings() {
        let (mem, mut s) = space();
        s.map(&mem, 0x7000_0000, anon(0x7000_2000, PROT_READ))
            .unwrap();
        assert_eq!(
            s.find_free(0x1000, MMAP_MIN, 0x7000_2000),
            Some(0x6fff_f000)
        );
        assert_eq!(
            s.find_free(0x1000, MMAP_MIN, 0x8000_0000),
            Some(0x7fff_f000)
        );
        assert_eq!(s.find_free(0x1_0000_0000, MMAP_MIN, 0x8000_0000), None);
    }

    #[test]
    fn running_out_of_ram_is_enomem() {
        let mem = VecMem::new(64 << 10);
        let mut s = AddressSpace::new(&mem, Frames::new(&[(0, 64 << 10)])).unwrap();
        s.map(&mem, 0x10_0000, anon(0x20_0000, PROT_READ | PROT_WRITE))
            .unwrap();
        assert_eq!(
            s.write_user(&mem, 0x10_0000, &vec![1u8; 1 << 20]),
            Err(ENOMEM)
        );
    }
}
