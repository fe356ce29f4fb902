/* submit.c - queueing a prompt: Redis turn, Kafka produce, broker ack, then the route's answer.
 *
 * Lifetimes. A submit is a struct submit with a reference count: one reference for each asynchronous operation
 * that will call back (a Redis command, a Kafka delivery report), plus one while the HTTP request is
 * unanswered. The request deadline answers 503 and drops the request's reference; a late callback then finds
 * sub->req == NULL, finishes its bookkeeping (rejecting the turn if the produce failed) and drops its own.
 * The HTTP server keeps an unanswered request alive even if the client goes away (it detaches it from the dead
 * connection; our answer frees it), so sub->req stays valid until we answer.
 *
 * Together. A new conversation's first turn (no stream) is written to Redis and produced to Kafka at the same
 * time: its turn is 1 without asking Redis, and the write (store_submit's plain one) cannot overwrite what a
 * worker that took the prompt first has written. The answer waits for both; the produce decides it. Acked: 202
 * (had Redis refused or lost the write, a worker creates the conversation when it takes the prompt: logged).
 * Not acked: 503, and the turn is rejected (a new conversation is deleted). A follow-up or a stream needs the
 * turn Redis allocates before its message can be written, so it goes Redis first, then Kafka.
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
#include <event2/event_struct.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define IDEM_TTL_S (24 * 3600)

struct submit {
    struct api *api;
    struct http_req *req; /* NULL once answered */
    int refs;
    struct event deadline; /* on the API's common timeout: no allocation, O(1) */
    enum submit_mode mode;
    bool is_new;
    bool together;       /* Redis and Kafka at once (see the top); then: */
    bool redis_answered; /* store_submit called back (redis_ok: STORE_OK) */
    bool redis_ok;
    bool kafka_answered; /* the delivery report came (kafka_ok: acked; kafka_why: else why) */
    bool kafka_ok;
    const char *kafka_why;
    long turn;
    int64_t submitted_at;
    char conv_id[72];
    /* The Kafka message, built once as text without jansson: {"conversation_id":...,"prompt":...,<extra>
     * then, once Redis gave the turn, ,"turn":N,"submitted_at":T}. */
    struct buf msg;
    char *req_json;  /* the turn_meta's request parameters (kept for an idempotency claim), or NULL */
    json_t *req_obj; /* the request, parsed (SUBMIT_BACKGROUND answers with its parameters), or NULL */
    /* Copies kept only when Redis is called later (after an idempotency claim): */
    char *prompt;
    size_t prompt_len;
    char *input_json;
    bool stream;
    long prev_turn;
    char *idem_key; /* the Redis key of the idempotency claim, or NULL */
};

static void submit_release(struct submit *sub)
{
    if (--sub->refs > 0)
        return;
    event_del(&sub->deadline);
    free(sub->prompt);
    free(sub->req_json);
    free(sub->input_json);
    free(sub->idem_key);
    buf_free(&sub->msg);
    json_decref(sub->req_obj);
    free(sub);
}

/* Takes sub->req: after this, the request is answered by the caller and forgotten here. */
static struct http_req *submit_take_req(struct submit *sub)
{
    struct http_req *req = sub->req;
    if (!req)
        return NULL;
    sub->req = NULL;
    sub->api->waiting--;
    evtimer_del(&sub->deadline);
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
    struct http_req *req = submit_take_req(sub);
    if (req)
        api_reply_unavailable(sub->api, req, "the request passed its deadline waiting for Kafka or Redis");
    submit_release(sub);
}

static void submit_fail(struct submit *sub, int code, const char *errcode, const char *msg)
{
    idem_release(sub);
    struct http_req *req = submit_take_req(sub);
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
    struct http_req *req;
    long turn;
};

