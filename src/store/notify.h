/* notify.h - change notifications over Redis pub/sub.
 *
 * The store's Lua scripts PUBLISH "<conversation id> <turn> <what>" on the channel asyncllm:notify whenever a
 * turn changes (what = "status": its status changed; "events": its event stream grew; "cancel": it was
 * cancelled). A notifier holds one subscribed connection on the caller's loop and calls back for each message,
 * so that long polls, live streams and the worker's cancellation react at once, without polling Redis.
 *
 * Pub/sub is fire-and-forget: a message published while the connection is down is lost. Users therefore also
 * re-check on a slow timer of their own; on_reconnect tells them that messages may have been missed. */
#ifndef ASYNCLLM_NOTIFY_H
#define ASYNCLLM_NOTIFY_H

#include <stddef.h>

struct event_base;
struct config;
struct notify;

#define NOTIFY_CHANNEL "asyncllm:notify"

struct notify_hooks {
    /* conv_id is NUL-terminated and valid during the call only. */
    void (*on_message)(void *arg, const char *conv_id, long turn, const char *what);
    /* The subscription is (again) active: anything published while it was down was missed. May be NULL. */
    void (*on_reconnect)(void *arg);
};

struct notify *notify_new(struct event_base *base, const struct config *cfg, const struct notify_hooks *hooks,
                          void *arg);
void notify_free(struct notify *n);

#endif
