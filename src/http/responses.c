/* responses.c - OpenAI's Responses API in background mode, on top of the seed's pipeline.
 *
 *   POST   /v1/responses                 create (background: queued at once; stream: SSE; else wait for it)
 *   GET    /v1/responses/{id}            the Response object (?stream=true&starting_after=N: its events)
 *   POST   /v1/responses/{id}/cancel     cancel a queued or in-progress response
 *   DELETE /v1/responses/{id}            delete it
 *
 * Mapping. A response is one turn of a conversation: its id is "resp_<conversation id>_<turn>" (the turn is
 * after the last '_'), so any API instance can find it, and `previous_response_id` continues that
 * conversation: the new turn is sent to the LLM with the conversation's turns up to the one named (so a client
 * may branch from an older response; the turns after it are left out of the context). `instructions` is the
 * system message of this request only, as in OpenAI's API.
 *
 * Streams. A turn created with stream=true keeps compact events in Redis (store.h: queued, started, text
 * deltas, ended); a stream expands them into OpenAI's events with a sequence number each. The expansion of
 * each stored event has a fixed length, so numbering is the same on every read and on every API instance:
 * a client resumes with starting_after=N (or Last-Event-ID) from anywhere. */
#include "http/api_internal.h"

#include "core/config.h"
#include "core/jsonw.h"
#include "core/log.h"
#include "core/util.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "party/moderate.h"
#include "store/store.h"

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- ids */

void response_id(char *out, size_t len, const char *conv_id, long turn)
{
    snprintf(out, len, "resp_%s_%ld", conv_id, turn);
}

/* Splits "resp_<conv>_<turn>". Returns false if id is not one of ours. */
static bool parse_response_id(const char *id, char *conv, size_t convlen, long *turn)
{
    if (strncmp(id, "resp_", 5) != 0)
        return false;
    const char *c = id + 5, *us = strrchr(c, '_');
    if (!us || us == c || (size_t)(us - c) >= convlen || !conv_id_valid(c, (size_t)(us - c)))
        return false;
    char *end;
    long t = strtol(us + 1, &end, 10);
    if (*end != '\0' || t < 1 || end == us + 1)
        return false;
    memcpy(conv, c, (size_t)(us - c));
    conv[us - c] = '\0';
    *turn = t;
    return true;
}

/* ---------------------------------------------------------------- the Response object */

enum stage { STAGE_QUEUED, STAGE_IN_PROGRESS, STAGE_NOW };

static const char *openai_status(const struct turn *t)
{
    switch (t->status) {
    case TURN_PENDING:
        return "queued";
    case TURN_IN_PROGRESS:
        return "in_progress";
    case TURN_COMPLETE:
        return t->finish_reason && strcmp(t->finish_reason, "length") == 0 ? "incomplete" : "completed";
    case TURN_FAILED:
        return "failed";
    case TURN_CANCELLED:
        return "cancelled";
    default:
        return "failed";
    }
}

static json_t *message_item(const char *conv_id, long turn, const struct turn *t, bool done)
{
    char id[112];
    snprintf(id, sizeof id, "msg_%s_%ld", conv_id, turn);
    json_t *content = json_array();
    if (done)
        json_array_append_new(content, json_pack("{s:s, s:s%, s:[]}", "type", "output_text", "text",
                                                 t->response ? t->response : "", t->response ? t->response_len : 0,
                                                 "annotations"));
    return json_pack("{s:s, s:s, s:s, s:s, s:o}", "type", "message", "id", id, "status",
                     !done                                                         ? "in_progress"
                     : t->finish_reason && strcmp(t->finish_reason, "length") == 0 ? "incomplete"
                                                                                   : "completed",
                     "role", "assistant", "content", content);
}

static json_t *req_field(json_t *req, const char *name)
{
    json_t *v = json_object_get(req, name);
    return v ? json_incref(v) : json_null();
}

