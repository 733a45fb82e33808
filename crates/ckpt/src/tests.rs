use super::*;

/// A fresh, empty folder for one test (removed by [`Dir`]'s drop).
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("ckpt-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cpu(name: &str) -> kvm::CpuSaved {
    let mut v = kvm::fake::FakeVcpu::default();
    v.regs.rip = 0x10_0123;
    v.msr_list = vec![0x10, 0xc000_0082];
    v.msrs = vec![(0x10, 99), (0xc000_0082, 0xffff_ffff_8100_0000)];
    kvm::CpuSaved {
        name: name.into(),
        vcpu: kvm::state::save(&v).unwrap(),
        halted: false,
        idle_since: None,
        insts: 0,
        min_span: 0,
    }
}

fn sample() -> CheckpointState {
    CheckpointState {
        kvmsim_version: "0.1.0".into(),
        tick: 1_234_000_000,
        config: serde_json::json!({"system": [{"name": "system"}]}),
        systems: vec![SystemState {
            name: "system".into(),
            ram: RamImage {
                file: "ram.0.bin".into(),
                regions: vec![RamRegion {
                    base: 0,
                    size: 1 << 20,
                    offset: 0,
                }],
            },
            cpus: vec![cpu("system.cpu0"), cpu("system.cpu1")],
            devices: BTreeMap::from([("uart".into(), serde_json::json!({"lcr": 3}))]),
            sim: serde_json::Value::Null,
            disks: vec![
                DiskState {
                    name: "disk0".into(),
                    mode: DiskUse::Overlay,
                    image: image("/images/root.img", 64 * SECTOR),
                    saved: Some(SavedSectors {
                        file: "system.disk0.sectors".into(),
                        extents: vec![[2, 3], [5, 1], [40, 24]],
                    }),
                },
                DiskState {
                    name: "disk1".into(),
                    mode: DiskUse::Readonly,
                    image: image("/images/data.img", 8 * SECTOR),
                    saved: None,
                },
            ],
        }],
        network: serde_json::Value::Null,
    }
}

fn image(path: &str, size: u64) -> DiskImage {
    DiskImage {
        path: path.into(),
        size,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        fingerprint: 0x1234_5678,
    }
}

fn decode(bytes: &[u8]) -> Result<CheckpointState> {
    decode_state(Path::new("x/state.ckpt"), bytes)
}

/// A header with `version` and correct checksums around `body`.
fn with_version(body: &[u8], version: u32) -> Vec<u8> {
    let mut b = encode_state(&sample());
    b.truncate(HEADER_LEN);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    b[24..28].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
    let h = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&h.to_le_bytes());
    b.extend_from_slice(body);
    b
}

#[test]
fn a_state_round_trips() {
    let s = sample();
    assert_eq!(decode(&encode_state(&s)).unwrap(), s);
}

#[test]
fn every_truncation_is_an_error() {
    let b = encode_state(&sample());
    for n in 0..b.len() {
        let e = decode(&b[..n]).unwrap_err();
        assert!(matches!(e, CkptError::Truncated { .. }), "{n} bytes: {e}");
        assert!(e.to_string().contains("x/state.ckpt"), "{e}");
    }
}

#[test]
fn a_changed_byte_anywhere_is_an_error() {
    let b = encode_state(&sample());
    for i in 0..b.len() {
        for flip in [0x01u8, 0x80] {
            let mut c = b.clone();
            c[i] ^= flip;
            assert!(decode(&c).is_err(), "byte {i} ^ {flip:#x} went unnoticed");
        }
    }
    let mut c = b.clone();
    c.push(b'\n');
    let e = decode(&c).unwrap_err().to_string();
    assert!(e.contains("follow"), "{e}");
}

#[test]
fn foreign_files_are_named_as_such() {
    for bytes in [
        &b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"[..],
        b"{\"tick\": 1}",
        b"KVMSIMCX",
    ] {
        let e = decode(bytes).unwrap_err();
        assert!(matches!(e, CkptError::Foreign(_)), "{e}");
        assert!(e.to_string().contains("not a kvmsim checkpoint"), "{e}");
    }
}

#[test]
fn older_and_newer_versions_are_refused_not_misread() {
    let body = serde_json::to_vec(&sample()).unwrap();
    let e = decode(&with_version(&body, 0)).unwrap_err();
    assert!(matches!(e, CkptError::OlderVersion { found: 0, .. }), "{e}");
    assert!(e.to_string().contains("older"), "{e}");
    let e = decode(&with_version(&body, FORMAT_VERSION + 1)).unwrap_err();
    assert!(matches!(e, CkptError::NewerVersion { .. }), "{e}");
    // Version 2 had no disks: refused, saying what to do.
    let e = decode(&with_version(&body, 2)).unwrap_err().to_string();
    assert!(
        e.contains("version 2, older than the version 4")
            && e.contains("take the checkpoint again"),
        "{e}"
    );
    // The same body under the right version reads.
    assert!(decode(&with_version(&body, FORMAT_VERSION)).is_ok());
}

