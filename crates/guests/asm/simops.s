# simops: exercises the sim-ops ABI. Checks that sum returns the sum of six
# arguments and that an unknown function returns 0, times a work item, dumps
# and resets statistics, then ends the run: with sim-ops fail(RDI = delay ns,
# RSI = code) when boot argument 1 (RSI) is non-zero, else exit(delay).
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # delay
        mov     %rsi, %r13              # exit code
        mov     $1, %edi
        mov     $2, %esi
        mov     $3, %edx
        mov     $4, %ecx
        mov     $5, %r8d
        mov     $6, %r9d
        SIMOP   0x23                    # sum
        cmp     $21, %rax
        jne     bad
        mov     $0x1111, %edi
        SIMOP   0x99                    # unknown: returns 0
        test    %rax, %rax
        jnz     bad
        lea     ok(%rip), %rsi
        call    puts
        mov     $7, %edi                # work id
        xor     %esi, %esi              # thread id
        SIMOP   0x5a                    # work_begin
        mov     $7, %edi
        xor     %esi, %esi
        SIMOP   0x5b                    # work_end
        xor     %edi, %edi
        xor     %esi, %esi
        SIMOP   0x42                    # dump_reset_stats(0, 0)
        mov     %r12, %rdi
        mov     %r13, %rsi
        test    %r13, %r13
        jz      1f
        SIMOP   0x22                    # fail(delay, code)
        jmp     2f
1:      SIMOP   0x21                    # exit(delay)
2:      hlt
        jmp     2b
bad:    lea     badmsg(%rip), %rsi
        call    puts
        xor     %edi, %edi
        mov     $99, %esi
        SIMOP   0x22
3:      hlt
        jmp     3b

        .include "lib.s"

ok:     .asciz  "simops: sum and unknown ok\n"
badmsg: .asciz  "simops: wrong result\n"
