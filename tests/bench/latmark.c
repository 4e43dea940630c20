/* latmark now: prints the guest's CLOCK_REALTIME in ns (busybox date has no %N).
 * latmark FILE COUNT GAP_US CLOCK_SAMPLES: the guest side of the write->record latency benchmark.
 *
 * First prints CLOCK_SAMPLES lines "MIRRORFS-CLK <guest ns>" 2 ms apart (the host stamps their arrival on the
 * console to estimate the guest-host clock offset). Then, COUNT times: takes the guest time t0, writes one
 * 4 KiB block "MFSLAT <i> <t0>" with O_DIRECT at offset i*64 KiB of FILE (preallocated, so no metadata
 * changes; one marker per 64 KiB so a background-mode chunk holds one marker), takes t1 after pwrite returns,
 * t2 just before printing "MIRRORFS-LAT <i> <t0> <t1> <t2>" on the console, sleeps GAP_US.
 * latmark sync DIR COUNT GAP_US CLOCK_SAMPLES: the guest side of the sync->event latency benchmark (issue 3).
 * The same CLOCK_SAMPLES lines first; then, COUNT times: t0, create DIR/sNNNNN (O_CREAT|O_EXCL, 2 bytes written),
 * close, ts, sync(), t1 right after sync returns, print "MIRRORFS-SYNC <i> <t0> <ts> <t1>", sleep GAP_US.
 * Built static on the host by tests/bench and put on the guest's disk with mke2fs -d.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void say(const char *line, int n)
{
    while (n > 0) {
        ssize_t w = write(1, line, n);
        if (w <= 0)
            return;
        line += w;
        n -= w;
    }
}

static int sync_loop(const char *dir, int count, long gap)
{
    char path[4096], line[200];
    for (int i = 0; i < count; i++) {
        long long t0 = now();
        snprintf(path, sizeof path, "%s/s%05d", dir, i);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0 || write(fd, "x\n", 2) != 2 || close(fd) != 0) {
            perror(path);
            return 1;
        }
        long long ts = now();
        sync();
        long long t1 = now();
        int n = snprintf(line, sizeof line, "MIRRORFS-SYNC %d %lld %lld %lld\n", i, t0, ts, t1);
        say(line, n);
        usleep(gap);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "now") == 0) {
        printf("%lld\n", now());
        return 0;
    }
    int sync_mode = argc == 6 && strcmp(argv[1], "sync") == 0;
    if (sync_mode) {
        argv++;
        argc--;
    }
    if (argc != 5) {
        fprintf(stderr, "usage: latmark now | latmark FILE COUNT GAP_US CLOCK_SAMPLES"
                        " | latmark sync DIR COUNT GAP_US CLOCK_SAMPLES\n");
        return 2;
    }
    int count = atoi(argv[2]), samples = atoi(argv[4]);
    long gap = atol(argv[3]);
    char line[200];
    for (int j = 0; j < samples; j++) {
        int n = snprintf(line, sizeof line, "MIRRORFS-CLK %lld\n", now());
        say(line, n);
        usleep(2000);
    }
    if (sync_mode)
        return sync_loop(argv[1], count, gap);
    int fd = open(argv[1], O_WRONLY | O_DIRECT);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    char *buf;
    if (posix_memalign((void **)&buf, 4096, 4096))
        return 1;
    for (int i = 0; i < count; i++) {
        memset(buf, '.', 4096);
        long long t0 = now();
        snprintf(buf, 64, "MFSLAT %08d %019lld\n", i, t0);
        if (pwrite(fd, buf, 4096, (off_t)i * 65536) != 4096) {
            perror("pwrite");
            return 1;
        }
        long long t1 = now();
        long long t2 = now();
        int n = snprintf(line, sizeof line, "MIRRORFS-LAT %d %lld %lld %lld\n", i, t0, t1, t2);
        say(line, n);
        usleep(gap);
    }
    close(fd);
    return 0;
}
