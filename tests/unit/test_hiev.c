/* Unit tests of our hiredis adapter (src/store/hiev.c), driving real hiredis async contexts on one event loop
 * against a fake Redis server in the same process (no threads, no redis-server). The server counts and checks
 * the pipelined commands, then answers them with replies it generated (each names its command's index; bulk
 * strings of a few bytes to 36 KiB, binary, some exactly 1, 2, 16 KiB long or a byte either side; arrays of 30 and of
 * hundreds of elements; nested arrays), written in one piece or in pieces that the client reads one at a time (random
 * sizes; exactly 1023, 1024, 1025, 16383, 16384, 16385 bytes; one reply each; cuts at and a few bytes around reply
 * ends). Every callback must get exactly its own reply (re-encoded and compared byte for byte), in order, once.
 * Also: a callback that frees or disconnects its context in the middle of one read's replies, the server closing
 * or resetting the connection with commands outstanding, and connections refused. make unit runs this under
 * ASan and UBSan, which check that the adapter does not touch a context a callback freed. Seeds are fixed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "sbuf.h"

#include "store/hiev.h"
#include "store/reply.h"

#include <event2/event.h>
#include <event2/listener.h>
#include <hiredis/hiredis.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#define DEADLINE_MS 3000 /* any wait longer than this fails the test */
#define MAX_PIECE 49152  /* the largest piece the client is made to read alone (socket buffers hold it) */

/* ---------------------------------------------------------------- helpers */

/* ASan is to find writes to the locals of a function that has returned too: hiev_read's "context freed" flag lives
 * in its frame, and a pointer to it left in the adapter after it returns would be written by the next cleanup. */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "detect_stack_use_after_return=1";
}

