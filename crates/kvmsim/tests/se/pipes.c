/* SE-mode pipes test: pipe and pipe2 inside one process. Modes:
 *
 *   stream   a producer thread writes 4 MiB of pseudo-random bytes into a
 *            pipe in chunks of varied sizes (write and writev, up to
 *            100 KB, more than the pipe holds), a consumer thread reads
 *            them with varied sizes (read and readv) until end of file;
 *            both checksum what they passed. Then a thread blocked on an
 *            empty pipe gets end of file when the main thread closes the
 *            write end, and one blocked on a full pipe gets EPIPE when
 *            the main thread closes the read end (SIGPIPE ignored). A
 *            thread in poll (no timeout) on two empty pipes wakes when
 *            the main thread writes to one; one in ppoll with a 30 ms
 *            timeout wakes when the main thread writes after 10 ms.
 *   self     one thread: write then read, FIONREAD, readv, O_CLOEXEC,
 *            F_GETFL/F_SETFL O_NONBLOCK, EAGAIN on an empty and on a full
 *            pipe (how much a pipe holds), poll's events of each end
 *            (POLLIN, POLLOUT, POLLHUP, POLLERR, POLLNVAL), a poll
 *            timeout (50 ms), dup/dup2/dup3 keeping an end
 *            open, end of file, EPIPE with a SIGPIPE handler, then with
 *            SIGPIPE ignored.
 *   sigpipe  a write with every read end closed and SIGPIPE's default
 *            action: the process is killed by SIGPIPE (status 141).
 *   deadlock a thread reads an empty pipe whose write end the main
 *            thread holds, the main thread polls another empty pipe:
 *            nothing can wake either (never run natively: it hangs).
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
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define TOTAL (4u << 20)

static int pfd[2];
static uint64_t sum_out, sum_in;
static size_t bytes_in;

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint32_t lcg(uint32_t *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

static void *producer(void *arg) {
    (void)arg;
    static unsigned char buf[100000];
    uint32_t seed = 7, data = 99;
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t sent = 0;
    int chunks = 0;
    while (sent < TOTAL) {
        size_t n = 1 + lcg(&seed) % sizeof buf;
        if (n > TOTAL - sent)
            n = TOTAL - sent;
        for (size_t i = 0; i < n; i++)
            buf[i] = (unsigned char)lcg(&data);
        h = fnv(h, buf, n);
        ssize_t w;
        if (chunks++ % 3 == 0) {
            /* writev in two pieces: one write to the pipe. */
            struct iovec v[2] = {{buf, n / 2}, {buf + n / 2, n - n / 2}};
            w = writev(pfd[1], v, 2);
        } else {
            w = write(pfd[1], buf, n);
        }
        if (w != (ssize_t)n) {
            printf("producer: write of %zu returned %zd (%s)\n", n, w, strerror(errno));
            exit(1);
        }
        sent += n;
    }
    sum_out = h;
    close(pfd[1]);
    return NULL;
}

static void *consumer(void *arg) {
    (void)arg;
    static unsigned char buf[70000];
    uint32_t seed = 3;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (int i = 0;; i++) {
        size_t n = 1 + lcg(&seed) % sizeof buf;
        ssize_t r;
        if (i % 4 == 0) {
            struct iovec v[2] = {{buf, n / 3}, {buf + n / 3, n - n / 3}};
            r = readv(pfd[0], v, 2);
        } else {
            r = read(pfd[0], buf, n);
        }
        if (r < 0) {
            printf("consumer: read: %s\n", strerror(errno));
            exit(1);
        }
        if (r == 0)
            break;
        h = fnv(h, buf, (size_t)r);
        bytes_in += (size_t)r;
    }
    sum_in = h;
    return NULL;
}

static void *blocked_reader(void *arg) {
    int fd = *(int *)arg;
    char c;
    ssize_t r = read(fd, &c, 1);
    printf("blocked reader: read returned %zd\n", r);
    return NULL;
}

static void *blocked_writer(void *arg) {
    int fd = *(int *)arg;
    static char big[100000];
    ssize_t w = write(fd, big, sizeof big);
    int e = errno;
    printf("blocked writer: write returned %zd%s%s\n", w, w < 0 ? " " : "",
           w < 0 ? strerror(e) : "");
    return NULL;
}

