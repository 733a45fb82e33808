# pcevents: a target for PC events. Calls `counted` RDI times (default 10),
# reads the simulated time (the interval timer's NOW_NS) into `before`,
# then calls `marker`, whose first instruction reads it again into `at`;
# prints "pcevents: calls=N before=T0 at=T1" (times in ns) and ends with
# sim-ops exit(0). A PC event at `marker` happens between T0 and T1.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        DEFAULT %rdi, 10
        mov     %rdi, %rbx
1:      call    counted
        dec     %rbx
        jnz     1b
        MMIO_RD TIMER_NOW
        mov     %rax, before(%rip)
        call    marker
        lea     msg(%rip), %rsi
        call    puts
        mov     calls(%rip), %rax
        call    putdec
        lea     msg_before(%rip), %rsi
        call    puts
        mov     before(%rip), %rax
        call    putdec
        lea     msg_at(%rip), %rsi
        call    puts
        mov     at(%rip), %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi              # delay: 0 ns
        SIMOP   0x21                    # exit(delay)
2:      hlt
        jmp     2b

# counted: one more call.
        .globl  counted
        .type   counted, @function
counted:
        incq    calls(%rip)
        ret
        .size   counted, . - counted

# marker: records the simulated time it was entered at.
        .globl  marker
        .type   marker, @function
marker:
        MMIO_RD TIMER_NOW
        mov     %rax, at(%rip)
        ret
        .size   marker, . - marker

        .include "lib.s"

msg:        .asciz  "pcevents: calls="
msg_before: .asciz  " before="
msg_at:     .asciz  " at="
nl:         .asciz  "\n"

        .data
        .balign 8
        .globl  calls
calls:  .quad   0
before: .quad   0
at:     .quad   0
