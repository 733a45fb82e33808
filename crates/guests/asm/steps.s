# steps: an endless, exactly countable instruction stream for instruction
# limits. At ring 0 (RDI = 0) the guest executes `test`, `jz`, `xor`, then
# pairs `inc %rax; jmp`: after N >= 3 instructions RAX = (N - 2) / 2
# (integer division). With RDI != 0 the loop runs at ring 3 instead.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        test    %rdi, %rdi
        jz      count
        lea     count(%rip), %rax
        mov     $0x2, %esi
        call    to_user
count:
        xor     %eax, %eax
1:      inc     %rax
        jmp     1b

        .include "lib.s"
