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
#include "core/jsonr.h"
#include "core/jsonw.h"
#include "core/log.h"
#include "core/util.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "party/moderate.h"
#include "store/store.h"

#include <event2/buffer.h>
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

/* ---------------------------------------------------------------- the request's parameters */

/* The members of a create request that matter here (each NULL if absent), found in one pass over its object
 * (the body, or the parameters stored with the turn) rather than a hash lookup for each: a dozen lookups cost
 * more than the pass. */
struct req_params {
    json_t *input, *model, *instructions, *temperature, *top_p, *max_output_tokens, *metadata, *background, *stream,
        *callback_url, *tools, *previous_response_id;
};

static void req_params_find(json_t *obj, struct req_params *rp)
{
    static const struct {
        const char *name;
        size_t off;
    } members[] = {
        {"input", offsetof(struct req_params, input)},
        {"model", offsetof(struct req_params, model)},
        {"background", offsetof(struct req_params, background)},
        {"instructions", offsetof(struct req_params, instructions)},
        {"temperature", offsetof(struct req_params, temperature)},
        {"top_p", offsetof(struct req_params, top_p)},
        {"max_output_tokens", offsetof(struct req_params, max_output_tokens)},
        {"metadata", offsetof(struct req_params, metadata)},
        {"stream", offsetof(struct req_params, stream)},
        {"callback_url", offsetof(struct req_params, callback_url)},
        {"tools", offsetof(struct req_params, tools)},
        {"previous_response_id", offsetof(struct req_params, previous_response_id)},
    };
    memset(rp, 0, sizeof *rp);
    const char *key;
    json_t *v;
    json_object_foreach(obj, key, v)
    {
        for (size_t i = 0; i < sizeof members / sizeof members[0]; i++) {
            if (key[0] == members[i].name[0] && strcmp(key, members[i].name) == 0) {
                *(json_t **)((char *)rp + members[i].off) = v;
                break;
            }
        }
    }
}

/* ---------------------------------------------------------------- the Response object */

/* The Response object and the stream's events are written as text, straight into a buffer: building them as
 * jansson trees and then writing those cost about 50,000 instructions per answer, a third of a background
 * create. The text is what jansson's compact writer gave for the trees of the previous version, byte for byte
 * (tests/unit/test_responses.c keeps that version and compares): members in the same order, values echoed from
 * the request through jsonw (jansson's number formats), strings escaped like jansson's. */

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

static void append_i64(struct buf *b, int64_t v)
{
    char num[24];
    buf_append(b, num, fmt_i64(num, v));
}

static void append_str(struct buf *b, const char *s)
{
    buf_append_json_string(b, s, strlen(s));
}

/* "<prefix><conversation>_<turn>" as a JSON string: the ids of responses and of their message items. */
static void append_id(struct buf *b, const char *prefix, const char *conv_id, long turn)
{
    char id[112];
    size_t pl = strlen(prefix), cl = strlen(conv_id);
    if (pl + cl + 22 > sizeof id) { /* longer than any id we issue or accept: never truncated, though */
        char *big = xmalloc(pl + cl + 24);
        memcpy(big, prefix, pl);
        memcpy(big + pl, conv_id, cl);
        big[pl + cl] = '_';
        size_t nl = fmt_i64(big + pl + cl + 1, turn);
        buf_append_json_string(b, big, pl + cl + 1 + nl);
        free(big);
        return;
    }
    memcpy(id, prefix, pl);
    memcpy(id + pl, conv_id, cl);
    id[pl + cl] = '_';
    size_t nl = fmt_i64(id + pl + cl + 1, turn);
    buf_append_json_string(b, id, pl + cl + 1 + nl);
}

/* A member of the request echoed as it came (null if absent). -1 if jsonw cannot write it. */
static int append_req_field(struct buf *b, const json_t *v)
{
    if (!v)
        return buf_append_lit(b, "null");
    return jsonw_append(b, v);
}