/* req_parsed: t->req already parsed (borrowed), or NULL to parse it here. */
static json_t *response_object_with(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                                    enum stage stage, json_t *req_parsed)
{
    const char *conv_id = conv->id;
    char id[112];
    response_id(id, sizeof id, conv_id, turn);
    json_t *req = req_parsed ? json_incref(req_parsed) : t->req ? json_loads(t->req, 0, NULL) : NULL;
    const char *status = stage == STAGE_QUEUED        ? "queued"
                         : stage == STAGE_IN_PROGRESS ? "in_progress"
                                                      : openai_status(t);
    bool done = stage == STAGE_NOW && (t->status == TURN_COMPLETE);
    const char *model = done && t->model && t->model[0] ? t->model : json_string_value(json_object_get(req, "model"));
    json_t *r = json_pack("{s:s, s:s, s:I, s:s, s:s}", "id", id, "object", "response", "created_at",
                          (json_int_t)(t->submitted_at / 1000), "status", status, "model",
                          model && model[0] ? model : api->cfg->llm_model);
    json_object_set_new(r, "background", json_boolean(json_is_true(json_object_get(req, "background"))));
    if (stage == STAGE_NOW && t->status == TURN_FAILED)
        json_object_set_new(r, "error",
                            json_pack("{s:s, s:s}", "code", t->error_code ? t->error_code : "failed", "message",
                                      t->error_message ? t->error_message : ""));
    else
        json_object_set_new(r, "error", json_null());
    json_object_set_new(r, "incomplete_details",
                        done && strcmp(status, "incomplete") == 0 ? json_pack("{s:s}", "reason", "max_output_tokens")
                                                                  : json_null());
    json_object_set_new(r, "instructions", req_field(req, "instructions"));
    json_object_set_new(r, "max_output_tokens", req_field(req, "max_output_tokens"));
    json_object_set_new(r, "temperature", req_field(req, "temperature"));
    json_object_set_new(r, "top_p", req_field(req, "top_p"));
    json_object_set_new(r, "previous_response_id", req_field(req, "previous_response_id"));
    json_t *md = json_object_get(req, "metadata");
    json_object_set_new(r, "metadata", json_is_object(md) ? json_deep_copy(md) : json_object());
    moderation_metadata(json_object_get(r, "metadata"), t->moderation); /* string values, as metadata must be */
    json_object_set_new(r, "output", json_array());
    if (done) {
        json_array_append_new(json_object_get(r, "output"), message_item(conv_id, turn, t, true));
        json_object_set_new(r, "output_text",
                            json_stringn(t->response ? t->response : "", t->response ? t->response_len : 0));
        json_object_set_new(r, "usage",
                            json_pack("{s:I, s:{s:i}, s:I, s:{s:i}, s:I}", "input_tokens", (json_int_t)t->prompt_tokens,
                                      "input_tokens_details", "cached_tokens", 0, "output_tokens",
                                      (json_int_t)t->completion_tokens, "output_tokens_details", "reasoning_tokens", 0,
                                      "total_tokens", (json_int_t)t->total_tokens));
    } else {
        json_object_set_new(r, "usage", json_null());
    }
    json_object_set_new(r, "completed_at",
                        stage == STAGE_NOW && turn_status_final(t->status) && t->completed_at
                            ? json_integer(t->completed_at / 1000)
                            : json_null());
    /* Results expire with their conversation: conversation-ttl-s after its last change. The snapshots inside
     * stream events count from the moment they describe (queued, started, finished), so that a replayed
     * stream is the same, byte for byte, on every read. */
    int64_t since = conv->updated_at;
    if (stage == STAGE_QUEUED)
        since = t->submitted_at;
    else if (stage == STAGE_IN_PROGRESS)
        since = t->started_at ? t->started_at : t->submitted_at;
    else if (turn_status_final(t->status) && t->completed_at)
        since = t->completed_at;
    json_object_set_new(r, "expires_at",
                        api->cfg->conversation_ttl_s > 0 ? json_integer(since / 1000 + api->cfg->conversation_ttl_s)
                                                         : json_null());
    json_object_set_new(r, "parallel_tool_calls", json_true());
    json_object_set_new(r, "tool_choice", json_string("auto"));
    json_object_set_new(r, "tools", json_array());
    json_object_set_new(r, "text", json_pack("{s:{s:s}}", "format", "type", "text"));
    json_object_set_new(r, "truncation", json_string("disabled"));
    json_object_set_new(r, "store", json_true());
    json_decref(req);
    return r;
}

static json_t *response_object_at(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                                  enum stage stage)
{
    return response_object_with(api, conv, turn, t, stage, NULL);
}

