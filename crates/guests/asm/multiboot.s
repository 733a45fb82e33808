# multiboot: a Multiboot-1 kernel. kvmsim (or QEMU -kernel) enters it in
# 32-bit protected mode; it checks what the boot loader handed over and
# reports through QEMU's compatibility devices:
#   1  EAX = 0x2BADB002 and the info flags name memory sizes, command
#      line and memory map
#   2  mem_lower = 639 KiB, mem_upper >= 1 MiB
#   4  the memory map has RAM at 0 and RAM at 1 MiB of mem_upper KiB
#   8  the command line holds "mbcheck=kvmsim"
#  16  a module starting with "KVMSIM-MODULE" (its byte sum is printed)
#  32  fw_cfg: signature "QEMU" and the CPU count is 1 or more; pc-testdev:
#      the scratch port 0xE0 keeps a value
#  64  IA32_APIC_BASE: with the enable bit cleared the local APIC's
#      registers are gone (its version register reads all-ones), with it
#      set again they are back (version 0x14)
# The failed checks' bits (at most 127) are written to isa-debug-exit
# (port 0xf4): the run ends with status bits*2+1 (1 when all passed).
        .include "macros.s"
        .set    MB_MAGIC, 0x1badb002
        .set    MB_FLAGS, 0x00000003     # page-aligned modules, memory info
        .set    DEBUG_EXIT, 0xf4
        .set    FW_CFG, 0x510
        .set    TESTDEV, 0xe0

        .text
        .code32
        .globl  _start
_start:
        jmp     start32
        .balign 4
mb_header:
        .long   MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

start32:
        mov     $0x80000, %esp          # the guest's own stack (low RAM)
        xor     %edi, %edi              # EDI = failed checks
        mov     %eax, %ebp              # keep the magic
        lea     m_start, %esi
        call    puts32
        cmp     $0x2badb002, %ebp
        jne     2f
        mov     (%ebx), %eax            # info flags
        and     $0x45, %eax
        cmp     $0x45, %eax
        je      1f
2:      or      $1, %edi
        jmp     report                  # nothing else can be trusted
1:
        # -- memory sizes
        cmpl    $639, 4(%ebx)
        jne     2f
        cmpl    $1024, 8(%ebx)
        jae     3f
2:      or      $2, %edi
3:
        # -- memory map: entries of (size, base64, len64, type)
        mov     48(%ebx), %esi          # mmap_addr
        mov     44(%ebx), %ecx
        add     %esi, %ecx              # end
        xor     %edx, %edx              # bit 0: RAM at 0, bit 1: RAM at 1 MiB
4:      cmp     %ecx, %esi
        jae     6f
        cmpl    $1, 20(%esi)            # type available
        jne     5f
        cmpl    $0, 8(%esi)             # base high
        jne     5f
        cmpl    $0, 4(%esi)
        jne     41f
        or      $1, %edx
        jmp     5f
41:     cmpl    $0x100000, 4(%esi)
        jne     5f
        mov     8(%ebx), %eax           # mem_upper KiB
        shl     $10, %eax
        cmp     12(%esi), %eax          # length low
        jne     5f
        or      $2, %edx
5:      add     (%esi), %esi
        add     $4, %esi
        jmp     4b
6:      cmp     $3, %edx
        je      7f
        or      $4, %edi
7:
        # -- command line
        lea     m_cmdline, %esi
        call    puts32
        mov     16(%ebx), %esi
        call    puts32
        lea     m_nl, %esi
        call    puts32
        mov     16(%ebx), %esi
        lea     token, %edx
        call    strstr32
        test    %eax, %eax
        jnz     1f
        or      $8, %edi
1:
        # -- the first module
        testl   $8, (%ebx)              # flags: modules
        jz      9f
        cmpl    $0, 20(%ebx)            # mods_count
        je      9f
        mov     24(%ebx), %eax
        mov     (%eax), %esi            # mod_start
        mov     4(%eax), %ecx           # mod_end
        mov     %ecx, %eax
        sub     %esi, %eax
        cmp     $13, %eax
        jb      9f
        push    %esi
        lea     modmagic, %edx
        mov     $13, %eax
2:      movb    (%edx), %ah
        cmpb    %ah, (%esi)
        jne     8f
        inc     %esi
        inc     %edx
        dec     %al
        jnz     2b
        pop     %esi
        xor     %edx, %edx              # byte sum
