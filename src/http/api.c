/* api.c - see api.h.
 *
 * Lifetimes. A submit is a struct submit with a reference count: one reference for each asynchronous operation
 * that will call back (a Redis command, a Kafka delivery report), plus one while the HTTP request is
 * unanswered. The request deadline answers 503 and drops the request's reference; a late callback then finds
 * sub->req == NULL, finishes its bookkeeping (rejecting the turn if the produce failed) and drops its own.
 * libevent keeps an unanswered request alive even if the client goes away (evhttp detaches it from the dead
 * connection and frees it when we reply), so sub->req stays valid until we answer. */
#include "http/api.h"

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

struct api {
    struct event_base *base;
    const struct config *cfg;
    struct evhttp *http;
    struct evhttp_bound_socket *listener; /* NULL once we stopped listening */
    struct kafka_producer *kp;
    struct store *st; /* NULL during shutdown, once closed */
    int port;
    int waiting; /* submits whose request is not answered yet */
};

struct submit {
    struct api *api;
    struct evhttp_request *req; /* NULL once answered */
    int refs;
    struct event *deadline;
    bool is_new;
    long turn;
    char conv_id[72];
    char *prompt;
    size_t prompt_len;
};

/* ---------------------------------------------------------------- helpers */

static void reply_unavailable(struct api *api, struct evhttp_request *req, const char *what)
{
    char ra[24];
    snprintf(ra, sizeof ra, "%ld", api->cfg->retry_after_s > 0 ? api->cfg->retry_after_s : 1);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", ra);
    http_reply_error(req, 503, "service_unavailable", "service_unavailable", "%s; retry later", what);
}

static void polling_url(const struct api *api, const char *conv_id, char *out, size_t len)
{
    snprintf(out, len, "%s/polling?conversationId=%s", api->cfg->public_url, conv_id);
}

/* ---------------------------------------------------------------- submit */

static void submit_release(struct submit *sub)
{
    if (--sub->refs > 0)
        return;
    if (sub->deadline)
        event_free(sub->deadline);
    free(sub->prompt);
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

static void submit_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct submit *sub = arg;
    sub->refs++; /* keep sub alive across submit_take_req */
    struct evhttp_request *req = submit_take_req(sub);
    if (req)
        reply_unavailable(sub->api, req, "the request passed its deadline waiting for Kafka or Redis");
    submit_release(sub);
}

static void submit_fail(struct submit *sub, int code, const char *type, const char *errcode, const char *msg)
{
    struct evhttp_request *req = submit_take_req(sub);
    if (!req)
        return;
    if (code == 503)
        reply_unavailable(sub->api, req, msg);
    else
        http_reply_error(req, code, type, errcode, "%s", msg);
}

static void submit_produced(struct submit *sub, bool ok, const char *why)
{
    struct api *api = sub->api;
    if (!ok && api->st)
        store_reject(api->st, sub->conv_id, sub->turn, sub->is_new);
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
        reply_unavailable(api, req, msg);
        return;
    }
    char url[1024], ra[24];
    polling_url(api, sub->conv_id, url, sizeof url);
    snprintf(ra, sizeof ra, "%ld", api->cfg->retry_after_s);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Location", url);
    evhttp_add_header(h, "Retry-After", ra);
    http_reply_json(req, 202,
                    json_pack("{s:s, s:s, s:s, s:I}", "conversation_id", sub->conv_id, "status", "pending",
                              "polling_url", url, "turn", (json_int_t)sub->turn));
}

/* Delivery report of a prompt (see kafka.h): the broker's answer. */
static void api_dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset)
{
    struct submit *sub = opaque;
    if (err)
        log_warn("produce of conversation %s failed: %s", sub->conv_id, rd_kafka_err2str(err));
    else
        log_debug("conversation %s turn %ld queued at partition %d offset %" PRId64, sub->conv_id, sub->turn, partition,
                  offset);
    submit_produced(sub, err == RD_KAFKA_RESP_ERR_NO_ERROR, err ? rd_kafka_err2str(err) : NULL);
    submit_release(sub);
}

