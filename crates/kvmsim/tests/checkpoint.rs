//! `kvmsim checkpoint info`: what a checkpoint folder holds, and clear
//! errors (status 254, no panic) for folders that are not whole
//! checkpoints of this format.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use vm_memory::{Bytes, GuestAddress};

fn kvmsim_plain(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kvmsim"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn info(dir: &std::path::Path, json: bool) -> (i32, String, String) {
    let mut args = vec!["checkpoint".as_ref(), "info".as_ref(), dir.as_os_str()];
    if json {
        args.push("--json".as_ref());
    }
    kvmsim_plain(&args)
}

fn cpu(name: &str, halted: bool) -> kvm::CpuSaved {
    let v = kvm::fake::FakeVcpu::default();
    kvm::CpuSaved {
        name: name.into(),
        vcpu: kvm::state::save(&v).unwrap(),
        halted,
        idle_since: halted.then_some(5),
        insts: 0,
        min_span: 0,
    }
}

/// A checkpoint of two systems (2 CPUs and 1 CPU, 16 MiB and 8 MiB of RAM
/// with a few pages in use) at 1.5 simulated ms.
fn write_checkpoint(dir: &std::path::Path) {
    ckpt::create_dir(dir).unwrap();
    let mut systems = Vec::new();
    for (i, (mib, cpus)) in [(16u64, 2usize), (8, 1)].into_iter().enumerate() {
        let ram = mem::GuestRam::new(mem::MemoryMap::for_size(mib << 20).unwrap()).unwrap();
        ram.memory()
            .write_slice(&[0xab; 8192], GuestAddress(1 << 20))
            .unwrap();
        let (img, w) = ckpt::write_ram(dir, &format!("ram.{i}.bin"), ram.memory()).unwrap();
        assert_eq!(w.pages_written, 2);
        systems.push(ckpt::SystemState {
            name: format!("system{i}"),
            ram: img,
            cpus: (0..cpus)
                .map(|c| cpu(&format!("system{i}.cpu{c}"), c == 1))
                .collect(),
            devices: BTreeMap::from([("uart".to_string(), serde_json::json!({}))]),
            sim: serde_json::Value::Null,
            disks: Vec::new(),
        });
    }
    ckpt::write_state(
        dir,
        &ckpt::CheckpointState {
            kvmsim_version: "test".into(),
            tick: 1_500_000_000,
            config: serde_json::Value::Null,
            systems,
            network: serde_json::Value::Null,
        },
    )
    .unwrap();
}

#[test]
fn info_prints_what_a_checkpoint_holds() {
    let d = outdir("ckpt-info");
    write_checkpoint(&d);
    let (status, out, err) = info(&d, false);
    assert_eq!(status, 0, "{err}");
    let version = format!("format version  {}", ckpt::FORMAT_VERSION);
    for want in [
        version.as_str(),
        "1500000000 ticks (0.001500000 s)",
        "systems         2 (3 CPUs, RAM 25165824 bytes,",
        "system0: 2 CPUs (1 halted), 1 devices, RAM 16777216 bytes in ram.0.bin",
        "system1: 1 CPUs (0 halted), 1 devices, RAM 8388608 bytes in ram.1.bin",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    let (status, out, _) = info(&d, true);
    assert_eq!(status, 0);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["systems"][0]["ram_bytes"], 16 << 20);
    // Sparse: the two written pages, not 16 MiB, are on disk.
    let on_disk = j["systems"][0]["ram_bytes_on_disk"].as_u64().unwrap();
    assert!(on_disk < 1 << 20, "{on_disk} bytes on disk");
}

#[test]
fn a_damaged_or_foreign_folder_is_a_clear_error() {
    let d = outdir("ckpt-bad");
    write_checkpoint(&d);
    let state = d.join(ckpt::STATE_FILE);
    let good = std::fs::read(&state).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        (
            "corrupted",
            {
                let mut b = good.clone();
                let n = b.len();
                b[n - 10] ^= 0x20;
                b
            },
            "checksum",
        ),
        (
            "foreign",
            b"#!/bin/sh\necho hi\n".to_vec(),
            "not a kvmsim checkpoint",
        ),
        (
            "older",
            {
                let mut b = good.clone();
                b[8..12].copy_from_slice(&0u32.to_le_bytes());
                b
            },
            // The header checksum covers the version: a changed version
            // without its checksum is corruption, not an older file.
            "corrupted",
        ),
    ];
    for (what, bytes, want) in cases {
        std::fs::write(&state, &bytes).unwrap();
        let (status, out, err) = info(&d, false);
        assert_eq!(status, 254, "{what}: {out}{err}");
        assert!(err.contains(want), "{what}: {want:?} not in {err}");
        assert!(
            err.contains("state.ckpt"),
            "{what}: the file is named: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    // A folder with no checkpoint at all.
    let empty = outdir("ckpt-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (status, _, err) = info(&empty, false);
    assert_eq!(status, 254);
    assert!(err.contains("state.ckpt"), "{err}");
}
