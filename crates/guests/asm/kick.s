# kick: RSI (default 1,000) forced exits, each ending in an interrupt.
# Programs the interval timer (period RDI ns, default 100,000; vector 0x40)
# and spins at ring 3 with interrupts on, reading a counter that the ring-0
# handler increments, until it reaches RSI; returns to ring 0 by a page
# fault, stops the timer and ends with sim-ops exit. The number of
# interrupts is fixed whatever the host's speed, so `kvmsim bench` can
# compare kvmsim with a bare KVM loop exit for exit: each side takes the
# same number of periods, and what a period costs beyond its length is the
# cost of the forced exit and the injection.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # period
        DEFAULT %r12, 100000
        mov     %rsi, %r13              # interrupts to take
        DEFAULT %r13, 1000
        mov     $TICK_VECTOR, %edi
        lea     on_tick(%rip), %rsi
        call    set_gate
        mov     $14, %edi               # #PF
        lea     back_in_ring0(%rip), %rsi
        call    set_gate
        call    load_idt
        mov     $TICK_VECTOR, %edx
        MMIO_WR TIMER_VECTOR
        mov     %r12, %rdx
        MMIO_WR TIMER_PERIOD
        mov     $3, %edx                # run, interrupt enable
        MMIO_WR TIMER_CTRL
        lea     user(%rip), %rax
        mov     $0x202, %esi            # interrupts on at ring 3
        call    to_user
user:
1:      cmp     %r13, ticks(%rip)
        jb      1b
        movabs  $0x100000000, %rax      # not mapped: page fault to ring 0
        mov     (%rax), %rax
        ud2

back_in_ring0:                          # interrupts are off (interrupt gate)
        xor     %edx, %edx
        MMIO_WR TIMER_CTRL              # stop
        xor     %edi, %edi
        SIMOP   0x21
2:      hlt
        jmp     2b

on_tick:
        incq    ticks(%rip)
        iretq

        .include "lib.s"

        .data
        .balign 8
ticks:  .quad   0
