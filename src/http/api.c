/* api.c - see api.h: the seed's routes (/answer, /polling), health, routing and the API's lifecycle. The
 * submit machinery is in submit.c, waiting requests in watch.c, OpenAI's Responses API in responses.c. */
#include "http/api.h"

#include "core/config.h"
#include "core/jsonr.h"
#include "core/jsonw.h"
#include "core/log.h"
#include "core/util.h"
#include "http/api_internal.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "party/moderate.h"
#include "store/store.h"

#include <event2/event.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

void api_dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset); /* submit.c */

/* ---------------------------------------------------------------- helpers */

void api_reply_unavailable(struct api *api, struct http_req *req, const char *what)
{
    char ra[24];
    snprintf(ra, sizeof ra, "%ld", api->cfg->retry_after_s > 0 ? api->cfg->retry_after_s : 1);
    http_add_header(req, "Retry-After", ra);
    http_reply_error(req, 503, "service_unavailable", "service_unavailable", "%s; retry later", what);
}

void api_polling_url(const struct api *api, const char *conv_id, char *out, size_t len)
{
    static const char mid[] = "/polling?conversationId=";
    size_t pl = strlen(api->cfg->public_url), il = strlen(conv_id);
    if (pl + sizeof mid + il > len) { /* cut short, as snprintf would (it cost a submit about 800 instructions) */
        snprintf(out, len, "%s%s%s", api->cfg->public_url, mid, conv_id);
        return;
    }
    memcpy(out, api->cfg->public_url, pl);
    memcpy(out + pl, mid, sizeof mid - 1);
    memcpy(out + pl + sizeof mid - 1, conv_id, il + 1);
}

bool api_prompt_ok(struct http_req *req, const char *what, const char *prompt, size_t len)
{
    if (!utf8_valid(prompt, len)) {
        http_reply_error(req, 400, "invalid_request_error", "invalid_utf8", "'%s' is not valid UTF-8", what);
        return false;
    }
    if (!has_non_space(prompt, len)) {
        http_reply_error(req, 400, "invalid_request_error", "empty_prompt", "'%s' must not be empty", what);
        return false;
    }
    return true;
}

bool api_conv_id_ok(struct http_req *req, const char *id)
{
    if (conv_id_valid(id, strlen(id)))
        return true;
    http_reply_error(req, 404, "invalid_request_error", "conversation_not_found",
                     "no conversation with that id (ids are 1 to 64 characters of A-Z a-z 0-9 - _)");
    return false;
}

bool api_callback_ok(struct http_req *req, const char *url)
{
    size_t n = strlen(url);
    if (n <= 2048 && utf8_valid(url, n) && (strncmp(url, "http://", 7) == 0 || strncmp(url, "https://", 8) == 0) &&
        !strpbrk(url, " \t\r\n"))
        return true;
    http_reply_error(req, 400, "invalid_request_error", "invalid_callback_url",
                     "'callback_url' must be an http:// or https:// URL of at most 2048 bytes");
    return false;
}

static const char *idem_key(struct http_req *req)
{
    return http_header(req, "Idempotency-Key");
}

/* ---------------------------------------------------------------- /answer */

static void answer_submit(struct api *api, struct http_req *req, const char *prompt, size_t len, const char *conv,
                          const char *callback)
{
    struct buf req_json; /* {"callback_url":...}: the member is also the Kafka message's extra */
    buf_init(&req_json, SIZE_MAX / 2);
    if (callback) {
        buf_append_lit(&req_json, "{\"callback_url\":");
        buf_append_json_string(&req_json, callback, strlen(callback));
        buf_append_lit(&req_json, "}");
    }
    struct turn_meta meta = {req_json.data, NULL, false, 0, 0};
    struct submit_params p = {.prompt = prompt,
                              .prompt_len = len,
                              .conv_id = conv,
                              .meta = callback ? &meta : NULL,
                              .extra = callback ? req_json.data + 1 : NULL,
                              .extra_len = callback ? req_json.len - 2 : 0,
                              .idem_key = idem_key(req),
                              .mode = SUBMIT_ANSWER};
    submit_start(api, req, &p);
    buf_free(&req_json);
}

