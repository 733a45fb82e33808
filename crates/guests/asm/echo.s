# echo: reads N bytes (RDI, default 1, at most 256) from COM1 and prints
# "echo: " and them, then sim-ops exit. It polls the line status for data
# with RTS asserted (MCR = DTR | RTS | OUT2) and drops RTS before it takes
# the last byte, as a receiver with hardware flow control does: kvmsim
# reads its stdin only while the guest asks for input, so the bytes after
# the N-th stay in stdin.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12
        DEFAULT %r12, 1
        cmp     $256, %r12
        jbe     1f
        mov     $256, %r12
1:      sub     $272, %rsp
        mov     %rsp, %rdi              # the bytes read
        xor     %ecx, %ecx              # how many
        mov     $(COM1 + 4), %dx        # MCR
        mov     $0x0b, %al
        out     %al, %dx
2:      mov     $(COM1 + 5), %dx        # LSR
3:      in      %dx, %al
        test    $0x01, %al              # data ready
        jz      3b
        lea     1(%rcx), %rax
        cmp     %r12, %rax
        jne     4f
        mov     $(COM1 + 4), %dx        # the last byte: RTS off first
        mov     $0x09, %al
        out     %al, %dx
4:      mov     $COM1, %dx
        in      %dx, %al
        mov     %al, (%rdi,%rcx)
        inc     %rcx
        cmp     %r12, %rcx
        jb      2b
        movb    $0, (%rdi,%rcx)
        lea     m_echo(%rip), %rsi
        call    puts
        mov     %rsp, %rsi
        call    puts
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
5:      hlt
        jmp     5b

        .include "lib.s"

m_echo: .asciz  "echo: "
nl:     .asciz  "\n"
