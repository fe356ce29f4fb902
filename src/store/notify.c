/* notify.c - see notify.h.
 *
 * hiredis 0.14 keeps one callback per channel and has two pub/sub pitfalls that shape this file:
 * - an UNSUBSCRIBE's reply deletes the channel's callback, even one registered by a SUBSCRIBE sent after it;
 *   so a channel has at most one (UN)SUBSCRIBE in flight, and a watch that arrives meanwhile waits for its
 *   reply (state CH_UNSUBSCRIBING, then a new SUBSCRIBE);
 * - when a reply says the connection has no subscription left, hiredis leaves subscribed mode, and a
 *   SUBSCRIBE reply that arrives after that fails an assertion; so the connection always keeps one
 *   subscription: NOTIFY_BASE_CHANNEL (nothing publishes on it), or the cancels channel. */
#include "store/notify.h"

#include "core/config.h"
#include "core/log.h"
#include "core/map.h"
#include "core/util.h"
#include "store/hiev.h"

#include <event2/event.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>

#define RECONNECT_MS 500
#define NOTIFY_BASE_CHANNEL "asyncllm:notify"

enum chan_state { CH_IDLE, CH_SUBSCRIBING, CH_ACTIVE, CH_UNSUBSCRIBING };

struct chan {
    char name[96]; /* NOTIFY_CHANNEL_PREFIX + conversation id: the map's key */
    long refs;     /* notify_watch calls not yet undone */
    enum chan_state state;
};

struct notify {
    struct event_base *base;
    const struct config *cfg;
    struct notify_hooks hooks;
    void *arg;
    bool cancels;
    redisAsyncContext *ac;
    bool connected; /* the base subscription is confirmed */
    struct event *reconnect_ev;
    struct map *chans; /* channel name -> struct chan */
    bool closing;
};

static void notify_connect(struct notify *n);
static void message_cb(redisAsyncContext *ac, void *r, void *privdata);

static void schedule_reconnect(struct notify *n)
{
    if (n->closing || evtimer_pending(n->reconnect_ev, NULL))
        return;
    struct timeval tv = {0, RECONNECT_MS * 1000};
    evtimer_add(n->reconnect_ev, &tv);
}

static void reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    notify_connect(arg);
}

static void chan_drop(struct notify *n, struct chan *c)
{
    map_del(n->chans, c->name);
    free(c);
}

static void chan_send(struct notify *n, struct chan *c, const char *cmd)
{
    c->state = strcmp(cmd, "SUBSCRIBE") == 0 ? CH_SUBSCRIBING : CH_UNSUBSCRIBING;
    if (n->ac)
        redisAsyncCommand(n->ac, message_cb, n, "%s %s", cmd, c->name);
    else if (c->state == CH_SUBSCRIBING)
        c->state = CH_IDLE; /* subscribed when the connection is back */
    else
        chan_drop(n, c); /* nothing to unsubscribe from without a connection */
}

/* Parses "<conv> <turn> <what>" and hands it on. */
static void deliver(struct notify *n, const char *msg, size_t len)
{
    char conv[72], what[16];
    const char *sp1 = memchr(msg, ' ', len);
    if (!sp1 || (size_t)(sp1 - msg) >= sizeof conv)
        return;
    memcpy(conv, msg, (size_t)(sp1 - msg));
    conv[sp1 - msg] = '\0';
    char *end;
    long turn = strtol(sp1 + 1, &end, 10);
    if (*end != ' ')
        return;
    size_t wl = len - (size_t)(end + 1 - msg);
    if (wl >= sizeof what)
        return;
    memcpy(what, end + 1, wl);
    what[wl] = '\0';
    n->hooks.on_message(n->arg, conv, turn, what);
}

/* A (un)subscription of a conversation's channel was confirmed. */
static void chan_confirmed(struct notify *n, const char *name, bool subscribed)
{
    struct chan *c = map_get(n->chans, name);
    if (!c)
        return;
    if (subscribed) {
        c->state = CH_ACTIVE;
        if (c->refs == 0) {
            chan_send(n, c, "UNSUBSCRIBE");
        } else {
            char conv[72];
            snprintf(conv, sizeof conv, "%s", name + strlen(NOTIFY_CHANNEL_PREFIX));
            n->hooks.on_message(n->arg, conv, 0, "subscribed");
        }
    } else {
        if (c->refs > 0)
            chan_send(n, c, "SUBSCRIBE");
        else
            chan_drop(n, c);
    }
}

static void message_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    (void)ac;
    struct notify *n = privdata;
    redisReply *reply = r;
    if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    const redisReply *kind = reply->element[0], *chan = reply->element[1];
    if (kind->type != REDIS_REPLY_STRING || chan->type != REDIS_REPLY_STRING)
        return;
    if (strcmp(kind->str, "message") == 0) {
        if (reply->element[2]->type == REDIS_REPLY_STRING)
            deliver(n, reply->element[2]->str, reply->element[2]->len);
        return;
    }
    bool sub = strcmp(kind->str, "subscribe") == 0;
    if (!sub && strcmp(kind->str, "unsubscribe") != 0)
        return;
    if (strncmp(chan->str, NOTIFY_CHANNEL_PREFIX, strlen(NOTIFY_CHANNEL_PREFIX)) == 0) {
        chan_confirmed(n, chan->str, sub);
    } else if (sub && !n->connected) { /* the base subscription: the connection is usable */
        n->connected = true;
        log_debug("notify: subscribed to %s", chan->str);
        if (n->hooks.on_reconnect)
            n->hooks.on_reconnect(n->arg);
    }
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct notify *n = ac->data;
    if (status != REDIS_OK) {
        n->ac = NULL;
        schedule_reconnect(n);
    }
}

