# syscall: RDI (default 1000) system calls from ring 3 to a ring-0 handler
# that counts them and returns with sysretq. Ring 3 then hands back to ring
# 0 by a page fault, which prints "syscall: calls=N", then sim-ops exit.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12
        DEFAULT %r12, 1000
        mov     $0xc0000080, %ecx       # EFER.SCE
        rdmsr
        or      $1, %eax
        wrmsr
        mov     $0xc0000081, %ecx       # STAR: kernel CS 0x10, sysret base 0x23
        xor     %eax, %eax
        mov     $0x00230010, %edx
        wrmsr
        mov     $0xc0000082, %ecx       # LSTAR
        lea     entry(%rip), %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr
        mov     $0xc0000084, %ecx       # SFMASK: clear IF
        mov     $0x200, %eax
        xor     %edx, %edx
        wrmsr
        andq    $~4, 0x4008             # PD entry of [2 MiB, 4 MiB): supervisor only
        mov     %cr3, %rax              # flush the TLB
        mov     %rax, %cr3
        mov     $14, %edi
        lea     back(%rip), %rsi
        call    set_gate
        call    load_idt
        out     %al, $0x80              # an exit after the set-up
        lea     user(%rip), %rax
        mov     $0x2, %esi
        call    to_user
user:
2:      syscall
        dec     %r12
        jnz     2b
        movabs  $0x100000000, %rax      # page fault: back to ring 0
        mov     (%rax), %rax
        ud2

        .section .kernel, "ax"
entry:                                  # ring 0 (RCX = user RIP, R11 = RFLAGS)
        incq    calls(%rip)
        sysretq
        .text

back:
        lea     msg(%rip), %rsi
        call    puts
        mov     calls(%rip), %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
3:      hlt
        jmp     3b

        .include "lib.s"

        .data
        .balign 8
calls:  .quad   0
msg:    .asciz  "syscall: calls="
nl:     .asciz  "\n"
