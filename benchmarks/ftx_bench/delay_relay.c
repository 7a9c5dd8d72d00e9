/*
 * delay_relay: an L2 bridge between two interfaces that holds every frame a fixed time.
 *
 *   delay_relay IF1 IF2 ONE_WAY_US MAX_QUEUE_BYTES
 *
 * Part of flwr-transports (benchmarks/ftx_bench/wan.py compiles it with the machine's
 * C compiler at first use; the Python relay in wan.py is the fallback and has the same
 * behaviour). Design:
 *
 *  - two AF_PACKET/SOCK_RAW sockets bound to IF1 and IF2, with PACKET_VNET_HDR (GSO
 *    frames up to 64 KiB pass whole, with their virtio-net header) and
 *    PACKET_IGNORE_OUTGOING (we do not see what we send), PACKET_QDISC_BYPASS on send;
 *  - one byte ring per direction, of MAX_QUEUE_BYTES: a frame is received straight into
 *    the ring behind a small header holding its due time (arrival + ONE_WAY_US) and is
 *    sent from the ring once due. FIFO with a constant delay: due times are monotonic.
 *    A frame that does not fit is dropped and counted (tail drop, like a full router
 *    queue), so memory stays bounded;
 *  - one ppoll loop: wake for readable sockets, for the earliest due frame (ns timeout),
 *    or for POLLOUT when a send would block (the frame then stays queued);
 *  - dies with its parent (PR_SET_PDEATHSIG); SIGTERM/SIGINT end it after a last stats
 *    line; SIGUSR1 prints a stats line on stdout.
 *
 * Prints "ready" on stdout once both sockets are bound.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_VNET_HDR
#define PACKET_VNET_HDR 15
#endif
#ifndef PACKET_QDISC_BYPASS
#define PACKET_QDISC_BYPASS 20
#endif
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

#define FRAME_MAX (65536 + 256) /* vnet header + ethernet header + 64 KiB GSO payload */
#define HDR 16                  /* record header: due time (8) + length (4) + pad (4) */
#define REC_MAX (HDR + FRAME_MAX)
#define WRAP 0xffffffffu
#define BATCH 64

struct rec {
    uint64_t due;
    uint32_t len;
    uint32_t pad;
};

struct ring {
    uint8_t *buf;
    size_t cap, head, tail, count, used, used_max;
};

struct stats {
    unsigned long long frames, bytes, drops_full, drops_send, truncated;
    unsigned long long late_sum_ns, late_max_ns;
};

static volatile sig_atomic_t g_stop, g_report;
static struct stats g_st[2];
static struct ring g_ring[2];

static void on_signal(int sig) {
    if (sig == SIGUSR1)
        g_report = 1;
    else
        g_stop = 1;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static size_t align8(size_t n) { return (n + 7) & ~(size_t)7; }

/* Where a frame of up to FRAME_MAX bytes can be received, or NULL if the ring is full. */
static uint8_t *ring_reserve(struct ring *r) {
    if (r->count == 0) {
        r->head = r->tail = 0;
        return r->buf + HDR;
    }
    if (r->tail >= r->head) { /* not wrapped: free space at the end, then before head */
        if (r->cap - r->tail >= REC_MAX)
            return r->buf + r->tail + HDR;
        if (r->head > REC_MAX) {
            if (r->cap - r->tail >= HDR)
                ((struct rec *)(r->buf + r->tail))->len = WRAP;
            r->used += r->cap - r->tail;
            r->tail = 0;
            return r->buf + HDR;
        }
        return NULL;
    }
    if (r->head - r->tail > REC_MAX)
        return r->buf + r->tail + HDR;
    return NULL;
}

static void ring_commit(struct ring *r, uint64_t due, size_t len) {
    struct rec *h = (struct rec *)(r->buf + r->tail);
    h->due = due;
    h->len = (uint32_t)len;
    size_t sz = align8(HDR + len);
    r->tail += sz;
    r->used += sz;
    r->count++;
    if (r->used > r->used_max)
        r->used_max = r->used;
}

static struct rec *ring_peek(struct ring *r) {
    return r->count ? (struct rec *)(r->buf + r->head) : NULL;
}

static void ring_pop(struct ring *r) {
    struct rec *h = (struct rec *)(r->buf + r->head);
    size_t sz = align8(HDR + h->len);
    size_t old = r->head;
    r->head += sz;
    r->count--;
    if (r->count && (r->cap - r->head < HDR || ((struct rec *)(r->buf + r->head))->len == WRAP))
        r->head = 0;
    /* bytes freed: the record, plus the skipped end of the buffer when head wrapped */
    r->used -= (r->head == 0 && r->count) ? (r->cap - old) : sz;
    if (r->count == 0) {
        r->head = r->tail = 0;
        r->used = 0;
    }
}

static int open_port(const char *ifname) {
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) {
        perror("socket(AF_PACKET)");
        return -1;
    }
    int one = 1, big = 64 * 1024 * 1024;
    if (setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof one) < 0) {
        perror("PACKET_VNET_HDR");
        return -1;
    }
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) < 0) {
        perror("PACKET_IGNORE_OUTGOING");
        return -1;
    }
    (void)setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) < 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = (int)if_nametoindex(ifname);
    if (sll.sll_ifindex == 0) {
        fprintf(stderr, "delay_relay: no interface %s\n", ifname);
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
        perror("bind");
        return -1;
    }
    return fd;
}

