/* submit.c - queueing a prompt: Redis turn, Kafka produce, broker ack, then the route's answer.
 *
 * Lifetimes. A submit is a struct submit with a reference count: one reference for each asynchronous operation
 * that will call back (a Redis command, a Kafka delivery report), plus one while the HTTP request is
 * unanswered. The request deadline answers 503 and drops the request's reference; a late callback then finds
 * sub->req == NULL, finishes its bookkeeping (rejecting the turn if the produce failed) and drops its own.
 * libevent keeps an unanswered request alive even if the client goes away (evhttp detaches it from the dead
 * connection and frees it when we reply), so sub->req stays valid until we answer.
 *
 * Idempotency. With an Idempotency-Key header, the key (scoped by route and by a hash of the Authorization
 * header) is claimed in Redis for 24 h before anything else; a repeat finds "<conversation> <turn>" there and
 * gets the same turn's answer instead of a second prompt, or 409 while the first is still being queued. A
 * submit that fails releases its key so that the client can retry. */
#include "http/api_internal.h"

#include "core/config.h"
#include "core/log.h"
#include "core/util.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "store/store.h"

#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define IDEM_TTL_S (24 * 3600)

struct submit {
    struct api *api;
    struct evhttp_request *req; /* NULL once answered */
    int refs;
    struct event *deadline;
    enum submit_mode mode;
    bool is_new;
    long turn;
    char conv_id[72];
    char *prompt;
    size_t prompt_len;
    char *req_json, *input_json; /* copies of the turn_meta strings */
    bool stream;
    long prev_turn;
    json_t *msg;    /* the Kafka message being built (without turn) */
    char *idem_key; /* the Redis key of the idempotency claim, or NULL */
};

static void submit_release(struct submit *sub)
{
    if (--sub->refs > 0)
        return;
    if (sub->deadline)
        event_free(sub->deadline);
    free(sub->prompt);
    free(sub->req_json);
    free(sub->input_json);
    free(sub->idem_key);
    json_decref(sub->msg);
    free(sub);
}

/* Takes sub->req: after this, the request is answered by the caller and forgotten here. */
static struct evhttp_request *submit_take_req(struct submit *sub)
{
    struct evhttp_request *req = sub->req;
    if (!req)
        return NULL;
    sub->req = NULL;
    sub->api->waiting--;
    evtimer_del(sub->deadline);
    submit_release(sub); /* the request's reference; callers hold another, so sub survives */
    return req;
}

/* The idempotency claim of a submit that will not be accepted is released. */
static void idem_release(struct submit *sub)
{
    if (sub->idem_key && sub->api->st)
        store_idem_set(sub->api->st, sub->idem_key, NULL, 0);
    free(sub->idem_key);
    sub->idem_key = NULL;
}

static void submit_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct submit *sub = arg;
    sub->refs++; /* keep sub alive across submit_take_req */
    struct evhttp_request *req = submit_take_req(sub);
    if (req)
        api_reply_unavailable(sub->api, req, "the request passed its deadline waiting for Kafka or Redis");
    submit_release(sub);
}

static void submit_fail(struct submit *sub, int code, const char *errcode, const char *msg)
{
    idem_release(sub);
    struct evhttp_request *req = submit_take_req(sub);
    if (!req)
        return;
    if (code == 503)
        api_reply_unavailable(sub->api, req, msg);
    else
        http_reply_error(req, code, code == 409 ? "conflict" : "invalid_request_error", errcode, "%s", msg);
}

/* ---------------------------------------------------------------- answers */

struct load_ctx {
    struct api *api;
    struct evhttp_request *req;
    long turn;
};

static void background_loaded_cb(void *arg, int rc, const struct conv *conv)
{
    struct load_ctx *lc = arg;
    const struct turn *t = rc == STORE_OK && lc->turn >= 1 && lc->turn <= conv->nturns ? &conv->turn[lc->turn] : NULL;
    if (t && t->status != TURN_DELETED && t->status != TURN_REJECTED && t->status != TURN_NONE)
        http_reply_json(lc->req, 200, response_object(lc->api, conv, lc->turn, t));
    else if (rc == STORE_OK || rc == STORE_ENOTFOUND)
        http_reply_error(lc->req, 404, "invalid_request_error", "response_not_found", "the response is gone");
    else
        api_reply_unavailable(lc->api, lc->req, "the conversation store (Redis) is unavailable");
    free(lc);
}

