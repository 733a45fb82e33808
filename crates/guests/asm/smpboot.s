# smpboot: the BSP starts every AP with INIT, SIPI, SIPI through a
# real-mode trampoline (smp.s), then every CPU runs the compute loop at
# ring 3 and reports into shared memory; only the BSP prints.
# RDI = number of CPUs N (default 2; APIC IDs 0..N-1, at most 64), RSI =
# loop iterations per CPU (default 10,000,000), RDX = how long the BSP
# waits for the reports, in simulated ms from its start (default 10,000).
# Prints one line per CPU, "smpboot: apic=A cpu=I result=0x.. done_ns=T"
# (cpu: the order of arrival, the BSP 0; done_ns: when it reported, from
# the BSP's start), then "smpboot: K of N CPUs started iterations=..
# elapsed_ns=..", and exits through sim-ops; if an AP never reported, it
# names them ("smpboot: never reported: apic=2 apic=3") and fails with
# code 1 (code 2: bad arguments or no local APIC; 3: an exception).
# With N = 1 the BSP runs alone and needs no local APIC ("apic=none" if
# there is none).
        .code64
        .include "macros.s"
        .include "smp_defs.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # N
        DEFAULT %r12, 2
        mov     %rsi, %r13              # iterations
        DEFAULT %r13, 10000000
        mov     %rdx, %r14              # timeout ms
        DEFAULT %r14, 10000
        cmp     $SMP_MAX_CPUS, %r12
        ja      too_many
        mov     %r13, iterations(%rip)
        mov     %r12d, %edi
        call    smp_init
        MMIO_RD TIMER_NOW
        mov     %rax, t0(%rip)
        call    smp_apic_present
        mov     %eax, have_apic(%rip)
        test    %eax, %eax
        jz      1f
        call    smp_apic_enable
        cmp     $SMP_MAX_CPUS, %eax
        jae     no_apic
        mov     %eax, smp_bsp_apic(%rip)
1:      cmp     $1, %r12
        je      compute                 # alone: no APIC needed
        cmpl    $0, have_apic(%rip)
        je      no_apic
        call    smp_start_aps
compute:
        mov     %r13, %rdi
        call    smp_ring3_compute
        mov     %rax, %rsi
        mov     smp_bsp_apic(%rip), %ecx
        xor     %edi, %edi
        call    record
        cmp     $1, %r12
        je      1f
        imul    $1000000, %r14, %rdx
        add     t0(%rip), %rdx
        lea     reported(%rip), %rdi
        lea     -1(%r12), %rsi
        mov     $1000000, %ecx          # a tick every 1 ms at a 1 GHz APIC bus
        call    smp_wait
1:      MMIO_RD TIMER_NOW
        sub     t0(%rip), %rax
        mov     %rax, %r15              # elapsed

        # One line per CPU that reported, counting them.
        call    smp_print_lock
        xor     %ebx, %ebx              # APIC ID
        xor     %ebp, %ebp              # started
2:      mov     %rbx, %rdi
        shl     $5, %rdi
        lea     reports(%rip), %rax
        add     %rax, %rdi
        cmpq    $0, 24(%rdi)
        je      3f
        inc     %ebp
        push    %rdi
        PUTS    m_apic
        cmp     smp_bsp_apic(%rip), %ebx
        jne     4f
        cmpl    $0, have_apic(%rip)
        jne     4f
        PUTS    m_none
        jmp     5f
4:      mov     %rbx, %rax
        call    putdec
5:      PUTS    m_cpu
        mov     (%rsp), %rdi
        mov     8(%rdi), %rax
        call    putdec
        PUTS    m_result
        mov     (%rsp), %rdi
        mov     (%rdi), %rax
        call    puthex
        PUTS    m_done
        pop     %rdi
        mov     16(%rdi), %rax
        call    putdec
        PUTS    nl
3:      inc     %ebx
        cmp     %r12d, %ebx
        jb      2b

        # Those that did not.
        cmp     %r12d, %ebp
        je      6f
        PUTS    m_never
        xor     %ebx, %ebx
7:      mov     %rbx, %rdi
        shl     $5, %rdi
        lea     reports(%rip), %rax
        cmpq    $0, 24(%rax,%rdi)
        jne     8f
        PUTS    m_apic_sp
        mov     %rbx, %rax
        call    putdec
8:      inc     %ebx
        cmp     %r12d, %ebx
        jb      7b
        PUTS    nl