/* The request's metadata (an object of strings, validated on create), with the moderation verdict's entries
 * set as moderation_metadata sets them (replacing a client's entry of the same name where it stands). */
static int append_metadata(struct buf *b, json_t *md, const char *moderation)
{
    if (!moderation)
        return json_is_object(md) ? jsonw_append(b, md) : buf_append_lit(b, "{}");
    json_t *m = json_is_object(md) ? json_deep_copy(md) : json_object(); /* rare: keep jansson's semantics */
    moderation_metadata(m, moderation);
    int rc = jsonw_append(b, m);
    json_decref(m);
    return rc;
}

static bool finished_by_length(const struct turn *t)
{
    return t->finish_reason && strcmp(t->finish_reason, "length") == 0;
}

/* The output_text content part of a finished message. */
static void append_text_part(struct buf *b, const struct turn *t)
{
    buf_append_lit(b, "{\"type\":\"output_text\",\"text\":");
    buf_append_json_string(b, t->response ? t->response : "", t->response ? t->response_len : 0);
    buf_append_lit(b, ",\"annotations\":[]}");
}

/* The assistant message item of a turn: empty while it runs, its text once done. */
static void append_message_item(struct buf *b, const char *conv_id, long turn, const struct turn *t, bool done)
{
    buf_append_lit(b, "{\"type\":\"message\",\"id\":");
    append_id(b, "msg_", conv_id, turn);
    buf_append_lit(b, ",\"status\":");
    append_str(b, !done ? "in_progress" : finished_by_length(t) ? "incomplete" : "completed");
    buf_append_lit(b, ",\"role\":\"assistant\",\"content\":[");
    if (done)
        append_text_part(b, t);
    buf_append_lit(b, "]}");
}