static int poll_pipes[2][2];
static void *poller(void *arg) {
    (void)arg;
    struct pollfd f[2] = {{poll_pipes[0][0], POLLIN, 0}, {poll_pipes[1][0], POLLIN, 0}};
    int n = poll(f, 2, -1);
    char c = 0;
    if (n == 1 && (f[1].revents & POLLIN))
        read(poll_pipes[1][0], &c, 1);
    printf("poller: %d ready, revents %d %d, read '%c'\n", n, f[0].revents, f[1].revents, c);
    struct timespec ts = {0, 30000000};
    f[0].revents = 0;
    n = ppoll(f, 1, &ts, NULL);
    printf("ppoller: %d ready, revents %d\n", n, f[0].revents);
    return NULL;
}

static void sleep_ms(int ms) {
    struct timespec ts = {0, ms * 1000000L};
    nanosleep(&ts, NULL);
}

static int stream(void) {
    if (pipe2(pfd, O_CLOEXEC) != 0) {
        perror("pipe2");
        return 1;
    }
    pthread_t p, c;
    pthread_create(&c, NULL, consumer, NULL);
    pthread_create(&p, NULL, producer, NULL);
    pthread_join(p, NULL);
    pthread_join(c, NULL);
    close(pfd[0]);
    printf("passed %zu bytes of %u: checksums %016llx %016llx %s\n", bytes_in, TOTAL,
           (unsigned long long)sum_out, (unsigned long long)sum_in,
           sum_out == sum_in ? "match" : "DIFFER");

    /* A reader waiting on an empty pipe: end of file when the last write
     * end closes. */
    int q[2];
    pipe(q);
    pthread_t t;
    pthread_create(&t, NULL, blocked_reader, &q[0]);
    sleep_ms(20);
    close(q[1]);
    pthread_join(t, NULL);
    close(q[0]);

    /* A writer waiting on a full pipe: EPIPE when the last read end
     * closes (SIGPIPE ignored, so it is only an error). */
    signal(SIGPIPE, SIG_IGN);
    pipe(q);
    pthread_create(&t, NULL, blocked_writer, &q[1]);
    sleep_ms(20);
    close(q[0]);
    pthread_join(t, NULL);
    close(q[1]);

    /* poll with no timeout on two empty pipes: a write to one wakes it. */
    pipe(poll_pipes[0]);
    pipe(poll_pipes[1]);
    pthread_create(&t, NULL, poller, NULL);
    sleep_ms(20);
    write(poll_pipes[1][1], "p", 1);
    sleep_ms(10);
    write(poll_pipes[0][1], "q", 1);
    pthread_join(t, NULL);
    return sum_out == sum_in && bytes_in == TOTAL ? 0 : 1;
}

static volatile sig_atomic_t pipes_caught;
static void on_sigpipe(int s) {
    (void)s;
    pipes_caught++;
}

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond))                                                                     \
            printf("FAILED line %d: %s (errno %s)\n", __LINE__, #cond, strerror(errno)); \
    } while (0)