json_t *response_object(const struct api *api, const struct conv *conv, long turn, const struct turn *t)
{
    return response_object_at(api, conv, turn, t, STAGE_NOW);
}

json_t *response_object_queued(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                               json_t *req)
{
    return response_object_with(api, conv, turn, t, STAGE_QUEUED, req);
}

/* ---------------------------------------------------------------- streaming events */

/* Appends one SSE event if its number is past the client's, and counts it. */
static void sse_emit(struct evbuffer *out, long *seq, long after, const char *type, json_t *ev)
{
    long n = (*seq)++;
    if (n > after) {
        json_object_set_new(ev, "type", json_string(type));
        json_object_set_new(ev, "sequence_number", json_integer(n));
        char *s = jsonw_dumps(ev, NULL);
        evbuffer_add_printf(out, "event: %s\nid: %ld\ndata: %s\n\n", type, n, s);
        free(s);
    }
    json_decref(ev);
}

bool responses_sse(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                   const struct turn_event *events, size_t n, long after, long *seq, struct evbuffer *out)
{
    const char *conv_id = conv->id;
    char item_id[112];
    snprintf(item_id, sizeof item_id, "msg_%s_%ld", conv_id, turn);
    for (size_t i = 0; i < n; i++) {
        const struct turn_event *e = &events[i];
        switch (e->kind) {
        case 'q':
            sse_emit(out, seq, after, "response.created",
                     json_pack("{s:o}", "response", response_object_at(api, conv, turn, t, STAGE_QUEUED)));
            sse_emit(out, seq, after, "response.queued",
                     json_pack("{s:o}", "response", response_object_at(api, conv, turn, t, STAGE_QUEUED)));
            break;
        case 's':
            sse_emit(out, seq, after, "response.in_progress",
                     json_pack("{s:o}", "response", response_object_at(api, conv, turn, t, STAGE_IN_PROGRESS)));
            sse_emit(out, seq, after, "response.output_item.added",
                     json_pack("{s:i, s:o}", "output_index", 0, "item", message_item(conv_id, turn, t, false)));
            sse_emit(out, seq, after, "response.content_part.added",
                     json_pack("{s:s, s:i, s:i, s:{s:s, s:s, s:[]}}", "item_id", item_id, "output_index", 0,
                               "content_index", 0, "part", "type", "output_text", "text", "", "annotations"));
            break;
        case 'd':
            sse_emit(out, seq, after, "response.output_text.delta",
                     json_pack("{s:s, s:i, s:i, s:s%, s:[]}", "item_id", item_id, "output_index", 0, "content_index", 0,
                               "delta", e->text, e->text_len, "logprobs"));
            break;
        case 'e': {
            const char *status = openai_status(t);
            if (t->status == TURN_COMPLETE) {
                const char *text = t->response ? t->response : "";
                size_t tl = t->response ? t->response_len : 0;
                sse_emit(out, seq, after, "response.output_text.done",
                         json_pack("{s:s, s:i, s:i, s:s%, s:[]}", "item_id", item_id, "output_index", 0,
                                   "content_index", 0, "text", text, tl, "logprobs"));
                sse_emit(out, seq, after, "response.content_part.done",
                         json_pack("{s:s, s:i, s:i, s:{s:s, s:s%, s:[]}}", "item_id", item_id, "output_index", 0,
                                   "content_index", 0, "part", "type", "output_text", "text", text, tl, "annotations"));
                sse_emit(out, seq, after, "response.output_item.done",
                         json_pack("{s:i, s:o}", "output_index", 0, "item", message_item(conv_id, turn, t, true)));
            }
            char type[48];
            snprintf(type, sizeof type, "response.%s", status);
            sse_emit(out, seq, after, type,
                     json_pack("{s:o}", "response", response_object_at(api, conv, turn, t, STAGE_NOW)));
            return true;
        }
        default:
            break;
        }
    }
    return false;
}

/* ---------------------------------------------------------------- create */

static void bad(struct evhttp_request *req, const char *param, const char *code, const char *msg)
{
    http_reply_error_param(req, 400, "invalid_request_error", code, param, "%s", msg);
}

