/* loadgen.c - an HTTP/1.1 load generator for asyncllm's benchmarks (bench/run.sh).
 *
 * One thread, one epoll loop, many keep-alive connections. Three modes:
 *
 *   open loop (--rate R > 0): requests are scheduled on a fixed timetable, request i at t0 + i/R. A due request
 *     goes out on an idle connection; when none is idle it waits in a FIFO until one is. Its latency is measured
 *     from its *scheduled* time, not from when it was sent, so a server that stalls is charged for every request
 *     that should have gone out meanwhile (no coordinated omission).
 *   closed loop (--rate 0): every connection sends its next request as soon as the previous answer arrived;
 *     latency from the actual send. This gives the maximum throughput at that many connections.
 *   idle (--idle N): opens N connections, sends one request on each, then keeps them open and silent for
 *     --hold seconds (to measure a server's memory per idle keep-alive connection).
 *
 * Requests: --method, --path (or --paths-file, one path per line, used round robin), --body or --body-file,
 * --header (repeatable). Output: one JSON object on stdout (throughput, latency percentiles from every sample,
 * errors by kind, status codes). With --save FILE the bodies of 2xx answers are appended to FILE, one a line.
 *
 * Only loopback or a numeric IPv4 host is accepted: this is a benchmark tool, not a network client. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum cstate { C_DOWN, C_CONNECTING, C_IDLE, C_BUSY };

struct conn {
    int fd;
    enum cstate state;
    uint64_t sched_ns; /* when the request in flight was due (open loop) or sent (closed loop) */
    bool measured;     /* its latency counts (scheduled inside the measurement window) */
    bool idle_done;    /* idle mode: the one request was answered */
    uint64_t retry_ns; /* C_DOWN: reconnect not before */
    const char *req;   /* request in flight */
    size_t req_len, wpos;
    char *rbuf;
    size_t rlen, rcap;
    int next_idle; /* free list of idle connections */
    bool listed;   /* on that list (entries of connections no longer idle are skipped when popped) */
};

struct request {
    char *data;
    size_t len;
};

static struct {
    struct sockaddr_in addr;
    char host[64];
    int port;
    const char *method;
    const char *path;
    const char *paths_file;
    const char *body;
    size_t body_len;
    char *headers; /* extra header lines, each ending in \r\n */
    size_t headers_len;
    int connections;
    double rate;
    double duration;
    double warmup;
    double drain;
    long max_requests; /* closed loop: stop after this many answers (0: by duration) */
    int idle;
    double hold;
    int connect_batch;
    const char *save;
    const char *label;
    const char *timeline;
} opt = {
    .method = "GET",
    .path = "/",
    .connections = 64,
    .rate = 0,
    .duration = 5,
    .warmup = 1,
    .drain = 10,
    .hold = 5,
    .connect_batch = 256,
};

static struct request *reqs;
static size_t nreqs, next_req;
static struct conn *conns;
static int epfd;
static int idle_head = -1;
static FILE *save_fp;
static volatile sig_atomic_t stop_flag;

/* results */
static uint32_t *lat_us;
static size_t nlat, lat_cap;
static uint64_t ok_count, measured_ok, sent_count, measured_sent;
static uint64_t err_connect, err_read, err_closed, err_parse, err_timeout, err_status;
static uint64_t status_count[600];
static size_t backlog_max;
static uint64_t reconnects;

/* --timeline: per TL_SLOT of the run (by scheduled time for the latency, by wall time for the rest), to tell a
 * stall of the server from one of the load generator itself (a long gap between two turns of its loop). */
#define TL_SLOT_NS 10000000ULL
struct tl_slot {
    uint32_t answers;     /* answers to requests scheduled in the slot */
    uint32_t lat_max_us;  /* their largest latency */
    uint32_t backlog_max; /* due requests waiting for a connection, at most */
    uint32_t gap_max_us;  /* longest gap between two turns of the loop */
};
static struct tl_slot *tl;
static size_t tl_n;
static uint64_t tl_t0, tl_last_turn;
static double t0_unix; /* wall-clock time of the run's t0 (open loop), to line the timeline up with other logs */

