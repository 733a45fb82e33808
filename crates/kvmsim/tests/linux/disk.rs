//! Linux with its root file system on a virtio disk: Debian's kernel loads
//! virtio_mmio and virtio_blk from the initramfs, finds the device in the
//! ACPI DSDT, mounts /dev/vda (ext4, scripts/linux-guest.sh's root.img)
//! and runs /sbin/init from it. Gated like tests/linux.rs (KVMSIM_LINUX_DIR
//! or KVMSIM_REQUIRE_LINUX=1 at build time; see build.rs).
//!
//! Two boots (each costs minutes where kernel mode is emulated) prove the
//! three points: (1) on a writable copy of the image the guest writes a
//! token and syncs, and exits through sim-ops; (2) an overlay run on that
//! copy finds the token (it reached the image) and writes another, which
//! goes to the overlay: the image's bytes are unchanged after the run.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::common::*;

/// The example's trimming (examples/linux.toml), the root on the disk, and
/// what the disk's /sbin/init should do.
fn append(actions: &str) -> String {
    format!(
        "lsm=capability init_on_alloc=0 init_on_free=0 mitigations=off cryptomgr.notests \
         root=/dev/vda kvmsim.disk={actions}"
    )
}

fn linux_guest(test: &str) -> Option<PathBuf> {
    if !kvm_or_skip(test) {
        return None;
    }
    let dir = std::env::var_os("KVMSIM_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/linux-guest"));
    for f in ["vmlinuz", "initrd.gz", "root.img"] {
        if !dir.join(f).is_file() {
            panic!(
                "{test}: no {f} in {} (make the guest with scripts/linux-guest.sh {0})",
                dir.display()
            );
        }
    }
    Some(dir)
}

fn digest(p: &Path) -> (u64, u64) {
    let bytes = std::fs::read(p).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    (bytes.len() as u64, h.finish())
}

/// Boots the guest with the example's config, `disk` args and `actions`.
fn boot(guest: &Path, out: &Path, config: &str, actions: &str) -> Run {
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initrd.gz");
    let append = append(actions);
    let r = crate::kvmsim_tied(
        &[
            "run",
            config,
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--append",
            &append,
            "--quiet",
            "--no-stdin",
        ],
        out,
    );
    r.no_panic();
    r
}

fn console_tail(r: &Run) -> String {
    let c = std::fs::read_to_string(r.out.join("serial.log")).unwrap_or_default();
    let lines: Vec<&str> = c.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn expect(r: &Run, lines: &[&str]) {
    let tail = console_tail(r);
    assert_eq!(r.status, 0, "stderr:\n{}\nconsole:\n{tail}", r.stderr);
    assert_eq!(r.json("exit.json")["cause"], "guest_exit");
    let console = r.file("serial.log");
    for l in lines {
        assert!(console.contains(l), "{l:?} not in the console:\n{tail}");
    }
}

#[test]
#[cfg_attr(
    not(kvmsim_linux_guest),
    ignore = "needs a Linux guest: set KVMSIM_LINUX_DIR (scripts/linux-guest.sh makes one), or run with --include-ignored to use target/linux-guest"
)]
#[cfg_attr(
    all(kvmsim_linux_guest, kvmsim_no_kvm),
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn root_on_a_disk_keeps_what_the_guest_synced_and_an_overlay_spares_the_image() {
    let Some(guest) = linux_guest("disk_root") else {
        return;
    };
    // The shared boot of the other tests runs meanwhile.
    crate::start_shared_boot(&guest);
    let dir = outdir("disk-root");
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("root.img");
    std::fs::copy(guest.join("root.img"), &image).unwrap();
    let example = repo().join("examples/linux.toml");
    let example = std::fs::read_to_string(example).unwrap();
    // The example with absolute guest paths (overridden by the flags) and
    // the disk.
    let cfg = |name: &str, disk: &str| {
        let text = example
            .lines()
            .filter(|l| !l.starts_with("kernel") && !l.starts_with("initrd"))
            .collect::<Vec<_>>()
            .join("\n");
        let text = text.replacen("[system]", "[system]\nkernel = \"vmlinuz\"", 1);
        let p = dir.join(name);
        std::fs::write(&p, format!("{text}\n\n{disk}")).unwrap();
        p.to_string_lossy().into_owned()
    };

    // 1. Writable: write a token, sync, exit through sim-ops.
    let rw = cfg("rw.toml", "[[system.disk]]\npath = \"root.img\"\n");
    let r1 = boot(&guest, &dir.join("out1"), &rw, "write:first-run-token");
    expect(
        &r1,
        &[
            "KVMSIM-INIT: root=/dev/vda: loading the virtio modules",
            "KVMSIM-DISK: /sbin/init is running from /dev/vda ext4",
            "KVMSIM-DISK: wrote first-run-token (status 0)",
        ],
    );
    assert!(r1.stat("system.disk0.reads").as_u64().unwrap() > 0);
    assert!(r1.stat("system.disk0.writes").as_u64().unwrap() > 0);
    assert!(
        r1.stat("system.disk0.flushes").as_u64().unwrap() > 0,
        "sync flushes"
    );
    assert!(r1.stat("system.disk0.bytesWritten").as_u64().unwrap() > 0);
    assert_eq!(r1.stat("system.disk0.needsReset").as_u64(), Some(0));
    let after_first = digest(&image);

    // 2. Overlay over the same image: the token is there; a second write
    // goes to the overlay and the image's bytes stay as they were.
    let overlay = dir.join("root.cow");
    let cow = cfg(
        "cow.toml",
        "[[system.disk]]\npath = \"root.img\"\noverlay = \"root.cow\"\n",
    );
    let r2 = boot(
        &guest,
        &dir.join("out2"),
        &cow,
        "read,write:second-run-token",
    );
    expect(
        &r2,
        &[
            "KVMSIM-DISK: found first-run-token",
            "KVMSIM-DISK: wrote second-run-token (status 0)",
        ],
    );
    assert!(r2.stat("system.disk0.bytesWritten").as_u64().unwrap() > 0);
    assert_eq!(
        digest(&image),
        after_first,
        "the overlay run left the image alone"
    );
    let cow_len = std::fs::metadata(&overlay).unwrap().len();
    assert_eq!(cow_len, after_first.0, "the overlay has the image's size");
    let stats = r2.file("stats.txt");
    assert!(stats.contains("system.disk0.avgLatency"));
}
