/* Unit tests of the HTTP/1.1 server (src/http/http.c), driven in-process over loopback on one event loop (no
 * threads): pipelined requests split at every byte boundary and in random pieces must get the same answers as
 * when sent whole, whether the route answers at once or later (from a 0 ms timer); random mutations of valid
 * requests must get well-formed answers or a close, never a crash (make unit runs this under ASan and UBSan);
 * requests the server refuses itself get the right status. Seeds are fixed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "sbuf.h"

#include "core/config.h"
#include "http/http.h"

#include <event2/event.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

/* ---------------------------------------------------------------- the server under test */

/* How the route answers: in its callback, from a 0 ms timer, alternately, or from a 5 ms timer (after the
 * loop has read what follows the request). */
enum mode { SYNC, ASYNC, ALTERNATE, SLOW };

struct fix {
    struct event_base *base;
    struct config cfg;
    struct http_server *srv;
    int port;
    enum mode mode;
    unsigned calls;    /* requests handed to the route */
    unsigned answered; /* and answered */
    unsigned progress; /* bumped whenever the server does something visible */
};

static struct fix *F;

static uint64_t fnv1a(const char *p, size_t n)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * UINT64_C(1099511628211);
    return h;
}

/* A JSON string (or null), every byte outside printable ASCII escaped, so that any request can be echoed. */
static void sb_json(struct sbuf *b, const char *s, size_t n)
{
    if (!s) {
        sb_str(b, "null");
        return;
    }
    sb_str(b, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char e[8];
        if (c == '"' || c == '\\')
            snprintf(e, sizeof e, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            snprintf(e, sizeof e, "\\u%04x", c);
        else
            snprintf(e, sizeof e, "%c", c);
        sb_str(b, e);
    }
    sb_str(b, "\"");
}

/* Echoes what the server parsed: method, path, raw query, decoded query parameter x, header X-Test, the body
 * (its length and hash; itself if short). X-Method tells the client parser that a HEAD answer has no body. */
static void answer(struct http_req *req)
{
    size_t blen;
    const char *body = http_body(req, &blen);
    assert_non_null(body);
    assert_int_equal(body[blen], '\0');
    assert_non_null(http_path(req));
    const char *m = http_method_name(req), *q = http_query_string(req), *x = http_header(req, "x-test");
    char *qx = http_query(req, "x");
    struct sbuf b = {0};
    sb_str(&b, "{\"m\":");
    sb_json(&b, m, strlen(m));
    sb_str(&b, ",\"p\":");
    sb_json(&b, http_path(req), strlen(http_path(req)));
    sb_str(&b, ",\"q\":");
    sb_json(&b, q, q ? strlen(q) : 0);
    sb_str(&b, ",\"qx\":");
    sb_json(&b, qx, qx ? strlen(qx) : 0);
    sb_str(&b, ",\"x\":");
    sb_json(&b, x, x ? strlen(x) : 0);
    char num[80];
    snprintf(num, sizeof num, ",\"n\":%zu,\"h\":\"%016llx\",\"b\":", blen, (unsigned long long)fnv1a(body, blen));
    sb_str(&b, num);
    sb_json(&b, blen <= 256 ? body : NULL, blen);
    sb_str(&b, "}\n");
    free(qx);
    http_add_header(req, "X-Method", m);
    F->answered++;
    F->progress++;
    http_reply_text(req, 200, b.p, b.len);
    free(b.p);
}

static void deferred_cb(evutil_socket_t fd, short what, void *arg)
{
    answer(arg);
}

static void route(struct http_req *req, void *arg)
{
    struct fix *f = arg;
    bool later = f->mode == ASYNC || f->mode == SLOW || (f->mode == ALTERNATE && f->calls % 2 == 1);
    f->calls++;
    f->progress++;
    if (later) {
        struct timeval zero = {0, f->mode == SLOW ? 5000 : 0};
        assert_int_equal(event_base_once(f->base, -1, EV_TIMEOUT, deferred_cb, req, &zero), 0);
    } else
        answer(req);
}

static int setup(void **state)
{
    static struct fix f;
    memset(&f, 0, sizeof f);
    char a0[] = "test_http";
    char *argv[] = {a0, NULL};
    char err[256];
    if (config_load(&f.cfg, 1, argv, 1, err, sizeof err) != 0)
        return -1;
    f.cfg.http_max_body = 65536; /* bodies up to 128 KiB are read */
    f.cfg.http_idle_timeout_s = 30;
    f.base = event_base_new();
    f.srv = http_server_new(f.base, &f.cfg, "127.0.0.1", 0, route, &f, &f.port, err, sizeof err);
    if (!f.srv) {
        fprintf(stderr, "http_server_new: %s\n", err);
        return -1;
    }
    F = &f;
    *state = &f;
    return 0;
}

static int teardown(void **state)
{
    struct fix *f = *state;
    http_server_free(f->srv);
    event_base_free(f->base);
    return 0;
}

/* ---------------------------------------------------------------- the client */

struct client {
    int fd;
    struct sbuf rx;
    bool eof;
};

static void client_open(struct fix *f, struct client *c)
{
    memset(c, 0, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(c->fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)f->port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(c->fd, (struct sockaddr *)&sa, sizeof sa), 0); /* the backlog completes it */
    assert_int_equal(fcntl(c->fd, F_SETFL, O_NONBLOCK), 0);
    int one = 1; /* each piece is sent at once, not held back by Nagle's algorithm until an ACK */
    assert_int_equal(setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one), 0);
}

