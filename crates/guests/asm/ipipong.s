# ipipong: the BSP starts AP 1 (INIT, SIPI, SIPI through smp.s's
# trampoline), then bounces a fixed IPI RSI times (default 100) between
# APIC 0 and APIC 1: the BSP sends vector 0x50 to APIC 1, whose handler
# sends vector 0x51 back to APIC 0 and EOIs; the BSP halts until it
# arrives. Each round trip is measured in simulated ns (the interval
# timer's NOW_NS, read before the send and after the answer). RDX = how
# long to wait for AP 1 to start, and for each answer, in simulated ms
# (default 1,000). Prints "ipipong: rounds=R total_ns=T mean_ns=M
# min_ns=A max_ns=B", then exits through sim-ops; fails with code 1 if
# AP 1 does not start or answer in time, 2 without a local APIC or with
# the BSP not at APIC ID 0, 3 on an exception.
        .code64
        .include "macros.s"
        .include "smp_defs.s"
        .set    PING_VECTOR, 0x50       # BSP -> AP 1
        .set    PONG_VECTOR, 0x51       # AP 1 -> BSP
        .text
        .globl  _start
_start:
        mov     %rsi, %r13              # rounds
        DEFAULT %r13, 100
        mov     %rdx, %r14              # timeout ms
        DEFAULT %r14, 1000
        imul    $1000000, %r14
        mov     $2, %edi
        call    smp_init
        mov     $PING_VECTOR, %edi
        lea     on_ping(%rip), %rsi
        call    set_gate
        mov     $PONG_VECTOR, %edi
        lea     on_pong(%rip), %rsi
        call    set_gate
        call    smp_apic_present
        test    %eax, %eax
        jz      no_apic
        call    smp_apic_enable
        test    %eax, %eax
        jnz     no_apic
        call    smp_start_aps
        MMIO_RD TIMER_NOW
        lea     (%rax,%r14), %rdx
        lea     ready(%rip), %rdi
        mov     $1, %esi
        mov     $1000000, %ecx
        call    smp_wait
        test    %rax, %rax
        jz      no_ap

        # A watchdog tick after the wait limit in bus clocks (1 ns each at
        # kvmsim's 1 GHz APIC bus; at most 2^32 - 1), restarted each round:
        # it fires only if an answer is that late, so that the deadline is
        # checked (against NOW_NS, whatever the bus rate).
        mov     $0xffffffff, %eax
        cmp     %rax, %r14
        cmovb   %r14, %rax
        mov     %eax, watchdog(%rip)
        mov     $0xb, %edx
        APIC_WR APIC_TIMER_DIV
        mov     $(0x20000 | SMP_TICK_VECTOR), %edx
        APIC_WR APIC_LVT_TIMER
        xor     %r12d, %r12d            # round
        xor     %r15d, %r15d            # total ns
        movq    $-1, min(%rip)
round:
        cli
        mov     watchdog(%rip), %edx
        APIC_WR APIC_TIMER_INIT         # restart the watchdog tick
        mov     smp_ticks(%rip), %rbp
        MMIO_RD TIMER_NOW
        mov     %rax, %rbx              # t0
        mov     $(1 << 24), %edx        # to APIC 1 (no wait for ICR idle: the
        APIC_WR APIC_ICR_HI             # last send was a round ago)
        mov     $(ICR_FIXED | PING_VECTOR), %edx
        APIC_WR APIC_ICR_LO
1:      cmp     pongs(%rip), %r12
        jb      2f                      # pongs > round: answered
        cmp     smp_ticks(%rip), %rbp
        je      3f
        mov     smp_ticks(%rip), %rbp   # a tick: check the deadline
        MMIO_RD TIMER_NOW
        sub     %rbx, %rax
        cmp     %r14, %rax
        jae     no_answer
3:      sti
        hlt
        cli
        jmp     1b
2:      MMIO_RD TIMER_NOW
        sub     %rbx, %rax
        add     %rax, %r15
        cmp     min(%rip), %rax
        jae     4f
        mov     %rax, min(%rip)
4:      cmp     max(%rip), %rax
        jbe     5f
        mov     %rax, max(%rip)
5:      inc     %r12
        cmp     %r13, %r12
        jb      round

        mov     $0x10000, %edx          # stop the watchdog
        APIC_WR APIC_LVT_TIMER
        xor     %edx, %edx
        APIC_WR APIC_TIMER_INIT
        call    smp_print_lock
        PUTS    m_rounds
        mov     %r13, %rax
        call    putdec
        PUTS    m_total
        mov     %r15, %rax
        call    putdec
        PUTS    m_mean
        mov     %r15, %rax
        xor     %edx, %edx
        div     %r13
        call    putdec
        PUTS    m_min
        mov     min(%rip), %rax
        call    putdec
        PUTS    m_max
        mov     max(%rip), %rax
        call    putdec
        PUTS    nl
        call    smp_print_unlock
        xor     %edi, %edi
        SIMOP   0x21                    # exit(0)
        jmp     park

no_answer:
        call    smp_print_lock
        PUTS    m_no_answer
        mov     %r12, %rax
        call    putdec
        PUTS    nl
        jmp     fail1
no_ap:
        call    smp_print_lock
        PUTS    m_no_ap
fail1:  mov     $1, %esi
        jmp     fail
no_apic:
        call    smp_print_lock
        PUTS    m_no_apic
        mov     $2, %esi
fail:   xor     %edi, %edi
        SIMOP   0x22                    # fail(0, code)
park:   cli
        hlt
        jmp     park

# AP 1: says it is ready, then waits for pings with interrupts on.
ap_main:
        lock incq ready(%rip)
        xor     %edi, %edi
        mov     $(ICR_FIXED | SMP_WAKE_VECTOR), %esi
        call    smp_send_ipi
1:      sti
        hlt
        jmp     1b

# On AP 1: a ping; answer it, then EOI.
on_ping:
        push    %rax
        push    %rdx
        incq    pings(%rip)
        xor     %edx, %edx              # to APIC 0
        APIC_WR APIC_ICR_HI
        mov     $(ICR_FIXED | PONG_VECTOR), %edx
        APIC_WR APIC_ICR_LO
        xor     %edx, %edx
        APIC_WR APIC_EOI
        pop     %rdx
        pop     %rax
        iretq

# On the BSP: the answer.
on_pong:
        push    %rax
        push    %rdx
        incq    pongs(%rip)
        xor     %edx, %edx
        APIC_WR APIC_EOI
        pop     %rdx
        pop     %rax
        iretq

        .include "smp.s"
        .include "lib.s"
        .include "compute_loop.s"

        .data
        .balign 8
ready:      .quad 0
pings:      .quad 0
pongs:      .quad 0
min:        .quad 0
max:        .quad 0
watchdog:   .long 0
guest_name: .asciz "ipipong"
m_rounds:   .asciz "ipipong: rounds="
m_total:    .asciz " total_ns="
m_mean:     .asciz " mean_ns="
m_min:      .asciz " min_ns="
m_max:      .asciz " max_ns="
m_no_answer: .asciz "ipipong: APIC 1 did not answer in time; round "
m_no_ap:    .asciz "ipipong: APIC 1 never started (it needs [system] cpus = 2 or more)\n"
m_no_apic:  .asciz "ipipong: needs the BSP's local APIC at 0xfee00000 with ID 0; run with [system] cpus = 2\n"
nl:         .asciz "\n"
