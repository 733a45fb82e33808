# se_bench: a static x86-64 Linux program (not a bare-metal guest) for
# `kvmsim bench`: the same file runs in SE mode and natively.
#
#   se_bench N      runs kvmsim_compute_loop(N) (asm/compute_loop.s) and
#                   prints "result=0x<16 hex digits>\n"
#   se_bench N s    makes N getppid system calls, prints "calls=done\n"
#
# N is decimal (0 without it); the exit status is 0.

        .text
        .globl  _start
_start:
        mov     (%rsp), %rbx            # argc
        xor     %edi, %edi
        cmp     $2, %rbx
        jb      2f
        mov     16(%rsp), %rsi          # argv[1]
1:      movzbl  (%rsi), %eax
        sub     $'0', %eax
        cmp     $9, %eax
        ja      2f
        imul    $10, %rdi, %rdi
        add     %rax, %rdi
        inc     %rsi
        jmp     1b
2:      cmp     $3, %rbx
        jae     syscalls
        call    kvmsim_compute_loop
        lea     hex+16(%rip), %rsi      # the last digit's place
        mov     $16, %ecx
3:      mov     %eax, %edx
        and     $15, %edx
        movzbl  digits(%rdx), %edx
        dec     %rsi
        mov     %dl, (%rsi)
        shr     $4, %rax
        dec     %ecx
        jnz     3b
        lea     result(%rip), %rsi
        mov     $result_len, %edx
        jmp     out

syscalls:
        test    %rdi, %rdi
        jz      5f
4:      mov     $110, %eax              # getppid
        syscall
        dec     %rdi
        jnz     4b
5:      lea     done(%rip), %rsi
        mov     $done_len, %edx

out:    mov     $1, %eax                # write(1, rsi, rdx)
        mov     $1, %edi
        syscall
        mov     $231, %eax              # exit_group(0)
        xor     %edi, %edi
        syscall
        hlt

        .section .rodata
digits: .ascii  "0123456789abcdef"
done:   .ascii  "calls=done\n"
        .set    done_len, . - done

        .data
result: .ascii  "result=0x"
hex:    .ascii  "0000000000000000\n"
        .set    result_len, . - result
        .section .note.GNU-stack, "", @progbits