static void handle_answer_get(struct api *api, struct http_req *req)
{
    char *prompt = http_query(req, "prompt");
    char *conv = http_query(req, "conversationId");
    if (!conv)
        conv = http_query(req, "conversation_id");
    char *cb = http_query(req, "callback_url");
    if (!prompt)
        http_reply_error(req, 400, "invalid_request_error", "missing_prompt",
                         "missing query parameter 'prompt' (GET /answer?prompt=...)");
    else if (api_prompt_ok(req, "prompt", prompt, strlen(prompt)) && (!conv || api_conv_id_ok(req, conv)) &&
             (!cb || api_callback_ok(req, cb)))
        answer_submit(api, req, prompt, strlen(prompt), conv, cb);
    free(prompt);
    free(conv);
    free(cb);
}

static void handle_answer_post(struct api *api, struct http_req *req)
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
    json_t *root = jsonr_loadb(body, len, &jerr);
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
    json_t *cb = json_object_get(root, "callback_url");
    if (!json_is_object(root))
        http_reply_error(req, 400, "invalid_request_error", "invalid_json", "the request body must be a JSON object");
    else if (!p || json_is_null(p))
        http_reply_error(req, 400, "invalid_request_error", "missing_prompt", "missing field 'prompt'");
    else if (!json_is_string(p))
        http_reply_error(req, 400, "invalid_request_error", "invalid_prompt", "'prompt' must be a string");
    else if (c && !json_is_null(c) && !json_is_string(c))
        http_reply_error(req, 400, "invalid_request_error", "invalid_conversation_id",
                         "'conversation_id' must be a string");
    else if (cb && !json_is_null(cb) && !json_is_string(cb))
        http_reply_error(req, 400, "invalid_request_error", "invalid_callback_url", "'callback_url' must be a string");
    else {
        const char *conv = json_is_string(c) ? json_string_value(c) : qconv;
        const char *cbs = json_string_value(cb);
        if (api_prompt_ok(req, "prompt", json_string_value(p), json_string_length(p)) &&
            (!conv || api_conv_id_ok(req, conv)) && (!cbs || api_callback_ok(req, cbs)))
            answer_submit(api, req, json_string_value(p), json_string_length(p), conv, cbs);
    }
    free(qconv);
    json_decref(root);
}

/* ---------------------------------------------------------------- /polling */

/* The /polling status word of a turn (NULL: no turn yet). */
static const char *view_status(const struct turn *t)
{
    if (t && t->status == TURN_COMPLETE)
        return "complete";
    if (t && t->status == TURN_FAILED)
        return "failed";
    if (t && t->status == TURN_CANCELLED)
        return "cancelled"; /* a client cancelled it (Responses API): final, like complete and failed */
    return "pending";
}

json_t *api_conv_view(const struct conv *conv)
{
    long n = conv_current_turn(conv);
    const struct turn *t = n ? &conv->turn[n] : NULL;
    const char *status = view_status(t);
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
    if (t)
        moderation_polling_view(v, t->moderation); /* asyncllm moderate's verdict, once there is one */
    json_object_set_new(v, "created_at", json_integer(conv->created_at));
    json_object_set_new(v, "updated_at", json_integer(conv->updated_at));
    return v;
}

/* ---- the same view written straight as text
 *
 * api_conv_view builds a jansson tree (about 40 allocations for a complete turn) that is then written out and
 * freed; /polling is the hottest read, so its answer is written directly instead. The text must stay
 * byte-identical to jsonw_append(api_conv_view()) (members in the same order, jansson's escapes and integer
 * formats): tests/unit/test_poll_view.c compares the two. Where jansson's own rules would decide the outcome (a
 * stored string that is not valid UTF-8, which jansson refuses, so the member is dropped or the view is NULL),
 * the writer gives up and the caller uses the tree. */

