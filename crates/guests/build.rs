//! Assembles the bare-metal guests in `asm/` with the GNU assembler and links
//! each into a static ELF at 1 MiB; also builds the compute loop as a native
//! static library so the host can run the very same code.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[&str] = &[
    "hello",
    "compute",
    "fault",
    "simops",
    "ticks",
    "sleep",
    "steps",
    "iostream",
    "pingpong",
    "pcirq",
    "netpong",
    "int3",
    "syscall",
    "flags",
    "fwait",
    "irqint3",
    "echo",
    "pioloop",
    "mmioloop",
    "kick",
    "smpboot",
    "ipipong",
    "multiboot",
    "ckpt",
    "gdbdemo",
    "readfile",
    "pcevents",
    "irqwin",
    "x2apic",
];

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {what} ({cmd:?}): {e}. Install GNU binutils (Debian: apt-get install binutils).")
    });
    if !out.status.success() {
        panic!(
            "{what} failed ({cmd:?}):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn assemble(src: &Path, obj: &Path, asm_dir: &Path) {
    run(
        Command::new("as")
            .arg("--64")
            .arg("-I")
            .arg(asm_dir)
            .arg("-o")
            .arg(obj)
            .arg(src),
        "the GNU assembler (as)",
    );
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let asm = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("asm");
    println!("cargo:rerun-if-changed=asm");

    for g in GUESTS {
        let obj = out.join(format!("{g}.o"));
        let elf = out.join(format!("{g}.elf"));
        assemble(&asm.join(format!("{g}.s")), &obj, &asm);
        run(
            Command::new("ld")
                .args(["-nostdlib", "-static", "-no-pie", "--build-id=none"])
                .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
                .arg("-T")
                .arg(asm.join("guest.ld"))
                .arg("-o")
                .arg(&elf)
                .arg(&obj),
            "the GNU linker (ld)",
        );
    }

    let obj = out.join("compute_loop.o");
    assemble(&asm.join("compute_loop.s"), &obj, &asm);

    // A Linux program (SE mode and native): ET_EXEC at ld's default
    // address, with the compute loop linked in.
    let se = out.join("se_bench.o");
    assemble(&asm.join("se_bench.s"), &se, &asm);
    run(
        Command::new("ld")
            .args(["-nostdlib", "-static", "-no-pie", "--build-id=none"])
            .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
            .arg("-o")
            .arg(out.join("se_bench.elf"))
            .arg(&se)
            .arg(&obj),
        "the GNU linker (ld)",
    );
    let lib = out.join("libkvmsim_compute_loop.a");
    let _ = std::fs::remove_file(&lib);
    run(Command::new("ar").arg("crs").arg(&lib).arg(&obj), "ar");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=kvmsim_compute_loop");
}
