# sleep: halts until N timer interrupts have arrived.
# RDI = timer period in ns (default 1,000,000,000), RSI = N (default 10).
# Prints the simulated ns elapsed and the TSC cycles that passed meanwhile
# (the guest's clock must follow simulated time while it halts), then
# sim-ops exit.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12
        DEFAULT %r12, 1000000000
        mov     %rsi, %r13
        DEFAULT %r13, 10
        mov     $TICK_VECTOR, %edi
        lea     on_tick(%rip), %rsi
        call    set_gate
        call    load_idt
        mov     $TICK_VECTOR, %edx
        MMIO_WR TIMER_VECTOR
        mov     %r12, %rdx
        MMIO_WR TIMER_PERIOD
        MMIO_RD TIMER_NOW
        mov     %rax, %r14
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %r15              # TSC at the start
        mov     $3, %edx
        MMIO_WR TIMER_CTRL
3:      sti
        hlt
        cli
        cmp     %r13, ticks(%rip)
        jb      3b
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        sub     %r15, %rax
        mov     %rax, %r15              # TSC cycles that passed
        MMIO_RD TIMER_NOW
        sub     %r14, %rax
        mov     %rax, %r14
        lea     m_slept(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    putdec
        lea     m_ticks(%rip), %rsi
        call    puts
        mov     ticks(%rip), %rax
        call    putdec
        lea     m_tsc(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
4:      hlt
        jmp     4b

on_tick:
        incq    ticks(%rip)
        iretq

        .include "lib.s"

        .data
        .balign 8
ticks:  .quad   0
m_slept: .asciz "sleep: slept_ns="
m_ticks: .asciz " ticks="
m_tsc:  .asciz  " tsc_cycles="
nl:     .asciz  "\n"
