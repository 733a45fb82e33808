# Constants and macros of the kvmsim test guests. Included first by each guest.

        .set    COM1, 0x3f8
        .set    SIMOPS, 0xffff0000

# DEFAULT reg, value: sets `reg` to `value` if it is zero (boot arguments
# left at 0 take the guest's default).
        .macro  DEFAULT reg, value
        test    \reg, \reg
        jnz     .Ldefault\@
        mov     $\value, \reg
.Ldefault\@:
        .endm

# SIMOP func: calls sim-ops function `func` (arguments already in RDI, RSI,
# RDX, RCX, R8, R9); the result is in RAX. Clobbers RAX.
        .macro  SIMOP func
        mov     $(SIMOPS + (\func << 8)), %eax
        mov     (%rax), %rax
        .endm


        .set    TIMER, 0xfeb00000       # kvmsim interval timer
        .set    TIMER_PERIOD, TIMER + 0x00
        .set    TIMER_CTRL, TIMER + 0x08
        .set    TIMER_VECTOR, TIMER + 0x10
        .set    TIMER_COUNT, TIMER + 0x18
        .set    TIMER_NOW, TIMER + 0x20
        .set    TICK_VECTOR, 0x40

# MMIO64 addr: RAX = the 64-bit value at MMIO address `addr`.
        .macro  MMIO_RD addr
        mov     $\addr, %eax
        mov     (%rax), %rax
        .endm
# MMIO_WR addr: writes RDX to the 64-bit MMIO register `addr`. Clobbers RAX.
        .macro  MMIO_WR addr
        mov     $\addr, %eax
        mov     %rdx, (%rax)
        .endm

        .set    MAILBOX, 0xfeb01000     # link port 0
        .set    MB_TX, MAILBOX + 0x00
        .set    MB_RX, MAILBOX + 0x08
        .set    MB_RX_COUNT, MAILBOX + 0x10
        .set    MB_VECTOR, MAILBOX + 0x18
        .set    MB_LATENCY, MAILBOX + 0x20
        .set    MSG_VECTOR, 0x50
