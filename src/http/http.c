/* http.c - see http.h and docs/HTTP.md.
 *
 * One connection is a struct conn with two events on the thread's loop: reading (persistent, with the idle
 * timeout) and writing (added only while an answer waits for room in the socket). A request is read into a
 * per-thread scratch buffer; bytes are kept in the connection only when a request is incomplete or pipelined
 * behind one being answered. A complete request is copied into one allocation with its parsed head (the
 * struct http_req), handed to the callback, and freed by its answer. An answer is written with one sendmsg.
 * No epoll_ctl per request: reading stays armed, writing is armed only when the socket is full.
 *
 * Reentrancy: an answer may come from inside the callback (synchronously) or later. While the server is inside
 * a callback, the connection is "busy": nothing frees it then; conn_check() does what was deferred. */
#include "http/http.h"

#include "core/config.h"
#include "core/jsonw.h"
#include "core/log.h"
#include "core/util.h"

#include <event2/event.h>
#include <event2/event_struct.h> /* struct event embedded in struct conn (event_assign) */
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define HEAD_MAX (64 * 1024)  /* request line and headers */
#define HDRS_MAX 128          /* header lines per request */
#define SCRATCH 16384         /* one read's worth */
#define OUT_MAX (1024 * 1024) /* answers not yet taken by the client; past it, no more requests are read */

struct http_server {
    struct event_base *base;
    struct evconnlistener *listener;
    struct event *accept_retry; /* re-enables accepting after it failed for want of descriptors */
    time_t accept_warned;
    const struct timeval *idle_tv; /* a common timeout: re-arming it is O(1) */
    long idle_s;
    size_t body_cap; /* largest body read (twice http-max-body) */
    http_cb cb;
    void *cb_arg;
    struct conn *conns;
    int nconns;
};

struct conn {
    struct http_server *srv;
    struct conn *prev, *next;
    evutil_socket_t fd;
    struct event rev, wev;
    char *in; /* bytes of a request not yet complete (or pipelined), from its first byte; NULL if none */
    size_t in_len, in_cap;
    char *out; /* bytes of answers the socket had no room for */
    size_t out_off, out_len, out_cap;
    struct http_req *req; /* being answered */
    /* the request being read, offsets from its first byte */
    size_t scanned;  /* searched for the end of the head up to here */
    size_t head_len; /* 0 until the head is complete */
    size_t need;     /* the request's whole length, once known */
    size_t ck_pos;   /* chunked body: the next chunk's size line */
    size_t ck_body;  /* chunked body: bytes decoded so far */
    time_t started;  /* when the request's first byte came (0: none pending) */
    unsigned busy;
    bool chunked, ck_trailers, want_continue; /* want_continue: the client waits for "100 Continue" before its body */
    bool dead;                                /* to be freed as soon as nothing runs on it */
    bool close_after;                         /* close once the request in flight is answered and written */
    bool rd_eof, lingering, paused, resume, wev_on;
};

struct hdr {
    const char *name, *value;
};

struct http_req {
    struct conn *conn; /* NULL once the client has gone */
    enum http_method method;
    const char *method_name, *path, *query, *body;
    size_t body_len;
    unsigned nhdr;
    struct hdr *hdr;
    int minor; /* HTTP/1.minor */
    bool keep_alive, streaming, chunked_out;
    void (*closed)(struct http_req *, void *);
    void *closed_arg;
    char *oh; /* headers added by the handler, "Name: value\r\n"... */
    size_t oh_len, oh_cap;
    char oh_inline[192];
    /* then: the header array, the head, the body (NUL-terminated pieces) */
};

static _Thread_local char scratch[SCRATCH];

static void conn_check(struct conn *c);
static void conn_fail(struct conn *c, int code, const char *type, const char *errcode, const char *msg);

/* ---------------------------------------------------------------- small helpers */

static const char *reason(int code)
{
    static const struct {
        int code;
        const char *text;
    } reasons[] = {
        {100, "Continue"},
        {200, "OK"},
        {201, "Created"},
        {202, "Accepted"},
        {204, "No Content"},
        {304, "Not Modified"},
        {400, "Bad Request"},
        {401, "Unauthorized"},
        {403, "Forbidden"},
        {404, "Not Found"},
        {405, "Method Not Allowed"},
        {408, "Request Timeout"},
        {409, "Conflict"},
        {410, "Gone"},
        {411, "Length Required"},
        {413, "Content Too Large"},
        {415, "Unsupported Media Type"},
        {422, "Unprocessable Content"},
        {429, "Too Many Requests"},
        {431, "Request Header Fields Too Large"},
        {500, "Internal Server Error"},
        {501, "Not Implemented"},
        {502, "Bad Gateway"},
        {503, "Service Unavailable"},
        {504, "Gateway Timeout"},
        {505, "HTTP Version Not Supported"},
    };
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++)
        if (reasons[i].code == code)
            return reasons[i].text;
    return code < 300 ? "OK" : code < 500 ? "Client Error" : "Server Error";
}

/* The Date header's value (RFC 9110's IMF-fixdate), formatted once a second per thread. */
static const char *http_date(void)
{
    static _Thread_local time_t sec = -1;
    static _Thread_local char text[32];
    time_t now = time(NULL);
    if (now != sec) {
        static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
        static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
        struct tm tm;
        gmtime_r(&now, &tm);
        snprintf(text, sizeof text, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday % 7], tm.tm_mday,
                 months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        sec = now;
    }
    return text;
}

static time_t now_s(struct http_server *srv)
{
    struct timeval tv;
    event_base_gettimeofday_cached(srv->base, &tv);
    return tv.tv_sec > 0 ? tv.tv_sec : 1;
}

/* A token character (RFC 9110 5.6.2): letters, digits and !#$%&'*+-.^_`|~, as bit ch of a 128-bit mask. */
static bool is_tchar(unsigned char ch)
{
    static const uint64_t lo = 0x03ff6cfa00000000, hi = 0x57ffffffc7fffffe; /* 0-63, 64-127 */
    return ch < 64 ? (lo >> ch) & 1 : ch < 128 && (hi >> (ch - 64)) & 1;
}