/* The route's answer once (conv_id, turn) is queued. */
static void answer_accepted(struct api *api, struct evhttp_request *req, const char *conv_id, long turn,
                            enum submit_mode mode)
{
    switch (mode) {
    case SUBMIT_ANSWER: {
        char url[1024], ra[24];
        api_polling_url(api, conv_id, url, sizeof url);
        snprintf(ra, sizeof ra, "%ld", api->cfg->retry_after_s);
        struct evkeyvalq *h = evhttp_request_get_output_headers(req);
        evhttp_add_header(h, "Location", url);
        evhttp_add_header(h, "Retry-After", ra);
        http_reply_json(req, 202,
                        json_pack("{s:s, s:s, s:s, s:I}", "conversation_id", conv_id, "status", "pending",
                                  "polling_url", url, "turn", (json_int_t)turn));
        break;
    }
    case SUBMIT_BACKGROUND: {
        struct load_ctx *lc = xcalloc(1, sizeof *lc);
        lc->api = api;
        lc->req = req;
        lc->turn = turn;
        store_load(api->st, conv_id, background_loaded_cb, lc);
        break;
    }
    case SUBMIT_STREAM:
        watch_stream(api, req, conv_id, turn, -1);
        break;
    case SUBMIT_SYNC:
        watch_sync(api, req, conv_id, turn);
        break;
    }
}

static void submit_produced(struct submit *sub, bool ok, const char *why)
{
    struct api *api = sub->api;
    if (!ok && api->st)
        store_reject(api->st, sub->conv_id, sub->turn, sub->is_new);
    if (ok && sub->idem_key && api->st) {
        char v[96];
        snprintf(v, sizeof v, "%s %ld", sub->conv_id, sub->turn);
        store_idem_set(api->st, sub->idem_key, v, IDEM_TTL_S);
    } else if (!ok) {
        idem_release(sub);
    }
    struct evhttp_request *req = submit_take_req(sub);
    if (!req) {
        if (ok)
            log_warn("conversation %s turn %ld was accepted by Kafka after its request timed out", sub->conv_id,
                     sub->turn);
        return;
    }
    if (!ok) {
        char msg[256];
        snprintf(msg, sizeof msg, "the prompt could not be queued (%s)", why);
        api_reply_unavailable(api, req, msg);
        return;
    }
    if (!api->st) {
        api_reply_unavailable(api, req, "the server is shutting down");
        return;
    }
    answer_accepted(api, req, sub->conv_id, sub->turn, sub->mode);
}

/* Delivery report of a prompt (see kafka.h): the broker's answer. */
void api_dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset);
void api_dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset)
{
    struct submit *sub = opaque;
    if (!sub) { /* a record without a request behind it (a cancellation) */
        if (err)
            log_warn("produce of a cancellation record failed: %s", rd_kafka_err2str(err));
        return;
    }
    if (err)
        log_warn("produce of conversation %s failed: %s", sub->conv_id, rd_kafka_err2str(err));
    else
        log_debug("conversation %s turn %ld queued at partition %d offset %" PRId64, sub->conv_id, sub->turn, partition,
                  offset);
    submit_produced(sub, err == RD_KAFKA_RESP_ERR_NO_ERROR, err ? rd_kafka_err2str(err) : NULL);
    submit_release(sub);
}

/* ---------------------------------------------------------------- the steps */

static void submit_stored_cb(void *arg, int rc, long turn)
{
    struct submit *sub = arg;
    struct api *api = sub->api;
    if ((rc == STORE_ENOTFOUND || rc == STORE_ENOPREV) && sub->mode != SUBMIT_ANSWER) {
        idem_release(sub);
        struct evhttp_request *req = submit_take_req(sub);
        if (req) {
            char rid[112];
            response_id(rid, sizeof rid, sub->conv_id, sub->prev_turn);
            http_reply_error_param(req, 404, "invalid_request_error", "previous_response_not_found",
                                   "previous_response_id", "no response with id '%s'", rid);
        }
    } else if (rc == STORE_ENOTFOUND) {
        char msg[160];
        snprintf(msg, sizeof msg, "no conversation with id '%s'", sub->conv_id);
        submit_fail(sub, 404, "conversation_not_found", msg);
    } else if (rc != STORE_OK) {
        submit_fail(sub, 503, NULL, "the conversation store (Redis) is unavailable");
    } else if (!sub->req) {
        /* Deadline passed while Redis answered: never produced, so the turn is rejected. */
        store_reject(api->st, sub->conv_id, turn, sub->is_new);
        idem_release(sub);
    } else {
        sub->turn = turn;
        json_object_set_new(sub->msg, "turn", json_integer(turn));
        json_object_set_new(sub->msg, "submitted_at", json_integer(now_ms()));
        char *value = json_dumps(sub->msg, JSON_COMPACT);
        rd_kafka_resp_err_t e = kafka_produce(api->kp, api->cfg->topic_prompts, sub->conv_id, strlen(sub->conv_id),
                                              value, strlen(value), NULL, sub);
        free(value);
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
            sub->refs++; /* the delivery report's */
        else
            submit_produced(sub, false, rd_kafka_err2str(e));
    }
    submit_release(sub);
}

