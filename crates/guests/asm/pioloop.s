# pioloop: RDI (default 10,000) port reads at CPL0 and nothing else, each a
# port-IO round trip (exit, service, completion of the read); then sim-ops
# exit. It reads the UART's scratch register. `kvmsim bench` times it in
# kvmsim against a bare KVM loop that runs the same bytes.
        .code64
        .include "macros.s"
        .text
        .globl  _start
_start:
        mov     %rdi, %rcx
        DEFAULT %rcx, 10000
        mov     $(COM1 + 7), %dx        # scratch register
1:      in      %dx, %al
        dec     %rcx
        jnz     1b
        xor     %edi, %edi
        SIMOP   0x21
2:      hlt
        jmp     2b
