#!/usr/bin/env python3
"""Sequential disk read inside a Linux guest, in simulated and host MB/s.

Boots the guest of scripts/linux-guest.sh with its root on a copy of
root.img (read-only: the image is not changed) and the disk's timing given
here, and has the disk's /sbin/init run `dd if=/dev/vda of=/dev/null bs=1M
count=MIB` after dropping the page cache, between a stats reset and a
stats dump (kvmsim.disk=dd:MIB). From that dump (the dd's interval only):

  simulated MB/s = system.disk0.bytesRead / simSeconds
  host MB/s      = system.disk0.bytesRead / hostSeconds

and, for comparison, the configured bandwidth, what one request of the
size Linux used at a time would reach alone (size / (size / bandwidth +
latency)), and how long the disk itself was busy in that interval (bytes /
bandwidth + requests x latency, an upper bound: Linux keeps several
requests in flight). The rest of the simulated time is the guest's own
work (page cache, copies, system calls), which is host time x host_factor
and, where kernel mode is emulated, dominates. Busybox's dd prints no rate
(its record counts are shown).

    scripts/bench-disk.py [--guest DIR] [--mib N] [--bandwidth 500MiB/s]
                          [--latency 100us] [--kvmsim PATH] [--keep DIR]

One boot: minutes on a host that emulates kernel mode.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIM = "lsm=capability init_on_alloc=0 init_on_free=0 mitigations=off cryptomgr.notests"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest", default=os.path.join(REPO, "target", "linux-guest"))
    ap.add_argument("--mib", type=int, default=48, help="MiB to read (the image has 64)")
    ap.add_argument("--bandwidth", default="500MiB/s")
    ap.add_argument("--latency", default="100us")
    ap.add_argument("--kvmsim", default=os.path.join(REPO, "target", "release", "kvmsim"))
    ap.add_argument("--keep", help="keep the run's output folder here")
    a = ap.parse_args()
    for f in ["vmlinuz", "initrd.gz", "root.img"]:
        if not os.path.isfile(os.path.join(a.guest, f)):
            sys.exit(f"bench-disk: no {f} in {a.guest} (scripts/linux-guest.sh {a.guest})")
    if not os.access(a.kvmsim, os.X_OK):
        sys.exit(f"bench-disk: no kvmsim at {a.kvmsim} (cargo build --release)")
    tmp = tempfile.mkdtemp(prefix="kvmsim-bench-disk-")
    out = a.keep or os.path.join(tmp, "out")
    try:
        image = os.path.join(tmp, "root.img")
        shutil.copyfile(os.path.join(a.guest, "root.img"), image)
        with open(os.path.join(REPO, "examples", "linux.toml")) as f:
            example = f.read()
        config = os.path.join(tmp, "bench.toml")
        with open(config, "w") as f:
            f.write(example.replace("../target/linux-guest/", os.path.abspath(a.guest) + "/"))
            f.write(f'\n[[system.disk]]\npath = "{image}"\nreadonly = true\n'
                    f'latency = "{a.latency}"\nbandwidth = "{a.bandwidth}"\n')
        cmd = [a.kvmsim, "run", config, "--quiet", "--no-stdin", "--outdir", out,
               "--append", f"{TRIM} root=/dev/vda ro kvmsim.disk=dd:{a.mib}"]
        t0 = time.monotonic()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            sys.exit(f"bench-disk: kvmsim ended with status {p.returncode}:\n{p.stderr}")
        with open(os.path.join(out, "stats.json")) as f:
            dumps = json.load(f)
        with open(os.path.join(out, "serial.log"), errors="replace") as f:
            console = f.read()
        # The guest's dump right after dd: the first dump holding the dd's bytes.
        dd = next(d for d in dumps if (d["stats"].get("system.disk0.bytesRead") or 0) >= a.mib << 20)
        s = dd["stats"]
        nbytes = s["system.disk0.bytesRead"]
        reads = s["system.disk0.reads"]
        sim_s, host_s = s["simSeconds"], s["hostSeconds"]
        bw = parse_bandwidth(a.bandwidth)
        lat = parse_seconds(a.latency)
        per_req = nbytes / reads if reads else 0
        alone = per_req / (per_req / bw + lat) if per_req else 0
        dd_line = next((l for l in console.splitlines() if "records out" in l), "(dd printed nothing)")
        busy = nbytes / bw + reads * lat
        rows = [
            ("bytes read (disk0)", f"{nbytes:,}"),
            ("read requests", f"{reads:,} (avg {per_req / 1024:.0f} KiB)"),
            ("simulated time", f"{sim_s:.6f} s"),
            ("host time", f"{host_s:.3f} s"),
            ("simulated MB/s", f"{nbytes / sim_s / 1e6:.1f}"),
            ("configured bandwidth MB/s", f"{bw / 1e6:.1f} (latency {a.latency})"),
            ("one request at a time MB/s", f"{alone / 1e6:.1f}"),
            ("disk busy (simulated, at most)", f"{busy:.6f} s ({100 * busy / sim_s:.0f}% of the interval)"),
            ("host MB/s", f"{nbytes / host_s / 1e6:.1f}"),
            ("dd's own report", dd_line.strip()),
            ("whole run, host seconds", f"{wall:.0f}"),
        ]
        for k, v in rows:
            print(f"{k:32} {v}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_bandwidth(s):
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|B)?(/s)?\s*", s, re.I)
    if not m:
        sys.exit(f"bench-disk: cannot read the bandwidth {s!r}")
    unit = (m.group(2) or "B").lower()
    mult = {"b": 1, "k": 1024, "kib": 1024, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30,
            "gib": 1 << 30, "kb": 1e3, "mb": 1e6, "gb": 1e9}.get(unit)
    if mult is None:
        sys.exit(f"bench-disk: unknown unit in {s!r}")
    return float(m.group(1)) * mult


def parse_seconds(s):
    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|ms|us|ns)\s*", s)
    if not m:
        sys.exit(f"bench-disk: cannot read the latency {s!r}")
    return float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[m.group(2)]


if __name__ == "__main__":
    main()