static uint32_t sat32(uint64_t v)
{
    return v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
}

static struct tl_slot *tl_at(uint64_t t)
{
    if (!tl || t < tl_t0)
        return NULL;
    size_t i = (size_t)((t - tl_t0) / TL_SLOT_NS);
    return i < tl_n ? &tl[i] : NULL;
}

/* One turn of a run's loop, at time t with qn requests due and waiting. */
static void tl_turn(uint64_t t, size_t qn)
{
    struct tl_slot *s = tl_at(t);
    if (!s)
        return;
    uint64_t gap = tl_last_turn ? (t - tl_last_turn) / 1000 : 0;
    tl_last_turn = t;
    if (sat32(gap) > s->gap_max_us)
        s->gap_max_us = sat32(gap);
    if (sat32(qn) > s->backlog_max)
        s->backlog_max = sat32(qn);
}

static void tl_write(void)
{
    FILE *f = fopen(opt.timeline, "w");
    if (!f) {
        fprintf(stderr, "loadgen: cannot write %s: %s\n", opt.timeline, strerror(errno));
        return;
    }
    fprintf(f, "t_ms answers lat_max_ms backlog_max loop_gap_max_ms\n");
    for (size_t i = 0; i < tl_n; i++)
        fprintf(f, "%zu %u %.3f %u %.3f\n", i * (size_t)(TL_SLOT_NS / 1000000), tl[i].answers,
                tl[i].lat_max_us / 1000.0, tl[i].backlog_max, tl[i].gap_max_us / 1000.0);
    fclose(f);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

/* A whole non-negative number from a flag, or exit. */
static long num(const char *s)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < 0)
        die("not a number: '%s'", s);
    return v;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot open %s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *b = xmalloc(cap);
    size_t r;
    while ((r = fread(b + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap)
            b = xrealloc(b, cap *= 2);
    }
    fclose(f);
    b[n] = '\0';
    *len = n;
    return b;
}

/* ---------------------------------------------------------------- requests */

static void add_request(const char *path)
{
    char head[4096];
    int hl;
    if (opt.body)
        hl = snprintf(
            head, sizeof head,
            "%s %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: asyncllm-loadgen\r\n%.*sContent-Length: %zu\r\n\r\n",
            opt.method, path, opt.host, opt.port, (int)opt.headers_len, opt.headers ? opt.headers : "", opt.body_len);
    else
        hl = snprintf(head, sizeof head, "%s %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: asyncllm-loadgen\r\n%.*s\r\n",
                      opt.method, path, opt.host, opt.port, (int)opt.headers_len, opt.headers ? opt.headers : "");
    if (hl < 0 || (size_t)hl >= sizeof head)
        die("request head too long");
    struct request r;
    r.len = (size_t)hl + (opt.body ? opt.body_len : 0);
    r.data = xmalloc(r.len);
    memcpy(r.data, head, (size_t)hl);
    if (opt.body)
        memcpy(r.data + hl, opt.body, opt.body_len);
    reqs = xrealloc(reqs, (nreqs + 1) * sizeof *reqs);
    reqs[nreqs++] = r;
}

static void build_requests(void)
{
    if (!opt.paths_file) {
        add_request(opt.path);
        return;
    }
    size_t len;
    char *all = read_file(opt.paths_file, &len);
    char *save = NULL;
    for (char *line = strtok_r(all, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save))
        if (line[0])
            add_request(line);
    free(all);
    if (!nreqs)
        die("%s has no paths", opt.paths_file);
}

static const struct request *take_request(void)
{
    const struct request *r = &reqs[next_req];
    next_req = (next_req + 1) % nreqs;
    return r;
}

/* ---------------------------------------------------------------- connections */

static void ep_set(struct conn *c, uint32_t events, int op)
{
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, op, c->fd, &ev) != 0 && op != EPOLL_CTL_DEL)
        die("epoll_ctl: %s", strerror(errno));
}

static void idle_push(struct conn *c)
{
    c->state = C_IDLE;
    if (c->listed)
        return;
    c->listed = true;
    c->next_idle = idle_head;
    idle_head = (int)(c - conns);
}

