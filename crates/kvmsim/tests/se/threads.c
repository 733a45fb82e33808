/* SE-mode threads test: 4 POSIX threads (clone on CPUs of their own)
 * share work through an atomic counter, a mutex and a condition variable,
 * and are joined with pthread_join (the clear-child-tid futex). Modes:
 *
 *   work     4 threads (all alive at once: a barrier) sum 1..N in
 *            slices, each adding into an atomic
 *            and, under a mutex, into a plain total; the main thread
 *            waits on a condition variable until all 4 reported, then
 *            joins them. Prints the totals and thread-id facts.
 *   toomany  tries to create 8 threads; prints how many it could
 *            (pthread_create's error for the rest).
 *   timeout  a timed wait on a condition variable nobody signals (a
 *            futex timeout in simulated time), then a thread that sleeps
 *            before signalling.
 *   deadlock 2 threads and the main thread each wait forever.
 *   memory   3 threads map, fill, protect, check and unmap memory at
 *            once (page tables change under running threads: TLB
 *            shootdowns; freed frames are not reused while another CPU
 *            may reach them); prints the checks that failed (none).
 *   alone    one thread: a futex wait with a 50 ms timeout (ETIMEDOUT,
 *            in simulated time), a wait on a changed word (EAGAIN).
 *   signals  pthread_kill to a thread waiting on a condition variable
 *            (its handler runs on that thread), a process-directed signal
 *            that the other thread blocks (taken by the main thread), and
 *            a thread in sigsuspend woken by pthread_kill.
 *   cpus     how many CPUs the C library says there are: sysconf
 *            (_SC_NPROCESSORS_ONLN, _CONF), get_nprocs, get_nprocs_conf
 *            (glibc reads /sys/devices/system/cpu/online and possible,
 *            musl asks sched_getaffinity).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if __has_include(<linux/futex.h>)
#include <linux/futex.h>
#else
/* musl-gcc's include path has no kernel headers. */
#define FUTEX_WAIT 0
#endif
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#define NT 4
#define N 4000000ULL

static atomic_ullong asum;
static unsigned long long total;
static int reported;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static pid_t tids[NT];
static __thread int mine = -1; /* TLS: each thread its own */
static pthread_barrier_t all_started;

static void *worker(void *arg) {
    long i = (long)arg;
    mine = (int)i;
    tids[i] = (pid_t)syscall(SYS_gettid);
    /* All 4 exist at once (each on a CPU of its own in SE mode). */
    pthread_barrier_wait(&all_started);
    unsigned long long lo = i * (N / NT) + 1, hi = (i + 1) * (N / NT), s = 0;
    for (unsigned long long v = lo; v <= hi; v++) {
        s += v;
        if ((v & 0xffff) == 0)
            atomic_fetch_add(&asum, 0); /* contended cache line */
    }
    for (int k = 0; k < 1000; k++) {
        atomic_fetch_add(&asum, 1);
        pthread_mutex_lock(&lock);
        total += 1;
        pthread_mutex_unlock(&lock);
    }
    atomic_fetch_add(&asum, s);
    pthread_mutex_lock(&lock);
    total += s;
    reported++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    return (void *)(long)(mine * 10 + 1);
}

static int work(void) {
    pthread_t t[NT];
    pthread_barrier_init(&all_started, NULL, NT);
    for (long i = 0; i < NT; i++) {
        int e = pthread_create(&t[i], NULL, worker, (void *)i);
        if (e) {
            printf("pthread_create %ld: %s\n", i, strerror(e));
            return 1;
        }
    }
    pthread_mutex_lock(&lock);
    while (reported < NT)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    long rets = 0;
    for (int i = 0; i < NT; i++) {
        void *r;
        if (pthread_join(t[i], &r))
            return 2;
        rets += (long)r;
    }
    unsigned long long want = N * (N + 1) / 2;
    printf("threads %d\n", NT);
    printf("atomic %llu (want %llu)\n", (unsigned long long)atomic_load(&asum),
           want + NT * 1000ULL);
    printf("locked %llu (want %llu)\n", total, want + NT * 1000ULL);
    printf("returns %ld\n", rets);
    int distinct = 1;
    for (int i = 0; i < NT; i++)
        for (int j = 0; j < i; j++)
            distinct &= tids[i] != tids[j];
    for (int i = 0; i < NT; i++)
        distinct &= tids[i] != getpid();
    printf("tids distinct from each other and the pid: %s\n", distinct ? "yes" : "no");
    printf("main tls %d\n", mine);
    return 0;
}

