# netpong (platform "pc", an Ethernet [[link]]): two systems bounce frames
# over their first virtio-net NIC (virtio-mmio at 0xd0000000, no disks).
# RDI = role: 0 initiator, 1 responder, 2 blaster, 3 sink. RSI = round
# trips, or frames to send (blaster) or receive (sink) (default 10).
# RDX = frame length (60 to 1514, default 60).
# A minimal polling driver: modern virtio-mmio set-up (VERSION_1 and MAC),
# receive queue 0 with 8 buffers of 2 KiB, transmit queue 1 with one
# buffer. Waiting polls the interrupt status register (each read is a
# device access, so simulated time moves on) and the used rings in RAM.
# Frames are broadcast, EtherType 0x88b5 (local experimental), the round
# number in the first 8 payload bytes. The initiator sends round i and
# expects i back, summing the round-trip times (interval timer NOW_NS);
# the responder answers each frame with its own, summing its processing
# time. The blaster sends its frames back to back (each as soon as the
# NIC gave the previous buffer back) and waits for nothing; the sink
# takes frames of any round, sums their round numbers and asks for a
# stats dump (sim-op 0x41). Each prints
# its sums and MAC; a failure ends the run with sim-ops
# fail(0, code): 2 no virtio-net device, 3 features refused, 4 wrong
# frame received.
        .code64
        .include "macros.s"
        .set    NIC, 0xd0000000
        .set    RXQ, 0x300000           # desc, avail +0x1000, used +0x2000
        .set    TXQ, 0x304000
        .set    RXBUF, 0x310000         # 8 x 0x800
        .set    TXBUF, 0x320000
        .set    QSIZE, 8
        .set    HDR, 12

# NIC_WR off, value: 32-bit write to the NIC's register. Clobbers RAX.
        .macro  NIC_WR off, value
        mov     $(NIC + \off), %eax
        movl    $\value, (%rax)
        .endm
# NIC_RD off: EAX = the NIC's 32-bit register.
        .macro  NIC_RD off
        mov     $(NIC + \off), %eax
        movl    (%rax), %eax
        .endm

        .text
        .globl  _start
_start:
        mov     %rdi, %r12              # role
        mov     %rsi, %r13              # rounds
        DEFAULT %r13, 10
        mov     %rdx, %rbp              # frame length
        DEFAULT %rbp, 60
        NIC_RD  0x000
        cmp     $0x74726976, %eax
        jne     no_nic
        NIC_RD  0x008
        cmp     $1, %eax
        jne     no_nic
        NIC_WR  0x070, 0                # reset
        NIC_WR  0x070, 1                # ACKNOWLEDGE
        NIC_WR  0x070, 3                # DRIVER
        NIC_WR  0x024, 1
        NIC_WR  0x020, 1                # VERSION_1 (bit 32)
        NIC_WR  0x024, 0
        NIC_WR  0x020, 0x20             # MAC
        NIC_WR  0x070, 0xb              # FEATURES_OK
        NIC_RD  0x070
        test    $8, %eax
        jz      refused
        # Queue 0 (receive) and 1 (transmit).
        NIC_WR  0x030, 0
        NIC_WR  0x038, QSIZE
        NIC_WR  0x080, RXQ
        NIC_WR  0x090, RXQ + 0x1000
        NIC_WR  0x0a0, RXQ + 0x2000
        NIC_WR  0x044, 1
        NIC_WR  0x030, 1
        NIC_WR  0x038, QSIZE
        NIC_WR  0x080, TXQ
        NIC_WR  0x090, TXQ + 0x1000
        NIC_WR  0x0a0, TXQ + 0x2000
        NIC_WR  0x044, 1
        NIC_WR  0x070, 0xf              # DRIVER_OK
        # Our MAC, from the configuration space.
        mov     $(NIC + 0x100), %eax
        movl    (%rax), %ecx
        movl    %ecx, my_mac(%rip)
        movw    4(%rax), %cx
        movw    %cx, my_mac+4(%rip)
        # Eight receive buffers, device-writable.
        xor     %ecx, %ecx
1:      mov     %rcx, %rax
        shl     $4, %rax
        mov     %rcx, %rdx
        shl     $11, %rdx
        add     $RXBUF, %rdx
        mov     %rdx, RXQ(%rax)         # addr
        movl    $0x800, RXQ+8(%rax)     # len
        movw    $2, RXQ+12(%rax)        # WRITE
        movw    $0, RXQ+14(%rax)
        movw    %cx, RXQ+0x1000+4(,%rcx,2)
        inc     %ecx
        cmp     $QSIZE, %ecx
        jb      1b
        movw    $QSIZE, RXQ+0x1000+2
        mov     $QSIZE, %r10d           # receive buffers made available
        xor     %r11d, %r11d            # receive used entries seen
        xor     %r9d, %r9d              # transmit buffers sent
        mfence
        NIC_WR  0x050, 0
        # The transmit buffer's only descriptor: header and frame.
        movq    $TXBUF, TXQ
        lea     HDR(%rbp), %eax
        movl    %eax, TXQ+8
        movw    $0, TXQ+12
        xor     %r14d, %r14d            # round
        xor     %r15d, %r15d            # time sum
        cmp     $2, %r12
        je      blaster
        cmp     $3, %r12
        je      sink
        test    %r12, %r12
        jnz     responder