/* True if v[0..n) has no control character but tab (CR, LF and NUL included) and no DEL: a header value.
 * Eight bytes at a time while none of them can be one (this loop was a third of parsing a request's head); a
 * word that may hold one is looked at byte by byte. */
static bool value_ok(const char *v, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x = word_at(v + i);
        if (word_has_less(x, 0x20) | word_has_byte(x, 0x7f)) /* perhaps a tab: the byte loop tells */
            break;
    }
    for (; i < n; i++) {
        unsigned char c = (unsigned char)v[i];
        if ((c < ' ' && c != '\t') || c == 0x7f)
            return false;
    }
    return true;
}

/* True if the comma-separated list v[0..n) has token tok (case-insensitive). */
static bool has_token(const char *v, size_t n, const char *tok)
{
    size_t tl = strlen(tok), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t s = i;
        while (i < n && v[i] != ',')
            i++;
        size_t e = i;
        while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - s == tl && strncasecmp(v + s, tok, tl) == 0)
            return true;
    }
    return false;
}

/* ---------------------------------------------------------------- writing */

static void out_append(struct conn *c, const char *p, size_t n)
{
    if (c->out_off > 0 && c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    if (c->out_len + n > c->out_cap) {
        if (c->out_off > 0) { /* slide what is left to the front first */
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + n > c->out_cap) {
            size_t cap = c->out_cap ? c->out_cap : 4096;
            while (cap < c->out_len + n)
                cap *= 2;
            c->out = xrealloc(c->out, cap);
            c->out_cap = cap;
        }
    }
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
}

static bool out_pending(const struct conn *c)
{
    return c->out_len > c->out_off;
}

/* A client that sends requests but does not read the answers: stop reading it (write_cb resumes). */
static bool out_full(const struct conn *c)
{
    return c->out_len - c->out_off > OUT_MAX;
}

/* Writes iov[0..n) now if the socket takes it, keeps the rest for the write event. */
static void conn_send(struct conn *c, struct iovec *iov, int n)
{
    if (c->dead || c->lingering)
        return;
    size_t skip = 0;
    if (!out_pending(c)) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w;
        do
            w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            c->dead = true; /* the client has gone */
            return;
        }
        skip = w > 0 ? (size_t)w : 0;
    }
    for (int i = 0; i < n; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        out_append(c, (const char *)iov[i].iov_base + skip, iov[i].iov_len - skip);
        skip = 0;
    }
    if (out_pending(c) && !c->wev_on) {
        event_add(&c->wev, c->srv->idle_tv); /* a client that reads nothing for that long is closed */
        c->wev_on = true;
    }
}

static void conn_resume(struct conn *c);

static void write_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    if (what & EV_TIMEOUT) {
        c->dead = true;
        conn_check(c);
        return;
    }
    while (out_pending(c)) {
        ssize_t w = send(fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (w <= 0) {
            c->dead = true;
            conn_check(c);
            return;
        }
        c->out_off += (size_t)w;
    }
    free(c->out);
    c->out = NULL;
    c->out_off = c->out_len = c->out_cap = 0;
    event_del(&c->wev);
    c->wev_on = false;
    if (!c->req && !c->close_after && !c->dead && (c->paused || c->in_len > 0))
        conn_resume(c); /* requests were left unread, or unanswered, while the answers piled up */
    conn_check(c);
}

/* ---------------------------------------------------------------- connections */

static void conn_unlink_req(struct conn *c)
{
    struct http_req *req = c->req;
    if (!req)
        return;
    c->req = NULL;
    req->conn = NULL;
    if (req->closed) /* may end the request at once: it is detached already */
        req->closed(req, req->closed_arg);
}

static void conn_free(struct conn *c)
{
    conn_unlink_req(c);
    event_del(&c->rev);
    event_del(&c->wev);
    evutil_closesocket(c->fd);
    c->srv->nconns--;
    if (c->prev)
        c->prev->next = c->next;
    else
        c->srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    free(c->in);
    free(c->out);
    free(c);
}

/* A connection to close once its last answer is written: half-close and read what the client still sends, so
 * that closing with unread bytes does not reset the connection before the client has read that answer. */
static void conn_linger(struct conn *c)
{
    if (c->rd_eof) {
        conn_free(c);
        return;
    }
    c->lingering = true;
    c->started = now_s(c->srv); /* the lingering close's own start: it lasts at most --http-idle-timeout-s */
    shutdown(c->fd, SHUT_WR);
    free(c->in);
    c->in = NULL;
    c->in_len = c->in_cap = 0;
    c->paused = false;
    event_add(&c->rev, c->srv->idle_tv);
}

/* Does what was deferred while the connection was busy. May free c. */
static void conn_check(struct conn *c)
{
    if (c->busy)
        return;
    if (c->dead) {
        conn_free(c);
        return;
    }
    if (!c->req && c->close_after && !out_pending(c) && !c->lingering)
        conn_linger(c);
}

/* ---------------------------------------------------------------- parsing */

struct head {
    enum http_method method;
    int minor;
    size_t target, target_len; /* offsets in the head */
    int64_t content_length;    /* -1: none */
    bool chunked, expect_continue, keep_alive;
    unsigned nhdr;
    struct { /* last: parse_head clears what comes before */
        uint32_t name, name_len, value, value_len;
    } h[HDRS_MAX];
};

static const struct {
    const char *name;
    enum http_method m;
} methods[] = {{"GET", HTTP_GET},         {"POST", HTTP_POST},     {"HEAD", HTTP_HEAD},
               {"PUT", HTTP_PUT},         {"DELETE", HTTP_DELETE}, {"PATCH", HTTP_PATCH},
               {"OPTIONS", HTTP_OPTIONS}, {"TRACE", HTTP_TRACE},   {"CONNECT", HTTP_CONNECT}};

/* The end of the head in p[0..n) (just past its empty line), or 0 if it has not all come; *scanned remembers
 * how far the search went. */