static struct conn *idle_pop(void)
{
    while (idle_head >= 0) {
        struct conn *c = &conns[idle_head];
        idle_head = c->next_idle;
        c->listed = false;
        if (c->state == C_IDLE)
            return c;
    }
    return NULL;
}

static int connecting;

static void conn_open(struct conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket: %s (raise ulimit -n?)", strerror(errno));
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->rlen = 0;
    c->wpos = 0;
    if (connect(c->fd, (struct sockaddr *)&opt.addr, sizeof opt.addr) == 0) {
        ep_set(c, EPOLLIN, EPOLL_CTL_ADD);
        idle_push(c);
        return;
    }
    if (errno != EINPROGRESS)
        die("connect: %s", strerror(errno));
    c->state = C_CONNECTING;
    connecting++;
    ep_set(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static void conn_close(struct conn *c, uint64_t retry_after_ns)
{
    if (c->state == C_CONNECTING)
        connecting--;
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = C_DOWN;
    c->retry_ns = now_ns() + retry_after_ns;
    c->rlen = 0;
}

/* A request failed on this connection (closed, reset, unparsable): counted, and the connection reopened. */
static void conn_fail(struct conn *c, uint64_t *counter)
{
    if (c->state == C_BUSY)
        (*counter)++;
    conn_close(c, 0);
    reconnects++;
}

static void conn_send(struct conn *c, const struct request *r, uint64_t sched, bool measured)
{
    c->state = C_BUSY;
    c->sched_ns = sched;
    c->measured = measured;
    c->req = r->data;
    c->req_len = r->len;
    c->wpos = 0;
    sent_count++;
    if (measured)
        measured_sent++;
    while (c->wpos < c->req_len) {
        ssize_t n = send(c->fd, c->req + c->wpos, c->req_len - c->wpos, MSG_NOSIGNAL);
        if (n > 0) {
            c->wpos += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            ep_set(c, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
            return;
        }
        conn_fail(c, &err_read);
        return;
    }
}

static void conn_flush(struct conn *c)
{
    while (c->wpos < c->req_len) {
        ssize_t n = send(c->fd, c->req + c->wpos, c->req_len - c->wpos, MSG_NOSIGNAL);
        if (n > 0) {
            c->wpos += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        conn_fail(c, &err_read);
        return;
    }
    ep_set(c, EPOLLIN, EPOLL_CTL_MOD);
}

/* ---------------------------------------------------------------- responses */

static void record(struct conn *c, int status, const char *body, size_t body_len, uint64_t t)
{
    if (status >= 100 && status < 600)
        status_count[status]++;
    bool ok = status >= 200 && status < 300;
    if (!ok) {
        err_status++;
        return;
    }
    ok_count++;
    if (save_fp) {
        fwrite(body, 1, body_len, save_fp);
        if (!body_len || body[body_len - 1] != '\n')
            fputc('\n', save_fp);
    }
    if (!c->measured)
        return;
    measured_ok++;
    if (nlat == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 1 << 16;
        lat_us = xrealloc(lat_us, lat_cap * sizeof *lat_us);
    }
    uint32_t us = sat32((t - c->sched_ns) / 1000);
    lat_us[nlat++] = us;
    struct tl_slot *s = tl_at(c->sched_ns);
    if (s) {
        s->answers++;
        if (us > s->lat_max_us)
            s->lat_max_us = us;
    }
}

static const char *find_header(const char *h, size_t hlen, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = h; p + nl + 1 < h + hlen; p++) {
        if ((p == h || p[-1] == '\n') && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            p += nl + 1;
            while (*p == ' ' || *p == '\t')
                p++;
            return p;
        }
    }
    return NULL;
}

/* Decodes a chunked body in place starting at b[0..len). Returns the bytes the chunked body spans when it is
 * complete (the decoded body is moved to the start, its length in *out), 0 when more is needed, -1 on error. */
static ssize_t dechunk(char *b, size_t len, size_t *out)
{
    size_t pos = 0, w = 0;
    for (;;) {
        char *crlf = memmem(b + pos, len - pos, "\r\n", 2);
        if (!crlf)
            return 0;
        char *end;
        unsigned long sz = strtoul(b + pos, &end, 16);
        if (end == b + pos)
            return -1;
        size_t data = (size_t)(crlf - b) + 2;
        if (sz == 0) {
            /* no trailers expected: the final CRLF */
            if (len < data + 2)
                return 0;
            *out = w;
            return (ssize_t)(data + 2);
        }
        if (len < data + sz + 2)
            return 0;
        memmove(b + w, b + data, sz);
        w += sz;
        pos = data + sz + 2;
    }
}

/* Tries to take one complete response from c->rbuf. Returns true if one was taken. */
static bool parse_response(struct conn *c, uint64_t t)
{
    char *b = c->rbuf;
    char *he = memmem(b, c->rlen, "\r\n\r\n", 4);
    if (!he)
        return false;
    size_t hlen = (size_t)(he - b) + 4;
    if (c->rlen < 12 || strncmp(b, "HTTP/1.", 7) != 0) {
        conn_fail(c, &err_parse);
        return false;
    }
    int status = (int)strtol(b + 9, NULL, 10);
    const char *cl = find_header(b, hlen, "Content-Length");
    const char *te = find_header(b, hlen, "Transfer-Encoding");
    const char *cn = find_header(b, hlen, "Connection");
    bool close_after = cn && strncasecmp(cn, "close", 5) == 0;
    size_t total, body_len;
    char *body = b + hlen;
    if (te && strncasecmp(te, "chunked", 7) == 0) {
        /* decode a copy: dechunk works in place on the body */
        ssize_t span = dechunk(body, c->rlen - hlen, &body_len);
        if (span < 0) {
            conn_fail(c, &err_parse);
            return false;
        }
        if (span == 0)
            return false;
        total = hlen + (size_t)span;
    } else if (cl) {
        body_len = strtoul(cl, NULL, 10);
        total = hlen + body_len;
        if (c->rlen < total)
            return false;
    } else {
        body_len = 0;
        total = hlen;
    }
    record(c, status, body, body_len, t);
    memmove(b, b + total, c->rlen - total);
    c->rlen -= total;
    if (close_after) {
        conn_close(c, 0);
        reconnects++;
        return false;
    }
    c->state = C_IDLE;
    return true;
}

static void conn_read(struct conn *c)
{
    for (;;) {
        if (c->rcap - c->rlen < 4096) {
            c->rcap = c->rcap ? c->rcap * 2 : 16384;
            c->rbuf = xrealloc(c->rbuf, c->rcap);
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen - 1, 0);
        if (n > 0) {
            size_t room = c->rcap - c->rlen - 1;
            c->rlen += (size_t)n;
            if ((size_t)n < room)
                break; /* short read: drained */
            continue;
        }
        if (n == 0) {
            conn_fail(c, &err_closed);
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            break;
        conn_fail(c, &err_read);
        return;
    }
    uint64_t t = now_ns();
    while (c->state == C_BUSY && c->rlen) {
        if (!parse_response(c, t))
            break;
        if (c->state == C_IDLE) {
            if (opt.idle)
                c->idle_done = true;
            else
                idle_push(c);
        }
    }
    if (c->state == C_IDLE && c->rlen) {
        /* bytes nobody asked for */
        conn_fail(c, &err_parse);
    }
}

/* ---------------------------------------------------------------- the loop */

static void on_event(struct conn *c, uint32_t ev)
{
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        connecting--;
        if (err) {
            err_connect++;
            c->state = C_DOWN;
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            c->retry_ns = now_ns() + 100000000ULL;
            return;
        }
        ep_set(c, EPOLLIN, EPOLL_CTL_MOD);
        idle_push(c);
        return;
    }
    if (c->state == C_DOWN)
        return;
    if (ev & EPOLLOUT && c->state == C_BUSY)
        conn_flush(c);
    if (c->state == C_DOWN)
        return;
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        if (c->state == C_IDLE) {
            /* an idle connection became readable: the server closed it (idle timeout) or sent junk */
            char tmp[256];
            ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                conn_close(c, 0);
                reconnects++;
            }
            return;
        }
        conn_read(c);
    }
}

static void reopen_down(uint64_t t)
{
    for (int i = 0; i < opt.connections && connecting < opt.connect_batch; i++) {
        struct conn *c = &conns[i];
        if (c->state == C_DOWN && c->retry_ns <= t)
            conn_open(c);
    }
}

static int poll_events(uint64_t wait_ns)
{
    struct epoll_event evs[512];
    struct timespec ts = {(time_t)(wait_ns / 1000000000ULL), (long)(wait_ns % 1000000000ULL)};
    int n = epoll_pwait2(epfd, evs, 512, &ts, NULL);
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        die("epoll_pwait2: %s", strerror(errno));
    }
    for (int i = 0; i < n; i++)
        on_event(&conns[evs[i].data.u32], evs[i].events);
    return n;
}

