# Constants and macros of the SMP guests (smpboot, ipipong). Included after
# macros.s, before the guest's code; the code they share is in smp.s.

        .set    APIC, 0xfee00000        # xAPIC MMIO window of every CPU
        .set    APIC_ID, 0x20           # bits 31:24: the APIC ID
        .set    APIC_VERSION, 0x30
        .set    APIC_EOI, 0xb0
        .set    APIC_SVR, 0xf0          # spurious vector, bit 8: software enable
        .set    APIC_ICR_LO, 0x300      # a write sends the IPI
        .set    APIC_ICR_HI, 0x310      # bits 31:24: destination APIC ID
        .set    APIC_LVT_TIMER, 0x320
        .set    APIC_TIMER_INIT, 0x380
        .set    APIC_TIMER_DIV, 0x3e0

        .set    ICR_FIXED, 0x0000       # fixed delivery, physical destination, edge
        .set    ICR_INIT, 0x4500        # INIT, level assert
        .set    ICR_SIPI, 0x4600        # start-up (| vector), level assert
        .set    ICR_BUSY, 0x1000        # delivery status: send pending

# The AP trampoline's page: above the boot area (GDT, TSS, page tables and
# interrupt stack end at 0x9000) and what the "pc" firmware writes for a
# Linux kernel (zero page 0x9000, command line 0xA000), far below the boot
# stack (down from 0x80000), the MP table (0x9FC00) and the ACPI tables
# (0xE0000). Its SIPI vector is 0x10: an AP starts at CS 0x1000, IP 0.
        .set    SMP_TRAMP, 0x10000
        .set    SMP_SIPI_VECTOR, SMP_TRAMP >> 12

        .set    SMP_MAX_CPUS, 64        # APIC IDs 0..63
        .set    SMP_STACK_SIZE, 8192    # per CPU: ring 0 and ring 3
        .set    SMP_ISTACK_SIZE, 4096   # per CPU: interrupts from ring 3 (TSS.RSP0)
        .set    SMP_TSS_STRIDE, 128     # one 0x68-byte TSS per CPU
        .set    SMP_TSS_SEL, 0x40       # CPU i's TSS: SMP_TSS_SEL + 16 * i
        .set    SMP_GDT_SIZE, SMP_TSS_SEL + 16 * SMP_MAX_CPUS

        .set    SMP_WAKE_VECTOR, 0x41   # an IPI that only wakes a halted CPU
        .set    SMP_TICK_VECTOR, 0x42   # the local APIC timer of a waiting CPU
        .set    SMP_FAR, 0x100000000    # unmapped: ring 3's way back to ring 0
        .set    SMP_RING3_COOKIE, 0x534d50334241434b  # marks smp_ring3_compute's fault

# APIC_RD reg: EAX = this CPU's local APIC register `reg`.
        .macro  APIC_RD reg
        mov     $(APIC + \reg), %eax
        mov     (%rax), %eax
        .endm
# APIC_WR reg: writes EDX to this CPU's local APIC register `reg`. Clobbers RAX.
        .macro  APIC_WR reg
        mov     $(APIC + \reg), %eax
        mov     %edx, (%rax)
        .endm
# PUTS label: writes the string at `label` to COM1. Clobbers RAX, RDX, RSI.
        .macro  PUTS label
        lea     \label(%rip), %rsi
        call    puts
        .endm
