//! Signals: dispositions, the Linux x86-64 signal frame (`rt_sigframe`:
//! return address, `ucontext`, `siginfo`, then the XSAVE area), and the
//! frame's reading back at `rt_sigreturn`.
//!
//! The layouts are Linux's user ABI (arch/x86/include/uapi/asm/sigcontext.h,
//! include/uapi/asm-generic/siginfo.h): a handler that reads
//! `uc->uc_mcontext.gregs[REG_RIP]` or `info->si_addr` finds what it would
//! find under Linux, and glibc's `__restore_rt` (which calls rt_sigreturn
//! with RSP at the `ucontext`) brings the interrupted registers back.

use mem::UserContext;

pub const SIGILL: i32 = 4;
pub const SIGTRAP: i32 = 5;
pub const SIGABRT: i32 = 6;
pub const SIGBUS: i32 = 7;
pub const SIGFPE: i32 = 8;
pub const SIGKILL: i32 = 9;
pub const SIGSEGV: i32 = 11;
pub const SIGALRM: i32 = 14;
pub const SIGUSR1: i32 = 10;
pub const SIGPIPE: i32 = 13;
pub const SIGCHLD: i32 = 17;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;
pub const SIGURG: i32 = 23;
pub const SIGWINCH: i32 = 28;

/// sa_flags bits.
pub const SA_SIGINFO: u64 = 4;
pub const SA_RESTORER: u64 = 0x0400_0000;
pub const SA_ONSTACK: u64 = 0x0800_0000;
pub const SA_NODEFER: u64 = 0x4000_0000;
pub const SA_RESETHAND: u64 = 0x8000_0000;

/// si_code values.
pub const SI_USER: i32 = 0;
pub const SI_KERNEL: i32 = 0x80;
pub const SI_TKILL: i32 = -6;
pub const SEGV_MAPERR: i32 = 1;
pub const SEGV_ACCERR: i32 = 2;
pub const FPE_INTDIV: i32 = 1;
pub const FPE_FLTINV: i32 = 7;
pub const ILL_ILLOPN: i32 = 2;
pub const ILL_PRVOPC: i32 = 5;
pub const BUS_ADRERR: i32 = 2;
pub const TRAP_BRKPT: i32 = 1;

/// sigaltstack flags.
pub const SS_ONSTACK: u32 = 1;
pub const SS_DISABLE: u32 = 2;
/// The smallest alternate stack accepted (Linux's MINSIGSTKSZ).
pub const MINSIGSTKSZ: u64 = 2048;

/// Signals that can be neither caught nor blocked.
pub const UNBLOCKABLE: u64 = bit(SIGKILL) | bit(SIGSTOP);

/// The mask bit of `sig` (1..=64).
pub const fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

/// What a signal does with no handler (SIG_DFL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    /// Ends the process (with or without a core dump: no core here).
    Terminate,
    /// Nothing happens (SIGCHLD, SIGCONT, SIGURG, SIGWINCH; the stop
    /// signals too, since one process cannot be stopped and continued).
    Ignore,
}

pub fn default_action(sig: i32) -> DefaultAction {
    match sig {
        SIGCHLD | SIGCONT | SIGURG | SIGWINCH | 19..=22 => DefaultAction::Ignore,
        _ => DefaultAction::Terminate,
    }
}

/// A `struct sigaction` as the kernel takes it (rt_sigaction, 32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Action {
    /// SIG_DFL (0), SIG_IGN (1), or the handler's address.
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

pub const SIG_DFL: u64 = 0;
pub const SIG_IGN: u64 = 1;

impl Action {
    pub fn from_bytes(b: &[u8; 32]) -> Action {
        let w = |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap_or_default());
        Action {
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        }
    }

    pub fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .iter()
            .enumerate()
        {
            b[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// True if `sig` would be ignored under this action.
    pub fn ignores(&self, sig: i32) -> bool {
        self.handler == SIG_IGN
            || (self.handler == SIG_DFL && default_action(sig) == DefaultAction::Ignore)
    }
}

/// What `siginfo` says about a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub signo: i32,
    pub code: i32,
    /// si_addr for faults; (si_pid, si_uid) packed for kill (pid | uid << 32).
    pub field: u64,
}

