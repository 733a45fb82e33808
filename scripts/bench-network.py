#!/usr/bin/env python3
"""TCP over simulated Ethernet: two Debian systems (examples/network.toml).

Runs the example (system1 pings system0, then sends it kvmsim.mib MiB over
TCP with busybox nc; both check the SHA-256) and reports from its output:

  - ping's round-trip times against twice the link latency;
  - the TCP transfer's throughput in simulated time against the link's
    bandwidth (the client resets the statistics before the transfer and
    dumps them when the server's answer is back, so that dump's simSeconds
    is the transfer's simulated time);
  - host seconds per simulated second, for the transfer and for the whole
    run.

    scripts/bench-network.py [--guest DIR] [--mib N] [--latency T]
                             [--bandwidth B] [--outdir DIR]
    scripts/bench-network.py --results OUT    # a finished run's output folder

The guest comes from scripts/linux-guest.sh (default target/linux-guest).
KVMSIM names the kvmsim binary (default target/release/kvmsim, else
target/debug/kvmsim). Where the host emulates kernel mode (kvmsim doctor)
the run takes tens of minutes, and the guests' processing, not the wire,
limits the throughput.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kvmsim_binary():
    if os.environ.get("KVMSIM"):
        return os.environ["KVMSIM"]
    for build in ("release", "debug"):
        path = os.path.join(REPO, "target", build, "kvmsim")
        if os.access(path, os.X_OK):
            return path
    sys.exit("bench-network: no kvmsim binary (cargo build --release, or set KVMSIM)")


def parse_ns(text):
    """A duration as the config writes it (1ms, 100us, 2s) in nanoseconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ns|us|ms|s)\s*", text)
    if not m:
        sys.exit(f"bench-network: cannot read the duration {text!r}")
    scale = {"ns": 1, "us": 1e3, "ms": 1e6, "s": 1e9}[m.group(2)]
    return float(m.group(1)) * scale


def parse_bps(text):
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kMG]?)bit/s\s*", text)
    if not m:
        sys.exit(f"bench-network: cannot read the bandwidth {text!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guest", default=os.path.join(REPO, "target", "linux-guest"))
    ap.add_argument("--mib", type=int, default=4, help="MiB sent over TCP (default 4)")
    ap.add_argument("--latency", default="1ms", help="the link's latency (default 1ms)")
    ap.add_argument("--bandwidth", default="1Gbit/s", help="the link's bandwidth")
    ap.add_argument("--outdir", default=None, help="kvmsim's output folder (default: a new one in /tmp)")
    ap.add_argument("--results", default=None, metavar="OUT",
                    help="report on the output folder of a run of examples/network.toml instead of running")
    a = ap.parse_args()
    if a.results:
        report(a, a.results, None)
        return

    guest = os.path.abspath(a.guest)
    for f in ("vmlinuz", "initrd.gz"):
        if not os.path.isfile(os.path.join(guest, f)):
            sys.exit(f"bench-network: no {f} in {guest} (scripts/linux-guest.sh {guest})")
    with open(os.path.join(REPO, "examples", "network.toml")) as f:
        text = f.read()
    text = text.replace('"../target/linux-guest/vmlinuz"', json.dumps(os.path.join(guest, "vmlinuz")))
    text = text.replace('"../target/linux-guest/initrd.gz"', json.dumps(os.path.join(guest, "initrd.gz")))
    text = text.replace("kvmsim.mib=4", f"kvmsim.mib={a.mib}")
    text = re.sub(r'(?m)^latency = ".*"$', f'latency = "{a.latency}"', text)
    text = re.sub(r'(?m)^bandwidth = ".*"$', f'bandwidth = "{a.bandwidth}"', text)

    out = a.outdir or tempfile.mkdtemp(prefix="kvmsim-bench-network.")
    os.makedirs(out, exist_ok=True)
    cfg = os.path.join(out, "network.toml")
    with open(cfg, "w") as f:
        f.write(text)
    kvmsim = kvmsim_binary()
    print(f"kvmsim: {kvmsim}; guest: {guest}; {a.mib} MiB over {a.latency}, {a.bandwidth}; output in {out}")
    t0 = time.monotonic()
    r = subprocess.run(
        [kvmsim, "run", cfg, "--outdir", os.path.join(out, "out"), "--quiet", "--no-stdin"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.monotonic() - t0
    res = os.path.join(out, "out")
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        for s in ("system0", "system1"):
            try:
                with open(os.path.join(res, f"serial.{s}.log")) as f:
                    print(f"--- {s}:", *f.readlines()[-15:], sep="", file=sys.stderr)
            except OSError:
                pass
        sys.exit(f"bench-network: kvmsim ended with status {r.returncode}")
    report(a, res, wall)


def report(a, res, wall):
    """Prints the figures of the run whose output folder is `res` (`wall`:
    its host seconds, or None to take them from the final dump)."""
    with open(os.path.join(res, "serial.system1.log")) as f:
        client = f.read()
    with open(os.path.join(res, "stats.json")) as f:
        dumps = json.load(f)
    rtt = re.search(r"round-trip min/avg/max = ([0-9.]+)/([0-9.]+)/([0-9.]+) ms", client)
    transfer = next((d for d in dumps if "system1.nic0.txBytes" in d["stats"]), None)
    final = dumps[-1]["stats"]
    latency_ms = parse_ns(a.latency) / 1e6
    print()
    if rtt:
        lo, avg, hi = (float(v) for v in rtt.groups())
        print(f"ping -c 5      min/avg/max {lo:.3f}/{avg:.3f}/{hi:.3f} ms; 2 x latency = {2 * latency_ms:.3f} ms, "
              f"the guests' processing {avg - 2 * latency_ms:.3f} ms on average")
    else:
        print("ping -c 5      no summary on the client's console")
    if transfer:
        st = transfer["stats"]
        sent = st["system1.nic0.txBytes"]
        secs = st["simSeconds"]
        host = st["hostSeconds"]
        bps = sent * 8 / secs if secs else float("nan")
        link = parse_bps(a.bandwidth)
        print(f"TCP transfer   {sent} bytes on the wire in {secs:.6f} simulated s: {bps / 1e6:.1f} Mbit/s, "
              f"{100 * bps / link:.2f}% of {a.bandwidth}")
        print(f"               {host:.1f} host s, {host / secs:.1f} host s per simulated s")
    else:
        print("TCP transfer   the client's dump after the transfer is missing")
    if wall is None:
        wall = final["hostSeconds"]
    print(f"whole run      {final['simSeconds']:.3f} simulated s, {wall:.0f} host s "
          f"({wall / final['simSeconds']:.1f} host s per simulated s)")


if __name__ == "__main__":
    main()