/* The channels, as a malloc'd array (the caller frees it) that stays valid while the map changes; NULL if none. */
static struct chan **chans_snapshot(const struct notify *n, size_t *cnt)
{
    *cnt = map_count(n->chans);
    if (*cnt == 0)
        return NULL;
    void **all = xmalloc(*cnt * sizeof *all);
    *cnt = map_values(n->chans, all, *cnt);
    return (struct chan **)all;
}

/* The connection is gone: no subscription is active or in flight any more. Channels still watched are
 * subscribed again with the connection; the others are forgotten. */
static void chans_reset(struct notify *n)
{
    size_t cnt;
    struct chan **all = chans_snapshot(n, &cnt);
    for (size_t i = 0; i < cnt; i++) {
        struct chan *c = all[i];
        if (c->refs > 0)
            c->state = CH_IDLE;
        else
            chan_drop(n, c);
    }
    free(all);
}

/* Subscribes, on a new connection, the conversations still watched. */
static void chans_resubscribe(struct notify *n)
{
    size_t cnt;
    struct chan **all = chans_snapshot(n, &cnt);
    for (size_t i = 0; i < cnt; i++) {
        struct chan *c = all[i];
        if (c->state == CH_IDLE)
            chan_send(n, c, "SUBSCRIBE");
    }
    free(all);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct notify *n = ac->data;
    n->ac = NULL;
    n->connected = false;
    if (!n->closing)
        log_warn("notify: subscription connection lost; reconnecting");
    chans_reset(n);
    schedule_reconnect(n);
}

static void notify_connect(struct notify *n)
{
    redisAsyncContext *ac = redisAsyncConnect(n->cfg->redis_host, (int)n->cfg->redis_port);
    if (!ac || ac->err) {
        if (ac)
            redisAsyncFree(ac);
        schedule_reconnect(n);
        return;
    }
    ac->data = n;
    hiev_attach(ac, n->base);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    n->ac = ac;
    if (n->cfg->redis_password[0])
        redisAsyncCommand(ac, NULL, NULL, "AUTH %s", n->cfg->redis_password);
    /* first, the subscription that keeps the connection in subscribed mode (see the top of this file) */
    redisAsyncCommand(ac, message_cb, n, "SUBSCRIBE %s", n->cancels ? NOTIFY_CANCEL_CHANNEL : NOTIFY_BASE_CHANNEL);
    chans_resubscribe(n);
}

struct notify *notify_new(struct event_base *base, const struct config *cfg, const struct notify_hooks *hooks,
                          void *arg, bool cancels)
{
    struct notify *n = xcalloc(1, sizeof *n);
    n->base = base;
    n->cfg = cfg;
    n->hooks = *hooks;
    n->arg = arg;
    n->cancels = cancels;
    n->chans = map_new();
    n->reconnect_ev = evtimer_new(base, reconnect_cb, n);
    notify_connect(n);
    return n;
}

void notify_watch(struct notify *n, const char *conv_id)
{
    char name[96];
    snprintf(name, sizeof name, "%s%s", NOTIFY_CHANNEL_PREFIX, conv_id);
    struct chan *c = map_get(n->chans, name);
    if (!c) {
        c = xcalloc(1, sizeof *c);
        snprintf(c->name, sizeof c->name, "%s", name);
        map_put(n->chans, c->name, c);
    }
    if (c->refs++ > 0)
        return;
    /* CH_SUBSCRIBING: its confirmation calls back; CH_UNSUBSCRIBING: subscribed again after that reply */
    if (c->state == CH_IDLE)
        chan_send(n, c, "SUBSCRIBE");
}

void notify_unwatch(struct notify *n, const char *conv_id)
{
    char name[96];
    snprintf(name, sizeof name, "%s%s", NOTIFY_CHANNEL_PREFIX, conv_id);
    struct chan *c = map_get(n->chans, name);
    if (!c || c->refs == 0 || --c->refs > 0)
        return;
    if (c->state == CH_ACTIVE)
        chan_send(n, c, "UNSUBSCRIBE");
    else if (c->state == CH_IDLE)
        chan_drop(n, c); /* never subscribed (no connection) */
    /* CH_SUBSCRIBING: unsubscribed when confirmed; CH_UNSUBSCRIBING: dropped when confirmed */
}

void notify_free(struct notify *n)
{
    if (!n)
        return;
    n->closing = true;
    if (n->ac)
        redisAsyncFree(n->ac); /* calls on_disconnect: chans_reset */
    size_t cnt;
    struct chan **all = chans_snapshot(n, &cnt);
    for (size_t i = 0; i < cnt; i++)
        free(all[i]);
    free(all);
    map_free(n->chans);
    event_free(n->reconnect_ev);
    free(n);
}
