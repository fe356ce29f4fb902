/* Unit tests of the SSE parser and the streamed chunk folding, fed in every possible split. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "llm/chat.h"
#include "llm/sse.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct got {
    char events[16][256];
    int n;
};

static int collect(void *arg, const char *data, size_t len)
{
    struct got *g = arg;
    assert_true(g->n < 16);
    snprintf(g->events[g->n++], 256, "%.*s", (int)len, data);
    return 0;
}

static const char stream[] = ": keep-alive\r\n"
                             "data: {\"a\":1}\r\n\r\n"
                             "event: ignored\n"
                             "data: line1\n"
                             "data: line2\n\n"
                             "data:[DONE]\r\r";

static void check(const struct got *g)
{
    assert_int_equal(g->n, 3);
    assert_string_equal(g->events[0], "{\"a\":1}");
    assert_string_equal(g->events[1], "line1\nline2");
    assert_string_equal(g->events[2], "[DONE]");
}

static void test_whole(void **state)
{
    (void)state;
    struct got g = {0};
    struct sse p;
    sse_init(&p, 1024, collect, &g);
    assert_int_equal(sse_feed(&p, stream, strlen(stream)), 0);
    check(&g);
    sse_free(&p);
}

static void test_every_split(void **state)
{
    (void)state;
    size_t len = strlen(stream);
    for (size_t a = 0; a <= len; a++) {
        for (size_t b = a; b <= len; b++) {
            struct got g = {0};
            struct sse p;
            sse_init(&p, 1024, collect, &g);
            assert_int_equal(sse_feed(&p, stream, a), 0);
            assert_int_equal(sse_feed(&p, stream + a, b - a), 0);
            assert_int_equal(sse_feed(&p, stream + b, len - b), 0);
            check(&g);
            sse_free(&p);
        }
    }
}

static void test_line_limit(void **state)
{
    (void)state;
    struct got g = {0};
    struct sse p;
    sse_init(&p, 16, collect, &g);
    assert_int_equal(sse_feed(&p, "data: 0123456789abcdefghij", 26), -1);
    sse_free(&p);
}

static void test_chunks(void **state)
{
    (void)state;
    struct chat_result r = {0};
    const char *d;
    size_t dl;
    char err[128];
    const char *c1 =
        "{\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}";
    const char *c2 = "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}";
    const char *c3 = "{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"length\"}]}";
    const char *c4 = "{\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}}";
    assert_int_equal(chat_stream_chunk(&r, c1, strlen(c1), &d, &dl, err, sizeof err), 0);
    assert_int_equal(dl, 0);
    assert_int_equal(chat_stream_chunk(&r, c2, strlen(c2), &d, &dl, err, sizeof err), 0);
    assert_int_equal(dl, 3);
    assert_memory_equal(d, "Hel", 3);
    assert_int_equal(chat_stream_chunk(&r, c3, strlen(c3), &d, &dl, err, sizeof err), 0);
    assert_int_equal(chat_stream_chunk(&r, c4, strlen(c4), &d, &dl, err, sizeof err), 0);
    assert_int_equal(chat_stream_chunk(&r, "[DONE]", 6, &d, &dl, err, sizeof err), 1);
    assert_string_equal(r.content, "Hello");
    assert_string_equal(r.finish_reason, "length");
    assert_string_equal(r.model, "m");
    assert_int_equal(r.total_tokens, 6);
    assert_int_equal(chat_stream_chunk(&r, "nope", 4, &d, &dl, err, sizeof err), -1);
    const char *e = "{\"error\":{\"message\":\"overloaded\"}}";
    assert_int_equal(chat_stream_chunk(&r, e, strlen(e), &d, &dl, err, sizeof err), -1);
    assert_non_null(strstr(err, "overloaded"));
    chat_result_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_whole),
        cmocka_unit_test(test_every_split),
        cmocka_unit_test(test_line_limit),
        cmocka_unit_test(test_chunks),
    };
    return cmocka_run_group_tests_name("sse", tests, NULL, NULL);
}