static void *hold(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    while (!reported)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    return NULL;
}

static int toomany(void) {
    pthread_t t[8];
    int made = 0, err = 0;
    for (int i = 0; i < 8; i++) {
        int e = pthread_create(&t[i], NULL, hold, NULL);
        if (e) {
            err = e;
            break;
        }
        made++;
    }
    printf("created %d, then %s\n", made, err ? strerror(err) : "no error");
    pthread_mutex_lock(&lock);
    reported = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < made; i++)
        pthread_join(t[i], NULL);
    printf("joined %d\n", made);
    return 0;
}

static void *late(void *arg) {
    (void)arg;
    struct timespec d = {0, 300000000};
    nanosleep(&d, NULL);
    pthread_mutex_lock(&lock);
    reported = 1;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
    return NULL;
}

static int timeout(void) {
    struct timespec t0, t1, until;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 200000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&lock);
    int e = pthread_cond_timedwait(&cond, &lock, &until);
    pthread_mutex_unlock(&lock);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    printf("timedwait: %s after at least 200 ms: %s\n", e == ETIMEDOUT ? "ETIMEDOUT" : "other",
           ms >= 200 ? "yes" : "no");
    pthread_t t;
    pthread_create(&t, NULL, late, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_mutex_lock(&lock);
    while (!reported)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    pthread_join(t, NULL);
    printf("woken by a sleeping thread after at least 300 ms: %s\n", ms >= 300 ? "yes" : "no");
    return 0;
}

static void *forever(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;)
        pthread_cond_wait(&cond, &lock);
    return NULL;
}

static int deadlock(void) {
    pthread_t a, b;
    pthread_create(&a, NULL, forever, NULL);
    pthread_create(&b, NULL, forever, NULL);
    printf("waiting\n");
    fflush(stdout);
    pthread_join(a, NULL);
    return 0;
}

static volatile pid_t usr1_on, usr2_on;
static volatile int usr1_count;
static int ready, go;
static pthread_cond_t cond2 = PTHREAD_COND_INITIALIZER;

static void on_usr1(int s) {
    (void)s;
    usr1_on = (pid_t)syscall(SYS_gettid);
    usr1_count++;
}

static void on_usr2(int s) {
    (void)s;
    usr2_on = (pid_t)syscall(SYS_gettid);
}

static pid_t waiter_tid;

static void *waiter(void *arg) {
    (void)arg;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    pthread_mutex_lock(&lock);
    waiter_tid = (pid_t)syscall(SYS_gettid);
    ready = 1;
    pthread_cond_broadcast(&cond);
    while (!go)
        pthread_cond_wait(&cond2, &lock);
    pthread_mutex_unlock(&lock);
    return NULL;
}

static volatile int suspended_ret, suspended_errno;

static void *suspender(void *arg) {
    (void)arg;
    sigset_t block, none;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    pthread_mutex_lock(&lock);
    waiter_tid = (pid_t)syscall(SYS_gettid);
    ready = 2;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    sigemptyset(&none);
    suspended_ret = sigsuspend(&none);
    suspended_errno = errno;
    return NULL;
}

static void wait_ready(int want) {
    pthread_mutex_lock(&lock);
    while (ready != want)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
}

