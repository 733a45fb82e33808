//! Guest RAM and the physical memory map.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Start of the hole below 4 GiB reserved for device windows (LAPIC, IOAPIC,
/// sim-ops, ...). RAM above this address is placed above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// A range of guest physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub base: u64,
    pub size: u64,
}

impl Region {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
    /// True if `[addr, addr+len)` lies entirely inside the region.
    pub fn contains_range(&self, addr: u64, len: u64) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error("memory size {0} bytes is too small (at least 1 MiB is needed)")]
    TooSmall(u64),
    #[error("memory size {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("memory size {0} bytes is too large")]
    TooLarge(u64),
    #[error(
        "guest memory with regions {found:x?} (base, size) does not fit the memory map's {want:x?}"
    )]
    Mismatch {
        found: Vec<(u64, u64)>,
        want: Vec<(u64, u64)>,
    },
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    Alloc {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Where RAM lives in the guest physical address space. RAM fills the low
/// addresses up to the device hole at 3 GiB; the rest continues at 4 GiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryMap {
    regions: Vec<Region>,
}

impl MemoryMap {
    /// The map for `size` bytes of RAM.
    pub fn for_size(size: u64) -> Result<Self, RamError> {
        if size < (1 << 20) {
            return Err(RamError::TooSmall(size));
        }
        if !size.is_multiple_of(4096) {
            return Err(RamError::Unaligned(size));
        }
        if size > (1u64 << 46) {
            return Err(RamError::TooLarge(size));
        }
        let low = size.min(MMIO_HOLE_START);
        let mut regions = vec![Region { base: 0, size: low }];
        if size > low {
            regions.push(Region {
                base: MMIO_HOLE_END,
                size: size - low,
            });
        }
        Ok(MemoryMap { regions })
    }

    /// The RAM regions, in address order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// True if `[addr, addr+len)` is entirely RAM (inside one region).
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        self.regions.iter().any(|r| r.contains_range(addr, len))
    }
}

/// Guest RAM: the memory map and its host mapping.
#[derive(Debug)]
pub struct GuestRam {
    map: MemoryMap,
    mem: GuestMemoryMmap,
}

impl GuestRam {
    /// Allocates (anonymous, zeroed, lazily backed) host memory for `map`.
    pub fn new(map: MemoryMap) -> Result<Self, RamError> {
        let ranges: Vec<(GuestAddress, usize)> = map
            .regions()
            .iter()
            .map(|r| (GuestAddress(r.base), r.size as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| RamError::Alloc {
            size: map.total(),
            source,
        })?;
        Ok(GuestRam { map, mem })
    }

    /// Takes guest memory mapped elsewhere (a checkpoint's RAM file) as the
    /// RAM of `map`: its regions must be exactly the map's.
    pub fn from_memory(map: MemoryMap, mem: GuestMemoryMmap) -> Result<Self, RamError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let found: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let want: Vec<(u64, u64)> = map.regions().iter().map(|r| (r.base, r.size)).collect();
        if found != want {
            return Err(RamError::Mismatch { found, want });
        }
        Ok(GuestRam { map, mem })
    }

    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// The vm-memory view, for loaders and for mapping into a VM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_from_elsewhere_must_fit_the_map() {
        let map = MemoryMap::for_size(8 << 20).unwrap();
        let fits = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        assert!(GuestRam::from_memory(map.clone(), fits).is_ok());
        let short = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let e = GuestRam::from_memory(map, short).unwrap_err().to_string();
        assert!(e.contains("400000") && e.contains("800000"), "{e}");
    }

    #[test]
    fn small_map_is_one_region() {
        let m = MemoryMap::for_size(64 << 20).unwrap();
        assert_eq!(
            m.regions(),
            &[Region {
                base: 0,
                size: 64 << 20
            }]
        );
        assert!(m.is_ram(0, 4096));
        assert!(!m.is_ram((64 << 20) - 1, 2));
        assert!(!m.is_ram(u64::MAX, 2));
    }

    #[test]
    fn large_map_skips_the_hole() {
        let m = MemoryMap::for_size(4 << 30).unwrap();
        assert_eq!(
            m.regions(),
            &[
                Region {
                    base: 0,
                    size: MMIO_HOLE_START
                },
                Region {
                    base: MMIO_HOLE_END,
                    size: (4 << 30) - MMIO_HOLE_START
                },
            ]
        );
        assert_eq!(m.total(), 4 << 30);
        assert!(!m.is_ram(0xFFFF_0000, 8), "the sim-ops window is a hole");
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            MemoryMap::for_size(4096),
            Err(RamError::TooSmall(_))
        ));
        assert!(matches!(
            MemoryMap::for_size((1 << 20) + 1),
            Err(RamError::Unaligned(_))
        ));
        assert!(matches!(
            MemoryMap::for_size(1 << 50),
            Err(RamError::TooLarge(_))
        ));
    }

    #[test]
    fn ram_is_readable_and_writable() {
        let ram = GuestRam::new(MemoryMap::for_size(2 << 20).unwrap()).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(ram.memory().read_obj::<u32>(GuestAddress(2 << 20)).is_err());
    }
}
