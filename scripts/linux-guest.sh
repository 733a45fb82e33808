#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64) and busybox-static
# with apt-get download, and builds a gzip cpio initramfs: busybox, the
# kvmsim-ops tool (built static from guest-tools/kvmsim-ops.c) and an /init
# that prints a marker, runs a small workload, and ends the run through
# sim-ops with the workload's status.
#
#   scripts/linux-guest.sh [OUTDIR]      (default: linux-guest/)
#   kvmsim run --kernel OUTDIR/vmlinuz --initrd OUTDIR/initrd.gz
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-linux-guest}" && cd "${1:-linux-guest}" && pwd)
mkdir -p "$out/debs"
cd "$out/debs"

download() {
    apt-get download "$@" 2>/dev/null || { apt-get update -qq && apt-get download "$@"; }
}
download linux-image-cloud-amd64 busybox-static
image=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | grep -o 'linux-image-[^ ,]*-cloud-amd64' | head -n1)
download "$image"

rm -rf "$out/kernel" "$out/busybox" "$out/initramfs"
dpkg-deb -x "${image}"_*.deb "$out/kernel"
cp "$out"/kernel/boot/vmlinuz-* "$out/vmlinuz"
dpkg-deb -x busybox-static_*.deb "$out/busybox"
bb="$out/busybox/bin/busybox"

root="$out/initramfs"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp}
cp "$bb" "$root/bin/busybox"
for applet in sh mount echo cat ls sleep nproc; do
    ln -sf busybox "$root/bin/$applet"
done
gcc -static -O2 -o "$root/bin/kvmsim-ops" "$src/guest-tools/kvmsim-ops.c"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
echo "KVMSIM-INIT: /init is running"
# A stats dump here gives simulated and host seconds to /init.
/bin/kvmsim-ops dumpstats
n=$(/bin/busybox nproc 2>/dev/null || echo 1)
echo "KVMSIM-NPROC: $n"
/bin/kvmsim-ops workbegin 1
# One counting process per CPU, in parallel; the status is the last failure's.
status=0
pids=""
c=0
while [ $c -lt "$n" ]; do
    /bin/busybox sh -c 'i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo "KVMSIM-WORKLOAD: counted to $i"' &
    pids="$pids $!"
    c=$((c+1))
done
for p in $pids; do wait "$p" || status=$?; done
/bin/kvmsim-ops workend 1
echo "KVMSIM-INIT: workload status $status"
if [ "$status" -eq 0 ]; then /bin/kvmsim-ops exit; else /bin/kvmsim-ops fail "$status"; fi
INIT
chmod +x "$root/init"
(cd "$root" && find . | "$bb" cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/initrd.gz"
echo "kernel:    $out/vmlinuz"
echo "initramfs: $out/initrd.gz"
