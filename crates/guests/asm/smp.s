# What the SMP guests (smpboot, ipipong) share: the local APIC, AP start-up
# (INIT, SIPI, SIPI through a real-mode trampoline), a GDT of the guest's
# own with one TSS per CPU (a busy TSS cannot be loaded by two CPUs), a
# stack and an interrupt stack per CPU, the ring-3 compute loop, waits that
# halt between checks and give up at a simulated-time deadline (the
# interval timer's NOW_NS), exception reports, and a print lock.
#
# Included after the guest's code (with lib.s and compute_loop.s); the guest
# includes smp_defs.s at the top and defines:
#   guest_name  its name, NUL-terminated (for messages)
#   ap_main     where each AP continues: 64-bit ring 0, interrupts off,
#               RDI = its CPU index (1..N-1, in the order the APs arrived),
#               its own stack and TSS, the IDT loaded, its APIC enabled.
# The BSP calls smp_init, then (N > 1) smp_apic_present, smp_apic_enable
# (storing the ID in smp_bsp_apic) and smp_start_aps.

        .text
# smp_init: EDI = number of CPUs N (1..SMP_MAX_CPUS). Installs the
# exception gates (0-31: report and fail), the wake, tick and spurious
# gates, loads the IDT, writes a TSS and its descriptor for each of the N
# CPUs, and moves the BSP onto the guest's GDT with TSS 0. Clobbers the
# caller-saved registers.
smp_init:
        push    %rbx
        mov     %edi, smp_ncpus(%rip)
        xor     %ebx, %ebx
1:      mov     %ebx, %edi
        lea     smp_exc_table(%rip), %rax
        mov     (%rax,%rbx,8), %rsi
        call    set_gate
        inc     %ebx
        cmp     $32, %ebx
        jb      1b
        mov     $SMP_WAKE_VECTOR, %edi
        lea     smp_eoi_iret(%rip), %rsi
        call    set_gate
        mov     $SMP_TICK_VECTOR, %edi
        lea     smp_tick(%rip), %rsi
        call    set_gate
        mov     $0xff, %edi
        lea     smp_spurious(%rip), %rsi
        call    set_gate
        call    load_idt
        xor     %ebx, %ebx
2:      mov     %ebx, %edi
        call    smp_make_tss
        inc     %ebx
        cmp     smp_ncpus(%rip), %ebx
        jb      2b
        call    smp_load_gdt
        mov     $SMP_TSS_SEL, %eax
        ltr     %ax
        pop     %rbx
        ret

# smp_make_tss: EDI = CPU index. Its TSS (RSP0 = the top of its interrupt
# stack, no I/O bitmap) and its 16-byte available-TSS descriptor at
# SMP_TSS_SEL + 16 * index. Clobbers RAX, RCX, RDX, RSI, R8.
smp_make_tss:
        mov     %edi, %ecx
        mov     %rcx, %rdx
        imul    $SMP_TSS_STRIDE, %rdx
        lea     smp_tss(%rip), %rax
        add     %rax, %rdx              # RDX = the TSS
        lea     1(%rcx), %rax
        imul    $SMP_ISTACK_SIZE, %rax
        lea     smp_istacks(%rip), %rsi
        add     %rsi, %rax
        mov     %rax, 4(%rdx)           # RSP0
        movw    $0x68, 0x66(%rdx)       # I/O map base past the limit
        mov     %rcx, %rsi
        shl     $4, %rsi
        lea     smp_gdt + SMP_TSS_SEL(%rip), %rax
        add     %rax, %rsi              # RSI = the descriptor
        mov     %edx, %eax
        and     $0xffffff, %eax
        shl     $16, %rax               # base 23:0
        or      $0x67, %rax             # limit
        movabs  $(0x89 << 40), %r8      # present, DPL 0, 64-bit TSS (available)
        or      %r8, %rax
        mov     %rdx, %r8
        shr     $24, %r8
        and     $0xff, %r8d
        shl     $56, %r8                # base 31:24
        or      %r8, %rax
        mov     %rax, (%rsi)
        mov     %rdx, %rax
        shr     $32, %rax               # base 63:32
        mov     %rax, 8(%rsi)
        ret

