# pingpong: two systems bounce a counter over a link (mailbox at 0xFEB01000).
# RDI = role: 0 initiator, 1 responder. RSI = round trips (default 100).
# Both halt while waiting; a message raises vector 0x50.
# The initiator sends i, expects i+1 back, and sums the round-trip times it
# measures (simulated time, from the interval timer's NOW_NS); the responder
# sums its own processing time (message seen -> reply sent). Each prints its
# sums; a wrong value ends the run with sim-ops fail(0, 2).
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # role
        mov     %rsi, %r13              # round trips
        DEFAULT %r13, 100
        mov     $MSG_VECTOR, %edi
        lea     on_msg(%rip), %rsi
        call    set_gate
        call    load_idt
        mov     $MSG_VECTOR, %edx
        MMIO_WR MB_VECTOR
        xor     %r14d, %r14d            # i
        xor     %r15d, %r15d            # time sum
        test    %r12, %r12
        jnz     responder

initiator:
        MMIO_RD TIMER_NOW
        mov     %rax, %rbx              # t0
        mov     %r14, %rdx
        MMIO_WR MB_TX
        call    wait_msg
        MMIO_RD MB_RX
        lea     1(%r14), %rcx
        cmp     %rcx, %rax
        jne     bad
        MMIO_RD TIMER_NOW
        sub     %rbx, %rax
        add     %rax, %r15
        inc     %r14
        cmp     %r13, %r14
        jb      initiator
        lea     m_init(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    putdec
        lea     m_rtt(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    putdec
        lea     m_avg(%rip), %rsi
        call    puts
        mov     %r15, %rax
        xor     %edx, %edx
        div     %r13
        call    putdec
        jmp     finish

responder:
        call    wait_msg
        MMIO_RD TIMER_NOW
        mov     %rax, %rbx              # seen
        MMIO_RD MB_RX
        cmp     %r14, %rax
        jne     bad
        lea     1(%rax), %rdx
        MMIO_WR MB_TX
        MMIO_RD TIMER_NOW
        sub     %rbx, %rax
        add     %rax, %r15
        inc     %r14
        cmp     %r13, %r14
        jb      responder
        lea     m_resp(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    putdec
        lea     m_proc(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    putdec

finish:
        lea     m_lat(%rip), %rsi
        call    puts
        MMIO_RD MB_LATENCY
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
2:      hlt
        jmp     2b

bad:    lea     m_bad(%rip), %rsi
        call    puts
        xor     %edi, %edi
        mov     $2, %esi
        SIMOP   0x22
3:      hlt
        jmp     3b

# wait_msg: halts until the mailbox holds a value. Clobbers RAX.
wait_msg:
1:      MMIO_RD MB_RX_COUNT
        test    %rax, %rax
        jnz     2f
        sti
        hlt
        cli
        jmp     1b
2:      ret

on_msg:
        iretq

        .include "lib.s"

m_init: .asciz  "pingpong: role=0 n="
m_resp: .asciz  "pingpong: role=1 n="
m_rtt:  .asciz  " rtt_sum_ns="
m_avg:  .asciz  " rtt_avg_ns="
m_proc: .asciz  " proc_sum_ns="
m_lat:  .asciz  " latency_ns="
m_bad:  .asciz  "pingpong: wrong value\n"
nl:     .asciz  "\n"
