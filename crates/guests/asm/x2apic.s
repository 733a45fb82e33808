# x2apic (platform "pc", system.x2apic = true): switches the local APIC to
# x2APIC mode through IA32_APIC_BASE and uses it through its MSRs. Checks:
# CPUID.1:ECX bit 21 offered; the ID (MSR 0x802) is the CPU's (0) and the
# LDR (0x80D) the derived one (1); the xAPIC page reads all-ones; #GP for
# a write of the read-only ID, a read of the absent DFR (0x80E) and a
# switch straight back to xAPIC mode (which leaves x2APIC mode on); a
# SELF IPI (0x83F) runs its handler, which ends it with an EOI (0x80B).
# Prints "x2apic: id=N ldr=N mmio=0x... gp=N selfipi=N mode=N", then
# sim-ops exit(0) if all held, else fail(0, bits): 1 CPUID, 2 id, 4 ldr,
# 8 mmio, 16 gp, 32 self IPI, 64 mode.
        .code64
        .include "macros.s"
        .set    APIC_BASE_MSR, 0x1b
        .set    EXTD, 0x400
        .set    X2_ID, 0x802
        .set    X2_EOI, 0x80b
        .set    X2_LDR, 0x80d
        .set    X2_DFR, 0x80e
        .set    X2_SVR, 0x80f
        .set    X2_SELF_IPI, 0x83f
        .set    VECTOR, 0x61
        .text
        .globl  _start
_start:
        cli
        mov     $13, %edi
        lea     gp(%rip), %rsi
        call    set_gate
        mov     $VECTOR, %edi
        lea     h61(%rip), %rsi
        call    set_gate
        mov     $0xff, %edi
        lea     spurious(%rip), %rsi
        call    set_gate
        call    load_idt
        xor     %r12, %r12
        xor     %r13, %r13
        xor     %r14, %r14
        xor     %ebp, %ebp

        mov     $1, %eax
        cpuid
        xor     %ebx, %ebx              # failed checks (cpuid set EBX)
        bt      $21, %ecx
        jc      1f
        or      $1, %ebx
        jmp     report
1:
        # xAPIC -> x2APIC.
        mov     $APIC_BASE_MSR, %ecx
        rdmsr
        or      $EXTD, %eax
        wrmsr

        mov     $X2_ID, %ecx
        rdmsr
        mov     %rax, %r12              # r12: ID
        mov     $X2_LDR, %ecx
        rdmsr
        mov     %rax, %r13              # r13: LDR
        mov     $0xfee00030, %eax       # the xAPIC version register
        mov     (%rax), %eax
        mov     %rax, %r14              # r14: what the page reads

        # Three accesses that must fault (the #GP handler counts and skips).
        mov     $X2_ID, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
        mov     $X2_DFR, %ecx
        rdmsr
        mov     $APIC_BASE_MSR, %ecx
        rdmsr
        and     $~EXTD, %eax
        wrmsr
        mov     $APIC_BASE_MSR, %ecx
        rdmsr
        shr     $10, %eax
        and     $1, %eax
        mov     %rax, %rbp              # rbp: still in x2APIC mode

        # SELF IPI with the APIC software-enabled.
        mov     $X2_SVR, %ecx
        mov     $0x1ff, %eax
        xor     %edx, %edx
        wrmsr
        mov     $X2_SELF_IPI, %ecx
        mov     $VECTOR, %eax
        wrmsr
        sti
        mov     $1000000, %ecx
2:      cmpq    $0, count(%rip)
        jne     3f
        pause
        dec     %ecx
        jnz     2b
3:      cli

        test    %r12, %r12
        jz      4f
        or      $2, %ebx
4:      cmp     $1, %r13
        je      5f
        or      $4, %ebx
5:      mov     $0xffffffff, %eax
        cmp     %rax, %r14
        je      6f
        or      $8, %ebx
6:      cmpq    $3, gps(%rip)
        je      7f
        or      $16, %ebx
7:      cmpq    $1, count(%rip)
        je      8f
        or      $32, %ebx
8:      cmp     $1, %rbp
        je      report
        or      $64, %ebx

report:
        lea     m_id(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     m_ldr(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    putdec
        lea     m_mmio(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    puthex
        lea     m_gp(%rip), %rsi
        call    puts
        mov     gps(%rip), %rax
        call    putdec
        lea     m_ipi(%rip), %rsi
        call    puts
        mov     count(%rip), %rax
        call    putdec
        lea     m_mode(%rip), %rsi
        call    puts
        mov     %rbp, %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        mov     %ebx, %esi
        test    %esi, %esi
        jnz     9f
        SIMOP   0x21                    # exit(0)
        jmp     park
9:      SIMOP   0x22                    # fail(0, bits)
park:   cli
        hlt
        jmp     park

# #GP: counted; the faulting rdmsr or wrmsr (2 bytes) is skipped.
gp:     incq    gps(%rip)
        add     $8, %rsp                # the error code
        addq    $2, (%rsp)
        iretq

h61:    push    %rax
        push    %rcx
        push    %rdx
        incq    count(%rip)
        mov     $X2_EOI, %ecx
        xor     %eax, %eax
        xor     %edx, %edx
        wrmsr
        pop     %rdx
        pop     %rcx
        pop     %rax
        iretq

spurious:
        iretq

        .include "lib.s"

        .data
gps:    .quad   0
count:  .quad   0
m_id:   .asciz  "x2apic: id="
m_ldr:  .asciz  " ldr="
m_mmio: .asciz  " mmio="
m_gp:   .asciz  " gp="
m_ipi:  .asciz  " selfipi="
m_mode: .asciz  " mode="
nl:     .asciz  "\n"