static size_t head_end(const char *p, size_t n, size_t *scanned)
{
    size_t i = *scanned;
    for (;;) {
        const char *nl = i < n ? memchr(p + i, '\n', n - i) : NULL;
        if (!nl) {
            *scanned = n;
            return 0;
        }
        size_t j = (size_t)(nl - p) + 1;
        if (j < n && p[j] == '\n')
            return j + 1;
        if (j + 1 < n && p[j] == '\r' && p[j + 1] == '\n')
            return j + 2;
        if (j >= n || (j + 1 == n && p[j] == '\r')) {
            *scanned = j - 1; /* look at this line end again once more has come */
            return 0;
        }
        i = j;
    }
}

/* Parses the head p[0..n) (ending with its empty line). Returns 0, or an HTTP status with *msg. */
static int parse_head(const char *p, size_t n, struct head *h, const char **msg)
{
    memset(h, 0, offsetof(struct head, h));
    h->content_length = -1;
    size_t pos = 0, connection_close = 0, connection_keep = 0;
    /* the request line */
    const char *nl = memchr(p, '\n', n);
    size_t le = (size_t)(nl - p), lend = le > 0 && p[le - 1] == '\r' ? le - 1 : le;
    const char *sp1 = memchr(p, ' ', lend);
    const char *sp2 = sp1 ? memchr(sp1 + 1, ' ', lend - (size_t)(sp1 + 1 - p)) : NULL;
    if (!sp1 || !sp2 || sp1 == p || sp2 == sp1 + 1) {
        *msg = "malformed request line (expected: METHOD /path HTTP/1.1)";
        return 400;
    }
    size_t mlen = (size_t)(sp1 - p);
    for (size_t i = 0; i < mlen; i++)
        if (!is_tchar((unsigned char)p[i])) {
            *msg = "malformed request line: bad method";
            return 400;
        }
    h->method = HTTP_OTHER;
    for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
        if (strlen(methods[i].name) == mlen && memcmp(methods[i].name, p, mlen) == 0)
            h->method = methods[i].m;
    h->target = (size_t)(sp1 + 1 - p);
    h->target_len = (size_t)(sp2 - sp1 - 1);
    const char *ver = sp2 + 1;
    size_t vlen = lend - (size_t)(ver - p);
    if (vlen != 8 || memcmp(ver, "HTTP/", 5) != 0 || ver[6] != '.' || ver[5] < '0' || ver[5] > '9' || ver[7] < '0' ||
        ver[7] > '9') {
        *msg = "malformed request line: bad HTTP version";
        return 400;
    }
    if (ver[5] != '1') {
        *msg = "only HTTP/1.0 and HTTP/1.1 are supported";
        return 505;
    }
    h->minor = ver[7] - '0';
    for (size_t i = h->target; i < h->target + h->target_len; i++)
        if ((unsigned char)p[i] <= ' ' || p[i] == 0x7f) {
            *msg = "malformed request line: bad characters in the target";
            return 400;
        }
    /* the headers */
    pos = le + 1;
    for (;;) {
        nl = memchr(p + pos, '\n', n - pos);
        le = (size_t)(nl - p);
        lend = le > pos && p[le - 1] == '\r' ? le - 1 : le;
        if (lend == pos)
            break; /* the empty line */
        if (p[pos] == ' ' || p[pos] == '\t') {
            *msg = "obsolete header line folding is not accepted";
            return 400;
        }
        const char *colon = memchr(p + pos, ':', lend - pos);
        if (!colon || colon == p + pos) {
            *msg = "malformed header line (expected: Name: value)";
            return 400;
        }
        for (const char *q = p + pos; q < colon; q++)
            if (!is_tchar((unsigned char)*q)) {
                *msg = "malformed header name";
                return 400;
            }
        if (h->nhdr == HDRS_MAX) {
            *msg = "too many header lines (at most 128)";
            return 431;
        }
        size_t vs = (size_t)(colon + 1 - p), ve = lend;
        while (vs < ve && (p[vs] == ' ' || p[vs] == '\t'))
            vs++;
        while (ve > vs && (p[ve - 1] == ' ' || p[ve - 1] == '\t'))
            ve--;
        if (!value_ok(p + vs, ve - vs)) {
            *msg = "bad characters in a header value";
            return 400;
        }
        size_t nlen = (size_t)(colon - (p + pos));
        h->h[h->nhdr].name = (uint32_t)pos;
        h->h[h->nhdr].name_len = (uint32_t)nlen;
        h->h[h->nhdr].value = (uint32_t)vs;
        h->h[h->nhdr].value_len = (uint32_t)(ve - vs);
        h->nhdr++;
        const char *name = p + pos, *v = p + vs;
        size_t vl = ve - vs;
        if (nlen == 14 && strncasecmp(name, "Content-Length", 14) == 0) {
            int64_t cl = 0;
            if (vl == 0 || vl > 15) {
                *msg = "bad Content-Length";
                return 400;
            }
            for (size_t i = 0; i < vl; i++) {
                if (v[i] < '0' || v[i] > '9') {
                    *msg = "bad Content-Length";
                    return 400;
                }
                cl = cl * 10 + (v[i] - '0');
            }
            if (h->content_length >= 0 && h->content_length != cl) {
                *msg = "conflicting Content-Length headers";
                return 400;
            }
            h->content_length = cl;
        } else if (nlen == 17 && strncasecmp(name, "Transfer-Encoding", 17) == 0) {
            if (!(vl == 7 && strncasecmp(v, "chunked", 7) == 0) || h->chunked) {
                *msg = "only Transfer-Encoding: chunked is supported";
                return 501;
            }
            h->chunked = true;
        } else if (nlen == 10 && strncasecmp(name, "Connection", 10) == 0) {
            connection_close |= has_token(v, vl, "close");
            connection_keep |= has_token(v, vl, "keep-alive");
        } else if (nlen == 6 && strncasecmp(name, "Expect", 6) == 0) {
            h->expect_continue = vl == 12 && strncasecmp(v, "100-continue", 12) == 0;
        }
        pos = le + 1;
    }
    if (h->chunked && h->content_length >= 0) {
        *msg = "a request cannot have both Content-Length and Transfer-Encoding";
        return 400;
    }
    h->keep_alive = h->minor >= 1 ? !connection_close : (connection_keep && !connection_close);
    return 0;
}

