//! Linux with its root file system on a virtio disk: Debian's kernel loads
//! virtio_mmio and virtio_blk from the initramfs, finds the device in the
//! ACPI DSDT, mounts /dev/vda (ext4, scripts/linux-guest.sh's root.img)
//! and runs /sbin/init from it. Gated like tests/linux.rs (KVMSIM_LINUX_DIR
//! or KVMSIM_REQUIRE_LINUX=1 at build time; see build.rs).
//!
//! Two boots (each costs minutes where kernel mode is emulated) and a
//! restore prove the points: (1) on a writable copy of the image the guest
//! writes a token and syncs, and exits through sim-ops; (2) an overlay run
//! on that copy finds the token (it reached the image), writes another,
//! which goes to the overlay, and takes a checkpoint, which ends the run:
//! the image's bytes are unchanged; (3) a restore of that checkpoint, with
//! the first overlay gone, finds the second token (only the checkpoint's
//! saved sectors hold it), writes a third to an overlay of its own in its
//! output folder, and leaves the image and the checkpoint unchanged.

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

/// Boots the guest with the example's config, `disk` args and `actions`,
/// and `extra` flags.
fn boot(guest: &Path, out: &Path, config: &str, actions: &str, extra: &[&str]) -> Run {
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initrd.gz");
    let append = append(actions);
    let mut args = vec![
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
    ];
    args.extend_from_slice(extra);
    let r = kvmsim(&args, out);
    r.no_panic();
    r
}

fn console_tail(r: &Run) -> String {
    let c = std::fs::read_to_string(r.out.join("serial.log")).unwrap_or_default();
    let lines: Vec<&str> = c.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn expect(r: &Run, lines: &[&str]) {
    expect_end(r, "guest_exit", lines)
}

fn expect_end(r: &Run, cause: &str, lines: &[&str]) {
    let tail = console_tail(r);
    assert_eq!(r.status, 0, "stderr:\n{}\nconsole:\n{tail}", r.stderr);
    assert_eq!(r.json("exit.json")["cause"], cause, "console:\n{tail}");
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
    let r1 = boot(&guest, &dir.join("out1"), &rw, "write:first-run-token", &[]);
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
    // goes to the overlay and the image's bytes stay as they were; then a
    // checkpoint ends the run. What comes after `checkpoint` is for the
    // restore.
    let overlay = dir.join("root.cow");
    let cow = cfg(
        "cow.toml",
        "[[system.disk]]\npath = \"root.img\"\noverlay = \"root.cow\"\n",
    );
    let r2 = boot(
        &guest,
        &dir.join("out2"),
        &cow,
        "read,write:second-run-token,checkpoint,read,write:third-run-token,read",
        &["--checkpoint-exit"],
    );
    expect_end(
        &r2,
        "checkpoint",
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

    // 3. A restore of the checkpoint, without the first overlay: the
    // second token comes from the checkpoint's saved sectors (the guest
    // dropped its page cache after the checkpoint), the third goes to the
    // restore's own overlay.
    let cp = std::fs::read_dir(dir.join("out2"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("cpt."))
        .expect("a checkpoint in out2");
    let sectors = cp.join("system.disk0.sectors");
    let saved = digest(&sectors);
    let state = std::fs::read(cp.join("state.ckpt")).unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state[32..]).unwrap();
    let extents = state["systems"][0]["disks"][0]["saved"]["extents"]
        .as_array()
        .unwrap()
        .len();
    assert!(extents > 0, "the checkpoint holds written sectors");
    std::fs::remove_file(&overlay).unwrap();
    let out3 = dir.join("out3");
    let r3 = kvmsim(
        &[
            "run",
            "--restore",
            cp.to_str().unwrap(),
            "--quiet",
            "--no-stdin",
        ],
        &out3,
    );
    r3.no_panic();
    expect(
        &r3,
        &[
            "KVMSIM-DISK: after the checkpoint (status 0)",
            "KVMSIM-DISK: found second-run-token",
            "KVMSIM-DISK: wrote third-run-token (status 0)",
            "KVMSIM-DISK: found third-run-token",
        ],
    );
    let own = out3.join("system.disk0.cow");
    assert!(
        r3.stderr
            .contains(&format!("this run's writes go to {}", own.display())),
        "{}",
        r3.stderr
    );
    assert_eq!(std::fs::metadata(&own).unwrap().len(), after_first.0);
    assert!(
        !overlay.exists(),
        "the first run's overlay is not recreated"
    );
    assert_eq!(
        digest(&image),
        after_first,
        "the restore left the image alone"
    );
    assert_eq!(
        digest(&sectors),
        saved,
        "the restore left the checkpoint alone"
    );
}
