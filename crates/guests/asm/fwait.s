# fwait: `fwait` at ring 0, first with nothing pending (it must just go
# on), then with CR0.TS and CR0.MP set, where it must raise #NM; the #NM
# handler counts it and clears TS, so the retried fwait goes on. Prints
# "fwait: passed=2 nm=1", then sim-ops exit. (A software-assisted KVM
# cannot emulate fwait; kvmsim completes it.)
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     $7, %edi
        lea     on_nm(%rip), %rsi
        call    set_gate
        call    load_idt
        fxrstor clean(%rip)
        fwait
        incq    passed(%rip)
        mov     %cr0, %rax
        or      $0xa, %rax              # MP | TS
        mov     %rax, %cr0
        fwait
        incq    passed(%rip)
        lea     m_passed(%rip), %rsi
        call    puts
        mov     passed(%rip), %rax
        call    putdec
        lea     m_nm(%rip), %rsi
        call    puts
        mov     nm(%rip), %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
1:      hlt
        jmp     1b

on_nm:                                  # a fault: returns to the fwait
        incq    nm(%rip)
        clts
        iretq

        .include "lib.s"

        .data
        .balign 16
clean:  .word   0x037f                  # FCW: all exceptions masked
        .word   0                       # FSW
        .fill   20, 1, 0
        .long   0x1f80                  # MXCSR
        .long   0xffff                  # MXCSR mask
        .fill   512 - 32, 1, 0
        .balign 8
passed: .quad   0
nm:     .quad   0
m_passed: .asciz "fwait: passed="
m_nm:   .asciz  " nm="
nl:     .asciz  "\n"
