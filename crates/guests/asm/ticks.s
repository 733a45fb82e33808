# ticks: counts periodic interrupts while ring 3 computes.
# RDI = timer period in ns (default 100,000), RSI = loop iterations (default
# 50,000,000), RDX != 0: the timer delivers NMIs instead of vector 0x40. Programs the interval timer (vector 0x40), runs the compute
# loop at ring 3 with interrupts on (each tick is taken by a ring-0 handler
# that counts it), returns to ring 0 by a page fault, stops the timer and
# prints: interrupts taken, the timer's COUNT, the simulated ns elapsed, the
# period, the loop result and the least time the timer can have run when
# COUNT was read (least_ns: from the first clock read after the start to
# the last before COUNT); then sim-ops exit.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # period
        DEFAULT %r12, 100000
        mov     %rsi, %r13              # iterations
        DEFAULT %r13, 50000000
        mov     $3, %ebp                # CTRL: run, interrupt enable
        test    %rdx, %rdx
        jz      4f
        mov     $7, %ebp                # ... as NMI
4:      mov     $TICK_VECTOR, %edi
        lea     on_tick(%rip), %rsi
        call    set_gate
        mov     $2, %edi                # NMI
        lea     on_tick(%rip), %rsi
        call    set_gate
        mov     $14, %edi
        lea     back_in_ring0(%rip), %rsi
        call    set_gate
        call    load_idt
        mov     $TICK_VECTOR, %edx
        MMIO_WR TIMER_VECTOR
        mov     %r12, %rdx
        MMIO_WR TIMER_PERIOD
        MMIO_RD TIMER_NOW
        mov     %rax, %r14              # start time
        mov     %rbp, %rdx
        MMIO_WR TIMER_CTRL
        MMIO_RD TIMER_NOW
        mov     %rax, started(%rip)     # the timer started before this
        lea     user(%rip), %rax
        mov     $0x202, %esi            # interrupts on at ring 3
        call    to_user
user:
        mov     %r13, %rdi
        call    kvmsim_compute_loop
        mov     %rax, %r15
        movabs  $0x100000000, %rax      # page fault: back to ring 0
        mov     (%rax), %rax
        ud2

back_in_ring0:                          # interrupts are off (interrupt gate)
        MMIO_RD TIMER_NOW
        sub     started(%rip), %rax
        mov     %rax, least(%rip)       # COUNT is read after this
        MMIO_RD TIMER_COUNT
        mov     %rax, %rbx
        MMIO_RD TIMER_NOW
        sub     %r14, %rax
        mov     %rax, %r14              # elapsed ns
        xor     %edx, %edx
        MMIO_WR TIMER_CTRL              # stop
        lea     m_int(%rip), %rsi
        call    puts
        mov     ticks(%rip), %rax
        call    putdec
        lea     m_count(%rip), %rsi
        call    puts
        mov     %rbx, %rax
        call    putdec
        lea     m_elapsed(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    putdec
        lea     m_period(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     m_result(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    puthex
        lea     m_least(%rip), %rsi
        call    puts
        mov     least(%rip), %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
3:      hlt
        jmp     3b

on_tick:
        incq    ticks(%rip)
        iretq

        .include "lib.s"
        .include "compute_loop.s"

        .data
        .balign 8
ticks:  .quad   0
started: .quad  0
least:  .quad   0
m_int:  .asciz  "ticks: interrupts="
m_count: .asciz " count="
m_elapsed: .asciz " elapsed_ns="
m_period: .asciz " period_ns="
m_result: .asciz " result="
m_least: .asciz " least_ns="
nl:     .asciz  "\n"