impl Info {
    pub fn bytes(&self) -> [u8; 128] {
        let mut b = [0u8; 128];
        b[0..4].copy_from_slice(&self.signo.to_le_bytes());
        b[8..12].copy_from_slice(&self.code.to_le_bytes());
        b[16..24].copy_from_slice(&self.field.to_le_bytes());
        b
    }
}

/// The exception behind a synchronous signal (the sigcontext's err,
/// trapno and cr2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trap {
    pub err: u64,
    pub trapno: u64,
    pub cr2: u64,
}

/// Sizes and offsets of the frame.
pub const UCONTEXT_SIZE: u64 = 304;
pub const SIGINFO_SIZE: u64 = 128;
pub const FRAME_SIZE: u64 = 8 + UCONTEXT_SIZE + SIGINFO_SIZE;
const MCONTEXT: usize = 40;
const SIGMASK: usize = 296;
/// The red zone below RSP that a handler's frame must leave alone.
const RED_ZONE: u64 = 128;
/// Linux's FP_XSTATE_MAGIC1/2 (fpstate's software bytes).
const MAGIC1: u32 = 0x4650_5853;
const MAGIC2: u32 = 0x4650_5845;
/// ucontext flags: the FP state is an XSAVE area; the SS is saved.
const UC_FP_XSTATE: u64 = 1;
const UC_SIGCONTEXT_SS: u64 = 2;

/// sigcontext's general registers in order, as indices into
/// [`UserContext::gprs`] (r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp).
const SC_ORDER: [usize; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 5, 4, 6, 1, 3, 0, 2, 7];

/// RFLAGS bits a frame may change at sigreturn (Linux's FIX_EFLAGS: AC,
/// OF, DF, TF, SF, ZF, AF, PF, CF, RF).
pub const FIX_EFLAGS: u64 =
    0x4_0000 | 0x800 | 0x400 | 0x100 | 0x80 | 0x40 | 0x10 | 0x4 | 0x1 | 0x1_0000;

/// The user selectors a frame records (kvmsim's GDT: kvm's boot module).
pub const USER_CS: u64 = 0x33;
pub const USER_DS: u64 = 0x2b;

/// A frame ready to be written: its bytes go at `base`, and the handler
/// starts with `regs`.
#[derive(Debug, Clone)]
pub struct Frame {
    pub base: u64,
    pub bytes: Vec<u8>,
    pub regs: UserContext,
}

