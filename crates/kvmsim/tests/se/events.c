/* SE-mode events test: select, pselect6, eventfd and epoll. Modes:
 *
 *   threads  between threads: a blocked eventfd reader woken by a write;
 *            a blocked eventfd writer (the counter at its top) woken by
 *            a read; two consumer threads taking 50 tokens each from a
 *            semaphore eventfd; the main thread in epoll_wait (no
 *            timeout) on a pipe and an eventfd while a producer thread
 *            writes five messages and then says it is done; select and
 *            pselect (with a signal mask) woken by a producer thread;
 *            timeouts of select, epoll_wait and ppoll that pass.
 *   self     one thread: eventfd's rules (short buffers, the value
 *            2^64-1, EAGAIN, semaphore mode, its poll events, flags),
 *            select's (EBADF, EINVAL, a regular file and /dev/null always
 *            ready, a timeval normalised, the time left), epoll's
 *            (EEXIST, ENOENT, EBADF, EINVAL, EPERM for a regular file and
 *            /dev/null, level-triggered repeats, turns with maxevents 1,
 *            EPOLLONESHOT, EPOLLET, an item gone with its file).
 *   deadlock a thread reads an eventfd of 0, the main thread waits in
 *            epoll_wait with no timeout on an empty pipe: nothing can
 *            wake either (never run natively: it hangs).
 *
 * Every line printed is the same natively and in SE mode.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond))                                                                     \
            printf("FAILED line %d: %s (errno %s)\n", __LINE__, #cond, strerror(errno)); \
    } while (0)

#define TOP 0xfffffffffffffffeULL

static void sleep_ms(int ms) {
    struct timespec ts = {0, ms * 1000000L};
    nanosleep(&ts, NULL);
}

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* ---- threads ---- */

static int efd, sem, pipefd[2], donefd;
static int taken[2];
static ssize_t writer_wrote;

static void *blocked_reader(void *arg) {
    (void)arg;
    uint64_t v = 0;
    ssize_t n = read(efd, &v, 8);
    printf("blocked reader: read %zd bytes, value %llu\n", n, (unsigned long long)v);
    return NULL;
}

static void *blocked_writer(void *arg) {
    (void)arg;
    uint64_t one = 1;
    writer_wrote = write(efd, &one, 8);
    return NULL;
}

static void *consumer(void *arg) {
    int me = (int)(intptr_t)arg;
    for (int i = 0; i < 50; i++) {
        uint64_t v;
        if (read(sem, &v, 8) == 8 && v == 1)
            taken[me]++;
    }
    return NULL;
}

static void *producer(void *arg) {
    (void)arg;
    for (int i = 0; i < 5; i++) {
        char m[16];
        int n = snprintf(m, sizeof m, "msg%d;", i);
        write(pipefd[1], m, (size_t)n);
        sleep_ms(5);
    }
    uint64_t one = 1;
    write(donefd, &one, 8);
    return NULL;
}

static void *late_writer(void *arg) {
    int fd = (int)(intptr_t)arg;
    sleep_ms(10);
    uint64_t one = 1;
    /* An eventfd takes 8 bytes; a pipe takes the first. */
    write(fd, &one, 8);
    return NULL;
}