/* Scans a chunked body from c->ck_pos in p[0..n). Returns 1 when it has all come (c->need set), 0 if more is
 * needed, or an HTTP status with *msg. */
static int chunks_scan(struct conn *c, const char *p, size_t n, const char **msg)
{
    for (;;) {
        size_t pos = c->ck_pos;
        const char *nl = pos < n ? memchr(p + pos, '\n', n - pos) : NULL;
        size_t le = nl ? (size_t)(nl - p) : n;
        if (le - pos > 1024) { /* whether or not its end has come: the same answer however the line arrives */
            *msg = c->ck_trailers ? "malformed chunked body: trailer line too long"
                                  : "malformed chunked body: chunk size line too long";
            return 400;
        }
        if (!nl)
            return 0;
        if (c->ck_trailers) { /* skip the trailer lines until the empty one */
            size_t lend = le > pos && p[le - 1] == '\r' ? le - 1 : le;
            c->ck_pos = le + 1;
            if (lend == pos) {
                c->need = le + 1;
                return 1;
            }
            if (le + 1 - c->head_len > c->srv->body_cap + HEAD_MAX) {
                *msg = "chunked body trailers too long";
                return 431;
            }
            continue;
        }
        uint64_t size = 0;
        size_t i = pos, digits = 0;
        for (; i < le; i++, digits++) {
            int d = hex_digit(p[i]);
            if (d < 0)
                break;
            if (size > (UINT64_C(1) << 40)) {
                *msg = "request body too large";
                return 413;
            }
            size = size * 16 + (uint64_t)d;
        }
        /* after the digits: optional whitespace, an extension (;...), and CR only as the line's end */
        size_t j = i;
        while (j < le && (p[j] == ' ' || p[j] == '\t'))
            j++;
        bool ok = j == le || p[j] == ';' || (p[j] == '\r' && j + 1 == le);
        for (size_t k = j; ok && k < le; k++)
            if ((p[k] == '\r' && k + 1 != le) || p[k] == 0)
                ok = false;
        if (digits == 0 || !ok) {
            *msg = "malformed chunked body: bad chunk size";
            return 400;
        }
        if (size == 0) {
            c->ck_trailers = true;
            c->ck_pos = le + 1;
            continue;
        }
        if (c->ck_body + size > c->srv->body_cap) {
            *msg = "request body too large";
            return 413;
        }
        size_t data = le + 1, after = data + size;
        if (after >= n)
            return 0;
        if (p[after] == '\r') {
            if (after + 1 >= n)
                return 0;
            after++;
        }
        if (p[after] != '\n') {
            *msg = "malformed chunked body: missing CRLF after a chunk";
            return 400;
        }
        c->ck_body += size;
        c->ck_pos = after + 1;
    }
}

/* Copies the decoded chunks of p (whose head is c->head_len long) to dst. */
static size_t chunks_decode(const struct conn *c, const char *p, char *dst)
{
    size_t pos = c->head_len, out = 0;
    for (;;) {
        const char *nl = memchr(p + pos, '\n', c->need - pos);
        size_t le = (size_t)(nl - p);
        size_t size = strtoull(p + pos, NULL, 16);
        if (size == 0)
            return out;
        memcpy(dst + out, p + le + 1, size);
        out += size;
        pos = le + 1 + size;
        pos += p[pos] == '\r' ? 2 : 1;
    }
}

/* Builds the request from p[0..c->need) (its head parsed in h). */
static struct http_req *req_new(struct conn *c, const char *p, const struct head *h)
{
    size_t body_len = c->chunked ? c->ck_body : (size_t)(h->content_length > 0 ? h->content_length : 0);
    size_t size = sizeof(struct http_req) + h->nhdr * sizeof(struct hdr) + c->head_len + body_len + 1;
    struct http_req *req = xmalloc(size);
    memset(req, 0, offsetof(struct http_req, oh_inline));
    req->conn = c;
    req->method = h->method;
    req->minor = h->minor;
    req->keep_alive = h->keep_alive;
    req->nhdr = h->nhdr;
    req->hdr = (struct hdr *)((char *)req + sizeof(struct http_req)); /* aligned: sizeof is */
    char *d = (char *)(req->hdr + h->nhdr);
    memcpy(d, p, c->head_len);
    char *body = d + c->head_len;
    if (c->chunked)
        req->body_len = chunks_decode(c, p, body);
    else {
        req->body_len = body_len;
        memcpy(body, p + c->head_len, body_len);
    }
    body[req->body_len] = '\0';
    req->body = body;
    /* NUL-terminate the pieces in the copy */
    size_t ml = 0;
    while (d[ml] != ' ')
        ml++;
    d[ml] = '\0';
    req->method_name = d;
    char *t = d + h->target, *te = t + h->target_len;
    *te = '\0';
    char *hash = memchr(t, '#', (size_t)(te - t));
    if (hash) {
        *hash = '\0';
        te = hash;
    }
    if (strncasecmp(t, "http://", 7) == 0 || strncasecmp(t, "https://", 8) == 0) { /* absolute form */
        char *auth = t + (t[4] == ':' ? 7 : 8);
        size_t al = strcspn(auth, "/?");
        t = auth + al;
        if (*t != '/') { /* no path: "/", on the authority's last byte (or the '/' of "://") */
            t--;
            *t = '/';
        }
    }
    char *q = strchr(t, '?');
    if (q)
        *q++ = '\0';
    req->path = t;
    req->query = q;
    for (unsigned i = 0; i < h->nhdr; i++) {
        d[h->h[i].name + h->h[i].name_len] = '\0';
        d[h->h[i].value + h->h[i].value_len] = '\0';
        req->hdr[i].name = d + h->h[i].name;
        req->hdr[i].value = d + h->h[i].value;
    }
    req->oh = req->oh_inline;
    req->oh_cap = sizeof req->oh_inline;
    return req;
}