static void report(const char *what) {
    for (int d = 0; d < 2; d++) {
        struct stats *s = &g_st[d];
        unsigned long long n = s->frames ? s->frames : 1;
        printf("%s dir=%d frames=%llu bytes=%llu drops_full=%llu drops_send=%llu "
               "truncated=%llu late_avg_us=%.1f late_max_us=%.1f queue_max_bytes=%zu\n",
               what, d, s->frames, s->bytes, s->drops_full, s->drops_send, s->truncated,
               s->late_sum_ns / 1e3 / (double)n, s->late_max_ns / 1e3, g_ring[d].used_max);
    }
    fflush(stdout);
}

/* Send every due frame of direction d (received on fd[d]) out of fd[1-d].
 * Returns 1 if a send would block (wait for POLLOUT), else 0. */
static int flush_due(int d, const int fd[2], uint64_t now) {
    struct ring *r = &g_ring[d];
    struct rec *h;
    while ((h = ring_peek(r)) && h->due <= now) {
        ssize_t n = send(fd[1 - d], (uint8_t *)h + HDR, h->len, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            if (errno == EINTR)
                continue;
            g_st[d].drops_send++; /* ENOBUFS (peer backlog full), link down...: drop it */
        } else {
            uint64_t late = now - h->due;
            g_st[d].frames++;
            g_st[d].bytes += h->len;
            g_st[d].late_sum_ns += late;
            if (late > g_st[d].late_max_ns)
                g_st[d].late_max_ns = late;
        }
        ring_pop(r);
        now = now_ns();
    }
    return 0;
}

static void drain_rx(int d, int fd, uint64_t delay_ns) {
    static uint8_t scratch[FRAME_MAX];
    for (int i = 0; i < BATCH; i++) {
        uint8_t *dst = ring_reserve(&g_ring[d]);
        int full = dst == NULL;
        ssize_t n = recv(fd, full ? scratch : dst, FRAME_MAX, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0)
            return; /* EAGAIN, EINTR, or an error we retry on the next wake-up */
        if (full) {
            g_st[d].drops_full++;
            continue;
        }
        if ((size_t)n > FRAME_MAX) {
            g_st[d].truncated++;
            continue;
        }
        ring_commit(&g_ring[d], now_ns() + delay_ns, (size_t)n);
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s IF1 IF2 ONE_WAY_US MAX_QUEUE_BYTES\n", argv[0]);
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1)
        return 1;
    char *end;
    double one_way_us = strtod(argv[3], &end);
    if (*end || !(one_way_us >= 0 && one_way_us <= 10e6)) {
        fprintf(stderr, "delay_relay: bad delay %s\n", argv[3]);
        return 2;
    }
    unsigned long long qmax = strtoull(argv[4], &end, 10);
    if (*end || qmax > (1ull << 36)) {
        fprintf(stderr, "delay_relay: bad queue size %s\n", argv[4]);
        return 2;
    }
    if (qmax < 4 * REC_MAX)
        qmax = 4 * REC_MAX;
    uint64_t delay_ns = (uint64_t)(one_way_us * 1000.0);

    for (int d = 0; d < 2; d++) {
        g_ring[d].cap = align8((size_t)qmax);
        g_ring[d].buf = malloc(g_ring[d].cap); /* pages are touched only as the queue fills */
        if (!g_ring[d].buf) {
            fprintf(stderr, "delay_relay: cannot allocate %llu bytes\n", qmax);
            return 1;
        }
    }
    int fd[2] = {open_port(argv[1]), open_port(argv[2])};
    if (fd[0] < 0 || fd[1] < 0)
        return 1;

    sigset_t block, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, &waitmask); /* waitmask: the old mask, used in ppoll */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);

    printf("ready\n");
    fflush(stdout);

    int blocked[2] = {0, 0}; /* direction d waits for POLLOUT on fd[1-d] */
    while (!g_stop) {
        if (g_report) {
            g_report = 0;
            report("stats");
        }
        uint64_t now = now_ns();
        int64_t wait = -1;
        for (int d = 0; d < 2; d++) {
            blocked[d] = flush_due(d, fd, now);
            struct rec *h = ring_peek(&g_ring[d]);
            if (h && !blocked[d]) {
                uint64_t t = now_ns();
                int64_t w = h->due > t ? (int64_t)(h->due - t) : 0;
                if (wait < 0 || w < wait)
                    wait = w;
            }
        }
        struct pollfd p[2];
        for (int i = 0; i < 2; i++) {
            p[i].fd = fd[i];
            p[i].events = POLLIN | (blocked[1 - i] ? POLLOUT : 0);
            p[i].revents = 0;
        }
        struct timespec ts = {(time_t)(wait / 1000000000), (long)(wait % 1000000000)};
        int n = ppoll(p, 2, wait < 0 ? NULL : &ts, &waitmask);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("ppoll");
            return 1;
        }
        for (int i = 0; i < 2; i++)
            if (p[i].revents & POLLIN)
                drain_rx(i, fd[i], delay_ns);
    }
    report("final");
    return 0;
}
