# pcirq: the PC interrupt paths in simulated time, on platform "pc".
# Each phase halts until 10 interrupts arrived and measures the simulated
# time (interval timer NOW_NS) they took:
#   1. PIT channel 0 at 1 kHz -> 8259 (vectors 0x20..) -> local APIC LINT0
#      in ExtINT mode (virtual wire); EOI to the 8259.
#   2. The same PIT -> I/O APIC pin 2 -> local APIC, vector 0x31; EOI to
#      the local APIC.
#   3. The local APIC timer, periodic, 1 ms, vector 0x40.
# Prints "pcirq: pic_ns=A ioapic_ns=B apic_timer_ns=C", then sim-ops exit.
        .code64
        .include "macros.s"
        .set    APIC, 0xfee00000
        .set    IOAPIC, 0xfec00000
        .text
        .globl  _start
_start:
        mov     $0x20, %edi
        lea     pic_tick(%rip), %rsi
        call    set_gate
        mov     $0x31, %edi
        lea     apic_tick(%rip), %rsi
        call    set_gate
        mov     $0x40, %edi
        lea     apic_tick(%rip), %rsi
        call    set_gate
        call    load_idt

        # 8259 pair: vectors 0x20/0x28, cascade, only IRQ0 unmasked.
        mov     $0x11, %al
        out     %al, $0x20
        mov     $0x20, %al
        out     %al, $0x21
        mov     $0x04, %al
        out     %al, $0x21
        mov     $0x01, %al
        out     %al, $0x21
        mov     $0x11, %al
        out     %al, $0xa0
        mov     $0x28, %al
        out     %al, $0xa1
        mov     $0x02, %al
        out     %al, $0xa1
        mov     $0x01, %al
        out     %al, $0xa1
        mov     $0xfe, %al
        out     %al, $0x21
        mov     $0xff, %al
        out     %al, $0xa1
        # PIT channel 0: mode 2, divisor 1193 (1 kHz).
        mov     $0x34, %al
        out     %al, $0x43
        mov     $0xa9, %al
        out     %al, $0x40
        mov     $0x04, %al
        out     %al, $0x40

        call    count10
        mov     %rax, %r12              # phase 1

        # Phase 2: mask the 8259, enable the local APIC, route pin 2.
        mov     $0xff, %al
        out     %al, $0x21
        mov     $0x1ff, %edx
        MMIO_WR APIC + 0xf0
        mov     $0x14, %edx
        MMIO_WR IOAPIC
        mov     $0x31, %edx             # vector 0x31, fixed, edge, unmasked
        MMIO_WR IOAPIC + 0x10
        mov     $0x15, %edx
        MMIO_WR IOAPIC
        xor     %edx, %edx              # destination APIC 0
        MMIO_WR IOAPIC + 0x10
        call    count10
        mov     %rax, %r13              # phase 2

        # Phase 3: mask pin 2, run the local APIC timer.
        mov     $0x14, %edx
        MMIO_WR IOAPIC
        mov     $0x10031, %edx
        MMIO_WR IOAPIC + 0x10
        mov     $0xb, %edx              # divide by 1
        MMIO_WR APIC + 0x3e0
        mov     $0x20040, %edx          # periodic, vector 0x40
        MMIO_WR APIC + 0x320
        mov     $1000000, %edx          # 1,000,000 bus clocks at 1 GHz = 1 ms
        MMIO_WR APIC + 0x380
        call    count10
        mov     %rax, %r14              # phase 3
        mov     $0x10000, %edx          # mask the timer
        MMIO_WR APIC + 0x320

        lea     m1(%rip), %rsi
        call    puts
        mov     %r12, %rax
        call    putdec
        lea     m2(%rip), %rsi
        call    puts
        mov     %r13, %rax
        call    putdec
        lea     m3(%rip), %rsi
        call    puts
        mov     %r14, %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
1:      hlt
        jmp     1b

# count10: waits (halted) for 10 interrupts; RAX = simulated ns they took.
count10:
        movq    $0, ticks(%rip)
        MMIO_RD TIMER_NOW
        mov     %rax, %rbx
1:      sti
        hlt
        cli
        cmpq    $10, ticks(%rip)
        jb      1b
        MMIO_RD TIMER_NOW
        sub     %rbx, %rax
        ret

pic_tick:
        push    %rax
        incq    ticks(%rip)
        mov     $0x20, %al              # non-specific EOI to the master
        out     %al, $0x20
        pop     %rax
        iretq

apic_tick:
        push    %rax
        incq    ticks(%rip)
        mov     $(APIC + 0xb0), %eax    # EOI to the local APIC
        movl    $0, (%rax)
        pop     %rax
        iretq

        .include "lib.s"

        .data
        .balign 8
ticks:  .quad   0
m1:     .asciz  "pcirq: pic_ns="
m2:     .asciz  " ioapic_ns="
m3:     .asciz  " apic_timer_ns="
nl:     .asciz  "\n"