static void sb_fmt(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_fmt(struct sbuf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    assert_true(n >= 0 && (size_t)n < sizeof tmp);
    sb_add(b, tmp, (size_t)n);
}

static uint64_t rng;

static uint64_t rnd(void) /* splitmix64 */
{
    uint64_t z = (rng += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static size_t rnd_in(size_t lo, size_t hi) /* lo..hi, both included */
{
    return lo + (size_t)(rnd() % (hi - lo + 1));
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Bytes received on fd and not read yet. */
static size_t unread(int fd)
{
    int n = 0;
    assert_int_equal(ioctl(fd, FIONREAD, &n), 0);
    assert_true(n >= 0);
    return (size_t)n;
}

/* ---------------------------------------------------------------- the fixture */

enum got { NOT_YET, REPLY, NULL_REPLY };
enum act { NONE, FREE, DISCONNECT }; /* what the callback of command act_at does to its context */

/* The fake server's end of the one connection. */
struct sconn {
    int fd;
    struct event *rev, *wev;
    struct sbuf in;
    size_t parsed;  /* bytes of in that made complete commands */
    unsigned ncmds; /* commands received (each checked: GET k<its index>, or SET k<its index> <its value>) */
    size_t vlen;    /* the length of the SET commands' values */
    bool eof;
    const char *out; /* what the write event sends, out_len bytes, out_off sent */
    size_t out_len, out_off;
};

struct fix {
    struct event_base *base;
    struct evconnlistener *lis;
    struct event *tick; /* keeps EVLOOP_ONCE from waiting long */
    int port;
    struct sconn *sc;
    unsigned accepts;
    bool arena; /* replies built by store/reply.c's arenas, as the store does */

    redisAsyncContext *ac; /* NULL once freed (or about to be, by hiredis) */
    int connects, connect_status;
    int disconnects, disconnect_status, disconnect_err;
    unsigned calls_at_disconnect;

    unsigned n;      /* commands sent */
    struct sbuf exp; /* their replies, concatenated as the server sends them */
    size_t *off;     /* reply i is exp.p[off[i]..off[i + 1]) */
    enum got *got;   /* per command */
    unsigned calls;  /* reply callbacks run */
    unsigned nreply; /* of which with a reply */
    unsigned nnull;  /* with NULL */
    enum act act;    /* run by the callback of command act_at */
    unsigned act_at;
};

static void tick_cb(evutil_socket_t fd, short what, void *arg) {}

/* Runs one iteration of the loop (at most a couple of ms when nothing happens). */
static void spin(struct fix *f)
{
    assert_int_equal(event_base_loop(f->base, EVLOOP_ONCE), 0);
}

/* Runs whatever is ready, a few times over: callbacks that should not run would. */
static void settle(struct fix *f)
{
    for (int k = 0; k < 3; k++)
        assert_int_equal(event_base_loop(f->base, EVLOOP_NONBLOCK), 0);
}

#define RUN_UNTIL(f, cond)                                                                                             \
    do {                                                                                                               \
        int64_t deadline_ = now_ms() + DEADLINE_MS;                                                                    \
        while (!(cond)) {                                                                                              \
            if (now_ms() > deadline_)                                                                                  \
                fail_msg("timed out waiting for %s (calls %u of %u)", #cond, (f)->calls, (f)->n);                      \
            spin(f);                                                                                                   \
        }                                                                                                              \
    } while (0)

/* ---------------------------------------------------------------- the fake server */

/* Parses "<type><integer>\r\n" at p; returns what follows, or NULL when the line is not complete. */
static const char *parse_line(const char *p, const char *end, char type, long *v)
{
    const char *eol = memchr(p, '\n', (size_t)(end - p));
    if (!eol)
        return NULL;
    assert_int_equal(*p, type);
    assert_true(eol - p >= 3 && eol[-1] == '\r');
    char *e;
    errno = 0;
    *v = strtol(p + 1, &e, 10);
    assert_int_equal(errno, 0);
    assert_ptr_equal(e, eol - 1);
    return eol + 1;
}

/* The value of command i's SET: len bytes naming it, then letters. */
static void set_value(unsigned i, char *out, size_t len)
{
    char name[32];
    int nn = snprintf(name, sizeof name, "v%u;", i);
    for (size_t k = 0; k < len; k++)
        out[k] = k < (size_t)nn ? name[k] : (char)('a' + (i * 7 + k) % 26);
}

/* Counts the complete commands received; each must be GET k<its index>, or SET k<its index> <its value>. */
static void parse_commands(struct sconn *s)
{
    for (;;) {
        const char *p = s->in.p + s->parsed, *end = s->in.p + s->in.len;
        long argc, len[3];
        const char *arg[3];
        if (p == end || !(p = parse_line(p, end, '*', &argc)))
            return;
        assert_true(argc == 2 || argc == 3);
        for (int a = 0; a < argc; a++) {
            if (p == end || !(p = parse_line(p, end, '$', &len[a])))
                return;
            assert_true(len[a] >= 0);
            if (end - p < len[a] + 2)
                return;
            arg[a] = p;
            assert_memory_equal(p + len[a], "\r\n", 2);
            p += len[a] + 2;
        }
        char want[32];
        int wn = snprintf(want, sizeof want, "k%u", s->ncmds);
        assert_int_equal(len[0], 3);
        assert_memory_equal(arg[0], argc == 2 ? "GET" : "SET", 3);
        assert_int_equal(len[1], wn);
        assert_memory_equal(arg[1], want, (size_t)wn);
        if (argc == 3) {
            assert_int_equal(len[2], s->vlen);
            char *v = malloc(s->vlen);
            assert_non_null(v);
            set_value(s->ncmds, v, s->vlen);
            assert_memory_equal(arg[2], v, s->vlen);
            free(v);
        }
        s->ncmds++;
        s->parsed = (size_t)(p - s->in.p);
    }
}

static void srv_read_cb(evutil_socket_t fd, short what, void *arg)
{
    struct sconn *s = arg;
    char buf[65536];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        s->eof = true;
        event_del(s->rev);
        return;
    }
    sb_add(&s->in, buf, (size_t)n);
    parse_commands(s);
}

static void srv_write_cb(evutil_socket_t fd, short what, void *arg)
{
    struct sconn *s = arg;
    while (s->out_off < s->out_len) {
        ssize_t w = send(fd, s->out + s->out_off, s->out_len - s->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            assert_true(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR);
            return;
        }
        s->out_off += (size_t)w;
    }
    event_del(s->wev);
}

static void accept_cb(struct evconnlistener *lis, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
    struct fix *f = arg;
    assert_null(f->sc);
    f->accepts++;
    assert_int_equal(evutil_make_socket_nonblocking(fd), 0);
    int one = 1, sndbuf = 1 << 20; /* pieces leave at once, and a whole piece fits in the socket's buffers */
    assert_int_equal(setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one), 0);
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf), 0);
    struct sconn *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->fd = fd;
    s->rev = event_new(f->base, fd, EV_READ | EV_PERSIST, srv_read_cb, s);
    s->wev = event_new(f->base, fd, EV_WRITE | EV_PERSIST, srv_write_cb, s);
    assert_int_equal(event_add(s->rev, NULL), 0);
    f->sc = s;
}

/* Closes the server's end: a FIN, or a reset when rst. */
static void srv_close(struct fix *f, bool rst)
{
    struct sconn *s = f->sc;
    if (rst) {
        struct linger lg = {.l_onoff = 1, .l_linger = 0};
        assert_int_equal(setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
    }
    event_free(s->rev);
    event_free(s->wev);
    close(s->fd);
    free(s->in.p);
    free(s);
    f->sc = NULL;
}

/* Sends p[0..len) whole, without running the loop. */
static void srv_send(struct fix *f, const char *p, size_t len)
{
    int64_t deadline = now_ms() + DEADLINE_MS;
    while (len > 0) {
        ssize_t w = send(f->sc->fd, p, len, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            len -= (size_t)w;
            continue;
        }
        assert_true(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR);
        assert_true(now_ms() < deadline);
        struct pollfd pfd = {.fd = f->sc->fd, .events = POLLOUT};
        poll(&pfd, 1, 1);
    }
}

/* Sends p[0..len) and waits until all of it has arrived on the client's socket, where nothing else is: the
 * client's next read then takes exactly this piece (when it is at most the 16 KiB a read takes). */
static void srv_piece(struct fix *f, const char *p, size_t len)
{
    int cfd = f->ac->c.fd;
    assert_int_equal(unread(cfd), 0);
    srv_send(f, p, len);
    int64_t deadline = now_ms() + DEADLINE_MS;
    while (unread(cfd) < len) {
        assert_true(now_ms() < deadline);
        sched_yield();
    }
    assert_int_equal(unread(cfd), len);
}

/* Sends p[0..len) as a piece and lets the client read it all (one read, or more when it is over 16 KiB), or
 * until a callback ends the connection. */
static void piece_read(struct fix *f, const char *p, size_t len)
{
    srv_piece(f, p, len);
    int cfd = f->ac->c.fd;
    int64_t deadline = now_ms() + DEADLINE_MS;
    while (f->ac && unread(cfd) > 0) {
        assert_true(now_ms() < deadline);
        spin(f);
    }
}

/* ---------------------------------------------------------------- the client */

static void connect_cb(const redisAsyncContext *ac, int status)
{
    struct fix *f = ac->data;
    f->connects++;
    f->connect_status = status;
    if (status != REDIS_OK)
        f->ac = NULL; /* hiredis frees it on return */
}

static void disconnect_cb(const redisAsyncContext *ac, int status)
{
    struct fix *f = ac->data;
    f->disconnects++;
    f->disconnect_status = status;
    f->disconnect_err = ac->err;
    f->calls_at_disconnect = f->calls;
    f->ac = NULL;
}

/* Writes r as RESP (what the server sent for it: the generator writes nothing that has two encodings). */
static void encode(const redisReply *r, struct sbuf *b)
{
    switch (r->type) {
    case REDIS_REPLY_INTEGER:
        sb_fmt(b, ":%lld\r\n", r->integer);
        break;
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
        sb_str(b, r->type == REDIS_REPLY_STATUS ? "+" : "-");
        sb_add(b, r->str, r->len);
        sb_str(b, "\r\n");
        break;
    case REDIS_REPLY_STRING:
        sb_fmt(b, "$%zu\r\n", r->len);
        sb_add(b, r->str, r->len);
        sb_str(b, "\r\n");
        break;
    case REDIS_REPLY_NIL:
        sb_str(b, "$-1\r\n");
        break;
    case REDIS_REPLY_ARRAY:
        sb_fmt(b, "*%zu\r\n", r->elements);
        for (size_t i = 0; i < r->elements; i++)
            encode(r->element[i], b);
        break;
    default:
        fail_msg("unexpected reply type %d", r->type);
    }
}

static void reply_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    struct fix *f = ac->data;
    unsigned i = (unsigned)(uintptr_t)privdata;
    assert_true(i < f->n);
    assert_int_equal(f->got[i], NOT_YET);
    assert_int_equal(i, f->calls); /* in order: every earlier callback ran, once */
    f->calls++;
    if (r) {
        assert_int_equal(f->nnull, 0); /* nothing is answered after a NULL reply */
        struct sbuf b = {0};
        encode(r, &b);
        size_t len = f->off[i + 1] - f->off[i];
        if (b.len != len || memcmp(b.p, f->exp.p + f->off[i], len) != 0)
            fail_msg("command %u got a reply of %zu bytes, not its own of %zu: %.60s", i, b.len, len, b.p);
        free(b.p);
        f->got[i] = REPLY;
        f->nreply++;
    } else {
        f->got[i] = NULL_REPLY;
        f->nnull++;
    }
    if (f->act != NONE && i == f->act_at) {
        if (f->act == FREE) {
            f->ac = NULL;
            redisAsyncFree(ac);
        } else
            redisAsyncDisconnect(ac);
    }
}

/* Connects a new context through the adapter and waits until both ends have the connection. */
static void client_connect(struct fix *f)
{
    assert_null(f->ac);
    assert_null(f->sc);
    f->connects = f->disconnects = 0;
    redisAsyncContext *ac = redisAsyncConnect("127.0.0.1", f->port);
    assert_non_null(ac);
    assert_int_equal(ac->err, 0);
    ac->data = f;
    if (f->arena)
        reply_arena_use(ac->c.reader);
    assert_int_equal(hiev_attach(ac, f->base), REDIS_OK);
    assert_int_equal(hiev_attach(ac, f->base), REDIS_ERR); /* already attached */
    assert_int_equal(redisAsyncSetConnectCallback(ac, connect_cb), REDIS_OK);
    assert_int_equal(redisAsyncSetDisconnectCallback(ac, disconnect_cb), REDIS_OK);
    f->ac = ac;
    RUN_UNTIL(f, f->connects == 1 && f->sc);
    assert_int_equal(f->connect_status, REDIS_OK);
    assert_non_null(f->ac);
}

/* Forgets the previous commands; the next n will be answered with replies generated by gen. */
static void reset_commands(struct fix *f, unsigned n)
{
    free(f->got);
    free(f->off);
    free(f->exp.p);
    memset(&f->exp, 0, sizeof f->exp);
    f->n = n;
    f->got = calloc(n + 1, sizeof *f->got);
    f->off = calloc(n + 1, sizeof *f->off);
    assert_non_null(f->got);
    assert_non_null(f->off);
    f->calls = f->nreply = f->nnull = 0;
    f->act = NONE;
}

/* Sends the n commands and waits until the server has them all. */
static void send_commands(struct fix *f)
{
    for (unsigned i = 0; i < f->n; i++)
        assert_int_equal(redisAsyncCommand(f->ac, reply_cb, (void *)(uintptr_t)i, "GET k%u", i), REDIS_OK);
    RUN_UNTIL(f, f->sc->ncmds == f->n);
    assert_int_equal(f->calls, 0);
}

/* Frees the client's context from outside any callback and closes the server's end. */
static void client_close(struct fix *f)
{
    redisAsyncFree(f->ac);
    assert_null(f->ac); /* disconnect_cb ran */
    assert_int_equal(f->disconnects, 1);
    assert_int_equal(f->disconnect_status, REDIS_OK);
    RUN_UNTIL(f, f->sc->eof);
    srv_close(f, false);
}

/* ---------------------------------------------------------------- replies */

/* A bulk string of len bytes (at least those of its name) starting "<tag><i>.<j>;", then random bytes. */
static void gen_bulk(struct sbuf *b, const char *tag, unsigned i, unsigned j, size_t len)
{
    char name[64];
    int nn = snprintf(name, sizeof name, "%s%u.%u;", tag, i, j);
    if (len < (size_t)nn)
        len = (size_t)nn;
    sb_fmt(b, "$%zu\r\n", len);
    sb_add(b, name, (size_t)nn);
    for (size_t k = (size_t)nn; k < len; k += 8) { /* any byte: \r, \n and \0 included */
        uint64_t x = rnd();
        sb_add(b, &x, len - k < 8 ? len - k : 8);
    }
    sb_str(b, "\r\n");
}

static size_t digits(size_t v)
{
    size_t d = 1;
    while (v >= 10) {
        v /= 10;
        d++;
    }
    return d;
}

/* The encoded sizes of some bulk strings: at, and a byte either side of, the adapter's 1 KiB pieces and 16 KiB
 * reads. */
static const size_t exact_sizes[] = {1023, 1024, 1025, 2047, 2048, 2049, 16383, 16384, 16385, 32768};

/* Appends the reply to command i (its index in every reply that has content). small: only replies of at most a
 * few hundred bytes. */
static void gen_reply(struct sbuf *b, unsigned i, bool small)
{
    unsigned k = (unsigned)(rnd() % 100);
    if (small)
        k = k % 4 ? (unsigned)rnd_in(0, 51) : (unsigned)rnd_in(54, 84); /* no large strings or arrays */
    else if (i % 37 == 11) {
        size_t total = exact_sizes[(i / 37) % (sizeof exact_sizes / sizeof exact_sizes[0])];
        size_t len = total - 5; /* '$' digits "\r\n" string "\r\n" */
        while (len + digits(len) + 5 > total)
            len--;
        assert_int_equal(len + digits(len) + 5, total);
        size_t before = b->len;
        gen_bulk(b, "x", i, 0, len);
        assert_int_equal(b->len - before, total);
        return;
    }
    if (k < 12) {
        long long v = (long long)i * 1000 + (long long)(rnd() % 1000);
        sb_fmt(b, ":%lld\r\n", rnd() % 2 ? -v : v);
    } else if (k < 20)
        sb_fmt(b, "+OK i=%u\r\n", i);
    else if (k < 24)
        sb_fmt(b, "-ERR i=%u no such thing\r\n", i);
    else if (k < 26)
        sb_str(b, "$-1\r\n");
    else if (k < 52)
        gen_bulk(b, "s", i, 0, rnd_in(0, small ? 200 : 700));
    else if (k < 54)
        gen_bulk(b, "L", i, 0, rnd_in(16 * 1024, 36 * 1024));
    else if (k < 85) { /* HGETALL: 15 fields and their values */
        sb_str(b, "*30\r\n");
        for (unsigned j = 0; j < 30; j++)
            gen_bulk(b, j % 2 ? "v" : "f", i, j, j % 2 ? rnd_in(0, small ? 12 : 60) : 0);
    } else if (k < 90) { /* many small elements of every kind */
        unsigned m = (unsigned)rnd_in(100, 500);
        sb_fmt(b, "*%u\r\n", m);
        for (unsigned j = 0; j < m; j++) {
            switch (rnd() % 5) {
            case 0:
                sb_fmt(b, ":%u\r\n", j);
                break;
            case 1:
                sb_str(b, "$-1\r\n");
                break;
            case 2:
                sb_str(b, "$0\r\n\r\n");
                break;
            case 3:
                sb_fmt(b, "+st%u\r\n", j);
                break;
            default:
                gen_bulk(b, "e", i, j, rnd_in(0, 20));
            }
        }
    } else if (k < 97) { /* nested */
        sb_fmt(b, "*4\r\n:%u\r\n*3\r\n*0\r\n$-1\r\n*2\r\n", i);
        gen_bulk(b, "n", i, 1, rnd_in(0, 100));
        sb_fmt(b, "-E%u\r\n", i);
        sb_str(b, "*1\r\n$0\r\n\r\n");
        gen_bulk(b, "n", i, 2, rnd_in(0, 300));
    } else
        gen_bulk(b, "m", i, 0, rnd_in(900, 3000));
}

static void gen_replies(struct fix *f, bool small)
{
    for (unsigned i = 0; i < f->n; i++) {
        f->off[i] = f->exp.len;
        gen_reply(&f->exp, i, small);
    }
    f->off[f->n] = f->exp.len;
}

/* ---------------------------------------------------------------- 1. order and content */

/* How the server writes the replies: all at once as the socket takes them (WHOLE), or in pieces the client
 * reads one at a time: random sizes of 1..3000 bytes, a fixed size, one reply each, or cuts at (and up to 3
 * bytes either side of) the end of 1..12 replies. */
enum plan { WHOLE, RANDOM, FIXED, PER_REPLY, AT_ENDS };

static size_t next_cut(struct fix *f, enum plan plan, size_t size, size_t at)
{
    size_t total = f->exp.len, end = at;
    switch (plan) {
    case RANDOM:
        end = at + rnd_in(1, 3000);
        break;
    case FIXED:
        end = at + size;
        break;
    case PER_REPLY:
    case AT_ENDS: {
        unsigned lo = 0, hi = f->n; /* the reply that byte at is in: the last lo with off[lo] <= at */
        while (lo < hi) {
            unsigned mid = (lo + hi + 1) / 2;
            if (f->off[mid] <= at)
                lo = mid;
            else
                hi = mid - 1;
        }
        if (plan == PER_REPLY) {
            assert_int_equal(f->off[lo], at);
            end = f->off[lo + 1];
        } else {
            unsigned m = (unsigned)rnd_in(1, 12);
            end = f->off[lo + m < f->n ? lo + m : f->n] + rnd_in(0, 6);
            end = end > at + 3 ? end - 3 : at + 1;
        }
        break;
    }
    default:
        fail();
    }
    if (end - at > MAX_PIECE)
        end = at + MAX_PIECE;
    return end < total ? end : total;
}

/* n commands answered by replies written as plan says; every callback must get its reply, in order, once. */
static void order(struct fix *f, unsigned n, enum plan plan, size_t size, uint64_t seed)
{
    rng = seed;
    client_connect(f);
    reset_commands(f, n);
    gen_replies(f, false);
    send_commands(f);
    if (plan == WHOLE) {
        f->sc->out = f->exp.p;
        f->sc->out_len = f->exp.len;
        f->sc->out_off = 0;
        assert_int_equal(event_add(f->sc->wev, NULL), 0);
        RUN_UNTIL(f, f->calls == n);
    } else {
        size_t pieces = 0;
        for (size_t at = 0; at < f->exp.len; pieces++) {
            size_t end = next_cut(f, plan, size, at);
            assert_true(end > at);
            piece_read(f, f->exp.p + at, end - at);
            assert_non_null(f->ac);
            at = end;
        }
        assert_true(pieces > 1);
    }
    assert_int_equal(f->calls, n);
    assert_int_equal(f->nreply, n);
    assert_int_equal(f->nnull, 0);
    for (unsigned i = 0; i < n; i++)
        assert_int_equal(f->got[i], REPLY);
    assert_int_equal(f->disconnects, 0);
    settle(f); /* nothing more comes */
    assert_int_equal(f->calls, n);
    client_close(f);
}

#define N_ORDER 2000

static void test_order_whole(void **state)
{
    order(*state, N_ORDER, WHOLE, 0, 1);
}

static void test_order_random(void **state)
{
    order(*state, N_ORDER, RANDOM, 0, 2);
}

static void test_order_fixed(void **state)
{
    static const size_t sizes[] = {1023, 1024, 1025, 16383, 16384, 16385};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++)
        order(*state, N_ORDER, FIXED, sizes[k], 3 + k);
}

