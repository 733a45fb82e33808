# int3: executes `int3` three times at ring 0 under a #BP handler that
# counts the traps and checks that each returns after the instruction.
# Prints "int3: traps=N", then sim-ops exit. (A software-assisted KVM cannot
# emulate int3 in long mode; kvmsim completes it.)
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     $3, %edi
        lea     on_bp(%rip), %rsi
        call    set_gate
        call    load_idt
        int3
        int3
        int3
        lea     msg(%rip), %rsi
        call    puts
        mov     traps(%rip), %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
1:      hlt
        jmp     1b

on_bp:
        incq    traps(%rip)
        iretq

        .include "lib.s"

        .data
        .balign 8
traps:  .quad   0
msg:    .asciz  "int3: traps="
nl:     .asciz  "\n"