const char *api_conv_poll_status(const struct conv *conv, long *turn)
{
    *turn = conv_current_turn(conv);
    return view_status(*turn ? &conv->turn[*turn] : NULL);
}

/* s[0..n) as a JSON string, if jansson would accept it (valid UTF-8: utf8_valid also refuses NUL, which jansson
 * would escape; that rare case goes to jansson too). */
static int view_string(struct buf *b, const char *s, size_t n)
{
    return utf8_valid(s, n) ? buf_append_json_string(b, s, n) : -1;
}

static int view_cstring(struct buf *b, const char *s)
{
    return view_string(b, s, strlen(s));
}

static int view_int(struct buf *b, int64_t v)
{
    char num[24];
    return buf_append(b, num, fmt_i64(num, v));
}

/* ,"usage":{...} of a complete turn: json_pack's "i" (int) conversions, as api_conv_view. */
static int view_done(struct buf *b, const struct turn *t)
{
    if (buf_append_lit(b, ",\"model\":") || view_cstring(b, t->model ? t->model : "") ||
        buf_append_lit(b, ",\"finish_reason\":") || view_cstring(b, t->finish_reason ? t->finish_reason : "") ||
        buf_append_lit(b, ",\"usage\":{\"prompt_tokens\":") || view_int(b, (int)t->prompt_tokens) ||
        buf_append_lit(b, ",\"completion_tokens\":") || view_int(b, (int)t->completion_tokens) ||
        buf_append_lit(b, ",\"total_tokens\":") || view_int(b, (int)t->total_tokens) || buf_append_lit(b, "}"))
        return -1;
    return 0;
}

static int view_error(struct buf *b, const struct turn *t)
{
    if (buf_append_lit(b, ",\"error\":{\"code\":") || view_cstring(b, t->error_code ? t->error_code : "failed") ||
        buf_append_lit(b, ",\"message\":") || view_cstring(b, t->error_message ? t->error_message : "") ||
        buf_append_lit(b, "}"))
        return -1;
    return 0;
}

/* ,"moderation":{...} when the stored verdict is a JSON object (moderation_polling_view's rule). Rare: a
 * verdict is parsed and written by jansson's rules, as in the tree. */
static int view_moderation(struct buf *b, const char *verdict)
{
    json_t *v = json_loads(verdict, 0, NULL);
    int rc = 0;
    if (json_is_object(v))
        rc = buf_append_lit(b, ",\"moderation\":") || jsonw_append(b, v) ? -1 : 0;
    json_decref(v);
    return rc;
}

int api_conv_view_write(struct buf *b, const struct conv *conv)
{
    long n = conv_current_turn(conv);
    const struct turn *t = n ? &conv->turn[n] : NULL;
    bool done = t && t->status == TURN_COMPLETE;
    const char *status = view_status(t), *state = t ? turn_status_name(t->status) : "pending";
    if (buf_append_lit(b, "{\"status\":\"") || buf_append(b, status, strlen(status)) ||
        buf_append_lit(b, "\",\"conversation_id\":") || view_cstring(b, conv->id) ||
        buf_append_lit(b, ",\"user_prompt\":") ||
        view_string(b, t && t->prompt ? t->prompt : "", t && t->prompt ? t->prompt_len : 0) ||
        buf_append_lit(b, ",\"llm_response\":") ||
        view_string(b, done && t->response ? t->response : "", done && t->response ? t->response_len : 0) ||
        buf_append_lit(b, ",\"turn\":") || view_int(b, n) || buf_append_lit(b, ",\"state\":\"") ||
        buf_append(b, state, strlen(state)) || buf_append_lit(b, "\""))
        return -1;
    if ((done && view_done(b, t)) || (t && t->status == TURN_FAILED && view_error(b, t)) ||
        (t && t->moderation && view_moderation(b, t->moderation)))
        return -1;
    if (buf_append_lit(b, ",\"created_at\":") || view_int(b, conv->created_at) ||
        buf_append_lit(b, ",\"updated_at\":") || view_int(b, conv->updated_at) || buf_append_lit(b, "}"))
        return -1;
    return 0;
}

