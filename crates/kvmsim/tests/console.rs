//! The guest console's input: kvmsim reads stdin only for a guest that asks
//! for input, and only as much as it asks for, so that a shell loop around
//! kvmsim keeps its input; --no-stdin detaches stdin altogether.

mod common;

use common::*;

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn a_shell_loop_around_kvmsim_runs_once_per_line() {
    if !kvm_or_skip("shell_loop") {
        return;
    }
    let dir = outdir("shell-loop");
    std::fs::create_dir_all(&*dir).unwrap();
    let (st, stdout) = shell(
        "printf 'a\\nb\\nc\\n' | while read x; do \
           \"$K\" run --kernel builtin:hello --quiet --outdir \"$D/$x\" || exit 9; \
           echo \"ran $x\"; done",
        &dir,
    );
    assert_eq!(st, 0, "{stdout}");
    assert_eq!(stdout, "ran a\nran b\nran c\n");
    for x in ["a", "b", "c"] {
        assert!(dir.join(x).join("exit.json").is_file(), "run {x}");
    }
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn the_guest_takes_only_the_bytes_it_reads() {
    if !kvm_or_skip("echo") {
        return;
    }
    let dir = outdir("echo");
    std::fs::create_dir_all(&*dir).unwrap();
    // The guest reads 4 bytes; `cat` gets the rest.
    let (st, stdout) = shell(
        "printf 'abc\\ndef\\n' | { \"$K\" run --kernel builtin:echo --arg 4 --quiet \
           --outdir \"$D/out\"; echo \"status=$?\"; cat; }",
        &dir,
    );
    assert_eq!(st, 0);
    assert_eq!(stdout, "status=0\ndef\n");
    let log = std::fs::read_to_string(dir.join("out/serial.log")).unwrap();
    assert_eq!(log, "echo: abc\n\n");
}

#[test]
#[cfg_attr(
    kvmsim_no_kvm,
    ignore = "needs KVM, which was not usable when this test was built"
)]
fn no_stdin_keeps_stdin_away_from_the_guest() {
    if !kvm_or_skip("no_stdin") {
        return;
    }
    let dir = outdir("no-stdin");
    std::fs::create_dir_all(&*dir).unwrap();
    // The guest waits for a byte that never comes, until the time limit.
    let (st, stdout) = shell(
        "printf 'xyz\\n' | { \"$K\" run --kernel builtin:echo --no-stdin --max-time 5ms \
           --quiet --outdir \"$D/out\"; echo \"status=$?\"; cat; }",
        &dir,
    );
    assert_eq!(st, 0);
    assert_eq!(stdout, "status=250\nxyz\n");
    // The config key does the same.
    std::fs::write(
        dir.join("c.toml"),
        "[sim]\nmax_time = \"5ms\"\n[system]\nkernel = \"builtin:echo\"\n\
         [system.serial]\nstdin = false\nstdout = false\n",
    )
    .unwrap();
    let (st, stdout) = shell(
        "printf 'xyz\\n' | { \"$K\" run \"$D/c.toml\" --outdir \"$D/out2\"; \
           echo \"status=$?\"; cat; }",
        &dir,
    );
    assert_eq!(st, 0);
    assert_eq!(stdout, "status=250\nxyz\n");
}
