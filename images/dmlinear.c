/*
 * dmlinear: create a device-mapper device from table lines, for the busybox test guest (no dmsetup, no lvm).
 *
 *   dmlinear NAME "START LEN linear DEVICE OFFSET" ...
 *
 * START, LEN and OFFSET are 512-byte sectors, as in dmsetup tables. The device is created, loaded and resumed
 * through the ioctls on /dev/mapper/control; no udev runs in the guest, so /dev/mapper/NAME is made here.
 * Built static (gcc -O2 -static) by images/build.py into the initramfs as /bin/dmlinear.
 */

#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define MAPPER_DIR "/dev/" DM_DIR
#define CONTROL MAPPER_DIR "/" DM_CONTROL_NODE
#define ALIGN8(n) (((n) + 7) & ~(size_t)7)

struct target {
    unsigned long long start, length;
    char type[DM_MAX_TYPE_NAME];
    const char *params;
};

static void usage(FILE *to)
{
    fprintf(to,
            "usage: dmlinear NAME \"START LEN linear DEVICE OFFSET\" ...\n"
            "Create device-mapper device NAME from table lines (sectors of 512 bytes, as in dmsetup tables),\n"
            "activate it and make its node " MAPPER_DIR "/NAME. Prints \"" MAPPER_DIR "/NAME MAJOR:MINOR\".\n");
}

