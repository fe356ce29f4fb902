/* Unit tests of the LLM wire format: request building, answer parsing, Retry-After. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "llm/chat.h"
#include "llm/llm.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static void test_request(void **state)
{
    (void)state;
    struct chat_msg msgs[] = {{"user", "hi", 2}, {"assistant", "hello", 5}, {"user", "a\"b\nc", 5}};
    size_t len;
    char *body = chat_request_new("gpt-x", 7, msgs, 3, &len);
    assert_int_equal(strlen(body), len);
    json_t *j = json_loads(body, 0, NULL);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "model")), "gpt-x");
    assert_int_equal(json_integer_value(json_object_get(j, "max_tokens")), 7);
    json_t *m = json_object_get(j, "messages");
    assert_int_equal(json_array_size(m), 3);
    assert_string_equal(json_string_value(json_object_get(json_array_get(m, 1), "role")), "assistant");
    assert_string_equal(json_string_value(json_object_get(json_array_get(m, 2), "content")), "a\"b\nc");
    json_decref(j);
    free(body);

    body = chat_request_new("m", 0, msgs, 1, &len);
    j = json_loads(body, 0, NULL);
    assert_null(json_object_get(j, "max_tokens")); /* 0: not sent */
    json_decref(j);
    free(body);
}

/* The request body is written without jansson: it must be what json_dumps(JSON_COMPACT) writes. */
static void test_request_same_as_jansson(void **state)
{
    (void)state;
    static const char tricky[] = "q\"b\\s/\x01\x1f\b\f\n\r\t\x7f \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80 \0nul";
    struct chat_msg msgs[] = {{"system", "be brief", 8}, {"user", tricky, sizeof tricky - 1}, {"assistant", "", 0}};
    struct chat_opts opts[] = {
        {.max_tokens = 0, .temperature = -1, .top_p = -1},
        {.max_tokens = 64, .temperature = 0.7, .top_p = 1, .stream = true},
        {.max_tokens = 1, .temperature = 0, .top_p = 0.123456789012345},
    };
    for (size_t k = 0; k < sizeof opts / sizeof opts[0]; k++) {
        const struct chat_opts *o = &opts[k];
        json_t *arr = json_array();
        for (size_t i = 0; i < 3; i++)
            json_array_append_new(
                arr, json_pack("{s:s, s:s%}", "role", msgs[i].role, "content", msgs[i].content, msgs[i].len));
        json_t *req = json_pack("{s:s, s:o}", "model", "m\"x", "messages", arr);
        if (o->max_tokens > 0)
            json_object_set_new(req, "max_tokens", json_integer(o->max_tokens));
        if (o->temperature >= 0)
            json_object_set_new(req, "temperature", json_real(o->temperature));
        if (o->top_p >= 0)
            json_object_set_new(req, "top_p", json_real(o->top_p));
        if (o->stream) {
            json_object_set_new(req, "stream", json_true());
            json_object_set_new(req, "stream_options", json_pack("{s:b}", "include_usage", 1));
        }
        char *want = json_dumps(req, JSON_COMPACT);
        json_decref(req);
        size_t len;
        char *got = chat_request_new_opts("m\"x", o, msgs, 3, &len);
        assert_int_equal(strlen(got), len);
        assert_string_equal(got, want);
        free(got);
        free(want);
    }
}

static void test_parse_ok(void **state)
{
    (void)state;
    const char *b = "{\"id\":\"x\",\"model\":\"m1\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                    "\"content\":\"Pizza.\"},\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":3,"
                    "\"completion_tokens\":2,\"total_tokens\":5}}";
    struct chat_result r;
    char err[128];
    assert_int_equal(chat_parse_response(b, strlen(b), &r, err, sizeof err), 0);
    assert_string_equal(r.content, "Pizza.");
    assert_int_equal(r.content_len, 6);
    assert_string_equal(r.finish_reason, "length");
    assert_string_equal(r.model, "m1");
    assert_int_equal(r.prompt_tokens, 3);
    assert_int_equal(r.completion_tokens, 2);
    assert_int_equal(r.total_tokens, 5);
    chat_result_free(&r);
}