# smp_load_gdt: loads the guest's GDT and reloads CS (0x10), DS, ES, SS
# (0x18), FS and GS (null). Needs a stack. Clobbers RAX.
smp_load_gdt:
        lgdt    smp_gdtr(%rip)
        mov     $0x18, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        xor     %eax, %eax
        mov     %eax, %fs
        mov     %eax, %gs
        pop     %rax                    # return address
        push    $0x10
        push    %rax
        lretq

# smp_apic_present: EAX = 1 if a local APIC answers at APIC (its version
# register reads other than all-ones, what an unclaimed address reads).
smp_apic_present:
        APIC_RD APIC_VERSION
        cmp     $0xffffffff, %eax
        setne   %al
        movzbl  %al, %eax
        ret

# smp_apic_enable: software-enables this CPU's local APIC (spurious vector
# 0xFF); EAX = its APIC ID. Clobbers RDX.
smp_apic_enable:
        mov     $0x1ff, %edx
        APIC_WR APIC_SVR
        APIC_RD APIC_ID
        shr     $24, %eax
        ret

# smp_send_ipi: sends ICR low ESI to APIC ID EDI, after waiting (boundedly)
# for the previous message to leave. Call with interrupts off (a handler
# that sent in between would change ICR high). Clobbers RAX, RCX, RDX.
smp_send_ipi:
        mov     $1000, %ecx
1:      APIC_RD APIC_ICR_LO
        test    $ICR_BUSY, %eax
        jz      2f
        pause
        dec     %ecx
        jnz     1b
2:      mov     %edi, %edx
        shl     $24, %edx
        APIC_WR APIC_ICR_HI
        mov     %esi, %edx
        APIC_WR APIC_ICR_LO
        ret

# smp_ipi_aps: sends ICR low ESI to every APIC ID 0..N-1 but the BSP's.
# Clobbers the caller-saved registers.
smp_ipi_aps:
        push    %rbx
        push    %r12
        mov     %esi, %r12d
        xor     %ebx, %ebx
1:      cmp     smp_bsp_apic(%rip), %ebx
        je      2f
        mov     %ebx, %edi
        mov     %r12d, %esi
        call    smp_send_ipi
2:      inc     %ebx
        cmp     smp_ncpus(%rip), %ebx
        jb      1b
        pop     %r12
        pop     %rbx
        ret

# smp_start_aps: copies the trampoline to SMP_TRAMP (with this CPU's CR0,
# CR3 and CR4 for the APs to take), then starts APIC IDs 0..N-1 but the
# BSP's as a PC's firmware does: INIT, 10 ms, SIPI, 200 us, SIPI (times in
# simulated time). Clobbers the caller-saved registers.
smp_start_aps:
        lea     smp_tramp_start(%rip), %rsi
        mov     $SMP_TRAMP, %edi
        mov     $((smp_tramp_end - smp_tramp_start + 7) / 8), %ecx
1:      mov     (%rsi), %rax
        mov     %rax, (%rdi)
        add     $8, %rsi
        add     $8, %rdi
        dec     %ecx
        jnz     1b
        mov     %cr0, %rax
        mov     %eax, SMP_TRAMP + (smp_t_cr0 - smp_tramp_start)
        mov     %cr3, %rax              # the page tables lie below 4 GiB
        mov     %eax, SMP_TRAMP + (smp_t_cr3 - smp_tramp_start)
        mov     %cr4, %rax
        mov     %eax, SMP_TRAMP + (smp_t_cr4 - smp_tramp_start)
        mov     $ICR_INIT, %esi
        call    smp_ipi_aps
        mov     $10000000, %edi
        call    smp_delay
        mov     $(ICR_SIPI | SMP_SIPI_VECTOR), %esi
        call    smp_ipi_aps
        mov     $200000, %edi
        call    smp_delay
        mov     $(ICR_SIPI | SMP_SIPI_VECTOR), %esi
        call    smp_ipi_aps
        ret