#[test]
fn a_body_that_does_not_fit_names_the_field() {
    let mut v = serde_json::to_value(sample()).unwrap();
    v["systems"][0]["cpus"][0]["vcpu"]["regs"]
        .as_object_mut()
        .unwrap()
        .remove("rip");
    let e = decode(&with_version(
        &serde_json::to_vec(&v).unwrap(),
        FORMAT_VERSION,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("rip"), "{e}");
    let e = decode(&with_version(b"not json", FORMAT_VERSION)).unwrap_err();
    assert!(matches!(e, CkptError::Invalid { .. }), "{e}");
}

#[test]
fn impossible_machines_are_refused() {
    let check = |f: &dyn Fn(&mut CheckpointState), want: &str| {
        let mut s = sample();
        f(&mut s);
        let body = serde_json::to_vec(&s).unwrap();
        let e = decode(&with_version(&body, FORMAT_VERSION)).unwrap_err();
        assert!(e.to_string().contains(want), "{want}: {e}");
    };
    check(&|s| s.systems.clear(), "no systems");
    check(
        &|s| s.systems[0].ram.file = "../../etc/passwd".into(),
        "plain file name",
    );
    check(
        &|s| s.systems[0].ram.file = STATE_FILE.into(),
        "plain file name",
    );
    check(&|s| s.systems[0].cpus.clear(), "no CPUs");
    check(
        &|s| s.systems[0].ram.regions[0].size = 100,
        "not page-aligned",
    );
    check(
        &|s| {
            let mut r = s.systems[0].ram.regions[0];
            r.base = 0x8_0000;
            r.offset = 1 << 20;
            s.systems[0].ram.regions.push(r);
        },
        "overlap",
    );
    check(
        &|s| {
            let mut r = s.systems[0].ram.regions[0];
            r.base = 1 << 30;
            r.offset = 0x8_0000;
            s.systems[0].ram.regions.push(r);
        },
        "overlap in the file",
    );
    check(
        &|s| {
            let t = s.systems[0].clone();
            s.systems.push(t);
        },
        "used twice",
    );
    // Disks: extents that lie, files that leave the folder, modes that
    // do not go with what is saved.
    let extents = |e: Vec<[u64; 2]>| {
        move |s: &mut CheckpointState| {
            if let Some(x) = &mut s.systems[0].disks[0].saved {
                x.extents = e.clone();
            }
        }
    };
    check(
        &extents(vec![[60, 5]]),
        "disks[0].saved.extents[0]: 5 sectors at 60 run past the disk's 64 sectors",
    );
    check(&extents(vec![[u64::MAX, 2]]), "disks[0].saved.extents[0]");
    check(
        &extents(vec![[2, 3], [4, 1]]),
        "disks[0].saved.extents[1]: sector 4 lies before the end of the previous extent (5)",
    );
    check(&extents(vec![[9, 1], [2, 1]]), "saved.extents[1]");
    check(&extents(vec![[9, 0]]), "saved.extents[0]: no sectors");
    check(
        &|s| s.systems[0].disks[0].image.size = 1000,
        "disks[0].image.size",
    );
    check(
        &|s| {
            if let Some(x) = &mut s.systems[0].disks[0].saved {
                x.file = "../system.disk0.sectors".into();
            }
        },
        "disks[0].saved.file",
    );
    check(
        &|s| {
            if let Some(x) = &mut s.systems[0].disks[0].saved {
                x.file = "ram.0.bin".into();
            }
        },
        "another file of the checkpoint",
    );
    check(
        &|s| s.systems[0].disks[0].saved = None,
        "disks[0].saved: an overlay disk without its saved sectors",
    );
    check(
        &|s| s.systems[0].disks[0].mode = DiskUse::Writable,
        "saved sectors for a writable disk",
    );
    check(
        &|s| s.systems[0].disks[1].name = "disk0".into(),
        "disks[1].name",
    );
}

/// Two RAM regions, a few non-zero pages.
fn guest_ram() -> GuestMemoryMmap {
    let m = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 8 << 20),
        (GuestAddress(1 << 32), 4 << 20),
    ])
    .unwrap();
    m.write_slice(b"first page", GuestAddress(0)).unwrap();
    m.write_obj(0xdead_beef_u64, GuestAddress((3 << 20) + 0x1ff8))
        .unwrap();
    m.write_slice(&[7u8; 3 * 4096], GuestAddress((5 << 20) + 4096))
        .unwrap();
    m.write_slice(b"high", GuestAddress((1 << 32) + (4 << 20) - 4))
        .unwrap();
    m
}

fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    a.iter().zip(b.iter()).all(|(ra, rb)| {
        let (mut x, mut y) = (vec![0u8; ra.len() as usize], vec![0u8; rb.len() as usize]);
        ra.start_addr() == rb.start_addr()
            && a.read_slice(&mut x, ra.start_addr()).is_ok()
            && b.read_slice(&mut y, rb.start_addr()).is_ok()
            && x == y
    }) && a.num_regions() == b.num_regions()
}