void api_reply_poll(struct http_req *req, const struct conv *conv)
{
    struct buf b;
    buf_init(&b, SIZE_MAX / 2);
    if (api_conv_view_write(&b, conv) == 0 && buf_append_lit(&b, "\n") == 0)
        http_reply_text(req, 200, b.data, b.len);
    else
        http_reply_json(req, 200, api_conv_view(conv));
    buf_free(&b);
}

/* ---- the query of /polling, read without allocating
 *
 * libevent's evhttp_parse_query_str (under http_query) copies the query, allocates every pair and frees them
 * again; for the two or three parameters of a poll that was a few percent of the request. This reads them in
 * place with libevent's rules, kept exactly (tests/unit/test_query.c compares the two): pairs are split on '&';
 * a pair without '=' or with an empty key makes the whole query unreadable, so no parameter is found; keys are
 * compared undecoded and without regard to ASCII case, and the first match wins; a value is decoded ('+' is a
 * space, %XX with two hex digits a byte) and then read as a C string (up to a decoded NUL). */

static bool ascii_eq_nocase(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (x >= 'A' && x <= 'Z')
            x += 32;
        if (y >= 'A' && y <= 'Z')
            y += 32;
        if (x != y)
            return false;
    }
    return true;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decodes s[0..n) into out (size bytes, NUL-terminated, cut short if need be); returns the full decoded length. */