static int threads(void) {
    pthread_t t, u;

    /* A reader of a counter of 0 waits for the write. */
    efd = eventfd(0, EFD_CLOEXEC);
    pthread_create(&t, NULL, blocked_reader, NULL);
    sleep_ms(10);
    uint64_t v = 42;
    write(efd, &v, 8);
    pthread_join(t, NULL);

    /* A writer that would take the counter past its top waits for a
     * read. */
    v = TOP;
    CHECK(write(efd, &v, 8) == 8);
    pthread_create(&t, NULL, blocked_writer, NULL);
    sleep_ms(10);
    v = 0;
    CHECK(read(efd, &v, 8) == 8);
    printf("read the top: %s\n", v == TOP ? "yes" : "no");
    pthread_join(t, NULL);
    printf("blocked writer: wrote %zd bytes\n", writer_wrote);
    CHECK(read(efd, &v, 8) == 8);
    printf("then the counter is %llu\n", (unsigned long long)v);
    close(efd);

    /* A semaphore of 100 tokens, one at a time, for two consumers. */
    sem = eventfd(0, EFD_SEMAPHORE);
    pthread_create(&t, NULL, consumer, (void *)0);
    pthread_create(&u, NULL, consumer, (void *)1);
    for (int i = 0; i < 100; i++) {
        v = 1;
        write(sem, &v, 8);
    }
    pthread_join(t, NULL);
    pthread_join(u, NULL);
    CHECK(fcntl(sem, F_SETFL, O_NONBLOCK) == 0);
    errno = 0;
    CHECK(read(sem, &v, 8) == -1 && errno == EAGAIN);
    printf("consumers took %d and %d tokens; then none is left\n", taken[0], taken[1]);
    close(sem);

    /* epoll_wait with no timeout on a pipe and an eventfd while a
     * producer writes. */
    CHECK(pipe2(pipefd, O_NONBLOCK) == 0);
    donefd = eventfd(0, EFD_NONBLOCK);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 1};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, pipefd[0], &e) == 0);
    e.data.u64 = 2;
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, donefd, &e) == 0);
    pthread_create(&t, NULL, producer, NULL);
    char got[256] = "";
    size_t len = 0;
    int done = 0;
    while (!done) {
        struct epoll_event evs[4];
        int n = epoll_wait(ep, evs, 4, -1);
        CHECK(n >= 1);
        for (int i = 0; i < n; i++) {
            CHECK(evs[i].events == EPOLLIN);
            if (evs[i].data.u64 == 2)
                done = 1;
        }
        ssize_t r;
        while ((r = read(pipefd[0], got + len, sizeof got - 1 - len)) > 0)
            len += (size_t)r;
    }
    pthread_join(t, NULL);
    got[len] = 0;
    printf("epoll_wait got \"%s\" then the done signal\n", got);
    CHECK(read(donefd, &v, 8) == 8 && v == 1);

    /* epoll_pwait: a pipe written 10 ms later. */
    struct epoll_event one;
    pthread_create(&t, NULL, late_writer, (void *)(intptr_t)pipefd[1]);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    int n = epoll_pwait(ep, &one, 1, 10000, &usr1);
    pthread_join(t, NULL);
    printf("epoll_pwait woke: %d ready, data %llu\n", n, (unsigned long long)one.data.u64);
    while (read(pipefd[0], got, sizeof got) > 0) {
    }

    /* select woken by a pipe write, with time left. */
    pthread_create(&t, NULL, late_writer, (void *)(intptr_t)pipefd[1]);
    fd_set rs;
    FD_ZERO(&rs);
    FD_SET(pipefd[0], &rs);
    struct timeval tv = {10, 0};
    n = select(pipefd[0] + 1, &rs, NULL, NULL, &tv);
    pthread_join(t, NULL);
    printf("select woke: %d ready, readable %s, time left below 10 s and above 0: %s\n", n,
           FD_ISSET(pipefd[0], &rs) ? "yes" : "no",
           (tv.tv_sec < 10 && (tv.tv_sec > 0 || tv.tv_usec > 0)) ? "yes" : "no");
    while (read(pipefd[0], got, sizeof got) > 0) {
    }

    /* pselect woken by an eventfd write, a mask in force while it waits
     * and the old one back after. */
    pthread_create(&t, NULL, late_writer, (void *)(intptr_t)donefd);
    FD_ZERO(&rs);
    FD_SET(donefd, &rs);
    struct timespec ts = {10, 0};
    sigset_t before, after;
    sigprocmask(SIG_SETMASK, NULL, &before);
    n = pselect(donefd + 1, &rs, NULL, NULL, &ts, &usr1);
    sigprocmask(SIG_SETMASK, NULL, &after);
    pthread_join(t, NULL);
    printf("pselect woke: %d ready, readable %s, mask as before %s\n", n,
           FD_ISSET(donefd, &rs) ? "yes" : "no",
           sigismember(&after, SIGUSR1) == sigismember(&before, SIGUSR1) ? "yes" : "no");
    CHECK(read(donefd, &v, 8) == 8);

    /* Timeouts that pass: select (20 ms, its set emptied, no time left),
     * epoll_wait (30 ms), ppoll on an eventfd (10 ms). */
    FD_ZERO(&rs);
    FD_SET(pipefd[0], &rs);
    tv.tv_sec = 0;
    tv.tv_usec = 20000;
    long t0 = now_ms();
    n = select(pipefd[0] + 1, &rs, NULL, NULL, &tv);
    printf("select timed out: %d, set empty %s, left %ld.%06ld, 20 ms passed %s\n", n,
           FD_ISSET(pipefd[0], &rs) ? "no" : "yes", (long)tv.tv_sec, (long)tv.tv_usec,
           now_ms() - t0 >= 20 ? "yes" : "no");
    t0 = now_ms();
    n = epoll_wait(ep, &one, 1, 30);
    printf("epoll_wait timed out: %d, 30 ms passed %s\n", n, now_ms() - t0 >= 30 ? "yes" : "no");
    struct pollfd pf = {donefd, POLLIN, 0};
    struct timespec pts = {0, 10000000};
    t0 = now_ms();
    n = ppoll(&pf, 1, &pts, NULL);
    printf("ppoll on an eventfd timed out: %d, 10 ms passed %s\n", n,
           now_ms() - t0 >= 10 ? "yes" : "no");
    close(ep);
    close(pipefd[0]);
    close(pipefd[1]);
    close(donefd);
    printf("threads done\n");
    return 0;
}