# smp_delay: waits RDI ns of simulated time, halted (see smp_wait).
# Clobbers the caller-saved registers.
smp_delay:
        push    %rbx
        mov     %rdi, %rbx
        MMIO_RD TIMER_NOW
        lea     (%rax,%rbx), %rdx
        lea     smp_never(%rip), %rdi
        mov     $1, %esi
        mov     $100000, %ecx           # a tick every 100 us at a 1 GHz APIC bus
        call    smp_wait
        pop     %rbx
        ret

# smp_wait: waits until the u64 at RDI reaches RSI (RAX = 1) or NOW_NS
# reaches RDX (RAX = 0), halting between checks. Meanwhile this CPU's APIC
# timer interrupts every ECX bus clocks (periodic, divide by 1), so that the
# deadline is seen even if nothing else happens. Returns with interrupts
# off and the timer stopped. Clobbers the caller-saved registers.
smp_wait:
        push    %rbx
        push    %r12
        push    %r13
        push    %r14
        mov     %rdi, %rbx
        mov     %rsi, %r12
        mov     %rdx, %r13
        mov     %ecx, %r14d
        mov     $0xb, %edx              # divide by 1
        APIC_WR APIC_TIMER_DIV
        mov     $(0x20000 | SMP_TICK_VECTOR), %edx   # periodic
        APIC_WR APIC_LVT_TIMER
        mov     %r14d, %edx
        APIC_WR APIC_TIMER_INIT
1:      cli
        cmp     %r12, (%rbx)
        jae     2f
        MMIO_RD TIMER_NOW
        cmp     %r13, %rax
        jae     3f
        sti                             # the interrupt shadow covers hlt
        hlt
        jmp     1b
2:      mov     $1, %r14d
        jmp     4f
3:      xor     %r14d, %r14d
4:      mov     $0x10000, %edx          # masked
        APIC_WR APIC_LVT_TIMER
        xor     %edx, %edx
        APIC_WR APIC_TIMER_INIT
        mov     %r14, %rax
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbx
        ret

# smp_ring3_compute: RDI = iterations. Runs kvmsim_compute_loop at ring 3
# (interrupts off) on the current stack and comes back to ring 0 through a
# page fault at SMP_FAR, taken on this CPU's TSS.RSP0 stack (smp_pf).
# RAX = the loop's result. Keeps RBX, RBP, R12-R15.
smp_ring3_compute:
        push    %rbx
        push    %rbp
        push    %r12
        push    %r13
        push    %r14
        push    %r15
        mov     %rsp, %r12              # the loop keeps R12-R14
        mov     %rdi, %r13
        movabs  $SMP_RING3_COOKIE, %r14
        lea     1f(%rip), %rax
        mov     $0x2, %esi
        call    to_user
1:      mov     %r13, %rdi
        call    kvmsim_compute_loop
        mov     %rax, %r13
        movabs  $SMP_FAR, %rax
        mov     (%rax), %rax
        ud2
smp_ring3_back:                         # from smp_pf, at ring 0
        mov     %r12, %rsp
        mov     %r13, %rax
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbp
        pop     %rbx
        ret

# #PF: smp_ring3_compute's way back if it is that fault (from ring 3, at
# SMP_FAR, with the cookie in R14), else an unexpected exception.
smp_pf:
        testb   $3, 16(%rsp)            # CS of the frame (after the error code)
        jz      1f
        movabs  $SMP_RING3_COOKIE, %rax
        cmp     %rax, %r14
        jne     1f
        mov     %cr2, %rax
        movabs  $SMP_FAR, %rdx
        cmp     %rdx, %rax
        je      smp_ring3_back
1:      push    $14
        jmp     smp_exception