/// Where the frame goes: the current stack below the red zone, or the top
/// of the alternate stack (`Some((sp, size))`).
#[allow(clippy::too_many_arguments)]
pub fn build_frame(
    uc: &UserContext,
    fpu: Option<&[u8]>,
    info: &Info,
    act: &Action,
    old_mask: u64,
    altstack: Option<(u64, u64)>,
    stack_flags: u32,
    trap: Trap,
) -> Frame {
    let rsp = uc.gprs[UserContext::RSP];
    let top = match altstack {
        Some((sp, size)) => sp.wrapping_add(size),
        None => rsp.wrapping_sub(RED_ZONE),
    };
    let fp_len = fpu.map_or(0, |f| f.len() as u64 + 4);
    let fp_at = top.wrapping_sub(fp_len) & !63;
    let sp = (fp_at.wrapping_sub(FRAME_SIZE) & !15).wrapping_sub(8);
    let end = if fpu.is_some() {
        fp_at.wrapping_add(fp_len)
    } else {
        sp.wrapping_add(FRAME_SIZE)
    };
    let mut bytes = vec![0u8; end.wrapping_sub(sp) as usize];
    let put =
        |b: &mut Vec<u8>, off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut bytes, 0, act.restorer);
    let u = 8;
    put(
        &mut bytes,
        u,
        if fpu.is_some() {
            UC_FP_XSTATE | UC_SIGCONTEXT_SS
        } else {
            UC_SIGCONTEXT_SS
        },
    );
    // uc_stack: the alternate stack as sigaltstack would report it.
    let (ss_sp, ss_size) = altstack.unwrap_or((0, 0));
    put(&mut bytes, u + 16, ss_sp);
    bytes[u + 24..u + 28].copy_from_slice(&stack_flags.to_le_bytes());
    put(&mut bytes, u + 32, ss_size);
    let m = u + MCONTEXT;
    for (i, &g) in SC_ORDER.iter().enumerate() {
        put(&mut bytes, m + 8 * i, uc.gprs[g]);
    }
    put(&mut bytes, m + 128, uc.rip);
    put(&mut bytes, m + 136, uc.rflags);
    // cs, gs, fs, ss (16 bits each).
    put(&mut bytes, m + 144, USER_CS | (USER_DS << 48));
    put(&mut bytes, m + 152, trap.err);
    put(&mut bytes, m + 160, trap.trapno);
    put(&mut bytes, m + 168, old_mask);
    put(&mut bytes, m + 176, trap.cr2);
    put(&mut bytes, m + 184, if fpu.is_some() { fp_at } else { 0 });
    put(&mut bytes, u + SIGMASK, old_mask);
    let i = (8 + UCONTEXT_SIZE) as usize;
    bytes[i..i + 128].copy_from_slice(&info.bytes());
    if let Some(f) = fpu {
        let o = fp_at.wrapping_sub(sp) as usize;
        bytes[o..o + f.len()].copy_from_slice(f);
        // The software-reserved bytes of the legacy area (fx_sw_bytes).
        if f.len() >= 576 {
            let xfeatures = u64::from_le_bytes(f[512..520].try_into().unwrap_or_default());
            let sw = o + 464;
            bytes[sw..sw + 4].copy_from_slice(&MAGIC1.to_le_bytes());
            bytes[sw + 4..sw + 8].copy_from_slice(&(f.len() as u32 + 4).to_le_bytes());
            bytes[sw + 8..sw + 16].copy_from_slice(&xfeatures.to_le_bytes());
            bytes[sw + 16..sw + 20].copy_from_slice(&(f.len() as u32).to_le_bytes());
        }
        let m2 = o + f.len();
        bytes[m2..m2 + 4].copy_from_slice(&MAGIC2.to_le_bytes());
    }
    let mut regs = *uc;
    regs.gprs[UserContext::RDI] = info.signo as u64;
    regs.gprs[UserContext::RSI] = sp.wrapping_add(8 + UCONTEXT_SIZE);
    regs.gprs[UserContext::RDX] = sp.wrapping_add(8);
    regs.gprs[UserContext::RAX] = 0;
    regs.gprs[UserContext::RSP] = sp;
    regs.rip = act.handler;
    // DF, TF and RF cleared, as Linux enters a handler.
    regs.rflags = (uc.rflags & !(0x400 | 0x100 | 0x1_0000)) | 0x2;
    Frame {
        base: sp,
        bytes,
        regs,
    }
}

/// What rt_sigreturn reads back from a `ucontext`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The general registers, RIP and the RFLAGS bits the frame may set
    /// (merged into `current`'s others).
    pub regs: UserContext,
    pub mask: u64,
    /// The XSAVE area's address (0: none).
    pub fpstate: u64,
}

