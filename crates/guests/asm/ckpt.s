# ckpt: a guest to checkpoint in the middle of. Enables AVX (CR4.OSXSAVE,
# XCR0), then at ring 3 (AVX is not emulated in kernel mode on every host)
# fills YMM0-15 with known values and spins until RSI interval-timer
# interrupts of period RDI ns have been taken by a ring-0 handler; then it
# checks that every YMM register still holds its value, returns to ring 0
# by a page fault and prints "ckpt: periods=N ymm=ok" (or ymm=BAD and
# sim-ops fail 3), then exits. Nothing it prints depends on host timing.
# RDX != 0: once the registers are filled it asks for a checkpoint itself
# (sim-op 0x43, from ring 3), so the checkpoint always holds them.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12
        DEFAULT %r12, 200000
        mov     %rsi, %r13
        DEFAULT %r13, 20
        mov     %rdx, %r14              # != 0: checkpoint once filled
        # AVX: CR4.OSXSAVE, then XCR0 = x87 | SSE | AVX.
        mov     %cr4, %rax
        or      $(1 << 18), %rax
        mov     %rax, %cr4
        xor     %ecx, %ecx
        xor     %edx, %edx
        mov     $7, %eax
        xsetbv
        mov     $TICK_VECTOR, %edi
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
        mov     $3, %edx
        MMIO_WR TIMER_CTRL
        lea     user(%rip), %rax
        mov     $0x202, %esi            # interrupts on at ring 3
        call    to_user
user:
        vmovdqu pat + 0 * 32(%rip), %ymm0
        vmovdqu pat + 1 * 32(%rip), %ymm1
        vmovdqu pat + 2 * 32(%rip), %ymm2
        vmovdqu pat + 3 * 32(%rip), %ymm3
        vmovdqu pat + 4 * 32(%rip), %ymm4
        vmovdqu pat + 5 * 32(%rip), %ymm5
        vmovdqu pat + 6 * 32(%rip), %ymm6
        vmovdqu pat + 7 * 32(%rip), %ymm7
        vmovdqu pat + 8 * 32(%rip), %ymm8
        vmovdqu pat + 9 * 32(%rip), %ymm9
        vmovdqu pat + 10 * 32(%rip), %ymm10
        vmovdqu pat + 11 * 32(%rip), %ymm11
        vmovdqu pat + 12 * 32(%rip), %ymm12
        vmovdqu pat + 13 * 32(%rip), %ymm13
        vmovdqu pat + 14 * 32(%rip), %ymm14
        vmovdqu pat + 15 * 32(%rip), %ymm15
        test    %r14, %r14
        jz      1f
        xor     %edi, %edi              # now, once
        xor     %esi, %esi
        SIMOP   0x43
1:      pause
        cmp     %r13, ticks(%rip)
        jb      1b
        vmovdqu %ymm0, got + 0 * 32(%rip)
        vmovdqu %ymm1, got + 1 * 32(%rip)
        vmovdqu %ymm2, got + 2 * 32(%rip)
        vmovdqu %ymm3, got + 3 * 32(%rip)
        vmovdqu %ymm4, got + 4 * 32(%rip)
        vmovdqu %ymm5, got + 5 * 32(%rip)
        vmovdqu %ymm6, got + 6 * 32(%rip)
        vmovdqu %ymm7, got + 7 * 32(%rip)
        vmovdqu %ymm8, got + 8 * 32(%rip)
        vmovdqu %ymm9, got + 9 * 32(%rip)
        vmovdqu %ymm10, got + 10 * 32(%rip)
        vmovdqu %ymm11, got + 11 * 32(%rip)
        vmovdqu %ymm12, got + 12 * 32(%rip)
        vmovdqu %ymm13, got + 13 * 32(%rip)
        vmovdqu %ymm14, got + 14 * 32(%rip)
        vmovdqu %ymm15, got + 15 * 32(%rip)
        lea     pat(%rip), %rsi
        lea     got(%rip), %rdi
        mov     $(16 * 32), %ecx
        cld
        repe cmpsb
        setne   %bl
        movabs  $0x100000000, %rax      # page fault: back to ring 0
        mov     (%rax), %rax
        ud2

back_in_ring0:                          # interrupts are off (interrupt gate)
        xor     %edx, %edx
        MMIO_WR TIMER_CTRL
        lea     m_ticks(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    putdec
        lea     m_ok(%rip), %rsi
        test    %bl, %bl
        jz      2f
        lea     m_bad(%rip), %rsi
2:      call    puts
        xor     %edi, %edi
        test    %bl, %bl
        jz      3f
        mov     $3, %esi
        SIMOP   0x22
3:      SIMOP   0x21
4:      hlt
        jmp     4b

on_tick:
        incq    ticks(%rip)
        iretq

        .include "lib.s"

        .data
        .balign 32
pat:
        .set    k, 1
        .rept   64
        .quad   0x0101010101010101 * k + 0x5a
        .set    k, k + 1
        .endr
got:    .skip   16 * 32
ticks:  .quad   0
m_ticks: .asciz "ckpt: periods="
m_ok:   .asciz  " ymm=ok\n"
m_bad:  .asciz  " ymm=BAD\n"