static void client_close(struct client *c)
{
    close(c->fd);
    free(c->rx.p);
    memset(c, 0, sizeof *c);
}

/* Reads what has come; true if anything did (or the end). */
static bool client_read(struct client *c)
{
    bool got = false;
    while (!c->eof) {
        char tmp[16384];
        ssize_t r = recv(c->fd, tmp, sizeof tmp, 0);
        if (r > 0) {
            sb_add(&c->rx, tmp, (size_t)r);
            got = true;
        } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            assert_true(r == 0); /* a reset would mean the server closed with unread bytes (no lingering) */
            c->eof = got = true;
        } else
            break;
    }
    return got;
}

/* Runs the loop until nothing moves any more (the server has read, parsed and answered what it could). */
static void pump(struct fix *f, struct client *c)
{
    for (int idle = 0; idle < 4;) {
        unsigned before = f->progress;
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        bool got = c && client_read(c);
        idle = got || f->progress != before ? 0 : idle + 1;
    }
}

static void client_write(struct fix *f, struct client *c, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else {
            assert_true(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR);
            event_base_loop(f->base, EVLOOP_NONBLOCK); /* let the server read */
            client_read(c);
        }
    }
}

static int64_t mono_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Runs the loop until the server closes the connection (fails after 5 s). */
static void until_eof(struct fix *f, struct client *c)
{
    int64_t deadline = mono_now_ms() + 5000;
    while (!c->eof) {
        unsigned before = f->progress;
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        if (!client_read(c) && f->progress == before) {
            struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
            poll(&pfd, 1, 1);
            event_base_loop(f->base, EVLOOP_NONBLOCK);
        }
        if (mono_now_ms() > deadline)
            fail_msg("the server did not close the connection; got %zu bytes:\n%s", c->rx.len, c->rx.p ? c->rx.p : "");
    }
}

/* Sends p[0..n) in pieces ending at cuts[0..ncuts) (increasing), the loop run until idle after each, then reads
 * until the server closes; returns what came back with the Date headers' values and interim 100 Continue
 * answers taken out (their presence depends on how the body arrives). Caller frees. */
static char *exchange(struct fix *f, const char *p, size_t n, const size_t *cuts, size_t ncuts, bool half_close)
{
    struct client c;
    client_open(f, &c);
    size_t at = 0;
    for (size_t i = 0; i < ncuts; i++) {
        client_write(f, &c, p + at, cuts[i] - at);
        at = cuts[i];
        pump(f, &c);
    }
    client_write(f, &c, p + at, n - at);
    if (half_close)
        shutdown(c.fd, SHUT_WR);
    until_eof(f, &c);
    assert_int_equal(f->calls, f->answered);
    struct sbuf out = {0}, tmp = {0};
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    for (const char *s = c.rx.p ? c.rx.p : "", *end = s + c.rx.len; s < end;) {
        const char *d = memmem(s, (size_t)(end - s), cont, sizeof cont - 1);
        sb_add(&tmp, s, (size_t)((d ? d : end) - s));
        s = d ? d + sizeof cont - 1 : end;
    }
    for (const char *s = tmp.p ? tmp.p : "", *end = s + tmp.len; s < end;) {
        const char *d = memmem(s, (size_t)(end - s), "\r\nDate: ", 8);
        sb_add(&out, s, (size_t)((d ? d + 8 : end) - s));
        if (!d)
            break;
        sb_str(&out, "-");
        const char *eol = memmem(d + 2, (size_t)(end - d - 2), "\r\n", 2);
        s = eol ? eol : end;
    }
    free(tmp.p);
    client_close(&c);
    pump(f, NULL); /* the server sees the close */
    if (!out.p)
        sb_str(&out, "");
    return out.p;
}

/* ---------------------------------------------------------------- reading answers */

struct resp {
    int status;
    bool close, head;
    const char *body;
    size_t body_len;
};

