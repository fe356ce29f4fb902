/* hiev.c - see hiev.h. */
#include "store/hiev.h"

#include "core/util.h"

#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <sys/socket.h>

/* What one read takes (hiredis' own read size) and what the reader is fed at a time (hiredis compacts its
 * buffer once it has consumed this much: feeding more at once only makes it move more). */
#define READ_BYTES (16 * 1024)
#define FEED_BYTES 1024

/* Runs the callbacks of the replies the reader holds: what redisAsyncHandleRead does after its read. Exported by
 * libhiredis (0.14 and 1.x) but not declared in its headers; a library without it fails the link, not a run. */
void redisProcessCallbacks(redisAsyncContext *ac);

struct hiev {
    redisAsyncContext *ac;
    struct event *rev, *wev;
    bool reading, writing;
    bool *freed; /* set by cleanup while hiev_read runs callbacks */
};

static void add_read(void *arg)
{
    struct hiev *e = arg;
    if (!e->reading) {
        event_add(e->rev, NULL);
        e->reading = true;
    }
}

static void del_read(void *arg)
{
    struct hiev *e = arg;
    if (e->reading) {
        event_del(e->rev);
        e->reading = false;
    }
}

static void add_write(void *arg)
{
    struct hiev *e = arg;
    if (!e->writing) {
        event_add(e->wev, NULL);
        e->writing = true;
    }
}

static void del_write(void *arg)
{
    struct hiev *e = arg;
    if (e->writing) {
        event_del(e->wev);
        e->writing = false;
    }
}

static void cleanup(void *arg)
{
    struct hiev *e = arg;
    if (e->freed)
        *e->freed = true;
    event_free(e->rev);
    event_free(e->wev);
    free(e);
}

void hiev_read(redisAsyncContext *ac)
{
    redisContext *c = &ac->c;
    struct hiev *e = ac->ev.data;
    if (!(c->flags & REDIS_CONNECTED) || !e) {
        redisAsyncHandleRead(ac); /* the connection's completion and its errors are hiredis' own */
        return;
    }
    char buf[READ_BYTES];
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (n <= 0) {
        /* End of stream or an error: hiredis reads again, finds the end (a reset socket reads as one after its
         * error) and disconnects, answering every written command. */
        redisAsyncHandleRead(ac);
        return;
    }
    bool freed = false;
    e->freed = &freed;
    for (size_t off = 0; off < (size_t)n; off += FEED_BYTES) {
        size_t len = (size_t)n - off < FEED_BYTES ? (size_t)n - off : FEED_BYTES;
        redisReaderFeed(c->reader, buf + off, len); /* fails only on a reader error, which the next call reports */
        redisProcessCallbacks(ac);
        if (freed)
            return; /* a callback or a reader error freed the context, and us */
    }
    e->freed = NULL;
}

static void read_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    hiev_read(((struct hiev *)arg)->ac);
}

static void write_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct hiev *e = arg;
    e->writing = false; /* not persistent: hiredis asks again if it could not write everything */
    redisAsyncHandleWrite(e->ac);
}

int hiev_attach(redisAsyncContext *ac, struct event_base *base)
{
    if (ac->ev.data)
        return REDIS_ERR;
    struct hiev *e = xcalloc(1, sizeof *e);
    e->ac = ac;
    e->rev = event_new(base, ac->c.fd, EV_READ | EV_PERSIST, read_cb, e);
    e->wev = event_new(base, ac->c.fd, EV_WRITE, write_cb, e);
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    ac->ev.data = e;
    /* as hiredis' adapter: the connection completes (or fails) when the socket turns writable */
    add_read(e);
    add_write(e);
    return REDIS_OK;
}
