# irqint3: RSI (default 5,000) `int3` traps at ring 0 with interrupts on,
# while the interval timer interrupts every RDI ns (default 30,000). A
# software-assisted KVM cannot emulate int3, so kvmsim completes each one
# (injecting #BP) while it also injects timer interrupts: every interrupt
# injected must reach the guest. Stops the timer, turns interrupts off and
# prints "irqint3: traps=N interrupts=M", then sim-ops exit.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # period
        DEFAULT %r12, 30000
        mov     %rsi, %r13              # traps
        DEFAULT %r13, 5000
        mov     $3, %edi
        lea     on_bp(%rip), %rsi
        call    set_gate
        mov     $TICK_VECTOR, %edi
        lea     on_tick(%rip), %rsi
        call    set_gate
        call    load_idt
        mov     $TICK_VECTOR, %edx
        MMIO_WR TIMER_VECTOR
        mov     %r12, %rdx
        MMIO_WR TIMER_PERIOD
        mov     $3, %edx                # run, interrupt enable
        MMIO_WR TIMER_CTRL
        sti
        mov     %r13, %rbx
2:      int3
        dec     %rbx
        jnz     2b
        xor     %edx, %edx
        MMIO_WR TIMER_CTRL              # stop
        cli                             # an interrupt injected until now was taken
        lea     m_traps(%rip), %rsi
        call    puts
        mov     traps(%rip), %rax
        call    putdec
        lea     m_int(%rip), %rsi
        call    puts
        mov     ticks(%rip), %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
3:      hlt
        jmp     3b

on_bp:
        incq    traps(%rip)
        iretq

on_tick:
        incq    ticks(%rip)
        iretq

        .include "lib.s"

        .data
        .balign 8
traps:  .quad   0
ticks:  .quad   0
m_traps: .asciz "irqint3: traps="
m_int:  .asciz  " interrupts="
nl:     .asciz  "\n"