static int self(void) {
    int p[2];
    char buf[200000];
    CHECK(pipe2(p, 0x12345) == -1 && errno == EINVAL);
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    CHECK(fcntl(p[0], F_GETFD) == FD_CLOEXEC && fcntl(p[1], F_GETFD) == FD_CLOEXEC);
    CHECK((fcntl(p[0], F_GETFL) & O_ACCMODE) == O_RDONLY);
    CHECK((fcntl(p[1], F_GETFL) & O_ACCMODE) == O_WRONLY);
    CHECK(write(p[1], "hello, pipe", 11) == 11);
    int avail = -1;
    CHECK(ioctl(p[0], FIONREAD, &avail) == 0 && avail == 11);
    CHECK(read(p[0], buf, 5) == 5 && !memcmp(buf, "hello", 5));
    char a[3], b[10];
    struct iovec v[2] = {{a, 3}, {b, 10}};
    CHECK(readv(p[0], v, 2) == 6 && !memcmp(a, ", p", 3) && !memcmp(b, "ipe", 3));
    CHECK(lseek(p[0], 0, SEEK_SET) == -1 && errno == ESPIPE);
    CHECK(write(p[0], "x", 1) == -1 && errno == EBADF);
    CHECK(read(p[1], buf, 1) == -1 && errno == EBADF);

    /* Non-blocking: EAGAIN when empty; a full pipe takes no more. */
    CHECK(fcntl(p[0], F_SETFL, O_NONBLOCK) == 0);
    CHECK(fcntl(p[0], F_GETFL) & O_NONBLOCK);
    CHECK(read(p[0], buf, 1) == -1 && errno == EAGAIN);
    int fl = fcntl(p[1], F_GETFL);
    CHECK(fcntl(p[1], F_SETFL, fl | O_NONBLOCK) == 0);
    memset(buf, 'z', sizeof buf);
    size_t held = 0;
    for (;;) {
        ssize_t w = write(p[1], buf, 4096);
        if (w < 0) {
            CHECK(errno == EAGAIN);
            break;
        }
        held += (size_t)w;
    }
    printf("a pipe holds %zu bytes\n", held);
    CHECK(write(p[1], buf, 1) == -1 && errno == EAGAIN);
    size_t got = 0;
    ssize_t r;
    while ((r = read(p[0], buf, sizeof buf)) > 0)
        got += (size_t)r;
    CHECK(r == -1 && errno == EAGAIN && got == held);
    /* A large non-blocking write into the empty pipe: what fits. */
    ssize_t w = write(p[1], buf, 100000);
    printf("a non-blocking write of 100000 bytes wrote %zd\n", w);
    while (read(p[0], buf, sizeof buf) > 0) {
    }
    CHECK(fcntl(p[0], F_SETFL, 0) == 0 && fcntl(p[1], F_SETFL, fl) == 0);

    /* poll: an empty pipe's read end is not ready, its write end is; a
     * timeout of 50 ms passes; data makes it readable. */
    struct pollfd pf[3] = {{p[0], POLLIN, 0}, {p[1], POLLOUT, 0}, {99, POLLIN, 0}};
    CHECK(poll(pf, 3, 0) == 2 && pf[0].revents == 0 && pf[1].revents == POLLOUT &&
          pf[2].revents == POLLNVAL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CHECK(poll(pf, 1, 50) == 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long waited = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    printf("poll timed out after at least 50 ms: %s\n", waited >= 50 ? "yes" : "no");
    CHECK(write(p[1], "ab", 2) == 2);
    CHECK(poll(pf, 1, -1) == 1 && pf[0].revents == POLLIN);
    CHECK(read(p[0], buf, 2) == 2);

    /* Duplicates keep the write end open: end of file only when the last
     * one closes. */
    int d1 = dup(p[1]);
    CHECK(dup2(p[1], 20) == 20);
    CHECK(dup3(p[1], 21, O_CLOEXEC) == 21 && fcntl(21, F_GETFD) == FD_CLOEXEC);
    CHECK(close(p[1]) == 0 && close(20) == 0 && close(21) == 0);
    CHECK(write(d1, "last", 4) == 4);
    CHECK(close(d1) == 0);
    CHECK(read(p[0], buf, sizeof buf) == 4 && !memcmp(buf, "last", 4));
    pf[0].revents = 0;
    CHECK(poll(pf, 1, 0) == 1 && pf[0].revents == POLLHUP);
    CHECK(read(p[0], buf, sizeof buf) == 0);
    CHECK(read(p[0], buf, sizeof buf) == 0);
    close(p[0]);

    /* Every read end closed: EPIPE, and SIGPIPE to the writer. */
    CHECK(pipe(p) == 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigpipe;
    sigaction(SIGPIPE, &sa, NULL);
    close(p[0]);
    struct pollfd wf = {p[1], POLLOUT, 0};
    CHECK(poll(&wf, 1, 0) == 1 && (wf.revents & POLLERR));
    CHECK(write(p[1], "x", 1) == -1 && errno == EPIPE);
    struct iovec wv[1] = {{"yy", 2}};
    CHECK(writev(p[1], wv, 1) == -1 && errno == EPIPE);
    printf("SIGPIPE caught %d times\n", (int)pipes_caught);
    signal(SIGPIPE, SIG_IGN);
    CHECK(write(p[1], "x", 1) == -1 && errno == EPIPE);
    printf("SIGPIPE ignored: caught %d times\n", (int)pipes_caught);
    close(p[1]);
    printf("self done\n");
    return 0;
}

static int sigpipe(void) {
    int p[2];
    pipe(p);
    close(p[0]);
    printf("writing\n");
    fflush(stdout);
    write(p[1], "x", 1);
    printf("still alive\n");
    return 0;
}

static int keep[2];
static void *wait_forever(void *arg) {
    (void)arg;
    char c;
    read(keep[0], &c, 1);
    return NULL;
}

static int deadlock(void) {
    int other[2];
    pipe(keep);
    pipe(other);
    pthread_t t;
    pthread_create(&t, NULL, wait_forever, NULL);
    printf("waiting\n");
    fflush(stdout);
    struct pollfd f = {other[0], POLLIN, 0};
    poll(&f, 1, -1);
    printf("woke?\n");
    return 1;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *m = argc > 1 ? argv[1] : "stream";
    if (!strcmp(m, "stream"))
        return stream();
    if (!strcmp(m, "self"))
        return self();
    if (!strcmp(m, "sigpipe"))
        return sigpipe();
    if (!strcmp(m, "deadlock"))
        return deadlock();
    fprintf(stderr, "unknown mode %s\n", m);
    return 2;
}
