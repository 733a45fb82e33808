# flags: checks that interrupts arriving in kernel mode do not disturb the
# arithmetic flags of the code they interrupt. The loop is Linux's memmove
# forward loop: `sub $32, %rdx` sets CF, nine instructions that leave the
# flags alone copy 32 bytes, and `jae` reads CF. Each pass copies 9 blocks;
# a pass that runs past them (CF lost) is counted as bad and stopped.
# RDI = passes (default 20,000), RSI = timer period in ns (default 50,000;
# the interval timer's vector 0x40 is taken by a handler that counts it),
# RDX = mode: 0 interrupts enabled during the passes, 1 no timer (the
# control run), 2 interrupts disabled during each pass and taken between
# passes (an interrupt waits, with an interrupt window requested, while the
# loop runs). Prints passes, bad passes and interrupts taken; ends with
# sim-ops exit.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # passes
        DEFAULT %r12, 20000
        mov     %rsi, %r13              # period
        DEFAULT %r13, 50000
        mov     %rdx, %r14              # no timer?
        mov     $TICK_VECTOR, %edi
        lea     on_tick(%rip), %rsi
        call    set_gate
        call    load_idt
        cmp     $1, %r14
        je      1f
        mov     $TICK_VECTOR, %edx
        MMIO_WR TIMER_VECTOR
        mov     %r13, %rdx
        MMIO_WR TIMER_PERIOD
        mov     $3, %edx                # run, interrupt enable
        MMIO_WR TIMER_CTRL
1:      sti
        xor     %ebx, %ebx              # bad passes
        mov     %r12, %r15
pass:
        cmp     $2, %r14
        jne     5f
        sti                             # take what is pending, then mask
        nop
        cli
5:      lea     src(%rip), %rsi
        lea     dst(%rip), %rdi
        mov     $(8 * 32 + 16), %edx    # 9 subtractions until the borrow
        xor     %ecx, %ecx
2:      cmp     $9, %rcx                # a runaway pass stops here
        jae     runaway
        sub     $32, %rdx
        mov     (%rsi), %r11
        mov     8(%rsi), %r10
        mov     16(%rsi), %r9
        mov     24(%rsi), %r8
        lea     32(%rsi), %rsi
        mov     %r11, (%rdi)
        mov     %r10, 8(%rdi)
        mov     %r9, 16(%rdi)
        mov     %r8, 24(%rdi)
        lea     32(%rdi), %rdi
        lea     1(%rcx), %rcx
        jae     2b
        cmp     $9, %rcx
        je      3f
runaway:
        inc     %rbx
3:      dec     %r15
        jnz     pass
        cli
        xor     %edx, %edx
        MMIO_WR TIMER_CTRL              # stop
        lea     m_passes(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     m_bad(%rip), %rsi
        call    puts
        mov     %rbx, %rax
        call    putdec
        lea     m_ticks(%rip), %rsi
        call    puts
        mov     ticks(%rip), %rax
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
src:    .fill   10 * 32, 1, 0x5a
dst:    .fill   10 * 32, 1, 0
m_passes: .asciz "flags: passes="
m_bad:  .asciz " bad="
m_ticks: .asciz " interrupts="
nl:     .asciz  "\n"
