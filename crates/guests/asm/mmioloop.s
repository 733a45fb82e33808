# mmioloop: RDI (default 10,000) 64-bit MMIO reads at CPL0 and nothing else,
# each an MMIO round trip (exit, service, completion of the read); then
# sim-ops exit. It reads the interval timer's PERIOD_NS register. `kvmsim
# bench` times it in kvmsim against a bare KVM loop that runs the same bytes.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %rcx
        DEFAULT %rcx, 10000
        mov     $TIMER_PERIOD, %esi
1:      mov     (%rsi), %rax
        dec     %rcx
        jnz     1b
        xor     %edi, %edi
        SIMOP   0x21
2:      hlt
        jmp     2b
