/* notify.c - see notify.h. */
#include "store/notify.h"

#include "core/config.h"
#include "core/log.h"
#include "core/util.h"

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdlib.h>
#include <string.h>

#define RECONNECT_MS 500

struct notify {
    struct event_base *base;
    const struct config *cfg;
    struct notify_hooks hooks;
    void *arg;
    redisAsyncContext *ac;
    struct event *reconnect_ev;
    bool closing;
};

static void notify_connect(struct notify *n);

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

static void message_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    (void)ac;
    struct notify *n = privdata;
    redisReply *reply = r;
    if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    const redisReply *kind = reply->element[0];
    if (kind->type != REDIS_REPLY_STRING)
        return;
    if (strcmp(kind->str, "subscribe") == 0) {
        log_debug("notify: subscribed to %s", NOTIFY_CHANNEL);
        if (n->hooks.on_reconnect)
            n->hooks.on_reconnect(n->arg);
    } else if (strcmp(kind->str, "message") == 0 && reply->element[2]->type == REDIS_REPLY_STRING) {
        deliver(n, reply->element[2]->str, reply->element[2]->len);
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

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    struct notify *n = ac->data;
    n->ac = NULL;
    if (!n->closing)
        log_warn("notify: subscription connection lost; reconnecting");
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
    redisLibeventAttach(ac, n->base);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    n->ac = ac;
    if (n->cfg->redis_password[0])
        redisAsyncCommand(ac, NULL, NULL, "AUTH %s", n->cfg->redis_password);
    redisAsyncCommand(ac, message_cb, n, "SUBSCRIBE %s", NOTIFY_CHANNEL);
}

struct notify *notify_new(struct event_base *base, const struct config *cfg, const struct notify_hooks *hooks,
                          void *arg)
{
    struct notify *n = xcalloc(1, sizeof *n);
    n->base = base;
    n->cfg = cfg;
    n->hooks = *hooks;
    n->arg = arg;
    n->reconnect_ev = evtimer_new(base, reconnect_cb, n);
    notify_connect(n);
    return n;
}

void notify_free(struct notify *n)
{
    if (!n)
        return;
    n->closing = true;
    if (n->ac)
        redisAsyncFree(n->ac);
    event_free(n->reconnect_ev);
    free(n);
}
