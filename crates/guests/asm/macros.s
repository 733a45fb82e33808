# Constants and macros of the kvmsim test guests. Included first by each guest.

        .set    COM1, 0x3f8
        .set    SIMOPS, 0xffff0000

# SIMOP func: calls sim-ops function `func` (arguments already in RDI, RSI,
# RDX, RCX, R8, R9); the result is in RAX. Clobbers RAX.
        .macro  SIMOP func
        mov     $(SIMOPS + (\func << 8)), %eax
        mov     (%rax), %rax
        .endm