# An exception nobody expects: prints the vector, error code, RIP, CR2 and
# the CPU's APIC ID under the print lock, then sim-ops fail(0, 3).
# Stack: vector, error code (0 if none), RIP, CS, RFLAGS, RSP, SS.
smp_exception:
        mov     (%rsp), %rbx
        mov     8(%rsp), %rbp
        mov     16(%rsp), %r12
        mov     %cr2, %r13
        call    smp_print_lock
        PUTS    guest_name
        PUTS    smp_m_exc
        mov     %rbx, %rax
        call    putdec
        PUTS    smp_m_err
        mov     %rbp, %rax
        call    puthex
        PUTS    smp_m_rip
        mov     %r12, %rax
        call    puthex
        PUTS    smp_m_cr2
        mov     %r13, %rax
        call    puthex
        PUTS    smp_m_apic
        APIC_RD APIC_ID
        shr     $24, %eax
        call    putdec
        PUTS    smp_m_nl
        call    smp_print_unlock
        xor     %edi, %edi
        mov     $3, %esi
        SIMOP   0x22                    # fail(0, 3)
1:      cli
        hlt
        jmp     1b

# Stubs for exceptions 0-31: push a zero where the CPU pushes no error
# code, then the vector. (#PF has its own entry, smp_pf.)
        .irp    v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
smp_exc_\v:
        .if     !((\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30))
        push    $0
        .endif
        push    $\v
        jmp     smp_exception
        .endr

# The local APIC timer of a waiting CPU: counts, EOI.
smp_tick:
        lock incq smp_ticks(%rip)
# A wake-up IPI: EOI only.
smp_eoi_iret:
        push    %rax
        push    %rdx
        xor     %edx, %edx
        APIC_WR APIC_EOI
        pop     %rdx
        pop     %rax
        iretq
# The spurious vector takes no EOI.
smp_spurious:
        iretq

# smp_print_lock / smp_print_unlock: one CPU at a time prints, so lines
# from several CPUs never interleave. Clobber RAX.
smp_print_lock:
        mov     $1, %eax
        xchg    %eax, smp_plock(%rip)
        test    %eax, %eax
        jz      1f
        pause
        jmp     smp_print_lock
1:      ret
smp_print_unlock:
        movl    $0, smp_plock(%rip)
        ret

# The AP trampoline, copied to SMP_TRAMP by smp_start_aps. A SIPI starts
# the AP here in real mode (CS = SMP_TRAMP >> 4, IP = 0); it loads a GDT of
# its own (32-bit code 0x08, data 0x10, 64-bit code 0x18; accessed bits
# set), enters protected mode, turns on PAE, loads the BSP's page tables,
# sets EFER.LME, turns on paging with the BSP's CR0 (long mode, compat
# submode) and far-jumps to 64-bit code in the image.
        .balign 16
smp_tramp_start:
        .code16
        cli
        cld
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   smp_t_gdtr - smp_tramp_start
        mov     %cr0, %eax
        or      $1, %al
        mov     %eax, %cr0
        ljmpl   $0x08, $(SMP_TRAMP + smp_t_pm32 - smp_tramp_start)
        .code32
smp_t_pm32:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     SMP_TRAMP + (smp_t_cr4 - smp_tramp_start), %eax
        or      $0x20, %eax             # PAE, whatever the BSP had
        mov     %eax, %cr4
        mov     SMP_TRAMP + (smp_t_cr3 - smp_tramp_start), %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       # EFER.LME
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     SMP_TRAMP + (smp_t_cr0 - smp_tramp_start), %eax
        or      $0x80000001, %eax       # PG, PE
        mov     %eax, %cr0
        ljmp    $0x18, $smp_ap_entry64
        .balign 8
smp_t_gdt:
        .quad   0
        .quad   0x00cf9b000000ffff      # 0x08 code, 32-bit, 4 GiB
        .quad   0x00cf93000000ffff      # 0x10 data, 4 GiB
        .quad   0x00af9b000000ffff      # 0x18 code, 64-bit