static int busy_count(void)
{
    int n = 0;
    for (int i = 0; i < opt.connections; i++)
        n += conns[i].state == C_BUSY;
    return n;
}

static int count_state(enum cstate s)
{
    int n = 0;
    for (int i = 0; i < opt.connections; i++)
        n += conns[i].state == s;
    return n;
}

/* Count of down connections, for the reconnect scan: avoids scanning every loop when nothing is down. */
static int down_count(void)
{
    return count_state(C_DOWN);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p)
{
    if (!nlat)
        return -1;
    size_t i = (size_t)(p / 100.0 * (double)(nlat - 1) + 0.5);
    if (i >= nlat)
        i = nlat - 1;
    return lat_us[i] / 1000.0;
}

static void print_json(const char *mode, double window_s, size_t still_busy)
{
    qsort(lat_us, nlat, sizeof *lat_us, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < nlat; i++)
        sum += lat_us[i];
    printf("{\"label\":\"%s\",\"mode\":\"%s\",\"host\":\"%s\",\"port\":%d,\"method\":\"%s\",\"path\":\"%s\","
           "\"paths\":%zu,\"body_bytes\":%zu,\"connections\":%d,\"offered_rps\":%.1f,\"duration_s\":%.3f,"
           "\"warmup_s\":%.3f,",
           opt.label ? opt.label : "", mode, opt.host, opt.port, opt.method, opt.paths_file ? "(file)" : opt.path,
           nreqs, opt.body ? opt.body_len : 0, opt.connections, opt.rate, window_s, opt.warmup);
    printf("\"requests\":%" PRIu64 ",\"measured_requests\":%" PRIu64 ",\"ok\":%" PRIu64 ",\"measured_ok\":%" PRIu64
           ",\"throughput_rps\":%.1f,",
           sent_count, measured_sent, ok_count, measured_ok, window_s > 0 ? (double)measured_ok / window_s : 0);
    printf("\"latency_ms\":{\"samples\":%zu,\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p99.9\":%.3f,"
           "\"max\":%.3f},",
           nlat, nlat ? sum / (double)nlat / 1000.0 : -1, pct(50), pct(90), pct(99), pct(99.9),
           nlat ? lat_us[nlat - 1] / 1000.0 : -1);
    printf("\"errors\":{\"total\":%" PRIu64 ",\"connect\":%" PRIu64 ",\"read\":%" PRIu64 ",\"closed\":%" PRIu64
           ",\"parse\":%" PRIu64 ",\"timeout\":%" PRIu64 ",\"status\":%" PRIu64 "},",
           err_connect + err_read + err_closed + err_parse + err_timeout + err_status, err_connect, err_read,
           err_closed, err_parse, err_timeout + still_busy, err_status);
    printf("\"status\":{");
    bool first = true;
    for (int s = 0; s < 600; s++)
        if (status_count[s]) {
            printf("%s\"%d\":%" PRIu64, first ? "" : ",", s, status_count[s]);
            first = false;
        }
    printf("},\"backlog_max\":%zu,\"reconnects\":%" PRIu64 ",\"t0_unix\":%.3f}\n", backlog_max, reconnects, t0_unix);
    fflush(stdout);
}