static void send_continue(struct conn *c)
{
    if (!c->want_continue)
        return;
    c->want_continue = false;
    struct iovec iov = {.iov_base = (void *)"HTTP/1.1 100 Continue\r\n\r\n", .iov_len = 25};
    conn_send(c, &iov, 1);
}

/* Reads one request from p[0..n) (its first byte at p). Returns the bytes it used (a request dispatched, or
 * empty lines skipped), 0 if it needs more, or SIZE_MAX if the connection failed. */
static size_t parse_one(struct conn *c, const char *p, size_t n)
{
    struct http_server *srv = c->srv;
    if (c->head_len == 0 && c->scanned == 0 && (p[0] == '\r' || p[0] == '\n')) { /* empty lines before a request */
        size_t k = 0;
        while (k < n && (p[k] == '\r' || p[k] == '\n'))
            k++;
        return k;
    }
    if (!c->started)
        c->started = now_s(srv);
    struct head h;
    bool parsed = false;
    const char *msg = NULL;
    int code;
    if (c->head_len == 0) {
        size_t e = head_end(p, n, &c->scanned);
        if (!e) {
            if (n > HEAD_MAX)
                goto too_large_head;
            goto more;
        }
        if (e > HEAD_MAX)
            goto too_large_head;
        c->head_len = e;
        if ((code = parse_head(p, e, &h, &msg)) != 0)
            goto fail;
        parsed = true;
        c->chunked = h.chunked;
        c->want_continue = h.expect_continue && h.minor >= 1;
        if (h.chunked)
            c->ck_pos = e;
        else if (h.content_length > (int64_t)srv->body_cap) {
            code = 413;
            msg = "request body too large";
            goto fail;
        } else
            c->need = e + (size_t)(h.content_length > 0 ? h.content_length : 0);
    }
    if (c->chunked && !c->need) {
        int r = n - c->head_len > 4 * srv->body_cap + HEAD_MAX ? 413 : chunks_scan(c, p, n, &msg);
        if (r == 413 && !msg)
            msg = "request body too large";
        if (r > 1) {
            code = r;
            goto fail;
        }
    }
    if (!c->need || n < c->need) {
        send_continue(c);
        goto more;
    }
    if (!parsed && (code = parse_head(p, c->head_len, &h, &msg)) != 0)
        goto fail;
    size_t used = c->need;
    struct http_req *req = req_new(c, p, &h);
    c->scanned = c->head_len = c->need = c->ck_pos = c->ck_body = 0;
    c->chunked = c->ck_trailers = c->want_continue = false;
    c->started = 0;
    c->req = req;
    srv->cb(req, srv->cb_arg);
    return used;
more:
    if (now_s(srv) - c->started > srv->idle_s) {
        code = 408;
        msg = "the request took too long to arrive";
        goto fail;
    }
    return 0;
too_large_head:
    code = 431;
    msg = "request line and headers too large (at most 64 KiB)";
fail:
    conn_fail(c, code,
              code == 413   ? "invalid_request_error"
              : code >= 500 ? "server_error"
                            : "invalid_request_error",
              code == 413   ? "request_too_large"
              : code == 431 ? "headers_too_large"
              : code == 408 ? "request_timeout"
              : code == 501 ? "not_implemented"
              : code == 505 ? "http_version_not_supported"
                            : "bad_request",
              msg);
    return SIZE_MAX;
}

/* Handles the complete requests at the front of p[0..n); returns the bytes used. */
static size_t conn_process(struct conn *c, const char *p, size_t n)
{
    size_t off = 0;
    c->busy++;
    while (!c->req && !c->dead && !c->close_after && !out_full(c) && off < n) {
        size_t used = parse_one(c, p + off, n - off);
        if (used == 0 || used == SIZE_MAX)
            break;
        off += used;
    }
    c->busy--;
    return off;
}

/* Keeps p[0..n) (the start of a request not yet complete, or pipelined ones) in the connection. */
static void conn_keep(struct conn *c, const char *p, size_t n)
{
    if (n > c->in_cap) {
        size_t cap = n < 4096 ? 4096 : n;
        char *in = xmalloc(cap);
        memcpy(in, p, n);
        free(c->in);
        c->in = in;
        c->in_cap = cap;
    } else
        memmove(c->in, p, n);
    c->in_len = n;
}

static void conn_consume(struct conn *c, size_t used)
{
    if (used >= c->in_len) {
        free(c->in);
        c->in = NULL;
        c->in_len = c->in_cap = 0;
    } else if (used > 0) {
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
    }
}

/* While a request is answered, pipelined bytes are kept up to a limit; past it, reading waits. */
static void conn_maybe_pause(struct conn *c)
{
    if (((c->req && c->in_len > HEAD_MAX) || out_full(c)) && !c->paused && !c->rd_eof && !c->lingering) {
        event_del(&c->rev);
        c->paused = true;
    }
}

static void conn_timeout(struct conn *c)
{
    if (c->lingering) {
        conn_free(c);
        return;
    }
    if (c->req && !out_pending(c))
        return; /* a handler is at work: its own deadlines apply */
    if (!c->req && c->in_len > 0 && !out_pending(c)) {
        conn_fail(c, 408, "invalid_request_error", "request_timeout", "the request took too long to arrive");
        conn_check(c);
        return;
    }
    conn_free(c); /* idle, or not reading its answers */
}