#[test]
fn ram_is_written_sparse_and_mapped_back_copy_on_write() {
    let d = Dir::new("ram");
    let mem = guest_ram();
    let (img, w) = write_ram(&d.0, "ram.0.bin", &mem).unwrap();
    assert_eq!(img.size(), 12 << 20);
    assert_eq!(w.pages_written, 1 + 1 + 3 + 1);
    assert_eq!(w.pages_written + w.pages_skipped, (12 << 20) / PAGE);
    let meta = std::fs::metadata(d.0.join("ram.0.bin")).unwrap();
    assert_eq!(meta.len(), 12 << 20);
    // Holes take no blocks: a few pages on disk, not 12 MiB (file systems
    // may allocate some metadata blocks beyond the data).
    let on_disk = meta.blocks() * 512;
    assert!(
        on_disk <= 64 * PAGE,
        "{on_disk} bytes on disk for {} written pages",
        w.pages_written
    );

    let a = map_ram(&d.0, &img).unwrap();
    assert!(
        same(&a, &mem),
        "the mapped RAM differs from what was written"
    );
    // A write goes to this mapping only: not to the file, not to another
    // mapping of it.
    a.write_obj(0x1122_u16, GuestAddress(0)).unwrap();
    let b = map_ram(&d.0, &img).unwrap();
    assert!(same(&b, &mem));
    let mut first = [0u8; 10];
    std::fs::File::open(d.0.join("ram.0.bin"))
        .unwrap()
        .read_exact_at(&mut first, 0)
        .unwrap();
    assert_eq!(&first, b"first page");
    // The file is never written over.
    let e = write_ram(&d.0, "ram.0.bin", &mem).unwrap_err();
    assert!(matches!(e, CkptError::Io { .. }), "{e}");
}

#[test]
fn a_whole_folder_is_written_read_and_summed_up() {
    let d = Dir::new("folder");
    create_dir(&d.0).unwrap();
    let mem = guest_ram();
    let (img, _) = write_ram(&d.0, "ram.0.bin", &mem).unwrap();
    let mut s = sample();
    s.systems[0].ram = img;
    let (sectors, sectors_path) = create_sector_file(&d.0, "system.disk0.sectors").unwrap();
    sectors.set_len(64 * SECTOR).unwrap();
    sectors.write_all_at(&[9u8; 3 * 512], 2 * SECTOR).unwrap();
    assert!(
        create_sector_file(&d.0, "system.disk0.sectors").is_err(),
        "never written over"
    );
    write_state(&d.0, &s).unwrap();
    assert_eq!(read_state(&d.0).unwrap(), s);
    let i = info(&d.0).unwrap();
    assert_eq!(i.tick, s.tick);
    assert_eq!(i.systems[0].cpus, 2);
    assert_eq!(i.systems[0].ram_bytes, 12 << 20);
    assert!(i.systems[0].ram_bytes_on_disk < 12 << 20);
    let disk = &i.systems[0].disks[0];
    assert_eq!(disk.mode, "overlay");
    assert_eq!(disk.image, "/images/root.img");
    assert_eq!(disk.saved_bytes, 28 * SECTOR, "the extents' sectors");
    assert!(disk.saved_bytes_on_disk > 0);
    assert_eq!(i.systems[0].disks[1].saved_file, None);
    // A sector file cut short, or missing, is named.
    sectors.set_len(10 * SECTOR).unwrap();
    let e = read_state(&d.0).unwrap_err();
    assert!(
        matches!(e, CkptError::Truncated { .. })
            && e.to_string().contains("system.disk0.sectors")
            && e.to_string().contains("5120 bytes"),
        "{e}"
    );
    std::fs::remove_file(&sectors_path).unwrap();
    let e = read_state(&d.0).unwrap_err().to_string();
    assert!(e.contains("system.disk0.sectors"), "{e}");
    std::fs::write(&sectors_path, vec![0u8; 64 * 512]).unwrap();
    assert!(read_state(&d.0).is_ok());
    // A second checkpoint into the same folder is refused.
    assert!(matches!(create_dir(&d.0), Err(CkptError::Exists(_))));
    // A RAM file cut short is named.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.0.join("ram.0.bin"))
        .unwrap();
    f.set_len(4 << 20).unwrap();
    let e = read_state(&d.0).unwrap_err();
    assert!(
        matches!(e, CkptError::Truncated { .. }) && e.to_string().contains("ram.0.bin"),
        "{e}"
    );
    // No state file: the I/O error names it.
    std::fs::remove_file(d.0.join(STATE_FILE)).unwrap();
    let e = read_state(&d.0).unwrap_err().to_string();
    assert!(e.contains(STATE_FILE), "{e}");
}
