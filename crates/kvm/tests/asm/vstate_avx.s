# Test snippet for crates/kvm/tests/vcpu_state.rs, run at CPL3 from 0x100000.
# Sets known values in the GPRs and vector registers, reads MMIO (the
# checkpoint is taken there), then stores them at 0x300000 and reads MMIO
# again. Rebuild the .bin with ./build.sh after a change.
.intel_syntax noprefix
.text
.globl _start
_start:
  movabs rbx, 0x1032547698badcfe
  movabs rcx, 0x23016745ab89efcd
  movabs rdx, 0x32107654ba98fedc
  movabs rsi, 0x45670123cdef89ab
  movabs rdi, 0x54761032dcfe98ba
  movabs rbp, 0x67452301efcdab89
  movabs r8, 0x76543210fedcba98
  movabs r9, 0x89abcdef01234567
  movabs r10, 0x98badcfe10325476
  movabs r11, 0xab89efcd23016745
  movabs r12, 0xba98fedc32107654
  movabs r13, 0xcdef89ab45670123
  movabs r14, 0xdcfe98ba54761032
  movabs r15, 0xefcdab8967452301
  mov eax, 0x200000
  vmovdqu ymm0, [rax+0]
  vmovdqu ymm1, [rax+32]
  vmovdqu ymm2, [rax+64]
  vmovdqu ymm3, [rax+96]
  vmovdqu ymm4, [rax+128]
  vmovdqu ymm5, [rax+160]
  vmovdqu ymm6, [rax+192]
  vmovdqu ymm7, [rax+224]
  vmovdqu ymm8, [rax+256]
  vmovdqu ymm9, [rax+288]
  vmovdqu ymm10, [rax+320]
  vmovdqu ymm11, [rax+352]
  vmovdqu ymm12, [rax+384]
  vmovdqu ymm13, [rax+416]
  vmovdqu ymm14, [rax+448]
  vmovdqu ymm15, [rax+480]
  movabs rax, [0xd0000000]
resume:
  movabs [0x300000], rax
  mov eax, 0x300008
  mov [rax+0], rbx
  mov [rax+8], rcx
  mov [rax+16], rdx
  mov [rax+24], rsi
  mov [rax+32], rdi
  mov [rax+40], rbp
  mov [rax+48], r8
  mov [rax+56], r9
  mov [rax+64], r10
  mov [rax+72], r11
  mov [rax+80], r12
  mov [rax+88], r13
  mov [rax+96], r14
  mov [rax+104], r15
  vmovdqu [rax+256], ymm0
  vmovdqu [rax+288], ymm1
  vmovdqu [rax+320], ymm2
  vmovdqu [rax+352], ymm3
  vmovdqu [rax+384], ymm4
  vmovdqu [rax+416], ymm5
  vmovdqu [rax+448], ymm6
  vmovdqu [rax+480], ymm7
  vmovdqu [rax+512], ymm8
  vmovdqu [rax+544], ymm9
  vmovdqu [rax+576], ymm10
  vmovdqu [rax+608], ymm11
  vmovdqu [rax+640], ymm12
  vmovdqu [rax+672], ymm13
  vmovdqu [rax+704], ymm14
  vmovdqu [rax+736], ymm15
  movabs rax, [0xd0000000]
  jmp resume