static void read_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;
    if (what & EV_TIMEOUT) {
        if (c->resume) { /* deferred: pipelined requests behind one just answered, or a failed write */
            c->resume = false;
            if (c->dead || c->close_after) {
                conn_check(c);
                return;
            }
            conn_consume(c, conn_process(c, c->in, c->in_len));
            conn_maybe_pause(c);
            conn_check(c);
            return;
        }
        conn_timeout(c);
        return;
    }
    if (c->lingering) {
        /* Read and dropped until the client's end of stream, so that an unread request does not turn our close
         * into a reset that destroys the answer in flight. The idle timeout restarts with every read, so a
         * client that keeps sending would keep the connection for ever: the whole close is bounded too. */
        ssize_t r = recv(fd, scratch, sizeof scratch, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) ||
            now_s(c->srv) - c->started > c->srv->idle_s)
            conn_free(c);
        return;
    }
    char *dst = scratch;
    size_t room = sizeof scratch;
    if (c->in_len > 0) {
        if (c->in_cap - c->in_len < 4096) {
            size_t cap = c->in_cap * 2;
            while (cap - c->in_len < SCRATCH)
                cap *= 2;
            c->in = xrealloc(c->in, cap);
            c->in_cap = cap;
        }
        dst = c->in + c->in_len;
        room = c->in_cap - c->in_len;
    }
    ssize_t r = recv(fd, dst, room, 0);
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return;
        c->dead = true;
        conn_check(c);
        return;
    }
    if (r == 0) { /* end of file */
        c->rd_eof = true;
        event_del(&c->rev);
        if (c->req && c->req->streaming)
            c->dead = true; /* a stream's client has gone */
        else if (c->req && c->in_len > 0)
            ; /* requests pipelined behind the one in flight: req_done reads on (to this end again) and answers them */
        else if (c->req || out_pending(c))
            c->close_after = true; /* answer what is in flight (a half-closed client may read it), then close */
        else
            c->dead = true;
        conn_check(c);
        return;
    }
    if (dst == scratch) {
        size_t used = conn_process(c, scratch, (size_t)r);
        if (used < (size_t)r && !c->dead && !c->close_after)
            conn_keep(c, scratch + used, (size_t)r - used);
    } else {
        c->in_len += (size_t)r;
        if (!c->req)
            conn_consume(c, conn_process(c, c->in, c->in_len));
    }
    conn_maybe_pause(c);
    conn_check(c);
}

/* Answers with an error the server found itself (the request could not be read), and closes. */
static void conn_fail(struct conn *c, int code, const char *type, const char *errcode, const char *msg)
{
    struct buf b;
    buf_init(&b, 4096);
    buf_append_lit(&b, "{\"error\":{\"message\":");
    buf_append_json_string(&b, msg, strlen(msg));
    buf_printf(&b, ",\"type\":\"%s\",\"param\":null,\"code\":\"%s\"}}\n", type, errcode);
    char head[256];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nDate: %s\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                      code, reason(code), http_date(), b.len);
    struct iovec iov[2] = {{head, (size_t)hl}, {b.data, b.len}};
    conn_send(c, iov, 2);
    buf_free(&b);
    c->close_after = true; /* what it had read is freed with it (conn_linger) */
    log_debug("http: %d: %s", code, msg);
}

/* accept(2) failed. Out of descriptors (or memory), the pending connection stays queued and the listener would
 * be readable again at once: the loop would spin. Accepting pauses for 100 ms instead (as nginx does); the
 * connections wait in the kernel's backlog meanwhile. */
static void accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct http_server *srv = arg;
    int err = EVUTIL_SOCKET_ERROR();
    if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM)
        return;
    evconnlistener_disable(l);
    struct timeval tv = {0, 100000};
    event_add(srv->accept_retry, &tv);
    time_t now = now_s(srv);
    if (now - srv->accept_warned >= 10) { /* at most one warning per 10 s */
        srv->accept_warned = now;
        log_warn("http: cannot accept connections: %s (%d open); retrying every 100 ms (raise the limit: ulimit -n)",
                 evutil_socket_error_to_string(err), srv->nconns);
    }
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct http_server *srv = arg;
    if (srv->listener)
        evconnlistener_enable(srv->listener);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
    (void)l;
    (void)salen;
    struct http_server *srv = arg;
    if (sa->sa_family == AF_INET || sa->sa_family == AF_INET6) {
        int one = 1; /* answers are written whole; streams' small writes must not wait for an ACK */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    struct conn *c = xcalloc(1, sizeof *c);
    c->srv = srv;
    c->fd = fd;
    event_assign(&c->rev, srv->base, fd, EV_READ | EV_PERSIST, read_cb, c);
    event_assign(&c->wev, srv->base, fd, EV_WRITE | EV_PERSIST, write_cb, c);
    event_add(&c->rev, srv->idle_tv);
    srv->nconns++;
    c->next = srv->conns;
    if (c->next)
        c->next->prev = c;
    srv->conns = c;
}

/* ---------------------------------------------------------------- answering */

/* A write failed while the owner of a stream is in its own code: the close callback must not run under it, so
 * the connection is freed from the loop. */
static void conn_defer_check(struct conn *c)
{
    if (c->dead && !c->resume) {
        c->resume = true;
        event_active(&c->rev, EV_TIMEOUT, 1);
    }
}

/* Reads again (the idle time counting from now), and goes on with requests already read, from the loop. */
static void conn_resume(struct conn *c)
{
    c->paused = false;
    event_add(&c->rev, c->srv->idle_tv); /* after an end of file too: reading it again closes, once all is answered */
    if (c->in_len > 0 && !c->busy && !c->resume) {
        c->resume = true;
        event_active(&c->rev, EV_TIMEOUT, 1);
    }
}

/* Frees an answered request and moves its connection on. */
static void req_done(struct http_req *req)
{
    struct conn *c = req->conn;
    bool keep = req->keep_alive;
    if (req->oh != req->oh_inline)
        free(req->oh);
    free(req);
    if (!c)
        return;
    c->req = NULL;
    if (!keep)
        c->close_after = true;
    if (c->dead || c->close_after) {
        conn_check(c);
        return;
    }
    if (!out_full(c))
        conn_resume(c);
    conn_check(c);
}