initiator:
        MMIO_RD TIMER_NOW
        mov     %rax, %rbx
        call    send
        call    receive
        MMIO_RD TIMER_NOW
        sub     %rbx, %rax
        add     %rax, %r15
        inc     %r14
        cmp     %r13, %r14
        jb      initiator
        lea     m_init(%rip), %rsi
        call    puts
        call    report
        lea     m_rtt(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    putdec
        jmp     finish

responder:
        call    receive
        MMIO_RD TIMER_NOW
        mov     %rax, %rbx
        call    send
        MMIO_RD TIMER_NOW
        sub     %rbx, %rax
        add     %rax, %r15
        inc     %r14
        cmp     %r13, %r14
        jb      responder
        lea     m_resp(%rip), %rsi
        call    puts
        call    report
        lea     m_proc(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    putdec
        jmp     finish

blaster:
        call    send
        inc     %r14
        cmp     %r13, %r14
        jb      blaster
        lea     m_blast(%rip), %rsi
        call    puts
        call    report
        jmp     finish

sink:
        call    receive
        inc     %r14
        cmp     %r13, %r14
        jb      sink
        lea     m_sink(%rip), %rsi
        call    puts
        call    report
        lea     m_sum(%rip), %rsi
        call    puts
        mov     %r15, %rax
        call    putdec
        xor     %edi, %edi
        xor     %esi, %esi
        SIMOP   0x41                    # dump_stats(0, 0)

finish:
        lea     m_mac(%rip), %rsi
        call    puts
        movzbl  my_mac+4(%rip), %eax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        xor     %edi, %edi
        SIMOP   0x21
2:      hlt
        jmp     2b

report:
        mov     %r13, %rax
        call    putdec
        lea     m_len(%rip), %rsi
        call    puts
        mov     %rbp, %rax
        call    putdec
        ret

# send: frame of RBP bytes with round R14 from the transmit buffer, then
# waits until the device gave the buffer back.
send:
        mov     $TXBUF, %edi
        xor     %eax, %eax
        lea     HDR(%rbp), %rcx
        rep stosb                       # header and frame zeroed
        movl    $0xffffffff, TXBUF+HDR
        movw    $0xffff, TXBUF+HDR+4    # broadcast
        movl    my_mac(%rip), %eax
        movl    %eax, TXBUF+HDR+6
        movw    my_mac+4(%rip), %ax
        movw    %ax, TXBUF+HDR+10
        movw    $0xb588, TXBUF+HDR+12   # EtherType 0x88b5
        mov     %r14, TXBUF+HDR+14
        mov     %r9d, %eax
        and     $(QSIZE - 1), %eax
        movw    $0, TXQ+0x1000+4(,%rax,2)
        inc     %r9d
        movw    %r9w, TXQ+0x1000+2
        mfence
        NIC_WR  0x050, 1
1:      call    poll
        movzwl  TXQ+0x2000+2, %eax
        cmp     %r9w, %ax
        jne     1b
        ret

# receive: waits for a frame, checks its round is R14 (the sink adds it
# to R15 instead), gives the buffer back.
receive:
1:      movzwl  RXQ+0x2000+2, %eax
        cmp     %r11w, %ax
        jne     2f
        call    poll
        jmp     1b
2:      mov     %r11d, %eax
        and     $(QSIZE - 1), %eax
        movl    RXQ+0x2000+4(,%rax,8), %ecx     # id
        movl    RXQ+0x2000+8(,%rax,8), %edx     # len
        lea     HDR(%rbp), %rsi
        cmp     %rsi, %rdx
        jne     wrong
        mov     %rcx, %rsi
        shl     $11, %rsi
        add     $RXBUF, %rsi
        cmpw    $0xb588, HDR+12(%rsi)
        jne     wrong
        cmp     $3, %r12
        jne     4f
        add     HDR+14(%rsi), %r15
        jmp     5f
4:      cmp     %r14, HDR+14(%rsi)
        jne     wrong
5:
        inc     %r11d
        mov     %r10d, %eax
        and     $(QSIZE - 1), %eax
        movw    %cx, RXQ+0x1000+4(,%rax,2)
        inc     %r10d
        movw    %r10w, RXQ+0x1000+2
        mfence
        NIC_WR  0x050, 0
        ret

# poll: one device access (simulated time moves on), acknowledging what
# the interrupt status shows. Clobbers RAX, RDX.
poll:
        NIC_RD  0x060
        mov     %eax, %edx
        mov     $(NIC + 0x064), %eax
        movl    %edx, (%rax)
        ret

no_nic: mov     $2, %esi
        jmp     fail
refused:
        mov     $3, %esi
        jmp     fail
wrong:  mov     $4, %esi
fail:   push    %rsi
        lea     m_bad(%rip), %rsi
        call    puts
        pop     %rax
        push    %rax
        call    putdec
        lea     nl(%rip), %rsi
        call    puts
        pop     %rsi
        xor     %edi, %edi
        SIMOP   0x22
3:      hlt
        jmp     3b

        .include "lib.s"

my_mac: .skip   8
m_init: .asciz  "netpong: role=0 n="
m_resp: .asciz  "netpong: role=1 n="
m_blast: .asciz "netpong: role=2 n="
m_sink: .asciz  "netpong: role=3 n="
m_sum:  .asciz  " round_sum="
m_len:  .asciz  " len="
m_rtt:  .asciz  " rtt_sum_ns="
m_proc: .asciz  " proc_sum_ns="
m_mac:  .asciz  " mac4="
m_bad:  .asciz  "netpong: failed, code "
nl:     .asciz  "\n"
