#!/usr/bin/env python3
"""Time to Linux's /init: kvmsim against QEMU, side by side on one machine.

Boots the same kernel and initramfs (scripts/linux-guest.sh) with
  1. kvmsim (release build),
  2. qemu-system-x86_64 -M microvm -accel kvm,
  3. qemu-system-x86_64 -M microvm -accel tcg (QEMU's software emulator),
one after the other, and reports for each the host seconds until the
/init marker appeared on the console, or, where it never did, how far the
boot got (the last console line) and when. Each run is cut off after
--timeout host seconds. QEMU comes from Debian's qemu-system-x86 package
(installed with apt-get when missing and --install is given).

    scripts/bench-linux-boot.py [--guest DIR] [--timeout S] [--install]
                                [--config examples/linux.toml]

The kvmsim run uses the Linux command line kvmsim builds (with the flags
`kvmsim doctor` derives for this host); QEMU gets the same command line,
including those flags, so both kernels do the same work.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

MARKER = "KVMSIM-INIT: /init is running"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_timed(cmd, timeout, env=None):
    """Runs cmd, reading its console (stdout) line by line. Returns
    (seconds to the marker or None, last line, seconds at the last line,
    how it ended)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    state = {"marker": None, "last": "", "last_t": 0.0}

    def reader():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line.strip():
                continue
            now = time.monotonic() - start
            state["last"], state["last_t"] = line, now
            if state["marker"] is None and MARKER in line:
                state["marker"] = now

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    ended = "exited"
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        ended = f"cut off after {timeout} s"
        proc.kill()
        proc.wait()
    t.join(timeout=5)
    return state["marker"], state["last"], state["last_t"], ended


def kvmsim_cmdline(kvmsim, config, guest):
    """The Linux command line kvmsim builds on this host (from a dry start:
    config.json of a run cut off at once)."""
    out = tempfile.mkdtemp(prefix="kvmsim-cmdline-")
    subprocess.run(
        [kvmsim, "run", config, "--kernel", f"{guest}/vmlinuz", "--initrd",
         f"{guest}/initrd.gz", "--max-time", "1us", "--quiet", "--outdir", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
    )
    with open(os.path.join(out, "config.json")) as f:
        line = json.load(f)["system"][0]["cmdline"]
    shutil.rmtree(out, ignore_errors=True)
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", default=os.path.join(REPO, "target/linux-guest"),
                    help="folder with vmlinuz and initrd.gz")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="host seconds each run may take")
    ap.add_argument("--install", action="store_true",
                    help="apt-get install qemu-system-x86 when missing")
    ap.add_argument("--config", default=os.path.join(REPO, "examples/linux.toml"),
                    help="kvmsim config (its append and host_factor are used)")
    ap.add_argument("--kvmsim-arg", action="append", default=[],
                    help="extra argument for kvmsim run (repeatable)")
    a = ap.parse_args()

    for f in ("vmlinuz", "initrd.gz"):
        if not os.path.isfile(os.path.join(a.guest, f)):
            sys.exit(f"{a.guest}/{f} missing: run scripts/linux-guest.sh {a.guest}")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "kvmsim"], cwd=REPO, check=True)
    kvmsim = os.path.join(REPO, "target/release/kvmsim")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None and a.install:
        subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=False)
        qemu = shutil.which("qemu-system-x86_64")

    cmdline = kvmsim_cmdline(kvmsim, a.config, a.guest)
    # QEMU's guest TSC runs at the host rate in real time; kvmsim's rate is
    # per simulated second (host rate / host_factor): let QEMU's kernel
    # find its own.
    qemu_cmdline = " ".join(w for w in cmdline.split() if not w.startswith("tsc_early_khz="))
    out = tempfile.mkdtemp(prefix="kvmsim-bench-boot-")
    runs = [("kvmsim", [kvmsim, "run", a.config, "--kernel", f"{a.guest}/vmlinuz", "--initrd",
                        f"{a.guest}/initrd.gz", "--outdir", out] + a.kvmsim_arg)]
    if qemu:
        for accel in ("kvm", "tcg"):
            runs.append((f"qemu microvm -accel {accel}", [
                qemu, "-M", "microvm,rtc=on,pit=on,pic=on,isa-serial=on",
                # arch-capabilities off: a software-assisted KVM refuses
                # MSR 0x10a and QEMU aborts at start with it on.
                "-accel", accel,
                "-cpu", "host,arch-capabilities=off" if accel == "kvm" else "max",
                "-m", "128M", "-smp", "1", "-nodefaults", "-no-reboot",
                "-display", "none", "-serial", "stdio",
                "-kernel", f"{a.guest}/vmlinuz", "-initrd", f"{a.guest}/initrd.gz",
                "-append", qemu_cmdline,
            ]))
    else:
        print("qemu-system-x86_64 not found (Debian: apt-get install qemu-system-x86, "
              "or pass --install): QEMU runs skipped", file=sys.stderr)

    print(f"kernel command line: {cmdline}")
    print(f"{'run':<26} {'to /init (host s)':>18}  how far / how it ended")
    results = []
    for name, cmd in runs:
        marker, last, last_t, ended = run_timed(cmd, a.timeout)
        results.append((name, marker))
        reached = f"{marker:.1f}" if marker is not None else "not reached"
        print(f"{name:<26} {reached:>18}  {ended}; last console line at "
              f"{last_t:.1f} s: {last[:100]}", flush=True)
    base = results[0][1]
    for name, marker in results[1:]:
        if base is not None and marker is not None:
            print(f"kvmsim / {name}: {base / marker:.3g} (host time to /init)")


if __name__ == "__main__":
    main()