/* The text of a message's content: a string, or the text parts of a list. NULL if it has other parts. */
static char *content_text(json_t *c, bool *unsupported)
{
    if (json_is_string(c))
        return xstrndup(json_string_value(c), json_string_length(c));
    if (!json_is_array(c))
        return NULL;
    struct buf b;
    buf_init(&b, (size_t)1 << 30);
    size_t i;
    json_t *part;
    json_array_foreach(c, i, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        json_t *text = json_object_get(part, "text");
        if (!type || (strcmp(type, "input_text") && strcmp(type, "output_text") && strcmp(type, "text")) ||
            !json_is_string(text)) {
            *unsupported = true;
            buf_free(&b);
            return NULL;
        }
        buf_append(&b, json_string_value(text), json_string_length(text));
    }
    if (!b.data)
        buf_append(&b, "", 0);
    return b.data;
}

/* Normalises `input` to [{role, content: string}]. Answers 400 and returns NULL when it cannot. *last_user is
 * the index of the last user message. */
static json_t *normalise_input(struct evhttp_request *req, json_t *input, size_t *last_user)
{
    if (json_is_string(input)) {
        *last_user = 0;
        return json_pack("[{s:s, s:O}]", "role", "user", "content", input);
    }
    if (!json_is_array(input) || json_array_size(input) == 0) {
        bad(req, "input", "invalid_input", "'input' must be a non-empty string or a non-empty list of messages");
        return NULL;
    }
    json_t *out = json_array();
    bool have_user = false;
    size_t i;
    json_t *m;
    json_array_foreach(input, i, m)
    {
        const char *type = json_string_value(json_object_get(m, "type"));
        const char *role = json_string_value(json_object_get(m, "role"));
        if ((type && strcmp(type, "message") != 0) || !role ||
            (strcmp(role, "user") && strcmp(role, "assistant") && strcmp(role, "system") &&
             strcmp(role, "developer"))) {
            bad(req, "input", "unsupported_input",
                "each input item must be a message with role user, assistant, system or developer (tools, files "
                "and other item types are not supported)");
            json_decref(out);
            return NULL;
        }
        bool unsupported = false;
        char *text = content_text(json_object_get(m, "content"), &unsupported);
        if (!text) {
            bad(req, "input", "unsupported_input",
                unsupported ? "only text content is supported (input_text parts)"
                            : "each message needs 'content': a string or a list of input_text parts");
            json_decref(out);
            return NULL;
        }
        if (!utf8_valid(text, strlen(text))) {
            free(text);
            bad(req, "input", "invalid_utf8", "'input' is not valid UTF-8");
            json_decref(out);
            return NULL;
        }
        /* "developer" is OpenAI's newer name for "system"; many compatible servers know only "system". */
        json_array_append_new(
            out, json_pack("{s:s, s:s}", "role", strcmp(role, "developer") ? role : "system", "content", text));
        if (strcmp(role, "user") == 0) {
            *last_user = i;
            have_user = true;
        }
        free(text);
    }
    if (!have_user) {
        bad(req, "input", "invalid_input", "'input' needs at least one user message");
        json_decref(out);
        return NULL;
    }
    return out;
}

static bool number_in(json_t *v, double lo, double hi)
{
    return json_is_number(v) && json_number_value(v) >= lo && json_number_value(v) <= hi;
}

