# fault: triple faults on purpose. With an empty IDT, the #UD raised by ud2
# cannot be delivered (#GP), nor can that (#DF): the CPU shuts down.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        lea     msg(%rip), %rsi
        call    puts
        mov     $0x1234abcd, %r15       # a marker to find in the register dump
        lidt    null_idt(%rip)
        ud2
1:      hlt
        jmp     1b

        .include "lib.s"

null_idt:
        .word   0
        .quad   0
msg:    .asciz  "fault: about to triple fault\n"
