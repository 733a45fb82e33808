# hello: prints "Hello from the guest" on COM1 and ends the run through
# sim-ops exit (code 0).
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        lea     msg(%rip), %rsi
        call    puts
        xor     %edi, %edi              # delay: 0 ns
        SIMOP   0x21                    # exit
1:      hlt
        jmp     1b

        .include "lib.s"

msg:    .asciz  "Hello from the guest\n"