/* ---------------------------------------------------------------- modes */

static void run_closed(void)
{
    uint64_t t0 = now_ns();
    uint64_t wstart = t0 + (uint64_t)(opt.warmup * 1e9);
    uint64_t tend = wstart + (uint64_t)(opt.duration * 1e9);
    if (opt.max_requests) {
        wstart = t0;
        tend = UINT64_MAX;
    }
    for (int i = 0; i < opt.connections; i++)
        conns[i].state = C_DOWN;
    uint64_t last_down_scan = 0;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= tend || stop_flag || (opt.max_requests && ok_count + err_status >= (uint64_t)opt.max_requests))
            break;
        if (t - last_down_scan > 5000000ULL && down_count()) {
            reopen_down(t);
            last_down_scan = t;
        }
        struct conn *c;
        while ((c = idle_pop())) {
            if (opt.max_requests && sent_count >= (uint64_t)opt.max_requests) {
                idle_push(c);
                break;
            }
            conn_send(c, take_request(), now_ns(), now_ns() >= wstart);
        }
        poll_events(t + 10000000ULL < tend ? 10000000ULL : tend - t);
    }
    uint64_t t_stop = now_ns();
    /* answers still due are not waited for: the window is closed */
    double window = opt.max_requests ? (double)(t_stop - t0) / 1e9 : (double)(tend - wstart) / 1e9;
    /* closed loop: measured_ok counts answers to requests sent inside the window, including ones that arrived
     * just after it; close enough at thousands of requests per second, and symmetric for every server. */
    print_json(opt.max_requests ? "closed-count" : "closed", window, 0);
}