static void handle_create(struct api *api, struct evhttp_request *req)
{
    size_t len;
    const char *body = http_body(req, &len);
    if (len > (size_t)api->cfg->http_max_body) {
        http_reply_error(req, 413, "invalid_request_error", "request_too_large",
                         "the request body is %zu bytes; the limit is %ld", len, api->cfg->http_max_body);
        return;
    }
    if (!utf8_valid(body, len)) {
        bad(req, "", "invalid_utf8", "the request body is not valid UTF-8");
        return;
    }
    json_error_t jerr;
    json_t *root = len ? json_loadb(body, len, 0, &jerr) : NULL;
    if (!json_is_object(root)) {
        char msg[256];
        snprintf(msg, sizeof msg, "the request body must be a JSON object%s%s", root || !len ? "" : ": ",
                 root || !len ? "" : jerr.text);
        bad(req, "", "invalid_json", msg);
        json_decref(root);
        return;
    }
    json_t *input = json_object_get(root, "input"), *v, *norm = NULL, *extra = NULL, *reqp = NULL;
    size_t last_user = 0;
    char conv[72];
    long prev_turn = 0;
    const char *prev = json_string_value(json_object_get(root, "previous_response_id"));
    json_t *tools = json_object_get(root, "tools");
    json_t *cb = json_object_get(root, "callback_url");
    if (!input) {
        bad(req, "input", "missing_required_parameter", "missing required parameter 'input'");
    } else if ((v = json_object_get(root, "model")) && !json_is_string(v) && !json_is_null(v)) {
        bad(req, "model", "invalid_type", "'model' must be a string");
    } else if ((v = json_object_get(root, "instructions")) && !json_is_string(v) && !json_is_null(v)) {
        bad(req, "instructions", "invalid_type", "'instructions' must be a string");
    } else if ((v = json_object_get(root, "temperature")) && !json_is_null(v) && !number_in(v, 0, 2)) {
        bad(req, "temperature", "invalid_value", "'temperature' must be a number from 0 to 2");
    } else if ((v = json_object_get(root, "top_p")) && !json_is_null(v) && !number_in(v, 0, 1)) {
        bad(req, "top_p", "invalid_value", "'top_p' must be a number from 0 to 1");
    } else if ((v = json_object_get(root, "max_output_tokens")) && !json_is_null(v) &&
               !(json_is_integer(v) && json_integer_value(v) >= 1)) {
        bad(req, "max_output_tokens", "invalid_value", "'max_output_tokens' must be a positive integer");
    } else if ((v = json_object_get(root, "metadata")) && !json_is_null(v) &&
               (!json_is_object(v) || json_object_size(v) > 16)) {
        bad(req, "metadata", "invalid_value", "'metadata' must be an object of at most 16 string values");
    } else if ((v = json_object_get(root, "background")) && !json_is_boolean(v) && !json_is_null(v)) {
        bad(req, "background", "invalid_type", "'background' must be a boolean");
    } else if ((v = json_object_get(root, "stream")) && !json_is_boolean(v) && !json_is_null(v)) {
        bad(req, "stream", "invalid_type", "'stream' must be a boolean");
    } else if (cb && !json_is_null(cb) && !json_is_string(cb)) {
        bad(req, "callback_url", "invalid_type", "'callback_url' must be a string");
    } else if (json_is_string(cb) && !api_callback_ok(req, json_string_value(cb))) {
        /* answered */
    } else if (tools && !(json_is_array(tools) && json_array_size(tools) == 0) && !json_is_null(tools)) {
        bad(req, "tools", "unsupported_parameter", "tools are not supported by this server");
    } else if ((v = json_object_get(root, "previous_response_id")) && !json_is_null(v) && !json_is_string(v)) {
        bad(req, "previous_response_id", "invalid_type", "'previous_response_id' must be a string");
    } else if (prev && !parse_response_id(prev, conv, sizeof conv, &prev_turn)) {
        http_reply_error_param(req, 404, "invalid_request_error", "previous_response_not_found", "previous_response_id",
                               "no response with id '%.200s'", prev);
    } else if ((norm = normalise_input(req, input, &last_user))) {
        const char *key;
        json_t *mv;
        bool md_ok = true;
        json_object_foreach(json_object_get(root, "metadata"), key, mv)
        {
            if (!json_is_string(mv) || strlen(key) > 64 || json_string_length(mv) > 512)
                md_ok = false;
        }
        json_t *um = json_array_get(norm, last_user);
        json_t *content = json_object_get(um, "content");
        if (!md_ok) {
            bad(req, "metadata", "invalid_value",
                "'metadata' values must be strings (keys up to 64, values up to 512)");
        } else if (!has_non_space(json_string_value(content), json_string_length(content))) {
            bad(req, "input", "empty_prompt", "the last user message must not be empty");
        } else {
            bool stream = json_is_true(json_object_get(root, "stream"));
            bool background = json_is_true(json_object_get(root, "background"));
            reqp = json_object();
            static const char *const echoed[] = {
                "model",    "instructions",        "temperature", "top_p", "max_output_tokens",
                "metadata", "previous_response_id"};
            extra = json_object();
            for (size_t i = 0; i < sizeof echoed / sizeof echoed[0]; i++) {
                json_t *x = json_object_get(root, echoed[i]);
                json_object_set(reqp, echoed[i], x ? x : json_null());
                if (x && !json_is_null(x) && strcmp(echoed[i], "metadata") && strcmp(echoed[i], "previous_response_id"))
                    json_object_set(extra, echoed[i], x);
            }
            json_object_set_new(reqp, "background", json_boolean(background));
            if (json_is_string(cb)) {
                json_object_set(reqp, "callback_url", cb);
                json_object_set(extra, "callback_url", cb);
            }
            json_object_set_new(reqp, "stream", json_boolean(stream));
            if (json_is_array(input))
                json_object_set(extra, "input", norm);
            if (prev)
                json_object_set_new(extra, "context_turn", json_integer(prev_turn));
            char *req_json = jsonw_dumps(reqp, NULL);
            char *input_json = json_is_array(input) ? jsonw_dumps(norm, NULL) : NULL;
            struct turn_meta meta = {req_json, input_json, stream, prev ? prev_turn : 0, 0};
            struct submit_params p = {
                .prompt = json_string_value(content),
                .prompt_len = json_string_length(content),
                .conv_id = prev ? conv : NULL,
                .meta = &meta,
                .extra = extra,
                .req_obj = reqp,
                .idem_key = evhttp_find_header(evhttp_request_get_input_headers(req), "Idempotency-Key"),
                .mode = stream       ? SUBMIT_STREAM
                        : background ? SUBMIT_BACKGROUND
                                     : SUBMIT_SYNC,
            };
            submit_start(api, req, &p);
            free(req_json);
            free(input_json);
        }
    }
    json_decref(extra);
    json_decref(reqp);
    json_decref(norm);
    json_decref(root);
}

