#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64) and busybox-static
# with apt-get download, and builds a gzip cpio initramfs: busybox, the
# kvmsim-ops tool (built static from guest-tools/kvmsim-ops.c), the virtio
# modules of that kernel (virtio, virtio_ring, virtio_mmio, virtio_blk) and
# an /init that prints a marker, runs a small workload, and ends the run
# through sim-ops with the workload's status. With root=/dev/vda on the
# command line, /init instead loads the virtio modules, mounts the disk and
# switches to it (busybox switch_root). With kvmsim.net=server or
# kvmsim.net=client, /init loads virtio_net (and failover, net_failover),
# gives eth0 the address kvmsim.ip= and serves or fetches over TCP (see
# the script below; examples/network.toml).
#
# It also builds root.img, an ext4 root file system (mke2fs -d, e2fsprogs)
# with busybox, kvmsim-ops and an /sbin/init that runs what the command line
# asks (kvmsim.disk=...; see the script below) and ends the run.
#
#   scripts/linux-guest.sh [OUTDIR]      (default: linux-guest/)
#   kvmsim run --kernel OUTDIR/vmlinuz --initrd OUTDIR/initrd.gz
#   cp OUTDIR/root.img /tmp/root.img
#   kvmsim run --kernel OUTDIR/vmlinuz --initrd OUTDIR/initrd.gz \
#       --disk /tmp/root.img --append "root=/dev/vda"
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

rm -rf "$out/kernel" "$out/busybox" "$out/initramfs" "$out/rootfs"
dpkg-deb -x "${image}"_*.deb "$out/kernel"
cp "$out"/kernel/boot/vmlinuz-* "$out/vmlinuz"
dpkg-deb -x busybox-static_*.deb "$out/busybox"
bb="$out/busybox/bin/busybox"

root="$out/initramfs"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp}
cp "$bb" "$root/bin/busybox"
for applet in sh mount echo cat ls sleep nproc ip ping nc sha256sum dd wc cut sed grep; do
    ln -sf busybox "$root/bin/$applet"
done
gcc -static -O2 -o "$root/bin/kvmsim-ops" "$src/guest-tools/kvmsim-ops.c"