static void run_open(void)
{
    uint64_t interval = (uint64_t)(1e9 / opt.rate);
    for (int i = 0; i < opt.connections; i++)
        conns[i].state = C_DOWN;
    /* connect everything first */
    uint64_t deadline = now_ns() + 10000000000ULL;
    while (count_state(C_IDLE) < opt.connections && now_ns() < deadline) {
        reopen_down(now_ns());
        poll_events(10000000ULL);
    }
    uint64_t t0 = now_ns();
    uint64_t wstart = t0 + (uint64_t)(opt.warmup * 1e9);
    uint64_t tend = wstart + (uint64_t)(opt.duration * 1e9);
    uint64_t nsched = (tend - t0) / interval;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    t0_unix = (double)wall.tv_sec + (double)wall.tv_nsec / 1e9;
    if (opt.timeline) {
        tl_t0 = t0;
        tl_n = (size_t)((tend - t0) / TL_SLOT_NS) + 1;
        tl = calloc(tl_n, sizeof *tl);
        if (!tl)
            die("out of memory");
    }
    /* FIFO of due requests waiting for a connection */
    size_t qcap = 1 << 16, qh = 0, qn = 0;
    uint64_t *q = xmalloc(qcap * sizeof *q);
    uint64_t i = 0, last_down_scan = 0;
    for (;;) {
        uint64_t t = now_ns();
        while (i < nsched && t0 + i * interval <= t) {
            if (qn == qcap) {
                uint64_t *nq = xmalloc(qcap * 2 * sizeof *nq);
                for (size_t k = 0; k < qn; k++)
                    nq[k] = q[(qh + k) % qcap];
                free(q);
                q = nq;
                qh = 0;
                qcap *= 2;
            }
            q[(qh + qn) % qcap] = t0 + i * interval;
            qn++;
            i++;
        }
        if (qn > backlog_max)
            backlog_max = qn;
        tl_turn(t, qn);
        struct conn *c;
        while (qn && (c = idle_pop())) {
            uint64_t s = q[qh];
            qh = (qh + 1) % qcap;
            qn--;
            conn_send(c, take_request(), s, s >= wstart);
        }
        if (t - last_down_scan > 5000000ULL && down_count()) {
            reopen_down(t);
            last_down_scan = t;
        }
        if (stop_flag)
            break;
        if (i >= nsched && qn == 0)
            break;
        uint64_t wait;
        if (i < nsched) {
            uint64_t next = t0 + i * interval;
            wait = next > t ? next - t : 0;
        } else {
            wait = 10000000ULL;
        }
        if (wait > 10000000ULL)
            wait = 10000000ULL;
        if (qn && wait > 1000000ULL)
            wait = 1000000ULL;
        poll_events(wait);
        if (i >= nsched && now_ns() > tend + (uint64_t)(opt.drain * 1e9))
            break;
    }
    /* the last answers */
    uint64_t dl = now_ns() + (uint64_t)(opt.drain * 1e9);
    while (busy_count() && now_ns() < dl && !stop_flag)
        poll_events(10000000ULL);
    size_t unsent = qn;
    free(q);
    print_json("open", (double)(tend - wstart) / 1e9, (size_t)busy_count() + unsent);
    if (tl)
        tl_write();
}

