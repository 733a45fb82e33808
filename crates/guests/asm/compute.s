# compute: drops to ring 3 and runs kvmsim_compute_loop for N iterations
# (N = boot argument 0 in RDI; 100,000,000 if 0). Ring 3 then hands back to
# ring 0 by touching an unmapped address (a page fault: the portable way
# back, since port IO at ring 3 needs IOPL, which not every KVM grants);
# the ring-0 handler prints N and the result on COM1 and ends the run
# through sim-ops exit.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12
        DEFAULT %r12, 100000000
        mov     $14, %edi               # #PF
        lea     back_in_ring0(%rip), %rsi
        call    set_gate
        call    load_idt
        lea     user(%rip), %rax
        mov     $0x2, %esi              # interrupts off
        call    to_user
user:
        mov     %r12, %rdi
        call    kvmsim_compute_loop
        mov     %rax, %r13
        movabs  $0x100000000, %rax      # not mapped: page fault to ring 0
        mov     (%rax), %rax
        ud2

back_in_ring0:
        lea     msg1(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     msg2(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    puthex
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21                    # exit
2:      hlt
        jmp     2b

        .include "lib.s"
        .include "compute_loop.s"

        .data
msg1:   .asciz  "compute: iterations="
msg2:   .asciz  " result="
nl:     .asciz  "\n"