/// Reads the `ucontext` bytes `uc` (304 of them) back over `current`
/// (the program's context at the rt_sigreturn call, with its own RFLAGS).
pub fn restore(uc: &[u8; UCONTEXT_SIZE as usize], current: &UserContext) -> Restored {
    let w = |off: usize| u64::from_le_bytes(uc[off..off + 8].try_into().unwrap_or_default());
    let m = MCONTEXT;
    let mut regs = *current;
    for (i, &g) in SC_ORDER.iter().enumerate() {
        regs.gprs[g] = w(m + 8 * i);
    }
    regs.rip = w(m + 128);
    // User mode always runs with interrupts enabled (IF).
    regs.rflags = (current.rflags & !FIX_EFLAGS) | (w(m + 136) & FIX_EFLAGS) | 0x202;
    Restored {
        regs,
        mask: w(SIGMASK) & !UNBLOCKABLE,
        fpstate: w(m + 184),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_holds_what_sigreturn_reads_back() {
        let mut uc = UserContext::default();
        for (i, g) in uc.gprs.iter_mut().enumerate() {
            *g = 0x1000 + i as u64;
        }
        uc.gprs[UserContext::RSP] = 0x7fff_0000_1234;
        uc.rip = 0x40_1000;
        uc.rflags = 0x246 | 0x400;
        let act = Action {
            handler: 0x40_2000,
            flags: SA_SIGINFO | SA_RESTORER,
            restorer: 0x40_3000,
            mask: 0,
        };
        let info = Info {
            signo: SIGSEGV,
            code: SEGV_MAPERR,
            field: 0x1234,
        };
        let fpu = vec![0xabu8; 1024];
        let trap = Trap {
            err: 4,
            trapno: 14,
            cr2: 0x1234,
        };
        let f = build_frame(&uc, Some(&fpu), &info, &act, 0x55, None, SS_DISABLE, trap);
        let sp = f.base;
        // The return address is the restorer, at RSP % 16 == 8 (as after a call).
        assert_eq!(sp % 16, 8);
        assert!(
            sp + f.bytes.len() as u64 <= 0x7fff_0000_1234 - 128,
            "red zone"
        );
        let w =
            |at: u64| u64::from_le_bytes(f.bytes[(at - sp) as usize..][..8].try_into().unwrap());
        assert_eq!(w(sp), 0x40_3000);
        assert_eq!(f.regs.rip, 0x40_2000);
        assert_eq!(f.regs.gprs[UserContext::RDI], 11);
        let info_at = f.regs.gprs[UserContext::RSI];
        assert_eq!(w(info_at + 16), 0x1234, "si_addr");
        let uc_at = f.regs.gprs[UserContext::RDX];
        // gregs[REG_RIP] (16), REG_ERR (19), REG_TRAPNO (20), REG_CR2 (22).
        let greg = |n: u64| w(uc_at + 40 + 8 * n);
        assert_eq!(greg(16), 0x40_1000);
        assert_eq!(greg(19), 4);
        assert_eq!(greg(20), 14);
        assert_eq!(greg(22), 0x1234);
        assert_eq!(greg(13), 0x1000, "REG_RAX");
        let fp = greg(23);
        assert_eq!(fp % 64, 0);
        assert_eq!(f.bytes[(fp - sp) as usize], 0xab);
        assert_eq!(f.regs.rflags & 0x400, 0, "DF cleared in the handler");
        // Back: the restorer's rt_sigreturn runs with RSP at the ucontext.
        let ucb: [u8; 304] = f.bytes[(uc_at - sp) as usize..][..304].try_into().unwrap();
        let mut now = f.regs;
        now.rflags = 0x202;
        let r = restore(&ucb, &now);
        assert_eq!(r.regs.gprs, uc.gprs);
        assert_eq!(r.regs.rip, uc.rip);
        assert_eq!(r.regs.rflags, 0x246 | 0x400);
        assert_eq!(r.mask, 0x55);
        assert_eq!(r.fpstate, fp);
        // An alternate stack: the frame is at its top.
        let f = build_frame(
            &uc,
            None,
            &info,
            &act,
            0,
            Some((0x50_0000, 0x4000)),
            SS_ONSTACK,
            trap,
        );
        assert!(f.base > 0x50_0000 && f.base + f.bytes.len() as u64 <= 0x50_4000);
        // A hostile stack pointer (near 0, near the top): a frame of the
        // usual size, wrapped, that the write then refuses; no panic.
        for rsp in [0u64, 8, u64::MAX, u64::MAX - 200] {
            let mut bad = uc;
            bad.gprs[UserContext::RSP] = rsp;
            let f = build_frame(&bad, Some(&fpu), &info, &act, 0, None, 0, trap);
            assert!(f.bytes.len() < 8192);
            let f = build_frame(&bad, None, &info, &act, 0, Some((rsp, u64::MAX)), 0, trap);
            assert!(f.bytes.len() < 8192);
        }
    }

    #[test]
    fn a_frame_cannot_set_privileged_flags() {
        let mut uc = [0u8; 304];
        uc[40 + 136..40 + 144].copy_from_slice(&(u64::MAX).to_le_bytes());
        uc[296..304].copy_from_slice(&u64::MAX.to_le_bytes());
        let cur = UserContext {
            rflags: 0x2,
            ..Default::default()
        };
        let r = restore(&uc, &cur);
        // IF stays, IOPL and VM cannot be set.
        assert_eq!(r.regs.rflags & 0x200, 0x200);
        assert_eq!(r.regs.rflags & (0x3000 | 0x2_0000), 0);
        assert_eq!(r.mask & UNBLOCKABLE, 0);
    }
}