static int signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    pthread_t t;
    pthread_create(&t, NULL, waiter, NULL);
    wait_ready(1);
    pthread_kill(t, SIGUSR1);
    struct timespec ms = {0, 1000000};
    for (int i = 0; i < 1000 && !usr1_count; i++)
        nanosleep(&ms, NULL);
    printf("SIGUSR1 handled on the target thread: %s\n", usr1_on == waiter_tid ? "yes" : "no");
    kill(getpid(), SIGUSR2);
    printf("SIGUSR2, blocked by the other thread, handled on main: %s\n",
           usr2_on == getpid() ? "yes" : "no");
    pthread_mutex_lock(&lock);
    go = 1;
    pthread_cond_broadcast(&cond2);
    pthread_mutex_unlock(&lock);
    pthread_join(t, NULL);
    pthread_create(&t, NULL, suspender, NULL);
    wait_ready(2);
    nanosleep(&ms, NULL);
    usr1_on = 0;
    pthread_kill(t, SIGUSR1);
    pthread_join(t, NULL);
    printf("sigsuspend in a thread ended by pthread_kill: %s (returned %d, %s), handler on it: %s\n",
           suspended_ret == -1 && suspended_errno == EINTR ? "yes" : "no", suspended_ret,
           strerror(suspended_errno), usr1_on == waiter_tid ? "yes" : "no");
    return 0;
}

static atomic_int bad;

static void *churn(void *arg) {
    long id = (long)arg;
    unsigned char *keep = malloc(1 << 20);
    memset(keep, (int)id, 1 << 20);
    for (int round = 0; round < 50; round++) {
        size_t len = (size_t)(1 + (round + id) % 8) * 4096 * 4;
        unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            atomic_fetch_add(&bad, 1);
            continue;
        }
        for (size_t i = 0; i < len; i += 512)
            p[i] = (unsigned char)(id * 31 + round + i / 512);
        mprotect(p, len / 2, PROT_READ);
        for (size_t i = 0; i < len; i += 512)
            if (p[i] != (unsigned char)(id * 31 + round + i / 512))
                atomic_fetch_add(&bad, 1);
        munmap(p, len);
        for (size_t i = 0; i < (1 << 20); i += 4096)
            if (keep[i] != (unsigned char)id)
                atomic_fetch_add(&bad, 1);
    }
    free(keep);
    return NULL;
}

static int memory(void) {
    pthread_t t[3];
    for (long i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, churn, (void *)(i + 1));
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    printf("memory checks failed: %d\n", atomic_load(&bad));
    return 0;
}

static int alone(void) {
    int w = 0;
    struct timespec ts = {0, 50000000}, a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    long r = syscall(SYS_futex, &w, FUTEX_WAIT, 0, &ts, 0, 0);
    int e = errno;
    clock_gettime(CLOCK_MONOTONIC, &b);
    long ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
    printf("timed wait: %ld %s, at least 50 ms: %s\n", r, e == ETIMEDOUT ? "ETIMEDOUT" : "other",
           ms >= 50 ? "yes" : "no");
    r = syscall(SYS_futex, &w, FUTEX_WAIT, 1, 0, 0, 0);
    printf("changed word: %ld %s\n", r, errno == EAGAIN ? "EAGAIN" : "other");
    return 0;
}

static int cpus(void) {
    printf("online %ld configured %ld get_nprocs %d get_nprocs_conf %d\n",
           sysconf(_SC_NPROCESSORS_ONLN), sysconf(_SC_NPROCESSORS_CONF), get_nprocs(),
           get_nprocs_conf());
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *m = argc > 1 ? argv[1] : "work";
    if (!strcmp(m, "work"))
        return work();
    if (!strcmp(m, "toomany"))
        return toomany();
    if (!strcmp(m, "timeout"))
        return timeout();
    if (!strcmp(m, "deadlock"))
        return deadlock();
    if (!strcmp(m, "signals"))
        return signals();
    if (!strcmp(m, "memory"))
        return memory();
    if (!strcmp(m, "alone"))
        return alone();
    if (!strcmp(m, "cpus"))
        return cpus();
    fprintf(stderr, "unknown mode %s\n", m);
    return 64;
}
