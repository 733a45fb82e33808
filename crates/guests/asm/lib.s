# Shared routines of the kvmsim test guests. Included by each guest.
# Everything here works at CPL0 and at CPL3 (with IOPL 3 for port IO).

# puts: writes the NUL-terminated string at RSI to COM1, waiting for the
# transmitter to be empty before each byte. Clobbers RAX, RDX, RSI.
puts:
        mov     $COM1, %dx
1:      lodsb
        test    %al, %al
        jz      3f
        mov     %al, %ah
        add     $5, %dx                 # LSR
2:      in      %dx, %al
        test    $0x20, %al              # THRE
        jz      2b
        sub     $5, %dx
        mov     %ah, %al
        out     %al, %dx
        jmp     1b
3:      ret

# putdec: writes RAX in decimal to COM1. Clobbers RAX, RCX, RDX, RSI, R8.
putdec:
        sub     $32, %rsp
        lea     31(%rsp), %rsi
        movb    $0, (%rsi)
        mov     $10, %r8
1:      xor     %edx, %edx
        div     %r8
        add     $'0', %dl
        dec     %rsi
        mov     %dl, (%rsi)
        test    %rax, %rax
        jnz     1b
        call    puts
        add     $32, %rsp
        ret

# puthex: writes RAX as 0x followed by 16 hex digits. Clobbers RAX, RCX, RDX, RSI, R8.
puthex:
        sub     $32, %rsp
        lea     31(%rsp), %rsi
        movb    $0, (%rsi)
        mov     $16, %ecx
1:      mov     %eax, %edx
        and     $15, %edx
        cmp     $10, %dl
        jb      2f
        add     $('a' - '0' - 10), %dl
2:      add     $'0', %dl
        dec     %rsi
        mov     %dl, (%rsi)
        shr     $4, %rax
        dec     %ecx
        jnz     1b
        dec     %rsi
        movb    $'x', (%rsi)
        dec     %rsi
        movb    $'0', (%rsi)
        call    puts
        add     $32, %rsp
        ret

# to_user: continues at the address in RAX at CPL3 (user code 0x33, user
# data 0x2b) with RFLAGS = RSI (0x2: interrupts off, 0x202: on), on the
# current stack. Port IO needs CPL0: not every KVM lets ring 3 have IOPL 3.
to_user:
        pop     %rdx                    # our return address is not needed
        mov     %rsp, %rcx
        push    $0x2b                   # SS
        push    %rcx                    # RSP
        push    %rsi                    # RFLAGS
        push    $0x33                   # CS
        push    %rax                    # RIP
        iretq

# set_gate: installs the handler at RSI as interrupt gate RDI (ring-0
# handler, kernel code selector 0x10) in `idt`. Clobbers RAX, RDI, RSI.
set_gate:
        shl     $4, %rdi
        lea     idt(%rip), %rax
        add     %rax, %rdi
        mov     %esi, %eax
        mov     %ax, (%rdi)             # offset 15:0
        movw    $0x10, 2(%rdi)          # selector
        movw    $0x8e00, 4(%rdi)        # present, DPL 0, 64-bit interrupt gate
        shr     $16, %eax
        mov     %ax, 6(%rdi)            # offset 31:16
        shr     $32, %rsi
        mov     %esi, 8(%rdi)           # offset 63:32
        movl    $0, 12(%rdi)
        ret

# load_idt: loads `idt` (256 gates). Clobbers RAX.
load_idt:
        lea     idtr(%rip), %rax
        lea     idt(%rip), %rdi
        mov     %rdi, 2(%rax)
        lidt    (%rax)
        ret

        .data
        .balign 16
idtr:   .word   256 * 16 - 1
        .quad   0
        .bss
        .balign 16
idt:    .skip   256 * 16
        .text