smp_t_gdtr:
        .word   4 * 8 - 1
        .long   SMP_TRAMP + smp_t_gdt - smp_tramp_start
smp_t_cr0: .long 0
smp_t_cr3: .long 0
smp_t_cr4: .long 0
smp_tramp_end:
        .code64

# An AP in 64-bit mode (CS 0x18 of the trampoline's GDT), no stack yet.
# Takes the next CPU index (locked xadd), its stack, the guest's GDT, its
# TSS and the IDT, enables its APIC and goes to ap_main. An AP beyond the
# N asked for (started twice, or never asked) is counted and parked.
smp_ap_entry64:
        mov     $1, %eax
        lock xadd %eax, smp_next(%rip)
        cmp     smp_ncpus(%rip), %eax
        jae     2f
        mov     %eax, %ebx
        lea     1(%rax), %rax
        imul    $SMP_STACK_SIZE, %rax
        lea     smp_stacks(%rip), %rsp
        add     %rax, %rsp
        call    smp_load_gdt
        mov     %ebx, %eax
        shl     $4, %eax
        add     $SMP_TSS_SEL, %eax
        ltr     %ax
        lidt    idtr(%rip)
        call    smp_apic_enable
        mov     %ebx, %edi
        jmp     ap_main
2:      lock incl smp_extra(%rip)
3:      cli
        hlt
        jmp     3b

        .data
        .balign 8
smp_exc_table:
        .quad   smp_exc_0, smp_exc_1, smp_exc_2, smp_exc_3, smp_exc_4, smp_exc_5
        .quad   smp_exc_6, smp_exc_7, smp_exc_8, smp_exc_9, smp_exc_10, smp_exc_11
        .quad   smp_exc_12, smp_exc_13, smp_pf, smp_exc_15, smp_exc_16, smp_exc_17
        .quad   smp_exc_18, smp_exc_19, smp_exc_20, smp_exc_21, smp_exc_22, smp_exc_23
        .quad   smp_exc_24, smp_exc_25, smp_exc_26, smp_exc_27, smp_exc_28, smp_exc_29
        .quad   smp_exc_30, smp_exc_31
        .balign 16
# The guest's GDT: the boot GDT's selectors, then one TSS per CPU.
smp_gdt:
        .quad   0
        .quad   0x00cf9b000000ffff      # 0x08 kernel code, 32-bit
        .quad   0x00af9b000000ffff      # 0x10 kernel code, 64-bit
        .quad   0x00cf93000000ffff      # 0x18 kernel data
        .quad   0x00cffb000000ffff      # 0x20 user code, 32-bit
        .quad   0x00cff3000000ffff      # 0x28 user data
        .quad   0x00affb000000ffff      # 0x30 user code, 64-bit
        .quad   0
        .skip   16 * SMP_MAX_CPUS       # 0x40: the TSS descriptors
        .balign 8
smp_gdtr:
        .word   SMP_GDT_SIZE - 1
        .quad   smp_gdt
smp_next:       .long   1               # the next AP's CPU index
smp_ncpus:      .long   1
smp_bsp_apic:   .long   0
smp_extra:      .long   0               # APs started beyond N
smp_plock:      .long   0
        .balign 8
smp_never:      .quad   0
smp_ticks:      .quad   0
smp_m_exc:      .asciz  ": unexpected exception vector="
smp_m_err:      .asciz  " error="
smp_m_rip:      .asciz  " rip="
smp_m_cr2:      .asciz  " cr2="
smp_m_apic:     .asciz  " apic="
smp_m_nl:       .asciz  "\n"

        .bss
        .balign 4096
smp_stacks:     .skip   SMP_STACK_SIZE * SMP_MAX_CPUS
smp_istacks:    .skip   SMP_ISTACK_SIZE * SMP_MAX_CPUS
        .balign 128
smp_tss:        .skip   SMP_TSS_STRIDE * SMP_MAX_CPUS
        .text