static void run_idle(void)
{
    for (int i = 0; i < opt.connections; i++)
        conns[i].state = C_DOWN;
    uint64_t deadline = now_ns() + 60000000000ULL;
    int done = 0;
    while (now_ns() < deadline && !stop_flag) {
        uint64_t t = now_ns();
        reopen_down(t);
        struct conn *c;
        while ((c = idle_pop()))
            if (!c->idle_done)
                conn_send(c, take_request(), now_ns(), true);
        poll_events(5000000ULL);
        done = 0;
        for (int k = 0; k < opt.connections; k++)
            done += conns[k].idle_done && conns[k].state == C_IDLE;
        if (done == opt.connections)
            break;
    }
    fprintf(stderr, "loadgen: ready: %d idle connections open\n", done);
    uint64_t hold_end = now_ns() + (uint64_t)(opt.hold * 1e9);
    while (now_ns() < hold_end && !stop_flag)
        poll_events(50000000ULL);
    int open = 0;
    for (int k = 0; k < opt.connections; k++)
        open += conns[k].state == C_IDLE;
    printf("{\"label\":\"%s\",\"mode\":\"idle\",\"connections\":%d,\"established\":%d,\"open_after_hold\":%d,"
           "\"hold_s\":%.1f,\"errors\":{\"connect\":%" PRIu64 ",\"status\":%" PRIu64 "}}\n",
           opt.label ? opt.label : "", opt.connections, done, open, opt.hold, err_connect, err_status);
    fflush(stdout);
}

/* ---------------------------------------------------------------- main */

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: loadgen [options] http://127.0.0.1:PORT[/path]\n"
               "  -r, --rate R          open loop at R requests/s (0: closed loop, max throughput; default 0)\n"
               "  -c, --connections N   keep-alive connections (default 64)\n"
               "  -d, --duration S      measured seconds (default 5)\n"
               "  -w, --warmup S        seconds before measuring (default 1)\n"
               "      --drain S         open loop: how long to wait for the last answers (default 10)\n"
               "  -n, --requests N      closed loop: stop after N answers (no warm-up, duration ignored)\n"
               "  -m, --method M        GET, POST, ... (default GET)\n"
               "  -b, --body TEXT       request body (sends Content-Length)\n"
               "      --body-file F     request body from a file\n"
               "  -H, --header 'K: V'   extra request header (repeatable)\n"
               "      --paths-file F    one path per line, used round robin (instead of the URL's path)\n"
               "      --idle N          open N connections, one request each, then hold them idle\n"
               "      --hold S          idle mode: seconds to hold (default 5)\n"
               "      --connect-batch N connections being opened at once (default 256)\n"
               "      --save F          append the bodies of 2xx answers to F, one a line\n"
               "      --label L         copied into the JSON output\n"
               "      --timeline F      open loop: write F, one line per 10 ms: answers, their largest latency,\n"
               "                        the backlog, and the longest gap between two turns of loadgen's own loop\n"
               "Prints one JSON object: throughput, latency percentiles (ms), errors, status codes.\n"
               "Open loop: latency is measured from each request's scheduled time (no coordinated omission).\n");
}

