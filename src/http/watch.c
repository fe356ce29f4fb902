/* watch.c - requests that wait for a conversation to change: long polls (/polling?wait=N), synchronous
 * Responses calls and live Server-Sent Event streams.
 *
 * No thread and no busy loop per waiting client: each waiter is a small struct on two lists (its
 * conversation's, in api->watches, and api->watch_all). The store's scripts publish a notification on every
 * change (store/notify.h) on the conversation's channel, which the API subscribes to while someone waits on
 * that conversation; its subscriber wakes the waiters, which re-read Redis and answer (or send the new events)
 * if there is something new. Because pub/sub may drop a message while its
 * connection is down, a 5 s timer also wakes every waiter.
 *
 * Lifetimes. A waiter holds its request until it answers. A stream that started its reply is tied to its
 * connection: when the client goes away, the server calls the close callback, which ends the stream (freeing
 * the request) and forgets the waiter at once. A waiter with a Redis read in flight (busy) is freed when that read
 * answers.
 *
 * A poll without wait (the common one) is no waiter: one read and its answer, none of the above. */
#include "http/api_internal.h"

#include "core/config.h"
#include "core/log.h"
#include "core/map.h"
#include "core/util.h"
#include "http/http.h"
#include "store/notify.h"
#include "store/store.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#define SAFETY_WAKE_S 5
#define KEEPALIVE_S 15
#define EVENTS_PER_READ 1000

enum watch_kind { W_POLL, W_SYNC, W_STREAM };

struct watch_list {
    char conv_id[72];
    struct watch *head;
};

struct watch {
    struct api *api;
    enum watch_kind kind;
    struct http_req *req;        /* NULL once answered, or once a streaming client left */
    struct watch_list *list;     /* NULL once unlinked */
    struct watch *prev, *next;   /* on list */
    struct watch *gprev, *gnext; /* on api->watch_all */
    char conv_id[72];
    long turn;
    char sig[48]; /* W_POLL: "<turn> <status>" at the first read */
    bool have_sig;
    struct event *timer; /* W_POLL, W_SYNC: end of the wait; W_STREAM: keep-alive */
    bool busy;           /* a Redis read is in flight */
    bool dirty;          /* woken while busy: read again after */
    bool finishing;      /* answer at the next read, whatever it shows */
    bool streaming;      /* W_STREAM: the reply has started */
    long after_entry;    /* W_STREAM: position of the last stored event read */
    long next_seq;       /* W_STREAM: sequence number of the next SSE event */
    long starting_after; /* W_STREAM: the client has every event up to this one */
};

static void wake(struct watch *w);

/* ---------------------------------------------------------------- lists */

static void watch_link(struct watch *w)
{
    struct api *api = w->api;
    struct watch_list *l = map_get(api->watches, w->conv_id);
    if (!l) {
        l = xcalloc(1, sizeof *l);
        snprintf(l->conv_id, sizeof l->conv_id, "%s", w->conv_id);
        map_put(api->watches, l->conv_id, l);
    }
    notify_watch(api->notify, l->conv_id); /* every waiter wants its conversation's notifications */
    w->list = l;
    w->next = l->head;
    if (l->head)
        l->head->prev = w;
    l->head = w;
    w->gnext = api->watch_all;
    if (api->watch_all)
        api->watch_all->gprev = w;
    api->watch_all = w;
}

static void watch_unlink(struct watch *w)
{
    struct watch_list *l = w->list;
    if (!l)
        return;
    if (w->prev)
        w->prev->next = w->next;
    else
        l->head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    notify_unwatch(w->api->notify, l->conv_id);
    if (!l->head) {
        map_del(w->api->watches, l->conv_id);
        free(l);
    }
    if (w->gprev)
        w->gprev->gnext = w->gnext;
    else
        w->api->watch_all = w->gnext;
    if (w->gnext)
        w->gnext->gprev = w->gprev;
    w->list = NULL;
    w->prev = w->next = w->gprev = w->gnext = NULL;
}

/* The waiter is done with its request (answered, or the client left): unlink, and free unless a read is due. */
static void watch_done(struct watch *w)
{
    watch_unlink(w);
    if (w->timer) {
        event_free(w->timer);
        w->timer = NULL;
    }
    w->req = NULL;
    if (!w->busy)
        free(w);
}

static struct watch *watch_new(struct api *api, enum watch_kind kind, struct http_req *req, const char *conv_id,
                               long turn)
{
    struct watch *w = xcalloc(1, sizeof *w);
    w->api = api;
    w->kind = kind;
    w->req = req;
    w->turn = turn;
    snprintf(w->conv_id, sizeof w->conv_id, "%s", conv_id);
    watch_link(w);
    return w;
}

/* ---------------------------------------------------------------- long polls and syncs */

static void finish_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    w->finishing = true;
    wake(w);
}

