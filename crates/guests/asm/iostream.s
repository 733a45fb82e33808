# iostream: a stream of port reads whose values the guest checks. For i in
# 0..N (RDI, default 2000) it writes i to the UART's scratch register and
# reads it back, summing what it reads; prints N and the sum, then exit.
# Expected sum: the sum of (i mod 256).
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12
        DEFAULT %r12, 2000
        xor     %ebx, %ebx              # i
        xor     %r13d, %r13d            # sum
        mov     $(COM1 + 7), %dx        # scratch register
2:      mov     %bl, %al
        out     %al, %dx
        xor     %eax, %eax
        in      %dx, %al
        add     %rax, %r13
        inc     %rbx
        cmp     %r12, %rbx
        jb      2b
        lea     m_n(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     m_sum(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
3:      hlt
        jmp     3b

        .include "lib.s"

m_n:    .asciz  "iostream: n="
m_sum:  .asciz  " sum="
nl:     .asciz  "\n"