static void submit_stored_cb(void *arg, int rc, long turn)
{
    struct submit *sub = arg;
    struct api *api = sub->api;
    if (rc == STORE_ENOTFOUND) {
        char msg[160];
        snprintf(msg, sizeof msg, "no conversation with id '%s'", sub->conv_id);
        submit_fail(sub, 404, "invalid_request_error", "conversation_not_found", msg);
    } else if (rc != STORE_OK) {
        submit_fail(sub, 503, NULL, NULL, "the conversation store (Redis) is unavailable");
    } else if (!sub->req) {
        /* Deadline passed while Redis answered: never produced, so the turn is rejected. */
        store_reject(api->st, sub->conv_id, turn, sub->is_new);
    } else {
        sub->turn = turn;
        json_t *msg = json_pack("{s:s, s:s%, s:I, s:I}", "conversation_id", sub->conv_id, "prompt", sub->prompt,
                                sub->prompt_len, "turn", (json_int_t)turn, "submitted_at", (json_int_t)now_ms());
        char *value = json_dumps(msg, JSON_COMPACT);
        json_decref(msg);
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

/* Starts a submit; prompt is validated UTF-8 and non-empty, conv_id NULL for a new conversation. */
static void submit_start(struct api *api, struct evhttp_request *req, const char *prompt, size_t prompt_len,
                         const char *conv_id)
{
    if (!store_connected(api->st)) {
        reply_unavailable(api, req, "the conversation store (Redis) is unavailable");
        return;
    }
    if (!kafka_producer_up(api->kp)) {
        reply_unavailable(api, req, "the message broker (Kafka) is unreachable");
        return;
    }
    struct submit *sub = xcalloc(1, sizeof *sub);
    sub->api = api;
    sub->req = req;
    sub->refs = 2; /* the request's and the Redis command's */
    sub->is_new = conv_id == NULL;
    if (conv_id) {
        snprintf(sub->conv_id, sizeof sub->conv_id, "%s", conv_id);
    } else if (conv_id_new(sub->conv_id)) {
        free(sub);
        reply_unavailable(api, req, "no randomness available for a conversation id");
        return;
    }
    sub->prompt = xstrndup(prompt, prompt_len);
    sub->prompt_len = prompt_len;
    sub->deadline = evtimer_new(api->base, submit_deadline_cb, sub);
    struct timeval tv = {api->cfg->request_timeout_ms / 1000, (api->cfg->request_timeout_ms % 1000) * 1000};
    evtimer_add(sub->deadline, &tv);
    api->waiting++;
    store_submit(api->st, sub->conv_id, sub->prompt, sub->prompt_len, sub->is_new, submit_stored_cb, sub);
}

/* Checks a prompt; answers 400 and returns false if it is unusable. */
static bool prompt_ok(struct evhttp_request *req, const char *prompt, size_t len)
{
    if (!utf8_valid(prompt, len)) {
        http_reply_error(req, 400, "invalid_request_error", "invalid_utf8", "'prompt' is not valid UTF-8");
        return false;
    }
    if (!has_non_space(prompt, len)) {
        http_reply_error(req, 400, "invalid_request_error", "empty_prompt", "'prompt' must not be empty");
        return false;
    }
    return true;
}

/* Checks a conversation id given by a client: 404 if it cannot name a conversation. */
static bool conv_id_ok(struct evhttp_request *req, const char *id)
{
    if (conv_id_valid(id, strlen(id)))
        return true;
    http_reply_error(req, 404, "invalid_request_error", "conversation_not_found",
                     "no conversation with that id (ids are 1 to 64 characters of A-Z a-z 0-9 - _)");
    return false;
}

static void handle_answer_get(struct api *api, struct evhttp_request *req)
{
    char *prompt = http_query(req, "prompt");
    char *conv = http_query(req, "conversationId");
    if (!conv)
        conv = http_query(req, "conversation_id");
    if (!prompt)
        http_reply_error(req, 400, "invalid_request_error", "missing_prompt",
                         "missing query parameter 'prompt' (GET /answer?prompt=...)");
    else if (prompt_ok(req, prompt, strlen(prompt)) && (!conv || conv_id_ok(req, conv)))
        submit_start(api, req, prompt, strlen(prompt), conv);
    free(prompt);
    free(conv);
}

static void handle_answer_post(struct api *api, struct evhttp_request *req)
{
    size_t len;
    const char *body = http_body(req, &len);
    if (len > (size_t)api->cfg->http_max_body) {
        http_reply_error(req, 413, "invalid_request_error", "request_too_large",
                         "the request body is %zu bytes; the limit is %ld", len, api->cfg->http_max_body);
        return;
    }
    if (len == 0) {
        http_reply_error(req, 400, "invalid_request_error", "missing_body",
                         "expected a JSON body like {\"prompt\": \"...\"}");
        return;
    }
    if (!utf8_valid(body, len)) {
        http_reply_error(req, 400, "invalid_request_error", "invalid_utf8", "the request body is not valid UTF-8");
        return;
    }
    json_error_t jerr;
    json_t *root = json_loadb(body, len, 0, &jerr);
    if (!root) {
        http_reply_error(req, 400, "invalid_request_error", "invalid_json",
                         "the request body is not valid JSON: %s (line %d, column %d)", jerr.text, jerr.line,
                         jerr.column);
        return;
    }
    json_t *p = json_object_get(root, "prompt");
    json_t *c = json_object_get(root, "conversation_id");
    if (!c)
        c = json_object_get(root, "conversationId");
    char *qconv = c ? NULL : http_query(req, "conversationId");
    if (!json_is_object(root))
        http_reply_error(req, 400, "invalid_request_error", "invalid_json", "the request body must be a JSON object");
    else if (!p || json_is_null(p))
        http_reply_error(req, 400, "invalid_request_error", "missing_prompt", "missing field 'prompt'");
    else if (!json_is_string(p))
        http_reply_error(req, 400, "invalid_request_error", "invalid_prompt", "'prompt' must be a string");
    else if (c && !json_is_null(c) && !json_is_string(c))
        http_reply_error(req, 400, "invalid_request_error", "invalid_conversation_id",
                         "'conversation_id' must be a string");
    else {
        const char *conv = json_is_string(c) ? json_string_value(c) : qconv;
        if (prompt_ok(req, json_string_value(p), json_string_length(p)) && (!conv || conv_id_ok(req, conv)))
            submit_start(api, req, json_string_value(p), json_string_length(p), conv);
    }
    free(qconv);
    json_decref(root);
}

/* ---------------------------------------------------------------- polling */

static json_t *conv_view(const struct conv *conv)
{
    long n = conv_current_turn(conv);
    const struct turn *t = n ? &conv->turn[n] : NULL;
    const char *status = "pending";
    if (t && t->status == TURN_COMPLETE)
        status = "complete";
    else if (t && t->status == TURN_FAILED)
        status = "failed";
    json_t *v = json_pack("{s:s, s:s, s:s%, s:s%}", "status", status, "conversation_id", conv->id, "user_prompt",
                          t && t->prompt ? t->prompt : "", t && t->prompt ? t->prompt_len : 0, "llm_response",
                          t && t->status == TURN_COMPLETE && t->response ? t->response : "",
                          t && t->status == TURN_COMPLETE && t->response ? t->response_len : 0);
    json_object_set_new(v, "turn", json_integer(n));
    json_object_set_new(v, "state", json_string(t ? turn_status_name(t->status) : "pending"));
    if (t && t->status == TURN_COMPLETE) {
        json_object_set_new(v, "model", json_string(t->model ? t->model : ""));
        json_object_set_new(v, "finish_reason", json_string(t->finish_reason ? t->finish_reason : ""));
        json_object_set_new(v, "usage",
                            json_pack("{s:i, s:i, s:i}", "prompt_tokens", (int)t->prompt_tokens, "completion_tokens",
                                      (int)t->completion_tokens, "total_tokens", (int)t->total_tokens));
    }
    if (t && t->status == TURN_FAILED)
        json_object_set_new(v, "error",
                            json_pack("{s:s, s:s}", "code", t->error_code ? t->error_code : "failed", "message",
                                      t->error_message ? t->error_message : ""));
    json_object_set_new(v, "created_at", json_integer(conv->created_at));
    json_object_set_new(v, "updated_at", json_integer(conv->updated_at));
    return v;
}

static void poll_loaded_cb(void *arg, int rc, const struct conv *conv)
{
    struct evhttp_request *req = arg;
    if (rc == STORE_ENOTFOUND)
        http_reply_error(req, 404, "invalid_request_error", "conversation_not_found", "no conversation with that id");
    else if (rc != STORE_OK) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Retry-After", "1");
        http_reply_error(req, 503, "service_unavailable", "service_unavailable",
                         "the conversation store (Redis) is unavailable; retry later");
    } else
        http_reply_json(req, 200, conv_view(conv));
}

static void handle_polling(struct api *api, struct evhttp_request *req)
{
    char *conv = http_query(req, "conversationId");
    if (!conv)
        conv = http_query(req, "conversation_id");
    if (!conv || !conv[0])
        http_reply_error(req, 400, "invalid_request_error", "missing_conversation_id",
                         "missing query parameter 'conversationId' (GET /polling?conversationId=...)");
    else if (conv_id_ok(req, conv)) {
        if (!store_connected(api->st))
            reply_unavailable(api, req, "the conversation store (Redis) is unavailable");
        else
            store_load(api->st, conv, poll_loaded_cb, req);
    }
    free(conv);
}

/* ---------------------------------------------------------------- routing */

static void handle_readyz(struct api *api, struct evhttp_request *req)
{
    bool kafka = kafka_producer_up(api->kp), redis = store_connected(api->st);
    http_reply_json(req, kafka && redis ? 200 : 503,
                    json_pack("{s:s, s:b, s:b}", "status", kafka && redis ? "ready" : "unavailable", "kafka", kafka,
                              "redis", redis));
}

static void method_not_allowed(struct evhttp_request *req, const char *allow)
{
    evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", allow);
    http_reply_error(req, 405, "invalid_request_error", "method_not_allowed", "method not allowed; use %s", allow);
}

static void api_request_cb(struct evhttp_request *req, void *arg)
{
    struct api *api = arg;
    const char *path = http_path(req);
    enum evhttp_cmd_type m = evhttp_request_get_command(req);
    if (strcmp(path, "/answer") == 0) {
        if (m == EVHTTP_REQ_GET)
            handle_answer_get(api, req);
        else if (m == EVHTTP_REQ_POST)
            handle_answer_post(api, req);
        else
            method_not_allowed(req, "GET, POST");
    } else if (strcmp(path, "/polling") == 0) {
        if (m == EVHTTP_REQ_GET)
            handle_polling(api, req);
        else
            method_not_allowed(req, "GET");
    } else if (strcmp(path, "/healthz") == 0) {
        if (m == EVHTTP_REQ_GET)
            http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
        else
            method_not_allowed(req, "GET");
    } else if (strcmp(path, "/readyz") == 0) {
        if (m == EVHTTP_REQ_GET)
            handle_readyz(api, req);
        else
            method_not_allowed(req, "GET");
    } else {
        http_reply_error(req, 404, "invalid_request_error", "not_found",
                         "no route %s (routes: /answer, /polling, /healthz, /readyz)", path);
    }
}

/* ---------------------------------------------------------------- lifecycle */

struct api *api_new(struct event_base *base, const struct config *cfg, char *err, size_t errlen)
{
    struct api *api = xcalloc(1, sizeof *api);
    api->base = base;
    api->cfg = cfg;
    api->kp = kafka_producer_new(base, cfg, api_dr_cb, err, errlen);
    if (!api->kp) {
        free(api);
        return NULL;
    }
    kafka_producer_warm(api->kp, cfg->topic_prompts);
    kafka_producer_watch(api->kp, base, cfg->topic_prompts);
    api->st = store_new(base, cfg);
    api->http = http_server_new(base, cfg, cfg->http_addr, (int)cfg->http_port, api_request_cb, api, &api->port,
                                &api->listener, err, errlen);
    if (!api->http) {
        store_free(api->st);
        kafka_producer_free(api->kp, 0);
        free(api);
        return NULL;
    }
    return api;
}

int api_port(const struct api *api)
{
    return api->port;
}

int api_pending(const struct api *api)
{
    return api->waiting;
}

void api_stop_listening(struct api *api)
{
    if (api->listener) {
        evhttp_del_accept_socket(api->http, api->listener);
        api->listener = NULL;
    }
}

/* Order matters: closing the store answers the requests waiting on Redis (503) while their connections still
 * exist; flushing the producer then serves the last delivery reports (202 or 503); only then are the
 * connections, and any request still on them, freed. */
void api_free(struct api *api)
{
    if (!api)
        return;
    api_stop_listening(api);
    store_free(api->st);
    api->st = NULL;
    kafka_producer_free(api->kp, 5000);
    evhttp_free(api->http);
    free(api);
}