static void background_loaded_cb(void *arg, int rc, const struct conv *conv)
{
    struct load_ctx *lc = arg;
    const struct turn *t = rc == STORE_OK && lc->turn >= 1 && lc->turn <= conv->nturns ? &conv->turn[lc->turn] : NULL;
    if (t && t->status != TURN_DELETED && t->status != TURN_REJECTED && t->status != TURN_NONE)
        response_reply(lc->req, lc->api, conv, lc->turn, t, RESPONSE_NOW, NULL);
    else if (rc == STORE_OK || rc == STORE_ENOTFOUND)
        http_reply_error(lc->req, 404, "invalid_request_error", "response_not_found", "the response is gone");
    else
        api_reply_unavailable(lc->api, lc->req, "the conversation store (Redis) is unavailable");
    free(lc);
}

/* POST /answer's 202, written without jansson. */
static void answer_202(struct api *api, struct http_req *req, const char *conv_id, long turn)
{
    char url[1024], ra[24];
    api_polling_url(api, conv_id, url, sizeof url);
    fmt_i64(ra, api->cfg->retry_after_s);
    http_add_header(req, "Location", url);
    http_add_header(req, "Retry-After", ra);
    struct buf b;
    buf_init(&b, 4096);
    buf_append_lit(&b, "{\"conversation_id\":");
    buf_append_json_string(&b, conv_id, strlen(conv_id)); /* validated, or read back from Redis: escaped anyway */
    buf_append_lit(&b, ",\"status\":\"pending\",\"polling_url\":");
    buf_append_json_string(&b, url, strlen(url));
    char tn[24];
    buf_append_lit(&b, ",\"turn\":");
    buf_append(&b, tn, fmt_i64(tn, turn));
    buf_append_lit(&b, "}\n");
    http_reply_text(req, 202, b.data, b.len);
    buf_free(&b);
}

/* The route's answer once (conv_id, turn) is queued. sub: the submit that queued it, or NULL for a repeat
 * (an Idempotency-Key seen before), which reads the turn back from Redis. */
