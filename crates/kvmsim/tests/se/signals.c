/* Signal delivery in SE mode, compared with a native run of the same
 * binary (crates/kvmsim/tests/se.rs). Each mode prints only what Linux
 * guarantees, never a time or an address that differs from run to run. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

static sigjmp_buf env;
static volatile sig_atomic_t alarms, usr1;
static void *volatile fault_addr;
static volatile uintptr_t fault_rip;
static volatile int fault_code;

static void on_fault(int sig, siginfo_t *si, void *ucv)
{
    ucontext_t *uc = ucv;
    sigset_t now;
    sigprocmask(SIG_SETMASK, NULL, &now);
    fault_addr = si->si_addr;
    fault_code = si->si_code;
    fault_rip = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
    printf("handler sig=%d signo=%d blocked=%d\n", sig, si->si_signo,
           sigismember(&now, sig));
    siglongjmp(env, 1);
}

static void on_alarm(int sig)
{
    (void)sig;
    alarms++;
}

/* Clobbers the vector registers, as a real handler's library calls may. */
static void on_tick(int sig)
{
    volatile double h = 1.0 + sig;
    for (int i = 0; i < 100; i++)
        h = h * 1.000001 + sqrt(h);
    alarms++;
}

static char *alt_lo, *alt_hi;
static volatile int on_alt;

static void on_usr1(int sig)
{
    char here;
    (void)sig;
    on_alt = &here > alt_lo && &here < alt_hi;
    usr1++;
}

static void handle(int sig, void (*fn)(int), int flags)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = flags;
    sigaction(sig, &sa, NULL);
}

static void faults(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    sigaction(SIGFPE, &sa, NULL);
    sigaction(SIGILL, &sa, NULL);

    if (!sigsetjmp(env, 1))
        *(volatile int *)0x1234 = 1;
    printf("segv addr=%p code=%d (SEGV_MAPERR=%d)\n", fault_addr, fault_code,
           SEGV_MAPERR);

    char *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    page[0] = 1;
    mprotect(page, 4096, PROT_READ);
    if (!sigsetjmp(env, 1))
        page[8] = 2;
    printf("readonly same_addr=%d code=%d (SEGV_ACCERR=%d) value=%d\n",
           fault_addr == page + 8, fault_code, SEGV_ACCERR, page[8]);

    volatile int zero = 0, x = 7;
    if (!sigsetjmp(env, 1))
        x = x / zero;
    printf("fpe code=%d (FPE_INTDIV=%d) addr_is_rip=%d\n", fault_code,
           FPE_INTDIV, (uintptr_t)fault_addr == fault_rip);

    if (!sigsetjmp(env, 1))
        __asm__ volatile("ud2");
    printf("ill code=%d (ILL_ILLOPN=%d) addr_is_rip=%d\n", fault_code,
           ILL_ILLOPN, (uintptr_t)fault_addr == fault_rip);

    sigset_t now;
    sigprocmask(SIG_SETMASK, NULL, &now);
    printf("after siglongjmp: SIGSEGV blocked=%d\n", sigismember(&now, SIGSEGV));
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IONBF, 0);
    if (!strcmp(mode, "faults")) {
        faults();
    } else if (!strcmp(mode, "alarm")) {
        /* SIGALRM from alarm() in a pause(): 2 s of simulated time. */
        handle(SIGALRM, on_alarm, 0);
        unsigned left = alarm(2);
        int r = pause();
        printf("alarm left=%u pause=%d errno=%s alarms=%d\n", left, r,
               r < 0 && errno == EINTR ? "EINTR" : "?", (int)alarms);
    } else if (!strcmp(mode, "sleep")) {
        /* The alarm cuts a 5 s nanosleep short after 1 s. */
        handle(SIGALRM, on_alarm, 0);
        alarm(1);
        struct timespec t = {5, 0}, rem = {0, 0};
        int r = nanosleep(&t, &rem);
        printf("nanosleep=%d errno=%s rem_ok=%d alarms=%d\n", r,
               r < 0 && errno == EINTR ? "EINTR" : "?",
               rem.tv_sec >= 3 && rem.tv_sec <= 4, (int)alarms);
    } else if (!strcmp(mode, "timer")) {
        /* A periodic ITIMER_REAL interrupts a computation that makes no
         * system call; each round must give the same result (the handler's
         * return restores the registers, vector ones included). */
        handle(SIGALRM, on_tick, SA_RESTART);
        struct itimerval it = {{0, 2000}, {0, 2000}};
        setitimer(ITIMER_REAL, &it, NULL);
        double first = 0;
        int bad = 0, rounds = 0;
        while (alarms < 5 && rounds < 100000) {
            double acc = 0;
            for (int i = 1; i < 200000; i++)
                acc += sqrt((double)i) * 0.25 + (double)(i % 7);
            if (rounds == 0)
                first = acc;
            else if (acc != first)
                bad++;
            rounds++;
        }
        struct itimerval off = {{0, 0}, {0, 0}};
        setitimer(ITIMER_REAL, &off, NULL);
        printf("timer alarms>=5: %d, rounds equal: %d, result %.3f\n",
               alarms >= 5, bad == 0, first);
    } else if (!strcmp(mode, "altstack")) {
        /* raise() with the signal blocked, then unblocked: the handler runs
         * on the alternate stack when the mask allows it. */
        static char stack[64 * 1024];
        alt_lo = stack;
        alt_hi = stack + sizeof stack;
        stack_t ss = {.ss_sp = stack, .ss_size = sizeof stack, .ss_flags = 0};
        sigaltstack(&ss, NULL);
        handle(SIGUSR1, on_usr1, SA_ONSTACK);
        sigset_t set, pend;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR1);
        sigprocmask(SIG_BLOCK, &set, NULL);
        raise(SIGUSR1);
        sigpending(&pend);
        printf("blocked: delivered=%d pending=%d\n", (int)usr1,
               sigismember(&pend, SIGUSR1));
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        printf("unblocked: delivered=%d on_altstack=%d\n", (int)usr1, on_alt);
        signal(SIGUSR1, SIG_IGN);
        raise(SIGUSR1);
        printf("ignored: delivered=%d\n", (int)usr1);
    } else if (!strcmp(mode, "alarm-default")) {
        printf("waiting\n");
        alarm(1);
        pause();
        printf("not reached\n");
    } else if (!strcmp(mode, "fork")) {
        pid_t p = fork();
        if (p == 0)
            _exit(0);
        printf("fork=%d errno=%s\n", (int)p,
               p < 0 && errno == EAGAIN ? "EAGAIN" : "?");
    } else if (!strcmp(mode, "abort")) {
        printf("aborting\n");
        abort();
    } else {
        fprintf(stderr, "usage: signals MODE\n");
        return 2;
    }
    return 0;
}