# The virtio modules for a root on /dev/vda, in load order (virtio_mmio and
# virtio_blk depend on virtio and virtio_ring: modinfo's depends=).
moddir=$(ls -d "$out"/kernel/lib/modules/*/kernel/drivers)
mkdir -p "$root/lib/modules"
for m in virtio/virtio virtio/virtio_ring virtio/virtio_mmio block/virtio_blk; do
    cp "$moddir/$m.ko" "$root/lib/modules/"
done
# And for a network: virtio_net depends on virtio, virtio_ring and
# net_failover, which depends on failover.
cp "$moddir/../net/core/failover.ko" "$moddir/net/net_failover.ko" \
    "$moddir/net/virtio_net.ko" "$root/lib/modules/"

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
if /bin/busybox grep -q 'root=/dev/vda' /proc/cmdline; then
    echo "KVMSIM-INIT: root=/dev/vda: loading the virtio modules"
    for m in virtio virtio_ring virtio_mmio virtio_blk; do
        /bin/busybox insmod "/lib/modules/$m.ko" || { echo "KVMSIM-INIT: insmod $m failed"; /bin/kvmsim-ops fail 3; }
    done
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
    /bin/busybox mkdir -p /newroot
    # Read-only when the command line says ro (or the disk is read-only).
    opts=rw
    for w in $(/bin/busybox cat /proc/cmdline); do [ "$w" = ro ] && opts=ro; done
    /bin/busybox mount -t ext4 -o "$opts" /dev/vda /newroot \
        || /bin/busybox mount -t ext4 -o ro /dev/vda /newroot \
        || { echo "KVMSIM-INIT: cannot mount /dev/vda"; /bin/kvmsim-ops fail 4; }
    /bin/busybox mount --move /dev /newroot/dev
    /bin/busybox umount /proc /sys
    exec /bin/busybox switch_root /newroot /sbin/init
fi
# kvmsim.net=server|client: eth0 at kvmsim.ip=ADDR (a /24), the other
# system at kvmsim.peer=ADDR. The server receives one TCP stream on port
# 5000, prints its size and SHA-256 and sends both back to the client's
# port 5001. The client pings the server until it answers, then `ping -c
# 5`, then (statistics reset) sends kvmsim.mib=N (4) MiB of random data,
# waits for the server's answer (statistics dumped: the transfer's
# simulated time) and checks that it matches what it sent. Both end
# through sim-ops.
if /bin/busybox grep -q 'kvmsim\.net=' /proc/cmdline; then
    arg() { /bin/busybox sed -n "s/.*kvmsim\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
    role=$(arg net); addr=$(arg ip); peer=$(arg peer); mib=$(arg mib)
    [ -n "$mib" ] || mib=4
    for m in virtio virtio_ring virtio_mmio failover net_failover virtio_net; do
        /bin/busybox insmod "/lib/modules/$m.ko" || { echo "KVMSIM-NET: insmod $m failed"; /bin/kvmsim-ops fail 3; }
    done
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
    ip link set lo up
    ip addr add "$addr/24" dev eth0 && ip link set eth0 up || { echo "KVMSIM-NET: no eth0"; /bin/kvmsim-ops fail 4; }
    echo "KVMSIM-NET: eth0 $addr $(cat /sys/class/net/eth0/address) up, $role"
    if [ "$role" = server ]; then
        # nc ends when its stdin does: a FIFO held open by a sleeping writer
        # keeps it until the stream ends (a pipeline's $! is not nc's).
        /bin/busybox mkfifo /tmp/hold
        /bin/busybox sleep 1000000 > /tmp/hold &
        nc -l -p 5000 < /tmp/hold > /tmp/recv
        got="$(wc -c < /tmp/recv) $(sha256sum /tmp/recv | cut -d' ' -f1)"
        echo "KVMSIM-NET: received $got"
        i=0
        until echo "$got" | nc "$peer" 5001; do
            i=$((i+1)); [ $i -lt 100 ] || { echo "KVMSIM-NET: cannot answer"; /bin/kvmsim-ops fail 6; }
            /bin/busybox sleep 0.2
        done
        /bin/kvmsim-ops exit
    fi
    i=0
    until ping -c 1 -W 1 "$peer" > /dev/null 2>&1; do
        i=$((i+1)); [ $i -lt 120 ] || { echo "KVMSIM-NET: $peer never answered"; /bin/kvmsim-ops fail 5; }
    done
    ping -c 5 "$peer" | while read -r line; do echo "KVMSIM-PING: $line"; done
    dd if=/dev/urandom of=/tmp/data bs=1M count="$mib" 2> /dev/null
    sent="$(wc -c < /tmp/data) $(sha256sum /tmp/data | cut -d' ' -f1)"
    echo "KVMSIM-NET: sending $sent"
    /bin/busybox mkfifo /tmp/hold
    /bin/busybox sleep 1000000 > /tmp/hold &
    nc -l -p 5001 < /tmp/hold > /tmp/ack &
    ack=$!
    /bin/kvmsim-ops resetstats
    i=0
    until nc "$peer" 5000 < /tmp/data; do
        i=$((i+1)); [ $i -lt 100 ] || { echo "KVMSIM-NET: cannot connect"; /bin/kvmsim-ops fail 6; }
        /bin/busybox sleep 0.2
    done
    wait $ack
    /bin/kvmsim-ops dumpstats
    got=$(cat /tmp/ack)
    echo "KVMSIM-NET: the server received $got"
    [ "$got" = "$sent" ] || { echo "KVMSIM-NET: checksum mismatch"; /bin/kvmsim-ops fail 7; }
    echo "KVMSIM-NET: transfer verified"
    /bin/kvmsim-ops exit
fi
echo "KVMSIM-INIT: /init is running"
# A stats dump here gives simulated and host seconds to /init.
/bin/kvmsim-ops dumpstats
# kvmsim.checkpoint on the command line: a checkpoint here (the run goes on
# unless sim.checkpoint_exit); a restore of it runs on from this line.
if /bin/busybox grep -q 'kvmsim.checkpoint' /proc/cmdline; then
    /bin/kvmsim-ops checkpoint
    echo "KVMSIM-INIT: checkpoint taken"
fi
# A script from the host (system.readfile, or --readfile on a restore of
# the checkpoint above) runs instead of the built-in workload, as gem5's
# `m5 readfile` scripts do; its status ends the run.
/bin/kvmsim-ops readfile > /tmp/script
if [ -s /tmp/script ]; then
    echo "KVMSIM-INIT: running the readfile script ($(wc -c < /tmp/script) bytes)"
    /bin/busybox sh /tmp/script
    status=$?
    echo "KVMSIM-INIT: script status $status"
    if [ "$status" -eq 0 ]; then /bin/kvmsim-ops exit; else /bin/kvmsim-ops fail "$status"; fi
fi
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

# The root file system on a disk: busybox, kvmsim-ops and /sbin/init.
rootfs="$out/rootfs"
mkdir -p "$rootfs"/{bin,sbin,proc,sys,dev,tmp,data}
cp "$bb" "$rootfs/bin/busybox"
for applet in sh mount umount echo cat ls sleep sync dd grep sed cut sha256sum; do
    ln -sf busybox "$rootfs/bin/$applet"
done
cp "$root/bin/kvmsim-ops" "$rootfs/bin/kvmsim-ops"
cat > "$rootfs/sbin/init" <<'INIT'
#!/bin/busybox sh
# On the disk. The command line says what to do: kvmsim.disk=ACTION[,ACTION...]
#   read         print /data/token (fails if there is none)
#   write:TOKEN  write TOKEN into /data/token and sync
#   dd:MIB       read MIB MiB of /dev/vda sequentially with the stats reset
#                before and dumped after (simulated and host seconds,
#                system.disk0.bytesRead)
#   checkpoint   sync, take a checkpoint (a restore of it goes on with the
#                next action), then drop the page cache, so that what
#                follows reads the disk, not what the guest had cached
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
echo "KVMSIM-DISK: /sbin/init is running from $(/bin/busybox grep ' / ' /proc/mounts | /bin/busybox cut -d' ' -f1,3)"
actions=$(/bin/busybox sed -n 's/.*kvmsim\.disk=\([^ ]*\).*/\1/p' /proc/cmdline)
status=0
for action in $(echo "$actions" | /bin/busybox sed 's/,/ /g'); do
    case "$action" in
        read)
            if [ -f /data/token ]; then echo "KVMSIM-DISK: found $(/bin/busybox cat /data/token)"; else echo "KVMSIM-DISK: no token"; status=6; fi;;
        write:*)
            { echo "${action#write:}" > /data/token && /bin/busybox sync; } || status=5
            echo "KVMSIM-DISK: wrote ${action#write:} (status $status)";;
        dd:*)
            /bin/busybox sync; echo 3 > /proc/sys/vm/drop_caches
            /bin/kvmsim-ops resetstats
            /bin/busybox dd if=/dev/vda of=/dev/null bs=1M count="${action#dd:}" 2>&1 || status=7
            /bin/kvmsim-ops dumpstats
            echo "KVMSIM-DISK: dd status $status";;
        checkpoint)
            /bin/busybox sync
            /bin/kvmsim-ops checkpoint || status=9
            echo 3 > /proc/sys/vm/drop_caches
            echo "KVMSIM-DISK: after the checkpoint (status $status)";;
        *) echo "KVMSIM-DISK: unknown action $action"; status=8;;
    esac
done
/bin/busybox umount /proc /sys 2>/dev/null
if [ "$status" -eq 0 ]; then /bin/kvmsim-ops exit; else /bin/kvmsim-ops fail "$status"; fi
INIT
chmod +x "$rootfs/sbin/init"
command -v mke2fs >/dev/null || PATH="$PATH:/sbin:/usr/sbin"
rm -f "$out/root.img"
mke2fs -q -t ext4 -L kvmsim-root -d "$rootfs" "$out/root.img" "${KVMSIM_ROOT_SIZE:-64M}"
echo "kernel:    $out/vmlinuz"
echo "initramfs: $out/initrd.gz"
echo "root disk: $out/root.img"