static void parse_url(const char *url)
{
    if (strncmp(url, "http://", 7) != 0)
        die("only http://HOST:PORT/... URLs");
    const char *h = url + 7;
    const char *colon = strchr(h, ':');
    const char *slash = strchr(h, '/');
    if (!colon || (slash && slash < colon))
        die("the URL needs a port: http://127.0.0.1:PORT/path");
    size_t hl = (size_t)(colon - h);
    if (hl >= sizeof opt.host)
        die("host too long");
    memcpy(opt.host, h, hl);
    opt.host[hl] = '\0';
    if (strcmp(opt.host, "localhost") == 0)
        snprintf(opt.host, sizeof opt.host, "127.0.0.1");
    opt.port = (int)strtol(colon + 1, NULL, 10);
    if (opt.port <= 0 || opt.port > 65535)
        die("bad port");
    if (slash)
        opt.path = slash;
    memset(&opt.addr, 0, sizeof opt.addr);
    opt.addr.sin_family = AF_INET;
    opt.addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &opt.addr.sin_addr) != 1)
        die("host must be a numeric IPv4 address (e.g. 127.0.0.1)");
    if ((ntohl(opt.addr.sin_addr.s_addr) >> 24) != 127)
        die("refusing a non-loopback target %s: benchmarks run on loopback only", opt.host);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"rate", required_argument, NULL, 'r'},
        {"connections", required_argument, NULL, 'c'},
        {"duration", required_argument, NULL, 'd'},
        {"warmup", required_argument, NULL, 'w'},
        {"drain", required_argument, NULL, 1},
        {"requests", required_argument, NULL, 'n'},
        {"method", required_argument, NULL, 'm'},
        {"body", required_argument, NULL, 'b'},
        {"body-file", required_argument, NULL, 2},
        {"header", required_argument, NULL, 'H'},
        {"paths-file", required_argument, NULL, 3},
        {"idle", required_argument, NULL, 4},
        {"hold", required_argument, NULL, 5},
        {"connect-batch", required_argument, NULL, 6},
        {"save", required_argument, NULL, 7},
        {"label", required_argument, NULL, 8},
        {"timeline", required_argument, NULL, 9},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "r:c:d:w:n:m:b:H:h", lo, NULL)) != -1) {
        switch (ch) {
        case 'r':
            opt.rate = atof(optarg);
            break;
        case 'c':
            opt.connections = (int)num(optarg);
            break;
        case 'd':
            opt.duration = atof(optarg);
            break;
        case 'w':
            opt.warmup = atof(optarg);
            break;
        case 1:
            opt.drain = atof(optarg);
            break;
        case 'n':
            opt.max_requests = num(optarg);
            break;
        case 'm':
            opt.method = optarg;
            break;
        case 'b':
            opt.body = optarg;
            opt.body_len = strlen(optarg);
            break;
        case 2:
            opt.body = read_file(optarg, &opt.body_len);
            break;
        case 'H': {
            size_t l = strlen(optarg);
            opt.headers = xrealloc(opt.headers, opt.headers_len + l + 3);
            memcpy(opt.headers + opt.headers_len, optarg, l);
            memcpy(opt.headers + opt.headers_len + l, "\r\n", 3);
            opt.headers_len += l + 2;
            break;
        }
        case 3:
            opt.paths_file = optarg;
            break;
        case 4:
            opt.idle = (int)num(optarg);
            break;
        case 5:
            opt.hold = atof(optarg);
            break;
        case 6:
            opt.connect_batch = (int)num(optarg);
            break;
        case 7:
            opt.save = optarg;
            break;
        case 8:
            opt.label = optarg;
            break;
        case 9:
            opt.timeline = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        return 2;
    }
    parse_url(argv[optind]);
    if (opt.idle)
        opt.connections = opt.idle;
    if (opt.connections < 1 || opt.rate < 0 || opt.duration <= 0 || opt.warmup < 0 || opt.connect_batch < 1)
        die("bad option value");

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)opt.connections + 16)
        die("%d connections need more file descriptors than RLIMIT_NOFILE allows (%lu)", opt.connections,
            (unsigned long)rl.rlim_cur);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    if (opt.save && !(save_fp = fopen(opt.save, "a")))
        die("cannot open %s: %s", opt.save, strerror(errno));

    build_requests();
    conns = calloc((size_t)opt.connections, sizeof *conns);
    if (!conns)
        die("out of memory");
    for (int i = 0; i < opt.connections; i++)
        conns[i].fd = -1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1: %s", strerror(errno));

    if (opt.idle)
        run_idle();
    else if (opt.rate > 0)
        run_open();
    else
        run_closed();
    if (save_fp)
        fclose(save_fp);
    return 0;
}