3:      cmp     %ecx, %esi
        jae     4f
        movzbl  (%esi), %eax
        add     %eax, %edx
        inc     %esi
        jmp     3b
4:      lea     m_module, %esi
        call    puts32
        mov     %edx, %eax
        call    puthex32
        lea     m_nl, %esi
        call    puts32
        jmp     10f
8:      pop     %esi
9:      or      $16, %edi
10:
        # -- fw_cfg: key 0 (signature), key 5 (CPU count)
        mov     $FW_CFG, %dx
        xor     %eax, %eax
        outw    %ax, %dx
        inc     %dx
        xor     %ecx, %ecx
        mov     $4, %esi
1:      inb     %dx, %al
        shl     $8, %ecx
        mov     %al, %cl
        dec     %esi
        jnz     1b
        cmp     $0x51454d55, %ecx       # "QEMU", first byte highest
        jne     2f
        dec     %dx
        mov     $5, %eax
        outw    %ax, %dx
        inc     %dx
        inb     %dx, %al
        movzbl  %al, %ecx
        inb     %dx, %al
        movzbl  %al, %eax
        shl     $8, %eax
        or      %eax, %ecx
        lea     m_cpus, %esi
        call    puts32
        mov     %ecx, %eax
        call    puthex32
        lea     m_nl, %esi
        call    puts32
        test    %ecx, %ecx
        jnz     3f
2:      or      $32, %edi
3:
        # -- pc-testdev scratch
        mov     $TESTDEV, %dx
        mov     $0xa5c3e1f0, %eax
        outl    %eax, %dx
        xor     %eax, %eax
        inl     %dx, %eax
        cmp     $0xa5c3e1f0, %eax
        je      1f
        or      $32, %edi
1:
        # -- the local APIC off and on through IA32_APIC_BASE
        mov     $0x1b, %ecx
        rdmsr
        mov     %eax, %esi
        and     $~0x800, %eax
        wrmsr
        mov     0xfee00030, %eax
        cmp     $0xffffffff, %eax
        jne     2f
        mov     %esi, %eax
        wrmsr
        mov     0xfee00030, %eax
        and     $0xff, %eax
        cmp     $0x14, %eax
        je      report
2:      or      $64, %edi
report:
        lea     m_failed, %esi
        call    puts32
        mov     %edi, %eax
        call    puthex32
        lea     m_nl, %esi
        call    puts32
        mov     %edi, %eax
        mov     $DEBUG_EXIT, %dx
        outl    %eax, %dx
1:      cli
        hlt
        jmp     1b

# puts32: prints the NUL-terminated string at ESI on COM1. Clobbers EAX, ESI.
puts32:
        push    %edx
        mov     $COM1, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        outb    %al, %dx
        jmp     1b
2:      pop     %edx
        ret

# puthex32: prints EAX as 8 hex digits. Clobbers EAX.
puthex32:
        push    %ecx
        push    %edx
        push    %ebx
        mov     %eax, %ebx
        mov     $8, %ecx
        mov     $COM1, %dx
1:      rol     $4, %ebx
        mov     %ebx, %eax
        and     $0xf, %eax
        movb    hexdigits(%eax), %al
        outb    %al, %dx
        loop    1b
        pop     %ebx
        pop     %edx
        pop     %ecx
        ret

# strstr32: EAX != 0 if the string at EDX occurs in the string at ESI.
strstr32:
        push    %esi
        push    %ecx
1:      cmpb    $0, (%esi)
        je      4f
        xor     %ecx, %ecx
2:      movb    (%edx,%ecx), %al
        test    %al, %al
        jz      3f
        cmpb    %al, (%esi,%ecx)
        jne     5f
        inc     %ecx
        jmp     2b
5:      inc     %esi
        jmp     1b
3:      mov     $1, %eax
        jmp     6f
4:      xor     %eax, %eax
6:      pop     %ecx
        pop     %esi
        ret

hexdigits: .ascii "0123456789abcdef"
token:     .asciz "mbcheck=kvmsim"
modmagic:  .ascii "KVMSIM-MODULE"
m_start:   .asciz "multiboot: entered in 32-bit protected mode\n"
m_cmdline: .asciz "multiboot: command line: "
m_module:  .asciz "multiboot: module sum "
m_cpus:    .asciz "multiboot: fw_cfg CPUs "
m_failed:  .asciz "multiboot: failed checks "
m_nl:      .asciz "\n"
