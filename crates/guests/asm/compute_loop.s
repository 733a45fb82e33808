# kvmsim_compute_loop(n) -> u64: the integer loop of the `compute` guest.
# System V ABI: n in RDI, result in RAX. The same object is linked natively
# into kvmsim (for `kvmsim bench compute`), so both run identical code.
# Each iteration steps a 64-bit linear congruential generator and adds its
# high bits to an accumulator: a serial multiply-add chain.

        .text
        .globl  kvmsim_compute_loop
        .type   kvmsim_compute_loop, @function
kvmsim_compute_loop:
        mov     $1, %eax
        xor     %edx, %edx
        movabs  $0x5851f42d4c957f2d, %r8
        movabs  $0x14057b7ef767814f, %r9
        test    %rdi, %rdi
        jz      2f
1:      imul    %r8, %rax
        add     %r9, %rax
        mov     %rax, %rcx
        shr     $33, %rcx
        add     %rcx, %rdx
        dec     %rdi
        jnz     1b
2:      mov     %rdx, %rax
        ret
        .size   kvmsim_compute_loop, . - kvmsim_compute_loop
        .section .note.GNU-stack, "", @progbits
