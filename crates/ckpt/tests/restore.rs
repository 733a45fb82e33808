//! A checkpoint of a real vCPU and its RAM, written to a folder, read back
//! and restored into a fresh VM whose RAM is the checkpoint's RAM file
//! mapped copy-on-write: the guest continues from where it was, its writes
//! stay out of the file.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Instant;

use kvm::arch::x86_64::{boot, X86_64};
use kvm::{Arch, KvmVcpu, KvmVm, Vcpu, VcpuSpec, VmExit};
use mem::{GuestRam, MemoryMap};
use vm_memory::{Bytes, GuestAddress};

const RAM: u64 = 64 << 20;
const CODE: u64 = 0x10_0000;
const MMIO: u64 = 0xd000_0000;
const OUT: u64 = 0x30_0000;
const VALUE: u64 = 0x0bad_cafe_1234_5678;

/// `mov rax, [MMIO]; mov [OUT], rax; mov rax, [MMIO]; jmp .`
fn code() -> Vec<u8> {
    let mut c = vec![0x48, 0xa1];
    c.extend_from_slice(&MMIO.to_le_bytes());
    c.extend_from_slice(&[0x48, 0xa3]);
    c.extend_from_slice(&OUT.to_le_bytes());
    c.extend_from_slice(&[0x48, 0xa1]);
    c.extend_from_slice(&MMIO.to_le_bytes());
    c.extend_from_slice(&[0xeb, 0xfe]);
    c
}

fn vcpu(vm: &KvmVm) -> KvmVcpu {
    vm.create_cpu(&VcpuSpec {
        id: 0,
        cpus: 1,
        coalesced_mmio: false,
        x2apic: false,
    })
    .unwrap()
}

fn run_to_mmio(vcpu: &mut KvmVcpu) -> usize {
    let mut io = Vec::new();
    for _ in 0..1000 {
        match vcpu.run(&mut io) {
            VmExit::MmioRead { addr, len } if addr == MMIO => return len,
            VmExit::Intr | VmExit::Retry => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("no MMIO read");
}

/// The test's folder: removed when the test passes, kept when it fails.
struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection: the test failed", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_checkpointed_guest_continues_on_its_mapped_ram_in_a_fresh_vm() {
    if !kvm::usable_or_skip("a_checkpointed_guest_continues") {
        return;
    }
    let dir = Dir(std::env::temp_dir().join(format!("ckpt-restore-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);

    // The first machine runs to its first read, which is completed at a
    // drained point (half entry).
    let ram = GuestRam::new(MemoryMap::for_size(RAM).unwrap()).unwrap();
    boot::write_boot_structures(ram.memory()).unwrap();
    ram.memory()
        .write_slice(&code(), GuestAddress(CODE))
        .unwrap();
    let mut vm = KvmVm::new().unwrap();
    vm.map_ram(&ram).unwrap();
    let mut v = vcpu(&vm);
    let mut arch = X86_64::new();
    boot::enter_long_mode(&mut arch, &mut v, CODE, boot::DEFAULT_STACK_TOP, &[]).unwrap();
    arch.update_kvm_state(&mut v).unwrap();
    let len = run_to_mmio(&mut v);
    assert!(v.complete_mmio_read(&VALUE.to_le_bytes()[..len]));
    v.half_entry().unwrap();

    ckpt::create_dir(&dir.0).unwrap();
    let (img, written) = ckpt::write_ram(&dir.0, "ram.0.bin", ram.memory()).unwrap();
    let state = ckpt::CheckpointState {
        kvmsim_version: "test".into(),
        tick: 42,
        config: serde_json::Value::Null,
        systems: vec![ckpt::SystemState {
            name: "system".into(),
            ram: img,
            cpus: vec![kvm::CpuSaved {
                name: "system.cpu".into(),
                vcpu: kvm::state::save(&v).unwrap(),
                halted: false,
                idle_since: None,
                insts: 0,
                min_span: 0,
            }],
            devices: Default::default(),
            sim: serde_json::Value::Null,
            disks: Vec::new(),
        }],
        network: serde_json::Value::Null,
    };
    ckpt::write_state(&dir.0, &state).unwrap();
    drop(v);
    drop(vm);
    drop(ram);
    let on_disk = std::fs::metadata(dir.0.join("ram.0.bin")).unwrap().blocks() * 512;
    eprintln!(
        "RAM {} MiB: {} pages written, {on_disk} bytes on disk",
        RAM >> 20,
        written.pages_written
    );
    assert!(on_disk < RAM / 8, "{on_disk} bytes on disk: not sparse");

    // Restore: read the state, map the RAM file, a fresh VM and vCPU.
    let t = Instant::now();
    let back = ckpt::read_state(&dir.0).unwrap();
    let sys = &back.systems[0];
    let ram2 = ckpt::map_guest_ram(&dir.0, &sys.ram).unwrap();
    let mut vm2 = KvmVm::new().unwrap();
    vm2.map_ram(&ram2).unwrap();
    let mut v2 = vcpu(&vm2);
    let report = kvm::state::restore(&mut v2, &sys.cpus[0].vcpu).unwrap();
    eprintln!(
        "restore (read state, map RAM, VM, vCPU state): {:.2} ms; KVM refused {} MSRs",
        t.elapsed().as_secs_f64() * 1e3,
        report.msrs_refused.len()
    );

    // The guest continues after its completed read and writes to RAM.
    run_to_mmio(&mut v2);
    let got: u64 = ram2.memory().read_obj(GuestAddress(OUT)).unwrap();
    assert_eq!(got, VALUE, "the guest's RAX after the restore");
    // The write went to this process's copy, not into the checkpoint.
    let mut word = [0u8; 8];
    std::fs::File::open(dir.0.join("ram.0.bin"))
        .unwrap()
        .read_exact_at(&mut word, OUT)
        .unwrap();
    assert_eq!(u64::from_le_bytes(word), 0);
}