static void arm(struct watch *w, long seconds, event_callback_fn cb, bool persist)
{
    w->timer = event_new(w->api->base, -1, persist ? EV_PERSIST : 0, cb, w);
    struct timeval tv = {seconds, 0};
    evtimer_add(w->timer, &tv);
}

static void loaded_cb(void *arg, int rc, const struct conv *conv)
{
    struct watch *w = arg;
    w->busy = false;
    if (!w->req) {
        free(w);
        return;
    }
    struct http_req *req = w->req;
    if (rc == STORE_ENOTFOUND) {
        http_reply_error(req, 404, "invalid_request_error",
                         w->kind == W_POLL ? "conversation_not_found" : "response_not_found", "no such %s",
                         w->kind == W_POLL ? "conversation" : "response");
        watch_done(w);
        return;
    }
    if (rc != STORE_OK) {
        api_reply_unavailable(w->api, req, "the conversation store (Redis) is unavailable");
        watch_done(w);
        return;
    }
    if (w->kind == W_POLL) {
        long turn;
        const char *status = api_conv_poll_status(conv, &turn);
        char sig[48];
        snprintf(sig, sizeof sig, "%ld %s", turn, status);
        if (!w->have_sig) {
            snprintf(w->sig, sizeof w->sig, "%s", sig);
            w->have_sig = true;
            if (strcmp(status, "pending") != 0)
                w->finishing = true; /* nothing to wait for */
        }
        if (w->finishing || strcmp(sig, w->sig) != 0) {
            api_reply_poll(req, conv);
            watch_done(w);
            return;
        }
    } else {
        const struct turn *t = w->turn >= 1 && w->turn <= conv->nturns ? &conv->turn[w->turn] : NULL;
        if (!t || t->status == TURN_NONE || t->status == TURN_REJECTED || t->status == TURN_DELETED) {
            http_reply_error(req, 404, "invalid_request_error", "response_not_found", "no such response");
            watch_done(w);
            return;
        }
        if (w->finishing || turn_status_final(t->status)) {
            response_reply(req, w->api, conv, w->turn, t, RESPONSE_NOW, NULL);
            watch_done(w);
            return;
        }
    }
    if (w->dirty) {
        w->dirty = false;
        wake(w);
    }
}

/* A poll without wait: one read, one answer. It needs no waiter: nothing wakes it, the store answers every read
 * exactly once (STORE_EUNAVAILABLE when it closes, before the connections are freed: api_free), and a request
 * whose client left is still ours to answer (libevent then frees it). */
struct poll_once {
    struct api *api;
    struct http_req *req;
};

static void poll_once_cb(void *arg, int rc, const struct conv *conv)
{
    struct poll_once *po = arg;
    if (rc == STORE_OK)
        api_reply_poll(po->req, conv);
    else if (rc == STORE_ENOTFOUND)
        http_reply_error(po->req, 404, "invalid_request_error", "conversation_not_found", "no such conversation");
    else
        api_reply_unavailable(po->api, po->req, "the conversation store (Redis) is unavailable");
    free(po);
}

void watch_poll(struct api *api, struct http_req *req, const char *conv_id, long wait_s)
{
    if (api->stopping)
        wait_s = 0;
    if (wait_s <= 0) {
        if (!api->st) {
            api_reply_unavailable(api, req, "the server is shutting down");
            return;
        }
        struct poll_once *po = xmalloc(sizeof *po);
        po->api = api;
        po->req = req;
        store_load(api->st, conv_id, poll_once_cb, po);
        return;
    }
    struct watch *w = watch_new(api, W_POLL, req, conv_id, 0);
    arm(w, wait_s, finish_timer_cb, false);
    wake(w);
}

void watch_sync(struct api *api, struct http_req *req, const char *conv_id, long turn)
{
    struct watch *w = watch_new(api, W_SYNC, req, conv_id, turn);
    arm(w, api->cfg->sync_timeout_s, finish_timer_cb, false);
    wake(w);
}

/* ---------------------------------------------------------------- streams */

static void stream_closed_cb(struct http_req *req, void *arg)
{
    struct watch *w = arg;
    log_debug("stream of %s turn %ld: client gone", w->conv_id, w->turn);
    http_stream_end(req); /* frees the request (its answer goes nowhere) */
    watch_done(w);
}

static void stream_end(struct watch *w)
{
    struct http_req *req = w->req;
    if (req && w->streaming)
        http_stream_end(req);
    watch_done(w);
}

static void keepalive_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct watch *w = arg;
    if (!w->req || !w->streaming)
        return;
    http_stream_write(w->req, ": keep-alive\n\n", 14);
}

