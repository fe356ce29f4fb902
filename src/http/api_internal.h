/* api_internal.h - what the API's source files (api.c, submit.c, watch.c, responses.c) share. Not a public
 * header: other modules use api.h. */
#ifndef ASYNCLLM_API_INTERNAL_H
#define ASYNCLLM_API_INTERNAL_H

#include "http/api.h"

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct http_server;
struct http_req;
struct event;
struct kafka_producer;
struct store;
struct notify;
struct map;
struct conv;
struct turn;
struct turn_meta;
struct watch;
struct buf;

struct api {
    struct event_base *base;
    const struct config *cfg;
    struct http_server *http;
    bool listener; /* false once we stopped listening */
    struct kafka_producer *kp;
    struct store *st; /* NULL during shutdown, once closed */
    struct notify *notify;
    struct map *watches;       /* conversation id -> struct watch_list (watch.c) */
    struct watch *watch_all;   /* every watcher, for waking or closing them all */
    struct event *watch_timer; /* re-checks every watcher now and then (pub/sub may lose a message) */
    int port;
    int waiting;                          /* submits whose request is not answered yet */
    const struct timeval *submit_timeout; /* the request deadline as a common timeout of base */
    int32_t sticky_part;                  /* new conversations' partition (submit.c, steer_conv_id) */
    int64_t sticky_until_ms;              /* until then */
    bool stopping;                        /* no new long waits */
};

/* ---- helpers (api.c) */

/* 503 with Retry-After. */
void api_reply_unavailable(struct api *api, struct http_req *req, const char *what);
/* 400 and false if prompt is not valid UTF-8 or blank. what names the field in the message. */
bool api_prompt_ok(struct http_req *req, const char *what, const char *prompt, size_t len);
/* 400 and false if url is not an http(s) URL of at most 2048 bytes. */
bool api_callback_ok(struct http_req *req, const char *url);
/* 404 and false if id cannot name a conversation. */
bool api_conv_id_ok(struct http_req *req, const char *id);
/* The seed's /polling object for a conversation. */
json_t *api_conv_view(const struct conv *conv);
/* Appends the same object's compact JSON text to b, byte for byte what jsonw_append(api_conv_view(conv))
 * writes, without building it. Returns -1 (b then holds a partial text) past b's limit, or when a stored string
 * is not valid UTF-8: jansson's rules then decide, so use api_conv_view. */
int api_conv_view_write(struct buf *b, const struct conv *conv);
/* The view's "status" and (into *turn) "turn", without writing it. */
const char *api_conv_poll_status(const struct conv *conv, long *turn);
/* Answers 200 with conv's /polling view (written as text, or through jansson when the writer gives up). */
void api_reply_poll(struct http_req *req, const struct conv *conv);
/* Finds parameter name in a query string as http_query would (libevent's rules, see api.c) without allocating:
 * writes its decoded value into out (NUL-terminated, cut at size - 1 bytes), its full decoded length into
 * *full_len, and returns true; false if absent or if libevent would refuse the query. */
bool api_query_value(const char *query, const char *name, char *out, size_t size, size_t *full_len);
/* Writes "<public-url>/polling?conversationId=<id>" into out. */
void api_polling_url(const struct api *api, const char *conv_id, char *out, size_t len);

/* ---- submitting a prompt (submit.c) */

/* What a route wants done once the prompt is durably in Kafka (or, with an idempotency key seen before, once
 * the earlier submit is found). */
enum submit_mode {
    SUBMIT_ANSWER,     /* 202 with the seed's body */
    SUBMIT_BACKGROUND, /* 200 with the queued Response object */
    SUBMIT_STREAM,     /* Server-Sent Events from the start */
    SUBMIT_SYNC,       /* wait for the result (bounded), then the Response object */
};

struct submit_params {
    const char *prompt; /* the text of the last user message: the seed's `prompt` */
    size_t prompt_len;
    const char *conv_id;          /* NULL: a new conversation */
    const struct turn_meta *meta; /* stored with the turn; NULL for none */
    const char *extra;            /* more members for the Kafka message: JSON text without braces, or NULL */
    size_t extra_len;
    json_t *req_obj;      /* the request, parsed (borrowed): the queued Response echoes its parameters */
    const char *idem_key; /* the Idempotency-Key header, or NULL */
    enum submit_mode mode;
};

/* Validated input only: starts the submit; the request is answered in every case. */
void submit_start(struct api *api, struct http_req *req, const struct submit_params *p);

/* ---- waiting for changes (watch.c) */

void watch_init(struct api *api);
/* Answers every waiting request (long polls and syncs: their current state; streams: ended). */
void watch_close_all(struct api *api);
void watch_free(struct api *api);
/* Long poll: answers /polling for conv_id when its status changes or after wait_s seconds. */
void watch_poll(struct api *api, struct http_req *req, const char *conv_id, long wait_s);
/* Sync: answers the Response object of (conv_id, turn) once final, or as it is after sync-timeout-s. */
void watch_sync(struct api *api, struct http_req *req, const char *conv_id, long turn);
/* Stream: answers with Server-Sent Events of (conv_id, turn) after sequence number starting_after (-1: all). */
void watch_stream(struct api *api, struct http_req *req, const char *conv_id, long turn, long starting_after);

/* ---- the OpenAI-compatible API (responses.c) */

/* Handles /v1/... routes; returns false if path is not one of them. */
bool responses_route(struct api *api, struct http_req *req, const char *path);
/* How a Response object shows its turn: as its create event does (status "queued", no output), as its
 * in_progress event does, or as the turn is now. */
enum response_stage { RESPONSE_QUEUED, RESPONSE_IN_PROGRESS, RESPONSE_NOW };
/* Appends the Response object of a turn (t must exist) to b. req: the request's parameters parsed (t->req, or
 * the create's body; borrowed), or NULL. Returns 0, or -1 if a member of req is nested too deep to write
 * (create never accepts one). */
struct buf;
int response_text(struct buf *b, const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                  enum response_stage stage, json_t *req);
/* Answers 200 with the Response object (see response_text). reqp: t->req parsed (borrowed), or NULL to parse
 * it here. */
void response_reply(struct http_req *req, const struct api *api, const struct conv *conv, long turn,
                    const struct turn *t, enum response_stage stage, json_t *reqp);
/* "resp_<conversation>_<turn>" */
void response_id(char *out, size_t len, const char *conv_id, long turn);
/* Expands a streamed turn's stored events into OpenAI's SSE events (see responses.c), appending those whose
 * sequence number is above starting_after to out. *next_seq counts events; returns true after the last one. */
struct turn_event;
struct evbuffer;
bool responses_sse(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                   const struct turn_event *events, size_t n, long starting_after, long *next_seq,
                   struct evbuffer *out);

#endif