static void submit_store(struct submit *sub)
{
    struct turn_meta meta = {sub->req_json, sub->input_json, sub->stream, sub->prev_turn};
    store_submit(sub->api->st, sub->conv_id, sub->prompt, sub->prompt_len, sub->is_new, &meta, submit_stored_cb, sub);
}

static void idem_claimed_cb(void *arg, int rc, const char *value)
{
    struct submit *sub = arg;
    struct api *api = sub->api;
    if (rc != STORE_OK) {
        free(sub->idem_key);
        sub->idem_key = NULL;
        submit_fail(sub, 503, NULL, "the conversation store (Redis) is unavailable");
        submit_release(sub);
        return;
    }
    if (!value) { /* claimed: go on */
        if (sub->req) {
            submit_store(sub); /* the claim's reference passes to the next command */
        } else {
            idem_release(sub);
            submit_release(sub);
        }
        return;
    }
    free(sub->idem_key); /* not ours */
    sub->idem_key = NULL;
    char conv[72];
    long turn = 0;
    if (strcmp(value, "pending") == 0 || sscanf(value, "%71s %ld", conv, &turn) != 2) {
        submit_fail(sub, 409, "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still being processed; retry later");
    } else {
        struct evhttp_request *req = submit_take_req(sub);
        if (req)
            answer_accepted(api, req, conv, turn, sub->mode);
    }
    submit_release(sub);
}

/* The Redis key for an idempotency key: per route and per caller (a hash of the Authorization header). */
static char *idem_redis_key(struct evhttp_request *req, const char *key, enum submit_mode mode)
{
    const char *auth = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char *p = auth ? auth : ""; *p; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
    size_t n = strlen(key) + 64; /* never truncated: two long keys must not collide */
    char *buf = xmalloc(n);
    snprintf(buf, n, "asyncllm:idem:%s:%016" PRIx64 ":%s", mode == SUBMIT_ANSWER ? "answer" : "responses", h, key);
    return buf;
}

void submit_start(struct api *api, struct evhttp_request *req, const struct submit_params *p)
{
    if (p->idem_key && (strlen(p->idem_key) == 0 || strlen(p->idem_key) > 1024)) {
        http_reply_error(req, 400, "invalid_request_error", "invalid_idempotency_key",
                         "an Idempotency-Key must be 1 to 1024 characters");
        return;
    }
    if (!store_connected(api->st)) {
        api_reply_unavailable(api, req, "the conversation store (Redis) is unavailable");
        return;
    }
    if (!kafka_producer_up(api->kp)) {
        api_reply_unavailable(api, req, "the message broker (Kafka) is unreachable");
        return;
    }
    struct submit *sub = xcalloc(1, sizeof *sub);
    sub->api = api;
    sub->req = req;
    sub->refs = 2; /* the request's and the first Redis command's */
    sub->mode = p->mode;
    sub->is_new = p->conv_id == NULL;
    if (p->conv_id) {
        snprintf(sub->conv_id, sizeof sub->conv_id, "%s", p->conv_id);
    } else if (conv_id_new(sub->conv_id)) {
        free(sub);
        api_reply_unavailable(api, req, "no randomness available for a conversation id");
        return;
    }
    sub->prompt = xstrndup(p->prompt, p->prompt_len);
    sub->prompt_len = p->prompt_len;
    if (p->meta) {
        sub->req_json = p->meta->req ? xstrdup(p->meta->req) : NULL;
        sub->input_json = p->meta->input ? xstrdup(p->meta->input) : NULL;
        sub->stream = p->meta->stream;
        sub->prev_turn = p->meta->prev_turn;
    }
    sub->msg = p->extra ? json_deep_copy(p->extra) : json_object();
    json_object_set_new(sub->msg, "conversation_id", json_string(sub->conv_id));
    json_object_set_new(sub->msg, "prompt", json_stringn(sub->prompt, sub->prompt_len));
    sub->deadline = evtimer_new(api->base, submit_deadline_cb, sub);
    struct timeval tv = {api->cfg->request_timeout_ms / 1000, (api->cfg->request_timeout_ms % 1000) * 1000};
    evtimer_add(sub->deadline, &tv);
    api->waiting++;
    if (p->idem_key) {
        /* The claim itself lives only as long as a submit can take, so that a crash between claim and
         * produce does not block the key for a day. */
        long claim_ttl = api->cfg->request_timeout_ms / 1000 * 2 + 60;
        sub->idem_key = idem_redis_key(req, p->idem_key, p->mode);
        store_idem_claim(api->st, sub->idem_key, claim_ttl, idem_claimed_cb, sub);
    } else {
        submit_store(sub);
    }
}
