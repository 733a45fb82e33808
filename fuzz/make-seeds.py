#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/.

The seeds are committed; this script says where they came from and remakes
them: the built-in guests (`kvmsim guests --extract`, so kvmsim is built
first), examples/*.toml, small payloads compressed with the system's gzip,
xz, zstd and lz4 (as the kernel's build does), fake bzImages around them,
firmware parameters, and one access script per device in the format of
fuzz/src/script.rs. Run from anywhere: python3 fuzz/make-seeds.py
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def run(cmd, data):
    return subprocess.run(cmd, input=data, stdout=subprocess.PIPE, check=True).stdout


# --- built-in guests --------------------------------------------------------

def guests():
    tmp = tempfile.mkdtemp()
    subprocess.run(["cargo", "build", "-q", "-p", "kvmsim"], cwd=ROOT, check=True)
    subprocess.run([os.path.join(ROOT, "target", "debug", "kvmsim"), "guests", "--extract", tmp],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    out = {}
    for n in sorted(os.listdir(tmp)):
        with open(os.path.join(tmp, n), "rb") as f:
            out[n[:-4]] = f.read()
    shutil.rmtree(tmp)
    return out


# --- config and units -------------------------------------------------------

FULL_CONFIG = """\
[sim]
max_time = "10s"
drain_period = "1ms"
sample_period = "1s"

[system]
memory = "128MiB"
kernel = "builtin:hello"
args = [1000, 2, 3]
stack = 0x80000
coalesced_mmio = [[0xFEB00000, 0x1000]]
platform = "auto"
rtc_start = 1795610096

[system.cpu]
clock = "2GHz"
host_factor = 1.0
host_freq = "2.6GHz"
timer = "auto"
max_insts = 1000000
syscall_repair = true
trace = { from = "1s", insts = 1000 }

[system.serial]
stdout = true
stdin = false
"""

LINUX_CONFIG = """\
[system]
kernel = "vmlinuz"
initrd = "initrd.gz"
append = "quiet"
platform = "pc"
memory = "1GiB"
[system.cpu]
host_factor = 4
"""

UNITS = ["64MiB", "1GiB", "4096", "2.6 GHz", "100MHz", "32768Hz", "10ms", "2.5us",
         "1_000_000ps", "7ns", "1s", "1.5GiB", "2GB", "3 parsecs", "0Hz", "µs", ""]


# --- compressed payloads and bzImages ---------------------------------------

def compressors():
    return {
        "decompress_gzip": ["gzip", "-9", "-n", "-c"],
        "decompress_xz": ["xz", "--check=crc32", "-c"],
        "decompress_lzma": ["xz", "--format=lzma", "-c"],
        "decompress_zstd": ["zstd", "-19", "-q", "-c"],
        "decompress_lz4": ["lz4", "-l", "-9", "-q", "-c"],
    }


def bzimage(payload, protocol=0x020F, setup_sects=4):
    img = bytearray(512 * ((setup_sects or 4) + 1))  # 0 means 4
    img[0x1F1] = setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x201] = 0x6A  # header length: 0x202 + 0x6a = 0x26c
    img[0x202:0x206] = b"HdrS"
    img[0x206:0x208] = struct.pack("<H", protocol)
    img[0x22C:0x230] = struct.pack("<I", 0x7FFFFFFF)  # initrd_addr_max
    img[0x238:0x23C] = struct.pack("<I", 2047)  # cmdline_size
    img[0x248:0x24C] = struct.pack("<I", 0)  # payload_offset
    img[0x24C:0x250] = struct.pack("<I", len(payload))  # payload_length
    return bytes(img) + payload


# --- firmware parameters ----------------------------------------------------

def firmware(memory, initrd, kernel_end, addr_max, cmdline_size, cpus, ioapic, header,
             cmdline, e820=()):
    b = struct.pack("<QQQIIBBBHH", memory, initrd, kernel_end, addr_max, cmdline_size,
                    cpus, ioapic, len(e820), len(header), len(cmdline))
    b += header + cmdline.encode()
    for a, s, t in e820:
        b += struct.pack("<QQI", a, s, t)
    return b


# --- device access scripts --------------------------------------------------

R, W, EV, IDLE = 0, 1, 2, 3


def advance(ticks):
    shift = 0
    while ticks > 0xFFFFFF:
        ticks >>= 1
        shift += 1
    return (shift << 24) | ticks


def op(kind, offset=0, value=0, size=1, window=0, after=0, aux=0):
    """One record: `after` ticks pass first."""
    return struct.pack("<BBHIQQ", kind | (window << 2), (size - 1) % 8, offset,
                       advance(after), value & (2**64 - 1), aux & (2**64 - 1))


def script(*ops, param=0):
    return struct.pack("<Q", param & (2**64 - 1)) + b"".join(ops)


US = 1_000_000
MS = 1_000_000_000
S = 1_000_000_000_000


def device_seeds():
    seeds = {}
    seeds["dev_uart"] = [script(
        op(W, 3, 0x83), op(W, 0, 0x01), op(W, 1, 0x00), op(W, 3, 0x03), op(W, 2, 0xC7),
        op(W, 1, 0x03), op(W, 0, ord("h")), op(W, 0, ord("\n")), op(R, 2), op(R, 5),
        op(EV, value=0x636261, size=3), op(R, 5), op(R, 2), op(R, 0), op(R, 0), op(R, 0),
        op(R, 5), op(W, 4, 0x1F), op(W, 0, ord("L")), op(R, 0), op(R, 6), op(W, 7, 0x5A),
        op(R, 7), op(W, 4, 0x0B), op(R, 0, size=8), op(W, 0, 0x4142434445464748, size=8)),
    ]
    seeds["dev_simops"] = [script(
        op(R, 0x2300, value=1, aux=2, size=8), op(W, 0x5A00, value=1, aux=0),
        op(W, 0x5B00, value=1, aux=0, after=5 * US), op(W, 0x4000, value=0, aux=0),
        op(W, 0x4100, value=1000, aux=1000), op(W, 0x4200, value=0, aux=0),
        op(R, 0x7700, size=4), op(W, 0x2200, value=5, aux=3), op(W, 0x2100, value=10)),
    ]
    seeds["dev_timer"] = [script(
        op(W, 0x10, 0x40, size=8), op(W, 0x00, 1000, size=8), op(W, 0x08, 3, size=8),
        op(IDLE, after=5 * US), op(R, 0x18, size=8), op(R, 0x20, size=8), op(EV),
        op(W, 0x08, 7, size=8), op(IDLE, after=3 * US), op(EV, aux=1), op(R, 0x1C, size=4),
        op(W, 0x00, 0xFFFFFFFFFFFF, size=8), op(W, 0x08, 0, size=8), op(R, 0x18, size=2)),
    ]
    seeds["dev_mailbox"] = [script(
        op(W, 0x18, 0x50, size=8), op(W, 0x00, 0x1234, size=8), op(EV, value=7, aux=3),
        op(R, 0x10, size=8), op(R, 0x08, size=8), op(R, 0x08, size=8), op(R, 0x20, size=8),
        op(R, 0x28, size=8), op(R, 0x30, size=8), op(EV, value=1, aux=4500),
        op(R, 0x10, size=8), op(R, 0x0C, size=4),
        param=(100 * US) << 8),
    ]
    m, s, e = 0, 1, 2  # PIC windows: master, slave, ELCR
    seeds["dev_pic"] = [script(
        op(W, 0, 0x11, window=m), op(W, 1, 0x30, window=m), op(W, 1, 0x04, window=m),
        op(W, 1, 0x01, window=m), op(W, 0, 0x11, window=s), op(W, 1, 0x38, window=s),
        op(W, 1, 0x02, window=s), op(W, 1, 0x01, window=s), op(W, 1, 0x00, window=m),
        op(W, 1, 0x00, window=s), op(EV, value=0, aux=3), op(EV), op(W, 0, 0x20, window=m),
        op(EV, value=0, aux=1), op(EV, value=9, aux=3), op(EV), op(W, 0, 0x20, window=s),
        op(W, 0, 0x20, window=m), op(W, 0, 0x0B, window=m), op(R, 0, window=m),
        op(W, 0, 0x0C, window=m), op(R, 0, window=m), op(W, 0, 0x20, window=e),
        op(R, 0, window=e, size=2), op(EV, value=5, aux=3), op(W, 0, 0x0A, window=m),
        op(R, 0, window=m), op(W, 0, 0x68, window=m), op(W, 0, 0xC7, window=m)),
    ]
    seeds["dev_pit"] = [script(
        op(W, 3, 0x34), op(W, 0, 0xA9), op(W, 0, 0x04), op(IDLE, after=10 * MS),
        op(W, 3, 0x00), op(R, 0), op(R, 0), op(W, 3, 0xC2), op(R, 0), op(R, 0),
        op(W, 3, 0xB6), op(W, 2, 0x00), op(W, 2, 0x10), op(W, 0, 0x01, window=1),
        op(R, 0, window=1, after=50 * US), op(W, 3, 0x30), op(W, 0, 100), op(W, 0, 0),
        op(IDLE, after=1 * MS), op(W, 3, 0x16), op(W, 0, 0x10), op(R, 0, after=2 * US),
        op(W, 0, 0x00, window=1), op(W, 3, 0x36), op(W, 0, 0), op(W, 0, 0),
        op(IDLE, after=100 * MS)),
    ]
    seeds["dev_rtc"] = [script(
        op(W, 0, 0x0B), op(W, 1, 0x42), op(W, 0, 0x0A), op(W, 1, 0x26),
        op(IDLE, after=5 * MS), op(W, 0, 0x0C), op(R, 1), op(W, 0, 0x00), op(R, 1),
        op(W, 0, 0x0B), op(W, 1, 0x82), op(W, 0, 0x00), op(W, 1, 0x30), op(W, 0, 0x04),
        op(W, 1, 0x23), op(W, 0, 0x0B), op(W, 1, 0x32), op(IDLE, after=1500 * MS),
        op(W, 0, 0x0C), op(R, 1), op(W, 0, 0x0A), op(R, 1, after=999 * MS),
        op(W, 0, 0x0B), op(W, 1, 0x06), op(W, 0, 0x07), op(R, 1), op(W, 0, 0x32),
        op(R, 1), op(W, 0, 0x40), op(W, 1, 0x99), op(R, 1), op(W, 0, 0x8D), op(R, 1),
        param=1795610096),
    ]
    d, c = 0, 1  # i8042 windows: data, command
    seeds["dev_i8042"] = [script(
        op(W, 0, 0x20, window=c), op(R, 0, window=d), op(W, 0, 0x60, window=c),
        op(W, 0, 0x47, window=d), op(W, 0, 0xAA, window=c), op(R, 0, window=c),
        op(R, 0, window=d), op(W, 0, 0xFF, window=d), op(R, 0, window=d),
        op(R, 0, window=d), op(W, 0, 0xF2, window=d), op(R, 0, window=d),
        op(W, 0, 0xEE, window=d), op(W, 0, 0xD1, window=c), op(W, 0, 0x01, window=d),
        op(W, 0, 0xD2, window=c), op(W, 0, 0x55, window=d), op(R, 0, window=d),
        op(W, 0, 0xD0, window=c), op(R, 0, window=d), op(W, 0, 0xFE, window=c)),
    ]
    seeds["dev_ioapic"] = [script(
        op(W, 0x00, 0x10, size=4), op(W, 0x10, 0x30, size=4), op(W, 0x00, 0x11, size=4),
        op(W, 0x10, 0, size=4), op(EV, value=0, aux=3), op(EV), op(EV, value=0, aux=1),
        op(W, 0x00, 0x12, size=4), op(W, 0x10, 0x8031, size=4), op(EV, value=1, aux=3),
        op(EV), op(EV), op(EV, value=1, aux=1), op(W, 0x00, 0x00, size=4),
        op(R, 0x10, size=4), op(W, 0x00, 0x01, size=4), op(R, 0x10, size=4),
        op(W, 0x00, 0x02, size=4), op(R, 0x10, size=4), op(W, 0x40, 0x31, size=4),
        op(W, 0x00, 0x14, size=4), op(W, 0x10, 0x1A432, size=4), op(EV, value=2, aux=3),
        op(R, 0x00, size=4)),
    ]
    seeds["dev_lapic"] = [script(
        op(W, 0xF0, 0x1FF, size=4), op(W, 0x3E0, 0x3, size=4), op(W, 0x320, 0x20030, size=4),
        op(W, 0x380, 10000, size=4), op(IDLE, after=1 * MS), op(EV, aux=4),
        op(W, 0xB0, 0, size=4), op(R, 0x390, size=4), op(W, 0x350, 0x700, size=4),
        op(EV, value=0x11, aux=7), op(EV, value=0x3001, aux=7), op(EV, value=0x0401, aux=7),
        op(EV, value=0x0101, aux=7), op(EV, value=0x0001, aux=7), op(EV, value=3, aux=6 | 16),
        op(EV, aux=4), op(W, 0x300, 0x40031, size=4), op(W, 0x310, 0x01000000, size=4),
        op(W, 0x300, 0xC4500, size=4), op(R, 0x300, size=4), op(W, 0x80, 0x20, size=4),
        op(R, 0xA0, size=4), op(W, 0x320, 0x31, size=4), op(W, 0x380, 5, size=4),
        op(IDLE, after=1 * US), op(EV, value=0x41, aux=8), op(EV, aux=4),
        op(W, 0xB0, 0, size=4), op(EV, aux=1), op(EV, aux=2), op(EV, value=0x9A, aux=3),
        op(W, 0xE0, 0x0FFFFFFF, size=4), op(W, 0xD0, 0x01000000, size=4),
        op(W, 0x300, 0x00830, size=4), op(R, 0x100, size=4), op(R, 0x200, size=4),
        op(W, 0xF0, 0xFF, size=4), op(W, 0x281, 1, size=2)),
    ]
    # virtio-blk: the driver's set-up (status, VERSION_1, a 16-entry queue
    # at 0x1000/0x2000/0x3000, DRIVER_OK), a read or write chain of three
    # descriptors built with events (header at 0x8000, 512 bytes at 0x9000,
    # status at 0x9200), the notification, time for it to complete, and
    # the interrupt acknowledged. param 1: a read-only disk.
    def virtio_blk(ty, param):
        return script(
            op(W, 0x70, 0, size=4), op(W, 0x70, 1, size=4), op(W, 0x70, 3, size=4),
            op(W, 0x24, 1, size=4), op(W, 0x20, 1, size=4), op(W, 0x70, 0xB, size=4),
            op(W, 0x30, 0, size=4), op(W, 0x38, 16, size=4), op(W, 0x80, 0x1000, size=4),
            op(W, 0x90, 0x2000, size=4), op(W, 0xA0, 0x3000, size=4), op(W, 0x44, 1, size=4),
            op(W, 0x70, 0xF, size=4),
            op(EV, value=ty, aux=0x8000), op(EV, value=1, aux=0x8008),
            op(EV, value=0x8000, aux=0x1000), op(EV, value=16 | (1 << 32) | (1 << 48), aux=0x1008),
            op(EV, value=0x9000, aux=0x1010),
            op(EV, value=512 | ((1 | (2 if ty == 0 else 0)) << 32) | (2 << 48), aux=0x1018),
            op(EV, value=0x9200, aux=0x1020), op(EV, value=1 | (2 << 32), aux=0x1028),
            op(EV, value=1 << 16, aux=0x2000), op(W, 0x50, 0, size=4),
            op(IDLE, after=1 * MS), op(R, 0x60, size=4), op(W, 0x64, 1, size=4),
            op(R, 0x100, size=8), op(R, 0x70, size=4),
            param=param)
    seeds["dev_virtio_blk"] = [virtio_blk(0, 0), virtio_blk(1, 0), virtio_blk(1, 1)]
    # virtio-net: the driver's set-up (VERSION_1 and MAC, two 16-entry
    # queues: receive at 0x1000/0x2000/0x3000, transmit at
    # 0x4000/0x5000/0x6000, DRIVER_OK); a receive buffer of 0x600 bytes at
    # 0x8000 made available and notified, a 60-byte frame arriving into
    # it; a transmit buffer (12-byte header and a 60-byte frame at 0x9000)
    # made available and notified, time for it to leave the wire, the
    # interrupt acknowledged, the MAC read.
    def virtio_net(frame_len):
        return script(
            op(W, 0x70, 0, size=4), op(W, 0x70, 1, size=4), op(W, 0x70, 3, size=4),
            op(W, 0x24, 0, size=4), op(W, 0x20, 1 << 5, size=4),
            op(W, 0x24, 1, size=4), op(W, 0x20, 1, size=4), op(W, 0x70, 0xB, size=4),
            op(W, 0x30, 0, size=4), op(W, 0x38, 16, size=4), op(W, 0x80, 0x1000, size=4),
            op(W, 0x90, 0x2000, size=4), op(W, 0xA0, 0x3000, size=4), op(W, 0x44, 1, size=4),
            op(W, 0x30, 1, size=4), op(W, 0x38, 16, size=4), op(W, 0x80, 0x4000, size=4),
            op(W, 0x90, 0x5000, size=4), op(W, 0xA0, 0x6000, size=4), op(W, 0x44, 1, size=4),
            op(W, 0x70, 0xF, size=4),
            op(EV, value=0x8000, aux=0x1000), op(EV, value=0x600 | (2 << 32), aux=0x1008),
            op(EV, value=1 << 16, aux=0x2000), op(W, 0x50, 0, size=4),
            op(EV, value=frame_len | (0x45 << 16), aux=1 << 62),
            op(EV, value=0x0000ffffffffffff, aux=0x900C),
            op(EV, value=0x9000, aux=0x4000), op(EV, value=12 + frame_len, aux=0x4008),
            op(EV, value=1 << 16, aux=0x5000), op(W, 0x50, 1, size=4),
            op(IDLE, after=1 * MS), op(R, 0x60, size=4), op(W, 0x64, 1, size=4),
            op(R, 0x100, size=8), op(R, 0x70, size=4))
    seeds["dev_virtio_net"] = [virtio_net(60), virtio_net(1514), virtio_net(8)]
    return seeds


# dev_restore: byte 0 picks the device (fuzz/src/targets.rs), byte 1 the
# number of edits (11 bytes each: node u16, operation u8, value u64), then
# the device's access script. One seed per device without edits, and a few
# with edits (a small number, an array cut short, a field removed).
RESTORE_ORDER = ["dev_uart", "dev_simops", "dev_timer", "dev_mailbox", "dev_pic", "dev_pit",
                 "dev_rtc", "dev_i8042", "dev_ioapic", "dev_lapic", "dev_virtio_blk"]


def restore_seeds(devices):
    def edit(node, operation, value):
        return struct.pack("<HBQ", node, operation, value)
    seeds = []
    for i, name in enumerate(RESTORE_ORDER):
        s = devices[name][-1]
        seeds.append(bytes([i, 0]) + s)
        seeds.append(bytes([i, 2]) + edit(3, 1, 7) + edit(1, 7, 1) + s)
        seeds.append(bytes([i, 1]) + edit(0, 7, 2) + s)
    return seeds


def ckpt_state(systems=1, cpus=1, xsave_words=0, version=4, disks=False):
    """A checkpoint state file (crates/ckpt): header, then the JSON body."""
    import json
    import zlib

    def hexbytes(n, fill=0):
        return bytes([fill]) * n

    def cpu(name):
        vcpu = {
            "regs": {r: 0 for r in ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                                    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
                                    "rip", "rflags"]},
            # kvm_sregs (312 bytes), kvm_vcpu_events (64), kvm_debugregs (128)
            # and kvm_cpuid_entry2 (40) as hex, in KVM's layout.
            "sregs": hexbytes(312).hex(),
            "fpu": {"fpr": [[0] * 16] * 8, "fcw": 0x37F, "fsw": 0, "ftwx": 0,
                    "last_opcode": 0, "last_ip": 0, "last_dp": 0, "xmm": [[0] * 16] * 16,
                    "mxcsr": 0x1F80},
            "xsave": hexbytes(4 * xsave_words).hex() if xsave_words else None,
            "xcrs": [[0, 7]],
            "msrs": [[0x10, 1000], [0xC0000082, 0xFFFFFFFF81000000]],
            "msrs_refused": [0x10A],
            "events": hexbytes(64).hex(),
            "debug_regs": hexbytes(128).hex(),
            "mp_state": 0,
            "tsc": 1000,
            "cpuid": [hexbytes(40, 1).hex()],
            "apic_base": 0xFEE00900,
        }
        return {"name": name, "vcpu": vcpu, "halted": False, "idle_since": None,
                "insts": 0, "min_span": 0}

    body = {
        "kvmsim_version": "0.1.0",
        "tick": 1000000,
        "config": {"sim": {"quantum": "10ms"}},
        "systems": [{
            "name": "system%d" % i,
            "ram": {"file": "ram.%d.bin" % i,
                    "regions": [{"base": 0, "size": 1 << 20, "offset": 0}]},
            "cpus": [cpu("system%d.cpu%d" % (i, c)) for c in range(cpus)],
            "devices": {"uart": {"lcr": 3}},
            "sim": None,
            "disks": [{
                "name": "disk0",
                "mode": "overlay",
                "image": {"path": "/images/root.img", "size": 64 * 512,
                          "mtime_sec": 1700000000, "mtime_nsec": 5, "fingerprint": 305419896},
                "saved": {"file": "system%d.disk0.sectors" % i, "extents": [[2, 3], [40, 24]]},
            }, {
                "name": "disk1",
                "mode": "readonly",
                "image": {"path": "/images/data.img", "size": 8 * 512,
                          "mtime_sec": 1700000000, "mtime_nsec": 0, "fingerprint": 1},
            }] if disks else [],
        } for i in range(systems)],
    }
    body = json.dumps(body).encode()
    header = b"KVMSIMCP" + struct.pack("<IIQI", version, 0, len(body), zlib.crc32(body))
    return header + struct.pack("<I", zlib.crc32(header)) + body


def multiboot_aout():
    """A Multiboot kernel loaded by its header's address fields (flag bit
    16): the header at file offset 8, the image at 1 MiB, 4 KiB of bss."""
    magic, flags = 0x1BADB002, 0x00010003
    base = 0x100000
    words = [magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
             base + 8, base, base + 0x100, base + 0x1100, base + 0x40]
    img = b"\xeb\xfe" + b"\x90" * 6 + struct.pack("<8I", *words)
    return img + b"\xf4" * (0x100 - len(img))


def main():
    if os.path.exists(CORPUS):
        shutil.rmtree(CORPUS)
    g = guests()
    for n in ["hello", "compute", "pcirq", "syscall", "flags"]:
        put("elf", n + ".elf", g[n])
    put("multiboot", "multiboot.elf", g["multiboot"])
    put("multiboot", "aout-kludge.bin", multiboot_aout())

    for n in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        if n.endswith(".toml"):
            with open(os.path.join(ROOT, "examples", n), "rb") as f:
                put("config", n, f.read())
    put("config", "full.toml", FULL_CONFIG)
    put("config", "linux-initrd.toml", LINUX_CONFIG)
    for i, u in enumerate(UNITS):
        put("units", "u%02d" % i, u)

    small = b"kvmsim " * 40 + bytes(range(256))
    for target, cmd in compressors().items():
        put(target, "hello.elf", run(cmd, g["hello"]))
        put(target, "small", run(cmd, small))
        put("bzimage", target.split("_")[1] + ".bz", bzimage(run(cmd, g["hello"])))
    put("bzimage", "vmlinux.elf", g["hello"])
    put("bzimage", "old-protocol.bz", bzimage(run(["gzip", "-c"], small), protocol=0x0206))
    put("bzimage", "setup-sects-0.bz", bzimage(run(["lz4", "-l", "-c"], small), setup_sects=0))

    put("firmware", "linux-128m", firmware(128 << 20, 6 << 20, 0x2000000, 0x7FFFFFFF, 2047,
                                           1, 1, bytes(0x7B), "console=ttyS0 quiet"))
    put("firmware", "big-many-cpus", firmware(5 << 30, 1 << 20, 0x1000000, 0, 0, 255, 2,
                                              b"\x04\x00" * 8, "x" * 300,
                                              [(0, 0x9FC00, 1), (1 << 20, 1 << 30, 1)]))
    put("firmware", "no-room", firmware(16 << 20, 15 << 20, 8 << 20, 0x37FFFFFF, 255, 0, 0,
                                        b"", "a" * 256))

    put("ckpt_state", "one-cpu", ckpt_state())
    put("ckpt_state", "two-systems-xsave", ckpt_state(systems=2, cpus=2, xsave_words=1024))
    put("ckpt_state", "older-version", ckpt_state(version=2))
    put("ckpt_state", "disks", ckpt_state(disks=True))

    devices = device_seeds()
    for target, scripts in devices.items():
        for i, s in enumerate(scripts):
            put(target, "seed%d" % i, s)
    for i, s in enumerate(restore_seeds(devices)):
        put("dev_restore", "seed%02d" % i, s)
    total = sum(os.path.getsize(os.path.join(dp, f))
                for dp, _, fs in os.walk(CORPUS) for f in fs)
    print("wrote %d bytes of seeds under %s" % (total, os.path.relpath(CORPUS, ROOT)),
          file=sys.stderr)


if __name__ == "__main__":
    main()
