/* The ping-pong floor: what one tiny request/response between two processes
 * costs with nothing but the kernel in the way.
 *
 * usage: pingpong ROUND_TRIPS REPETITIONS
 * A parent and a forked child share a Unix stream socketpair; the parent
 * writes 1 byte, the child echoes it.  After a warm-up, prints one line per
 * repetition: microseconds per round trip.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void round_trips(int fd, long n) {
    char b = 'x';
    for (long i = 0; i < n; i++) {
        if (write(fd, &b, 1) != 1) die("write");
        if (read(fd, &b, 1) != 1) die("read");
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s ROUND_TRIPS REPETITIONS\n", argv[0]); return 2; }
    long n = atol(argv[1]), reps = atol(argv[2]);
    if (n <= 0 || reps <= 0) { fprintf(stderr, "counts must be positive\n"); return 2; }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) die("socketpair");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {  /* echo until the parent closes its end */
        close(sv[0]);
        char b;
        while (read(sv[1], &b, 1) == 1)
            if (write(sv[1], &b, 1) != 1) die("write");
        _exit(0);
    }
    close(sv[1]);
    round_trips(sv[0], n / 10 + 1);
    for (long r = 0; r < reps; r++) {
        double t0 = now_us();
        round_trips(sv[0], n);
        printf("%.3f\n", (now_us() - t0) / n);
    }
    close(sv[0]);
    waitpid(child, NULL, 0);
    return 0;
}