/* ---- self ---- */

static int self(const char *prog) {
    uint64_t v;
    /* eventfd */
    errno = 0;
    CHECK(eventfd(0, 0x12345) == -1 && errno == EINVAL);
    int e = eventfd(7, EFD_NONBLOCK | EFD_CLOEXEC);
    CHECK(e >= 0);
    CHECK(fcntl(e, F_GETFD) == FD_CLOEXEC);
    CHECK((fcntl(e, F_GETFL) & (O_ACCMODE | O_NONBLOCK)) == (O_RDWR | O_NONBLOCK));
    char small[4];
    CHECK(read(e, small, 4) == -1 && errno == EINVAL);
    CHECK(write(e, small, 4) == -1 && errno == EINVAL);
    CHECK(read(e, &v, 8) == 8 && v == 7);
    CHECK(read(e, &v, 8) == -1 && errno == EAGAIN);
    v = UINT64_MAX;
    CHECK(write(e, &v, 8) == -1 && errno == EINVAL);
    v = TOP;
    CHECK(write(e, &v, 8) == 8);
    v = 1;
    CHECK(write(e, &v, 8) == -1 && errno == EAGAIN);
    struct pollfd pf = {e, POLLIN | POLLOUT, 0};
    CHECK(poll(&pf, 1, 0) == 1);
    printf("a full eventfd polls: in %d out %d\n", !!(pf.revents & POLLIN),
           !!(pf.revents & POLLOUT));
    CHECK(eventfd_read(e, &v) == 0 && v == TOP);
    CHECK(poll(&pf, 1, 0) == 1);
    printf("an empty eventfd polls: in %d out %d\n", !!(pf.revents & POLLIN),
           !!(pf.revents & POLLOUT));
    CHECK(lseek(e, 0, SEEK_CUR) == 0);
    close(e);
    int s = (int)syscall(SYS_eventfd2, 3, EFD_SEMAPHORE | EFD_NONBLOCK);
    int got = 0;
    while (read(s, &v, 8) == 8)
        got += (int)v;
    printf("a semaphore of 3 gave %d reads of 1, then %s\n", got,
           errno == EAGAIN ? "EAGAIN" : strerror(errno));
    close(s);
    int old = (int)syscall(SYS_eventfd, 2);
    CHECK(old >= 0 && read(old, &v, 8) == 8 && v == 2);
    CHECK(fcntl(old, F_GETFD) == 0);
    close(old);

    /* select */
    int p[2];
    CHECK(pipe(p) == 0);
    int file = open(prog, O_RDONLY);
    int null = open("/dev/null", O_RDWR);
    CHECK(file >= 0 && null >= 0);
    int top = file > null ? file : null;
    fd_set rs, ws;
    FD_ZERO(&rs);
    FD_ZERO(&ws);
    FD_SET(p[0], &rs);
    FD_SET(file, &rs);
    FD_SET(null, &rs);
    FD_SET(p[1], &ws);
    FD_SET(null, &ws);
    struct timeval tv = {0, 0};
    int n = select(top + 1, &rs, &ws, NULL, &tv);
    printf("select: %d ready: pipe read %d file %d null %d / pipe write %d null %d\n", n,
           FD_ISSET(p[0], &rs), FD_ISSET(file, &rs), FD_ISSET(null, &rs), FD_ISSET(p[1], &ws),
           FD_ISSET(null, &ws));
    FD_ZERO(&rs);
    FD_SET(60, &rs);
    errno = 0;
    CHECK(select(61, &rs, NULL, NULL, &tv) == -1 && errno == EBADF);
    CHECK(select(-1, NULL, NULL, NULL, &tv) == -1 && errno == EINVAL);
    tv.tv_usec = -1;
    CHECK(select(0, NULL, NULL, NULL, &tv) == -1 && errno == EINVAL);
    /* Microseconds beyond a second carry over (the raw call: glibc may
     * check the timeval itself). */
    FD_ZERO(&ws);
    FD_SET(p[1], &ws);
    tv.tv_sec = 0;
    tv.tv_usec = 1500000;
    n = (int)syscall(SYS_select, p[1] + 1, NULL, &ws, NULL, &tv);
    printf("raw select with 1500000 us: %d ready, left above 1 s and at most 1.5 s: %s\n", n,
           tv.tv_sec == 1 && tv.tv_usec <= 500000 ? "yes" : "no");
    /* The write end of a pipe with no reader: readable and writable
     * (POLLERR). */
    int q[2];
    CHECK(pipe(q) == 0);
    close(q[0]);
    FD_ZERO(&rs);
    FD_ZERO(&ws);
    FD_SET(q[1], &rs);
    FD_SET(q[1], &ws);
    tv.tv_sec = 0;
    tv.tv_usec = 0;
    n = select(q[1] + 1, &rs, &ws, NULL, &tv);
    printf("a write end without readers: %d ready (read %d write %d)\n", n, FD_ISSET(q[1], &rs),
           FD_ISSET(q[1], &ws));
    struct pollfd qf = {q[1], POLLOUT, 0};
    CHECK(poll(&qf, 1, 0) == 1);
    printf("and its poll events: %#x\n", qf.revents);
    close(q[1]);

    /* epoll */
    errno = 0;
    /* The raw call: musl's epoll_create does not pass the size on. */
    CHECK(syscall(SYS_epoll_create, 0) == -1 && errno == EINVAL);
    CHECK(epoll_create1(0x12345) == -1 && errno == EINVAL);
    int ep = epoll_create(1);
    CHECK(ep >= 0);
    int ev = eventfd(0, EFD_NONBLOCK);
    struct epoll_event e1 = {.events = EPOLLIN, .data.u64 = 11};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e1) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e1) == -1 && errno == EEXIST);
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, p[1], &e1) == -1 && errno == ENOENT);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, p[1], NULL) == -1 && errno == ENOENT);
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, 60, &e1) == -1 && errno == EBADF);
    CHECK(epoll_ctl(60, EPOLL_CTL_ADD, p[0], &e1) == -1 && errno == EBADF);
    CHECK(epoll_ctl(p[0], EPOLL_CTL_ADD, p[1], &e1) == -1 && errno == EINVAL);
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, ep, &e1) == -1 && errno == EINVAL);
    CHECK(epoll_ctl(ep, 99, p[1], &e1) == -1 && errno == EINVAL);
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, file, &e1) == -1 && errno == EPERM);
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, null, &e1) == -1 && errno == EPERM);
    struct epoll_event ex = {.events = EPOLLIN | EPOLLEXCLUSIVE};
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, p[0], &ex) == -1 && errno == EINVAL);
    struct epoll_event out[4];
    CHECK(epoll_wait(ep, out, 0, 0) == -1 && errno == EINVAL);
    CHECK(epoll_wait(p[0], out, 1, 0) == -1 && errno == EINVAL);
    CHECK(epoll_wait(ep, out, 4, 0) == 0);
    /* Level-triggered: reported while there is data. */
    CHECK(write(p[1], "ab", 2) == 2);
    for (int i = 0; i < 2; i++) {
        n = epoll_wait(ep, out, 4, 0);
        printf("level-triggered wait %d: %d ready, events %#x data %llu\n", i, n,
               n > 0 ? out[0].events : 0, n > 0 ? (unsigned long long)out[0].data.u64 : 0ULL);
    }
    /* Two ready, room for one: they take turns. */
    struct epoll_event e2 = {.events = EPOLLOUT, .data.u64 = 22};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e2) == 0);
    printf("turns:");
    for (int i = 0; i < 4; i++) {
        n = epoll_wait(ep, out, 1, 0);
        printf(" %llu", n == 1 ? (unsigned long long)out[0].data.u64 : 0ULL);
    }
    printf("\n");
    /* One-shot: once, until EPOLL_CTL_MOD. */
    e2.events = EPOLLOUT | EPOLLONESHOT;
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, ev, &e2) == 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, p[0], NULL) == 0);
    int a = epoll_wait(ep, out, 4, 0);
    int b = epoll_wait(ep, out, 4, 0);
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, ev, &e2) == 0);
    int c = epoll_wait(ep, out, 4, 0);
    printf("one-shot: %d, then %d, after MOD %d\n", a, b, c);
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, ev, NULL) == 0);
    /* Edge-triggered: once per new write. */
    struct epoll_event e3 = {.events = EPOLLIN | EPOLLET, .data.u64 = 33};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e3) == 0);
    a = epoll_wait(ep, out, 4, 0);
    b = epoll_wait(ep, out, 4, 0);
    char ch;
    CHECK(read(p[0], &ch, 1) == 1);
    c = epoll_wait(ep, out, 4, 0);
    CHECK(write(p[1], "c", 1) == 1);
    int d = epoll_wait(ep, out, 4, 0);
    printf("edge-triggered: %d, then %d, after a read %d, after a write %d\n", a, b, c, d);
    /* The epoll descriptor is readable while a wait would report. */
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, p[0], &e1) == 0);
    struct pollfd epf = {ep, POLLIN, 0};
    printf("the epoll descriptor polls %d\n", poll(&epf, 1, 0));
    /* An item goes with its file. */
    int dup0 = dup(p[0]);
    close(p[0]);
    n = epoll_wait(ep, out, 4, 0);
    printf("the file still open through a dup: %d ready\n", n);
    close(dup0);
    n = epoll_wait(ep, out, 4, 0);
    printf("the file closed: %d ready\n", n);
    close(p[1]);
    close(ev);
    close(ep);
    close(file);
    close(null);
    printf("self done\n");
    return 0;
}

/* ---- deadlock ---- */

static void *read_forever(void *arg) {
    (void)arg;
    uint64_t v;
    read(efd, &v, 8);
    return NULL;
}

static int deadlock(void) {
    efd = eventfd(0, 0);
    int p[2];
    pipe(p);
    pthread_t t;
    pthread_create(&t, NULL, read_forever, NULL);
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e);
    printf("waiting\n");
    fflush(stdout);
    epoll_wait(ep, &e, 1, -1);
    printf("woke?\n");
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *m = argc > 1 ? argv[1] : "threads";
    if (!strcmp(m, "threads"))
        return threads();
    if (!strcmp(m, "self"))
        return self(argv[0]);
    if (!strcmp(m, "deadlock"))
        return deadlock();
    fprintf(stderr, "unknown mode %s\n", m);
    return 2;
}
