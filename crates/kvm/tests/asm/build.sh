#!/bin/sh
# Assembles the snippets of vcpu_state.rs into flat binaries loaded at 1 MiB
# (GNU as and ld, as the guests crate uses).
set -e
cd "$(dirname "$0")"
for s in vstate_avx512 vstate_avx; do
    as --64 -o "/tmp/$s.$$.o" "$s.s"
    ld -Ttext=0x100000 --oformat binary -e _start -o "$s.bin" "/tmp/$s.$$.o"
    rm -f "/tmp/$s.$$.o"
done