void http_add_header(struct http_req *req, const char *name, const char *value)
{
    size_t nl = strlen(name), vl = strlen(value), need = nl + vl + 4;
    if (req->oh_len + need > req->oh_cap) {
        size_t cap = req->oh_cap * 2;
        while (cap < req->oh_len + need)
            cap *= 2;
        char *oh = xmalloc(cap);
        memcpy(oh, req->oh, req->oh_len);
        if (req->oh != req->oh_inline)
            free(req->oh);
        req->oh = oh;
        req->oh_cap = cap;
    }
    char *o = req->oh + req->oh_len;
    memcpy(o, name, nl);
    o[nl] = ':';
    o[nl + 1] = ' ';
    memcpy(o + nl + 2, value, vl);
    o[nl + 2 + vl] = '\r';
    o[nl + 3 + vl] = '\n';
    req->oh_len += need;
}

static char *put(char *o, const char *s, size_t n)
{
    memcpy(o, s, n);
    return o + n;
}
#define PUT_LIT(o, lit) put((o), "" lit "", sizeof(lit) - 1)

/* "Name: value\r\n", the name a literal. */
static char *put_header(char *o, const char *name_colon, size_t n, const char *value)
{
    o = put(o, name_colon, n);
    o = put(o, value, strlen(value));
    return PUT_LIT(o, "\r\n");
}
#define PUT_HEADER(o, name, value) put_header((o), "" name ": ", sizeof(name) + 1, (value))

/* Writes the head (status line, our headers, the handler's, the connection's) into o; returns its end.
 * o has room for 512 + req->oh_len + strlen(ctype) bytes (the rest is at most about 200). */
static char *head_write(char *o, const struct http_req *req, int code, const char *ctype, bool nostore,
                        const char *length, bool chunked)
{
    o = PUT_LIT(o, "HTTP/1.1 ");
    char num[24];
    o = put(o, num, fmt_i64(num, code));
    *o++ = ' ';
    const char *r = reason(code);
    o = put(o, r, strlen(r));
    o = PUT_LIT(o, "\r\n");
    if (ctype)
        o = PUT_HEADER(o, "Content-Type", ctype);
    if (nostore)
        o = PUT_LIT(o, "Cache-Control: no-store\r\n");
    o = PUT_HEADER(o, "Date", http_date());
    if (length)
        o = PUT_HEADER(o, "Content-Length", length);
    if (chunked)
        o = PUT_LIT(o, "Transfer-Encoding: chunked\r\n");
    o = put(o, req->oh, req->oh_len);
    if (!req->keep_alive)
        o = PUT_LIT(o, "Connection: close\r\n");
    else if (req->minor == 0)
        o = PUT_LIT(o, "Connection: keep-alive\r\n");
    return PUT_LIT(o, "\r\n");
}

static void reply(struct http_req *req, int code, const char *ctype, bool nostore, const char *body, size_t len)
{
    struct conn *c = req->conn;
    if (c && !c->dead) {
        size_t room = req->oh_len + (ctype ? strlen(ctype) : 0) + 512;
        char stack[1024], *head = room <= sizeof stack ? stack : xmalloc(room);
        char length[24];
        bool has_body = code >= 200 && code != 204 && code != 304;
        if (has_body)
            fmt_i64(length, (int64_t)len);
        char *end = head_write(head, req, code, ctype, nostore, has_body ? length : NULL, false);
        struct iovec iov[2] = {{head, (size_t)(end - head)}, {(void *)body, len}};
        conn_send(c, iov, has_body && req->method != HTTP_HEAD && len ? 2 : 1);
        if (head != stack)
            free(head);
    }
    req_done(req);
}

void http_reply(struct http_req *req, int code, const char *content_type, const char *body, size_t len)
{
    reply(req, code, content_type, false, body, len);
}

void http_reply_text(struct http_req *req, int code, const char *json, size_t len)
{
    reply(req, code, "application/json", true, json, len);
}

void http_reply_static(struct http_req *req, int code, const char *json)
{
    reply(req, code, "application/json", true, json, strlen(json));
}

void http_reply_json(struct http_req *req, int code, json_t *obj)
{
    struct buf b;
    buf_init(&b, SIZE_MAX / 2);
    if (jsonw_append(&b, obj) == 0 && buf_append(&b, "\n", 1) == 0) {
        reply(req, code, "application/json", true, b.data, b.len);
    } else { /* deeper than jsonw goes: jansson's own writer */
        char *s = json_dumps(obj, JSON_COMPACT);
        buf_reset(&b);
        if (s)
            buf_printf(&b, "%s\n", s);
        free(s);
        reply(req, code, "application/json", true, b.data ? b.data : "", b.len);
    }
    json_decref(obj);
    buf_free(&b);
}

static void reply_error_v(struct http_req *req, int code, const char *type, const char *errcode, const char *param,
                          const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    json_t *err = json_pack("{s:{s:s, s:s, s:o, s:s}}", "error", "message", msg, "type", type, "param",
                            param && param[0] ? json_string(param) : json_null(), "code", errcode);
    if (code >= 500)
        log_warn("%d %s %s: %s", code, req->method_name, req->path, msg);
    http_reply_json(req, code, err);
}

void http_reply_error(struct http_req *req, int code, const char *type, const char *errcode, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    reply_error_v(req, code, type, errcode, NULL, fmt, ap);
    va_end(ap);
}

void http_reply_error_param(struct http_req *req, int code, const char *type, const char *errcode, const char *param,
                            const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    reply_error_v(req, code, type, errcode, param, fmt, ap);
    va_end(ap);
}

void http_stream_start(struct http_req *req, int code, void (*closed)(struct http_req *, void *), void *arg)
{
    req->streaming = true;
    req->closed = closed;
    req->closed_arg = arg;
    req->chunked_out = req->minor >= 1;
    if (!req->chunked_out)
        req->keep_alive = false; /* HTTP/1.0: the end of the stream is the end of the connection */
    struct conn *c = req->conn;
    if (!c || c->dead)
        return;
    size_t room = req->oh_len + 512;
    char stack[1024], *head = room <= sizeof stack ? stack : xmalloc(room);
    char *end = head_write(head, req, code, NULL, false, NULL, req->chunked_out);
    struct iovec iov = {head, (size_t)(end - head)};
    conn_send(c, &iov, 1);
    if (head != stack)
        free(head);
    conn_defer_check(c);
}