static void test_order_per_reply(void **state)
{
    order(*state, N_ORDER, PER_REPLY, 0, 10);
}

static void test_order_at_ends(void **state)
{
    order(*state, N_ORDER, AT_ENDS, 0, 11);
}

/* The same with the store's arena replies (store/reply.c), which a reply read over several pieces builds too. */
static void test_order_arena(void **state)
{
    struct fix *f = *state;
    f->arena = true;
    order(f, N_ORDER, RANDOM, 0, 12);
    order(f, N_ORDER, FIXED, 1024, 13);
    order(f, N_ORDER, AT_ENDS, 0, 14);
}

/* The replies, with their sizes, are what was meant: a mistake in the generator would make the tests above
 * weaker without failing them. */
static void test_replies_generated(void **state)
{
    struct fix *f = *state;
    rng = 1;
    reset_commands(f, N_ORDER);
    gen_replies(f, false);
    unsigned big = 0, exact1024 = 0, exact16384 = 0, arrays30 = 0;
    for (unsigned i = 0; i < f->n; i++) {
        size_t len = f->off[i + 1] - f->off[i];
        big += len > 16384;
        exact1024 += len == 1024;
        exact16384 += len == 16384;
        arrays30 += memcmp(f->exp.p + f->off[i], "*30\r\n", 5) == 0;
        char name[32];
        int nn = snprintf(name, sizeof name, "%u", i);
        bool named = memmem(f->exp.p + f->off[i], len, name, (size_t)nn) != NULL;
        assert_true(named || memcmp(f->exp.p + f->off[i], "$-1\r\n", 5) == 0);
    }
    assert_true(big >= 20);
    assert_true(exact1024 >= 5);
    assert_true(exact16384 >= 5);
    assert_true(arrays30 >= 300);
    assert_true(f->exp.len > 2 * 1024 * 1024);
}

