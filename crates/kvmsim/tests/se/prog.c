/* A static test program for kvmsim's SE mode (compiled by tests/se.rs with
 * gcc -static). Each mode prints what it finds; the test compares the
 * output with a native run of the same binary where the two must agree. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static unsigned long sum(const unsigned char *p, size_t n) {
    unsigned long s = 0;
    for (size_t i = 0; i < n; i++) s = s * 31 + p[i];
    return s;
}

int main(int argc, char **argv, char **envp) {
    const char *mode = argc > 1 ? argv[1] : "hello";
    if (!strcmp(mode, "hello")) {
        printf("hello argc=%d", argc);
        for (int i = 2; i < argc; i++) printf(" [%s]", argv[i]);
        printf(" env:");
        for (char **e = envp; *e; e++) printf(" %s", *e);
        printf("\n");
        return 0;
    }
    if (!strcmp(mode, "files")) {
        /* argv[2]: a folder to work in. */
        char path[4096];
        snprintf(path, sizeof path, "%s/data.bin", argv[2]);
        int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
        if (fd < 0) { perror("open"); return 1; }
        unsigned char buf[10000];
        for (int i = 0; i < (int)sizeof buf; i++) buf[i] = (unsigned char)(i * 7);
        if (write(fd, buf, sizeof buf) != sizeof buf) { perror("write"); return 1; }
        struct stat st;
        fstat(fd, &st);
        printf("size %ld regular %d\n", (long)st.st_size, S_ISREG(st.st_mode));
        lseek(fd, 5000, SEEK_SET);
        unsigned char back[100];
        ssize_t got = read(fd, back, 100);
        printf("read %zd at 5000: %u %u\n", got, back[0], back[99]);
        got = pread(fd, back, 10, 1);
        printf("pread %zd: %u\n", got, back[0]);
        int fd2 = dup(fd);
        printf("dup %d lseek-shared %ld\n", fd2 > fd, (long)lseek(fd2, 0, SEEK_CUR));
        close(fd2);
        close(fd);
        FILE *f = fopen(path, "r");
        unsigned char all[10000];
        size_t n = fread(all, 1, sizeof all, f);
        printf("fread %zu sum %lu\n", n, sum(all, sizeof all));
        fclose(f);
        int r = stat("/nonexistent/x", &st);
        printf("stat of a missing file: %d %s\n", r, strerror(errno));
        printf("access: %d\n", access(path, R_OK));
        return 0;
    }
    if (!strcmp(mode, "memory")) {
        size_t n = 8u << 20;
        unsigned char *p = malloc(n);
        for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i >> 12);
        printf("malloc %zu sum %lu\n", n, sum(p, n));
        free(p);
        unsigned char *m = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(m, 3, 1 << 20);
        printf("mmap sum %lu\n", sum(m, 1 << 20));
        munmap(m, 1 << 20);
        void *b0 = sbrk(0);
        sbrk(1 << 20);
        memset(b0, 1, 1 << 20);
        printf("brk grew %d\n", (char *)sbrk(0) - (char *)b0 == 1 << 20);
        return 0;
    }
    if (!strcmp(mode, "time")) {
        struct timespec a, b, d = {1, 500000000};
        clock_gettime(CLOCK_MONOTONIC, &a);
        nanosleep(&d, 0);
        clock_gettime(CLOCK_MONOTONIC, &b);
        long ms = (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
        printf("slept_ms %ld\n", ms);
        return 0;
    }
    if (!strcmp(mode, "auxv")) {
        printf("pagesz %lu random %d execfn %s platform %s\n", getauxval(AT_PAGESZ),
               getauxval(AT_RANDOM) != 0, (char *)getauxval(AT_EXECFN), (char *)getauxval(AT_PLATFORM));
        unsigned char r[16];
        getrandom(r, sizeof r, 0);
        printf("getrandom %lu\n", sum(r, 16));
        const unsigned char *ar = (const unsigned char *)getauxval(AT_RANDOM);
        printf("at_random %lu\n", sum(ar, 16));
        char exe[4096] = {0};
        printf("exe %zd %s\n", readlink("/proc/self/exe", exe, sizeof exe), exe);
        return 0;
    }
    if (!strcmp(mode, "mprotect")) {
        char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 1;
        mprotect(p, 4096, PROT_READ);
        printf("read %d\n", p[0]);
        fflush(stdout);
        p[0] = 2;
        printf("wrote a read-only page\n");
        return 0;
    }
    if (!strcmp(mode, "munmap")) {
        char *p = mmap(0, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 1;
        p[4096] = 2;
        munmap(p, 4096);
        printf("kept %d\n", p[4096]);
        fflush(stdout);
        p[0] = 3;
        printf("wrote an unmapped page\n");
        return 0;
    }
    if (!strcmp(mode, "null")) return *(volatile int *)0x1234;
    if (!strcmp(mode, "jump")) ((void (*)(void))0x7fff00001000UL)();
    if (!strcmp(mode, "ud2")) __asm__ volatile("ud2");
    if (!strcmp(mode, "unknown")) {
        long r = syscall(400);
        int e = errno;
        printf("unknown %ld %s\n", r, strerror(e));
        r = syscall(400);
        printf("again %ld\n", r);
        r = syscall(100000);
        printf("beyond the table %ld\n", r);
        return 0;
    }
    if (!strcmp(mode, "efault")) {
        long r1 = write(1, (void *)0x1000, 10);
        int e1 = errno;
        long r2 = read(0, (void *)main, 10);
        int e2 = errno;
        long r3 = syscall(SYS_clock_gettime, CLOCK_MONOTONIC, (void *)0xffffffffff000000UL);
        printf("%ld %d %ld %d %ld\n", r1, e1, r2, e2, r3);
        return 0;
    }
    if (!strcmp(mode, "simops")) {
        /* gem5's m5 address mode: the sim-ops window at 0xFFFF0000. */
        volatile unsigned long *ops = (volatile unsigned long *)0xFFFF0000UL;
        unsigned long v;
        /* dumpstats(delay 0, period 0), then exit(delay 0): arguments in RDI, RSI. */
        __asm__ volatile("xor %%edi, %%edi; xor %%esi, %%esi; mov (%1), %0"
                         : "=a"(v) : "c"(&ops[0x4100 / 8]) : "rdi", "rsi", "memory");
        printf("dumped stats\n");
        fflush(stdout);
        /* checkpoint(0, 0): declined in SE mode, the program goes on. */
        __asm__ volatile("xor %%edi, %%edi; xor %%esi, %%esi; mov (%1), %0"
                         : "=a"(v) : "c"(&ops[0x4300 / 8]) : "rdi", "rsi", "memory");
        printf("after checkpoint\n");
        fflush(stdout);
        __asm__ volatile("xor %%edi, %%edi; mov (%1), %0" : "=a"(v) : "c"(&ops[0x2100 / 8]) : "rdi", "memory");
        printf("still running after sim-ops exit\n");
        return 7;
    }
    printf("unknown mode %s\n", mode);
    return 2;
}