void http_stream_write(struct http_req *req, const char *data, size_t len)
{
    struct conn *c = req->conn;
    if (!c || c->dead || len == 0)
        return;
    if (req->chunked_out) {
        char size[24];
        int sl = snprintf(size, sizeof size, "%zx\r\n", len);
        struct iovec iov[3] = {{size, (size_t)sl}, {(void *)data, len}, {(void *)"\r\n", 2}};
        conn_send(c, iov, 3);
    } else {
        struct iovec iov = {(void *)data, len};
        conn_send(c, &iov, 1);
    }
    conn_defer_check(c);
}

void http_stream_end(struct http_req *req)
{
    struct conn *c = req->conn;
    if (c && !c->dead && req->chunked_out) {
        struct iovec iov = {(void *)"0\r\n\r\n", 5};
        conn_send(c, &iov, 1);
    }
    if (c)
        req->closed = NULL; /* ended by its owner: no callback */
    req_done(req);
}

/* ---------------------------------------------------------------- the request */

enum http_method http_method(const struct http_req *req)
{
    return req->method;
}

const char *http_method_name(const struct http_req *req)
{
    return req->method_name;
}

const char *http_path(const struct http_req *req)
{
    return req->path;
}

const char *http_query_string(const struct http_req *req)
{
    return req->query;
}

const char *http_header(const struct http_req *req, const char *name)
{
    for (unsigned i = 0; i < req->nhdr; i++)
        if (strcasecmp(req->hdr[i].name, name) == 0)
            return req->hdr[i].value;
    return NULL;
}

const char *http_body(const struct http_req *req, size_t *len)
{
    *len = req->body_len;
    return req->body;
}

char *http_query(const struct http_req *req, const char *name)
{
    if (!req->query)
        return NULL;
    struct evkeyvalq params;
    params.tqh_first = NULL;
    params.tqh_last = &params.tqh_first;
    if (evhttp_parse_query_str(req->query, &params) != 0) {
        evhttp_clear_headers(&params);
        return NULL;
    }
    const char *v = evhttp_find_header(&params, name);
    char *copy = v ? xstrdup(v) : NULL;
    evhttp_clear_headers(&params);
    return copy;
}

/* ---------------------------------------------------------------- the server */

/* mode 0: an exclusive listener; 1: the first of a group sharing the port with SO_REUSEPORT (the port is
 * first checked free with an exclusive bind, since a REUSEPORT bind would silently share a port that another
 * process holds with REUSEPORT); 2: another of that group. */
static struct http_server *server_new(struct event_base *base, const struct config *cfg, const char *addr,
                                      int port_wanted, http_cb cb, void *arg, int *port, int mode, char *err,
                                      size_t errlen)
{
    struct http_server *srv = xcalloc(1, sizeof *srv);
    srv->base = base;
    srv->cb = cb;
    srv->cb_arg = arg;
    srv->idle_s = cfg->http_idle_timeout_s;
    srv->body_cap = (size_t)cfg->http_max_body * 2;
    struct timeval tv = {cfg->http_idle_timeout_s, 0};
    srv->idle_tv = event_base_init_common_timeout(base, &tv);
    struct evutil_addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = EVUTIL_AI_PASSIVE};
    struct evutil_addrinfo *ai = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port_wanted);
    if (evutil_getaddrinfo(addr, portstr, &hints, &ai) == 0 && ai) {
        bool free_port = true;
        if (mode == 1 && port_wanted != 0) {
            evutil_socket_t probe = socket(ai->ai_family, SOCK_STREAM, 0);
            int one = 1;
            setsockopt(probe, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            free_port = probe >= 0 && bind(probe, ai->ai_addr, (socklen_t)ai->ai_addrlen) == 0;
            if (probe >= 0)
                evutil_closesocket(probe);
        }
        unsigned flags =
            LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC | (mode ? LEV_OPT_REUSEABLE_PORT : 0);
        if (free_port)
            srv->listener =
                evconnlistener_new_bind(base, accept_cb, srv, flags, 1024, ai->ai_addr, (int)ai->ai_addrlen);
        evutil_freeaddrinfo(ai);
    }
    if (srv->listener) {
        srv->accept_retry = evtimer_new(base, accept_retry_cb, srv);
        evconnlistener_set_error_cb(srv->listener, accept_error_cb);
    }
    if (!srv->listener) {
        snprintf(err, errlen, "cannot listen on %s:%d (in use, or a bad address?)", addr, port_wanted);
        free(srv);
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *port = port_wanted;
    if (getsockname(evconnlistener_get_fd(srv->listener), (struct sockaddr *)&ss, &sl) == 0)
        *port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
    return srv;
}

struct http_server *http_server_new(struct event_base *base, const struct config *cfg, const char *addr,
                                    int port_wanted, http_cb cb, void *arg, int *port, char *err, size_t errlen)
{
    return server_new(base, cfg, addr, port_wanted, cb, arg, port, 0, err, errlen);
}

struct http_server *http_server_new_shared(struct event_base *base, const struct config *cfg, const char *addr,
                                           int port_wanted, http_cb cb, void *arg, int *port, bool first, char *err,
                                           size_t errlen)
{
    return server_new(base, cfg, addr, port_wanted, cb, arg, port, first ? 1 : 2, err, errlen);
}

void http_server_stop_listening(struct http_server *srv)
{
    if (srv && srv->listener) {
        evconnlistener_free(srv->listener);
        srv->listener = NULL;
        event_del(srv->accept_retry);
    }
}

void http_server_free(struct http_server *srv)
{
    if (!srv)
        return;
    http_server_stop_listening(srv);
    while (srv->conns)
        conn_free(srv->conns);
    if (srv->accept_retry)
        event_free(srv->accept_retry);
    free(srv);
}