static void append_usage(struct buf *b, const struct turn *t)
{
    buf_append_lit(b, "{\"input_tokens\":");
    append_i64(b, t->prompt_tokens);
    buf_append_lit(b, ",\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":");
    append_i64(b, t->completion_tokens);
    buf_append_lit(b, ",\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":");
    append_i64(b, t->total_tokens);
    buf_append_lit(b, "}");
}

/* Results expire with their conversation: conversation-ttl-s after its last change. The snapshots inside
 * stream events count from the moment they describe (queued, started, finished), so that a replayed stream is
 * the same, byte for byte, on every read. */
static void append_expires_at(struct buf *b, const struct api *api, const struct conv *conv, const struct turn *t,
                              enum response_stage stage)
{
    if (api->cfg->conversation_ttl_s <= 0) {
        buf_append_lit(b, "null");
        return;
    }
    int64_t since = conv->updated_at;
    if (stage == RESPONSE_QUEUED)
        since = t->submitted_at;
    else if (stage == RESPONSE_IN_PROGRESS)
        since = t->started_at ? t->started_at : t->submitted_at;
    else if (turn_status_final(t->status) && t->completed_at)
        since = t->completed_at;
    append_i64(b, since / 1000 + api->cfg->conversation_ttl_s);
}

/* The members from "error" to "incomplete_details", which depend on how the turn ended. */
static void append_outcome(struct buf *b, const struct turn *t, enum response_stage stage, bool done,
                           const char *status)
{
    buf_append_lit(b, ",\"error\":");
    if (stage == RESPONSE_NOW && t->status == TURN_FAILED) {
        buf_append_lit(b, "{\"code\":");
        append_str(b, t->error_code ? t->error_code : "failed");
        buf_append_lit(b, ",\"message\":");
        append_str(b, t->error_message ? t->error_message : "");
        buf_append_lit(b, "}");
    } else {
        buf_append_lit(b, "null");
    }
    buf_append_lit(b, ",\"incomplete_details\":");
    if (done && strcmp(status, "incomplete") == 0)
        buf_append_lit(b, "{\"reason\":\"max_output_tokens\"}");
    else
        buf_append_lit(b, "null");
}

int response_text(struct buf *b, const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                  enum response_stage stage, json_t *req)
{
    const char *status = stage == RESPONSE_QUEUED        ? "queued"
                         : stage == RESPONSE_IN_PROGRESS ? "in_progress"
                                                         : openai_status(t);
    bool done = stage == RESPONSE_NOW && t->status == TURN_COMPLETE;
    struct req_params rp;
    req_params_find(req, &rp);
    const char *model = done && t->model && t->model[0] ? t->model : json_string_value(rp.model);
    int rc = 0;
    buf_append_lit(b, "{\"id\":");
    append_id(b, "resp_", conv->id, turn);
    buf_append_lit(b, ",\"object\":\"response\",\"created_at\":");
    append_i64(b, t->submitted_at / 1000);
    buf_append_lit(b, ",\"status\":");
    append_str(b, status);
    buf_append_lit(b, ",\"model\":");
    append_str(b, model && model[0] ? model : api->cfg->llm_model);
    if (json_is_true(rp.background))
        buf_append_lit(b, ",\"background\":true");
    else
        buf_append_lit(b, ",\"background\":false");
    append_outcome(b, t, stage, done, status);
    buf_append_lit(b, ",\"instructions\":");
    rc |= append_req_field(b, rp.instructions);
    buf_append_lit(b, ",\"max_output_tokens\":");
    rc |= append_req_field(b, rp.max_output_tokens);
    buf_append_lit(b, ",\"temperature\":");
    rc |= append_req_field(b, rp.temperature);
    buf_append_lit(b, ",\"top_p\":");
    rc |= append_req_field(b, rp.top_p);
    buf_append_lit(b, ",\"previous_response_id\":");
    rc |= append_req_field(b, rp.previous_response_id);
    buf_append_lit(b, ",\"metadata\":");
    rc |= append_metadata(b, rp.metadata, t->moderation);
    buf_append_lit(b, ",\"output\":[");
    if (done) {
        append_message_item(b, conv->id, turn, t, true);
        buf_append_lit(b, "],\"output_text\":");
        buf_append_json_string(b, t->response ? t->response : "", t->response ? t->response_len : 0);
        buf_append_lit(b, ",\"usage\":");
        append_usage(b, t);
    } else {
        buf_append_lit(b, "],\"usage\":null");
    }
    buf_append_lit(b, ",\"completed_at\":");
    if (stage == RESPONSE_NOW && turn_status_final(t->status) && t->completed_at)
        append_i64(b, t->completed_at / 1000);
    else
        buf_append_lit(b, "null");
    buf_append_lit(b, ",\"expires_at\":");
    append_expires_at(b, api, conv, t, stage);
    buf_append_lit(b, ",\"parallel_tool_calls\":true,\"tool_choice\":\"auto\",\"tools\":[],\"text\":{\"format\":{"
                      "\"type\":\"text\"}},\"truncation\":\"disabled\",\"store\":true}");
    return rc ? -1 : 0;
}

void response_reply(struct http_req *req, const struct api *api, const struct conv *conv, long turn,
                    const struct turn *t, enum response_stage stage, json_t *reqp)
{
    json_t *parsed = !reqp && t->req ? jsonr_loadb(t->req, strlen(t->req), NULL) : NULL;
    struct buf b;
    buf_init(&b, SIZE_MAX / 2);
    int rc = response_text(&b, api, conv, turn, t, stage, reqp ? reqp : parsed);
    json_decref(parsed);
    if (rc == 0 && buf_append_lit(&b, "\n") == 0)
        http_reply_text(req, 200, b.data, b.len);
    else /* the stored request is not what create writes */
        http_reply_error(req, 500, "server_error", "internal_error", "the response could not be written");
    buf_free(&b);
}

/* ---------------------------------------------------------------- streaming events */

/* Appends one SSE event if its number is past the client's, and counts it. ev holds the event's own members
 * (without braces); OpenAI's type and sequence_number go after them. ev is emptied for the next event. */
static void sse_emit(struct evbuffer *out, long *seq, long after, const char *type, struct buf *ev)
{
    long n = (*seq)++;
    if (n > after) {
        evbuffer_add_printf(out, "event: %s\nid: %ld\ndata: {", type, n);
        evbuffer_add(out, ev->data, ev->len);
        evbuffer_add_printf(out, ",\"type\":\"%s\",\"sequence_number\":%ld}\n\n", type, n); /* types need no escapes */
    }
    buf_reset(ev);
}

/* "item_id":...,"output_index":0,"content_index":0 */
static void append_part_address(struct buf *ev, const char *conv_id, long turn)
{
    buf_append_lit(ev, "\"item_id\":");
    append_id(ev, "msg_", conv_id, turn);
    buf_append_lit(ev, ",\"output_index\":0,\"content_index\":0");
}

struct sse_ctx {
    const struct api *api;
    const struct conv *conv;
    long turn;
    const struct turn *t;
    json_t *req; /* t->req parsed once, or NULL */
    struct evbuffer *out;
    long after, *seq;
    struct buf ev;
};

static void emit_response(struct sse_ctx *s, const char *type, enum response_stage stage)
{
    buf_append_lit(&s->ev, "\"response\":");
    response_text(&s->ev, s->api, s->conv, s->turn, s->t, stage, s->req); /* depth: req is ours, validated */
    sse_emit(s->out, s->seq, s->after, type, &s->ev);
}

static void emit_started(struct sse_ctx *s)
{
    emit_response(s, "response.in_progress", RESPONSE_IN_PROGRESS);
    buf_append_lit(&s->ev, "\"output_index\":0,\"item\":");
    append_message_item(&s->ev, s->conv->id, s->turn, s->t, false);
    sse_emit(s->out, s->seq, s->after, "response.output_item.added", &s->ev);
    append_part_address(&s->ev, s->conv->id, s->turn);
    buf_append_lit(&s->ev, ",\"part\":{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[]}");
    sse_emit(s->out, s->seq, s->after, "response.content_part.added", &s->ev);
}

static void emit_delta(struct sse_ctx *s, const struct turn_event *e)
{
    append_part_address(&s->ev, s->conv->id, s->turn);
    buf_append_lit(&s->ev, ",\"delta\":");
    buf_append_json_string(&s->ev, e->text, e->text_len);
    buf_append_lit(&s->ev, ",\"logprobs\":[]");
    sse_emit(s->out, s->seq, s->after, "response.output_text.delta", &s->ev);
}

static void emit_ended(struct sse_ctx *s)
{
    const struct turn *t = s->t;
    if (t->status == TURN_COMPLETE) {
        append_part_address(&s->ev, s->conv->id, s->turn);
        buf_append_lit(&s->ev, ",\"text\":");
        buf_append_json_string(&s->ev, t->response ? t->response : "", t->response ? t->response_len : 0);
        buf_append_lit(&s->ev, ",\"logprobs\":[]");
        sse_emit(s->out, s->seq, s->after, "response.output_text.done", &s->ev);
        append_part_address(&s->ev, s->conv->id, s->turn);
        buf_append_lit(&s->ev, ",\"part\":");
        append_text_part(&s->ev, t);
        sse_emit(s->out, s->seq, s->after, "response.content_part.done", &s->ev);
        buf_append_lit(&s->ev, "\"output_index\":0,\"item\":");
        append_message_item(&s->ev, s->conv->id, s->turn, t, true);
        sse_emit(s->out, s->seq, s->after, "response.output_item.done", &s->ev);
    }
    char type[48];
    snprintf(type, sizeof type, "response.%s", openai_status(t));
    emit_response(s, type, RESPONSE_NOW);
}

bool responses_sse(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                   const struct turn_event *events, size_t n, long after, long *seq, struct evbuffer *out)
{
    struct sse_ctx s = {api, conv,  turn, t,  t->req ? jsonr_loadb(t->req, strlen(t->req), NULL) : NULL,
                        out, after, seq,  {0}};
    buf_init(&s.ev, SIZE_MAX / 2);
    bool ended = false;
    for (size_t i = 0; i < n && !ended; i++) {
        switch (events[i].kind) {
        case 'q':
            emit_response(&s, "response.created", RESPONSE_QUEUED);
            emit_response(&s, "response.queued", RESPONSE_QUEUED);
            break;
        case 's':
            emit_started(&s);
            break;
        case 'd':
            emit_delta(&s, &events[i]);
            break;
        case 'e':
            emit_ended(&s);
            ended = true;
            break;
        default:
            break;
        }
    }
    buf_free(&s.ev);
    json_decref(s.req);
    return ended;
}
/* ---------------------------------------------------------------- create */

static void bad(struct http_req *req, const char *param, const char *code, const char *msg)
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

/* Normalises a list `input` to [{role, content: string}]. Answers 400 and returns NULL when it cannot. *last_user is
 * the index of the last user message. */
static json_t *normalise_input(struct http_req *req, json_t *input, size_t *last_user)
{
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

static bool null_or(json_t *v, bool ok)
{
    return !v || json_is_null(v) || ok;
}

/* The checks of the parameters (but input's), in the order their errors are reported. Answers 400 (or 404 for
 * a previous response that cannot be ours) and returns false on the first that fails; else fills conv and
 * *prev_turn when previous_response_id is given. */
static bool create_params_ok(struct http_req *req, const struct req_params *cr, char *conv, size_t convlen,
                             long *prev_turn)
{
    json_t *mot = cr->max_output_tokens, *md = cr->metadata;
    const char *prev = json_string_value(cr->previous_response_id);
    if (!cr->input) {
        bad(req, "input", "missing_required_parameter", "missing required parameter 'input'");
    } else if (!null_or(cr->model, json_is_string(cr->model))) {
        bad(req, "model", "invalid_type", "'model' must be a string");
    } else if (!null_or(cr->instructions, json_is_string(cr->instructions))) {
        bad(req, "instructions", "invalid_type", "'instructions' must be a string");
    } else if (!null_or(cr->temperature, number_in(cr->temperature, 0, 2))) {
        bad(req, "temperature", "invalid_value", "'temperature' must be a number from 0 to 2");
    } else if (!null_or(cr->top_p, number_in(cr->top_p, 0, 1))) {
        bad(req, "top_p", "invalid_value", "'top_p' must be a number from 0 to 1");
    } else if (!null_or(mot, json_is_integer(mot) && json_integer_value(mot) >= 1)) {
        bad(req, "max_output_tokens", "invalid_value", "'max_output_tokens' must be a positive integer");
    } else if (!null_or(md, json_is_object(md) && json_object_size(md) <= 16)) {
        bad(req, "metadata", "invalid_value", "'metadata' must be an object of at most 16 string values");
    } else if (!null_or(cr->background, json_is_boolean(cr->background))) {
        bad(req, "background", "invalid_type", "'background' must be a boolean");
    } else if (!null_or(cr->stream, json_is_boolean(cr->stream))) {
        bad(req, "stream", "invalid_type", "'stream' must be a boolean");
    } else if (!null_or(cr->callback_url, json_is_string(cr->callback_url))) {
        bad(req, "callback_url", "invalid_type", "'callback_url' must be a string");
    } else if (json_is_string(cr->callback_url) && !api_callback_ok(req, json_string_value(cr->callback_url))) {
        /* answered */
    } else if (!null_or(cr->tools, json_is_array(cr->tools) && json_array_size(cr->tools) == 0)) {
        bad(req, "tools", "unsupported_parameter", "tools are not supported by this server");
    } else if (!null_or(cr->previous_response_id, json_is_string(cr->previous_response_id))) {
        bad(req, "previous_response_id", "invalid_type", "'previous_response_id' must be a string");
    } else if (prev && !parse_response_id(prev, conv, convlen, prev_turn)) {
        http_reply_error_param(req, 404, "invalid_request_error", "previous_response_not_found", "previous_response_id",
                               "no response with id '%.200s'", prev);
    } else {
        return true;
    }
    return false;
}

/* 400 and false unless metadata's values are strings within OpenAI's limits. */
static bool metadata_ok(struct http_req *req, json_t *metadata)
{
    const char *key;
    json_t *mv;
    json_object_foreach(metadata, key, mv)
    {
        if (!json_is_string(mv) || strlen(key) > 64 || json_string_length(mv) > 512) {
            bad(req, "metadata", "invalid_value",
                "'metadata' values must be strings (keys up to 64, values up to 512)");
            return false;
        }
    }
    return true;
}

/* ,"name":value for a member given and not null (jsonw: validated values are never too deep). */
static void append_member(struct buf *b, const char *name, json_t *v)
{
    if (!v || json_is_null(v))
        return;
    buf_append_lit(b, ",\"");
    buf_append(b, name, strlen(name));
    buf_append_lit(b, "\":");
    jsonw_append(b, v);
}

/* The turn's stored request parameters (turn_meta.req), as text: each echoed parameter (null when absent), then
 * background, callback_url when given, and stream. */
static void write_req_json(struct buf *b, const struct req_params *cr)
{
    json_t *const echoed[] = {cr->model,    cr->instructions,        cr->temperature, cr->top_p, cr->max_output_tokens,
                              cr->metadata, cr->previous_response_id};
    static const char *const names[] = {
        "{\"model\":",    ",\"instructions\":",        ",\"temperature\":", ",\"top_p\":", ",\"max_output_tokens\":",
        ",\"metadata\":", ",\"previous_response_id\":"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        buf_append(b, names[i], strlen(names[i]));
        if (echoed[i])
            jsonw_append(b, echoed[i]);
        else
            buf_append_lit(b, "null");
    }
    if (json_is_true(cr->background))
        buf_append_lit(b, ",\"background\":true");
    else
        buf_append_lit(b, ",\"background\":false");
    if (json_is_string(cr->callback_url)) {
        buf_append_lit(b, ",\"callback_url\":");
        jsonw_append(b, cr->callback_url);
    }
    if (json_is_true(cr->stream))
        buf_append_lit(b, ",\"stream\":true}");
    else
        buf_append_lit(b, ",\"stream\":false}");
}

/* The members the worker needs beside the prompt (submit_params.extra): the LLM parameters given, the callback,
 * the whole input when it is a list (input_json), the turn the context ends at. Without the braces. */
static void write_extra(struct buf *b, const struct req_params *cr, const char *input_json, long prev_turn)
{
    append_member(b, "model", cr->model);
    append_member(b, "instructions", cr->instructions);
    append_member(b, "temperature", cr->temperature);
    append_member(b, "top_p", cr->top_p);
    append_member(b, "max_output_tokens", cr->max_output_tokens);
    if (json_is_string(cr->callback_url))
        append_member(b, "callback_url", cr->callback_url);
    if (input_json) {
        buf_append_lit(b, ",\"input\":");
        buf_append(b, input_json, strlen(input_json));
    }
    if (prev_turn) {
        buf_append_lit(b, ",\"context_turn\":");
        append_i64(b, prev_turn);
    }
}

/* The body as a JSON object, or NULL once answered 413 or 400. */
static json_t *create_body(struct api *api, struct http_req *req)
{
    size_t len;
    const char *body = http_body(req, &len);
    if (len > (size_t)api->cfg->http_max_body) {
        http_reply_error(req, 413, "invalid_request_error", "request_too_large",
                         "the request body is %zu bytes; the limit is %ld", len, api->cfg->http_max_body);
        return NULL;
    }
    if (!utf8_valid(body, len)) {
        bad(req, "", "invalid_utf8", "the request body is not valid UTF-8");
        return NULL;
    }
    json_error_t jerr;
    json_t *root = len ? jsonr_loadb(body, len, &jerr) : NULL;
    if (!json_is_object(root)) {
        char msg[256];
        snprintf(msg, sizeof msg, "the request body must be a JSON object%s%s", root || !len ? "" : ": ",
                 root || !len ? "" : jerr.text);
        bad(req, "", "invalid_json", msg);
        json_decref(root);
        return NULL;
    }
    return root;
}

/* Validated: hands the turn to submit.c. content: the last user message's text; norm: the input as a list, or
 * NULL when it was a string. The request's parameters are written as text once, for Redis and for Kafka. */
static void create_submit(struct api *api, struct http_req *req, json_t *root, const struct req_params *cr,
                          json_t *content, json_t *norm, const char *conv, long prev_turn)
{
    bool stream = json_is_true(cr->stream), background = json_is_true(cr->background);
    struct buf rj, extra;
    buf_init(&rj, SIZE_MAX / 2);
    buf_init(&extra, SIZE_MAX / 2);
    write_req_json(&rj, cr);
    char *input_json = norm ? jsonw_dumps(norm, NULL) : NULL;
    write_extra(&extra, cr, input_json, prev_turn);
    struct turn_meta meta = {rj.data, input_json, stream, prev_turn, 0};
    struct submit_params p = {
        .prompt = json_string_value(content),
        .prompt_len = json_string_length(content),
        .conv_id = prev_turn ? conv : NULL,
        .meta = &meta,
        .extra = extra.len ? extra.data + 1 : NULL, /* past the first comma */
        .extra_len = extra.len ? extra.len - 1 : 0,
        .req_obj = root,
        .idem_key = http_header(req, "Idempotency-Key"),
        .mode = stream       ? SUBMIT_STREAM
                : background ? SUBMIT_BACKGROUND
                             : SUBMIT_SYNC,
    };
    submit_start(api, req, &p);
    free(input_json);
    buf_free(&extra);
    buf_free(&rj);
}

static void handle_create(struct api *api, struct http_req *req)
{
    json_t *root = create_body(api, req);
    if (!root)
        return;
    struct req_params cr;
    req_params_find(root, &cr);
    char conv[72];
    long prev_turn = 0;
    if (!create_params_ok(req, &cr, conv, sizeof conv, &prev_turn)) {
        json_decref(root);
        return;
    }
    /* A string input is the prompt as it is; a list is normalised to role and text messages. */
    json_t *norm = NULL, *content = cr.input;
    if (!json_is_string(cr.input)) {
        size_t last_user = 0;
        norm = normalise_input(req, cr.input, &last_user);
        content = norm ? json_object_get(json_array_get(norm, last_user), "content") : NULL;
    }
    if (!content) {
        /* answered */
    } else if (!metadata_ok(req, cr.metadata)) {
        /* answered */
    } else if (!has_non_space(json_string_value(content), json_string_length(content))) {
        bad(req, "input", "empty_prompt", "the last user message must not be empty");
    } else {
        create_submit(api, req, root, &cr, content, norm, conv, prev_turn);
    }
    json_decref(norm);
    json_decref(root);
}
/* ---------------------------------------------------------------- get, cancel, delete */

struct op_ctx {
    struct api *api;
    struct http_req *req;
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
    json_t *req = t->req ? jsonr_loadb(t->req, strlen(t->req), NULL) : NULL;
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

static void not_found(struct http_req *req, const char *id)
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
        response_reply(c->req, c->api, conv, c->turn, t, RESPONSE_NOW, NULL);
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

static long starting_after(struct http_req *req)
{
    char *q = http_query(req, "starting_after");
    const char *h = http_header(req, "Last-Event-ID");
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
static void handle_one(struct api *api, struct http_req *req, const char *rest)
{
    enum http_method m = http_method(req);
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
    if (cancel ? m != HTTP_POST : (m != HTTP_GET && m != HTTP_DELETE)) {
        free(c);
        http_add_header(req, "Allow", cancel ? "POST" : "GET, DELETE");
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
    } else if (m == HTTP_DELETE) {
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

bool responses_route(struct api *api, struct http_req *req, const char *path)
{
    if (strcmp(path, "/v1/responses") == 0) {
        if (http_method(req) == HTTP_POST) {
            handle_create(api, req);
        } else {
            http_add_header(req, "Allow", "POST");
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