static size_t query_decode(const char *s, size_t n, char *out, size_t size)
{
    size_t j = 0;
    for (size_t i = 0; i < n; i++, j++) {
        char c = s[i];
        if (c == '+')
            c = ' ';
        else if (c == '%' && i + 2 < n && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) {
            c = (char)(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
            i += 2;
        }
        if (j + 1 < size)
            out[j] = c;
    }
    out[j < size ? j : size - 1] = '\0';
    return j;
}

bool api_query_value(const char *query, const char *name, char *out, size_t size, size_t *full_len)
{
    size_t nlen = strlen(name);
    const char *found = NULL;
    size_t found_len = 0;
    for (const char *p = query; *p;) {
        const char *amp = strchr(p, '&');
        size_t len = amp ? (size_t)(amp - p) : strlen(p);
        const char *eq = memchr(p, '=', len);
        if (!eq || eq == p)
            return false; /* libevent refuses the whole query */
        if (!found && (size_t)(eq - p) == nlen && ascii_eq_nocase(p, name, nlen)) {
            found = eq + 1;
            found_len = len - nlen - 1;
        }
        if (!amp)
            break;
        p = amp + 1;
    }
    if (!found)
        return false;
    *full_len = query_decode(found, found_len, out, size);
    return true;
}

/* Query parameter name of req (query: its query string, or NULL), as http_query finds it: in buf when its
 * decoded value fits, else through http_query into *heap (the caller frees it). NULL if absent. */
static const char *poll_param(struct http_req *req, const char *query, const char *name, char *buf, size_t size,
                              char **heap)
{
    size_t full;
    if (!query || !api_query_value(query, name, buf, size, &full))
        return NULL;
    if (full < size)
        return buf;
    *heap = http_query(req, name);
    return *heap;
}

static void handle_polling(struct api *api, struct http_req *req)
{
    const char *query = http_query_string(req);
    char conv_buf[128], wait_buf[32], *conv_heap = NULL, *wait_heap = NULL;
    const char *conv = poll_param(req, query, "conversationId", conv_buf, sizeof conv_buf, &conv_heap);
    if (!conv)
        conv = poll_param(req, query, "conversation_id", conv_buf, sizeof conv_buf, &conv_heap);
    const char *wait = poll_param(req, query, "wait", wait_buf, sizeof wait_buf, &wait_heap);
    long wait_s = 0;
    char *end = NULL;
    if (wait)
        wait_s = strtol(wait, &end, 10);
    if (!conv || !conv[0])
        http_reply_error(req, 400, "invalid_request_error", "missing_conversation_id",
                         "missing query parameter 'conversationId' (GET /polling?conversationId=...)");
    else if (wait && (end == wait || *end != '\0' || wait_s < 0))
        http_reply_error(req, 400, "invalid_request_error", "invalid_wait",
                         "'wait' must be a number of seconds (0 to %ld)", api->cfg->poll_max_wait_s);
    else if (api_conv_id_ok(req, conv)) {
        if (!store_connected(api->st))
            api_reply_unavailable(api, req, "the conversation store (Redis) is unavailable");
        else
            watch_poll(api, req, conv, wait_s < api->cfg->poll_max_wait_s ? wait_s : api->cfg->poll_max_wait_s);
    }
    free(conv_heap);
    free(wait_heap);
}

/* ---------------------------------------------------------------- routing */

static void handle_readyz(struct api *api, struct http_req *req)
{
    bool kafka = kafka_producer_up(api->kp), redis = store_connected(api->st);
    http_reply_json(req, kafka && redis ? 200 : 503,
                    json_pack("{s:s, s:b, s:b}", "status", kafka && redis ? "ready" : "unavailable", "kafka", kafka,
                              "redis", redis));
}

static void method_not_allowed(struct http_req *req, const char *allow)
{
    http_add_header(req, "Allow", allow);
    http_reply_error(req, 405, "invalid_request_error", "method_not_allowed", "method not allowed; use %s", allow);
}

static void api_request_cb(struct http_req *req, void *arg)
{
    struct api *api = arg;
    const char *path = http_path(req);
    enum http_method m = http_method(req);
    if (strcmp(path, "/answer") == 0) {
        if (m == HTTP_GET)
            handle_answer_get(api, req);
        else if (m == HTTP_POST)
            handle_answer_post(api, req);
        else
            method_not_allowed(req, "GET, POST");
    } else if (strcmp(path, "/polling") == 0) {
        if (m == HTTP_GET)
            handle_polling(api, req);
        else
            method_not_allowed(req, "GET");
    } else if (strcmp(path, "/healthz") == 0) {
        if (m == HTTP_GET)
            http_reply_static(req, 200, "{\"status\":\"ok\"}\n");
        else
            method_not_allowed(req, "GET");
    } else if (strcmp(path, "/readyz") == 0) {
        if (m == HTTP_GET)
            handle_readyz(api, req);
        else
            method_not_allowed(req, "GET");
    } else if (!responses_route(api, req, path)) {
        http_reply_error(req, 404, "invalid_request_error", "not_found",
                         "no route %s (routes: /answer, /polling, /v1/responses, /healthz, /readyz)", path);
    }
}

/* ---------------------------------------------------------------- lifecycle */

struct api *api_new(struct event_base *base, const struct config *cfg, int port, char *err, size_t errlen)
{
    struct api *api = xcalloc(1, sizeof *api);
    api->base = base;
    api->cfg = cfg;
    api->kp = kafka_producer_new(base, cfg, cfg->prompt_linger_ms, api_dr_cb, err, errlen);
    if (!api->kp) {
        free(api);
        return NULL;
    }
    kafka_producer_warm(api->kp, cfg->topic_prompts);
    kafka_producer_watch(api->kp, base, cfg->topic_prompts);
    api->st = store_new(base, cfg);
    watch_init(api);
    api->http = http_server_new_shared(base, cfg, cfg->http_addr, port >= 0 ? port : (int)cfg->http_port,
                                       api_request_cb, api, &api->port, port < 0, err, errlen);
    api->listener = api->http != NULL;
    if (!api->http) {
        watch_free(api);
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
        http_server_stop_listening(api->http);
        api->listener = false;
    }
    watch_close_all(api);
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
    watch_free(api);
    http_server_free(api->http);
    free(api);
}