static void answer_accepted(struct api *api, struct http_req *req, const char *conv_id, long turn,
                            enum submit_mode mode, const struct submit *sub)
{
    switch (mode) {
    case SUBMIT_ANSWER:
        answer_202(api, req, conv_id, turn);
        break;
    case SUBMIT_BACKGROUND: {
        if (sub) {
            /* OpenAI answers a background create with the queued Response: built from what the submit
             * holds, without reading the conversation back (the worker may already have moved it on; GET
             * shows that). */
            struct turn t = {.status = TURN_PENDING, .req = sub->req_json, .submitted_at = sub->submitted_at};
            struct conv c = {
                .id = conv_id, .nturns = turn, .created_at = sub->submitted_at, .updated_at = sub->submitted_at};
            response_reply(req, api, &c, turn, &t, RESPONSE_QUEUED, sub->req_obj);
            break;
        }
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
    struct http_req *req = submit_take_req(sub);
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
    answer_accepted(api, req, sub->conv_id, sub->turn, sub->mode, sub);
}

/* A together submit (see the top) once Redis and Kafka have both answered: the produce decides. */
static void together_answered(struct submit *sub)
{
    if (!sub->redis_answered || !sub->kafka_answered)
        return;
    if (sub->kafka_ok && !sub->redis_ok)
        log_warn("conversation %s: queued in Kafka, but Redis did not store its first turn: a worker creates it when "
                 "it takes the prompt (until then a poll finds nothing)",
                 sub->conv_id);
    submit_produced(sub, sub->kafka_ok, sub->kafka_why);
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
    if (sub->together) {
        sub->kafka_answered = true;
        sub->kafka_ok = err == RD_KAFKA_RESP_ERR_NO_ERROR;
        sub->kafka_why = err ? rd_kafka_err2str(err) : NULL;
        together_answered(sub);
    } else {
        submit_produced(sub, err == RD_KAFKA_RESP_ERR_NO_ERROR, err ? rd_kafka_err2str(err) : NULL);
    }
    submit_release(sub);
}

/* ---------------------------------------------------------------- the steps */

/* The Kafka message's end, once its turn is known: ,"turn":N,"submitted_at":T}. */
static void message_end(struct submit *sub, long turn)
{
    char num[24];
    buf_append_lit(&sub->msg, ",\"turn\":");
    buf_append(&sub->msg, num, fmt_i64(num, turn));
    buf_append_lit(&sub->msg, ",\"submitted_at\":");
    buf_append(&sub->msg, num, fmt_i64(num, sub->submitted_at));
    buf_append_lit(&sub->msg, "}");
}

static void submit_stored_cb(void *arg, int rc, long turn)
{
    struct submit *sub = arg;
    struct api *api = sub->api;
    if (sub->together) {
        sub->redis_answered = true;
        sub->redis_ok = rc == STORE_OK;
        together_answered(sub);
        submit_release(sub);
        return;
    }
    if ((rc == STORE_ENOTFOUND || rc == STORE_ENOPREV) && sub->mode != SUBMIT_ANSWER) {
        idem_release(sub);
        struct http_req *req = submit_take_req(sub);
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
        message_end(sub, turn);
        rd_kafka_resp_err_t e = kafka_produce(api->kp, api->cfg->topic_prompts, sub->conv_id, strlen(sub->conv_id),
                                              sub->msg.data, sub->msg.len, NULL, sub);
        if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
            sub->refs++; /* the delivery report's */
        else
            submit_produced(sub, false, rd_kafka_err2str(e));
    }
    submit_release(sub);
}

/* Writes the turn to Redis (store_submit; it calls submit_stored_cb, with the reference the caller holds for
 * it), and for a new conversation without a stream produces at the same time (see the top). */
static void submit_write(struct submit *sub, const char *prompt, size_t prompt_len, const struct turn_meta *meta)
{
    struct api *api = sub->api;
    if (sub->is_new && !meta->stream && meta->prev_turn <= 0) {
        sub->together = true;
        sub->turn = 1;
        message_end(sub, 1);
        rd_kafka_resp_err_t e = kafka_produce(api->kp, api->cfg->topic_prompts, sub->conv_id, strlen(sub->conv_id),
                                              sub->msg.data, sub->msg.len, NULL, sub);
        if (e != RD_KAFKA_RESP_ERR_NO_ERROR) { /* nothing written anywhere: not a turn to reject */
            char msg[256];
            snprintf(msg, sizeof msg, "the prompt could not be queued (%s)", rd_kafka_err2str(e));
            submit_fail(sub, 503, NULL, msg);
            submit_release(sub); /* the reference meant for Redis */
            return;
        }
        sub->refs++; /* the delivery report's */
    }
    store_submit(api->st, sub->conv_id, prompt, prompt_len, sub->is_new, meta, submit_stored_cb, sub);
}

/* After an idempotency claim: the turn, from the copies. */
static void submit_store(struct submit *sub)
{
    struct turn_meta meta = {sub->req_json, sub->input_json, sub->stream, sub->prev_turn, sub->submitted_at};
    submit_write(sub, sub->prompt, sub->prompt_len, &meta);
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
        struct http_req *req = submit_take_req(sub);
        if (req)
            answer_accepted(api, req, conv, turn, sub->mode, NULL);
    }
    submit_release(sub);
}

/* The Redis key for an idempotency key: per route and per caller (a hash of the Authorization header). */
static char *idem_redis_key(struct http_req *req, const char *key, enum submit_mode mode)
{
    const char *auth = http_header(req, "Authorization");
    uint64_t h = 0xcbf29ce484222325ULL;
    for (const char *p = auth ? auth : ""; *p; p++)
        h = (h ^ (unsigned char)*p) * 0x100000001b3ULL;
    size_t n = strlen(key) + 64; /* never truncated: two long keys must not collide */
    char *buf = xmalloc(n);
    snprintf(buf, n, "asyncllm:idem:%s:%016" PRIx64 ":%s", mode == SUBMIT_ANSWER ? "answer" : "responses", h, key);
    return buf;
}

/* A new conversation's id, chosen so that its key falls in the partition new conversations use for the next
 * --prompt-sticky-ms (the partition of the first id of the window, itself random). librdkafka 2.0 sends a
 * produce request per partition, and the broker's cost is per request: at 15,000 submits/s over 6 partitions
 * that was up to 6 requests of 2-3 prompts each per linger interval, one request now. Follow-up turns keep their
 * conversation's partition (the key decides), so order is untouched. The last of the id's 22 characters is
 * picked among its 64 values (the others stay random, 126 bits); none fits about once in 100,000 ids at 6
 * partitions ((5/6)^64), and then the id stays as drawn. */
static void steer_conv_id(struct api *api, char *id, int64_t now)
{
    int32_t cnt = api->cfg->prompt_sticky_ms ? kafka_producer_partitions(api->kp, api->cfg->topic_prompts) : 0;
    if (cnt < 2 || cnt > 64) /* over 64, the last character would often not reach the partition */
        return;
    if (now >= api->sticky_until_ms || api->sticky_part >= cnt) {
        api->sticky_part = kafka_key_partition(id, CONV_ID_LEN, cnt);
        api->sticky_until_ms = now + api->cfg->prompt_sticky_ms;
        return;
    }
    char drawn = id[CONV_ID_LEN - 1];
    for (int i = 0; i < 64; i++) {
        id[CONV_ID_LEN - 1] = conv_id_alphabet[i];
        if (kafka_key_partition(id, CONV_ID_LEN, cnt) == api->sticky_part)
            return;
    }
    id[CONV_ID_LEN - 1] = drawn;
}

void submit_start(struct api *api, struct http_req *req, const struct submit_params *p)
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
    sub->submitted_at = now_ms();
    if (p->conv_id) {
        snprintf(sub->conv_id, sizeof sub->conv_id, "%s", p->conv_id);
    } else if (conv_id_new(sub->conv_id)) {
        free(sub);
        api_reply_unavailable(api, req, "no randomness available for a conversation id");
        return;
    } else {
        steer_conv_id(api, sub->conv_id, sub->submitted_at);
    }
    buf_init(&sub->msg, SIZE_MAX / 2);
    buf_append_lit(&sub->msg, "{\"conversation_id\":\"");
    buf_append(&sub->msg, sub->conv_id, strlen(sub->conv_id));
    buf_append_lit(&sub->msg, "\",\"prompt\":");
    buf_append_json_string(&sub->msg, p->prompt, p->prompt_len);
    if (p->extra_len) {
        buf_append_lit(&sub->msg, ",");
        buf_append(&sub->msg, p->extra, p->extra_len);
    }
    if (p->meta && p->meta->req && p->idem_key)
        sub->req_json = xstrdup(p->meta->req);
    if (p->mode == SUBMIT_BACKGROUND && p->req_obj)
        sub->req_obj = json_incref(p->req_obj);
    if (!api->submit_timeout) {
        struct timeval tv = {api->cfg->request_timeout_ms / 1000, (api->cfg->request_timeout_ms % 1000) * 1000};
        api->submit_timeout = event_base_init_common_timeout(api->base, &tv);
    }
    evtimer_assign(&sub->deadline, api->base, submit_deadline_cb, sub);
    evtimer_add(&sub->deadline, api->submit_timeout);
    api->waiting++;
    if (p->idem_key) {
        /* Redis is called after the claim: keep what it needs. */
        sub->prompt = xstrndup(p->prompt, p->prompt_len);
        sub->prompt_len = p->prompt_len;
        if (p->meta) {
            sub->input_json = p->meta->input ? xstrdup(p->meta->input) : NULL;
            sub->stream = p->meta->stream;
            sub->prev_turn = p->meta->prev_turn;
        }
        /* The claim itself lives only as long as a submit can take, so that a crash between claim and
         * produce does not block the key for a day. */
        long claim_ttl = api->cfg->request_timeout_ms / 1000 * 2 + 60;
        sub->idem_key = idem_redis_key(req, p->idem_key, p->mode);
        store_idem_claim(api->st, sub->idem_key, claim_ttl, idem_claimed_cb, sub);
    } else {
        struct turn_meta meta = {NULL, NULL, false, 0, sub->submitted_at};
        if (p->meta) {
            meta = *p->meta;
            meta.submitted_at = sub->submitted_at;
        }
        sub->prev_turn = meta.prev_turn; /* for the error message */
        submit_write(sub, p->prompt, p->prompt_len, &meta);
    }
}