/* ---------------------------------------------------------------- get, cancel, delete */

struct op_ctx {
    struct api *api;
    struct evhttp_request *req;
    char conv[72];
    long turn;
    bool cancel;   /* cancel: answer the object after; else delete */
    bool announce; /* the cancel took effect: publish a cancelled record on the responses topic */
};

/* Interested parties (webhooks among them) learn of a cancellation from the responses topic, like of any other
 * final status. Best effort: a failed produce is logged (the Redis state is what clients see). */
static void announce_cancel(struct api *api, const struct conv *conv, long turn, const struct turn *t)
{
    char rid[112];
    response_id(rid, sizeof rid, conv->id, turn);
    json_t *m =
        json_pack("{s:s, s:s%, s:s, s:s, s:I, s:s, s:I}", "conversation_id", conv->id, "user_prompt",
                  t->prompt ? t->prompt : "", t->prompt ? t->prompt_len : 0, "llm_response", "", "status", "cancelled",
                  "turn", (json_int_t)turn, "response_id", rid, "completed_at", (json_int_t)t->completed_at);
    json_t *req = t->req ? json_loads(t->req, 0, NULL) : NULL;
    json_t *cb = json_object_get(req, "callback_url");
    if (json_is_string(cb))
        json_object_set(m, "callback_url", cb);
    char *v = json_dumps(m, JSON_COMPACT);
    rd_kafka_resp_err_t e =
        kafka_produce(api->kp, api->cfg->topic_responses, conv->id, strlen(conv->id), v, strlen(v), NULL, NULL);
    if (e)
        log_warn("could not publish the cancellation of %s: %s", rid, rd_kafka_err2str(e));
    free(v);
    json_decref(req);
    json_decref(m);
}

static void not_found(struct evhttp_request *req, const char *id)
{
    http_reply_error(req, 404, "invalid_request_error", "response_not_found", "no response with id '%s'", id);
}

static void got_cb(void *arg, int rc, const struct conv *conv)
{
    struct op_ctx *c = arg;
    char id[112];
    response_id(id, sizeof id, c->conv, c->turn);
    const struct turn *t = rc == STORE_OK && c->turn <= conv->nturns ? &conv->turn[c->turn] : NULL;
    if (rc != STORE_OK && rc != STORE_ENOTFOUND)
        api_reply_unavailable(c->api, c->req, "the conversation store (Redis) is unavailable");
    else if (!t || t->status == TURN_NONE || t->status == TURN_REJECTED || t->status == TURN_DELETED)
        not_found(c->req, id);
    else {
        if (c->announce)
            announce_cancel(c->api, conv, c->turn, t);
        http_reply_json(c->req, 200, response_object(c->api, conv, c->turn, t));
    }
    free(c);
}

