# irqwin (platform "pc"): interrupts that wait while IF is clear are taken
# at the first instruction boundary where the CPU accepts them, as on
# hardware. Three cases, with self-IPIs through the local APIC:
#   sti:  vectors 0x61 and 0x60 sent with IF clear, then `sti; nop; cli`:
#         both run before the `cli`, 0x61 first, 0x60 right after the
#         first handler's iretq (kvm-unit-tests' eventinj "vec 32/33").
#   popf: vector 0x60 sent with IF clear, then a `popf` that sets IF and
#         a `cli`: it runs between them.
#   iret: with IF set, vector 0x60 is sent; its handler sends 0x61 (held
#         behind 0x60, same priority class) and EOIs; 0x61 runs right after
#         the handler's iretq, before the `cli` the handler returns to.
# Prints "irqwin: sti=N order=XY popf=N iret=N" (handlers run before the
# `cli`; the vectors of the sti case in the order they ran), then exits
# through sim-ops: exit(0) if sti=2 order=6160 popf=1 iret=2, else
# fail(0, bits): 1 sti, 2 order, 4 popf, 8 iret.
        .code64
        .include "macros.s"
        .include "smp_defs.s"
        .set    SELF_IPI, 0x44000       # fixed, assert, shorthand self
        .text
        .globl  _start
_start:
        cli
        mov     $0x60, %edi
        lea     h60(%rip), %rsi
        call    set_gate
        mov     $0x61, %edi
        lea     h61(%rip), %rsi
        call    set_gate
        mov     $0xff, %edi
        lea     spurious(%rip), %rsi
        call    set_gate
        call    load_idt
        mov     $0x1ff, %edx            # software enable, spurious 0xff
        APIC_WR APIC_SVR

        # sti: two waiting, one instruction of window.
        movq    $0, count(%rip)
        movq    $0, order(%rip)
        mov     $(SELF_IPI | 0x61), %edx
        APIC_WR APIC_ICR_LO
        mov     $(SELF_IPI | 0x60), %edx
        APIC_WR APIC_ICR_LO
        sti
        nop
        cli
        mov     count(%rip), %r12
        mov     order(%rip), %rbp
        call    settle

        # popf: IF set by popf, cleared at once.
        movq    $0, count(%rip)
        mov     $(SELF_IPI | 0x60), %edx
        APIC_WR APIC_ICR_LO
        pushfq
        orq     $0x200, (%rsp)
        popfq
        cli
        mov     count(%rip), %r13
        call    settle

        # iret: the handler of 0x60 leaves 0x61 waiting behind its iretq.
        movq    $0, count(%rip)
        movq    $1, chain(%rip)
        sti
        mov     $(SELF_IPI | 0x60), %edx
        APIC_WR APIC_ICR_LO
        cli
        mov     count(%rip), %r14
        movq    $0, chain(%rip)
        call    settle

        PUTS    m_sti
        mov     %r12, %rax
        call    putdec
        PUTS    m_order
        mov     %rbp, %rax
        call    puthex
        PUTS    m_popf
        mov     %r13, %rax
        call    putdec
        PUTS    m_iret
        mov     %r14, %rax
        call    putdec
        PUTS    nl
        xor     %esi, %esi
        cmp     $2, %r12
        je      1f
        or      $1, %esi
1:      cmp     $0x6160, %rbp
        je      2f
        or      $2, %esi
2:      cmp     $1, %r13
        je      3f
        or      $4, %esi
3:      cmp     $2, %r14
        je      4f
        or      $8, %esi
4:      xor     %edi, %edi
        test    %esi, %esi
        jnz     5f
        SIMOP   0x21                    # exit(0)
        jmp     park
5:      SIMOP   0x22                    # fail(0, bits)
park:   cli
        hlt
        jmp     park

# settle: lets whatever a case left waiting run (so that it cannot count
# in the next case), then turns interrupts off again.
settle:
        sti
        mov     $1000, %ecx
1:      pause
        dec     %ecx
        jnz     1b
        cli
        ret

# order = order << 8 | vector, for the first two vectors of a case.
        .macro  HANDLER vector
        push    %rax
        push    %rdx
        incq    count(%rip)
        mov     order(%rip), %rax
        cmp     $0xff, %rax
        ja      1f
        shl     $8, %rax
        or      $\vector, %rax
        mov     %rax, order(%rip)
1:
        .endm

h60:    HANDLER 0x60
        cmpq    $0, chain(%rip)
        je      1f
        mov     $(SELF_IPI | 0x61), %edx
        APIC_WR APIC_ICR_LO
1:      xor     %edx, %edx
        APIC_WR APIC_EOI
        pop     %rdx
        pop     %rax
        iretq

h61:    HANDLER 0x61
        xor     %edx, %edx
        APIC_WR APIC_EOI
        pop     %rdx
        pop     %rax
        iretq

spurious:
        iretq

        .include "lib.s"

        .data
        .balign 8
count:  .quad   0
order:  .quad   0
chain:  .quad   0
m_sti:  .asciz  "irqwin: sti="
m_order: .asciz " order="
m_popf: .asciz  " popf="
m_iret: .asciz  " iret="
nl:     .asciz  "\n"
