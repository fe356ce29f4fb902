/* store.h - the conversation store in Redis (hiredis async API on the caller's libevent loop).
 *
 * One hash per conversation, `asyncllm:conv:<id>` (field names in docs/CONTRACTS.md). Every write is a Lua
 * script, so each is atomic and idempotent per (conversation, turn): a turn's result is stored once, and a
 * replayed write after a crash or a rebalance changes nothing.
 *
 * Every operation answers exactly once, through its callback, on the loop's thread: with the result, or with
 * STORE_EUNAVAILABLE when Redis is down or the command passed its deadline. The store reconnects by itself.
 * Data handed to a callback (struct conv and its strings) is only valid during the call. */
#ifndef ASYNCLLM_STORE_H
#define ASYNCLLM_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct evbuffer;
struct config;
struct store;

enum store_rc {
    STORE_OK = 0,
    STORE_ENOTFOUND = -1,    /* no such conversation */
    STORE_EEXISTS = -2,      /* a new conversation's id is taken (practically impossible with 132 random bits) */
    STORE_EUNAVAILABLE = -3, /* Redis down, command timed out, or an unexpected reply */
    STORE_ECONFLICT = -4,    /* the turn is in a state that forbids the operation (cancel a finished turn) */
    STORE_ENOPREV = -5,      /* the turn named as the previous one does not exist (or was deleted) */
};

enum turn_status {
    TURN_NONE = 0,
    TURN_PENDING,
    TURN_IN_PROGRESS,
    TURN_COMPLETE,
    TURN_FAILED,
    TURN_REJECTED,  /* never accepted: its produce failed */
    TURN_CANCELLED, /* cancelled by a client before it finished */
    TURN_DELETED,   /* deleted by a client: gone for the API */
};

/* True for a turn that will not change any more (complete, failed, cancelled). */
bool turn_status_final(enum turn_status s);

struct turn {
    enum turn_status status;
    const char *prompt, *response, *model, *finish_reason, *error_code, *error_message;
    const char *req;   /* JSON object of a Responses API request's parameters, or NULL */
    const char *input; /* JSON array of the turn's input messages when given as a list, or NULL */
    size_t prompt_len, response_len;
    long prompt_tokens, completion_tokens, total_tokens, attempts;
    int64_t submitted_at, started_at, completed_at;
    bool published; /* the worker saw the broker ack its response message */
    bool stream;    /* the turn keeps an event stream (see store_events_read) */
    /* JSON object: the verdict of asyncllm moderate (see store_moderation), or NULL */
    const char *moderation;
};

struct conv {
    const char *id;
    long nturns; /* turns allocated; turn[1..nturns] are valid, turn[0] unused */
    struct turn *turn;
    int64_t created_at, updated_at;
};

/* The turn /polling shows: the highest one that was not rejected (0 if none). */
long conv_current_turn(const struct conv *conv);
const char *turn_status_name(enum turn_status s);

/* The outcome of one LLM call, as the worker stores it. Strings are copied by the store. */
struct turn_result {
    enum turn_status status; /* TURN_COMPLETE or TURN_FAILED */
    const char *response, *model, *finish_reason, *error_code, *error_message;
    size_t response_len;
    long prompt_tokens, completion_tokens, total_tokens, attempts;
};

/* What the Responses API keeps with a turn. Every member is optional. */
struct turn_meta {
    const char *req;      /* JSON object: the request's parameters, echoed in the Response object */
    const char *input;    /* JSON array: the turn's input messages, when the client sent a list */
    bool stream;          /* keep an event stream for live streaming (created with a "q" event) */
    long prev_turn;       /* the turn continued (previous_response_id): must exist, else STORE_ENOPREV */
    int64_t submitted_at; /* Unix ms the turn is stamped with (0: now) */
};

/* An entry of a turn's event stream: kind 'q' queued (by the API), 's' started (the worker began the LLM call),
 * 'd' delta (text), 'e' ended (the turn reached a final status). seq is its position, 1-based. */
struct turn_event {
    long seq;
    char kind;
    const char *text;
    size_t text_len;
};

typedef void store_submit_cb(void *arg, int rc, long turn);
/* rc: 1 done, 0 nothing to do (already so), STORE_ENOTFOUND, STORE_ECONFLICT, STORE_EUNAVAILABLE. */
typedef void store_rc_cb(void *arg, int rc);
/* events[0..n) valid during the call only; conv is the conversation read in the same round trip. */
typedef void store_events_cb(void *arg, int rc, const struct conv *conv, const struct turn_event *events, size_t n);
/* value: NULL if the key was free and is now claimed; else the value stored under it. */
typedef void store_idem_cb(void *arg, int rc, const char *value);
typedef void store_conv_cb(void *arg, int rc, const struct conv *conv);
typedef void store_begin_cb(void *arg, int rc, long turn, const struct conv *conv);
typedef void store_done_cb(void *arg, int rc, bool stored);

struct store *store_new(struct event_base *base, const struct config *cfg);
/* Closes the connection; pending operations answer STORE_EUNAVAILABLE before this returns. */
void store_free(struct store *st);
bool store_connected(const struct store *st);
/* Writes the store's metrics (Prometheus text, core/metrics.h) to out: operations written to Redis and not
 * answered, operations queued for the connection's window, connections dropped because Redis stopped
 * answering, script calls written again after NOSCRIPT. */
