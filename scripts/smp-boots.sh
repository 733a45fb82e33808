#!/usr/bin/env bash
# Boots Debian's kernel (scripts/linux-guest.sh) on CPUS CPUs, RUNS times
# for each quantum, two boots at a time, and reports each boot's outcome
# (/init reached with nproc = CPUS and the workload's status 0) with its
# simulated and host time, then the successes per quantum.
#
#   scripts/smp-boots.sh [GUEST_DIR] [CPUS] [RUNS] [QUANTA...]
#   defaults:            target/linux-guest 2 3 10us 1ms 10ms
#   KVMSIM=path/to/kvmsim (default: target/release/kvmsim, else target/debug/kvmsim)
#
# Not part of CI: 9 boots of several minutes each.
set -uo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
guest=${1:-$src/target/linux-guest}
# The configs live in the output folder: the guest's path must not be relative.
guest=$(cd "$guest" && pwd) || { echo "smp-boots.sh: no guest folder $1" >&2; exit 2; }
cpus=${2:-2}
runs=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
quanta=("$@")
[ ${#quanta[@]} -eq 0 ] && quanta=(10us 1ms 10ms)
kvmsim=${KVMSIM:-}
if [ -z "$kvmsim" ]; then
    kvmsim=$src/target/release/kvmsim
    [ -x "$kvmsim" ] || kvmsim=$src/target/debug/kvmsim
fi
out=$(mktemp -d /tmp/kvmsim-smp-boots.XXXXXX)
echo "kvmsim: $kvmsim; guest: $guest; $cpus CPUs; $runs boots per quantum; output in $out"

boot() { # quantum run
    local q=$1 i=$2 dir="$out/q$1-$2"
    mkdir -p "$dir"
    sed -e "s#^kernel = .*#kernel = \"$guest/vmlinuz\"#" \
        -e "s#^initrd = .*#initrd = \"$guest/initrd.gz\"#" \
        -e "s#^max_time = .*#max_time = \"1200s\"\nquantum = \"$q\"#" \
        "$src/examples/linux.toml" > "$dir/config.toml"
    local t0=$SECONDS
    "$kvmsim" run "$dir/config.toml" --cpus "$cpus" --outdir "$dir/out" --quiet --no-stdin \
        > "$dir/stdout" 2> "$dir/stderr"
    local st=$? host=$((SECONDS - t0))
    local log="$dir/out/serial.log" ok=no
    if [ $st -eq 0 ] && grep -q "KVMSIM-NPROC: $cpus" "$log" 2>/dev/null \
        && grep -q "KVMSIM-INIT: workload status 0" "$log"; then
        ok=yes
    fi
    local sim
    sim=$(awk '/^simSeconds/ {print $2}' "$dir/out/stats.txt" 2>/dev/null | tail -n1)
    echo "quantum=$q run=$i ok=$ok status=$st simulated=${sim:-?}s host=${host}s" | tee -a "$out/results.txt"
}

for q in "${quanta[@]}"; do
    i=1
    while [ $i -le "$runs" ]; do
        boot "$q" $i &
        if [ $((i + 1)) -le "$runs" ]; then
            boot "$q" $((i + 1)) &
        fi
        wait
        i=$((i + 2))
    done
done
echo
for q in "${quanta[@]}"; do
    n=$(grep -c "quantum=$q .*ok=yes" "$out/results.txt")
    echo "quantum $q: $n of $runs boots reached /init on $cpus CPUs"
done