/* The control node: devtmpfs normally provides it, but a bare /dev needs it made from sysfs's numbers. */
static int open_control(void)
{
    if (mkdir(MAPPER_DIR, 0755) && errno != EEXIST) {
        fprintf(stderr, "dmlinear: mkdir %s: %s\n", MAPPER_DIR, strerror(errno));
        return -1;
    }
    if (access(CONTROL, F_OK)) {
        unsigned int maj = 10, min = 236;  /* MISC_MAJOR, MAPPER_CTRL_MINOR */
        FILE *f = fopen("/sys/class/misc/device-mapper/dev", "r");
        if (f) {
            if (fscanf(f, "%u:%u", &maj, &min) != 2) {
                maj = 10;
                min = 236;
            }
            fclose(f);
        }
        if (mknod(CONTROL, S_IFCHR | 0600, makedev(maj, min)) && errno != EEXIST) {
            fprintf(stderr, "dmlinear: mknod %s %u:%u: %s\n", CONTROL, maj, min, strerror(errno));
            return -1;
        }
    }
    int fd = open(CONTROL, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        fprintf(stderr, "dmlinear: open %s: %s%s\n", CONTROL, strerror(errno),
                errno == ENODEV || errno == ENXIO ? " (is dm-mod loaded?)" : "");
    return fd;
}

/* One ioctl: the header is reset each time because the kernel writes its status back into it. */
static int dm_call(int fd, unsigned long cmd, const char *what, struct dm_ioctl *io, size_t size, const char *name,
                   uint32_t flags, uint32_t targets)
{
    memset(io, 0, sizeof(*io));
    io->version[0] = DM_VERSION_MAJOR;  /* minor 0: everything used here exists since 4.0, any 4.x kernel takes it */
    io->data_size = (uint32_t)size;
    io->data_start = sizeof(*io);
    io->flags = flags;
    io->target_count = targets;
    if (name)
        snprintf(io->name, sizeof(io->name), "%s", name);
    if (ioctl(fd, cmd, io) == 0)
        return 0;
    int err = errno;
    fprintf(stderr, "dmlinear: %s%s%s: %s", what, name ? " " : "", name ? name : "", strerror(err));
    if (io->version[0] && io->version[0] != DM_VERSION_MAJOR)
        fprintf(stderr, " (kernel dm-ioctl %u.%u.%u, need %u.x)", io->version[0], io->version[1], io->version[2],
                DM_VERSION_MAJOR);
    fprintf(stderr, "%s\n", cmd == DM_TABLE_LOAD ? " (see the kernel log for the target's reason)"
                           : cmd == DM_DEV_CREATE && err == EBUSY ? " (a device of that name exists)" : "");
    errno = err;
    return -1;
}

static int parse_line(const char *line, struct target *t)
{
    int used = 0;
    if (sscanf(line, " %llu %llu %15s %n", &t->start, &t->length, t->type, &used) != 3 || !line[used]) {
        fprintf(stderr, "dmlinear: bad table line \"%s\": want \"START LEN TYPE PARAMS\"\n", line);
        return -1;
    }
    if (!t->length) {
        fprintf(stderr, "dmlinear: bad table line \"%s\": LEN is 0\n", line);
        return -1;
    }
    t->params = line + used;
    return 0;
}

/* The block node, with the dev_t the kernel gave (new_encode_dev: 12-bit major, 20-bit minor, split). */
static int make_node(const char *name, uint64_t kdev, char *path, size_t pathlen)
{
    unsigned int maj = (unsigned int)((kdev & 0xfff00) >> 8);
    unsigned int min = (unsigned int)((kdev & 0xff) | ((kdev >> 12) & 0xfff00));
    struct stat st;
    snprintf(path, pathlen, "%s/%s", MAPPER_DIR, name);
    if (mknod(path, S_IFBLK | 0600, makedev(maj, min)) == 0)
        return 0;
    if (errno == EEXIST && stat(path, &st) == 0 && S_ISBLK(st.st_mode) && st.st_rdev == makedev(maj, min))
        return 0;
    fprintf(stderr, "dmlinear: mknod %s %u:%u: %s\n", path, maj, min,
            errno == EEXIST ? "exists and is not that block device" : strerror(errno));
    return -1;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        usage(stdout);
        return 0;
    }
    if (argc < 3) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[1];
    if (!*name || strlen(name) >= DM_NAME_LEN || strchr(name, '/') || !strcmp(name, DM_CONTROL_NODE)) {
        fprintf(stderr, "dmlinear: bad device name \"%s\" (1-%d characters, no '/', not \"%s\")\n", name,
                DM_NAME_LEN - 1, DM_CONTROL_NODE);
        return 2;
    }
    int n = argc - 2;
    struct target *targets = calloc((size_t)n, sizeof(*targets));
    size_t size = sizeof(struct dm_ioctl);
    if (!targets) {
        perror("dmlinear: calloc");
        return 1;
    }
    for (int i = 0; i < n; i++) {
        if (parse_line(argv[i + 2], &targets[i]))
            return 2;
        size += ALIGN8(sizeof(struct dm_target_spec) + strlen(targets[i].params) + 1);
    }
    if (size > UINT32_MAX) {
        fprintf(stderr, "dmlinear: table too large\n");
        return 2;
    }

    /* data_start (sizeof dm_ioctl) is a multiple of 8, so every spec lands 8-byte aligned, as the kernel wants */
    struct dm_ioctl *io = calloc(1, size);
    if (!io) {
        perror("dmlinear: calloc");
        return 1;
    }
    int fd = open_control();
    if (fd < 0)
        return 1;
    if (dm_call(fd, DM_VERSION, "DM_VERSION", io, sizeof(*io), NULL, 0, 0))
        return 1;
    if (dm_call(fd, DM_DEV_CREATE, "DM_DEV_CREATE", io, sizeof(*io), name, 0, 0))
        return 1;

    memset(io, 0, size);
    char *p = (char *)io + sizeof(*io);
    for (int i = 0; i < n; i++) {
        struct dm_target_spec *spec = (struct dm_target_spec *)p;
        size_t len = ALIGN8(sizeof(*spec) + strlen(targets[i].params) + 1);
        spec->sector_start = targets[i].start;
        spec->length = targets[i].length;
        spec->next = (uint32_t)len;  /* on load: bytes from this spec to the next one */
        memcpy(spec->target_type, targets[i].type, sizeof(spec->target_type));
        strcpy((char *)(spec + 1), targets[i].params);
        p += len;
    }
    if (dm_call(fd, DM_TABLE_LOAD, "DM_TABLE_LOAD", io, size, name, 0, (uint32_t)n)
        || dm_call(fd, DM_DEV_SUSPEND, "resume (DM_DEV_SUSPEND)", io, sizeof(*io), name, 0, 0)) {
        dm_call(fd, DM_DEV_REMOVE, "DM_DEV_REMOVE", io, sizeof(*io), name, 0, 0);  /* leave no inactive husk */
        return 1;
    }

    char path[sizeof(MAPPER_DIR) + DM_NAME_LEN + 1];
    uint64_t kdev = io->dev;
    if (make_node(name, kdev, path, sizeof(path)))
        return 1;
    printf("%s %u:%u\n", path, (unsigned int)((kdev & 0xfff00) >> 8),
           (unsigned int)((kdev & 0xff) | ((kdev >> 12) & 0xfff00)));
    close(fd);
    return 0;
}
