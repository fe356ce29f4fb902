/* Unit tests of the Response object and its stream events (src/http/responses.c), which are written as text:
 * the text must be, byte for byte, what jansson's compact writer gives for the trees the previous version
 * built. That version is kept below (ref_*, unchanged but for its names and jansson's own writer in place of
 * jsonw) as the reference, and both are run on turns at every stage, with escapes, non-ASCII text, numbers
 * echoed from the request and a moderation verdict. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/config.h"
#include "core/util.h"
#include "http/api_internal.h"
#include "party/moderate.h"
#include "store/store.h"

#include <event2/buffer.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- the reference: the previous version */

enum stage { STAGE_QUEUED, STAGE_IN_PROGRESS, STAGE_NOW };

static const char *ref_openai_status(const struct turn *t)
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

static json_t *ref_message_item(const char *conv_id, long turn, const struct turn *t, bool done)
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

static json_t *ref_req_field(json_t *req, const char *name)
{
    json_t *v = json_object_get(req, name);
    return v ? json_incref(v) : json_null();
}

/* req_parsed: t->req already parsed (borrowed), or NULL to parse it here. */
static json_t *ref_response_object_with(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                                        enum stage stage, json_t *req_parsed)
{
    const char *conv_id = conv->id;
    char id[112];
    response_id(id, sizeof id, conv_id, turn);
    json_t *req = req_parsed ? json_incref(req_parsed) : t->req ? json_loads(t->req, 0, NULL) : NULL;
    const char *status = stage == STAGE_QUEUED        ? "queued"
                         : stage == STAGE_IN_PROGRESS ? "in_progress"
                                                      : ref_openai_status(t);
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
    json_object_set_new(r, "instructions", ref_req_field(req, "instructions"));
    json_object_set_new(r, "max_output_tokens", ref_req_field(req, "max_output_tokens"));
    json_object_set_new(r, "temperature", ref_req_field(req, "temperature"));
    json_object_set_new(r, "top_p", ref_req_field(req, "top_p"));
    json_object_set_new(r, "previous_response_id", ref_req_field(req, "previous_response_id"));
    json_t *md = json_object_get(req, "metadata");
    json_object_set_new(r, "metadata", json_is_object(md) ? json_deep_copy(md) : json_object());
    moderation_metadata(json_object_get(r, "metadata"), t->moderation); /* string values, as metadata must be */
    json_object_set_new(r, "output", json_array());
    if (done) {
        json_array_append_new(json_object_get(r, "output"), ref_message_item(conv_id, turn, t, true));
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

static json_t *ref_response_object_at(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                                      enum stage stage)
{
    return ref_response_object_with(api, conv, turn, t, stage, NULL);
}

/* ---------------------------------------------------------------- streaming events */

/* Appends one SSE event if its number is past the client's, and counts it. */
static void ref_sse_emit(struct evbuffer *out, long *seq, long after, const char *type, json_t *ev)
{
    long n = (*seq)++;
    if (n > after) {
        json_object_set_new(ev, "type", json_string(type));
        json_object_set_new(ev, "sequence_number", json_integer(n));
        char *s = json_dumps(ev, JSON_COMPACT);
        evbuffer_add_printf(out, "event: %s\nid: %ld\ndata: %s\n\n", type, n, s);
        free(s);
    }
    json_decref(ev);
}

static bool ref_responses_sse(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                              const struct turn_event *events, size_t n, long after, long *seq, struct evbuffer *out)
{
    const char *conv_id = conv->id;
    char item_id[112];
    snprintf(item_id, sizeof item_id, "msg_%s_%ld", conv_id, turn);
    for (size_t i = 0; i < n; i++) {
        const struct turn_event *e = &events[i];
        switch (e->kind) {
        case 'q':
            ref_sse_emit(out, seq, after, "response.created",
                         json_pack("{s:o}", "response", ref_response_object_at(api, conv, turn, t, STAGE_QUEUED)));
            ref_sse_emit(out, seq, after, "response.queued",
                         json_pack("{s:o}", "response", ref_response_object_at(api, conv, turn, t, STAGE_QUEUED)));
            break;
        case 's':
            ref_sse_emit(out, seq, after, "response.in_progress",
                         json_pack("{s:o}", "response", ref_response_object_at(api, conv, turn, t, STAGE_IN_PROGRESS)));
            ref_sse_emit(out, seq, after, "response.output_item.added",
                         json_pack("{s:i, s:o}", "output_index", 0, "item", ref_message_item(conv_id, turn, t, false)));
            ref_sse_emit(out, seq, after, "response.content_part.added",
                         json_pack("{s:s, s:i, s:i, s:{s:s, s:s, s:[]}}", "item_id", item_id, "output_index", 0,
                                   "content_index", 0, "part", "type", "output_text", "text", "", "annotations"));
            break;
        case 'd':
            ref_sse_emit(out, seq, after, "response.output_text.delta",
                         json_pack("{s:s, s:i, s:i, s:s%, s:[]}", "item_id", item_id, "output_index", 0,
                                   "content_index", 0, "delta", e->text, e->text_len, "logprobs"));
            break;
        case 'e': {
            const char *status = ref_openai_status(t);
            if (t->status == TURN_COMPLETE) {
                const char *text = t->response ? t->response : "";
                size_t tl = t->response ? t->response_len : 0;
                ref_sse_emit(out, seq, after, "response.output_text.done",
                             json_pack("{s:s, s:i, s:i, s:s%, s:[]}", "item_id", item_id, "output_index", 0,
                                       "content_index", 0, "text", text, tl, "logprobs"));
                ref_sse_emit(out, seq, after, "response.content_part.done",
                             json_pack("{s:s, s:i, s:i, s:{s:s, s:s%, s:[]}}", "item_id", item_id, "output_index", 0,
                                       "content_index", 0, "part", "type", "output_text", "text", text, tl,
                                       "annotations"));
                ref_sse_emit(
                    out, seq, after, "response.output_item.done",
                    json_pack("{s:i, s:o}", "output_index", 0, "item", ref_message_item(conv_id, turn, t, true)));
            }
            char type[48];
            snprintf(type, sizeof type, "response.%s", status);
            ref_sse_emit(out, seq, after, type,
                         json_pack("{s:o}", "response", ref_response_object_at(api, conv, turn, t, STAGE_NOW)));
            return true;
        }
        default:
            break;
        }
    }
    return false;
}

/* ---------------------------------------------------------------- the cases */

/* Requests as create stores them (the members of its "req"), from the plainest to the awkward. */
static const char *const REQS[] = {
    NULL, /* a turn without one: /answer's */
    "{\"model\":\"fake\",\"instructions\":null,\"temperature\":null,\"top_p\":null,\"max_output_tokens\":null,"
    "\"metadata\":null,\"previous_response_id\":null,\"background\":true,\"stream\":false}",
    "{\"model\":\"gpt-\\u00fc \\\"x\\\"\",\"instructions\":\"say \\\"hi\\\"\\n\\t\\\\ \\u00e9 \\u4e16\\u754c "
    "\\ud83c\\udf89 \\u0001\\u001f / \\u2028 \\u007f\",\"temperature\":0.7,\"top_p\":1,\"max_output_tokens\":100,"
    "\"metadata\":{\"k\\\"ey\":\"v\\u00e9\\n\",\"moderation_flagged\":\"client's\",\"b\":\"\"},"
    "\"previous_response_id\":\"resp_abc_1\",\"background\":false,\"callback_url\":\"http://x/y?a=1&b=2\","
    "\"stream\":true}",
    "{\"model\":\"\",\"temperature\":1e-05,\"top_p\":0.10000000000000001,\"max_output_tokens\":9007199254740993,"
    "\"metadata\":{},\"background\":null}",
    "{\"temperature\":2.0,\"top_p\":0,\"metadata\":[1,2]}",
};

static const char VERDICT[] =
    "{\"flagged\":true,\"categories\":[\"profanity\",\"empty\"],\"checked_at\":1700000000123}";

/* Turns in every state a Response object shows. */
static void fill_turns(struct turn *t, size_t *n)
{
    static const char resp[] = "h\xc3\xa9llo \"w\\orld\"\n\ttab \x01 \xf0\x9f\x8e\x89 </script> \xe2\x80\xa8 end";
    size_t i = 0;
    t[i++] = (struct turn){.status = TURN_PENDING, .submitted_at = 1700000000999};
    t[i++] = (struct turn){.status = TURN_IN_PROGRESS, .submitted_at = 1700000000999, .started_at = 1700000001500};
    t[i++] = (struct turn){.status = TURN_IN_PROGRESS, .submitted_at = 1700000000999}; /* no started_at yet */
    t[i++] = (struct turn){.status = TURN_COMPLETE,
                           .response = resp,
                           .response_len = sizeof resp - 1,
                           .model = "fake-\xc3\xbc",
                           .finish_reason = "stop",
                           .prompt_tokens = 12,
                           .completion_tokens = 34,
                           .total_tokens = 46,
                           .submitted_at = 1700000000999,
                           .started_at = 1700000001000,
                           .completed_at = 1700000002345};
    t[i++] = (struct turn){.status = TURN_COMPLETE,
                           .response = "cut sho",
                           .response_len = 7,
                           .model = "",
                           .finish_reason = "length",
                           .submitted_at = 1700000000999,
                           .completed_at = 1700000002345};
    t[i++] = (struct turn){.status = TURN_COMPLETE, .submitted_at = 5, .completed_at = 0}; /* no text, no time */
    t[i++] = (struct turn){.status = TURN_FAILED,
                           .error_code = "llm_error",
                           .error_message = "upstream said \"no\"\n\xe2\x9c\x97",
                           .submitted_at = 1700000000999,
                           .completed_at = 1700000009999};
    t[i++] = (struct turn){.status = TURN_FAILED, .submitted_at = 1700000000999};
    t[i++] = (struct turn){.status = TURN_CANCELLED, .submitted_at = 1700000000999, .completed_at = 1700000003000};
    t[i++] = (struct turn){.status = TURN_COMPLETE,
                           .response = "ok",
                           .response_len = 2,
                           .finish_reason = "stop",
                           .moderation = VERDICT,
                           .submitted_at = 1700000000999,
                           .completed_at = 1700000002345};
    *n = i;
}

static void check_object(const struct api *api, const struct conv *conv, long turn, const struct turn *t,
                         enum stage stage)
{
    static const enum response_stage stages[] = {RESPONSE_QUEUED, RESPONSE_IN_PROGRESS, RESPONSE_NOW};
    json_t *ref = ref_response_object_at(api, conv, turn, t, stage);
    assert_non_null(ref);
    char *want = json_dumps(ref, JSON_COMPACT);
    json_t *req = t->req ? json_loads(t->req, 0, NULL) : NULL;
    assert_true(req || !t->req); /* the cases are valid JSON */
    struct buf b;
    buf_init(&b, SIZE_MAX / 2);
    assert_int_equal(response_text(&b, api, conv, turn, t, stages[stage], req), 0);
    if (strcmp(want, b.data) != 0)
        fail_msg("stage %d status %d req %s\nwant %s\ngot  %s", (int)stage, (int)t->status, t->req ? t->req : "-", want,
                 b.data);
    buf_free(&b);
    json_decref(req);
    free(want);
    json_decref(ref);
}

static void test_response_object(void **state)
{
    (void)state;
    struct config cfg = {0};
    cfg.llm_model = "default-model";
    struct api api = {.cfg = &cfg};
    struct turn turns[16];
    size_t nt;
    fill_turns(turns, &nt);
    static const char *const ids[] = {"abcDEF123_-x", "A"};
    for (int ttl = 0; ttl < 2; ttl++) {
        cfg.conversation_ttl_s = ttl ? 3600 : 0;
        for (size_t r = 0; r < sizeof REQS / sizeof REQS[0]; r++) {
            for (size_t i = 0; i < nt; i++) {
                struct turn t = turns[i];
                t.req = REQS[r];
                struct conv conv = {.id = ids[i % 2], .nturns = 7, .updated_at = 1700000004000};
                for (int s = STAGE_QUEUED; s <= STAGE_NOW; s++)
                    check_object(&api, &conv, 7, &t, (enum stage)s);
            }
        }
    }
}

static char *drain(struct evbuffer *out)
{
    size_t n = evbuffer_get_length(out);
    char *s = xmalloc(n + 1);
    evbuffer_remove(out, s, n);
    s[n] = '\0';
    return s;
}

/* A streamed turn's events, from every point a client may resume at. */
static void test_stream_events(void **state)
{
    (void)state;
    struct config cfg = {0};
    cfg.llm_model = "default-model";
    cfg.conversation_ttl_s = 600;
    struct api api = {.cfg = &cfg};
    struct turn turns[16];
    size_t nt;
    fill_turns(turns, &nt);
    const struct turn_event ev[] = {
        {1, 'q', NULL, 0}, {2, 's', NULL, 0}, {3, 'd', "h\xc3\xa9", 3}, {4, 'd', "l\"lo\n", 5}, {5, 'e', NULL, 0}};
    for (size_t i = 0; i < nt; i++) {
        struct turn t = turns[i];
        t.req = REQS[2];
        t.stream = true;
        struct conv conv = {.id = "strm", .nturns = 2, .updated_at = 1700000004000};
        for (size_t upto = 0; upto <= sizeof ev / sizeof ev[0]; upto++) {
            for (long after = -1; after < 12; after++) {
                struct evbuffer *a = evbuffer_new(), *b = evbuffer_new();
                long sa = 0, sb = 0;
                bool ea = ref_responses_sse(&api, &conv, 2, &t, ev, upto, after, &sa, a);
                bool eb = responses_sse(&api, &conv, 2, &t, ev, upto, after, &sb, b);
                char *want = drain(a), *got = drain(b);
                assert_int_equal(ea, eb);
                assert_int_equal(sa, sb);
                if (strcmp(want, got) != 0)
                    fail_msg("turn %zu upto %zu after %ld\nwant %s\ngot  %s", i, upto, after, want, got);
                free(want);
                free(got);
                evbuffer_free(a);
                evbuffer_free(b);
            }
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_response_object),
        cmocka_unit_test(test_stream_events),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
