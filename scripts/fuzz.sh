#!/usr/bin/env bash
# Builds kvmsim's fuzz targets (fuzz/, cargo-fuzz with libFuzzer, no
# sanitizer: runs on the stable toolchain) and runs each for a bounded time,
# one after the other, starting from the committed seeds in
# fuzz/corpus/TARGET. Prints per target the executions, executions per
# second and the coverage reached (libFuzzer's "cov": covered edges, after
# the seeds and at the end; "ft": features). Exits non-zero if any target
# crashed (a panic: a broken invariant), took over 10 s on one input, ran
# out of memory or failed to run; the input is then in fuzz/artifacts/TARGET/
# (fuzz/README.md says how to reproduce it).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60, all)
#
# New inputs go into a scratch corpus (fuzz/target/runs/TARGET, emptied at
# the start), never into the committed seeds. Needs cargo-fuzz:
#   cargo install cargo-fuzz --locked --version 0.13.2
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz --locked --version 0.13.2)" >&2
    exit 2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Release build with debug assertions (overflow checks), coverage
# instrumentation, no sanitizer (sanitizers need a nightly compiler).
cargo fuzz build -O --sanitizer none
bin=fuzz/target/x86_64-unknown-linux-gnu/release

failed=0
rows=()
for t in "${targets[@]}"; do
    seeds=fuzz/corpus/$t
    work=fuzz/target/runs/$t
    log=fuzz/target/runs/$t.log
    if [ ! -x "$bin/$t" ] || [ ! -d "$seeds" ]; then
        echo "fuzz.sh: no target $t (or no seeds in $seeds)" >&2
        failed=1
        rows+=("$(printf '%-16s %s' "$t" "missing")")
        continue
    fi
    rm -rf "$work"
    mkdir -p "$work" "fuzz/artifacts/$t"
    echo "== $t: ${secs}s" >&2
    status=0
    "$bin/$t" "$work" "$seeds" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || status=$?
    # "#N INITED cov: C ft: F corp: ..." after the seeds; the last "#N ..."
    # status line and the final stats at the end.
    init=$(grep -m1 -E '^#[0-9]+[[:space:]]+INITED' "$log" | grep -oE 'cov: [0-9]+' | awk '{print $2}' || true)
    last=$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -1 || true)
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | awk '{print $2}' || true)
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | awk '{print $2}' || true)
    corp=$(grep -oE 'corp: [0-9]+' <<<"$last" | awk '{print $2}' || true)
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | awk '{print $2}' || true)
    rate=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | awk '{print $2}' || true)
    result=ok
    if [ "$status" -ne 0 ]; then
        failed=1
        art=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -1 | awk '{print $5}' || true)
        result="FAILED (exit $status${art:+, input $art}; log $log)"
        grep -m1 -E "panicked at|ERROR: libFuzzer" -A3 "$log" >&2 || tail -20 "$log" >&2
    fi
    rows+=("$(printf '%-16s %10s %8s %7s -> %-7s %7s %6s  %s' "$t" "${execs:-?}" "${rate:-?}" \
        "${init:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result")")
done

printf '\n%-16s %10s %8s %18s %7s %6s  %s\n' target execs exec/s "cov seeds -> end" ft corpus result
printf '%s\n' "${rows[@]}"
exit $failed