static bool is_tchar(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

/* Splits s[0..n) into answers. Returns their number, or -1 (with why) if it is not exactly a sequence of
 * well-formed HTTP/1.1 answers (status line, headers, Content-Length body; none after a Connection: close). */
static int parse_resps(const char *s, size_t n, struct resp *out, int max, const char **why)
{
    int count = 0;
    size_t i = 0;
    while (i < n) {
        if (count > 0 && out[count - 1].close)
            return *why = "bytes after an answer with Connection: close", -1;
        if (count == max)
            return *why = "too many answers", -1;
        struct resp *r = &out[count];
        memset(r, 0, sizeof *r);
        const char *he = memmem(s + i, n - i, "\r\n\r\n", 4);
        if (!he)
            return *why = "an incomplete head", -1;
        size_t hend = (size_t)(he - s) + 4;
        if (n - i < 13 || memcmp(s + i, "HTTP/1.1 ", 9) != 0 || s[i + 12] != ' ')
            return *why = "a bad status line", -1;
        for (int k = 9; k < 12; k++)
            if (s[i + k] < '0' || s[i + k] > '9')
                return *why = "a bad status code", -1;
        r->status = (s[i + 9] - '0') * 100 + (s[i + 10] - '0') * 10 + (s[i + 11] - '0');
        if (r->status < 100)
            return *why = "a bad status code", -1;
        const char *line = memmem(s + i, hend - i, "\r\n", 2) + 2;
        long long cl = -1;
        while (line < s + hend - 2) {
            const char *eol = memmem(line, (size_t)(s + hend - line), "\r\n", 2);
            const char *colon = memchr(line, ':', (size_t)(eol - line));
            if (!colon || colon == line || colon[1] != ' ')
                return *why = "a bad header line", -1;
            for (const char *q = line; q < colon; q++)
                if (!is_tchar((unsigned char)*q))
                    return *why = "a bad header name", -1;
            for (const char *q = colon + 2; q < eol; q++)
                if ((unsigned char)*q < 0x20 || *q == 0x7f)
                    return *why = "a bad header value", -1;
            size_t nl = (size_t)(colon - line), vl = (size_t)(eol - colon - 2);
            const char *v = colon + 2;
            if (nl == 14 && strncasecmp(line, "Content-Length", 14) == 0) {
                if (cl >= 0)
                    return *why = "two Content-Length headers", -1;
                cl = 0;
                for (size_t k = 0; k < vl; k++) {
                    if (v[k] < '0' || v[k] > '9' || k > 12)
                        return *why = "a bad Content-Length", -1;
                    cl = cl * 10 + (v[k] - '0');
                }
            } else if (nl == 10 && strncasecmp(line, "Connection", 10) == 0 && vl == 5 &&
                       strncasecmp(v, "close", 5) == 0)
                r->close = true;
            else if (nl == 8 && strncasecmp(line, "X-Method", 8) == 0 && vl == 4 && memcmp(v, "HEAD", 4) == 0)
                r->head = true;
            else if (nl == 17 && strncasecmp(line, "Transfer-Encoding", 17) == 0)
                return *why = "an unexpected Transfer-Encoding", -1;
            line = eol + 2;
        }
        i = hend;
        if (r->status < 200) {
            if (cl >= 0)
                return *why = "an interim answer with a Content-Length", -1;
            continue; /* 100 Continue: not counted */
        }
        if (cl < 0)
            return *why = "no Content-Length", -1;
        if (!r->head) {
            if ((size_t)cl > n - i)
                return *why = "a truncated body", -1;
            r->body = s + i;
            r->body_len = (size_t)cl;
            i += (size_t)cl;
        }
        count++;
    }
    return count;
}

/* ---------------------------------------------------------------- pipelined requests, however they arrive */

static const char SEQ[] =
    "GET /echo/a?x=1&y=%20z HTTP/1.1\r\nHost: t\r\nX-Test: one\r\n\r\n"
    "POST /post HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nX-Test:  two \t\r\n\r\nhello world"
    "\r\n" /* an empty line between requests is ignored */
    "POST /chunked?x=%41 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nX-Test: three\r\n\r\n"
    "5;ext=1\r\nhello\r\n"
    "1 ; name=\"v;al\"\r\n,\r\n"
    "a\r\n0123\r\n6789\r\n"
    "3\nxyz\n"
    "0;last\r\nTrailer-A: 1\r\nX-Test: trailer\r\n\r\n"
    "GET /lf?x=lf HTTP/1.1\nHost: t\nX-Test: four\n\n"
    "HEAD /head HTTP/1.1\r\nHost: t\r\nX-Test: five\r\n\r\n"
    "GET http://example.com:8080/abs/path?x=abs#frag HTTP/1.1\r\nHost: example.com\r\n\r\n"
    "POST /continue HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
    "GET /ten HTTP/1.0\r\nConnection: keep-alive\r\nX-TEST: ten\r\n\r\n"
    "PATCH /empty HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    "GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    "GET /never HTTP/1.1\r\nHost: t\r\n\r\n"; /* after the close: never answered */

/* What the route saw for each request of SEQ (the hashes are FNV-1a 64 of the bodies). */
static const char *const SEQ_BODIES[] = {
    "{\"m\":\"GET\",\"p\":\"/echo/a\",\"q\":\"x=1&y=%20z\",\"qx\":\"1\",\"x\":\"one\",\"n\":0,"
    "\"h\":\"cbf29ce484222325\",\"b\":\"\"}\n",
    "{\"m\":\"POST\",\"p\":\"/post\",\"q\":null,\"qx\":null,\"x\":\"two\",\"n\":11,\"h\":\"@\","
    "\"b\":\"hello world\"}\n",
    "{\"m\":\"POST\",\"p\":\"/chunked\",\"q\":\"x=%41\",\"qx\":\"A\",\"x\":\"three\",\"n\":19,"
    "\"h\":\"@\",\"b\":\"hello,0123\\u000d\\u000a6789xyz\"}\n",
    "{\"m\":\"GET\",\"p\":\"/lf\",\"q\":\"x=lf\",\"qx\":\"lf\",\"x\":\"four\",\"n\":0,\"h\":\"cbf29ce484222325\","
    "\"b\":\"\"}\n",
    NULL, /* HEAD: no body */
    "{\"m\":\"GET\",\"p\":\"/abs/path\",\"q\":\"x=abs\",\"qx\":\"abs\",\"x\":null,\"n\":0,"
    "\"h\":\"cbf29ce484222325\",\"b\":\"\"}\n",
    "{\"m\":\"POST\",\"p\":\"/continue\",\"q\":null,\"qx\":null,\"x\":null,\"n\":3,\"h\":\"@\",\"b\":\"abc\"}\n",
    "{\"m\":\"GET\",\"p\":\"/ten\",\"q\":null,\"qx\":null,\"x\":\"ten\",\"n\":0,\"h\":\"cbf29ce484222325\","
    "\"b\":\"\"}\n",
    "{\"m\":\"PATCH\",\"p\":\"/empty\",\"q\":null,\"qx\":null,\"x\":null,\"n\":0,\"h\":\"cbf29ce484222325\","
    "\"b\":\"\"}\n",
    "{\"m\":\"GET\",\"p\":\"/last\",\"q\":null,\"qx\":null,\"x\":null,\"n\":0,\"h\":\"cbf29ce484222325\","
    "\"b\":\"\"}\n",
};
#define SEQ_N (sizeof SEQ_BODIES / sizeof SEQ_BODIES[0])

/* Compares an echoed body with the expected one; "@" in the expected hash stands for the hash of "b". */
static void check_body(const char *got, size_t got_len, const char *want)
{
    json_error_t je;
    json_t *g = json_loadb(got, got_len, 0, &je), *w = json_loads(want, 0, &je);
    assert_non_null(g);
    assert_non_null(w);
    if (strcmp(json_string_value(json_object_get(w, "h")), "@") == 0) {
        const char *b = json_string_value(json_object_get(w, "b"));
        char h[20];
        snprintf(h, sizeof h, "%016llx", (unsigned long long)fnv1a(b, strlen(b)));
        json_object_set_new(w, "h", json_string(h));
    }
    if (!json_equal(g, w))
        fail_msg("got %.*s\nwant %s", (int)got_len, got, want);
    json_decref(g);
    json_decref(w);
}

static char *reference(struct fix *f)
{
    f->mode = SYNC;
    return exchange(f, SEQ, sizeof SEQ - 1, NULL, 0, false);
}

/* SEQ sent whole: every request answered as parsed, in order, HEAD without a body, the connection closed after
 * the request with Connection: close. */
static void test_sequence(void **state)
{
    struct fix *f = *state;
    for (enum mode m = SYNC; m <= ALTERNATE; m++) {
        f->mode = m;
        char *got = exchange(f, SEQ, sizeof SEQ - 1, NULL, 0, false);
        struct resp r[16];
        const char *why = NULL;
        int n = parse_resps(got, strlen(got), r, 16, &why);
        if (n < 0)
            fail_msg("%s in:\n%s", why, got);
        assert_int_equal(n, SEQ_N);
        for (size_t i = 0; i < SEQ_N; i++) {
            assert_int_equal(r[i].status, 200);
            assert_int_equal(r[i].close, i == SEQ_N - 1);
            if (SEQ_BODIES[i])
                check_body(r[i].body, r[i].body_len, SEQ_BODIES[i]);
            else
                assert_true(r[i].head);
        }
        assert_non_null(strstr(got, "Connection: keep-alive\r\n")); /* the HTTP/1.0 request's answer */
        free(got);
    }
}

/* SEQ split in two at every byte, with the loop run in between: the same answers. */
static void test_every_split(void **state)
{
    struct fix *f = *state;
    char *want = reference(f);
    for (enum mode m = SYNC; m <= ALTERNATE; m++) {
        f->mode = m;
        for (size_t k = 1; k < sizeof SEQ - 1; k++) {
            char *got = exchange(f, SEQ, sizeof SEQ - 1, &k, 1, false);
            if (strcmp(got, want) != 0)
                fail_msg("mode %d, split at %zu (\"%.20s\"): got\n%s\nwant\n%s", m, k, SEQ + k, got, want);
            free(got);
        }
    }
    free(want);
}

static uint64_t rng = 1;
static uint32_t rnd(void) /* xorshift64*: fixed seeds, the same run every time */
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint32_t)((rng * UINT64_C(2685821657736338717)) >> 32);
}