void store_metrics(const struct store *st, struct evbuffer *out);
/* Runs the loop until every command sent has been answered (at most timeout_ms): the last writes of a
 * shutdown (fire-and-forget ones included) reach Redis before store_free() closes the connection. Only at
 * shutdown, once nothing else on the loop can fire. */
void store_drain(struct store *st, int timeout_ms);

/* API: allocates a turn for a prompt, as pending. is_new creates the conversation (STORE_EEXISTS if taken);
 * otherwise the conversation must exist (STORE_ENOTFOUND). The callback gets the turn number.
 *
 * A new conversation without a stream or a previous turn ("plain": turn 1, which its caller may produce to
 * Kafka at the same time) is written without a status or updated_at, fields a worker that took the prompt
 * first may have set: readers take a stored prompt without a status as pending (conv_parse, the scripts).
 * The store does not reject such a turn when the reply is lost with the connection; its caller does
 * (store_reject, turn 1) if its produce failed. Any other lost submit is rejected by the store. */
void store_submit(struct store *st, const char *conv_id, const char *prompt, size_t prompt_len, bool is_new,
                  const struct turn_meta *meta, store_submit_cb *cb, void *arg);
/* API: the produce of an allocated turn failed, so the client got no 202: deletes a new conversation, or marks
 * the turn rejected. No callback. */
void store_reject(struct store *st, const char *conv_id, long turn, bool is_new);
/* Reads a whole conversation (STORE_ENOTFOUND if absent). */
void store_load(struct store *st, const char *conv_id, store_conv_cb *cb, void *arg);
/* API: cancels a pending or in-progress turn (1), or finds it cancelled already (0); STORE_ECONFLICT if it is
 * finished, STORE_ENOTFOUND if it does not exist. Notifies "cancel" so a worker running it aborts. */
void store_cancel(struct store *st, const char *conv_id, long turn, store_rc_cb *cb, void *arg);
/* API: deletes a turn (cancelling it first if it runs): 1, or STORE_ENOTFOUND. */
void store_delete(struct store *st, const char *conv_id, long turn, store_rc_cb *cb, void *arg);
/* API: reads the conversation and the turn's events after position after_seq, at most max of them. */
void store_events_read(struct store *st, const char *conv_id, long turn, long after_seq, long max, store_events_cb *cb,
                       void *arg);
/* Idempotency keys: claims key for ttl_s (value "pending") or answers the value already there. */
void store_idem_claim(struct store *st, const char *key, long ttl_s, store_idem_cb *cb, void *arg);
/* Sets the claimed key's value, or releases it (value NULL). No callback. */
void store_idem_set(struct store *st, const char *key, const char *value, long ttl_s);

/* Worker: takes a prompt message. turn > 0 names the turn (as the API produced it); turn = 0 (a message from
 * another producer) allocates one, remembered by partition and offset so that a redelivery gets the same turn.
 * A pending turn becomes in_progress. The callback gets the turn and the whole conversation. */
void store_begin(struct store *st, const char *conv_id, long turn, const char *prompt, size_t prompt_len,
                 int32_t partition, int64_t offset, store_begin_cb *cb, void *arg);
/* Worker: records a turn's outcome unless one is already recorded (then stored = false). STORE_ECONFLICT: the
 * turn was cancelled or deleted meanwhile; STORE_ENOTFOUND: the conversation is gone. */
void store_finish(struct store *st, const char *conv_id, long turn, const struct turn_result *res, store_done_cb *cb,
                  void *arg);
/* Worker: the turn's response message was acknowledged by the broker. No callback. */
void store_mark_published(struct store *st, const char *conv_id, long turn);
/* Moderation (asyncllm moderate): stores verdict, a JSON object, as the turn's t<n>.moderation unless the turn
 * has one already; verdict NULL only reads. The callback gets is_new (this call stored it), the verdict the turn
 * has now (this one or the earlier one, NULL if none; valid during the call) and whether a message about it was
 * acknowledged by the broker (store_moderation_published). STORE_ENOTFOUND: no such conversation (it is never
 * created here). */
typedef void store_verdict_cb(void *arg, int rc, bool is_new, const char *verdict, bool published);
void store_moderation(struct store *st, const char *conv_id, long turn, const char *verdict, store_verdict_cb *cb,
                      void *arg);
/* Moderation: the verdict's message was acknowledged (t<n>.moderation_published). rc 1, or STORE_ENOTFOUND. */
void store_moderation_published(struct store *st, const char *conv_id, long turn, store_rc_cb *cb, void *arg);
/* Interested parties: markers of work done, the keys asyncllm:done:<name> (name at most 200 bytes), kept ttl_s
 * (0: forever). store_marker_test answers rc 1 if the marker is set, 0 if not; store_marker_set answers 1. */
void store_marker_test(struct store *st, const char *name, store_rc_cb *cb, void *arg);
void store_marker_set(struct store *st, const char *name, long ttl_s, store_rc_cb *cb, void *arg);
/* Worker: appends an event (kind 's' or 'd') to a streamed turn's event stream and notifies. No callback;
 * events of one store are appended in call order. */
void store_event(struct store *st, const char *conv_id, long turn, char kind, const char *text, size_t len);

#endif