static void events_cb(void *arg, int rc, const struct conv *conv, const struct turn_event *events, size_t n)
{
    struct watch *w = arg;
    w->busy = false;
    if (!w->req) {
        free(w);
        return;
    }
    struct http_req *req = w->req;
    const struct turn *t = rc == STORE_OK && w->turn >= 1 && w->turn <= conv->nturns ? &conv->turn[w->turn] : NULL;
    if (!w->streaming) {
        if (rc != STORE_OK && rc != STORE_ENOTFOUND) {
            api_reply_unavailable(w->api, req, "the conversation store (Redis) is unavailable");
            watch_done(w);
            return;
        }
        if (!t || t->status == TURN_NONE || t->status == TURN_REJECTED || t->status == TURN_DELETED) {
            http_reply_error(req, 404, "invalid_request_error", "response_not_found", "no such response");
            watch_done(w);
            return;
        }
        if (!t->stream) {
            http_reply_error(req, 400, "invalid_request_error", "stream_not_available",
                             "this response was not created with stream=true, so it has no events to stream");
            watch_done(w);
            return;
        }
        http_add_header(req, "Content-Type", "text/event-stream");
        http_add_header(req, "Cache-Control", "no-cache");
        http_add_header(req, "X-Accel-Buffering", "no");
        http_stream_start(req, 200, stream_closed_cb, w);
        w->streaming = true;
        arm(w, KEEPALIVE_S, keepalive_cb, true);
    }
    if (!t) { /* deleted, expired, or Redis failed mid-stream: end it */
        stream_end(w);
        return;
    }
    struct evbuffer *out = evbuffer_new();
    bool last = responses_sse(w->api, conv, w->turn, t, events, n, w->starting_after, &w->next_seq, out);
    if (n)
        w->after_entry = events[n - 1].seq;
    if (evbuffer_get_length(out))
        http_stream_write(req, (const char *)evbuffer_pullup(out, -1), evbuffer_get_length(out));
    evbuffer_free(out);
    if (last || w->finishing) {
        stream_end(w);
        return;
    }
    if (w->dirty || n == EVENTS_PER_READ) {
        w->dirty = false;
        wake(w);
    }
}

void watch_stream(struct api *api, struct http_req *req, const char *conv_id, long turn, long starting_after)
{
    struct watch *w = watch_new(api, W_STREAM, req, conv_id, turn);
    w->starting_after = starting_after;
    wake(w);
}

/* ---------------------------------------------------------------- waking */

static void wake(struct watch *w)
{
    if (!w->req)
        return;
    if (w->busy) {
        w->dirty = true;
        return;
    }
    struct api *api = w->api;
    if (!api->st) {
        w->finishing = true;
        if (w->kind == W_STREAM && w->streaming)
            stream_end(w);
        else {
            api_reply_unavailable(api, w->req, "the server is shutting down");
            watch_done(w);
        }
        return;
    }
    w->busy = true;
    if (w->kind == W_STREAM)
        store_events_read(api->st, w->conv_id, w->turn, w->after_entry, EVENTS_PER_READ, events_cb, w);
    else
        store_load(api->st, w->conv_id, loaded_cb, w);
}

static void wake_all(struct api *api)
{
    for (struct watch *w = api->watch_all, *next; w; w = next) {
        next = w->gnext;
        wake(w);
    }
}

static void on_notify(void *arg, const char *conv_id, long turn, const char *what)
{
    struct api *api = arg;
    struct watch_list *l = map_get(api->watches, conv_id);
    if (!l)
        return;
    bool all = strcmp(what, "subscribed") == 0; /* the subscription is active: re-read, in case */
    for (struct watch *w = l->head, *next; w; w = next) {
        next = w->next;
        if (all || w->kind == W_POLL || w->turn == turn)
            wake(w);
    }
}

static void on_reconnect(void *arg)
{
    wake_all(arg);
}

static void safety_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    wake_all(arg);
}

void watch_init(struct api *api)
{
    api->watches = map_new();
    static const struct notify_hooks hooks = {on_notify, on_reconnect};
    api->notify = notify_new(api->base, api->cfg, &hooks, api, false);
    api->watch_timer = event_new(api->base, -1, EV_PERSIST, safety_cb, api);
    struct timeval tv = {SAFETY_WAKE_S, 0};
    evtimer_add(api->watch_timer, &tv);
}

void watch_close_all(struct api *api)
{
    api->stopping = true;
    for (struct watch *w = api->watch_all, *next; w; w = next) {
        next = w->gnext;
        w->finishing = true;
        if (w->kind == W_STREAM && w->streaming)
            stream_end(w);
        else
            wake(w);
    }
}

void watch_free(struct api *api)
{
    while (api->watch_all) {
        struct watch *w = api->watch_all;
        if (w->req && !w->streaming)
            api_reply_unavailable(api, w->req, "the server is shutting down");
        else if (w->req)
            http_stream_end(w->req);
        assert(!w->busy); /* the store is closed first: every read has answered */
        watch_done(w);
    }
    notify_free(api->notify);
    if (api->watch_timer)
        event_free(api->watch_timer);
    map_free(api->watches);
}