static size_t random_cuts(size_t n, size_t *cuts, size_t max, size_t piece)
{
    size_t nc = 0;
    for (size_t at = 1 + rnd() % piece; at < n && nc < max; at += 1 + rnd() % piece)
        cuts[nc++] = at;
    return nc;
}

/* SEQ in random pieces (1 to 1..64 bytes), the loop run after each: the same answers. */
static void test_random_pieces(void **state)
{
    struct fix *f = *state;
    char *want = reference(f);
    rng = 0x5eed0001;
    size_t cuts[sizeof SEQ];
    for (int it = 0; it < 300; it++) {
        f->mode = (enum mode)(it % 3);
        size_t nc = random_cuts(sizeof SEQ - 1, cuts, sizeof SEQ, 1 + rnd() % 64);
        char *got = exchange(f, SEQ, sizeof SEQ - 1, cuts, nc, false);
        if (strcmp(got, want) != 0)
            fail_msg("iteration %d (mode %d, %zu pieces): got\n%s\nwant\n%s", it, it % 3, nc + 1, got, want);
        free(got);
    }
    free(want);
}

/* Large bodies (past one 16 KiB read, so kept and grown in the connection), Content-Length and chunked,
 * pipelined, in random pieces. */
static void test_large_bodies(void **state)
{
    struct fix *f = *state;
    rng = 0x5eed0002;
    size_t blen = 100000;
    char *body = malloc(blen);
    assert_non_null(body);
    for (size_t i = 0; i < blen; i++)
        body[i] = (char)(rnd() & 0xff);
    struct sbuf req = {0};
    char line[128];
    snprintf(line, sizeof line, "POST /cl HTTP/1.1\r\nContent-Length: %zu\r\n\r\n", blen);
    sb_str(&req, line);
    sb_add(&req, body, blen);
    sb_str(&req, "POST /chunked HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (size_t at = 0; at < blen;) {
        size_t n = 1 + rnd() % 20000;
        if (n > blen - at)
            n = blen - at;
        snprintf(line, sizeof line, "%zx\r\n", n);
        sb_str(&req, line);
        sb_add(&req, body + at, n);
        sb_str(&req, "\r\n");
        at += n;
    }
    sb_str(&req, "0\r\n\r\nGET /close HTTP/1.1\r\nConnection: close\r\n\r\n");
    char hash[20];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)fnv1a(body, blen));
    size_t cuts[64];
    char *want = NULL;
    for (int it = 0; it < 40; it++) {
        f->mode = (enum mode)(it % 3);
        size_t nc = it == 0 ? 0 : random_cuts(req.len, cuts, 64, 1 + rnd() % 40000);
        char *got = exchange(f, req.p, req.len, cuts, nc, false);
        if (!want) {
            want = got;
            struct resp r[4];
            const char *why = NULL;
            int n = parse_resps(got, strlen(got), r, 4, &why);
            if (n < 0)
                fail_msg("%s in:\n%s", why, got);
            assert_int_equal(n, 3);
            for (int i = 0; i < 2; i++) {
                assert_int_equal(r[i].status, 200);
                json_t *o = json_loadb(r[i].body, r[i].body_len, 0, NULL);
                assert_non_null(o);
                assert_int_equal(json_integer_value(json_object_get(o, "n")), blen);
                assert_string_equal(json_string_value(json_object_get(o, "h")), hash);
                json_decref(o);
            }
            assert_true(r[2].close);
            continue;
        }
        if (strcmp(got, want) != 0)
            fail_msg("iteration %d: got\n%s\nwant\n%s", it, got, want);
        free(got);
    }
    free(want);
    free(req.p);
    free(body);
}