6:      # Anything the platform should not have done.
        mov     smp_extra(%rip), %eax
        add     strays(%rip), %eax
        add     dupes(%rip), %eax
        test    %eax, %eax
        jz      9f
        PUTS    m_extra
        mov     smp_extra(%rip), %eax
        call    putdec
        PUTS    m_strays
        mov     strays(%rip), %eax
        call    putdec
        PUTS    m_dupes
        mov     dupes(%rip), %eax
        call    putdec
        PUTS    nl

9:      PUTS    m_sum
        mov     %rbp, %rax
        call    putdec
        PUTS    m_of
        mov     %r12, %rax
        call    putdec
        PUTS    m_started
        mov     %r13, %rax
        call    putdec
        PUTS    m_elapsed
        mov     %r15, %rax
        call    putdec
        PUTS    nl
        call    smp_print_unlock
        cmp     %r12d, %ebp
        jne     fail1
        mov     smp_extra(%rip), %eax
        add     strays(%rip), %eax
        add     dupes(%rip), %eax
        test    %eax, %eax
        jnz     fail1
        xor     %edi, %edi
        SIMOP   0x21                    # exit(0)
        jmp     park
fail1:  mov     $1, %esi
        jmp     fail

too_many:
        PUTS    m_too_many
        jmp     fail2
no_apic:
        PUTS    m_no_apic
        mov     %r12, %rax
        call    putdec
        PUTS    m_no_apic2
fail2:  mov     $2, %esi
fail:   xor     %edi, %edi
        SIMOP   0x22                    # fail(0, code)
park:   cli
        hlt
        jmp     park

# Each AP: the loop at ring 3, then its report, then a wake-up for the BSP.
ap_main:
        mov     %edi, %ebx              # CPU index
        mov     iterations(%rip), %rdi
        call    smp_ring3_compute
        mov     %rax, %rsi
        APIC_RD APIC_ID
        shr     $24, %eax
        mov     %eax, %ecx
        mov     %ebx, %edi
        call    record
        lock incq reported(%rip)
        mov     smp_bsp_apic(%rip), %edi
        mov     $(ICR_FIXED | SMP_WAKE_VECTOR), %esi
        call    smp_send_ipi
        jmp     park

# record: ECX = APIC ID, EDI = CPU index, RSI = result. Fills the APIC
# ID's report (result, index, ns since the BSP's start, then the flag);
# an ID outside 0..N-1 counts as a stray, a second report as a duplicate.
# Clobbers RAX, RDX, RDI, R8.
record:
        cmp     smp_ncpus(%rip), %ecx
        jae     1f
        mov     %rcx, %r8
        shl     $5, %r8
        lea     reports(%rip), %rax
        add     %rax, %r8
        mov     %rsi, (%r8)
        mov     %rdi, 8(%r8)
        MMIO_RD TIMER_NOW
        sub     t0(%rip), %rax
        mov     %rax, 16(%r8)
        lock btsq $0, 24(%r8)           # stores stay in order: the flag last
        jnc     2f
        lock incl dupes(%rip)
        ret
1:      lock incl strays(%rip)
2:      ret

        .include "smp.s"
        .include "lib.s"
        .include "compute_loop.s"

        .data
        .balign 8
iterations: .quad 0
t0:         .quad 0
reported:   .quad 0                     # APs that reported
have_apic:  .long 0
strays:     .long 0
dupes:      .long 0
guest_name: .asciz "smpboot"
m_apic:     .asciz "smpboot: apic="
m_none:     .asciz "none"
m_cpu:      .asciz " cpu="
m_result:   .asciz " result="
m_done:     .asciz " done_ns="
m_never:    .asciz "smpboot: never reported:"
m_apic_sp:  .asciz " apic="
m_extra:    .asciz "smpboot: platform error: APs started beyond N="
m_strays:   .asciz " reports from APIC IDs outside 0..N-1="
m_dupes:    .asciz " second reports="
m_sum:      .asciz "smpboot: "
m_of:       .asciz " of "
m_started:  .asciz " CPUs started iterations="
m_elapsed:  .asciz " elapsed_ns="
m_too_many: .asciz "smpboot: at most 64 CPUs (RDI)\n"
m_no_apic:  .asciz "smpboot: no local APIC answers at 0xfee00000 (or its ID is above 63), so the APs cannot be started; run with [system] cpus = "
m_no_apic2: .asciz "\n"
nl:         .asciz "\n"

        .bss
        .balign 32
reports:    .skip 32 * SMP_MAX_CPUS     # by APIC ID: result, index, ns, flag