static void test_parse_bad(void **state)
{
    (void)state;
    struct chat_result r;
    char err[128];
    const char *bad[] = {"not json",
                         "[]",
                         "{}",
                         "{\"choices\":[]}",
                         "{\"choices\":[{\"message\":{}}]}",
                         "{\"choices\":[{\"message\":{\"content\":5}}]}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(chat_parse_response(bad[i], strlen(bad[i]), &r, err, sizeof err), -1);
        assert_true(strlen(err) > 0);
    }
}

static void test_error_summary(void **state)
{
    (void)state;
    char out[64];
    const char *b = "{\"error\":{\"message\":\"Rate limit reached\",\"type\":\"requests\"}}";
    chat_error_summary(b, strlen(b), out, sizeof out);
    assert_string_equal(out, "Rate limit reached");
    chat_error_summary("<html>\x01oops", 11, out, sizeof out);
    assert_string_equal(out, "<html>?oops");
}

static void test_retry_after(void **state)
{
    (void)state;
    int64_t now = 1445412480000; /* Wed, 21 Oct 2015 07:28:00 GMT */
    assert_int_equal(llm_parse_retry_after("3", "", now), 3000);
    assert_int_equal(llm_parse_retry_after("3", "250", now), 250); /* retry-after-ms wins */
    assert_int_equal(llm_parse_retry_after("", "", now), -1);
    assert_int_equal(llm_parse_retry_after(NULL, NULL, now), -1);
    assert_int_equal(llm_parse_retry_after("soon", "", now), -1);
    assert_int_equal(llm_parse_retry_after("-5", "", now), -1);
    assert_int_equal(llm_parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", "", now), 10000);
    assert_int_equal(llm_parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", "", now), 0); /* in the past */
}

/* chat_parse_response as it was: a jansson tree of the whole answer. The reader must give the same result. */
static int ref_parse(const char *body, size_t len, struct chat_result *out)
{
    memset(out, 0, sizeof *out);
    json_t *root = json_loadb(body, len, 0, NULL);
    if (!root || !json_is_object(root)) {
        json_decref(root);
        return -1;
    }
    json_t *choice = json_array_get(json_object_get(root, "choices"), 0);
    json_t *content = json_object_get(json_object_get(choice, "message"), "content");
    if (!choice || !(json_is_string(content) || json_is_null(content))) {
        json_decref(root);
        return -2;
    }
    out->content_len = json_is_string(content) ? json_string_length(content) : 0;
    out->content = strndup(json_is_string(content) ? json_string_value(content) : "", out->content_len);
    const char *fr = json_string_value(json_object_get(choice, "finish_reason"));
    out->finish_reason = strdup(fr ? fr : "");
    const char *model = json_string_value(json_object_get(root, "model"));
    out->model = strdup(model ? model : "");
    json_t *usage = json_object_get(root, "usage");
    out->prompt_tokens = (long)json_integer_value(json_object_get(usage, "prompt_tokens"));
    out->completion_tokens = (long)json_integer_value(json_object_get(usage, "completion_tokens"));
    out->total_tokens = (long)json_integer_value(json_object_get(usage, "total_tokens"));
    if (out->total_tokens == 0)
        out->total_tokens = out->prompt_tokens + out->completion_tokens;
    json_decref(root);
    return 0;
}

static void check_same_parse(const char *b, size_t len)
{
    struct chat_result r, want;
    char err[128];
    int rc = chat_parse_response(b, len, &r, err, sizeof err);
    int wrc = ref_parse(b, len, &want);
    if ((rc == 0) != (wrc == 0))
        fail_msg("%.*s: %d, want %d", (int)len, b, rc, wrc);
    if (rc == 0) {
        if (r.content_len != want.content_len || memcmp(r.content, want.content, r.content_len) ||
            strcmp(r.finish_reason, want.finish_reason) || strcmp(r.model, want.model) ||
            r.prompt_tokens != want.prompt_tokens || r.completion_tokens != want.completion_tokens ||
            r.total_tokens != want.total_tokens)
            fail_msg("%.*s: a different result", (int)len, b);
    } else {
        /* the two errors: not an object, or no content */
        assert_string_equal(err, wrc == -1 ? "the LLM answered something that is not a JSON object"
                                           : "the LLM's answer has no choices[0].message.content");
    }
    chat_result_free(&r);
    chat_result_free(&want);
}

static void test_parse_same_as_jansson(void **state)
{
    (void)state;
    const char *cases[] = {
        "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1795782695,\"model\":\"fake\",\"choices\":"
        "[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"echo: hi [messages=1]\",\"refusal\":null},"
        "\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":3,"
        "\"total_tokens\":4}}",
        " {\"choices\":[{\"message\":{\"content\":\"a\\nb\\\"c\\\\d\\/e\\tf\"}}],\"model\":\"m\\u00e9\"} ",
        "{\"choices\":[{\"message\":{\"content\":\"caf\xc3\xa9 \\u00e9 \\ud83d\\ude00\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":null},\"finish_reason\":null}],\"usage\":{\"prompt_tokens\":2.0,"
        "\"completion_tokens\":-3,\"total_tokens\":0}}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"choices\":[]}",
        "{\"choices\":[],\"choices\":[{\"message\":{\"content\":\"x\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"},\"message\":5}]}",
        "{\"choices\":[{\"message\":5,\"message\":{\"content\":\"y\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"x\",\"content\":[1]}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":{\"total_tokens\":9},\"usage\":{\"prompt_tokens\":"
        "1}}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":{\"total_tokens\":9},\"usage\":[]}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"model\":\"a\",\"model\":7}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"m\\u006fdel\":\"esc\"}",
        "{\"choices\":[[{\"message\":{\"content\":\"x\"}}]]}",
        "{\"choices\":{\"0\":{\"message\":{\"content\":\"x\"}}}}",
        "{\"choices\":[5,{\"message\":{\"content\":\"x\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}},{\"message\":{\"content\":\"y\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":123456789012345678901}}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":9223372036854775807}}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"n\":1e999}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"n\":1e-999}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],\"n\":[1.5e10,-0,0.25,true,false,null,{}]}",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}]} x",
        "{\"choices\":[{\"message\":{\"content\":\"x\"}}],}",
        "{\"choices\":[{\"message\":{\"content\":\"x\\u0000\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"\xff\"}}]}",
        "{\"choices\":[{\"message\":{\"content\":\"\"}}],\"model\":\"\"}",
        "{\"a\":01}",
        "[{\"choices\":[{\"message\":{\"content\":\"x\"}}]}]",
        "\"x\"",
        "",
        "{}",
        "{\"error\":{\"message\":\"nope\"}}",
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_same_parse(cases[i], strlen(cases[i]));
    /* every prefix of the first answer, and random byte changes in it */
    const char *a = cases[0];
    size_t n = strlen(a);
    for (size_t i = 0; i <= n; i++)
        check_same_parse(a, i);
    char m[512];
    static const char bytes[] = "{}[]\",:\\0123456789.eE-+ tnfulx\x01\xc3";
    srand(7);
    for (int i = 0; i < 20000; i++) {
        memcpy(m, a, n);
        for (int k = rand() % 3; k >= 0; k--)
            m[rand() % n] = bytes[rand() % (sizeof bytes - 1)];
        check_same_parse(m, n);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_request),
        cmocka_unit_test(test_request_same_as_jansson),
        cmocka_unit_test(test_parse_ok),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_error_summary),
        cmocka_unit_test(test_retry_after),
        cmocka_unit_test(test_parse_same_as_jansson),
    };
    return cmocka_run_group_tests_name("llm", tests, NULL, NULL);
}