/* ---------------------------------------------------------------- requests the server refuses itself */

struct refusal {
    int status;
    const char *req;
};

static void test_refused(void **state)
{
    struct fix *f = *state;
    f->mode = SYNC;
    static const struct refusal cases[] = {
        {400, "GET / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"},
        {400, "GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\nContent-Length: 1234567890123456\r\n\r\n"},
        {413, "GET / HTTP/1.1\r\nContent-Length: 999999999999999\r\n\r\n"},
        {413, "GET / HTTP/1.1\r\nContent-Length: 131073\r\n\r\n"},
        {413, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n20001\r\n"},
        {413, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffff\r\n"},
        {400, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"},
        {400, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n"},
        {400, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\n"},
        {400, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\r\n"},
        {400, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n"},
        {501, "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"},
        {501, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
        {505, "GET / HTTP/2.0\r\n\r\n"},
        {400, "GET / HTTP/1.1 \r\n\r\n"},
        {400, "GET /a b HTTP/1.1\r\n\r\n"},
        {400, "GET\r\n\r\n"},
        {400, "G(T / HTTP/1.1\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\nNo colon\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\n: empty\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\nBad\x01: x\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\nA: b\rc\r\n\r\n"},
        {400, "GET / HTTP/1.1\r\nA: b\x7f\r\n\r\n"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *got = exchange(f, cases[i].req, strlen(cases[i].req), NULL, 0, false);
        struct resp r[2];
        const char *why = NULL;
        int n = parse_resps(got, strlen(got), r, 2, &why);
        if (n != 1 || r[0].status != cases[i].status || !r[0].close)
            fail_msg("case %zu (%s): want one %d with Connection: close, got (%s)\n%s", i, cases[i].req,
                     cases[i].status, why ? why : "", got);
        json_t *o = json_loadb(r[0].body, r[0].body_len, 0, NULL);
        assert_non_null(json_object_get(o, "error"));
        json_decref(o);
        free(got);
    }
    /* a head over 64 KiB, and too many header lines: 431 */
    struct sbuf big = {0};
    sb_str(&big, "GET / HTTP/1.1\r\n");
    for (int i = 0; i < 70; i++) {
        sb_str(&big, "X-Long: ");
        for (int k = 0; k < 1000; k++)
            sb_str(&big, "y");
        sb_str(&big, "\r\n");
    }
    sb_str(&big, "\r\n");
    struct sbuf many = {0};
    sb_str(&many, "GET / HTTP/1.1\r\n");
    for (int i = 0; i < 129; i++)
        sb_str(&many, "A: b\r\n");
    sb_str(&many, "\r\n");
    const struct sbuf *heads[] = {&big, &many};
    for (int i = 0; i < 2; i++) {
        char *got = exchange(f, heads[i]->p, heads[i]->len, NULL, 0, false);
        assert_true(strncmp(got, "HTTP/1.1 431 ", 13) == 0);
        free(got);
    }
    free(big.p);
    free(many.p);
}

/* ---------------------------------------------------------------- mutations */

static const char *const BASES[] = {
    "GET /echo?x=1 HTTP/1.1\r\nHost: t\r\nX-Test: a\r\n\r\n",
    "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    "POST /c HTTP/1.1\nTransfer-Encoding: chunked\n\n4\nabcd\n0\n\n",
    "HEAD /h HTTP/1.1\r\n\r\nGET /g HTTP/1.1\r\nConnection: close\r\n\r\n",
    "GET http://h:1/a?x=%zz HTTP/1.1\r\n\r\nPOST /p HTTP/1.0\r\nContent-Length: 2\r\n\r\nab",
    "POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nabcd"
    "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
};

static const char *const NUMBERS[] = {"0",   "99999999999999999999", "999999999999999", "-1",  "+5", "0x10",
                                      "1 1", "ffffffffffffffff",     "10000000000",     "1e3", "",   " 5"};

/* Applies one random mutation to m. */
static void mutate(struct sbuf *m)
{
    static const char interesting[] = "\r\n :;\t0f9\x00\x7f\x80\xff-+,\"%#?/";
    size_t at = m->len ? rnd() % m->len : 0;
    switch (rnd() % 8) {
    case 0: /* flip a byte */
        if (m->len)
            m->p[at] = (char)(rnd() & 0xff);
        break;
    case 1: /* change a byte to an interesting one */
        if (m->len)
            m->p[at] = interesting[rnd() % (sizeof interesting - 1)];
        break;
    case 2: { /* insert one */
        char ch = interesting[rnd() % (sizeof interesting - 1)];
        sb_add(m, "", 1);
        memmove(m->p + at + 1, m->p + at, m->len - 1 - at);
        m->p[at] = ch;
        break;
    }
    case 3: /* delete a few */
        if (m->len) {
            size_t k = 1 + rnd() % 4;
            if (k > m->len - at)
                k = m->len - at;
            memmove(m->p + at, m->p + at + k, m->len - at - k);
            m->len -= k;
        }
        break;
    case 4: /* truncate */
        m->len = at;
        break;
    case 5: { /* replace the number after "Length: " or at the start of a line of hex digits */
        char *p = NULL;
        if (rnd() % 2)
            p = memmem(m->p, m->len, "Length: ", 8);
        if (p)
            p += 8;
        else { /* a line starting with a hex digit after the head */
            char *h = memmem(m->p, m->len, "\n\r\n", 3);
            for (char *q = h ? h + 3 : NULL; q && q < m->p + m->len; q++)
                if (q[-1] == '\n' && *q && strchr("0123456789abcdefABCDEF", *q)) {
                    if (rnd() % 2 == 0) {
                        p = q;
                        break;
                    }
                }
        }
        if (!p)
            break;
        size_t s = (size_t)(p - m->p), e = s;
        while (e < m->len && m->p[e] && strchr("0123456789abcdefABCDEF", m->p[e]))
            e++;
        const char *num = NUMBERS[rnd() % (sizeof NUMBERS / sizeof NUMBERS[0])];
        struct sbuf n = {0};
        sb_add(&n, m->p, s);
        sb_str(&n, num);
        sb_add(&n, m->p + e, m->len - e);
        free(m->p);
        *m = n;
        break;
    }
    case 6: { /* duplicate a piece */
        size_t k = 1 + rnd() % 16;
        if (k > m->len - at)
            k = m->len - at;
        char tmp[16];
        memcpy(tmp, m->p + at, k);
        size_t old = m->len;
        sb_add(m, tmp, k);
        memmove(m->p + at + k, m->p + at, old - at);
        memcpy(m->p + at, tmp, k);
        break;
    }
    default: { /* a header line */
        static const char *const lines[] = {"Transfer-Encoding: chunked\r\n",
                                            "Content-Length: 3\r\n",
                                            "Connection: close\r\n",
                                            "Expect: 100-continue\r\n",
                                            "Transfer-Encoding: gzip\r\n",
                                            "Connection: keep-alive\r\n",
                                            " folded\r\n",
                                            "\r\n",
                                            "X-Test: \x80\xff\r\n"};
        const char *l = lines[rnd() % (sizeof lines / sizeof lines[0])];
        char *nl = memchr(m->p + at, '\n', m->len - at);
        size_t pos = nl ? (size_t)(nl - m->p) + 1 : m->len, ll = strlen(l), old = m->len;
        sb_add(m, l, ll);
        memmove(m->p + pos + ll, m->p + pos, old - pos);
        memcpy(m->p + pos, l, ll);
        break;
    }
    }
}

/* A few thousand mutated requests on fresh connections, sent in random pieces, then half-closed: the server
 * answers each well-formed HTTP/1.1 (JSON bodies) or closes, never crashes; a valid request still gets 200. */
static void test_mutations(void **state)
{
    struct fix *f = *state;
    rng = 0x5eed0003;
    size_t cuts[8];
    int answered = 0, refused = 0, silent = 0;
    for (int it = 0; it < 5000; it++) {
        f->mode = (enum mode)(rnd() % 3);
        const char *base = BASES[rnd() % (sizeof BASES / sizeof BASES[0])];
        struct sbuf m = {0};
        sb_str(&m, base);
        for (unsigned k = 1 + rnd() % 3; k > 0; k--)
            mutate(&m);
        size_t nc = m.len > 1 ? random_cuts(m.len, cuts, 8, 1 + rnd() % m.len) : 0;
        char *got = exchange(f, m.p ? m.p : "", m.len, cuts, nc, true);
        struct resp r[16];
        const char *why = NULL;
        int n = parse_resps(got, strlen(got), r, 16, &why);
        if (n < 0)
            fail_msg("iteration %d: %s; sent (%zu bytes):\n%.*s\ngot:\n%s", it, why, m.len, (int)m.len, m.p, got);
        for (int i = 0; i < n; i++) {
            if (r[i].head)
                continue;
            json_t *o = json_loadb(r[i].body, r[i].body_len, 0, NULL);
            if (!o)
                fail_msg("iteration %d: answer %d's body is not JSON: %.*s", it, i, (int)r[i].body_len, r[i].body);
            json_decref(o);
            if (r[i].status == 200)
                answered++;
            else
                refused++;
        }
        silent += n == 0;
        free(got);
        free(m.p);
    }
    print_message("mutations: %d answered, %d refused, %d connections closed without an answer\n", answered, refused,
                  silent);
    f->mode = SYNC;
    const char *ok = "GET /ok?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n";
    char *got = exchange(f, ok, strlen(ok), NULL, 0, false);
    assert_true(strncmp(got, "HTTP/1.1 200 OK\r\n", 17) == 0);
    free(got);
}

/* A line of a chunked body's framing (a size line with extensions, a trailer line) past the 1 KiB limit is
 * refused however it arrives, and one within it is accepted however it arrives. */
static void test_long_chunk_lines(void **state)
{
    struct fix *f = *state;
    f->mode = SYNC;
    for (int trailer = 0; trailer < 2; trailer++) {
        for (size_t len = 1000; len <= 1500; len += 500) {
            struct sbuf req = {0};
            sb_str(&req, "POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3");
            if (!trailer)
                sb_str(&req, ";");
            for (size_t i = 0; i < (trailer ? 0 : len - 2); i++)
                sb_str(&req, "e");
            sb_str(&req, "\r\nabc\r\n0\r\n");
            if (trailer)
                sb_str(&req, "T: ");
            for (size_t i = 0; i < (trailer ? len - 4 : 0); i++)
                sb_str(&req, "t");
            sb_str(&req, trailer ? "\r\n\r\n" : "\r\n");
            sb_str(&req, "GET /x HTTP/1.1\r\nConnection: close\r\n\r\n");
            char *want = exchange(f, req.p, req.len, NULL, 0, false);
            int status = len > 1024 ? 400 : 200;
            char line[16];
            snprintf(line, sizeof line, "HTTP/1.1 %d ", status);
            if (strncmp(want, line, 13) != 0)
                fail_msg("a %zu-byte %s line sent whole: want %d, got\n%s", len, trailer ? "trailer" : "chunk size",
                         status, want);
            for (size_t k = 50; k < req.len; k += 50) {
                char *got = exchange(f, req.p, req.len, &k, 1, false);
                if (strcmp(got, want) != 0)
                    fail_msg("a %zu-byte %s line split at %zu: got\n%s\nwant\n%s", len,
                             trailer ? "trailer" : "chunk size", k, got, want);
                free(got);
            }
            free(want);
            free(req.p);
        }
    }
}

/* A client that half-closes after pipelining its requests gets every answer, then the close, whether the route
 * answers at once or later. */
static void test_half_close(void **state)
{
    struct fix *f = *state;
    const char *reqs = "GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /c HTTP/1.1\r\n\r\n";
    for (enum mode m = SYNC; m <= SLOW; m++) {
        f->mode = m;
        char *got = exchange(f, reqs, strlen(reqs), NULL, 0, true);
        struct resp r[4];
        const char *why = NULL;
        int n = parse_resps(got, strlen(got), r, 4, &why);
        if (n != 3)
            fail_msg("mode %d: want 3 answers, got %d (%s):\n%s", m, n, why ? why : "", got);
        free(got);
    }
}

/* A client that pipelines requests without reading the answers: the server stops reading it once about 1 MiB of
 * answers waits (plus what the kernel's buffers hold), instead of answering everything into memory; once the
 * client reads, every answer comes, in order. */
static void test_unread_answers(void **state)
{
    struct fix *f = *state;
    f->mode = SYNC;
    f->calls = f->answered = 0;
    enum { N = 50000 };
    static const char one[] = "GET /u HTTP/1.1\r\n\r\n";
    struct sbuf reqs = {0};
    for (int i = 0; i < N; i++)
        sb_add(&reqs, one, sizeof one - 1);
    struct client c;
    memset(&c, 0, sizeof c);
    c.fd = socket(AF_INET, SOCK_STREAM, 0);
    int small = 32768; /* before connect: the client's window stays small */
    assert_int_equal(setsockopt(c.fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)f->port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(c.fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(fcntl(c.fd, F_SETFL, O_NONBLOCK), 0);
    size_t at = 0;
    for (int idle = 0; idle < 20 && at < reqs.len;) { /* write without reading until nothing moves */
        ssize_t w = send(c.fd, reqs.p + at, reqs.len - at, MSG_NOSIGNAL);
        unsigned before = f->progress;
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        at += w > 0 ? (size_t)w : 0;
        idle = w > 0 || f->progress != before ? 0 : idle + 1;
    }
    unsigned stopped_at = f->calls;
    /* each answer is over 150 bytes: all of them would be several times what the buffers and the 1 MiB hold */
    if (stopped_at >= N)
        fail_msg("the server answered all %d requests of a client that reads nothing", N);
    int64_t deadline = mono_now_ms() + 30000;
    while ((int)f->answered < N || at < reqs.len) { /* now read: the rest is answered */
        ssize_t w = at < reqs.len ? send(c.fd, reqs.p + at, reqs.len - at, MSG_NOSIGNAL) : 0;
        at += w > 0 ? (size_t)w : 0;
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        client_read(&c);
        if (mono_now_ms() > deadline)
            fail_msg("only %u of %d requests answered after 30 s", f->answered, N);
    }
    pump(f, &c);
    assert_int_equal(f->answered, N);
    size_t n = 0; /* one pass (strstr from each match would rescan the rest under ASan) */
    static const char ok[] = "HTTP/1.1 200 OK\r\n";
    for (size_t i = 0; i + sizeof ok - 1 <= c.rx.len; i++)
        if (c.rx.p[i] == 'H' && memcmp(c.rx.p + i, ok, sizeof ok - 1) == 0)
            n++;
    assert_int_equal(n, N);
    printf("unread answers: the server stopped at %u of %d requests until the client read\n", stopped_at, N);
    free(reqs.p);
    client_close(&c);
    pump(f, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sequence),         cmocka_unit_test(test_every_split),
        cmocka_unit_test(test_random_pieces),    cmocka_unit_test(test_large_bodies),
        cmocka_unit_test(test_refused),          cmocka_unit_test(test_mutations),
        cmocka_unit_test(test_long_chunk_lines), cmocka_unit_test(test_half_close),
        cmocka_unit_test(test_unread_answers),
    };
    return cmocka_run_group_tests_name("http", tests, setup, teardown);
}
