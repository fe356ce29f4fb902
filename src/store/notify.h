/* notify.h - change notifications over Redis pub/sub.
 *
 * The store's Lua scripts PUBLISH "<conversation id> <turn> <what>" whenever a turn changes (what = "status":
 * its status changed; "events": its event stream grew; "cancel": it was cancelled or deleted while queued or
 * running). They publish on the conversation's own channel, asyncllm:notify:<conversation id>, and cancels
 * also on asyncllm:cancel. So a process hears only about what it asked for: an API instance subscribes to the
 * conversations its clients wait on, for as long as they wait; a worker subscribes to the cancels. (One
 * channel for everything would make every API instance and every worker read every change of every
 * conversation: several messages per prompt, for each process.)
 *
 * A notifier holds one subscribed connection on the caller's loop and calls back for each message, so that
 * long polls, live streams and the worker's cancellation react at once, without polling Redis.
 *
 * Pub/sub is fire-and-forget: a message published while the connection is down, or before a subscription is
 * active, is lost. So once a conversation's subscription is active (also after a reconnection) the notifier
 * calls on_message(conversation, 0, "subscribed"): the user re-reads what it waits for. Users also re-check on
 * a slow timer of their own. */
#ifndef ASYNCLLM_NOTIFY_H
#define ASYNCLLM_NOTIFY_H

#include <stdbool.h>
#include <stddef.h>

struct event_base;
struct config;
struct notify;

#define NOTIFY_CHANNEL_PREFIX "asyncllm:notify:"
#define NOTIFY_CANCEL_CHANNEL "asyncllm:cancel"

struct notify_hooks {
    /* conv_id is NUL-terminated and valid during the call only. */
    void (*on_message)(void *arg, const char *conv_id, long turn, const char *what);
    /* The connection is (again) subscribed: anything published while it was down was missed. May be NULL. */
    void (*on_reconnect)(void *arg);
};

/* cancels: also subscribe to asyncllm:cancel (the worker). */
struct notify *notify_new(struct event_base *base, const struct config *cfg, const struct notify_hooks *hooks,
                          void *arg, bool cancels);
void notify_free(struct notify *n);

/* Starts (or keeps, counted) the subscription to a conversation's changes; on_message(conv_id, 0,
 * "subscribed") follows once it is active. */
void notify_watch(struct notify *n, const char *conv_id);
/* Drops one notify_watch; the subscription ends with the last one. */
void notify_unwatch(struct notify *n, const char *conv_id);

#endif
