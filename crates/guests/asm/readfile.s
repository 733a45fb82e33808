# readfile: prints the host file of system.readfile (gem5's readfile sim-op,
# 0x50: buffer, length, offset) on COM1, reading it in chunks of RDI (256,
# at most 4096) bytes until the sim-op returns 0, then ends the run with
# sim-ops fail(0, total bytes read) (exit when the file is empty or absent).
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        DEFAULT %rdi, 256
        mov     $4096, %eax
        cmp     %rax, %rdi
        cmova   %rax, %rdi
        mov     %rdi, %r13              # chunk
        xor     %r12d, %r12d            # offset = total read
1:      lea     buf(%rip), %rdi
        mov     %r13, %rsi
        mov     %r12, %rdx
        SIMOP   0x50                    # readfile(buf, chunk, offset)
        test    %rax, %rax
        jz      2f
        add     %rax, %r12
        lea     buf(%rip), %rsi
        movb    $0, (%rsi,%rax)
        call    puts
        jmp     1b
2:      xor     %edi, %edi
        mov     %r12, %rsi
        test    %r12, %r12
        jz      3f
        SIMOP   0x22                    # fail(0, total)
        jmp     4f
3:      SIMOP   0x21                    # exit(0)
4:      hlt
        jmp     4b

        .include "lib.s"

        .bss
buf:    .skip   4097
