/*
 * kvmsim-ops: sim-ops from a Linux guest's user space, with the command
 * names of gem5's `m5` utility. It maps kvmsim's sim-ops window
 * (0xFFFF0000, 64 KiB, reserved in the E820 map) through /dev/mem and reads
 * 8 bytes at 0xFFFF0000 + (func << 8) with the arguments in RDI, RSI, RDX,
 * RCX, R8, R9 (gem5's "address" m5ops ABI). Delays are in nanoseconds.
 *
 *   kvmsim-ops exit [delay]            end the run (status 0)
 *   kvmsim-ops fail code [delay]       end the run with `code`
 *   kvmsim-ops dumpstats [delay [period]]
 *   kvmsim-ops resetstats [delay [period]]
 *   kvmsim-ops dumpresetstats [delay [period]]
 *   kvmsim-ops checkpoint [delay [period]]   (gem5's `m5 checkpoint`)
 *   kvmsim-ops readfile                copies the host's system.readfile
 *                                      to stdout (gem5's `m5 readfile`)
 *   kvmsim-ops workbegin id [thread]
 *   kvmsim-ops workend id [thread]
 *   kvmsim-ops sum a b c d e f         prints the sum (checks the ABI)
 *
 * Build (static, it runs from an initramfs): gcc -static -O2 -o kvmsim-ops kvmsim-ops.c
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define SIMOPS_BASE 0xffff0000UL
#define SIMOPS_SIZE 0x10000UL

static volatile uint8_t *window;

static uint64_t simop(unsigned func, uint64_t a0, uint64_t a1, uint64_t a2,
                      uint64_t a3, uint64_t a4, uint64_t a5)
{
    register uint64_t r8 __asm__("r8") = a4;
    register uint64_t r9 __asm__("r9") = a5;
    uint64_t result;
    const volatile uint8_t *addr = window + ((uint64_t)func << 8);
    __asm__ volatile("movq (%1), %0"
                     : "=a"(result)
                     : "r"(addr), "D"(a0), "S"(a1), "d"(a2), "c"(a3), "r"(r8), "r"(r9)
                     : "memory");
    return result;
}

/* gem5's `m5 readfile`: the host file, chunk by chunk, to stdout. The
 * buffer is written before each call, so its pages are present and
 * private: kvmsim copies only into pages the guest may write. */
static int readfile(void)
{
    static char buf[64 * 1024];
    uint64_t offset = 0;
    for (;;) {
        memset(buf, 0, sizeof buf);
        uint64_t n = simop(0x50, (uint64_t)(uintptr_t)buf, sizeof buf, offset, 0, 0, 0);
        if (n == 0 || n > sizeof buf)
            return 0;
        for (uint64_t done = 0; done < n;) {
            ssize_t w = write(1, buf + done, n - done);
            if (w <= 0) {
                perror("kvmsim-ops: readfile: stdout");
                return 1;
            }
            done += (uint64_t)w;
        }
        offset += n;
    }
}

static uint64_t arg(int argc, char **argv, int i, uint64_t dflt)
{
    return i < argc ? strtoull(argv[i], NULL, 0) : dflt;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s exit|fail|dumpstats|resetstats|dumpresetstats|checkpoint|readfile|workbegin|workend|sum [args]\n", argv[0]);
        return 2;
    }
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0) {
        perror("kvmsim-ops: /dev/mem");
        return 1;
    }
    void *p = mmap(NULL, SIMOPS_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, SIMOPS_BASE);
    if (p == MAP_FAILED) {
        perror("kvmsim-ops: mmap of the sim-ops window");
        return 1;
    }
    window = p;
    const char *c = argv[1];
    if (!strcmp(c, "exit"))
        simop(0x21, arg(argc, argv, 2, 0), 0, 0, 0, 0, 0);
    else if (!strcmp(c, "fail"))
        simop(0x22, arg(argc, argv, 3, 0), arg(argc, argv, 2, 1), 0, 0, 0, 0);
    else if (!strcmp(c, "resetstats"))
        simop(0x40, arg(argc, argv, 2, 0), arg(argc, argv, 3, 0), 0, 0, 0, 0);
    else if (!strcmp(c, "dumpstats"))
        simop(0x41, arg(argc, argv, 2, 0), arg(argc, argv, 3, 0), 0, 0, 0, 0);
    else if (!strcmp(c, "dumpresetstats"))
        simop(0x42, arg(argc, argv, 2, 0), arg(argc, argv, 3, 0), 0, 0, 0, 0);
    else if (!strcmp(c, "checkpoint"))
        simop(0x43, arg(argc, argv, 2, 0), arg(argc, argv, 3, 0), 0, 0, 0, 0);
    else if (!strcmp(c, "readfile"))
        return readfile();
    else if (!strcmp(c, "workbegin"))
        simop(0x5a, arg(argc, argv, 2, 0), arg(argc, argv, 3, 0), 0, 0, 0, 0);
    else if (!strcmp(c, "workend"))
        simop(0x5b, arg(argc, argv, 2, 0), arg(argc, argv, 3, 0), 0, 0, 0, 0);
    else if (!strcmp(c, "sum"))
        printf("%llu\n", (unsigned long long)simop(0x23, arg(argc, argv, 2, 0), arg(argc, argv, 3, 0),
                                                     arg(argc, argv, 4, 0), arg(argc, argv, 5, 0),
                                                     arg(argc, argv, 6, 0), arg(argc, argv, 7, 0)));
    else {
        fprintf(stderr, "kvmsim-ops: unknown command %s\n", c);
        return 2;
    }
    return 0;
}
