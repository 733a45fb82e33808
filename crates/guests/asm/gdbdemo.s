# gdbdemo: a target for debugger tests. Calls `triple` on RDI (default 14),
# keeps the result in the variable `result`, prints "gdbdemo: result=N",
# and ends the run with sim-ops fail(0, result): the process status is the
# result (42 unless a debugger changed something). Its symbols (`triple`,
# `result`, `done`) stay in the ELF for GDB.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        DEFAULT %rdi, 14
        call    triple
        mov     %rax, result(%rip)
        lea     msg(%rip), %rsi
        call    puts
        mov     result(%rip), %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        .globl  done
done:
        xor     %edi, %edi              # delay: 0 ns
        mov     result(%rip), %rsi      # code: the result
        SIMOP   0x22                    # fail(delay, code)
1:      hlt
        jmp     1b

# triple: RAX = 3 * RDI.
        .globl  triple
        .type   triple, @function
triple:
        mov     %rdi, %rax
        add     %rdi, %rax
        add     %rdi, %rax
        ret
        .size   triple, . - triple

        .include "lib.s"

msg:    .asciz  "gdbdemo: result="
nl:     .asciz  "\n"

        .data
        .globl  result
        .type   result, @object
        .size   result, 8
        .balign 8
result: .quad   0