static void changed_cb(void *arg, int rc)
{
    struct op_ctx *c = arg;
    char id[112];
    response_id(id, sizeof id, c->conv, c->turn);
    if (rc == STORE_ENOTFOUND) {
        not_found(c->req, id);
    } else if (rc == STORE_ECONFLICT) {
        http_reply_error(c->req, 409, "invalid_request_error", "response_not_cancellable",
                         "response '%s' has already finished, so it cannot be cancelled", id);
    } else if (rc < 0) {
        api_reply_unavailable(c->api, c->req, "the conversation store (Redis) is unavailable");
    } else if (c->cancel) {
        c->announce = rc == 1;
        store_load(c->api->st, c->conv, got_cb, c);
        return;
    } else {
        http_reply_json(c->req, 200, json_pack("{s:s, s:s, s:b}", "id", id, "object", "response", "deleted", 1));
    }
    free(c);
}

static long starting_after(struct evhttp_request *req)
{
    char *q = http_query(req, "starting_after");
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Last-Event-ID");
    const char *s = q ? q : h;
    long v = -1;
    if (s) {
        char *end;
        long x = strtol(s, &end, 10);
        if (end != s && *end == '\0' && x >= -1)
            v = x;
    }
    free(q);
    return v;
}

/* Handles /v1/responses/{id}[/cancel]. */
static void handle_one(struct api *api, struct evhttp_request *req, const char *rest)
{
    enum evhttp_cmd_type m = evhttp_request_get_command(req);
    char id[160];
    const char *slash = strchr(rest, '/');
    size_t idlen = slash ? (size_t)(slash - rest) : strlen(rest);
    bool cancel = slash && strcmp(slash, "/cancel") == 0;
    if ((slash && !cancel) || idlen == 0 || idlen >= sizeof id) {
        http_reply_error(req, 404, "invalid_request_error", "not_found", "no such route");
        return;
    }
    memcpy(id, rest, idlen);
    id[idlen] = '\0';
    struct op_ctx *c = xcalloc(1, sizeof *c);
    c->api = api;
    c->req = req;
    if (!parse_response_id(id, c->conv, sizeof c->conv, &c->turn)) {
        free(c);
        not_found(req, id);
        return;
    }
    if (cancel ? m != EVHTTP_REQ_POST : (m != EVHTTP_REQ_GET && m != EVHTTP_REQ_DELETE)) {
        free(c);
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", cancel ? "POST" : "GET, DELETE");
        http_reply_error(req, 405, "invalid_request_error", "method_not_allowed", "method not allowed; use %s",
                         cancel ? "POST" : "GET or DELETE");
        return;
    }
    if (!store_connected(api->st)) {
        free(c);
        api_reply_unavailable(api, req, "the conversation store (Redis) is unavailable");
        return;
    }
    if (cancel) {
        c->cancel = true;
        store_cancel(api->st, c->conv, c->turn, changed_cb, c);
    } else if (m == EVHTTP_REQ_DELETE) {
        store_delete(api->st, c->conv, c->turn, changed_cb, c);
    } else {
        char *stream = http_query(req, "stream");
        bool want_stream = stream && strcmp(stream, "true") == 0;
        free(stream);
        if (want_stream) {
            watch_stream(api, req, c->conv, c->turn, starting_after(req));
            free(c);
        } else {
            store_load(api->st, c->conv, got_cb, c);
        }
    }
}

bool responses_route(struct api *api, struct evhttp_request *req, const char *path)
{
    if (strcmp(path, "/v1/responses") == 0) {
        if (evhttp_request_get_command(req) == EVHTTP_REQ_POST) {
            handle_create(api, req);
        } else {
            evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "POST");
            http_reply_error(req, 405, "invalid_request_error", "method_not_allowed", "method not allowed; use POST");
        }
        return true;
    }
    if (strncmp(path, "/v1/responses/", 14) == 0) {
        handle_one(api, req, path + 14);
        return true;
    }
    return false;
}