/* The write path: more commands than the sockets hold while the server reads nothing are written as the socket
 * takes them (the adapter asks for the write event again each time), in order, once the server reads again. */
static void test_write_backlog(void **state)
{
    struct fix *f = *state;
    rng = 15;
    client_connect(f);
    reset_commands(f, 200);
    gen_replies(f, true);
    f->sc->vlen = 8192;
    assert_int_equal(event_del(f->sc->rev), 0); /* the server stops reading */
    int small = 64 * 1024; /* and the sockets hold much less than the commands (not megabytes, as they can) */
    assert_int_equal(setsockopt(f->sc->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    assert_int_equal(setsockopt(f->ac->c.fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
    char *v = malloc(f->sc->vlen);
    assert_non_null(v);
    for (unsigned i = 0; i < f->n; i++) {
        set_value(i, v, f->sc->vlen);
        assert_int_equal(redisAsyncCommand(f->ac, reply_cb, (void *)(uintptr_t)i, "SET k%u %b", i, v, f->sc->vlen),
                         REDIS_OK);
    }
    free(v);
    size_t queued = sdslen(f->ac->c.obuf);
    for (int k = 0; k < 10; k++)
        spin(f);
    size_t left = sdslen(f->ac->c.obuf);
    assert_true(left > 0 && left < queued); /* some written, the rest waiting for the socket */
    assert_int_equal(f->sc->ncmds, 0);
    assert_int_equal(event_add(f->sc->rev, NULL), 0);
    RUN_UNTIL(f, f->sc->ncmds == f->n);
    assert_int_equal(sdslen(f->ac->c.obuf), 0);
    f->sc->out = f->exp.p;
    f->sc->out_len = f->exp.len;
    assert_int_equal(event_add(f->sc->wev, NULL), 0);
    RUN_UNTIL(f, f->calls == f->n);
    assert_int_equal(f->nreply, f->n);
    client_close(f);
}

/* ---------------------------------------------------------------- 2. a callback frees its context */

#define N_BATCH 60

/* N_BATCH small commands, whose replies (all but their last cut_back bytes) the server sends in one piece of 4 to
 * 16 KiB, which the adapter takes in one read (of 16 KiB, as hiredis) and feeds to hiredis in several pieces; the
 * callback of command at frees or disconnects the context. */
static void batch(struct fix *f, enum act act, unsigned at, size_t cut_back, uint64_t seed)
{
    rng = seed;
    client_connect(f);
    reset_commands(f, N_BATCH);
    gen_replies(f, true);
    assert_true(f->exp.len > 4 * 1024 && f->exp.len <= 16 * 1024); /* several pieces of one read */
    send_commands(f);
    f->act = act;
    f->act_at = at;
    size_t sent = f->exp.len - cut_back;
    srv_piece(f, f->exp.p, sent);
    spin(f);            /* one read, and the callbacks of every reply in it */
    unsigned whole = 0; /* replies sent whole */
    while (whole < f->n && f->off[whole + 1] <= sent)
        whole++;
    if (act == FREE) {
        /* the callbacks up to the freeing one got their replies, every later one a NULL reply */
        assert_null(f->ac);
        assert_int_equal(f->calls, N_BATCH);
        assert_int_equal(f->nreply, at + 1);
        assert_int_equal(f->nnull, N_BATCH - at - 1);
    } else if (whole == f->n) {
        /* a clean disconnect: every reply first */
        assert_null(f->ac);
        assert_int_equal(f->calls, N_BATCH);
        assert_int_equal(f->nreply, N_BATCH);
    } else {
        /* a clean disconnect waits for the rest */
        assert_int_equal(f->calls, whole);
        assert_int_equal(f->nreply, whole);
        assert_non_null(f->ac);
        assert_int_equal(f->disconnects, 0);
        piece_read(f, f->exp.p + sent, cut_back);
        RUN_UNTIL(f, f->disconnects == 1);
        assert_int_equal(f->nreply, N_BATCH);
    }
    assert_int_equal(f->disconnects, 1);
    assert_int_equal(f->disconnect_status, REDIS_OK);
    assert_int_equal(f->calls_at_disconnect, N_BATCH); /* after every callback */
    assert_int_equal(f->calls, N_BATCH);
    RUN_UNTIL(f, f->sc->eof); /* hiredis closed the socket */
    settle(f);
    assert_int_equal(f->calls, N_BATCH);
    assert_int_equal(f->disconnects, 1);
    srv_close(f, false);
}

static void test_free_in_batch(void **state)
{
    struct fix *f = *state;
    static const unsigned at[] = {0, 1, 2, 5, N_BATCH / 2, N_BATCH - 2, N_BATCH - 1};
    for (size_t k = 0; k < sizeof at / sizeof at[0]; k++) {
        batch(f, FREE, at[k], 0, 20 + k);
        if (at[k] < N_BATCH - 1)
            batch(f, FREE, at[k], 7, 40 + k); /* the read ends in the middle of the last reply */
    }
}

static void test_disconnect_in_batch(void **state)
{
    struct fix *f = *state;
    static const unsigned at[] = {0, 3, N_BATCH / 2, N_BATCH - 1};
    for (size_t k = 0; k < sizeof at / sizeof at[0]; k++) {
        batch(f, DISCONNECT, at[k], 0, 60 + k);
        if (at[k] < N_BATCH - 1)
            batch(f, DISCONNECT, at[k], 5, 80 + k); /* the last reply comes in a second read */
    }
}

/* ---------------------------------------------------------------- 3. the server closes */

enum close_how { FIN_AFTER_READ, FIN_WITH_DATA, RST_AFTER_READ };

/* 100 commands; the server sends the replies to the first answered and part (partial bytes) of the next, then
 * closes. */
static void server_close(struct fix *f, unsigned answered, size_t partial, enum close_how how, uint64_t seed)
{
    rng = seed;
    client_connect(f);
    reset_commands(f, 100);
    gen_replies(f, true);
    send_commands(f);
    size_t sent = f->off[answered] + partial;
    if (how == FIN_WITH_DATA) {
        srv_send(f, f->exp.p, sent);
    } else {
        if (sent > 0)
            piece_read(f, f->exp.p, sent);
        assert_int_equal(f->calls, answered);
        assert_int_equal(f->disconnects, 0);
    }
    srv_close(f, how == RST_AFTER_READ);
    RUN_UNTIL(f, f->disconnects > 0);
    assert_null(f->ac);
    assert_int_equal(f->disconnects, 1);
    assert_int_equal(f->disconnect_status, REDIS_ERR);
    if (how == RST_AFTER_READ) /* the adapter's read gets the reset, hiredis' own read then the end */
        assert_true(f->disconnect_err == REDIS_ERR_EOF || f->disconnect_err == REDIS_ERR_IO);
    else
        assert_int_equal(f->disconnect_err, REDIS_ERR_EOF);
    assert_int_equal(f->calls, 100);
    assert_int_equal(f->calls_at_disconnect, 100);
    assert_int_equal(f->nreply, answered);
    assert_int_equal(f->nnull, 100 - answered);
    settle(f);
    assert_int_equal(f->calls, 100);
    assert_int_equal(f->disconnects, 1);
}

static void test_server_closes(void **state)
{
    struct fix *f = *state;
    static const enum close_how hows[] = {FIN_AFTER_READ, FIN_WITH_DATA, RST_AFTER_READ};
    for (size_t h = 0; h < 3; h++) {
        server_close(f, 0, 0, hows[h], 100 + h);
        server_close(f, 40, 0, hows[h], 110 + h);
        server_close(f, 40, 3, hows[h], 120 + h);
        server_close(f, 99, 0, hows[h], 130 + h);
    }
}

/* No command outstanding: the disconnect callback runs all the same. */
static void test_server_closes_idle(void **state)
{
    struct fix *f = *state;
    for (int rst = 0; rst < 2; rst++) {
        client_connect(f);
        reset_commands(f, 0);
        srv_close(f, rst);
        RUN_UNTIL(f, f->disconnects > 0);
        assert_null(f->ac);
        assert_int_equal(f->disconnect_status, REDIS_ERR);
        settle(f);
        assert_int_equal(f->disconnects, 1);
    }
}

/* ---------------------------------------------------------------- 4. connecting */

/* A port with nothing listening: a socket bound to it (so that nothing else can listen there) but not
 * listening. */
static int refusing_port(int *fd)
{
    *fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(*fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(*fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t sl = sizeof sa;
    assert_int_equal(getsockname(*fd, (struct sockaddr *)&sa, &sl), 0);
    return ntohs(sa.sin_port);
}

/* The connection is refused: the connect callback says so (once), a command queued meanwhile gets a NULL reply,
 * and there is no disconnect callback (there was no connection). by_read: the adapter's read function is called
 * once the socket has its error, rather than the loop finding it. */
static void refused(struct fix *f, bool by_read)
{
    int bound;
    int port = refusing_port(&bound);
    redisAsyncContext *ac = redisAsyncConnect("127.0.0.1", port);
    assert_non_null(ac);
    assert_int_equal(ac->err, 0); /* in progress: the adapter's connect path finds the refusal */
    ac->data = f;
    assert_int_equal(hiev_attach(ac, f->base), REDIS_OK);
    assert_int_equal(redisAsyncSetConnectCallback(ac, connect_cb), REDIS_OK);
    assert_int_equal(redisAsyncSetDisconnectCallback(ac, disconnect_cb), REDIS_OK);
    f->ac = ac;
    f->connects = f->disconnects = 0;
    reset_commands(f, 1);
    assert_int_equal(redisAsyncCommand(ac, reply_cb, (void *)(uintptr_t)0, "GET k0"), REDIS_OK);
    if (by_read) {
        struct pollfd pfd = {.fd = ac->c.fd, .events = POLLIN | POLLOUT};
        assert_int_equal(poll(&pfd, 1, DEADLINE_MS), 1);
        assert_true(pfd.revents & (POLLERR | POLLHUP));
        hiev_read(ac);
        assert_int_equal(f->connects, 1);
    }
    RUN_UNTIL(f, f->connects > 0);
    assert_null(f->ac);
    assert_int_equal(f->connect_status, REDIS_ERR);
    assert_int_equal(f->calls, 1);
    assert_int_equal(f->nnull, 1);
    settle(f); /* the context's events are gone with it */
    assert_int_equal(f->connects, 1);
    assert_int_equal(f->disconnects, 0);
    assert_int_equal(f->calls, 1);
    assert_int_equal(f->accepts, 0);
    close(bound);
}

static void test_connect_refused(void **state)
{
    refused(*state, false);
    refused(*state, true);
}

/* The connection completes through the adapter's read function too, and then works. */
static void test_connect_by_read(void **state)
{
    struct fix *f = *state;
    redisAsyncContext *ac = redisAsyncConnect("127.0.0.1", f->port);
    assert_non_null(ac);
    assert_int_equal(ac->err, 0);
    ac->data = f;
    assert_int_equal(hiev_attach(ac, f->base), REDIS_OK);
    assert_int_equal(redisAsyncSetConnectCallback(ac, connect_cb), REDIS_OK);
    assert_int_equal(redisAsyncSetDisconnectCallback(ac, disconnect_cb), REDIS_OK);
    f->ac = ac;
    struct pollfd pfd = {.fd = ac->c.fd, .events = POLLOUT};
    assert_int_equal(poll(&pfd, 1, DEADLINE_MS), 1);
    hiev_read(ac); /* nothing to read: it completes the connection */
    assert_int_equal(f->connects, 1);
    assert_int_equal(f->connect_status, REDIS_OK);
    assert_non_null(f->ac);
    RUN_UNTIL(f, f->sc);
    rng = 200;
    reset_commands(f, 10);
    gen_replies(f, true);
    send_commands(f);
    srv_piece(f, f->exp.p, f->exp.len);
    hiev_read(ac); /* the one read */
    assert_int_equal(f->nreply, 10);
    client_close(f);
}

/* ---------------------------------------------------------------- the fixture's life */

static int setup(void **state)
{
    struct fix *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    f->base = event_base_new();
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    f->lis = evconnlistener_new_bind(f->base, accept_cb, f, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, 16,
                                     (struct sockaddr *)&sa, sizeof sa);
    if (!f->base || !f->lis)
        return -1;
    socklen_t sl = sizeof sa;
    if (getsockname(evconnlistener_get_fd(f->lis), (struct sockaddr *)&sa, &sl) != 0)
        return -1;
    f->port = ntohs(sa.sin_port);
    f->tick = event_new(f->base, -1, EV_PERSIST, tick_cb, NULL);
    struct timeval tv = {0, 2000};
    if (!f->tick || event_add(f->tick, &tv) != 0)
        return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fix *f = *state;
    if (f->ac)
        redisAsyncFree(f->ac);
    if (f->sc)
        srv_close(f, false);
    evconnlistener_free(f->lis);
    event_free(f->tick);
    event_base_free(f->base);
    free(f->got);
    free(f->off);
    free(f->exp.p);
    free(f);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_replies_generated, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_whole, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_random, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_fixed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_per_reply, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_at_ends, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_arena, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_backlog, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_in_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_disconnect_in_batch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_closes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_server_closes_idle, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_by_read, setup, teardown),
    };
    return cmocka_run_group_tests_name("hiev", tests, NULL, NULL);
}
