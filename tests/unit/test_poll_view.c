/* Unit tests of the /polling view written as text (api_conv_view_write): for every shape of conversation it
 * must write exactly what the jansson tree (api_conv_view) gives through jsonw, which is what /polling answered
 * before the writer existed; and it must give up where jansson's rules decide (strings that are not UTF-8). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/jsonw.h"
#include "core/util.h"
#include "http/api_internal.h"
#include "store/store.h"

#include <jansson.h>

#include <stdlib.h>
#include <string.h>

/* Asserts that the text writer and the tree agree on conv. */
static void check_same(const struct conv *conv)
{
    json_t *v = api_conv_view(conv);
    assert_non_null(v);
    char *want = jsonw_dumps(v, NULL);
    json_decref(v);
    assert_non_null(want);
    struct buf b;
    buf_init(&b, 1 << 20);
    assert_int_equal(api_conv_view_write(&b, conv), 0);
    assert_string_equal(b.data, want);
    long turn;
    const char *status = api_conv_poll_status(conv, &turn);
    json_t *back = json_loads(b.data, 0, NULL);
    assert_non_null(back);
    assert_string_equal(json_string_value(json_object_get(back, "status")), status);
    assert_int_equal(json_integer_value(json_object_get(back, "turn")), turn);
    json_decref(back);
    buf_free(&b);
    free(want);
}

static struct turn complete_turn(void)
{
    struct turn t = {.status = TURN_COMPLETE,
                     .prompt = "What is your favorite food?",
                     .response = "echo: What is your favorite food? [messages=1]",
                     .model = "fake",
                     .finish_reason = "stop",
                     .prompt_tokens = 6,
                     .completion_tokens = 9,
                     .total_tokens = 15};
    t.prompt_len = strlen(t.prompt);
    t.response_len = strlen(t.response);
    return t;
}

static void test_every_status(void **state)
{
    (void)state;
    static const enum turn_status all[] = {TURN_NONE,   TURN_PENDING,  TURN_IN_PROGRESS, TURN_COMPLETE,
                                           TURN_FAILED, TURN_REJECTED, TURN_CANCELLED,   TURN_DELETED};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        struct turn turns[2] = {{0}, complete_turn()};
        turns[1].status = all[i];
        turns[1].error_code = all[i] == TURN_FAILED ? "llm_error" : NULL;
        turns[1].error_message = all[i] == TURN_FAILED ? "the model said \"no\"" : NULL;
        struct conv conv = {
            .id = "hQ3k-_0", .nturns = 1, .turn = turns, .created_at = 1700000000123, .updated_at = 1700000000456};
        check_same(&conv);
    }
}

static void test_no_turn_and_defaults(void **state)
{
    (void)state;
    struct conv empty = {.id = "abc", .nturns = 0, .turn = NULL};
    check_same(&empty);
    /* a complete turn with nothing but its status; a failed one without a code or message */
    struct turn turns[3] = {{0}, {.status = TURN_COMPLETE}, {.status = TURN_FAILED}};
    struct conv conv = {.id = "abc", .nturns = 1, .turn = turns, .created_at = -5, .updated_at = 0};
    check_same(&conv);
    conv.nturns = 2;
    check_same(&conv);
}

static void test_current_turn(void **state)
{
    (void)state;
    /* the view shows the highest turn that is neither rejected nor deleted */
    struct turn turns[5] = {{0}, complete_turn(), complete_turn(), complete_turn(), complete_turn()};
    turns[2].status = TURN_PENDING;
    turns[3].status = TURN_REJECTED;
    turns[4].status = TURN_DELETED;
    struct conv conv = {.id = "abc", .nturns = 4, .turn = turns, .created_at = 1, .updated_at = 2};
    check_same(&conv);
    turns[2].status = TURN_COMPLETE;
    turns[2].response = "two";
    turns[2].response_len = 3;
    check_same(&conv);
}

static void test_escapes_and_numbers(void **state)
{
    (void)state;
    struct turn turns[2] = {{0}, complete_turn()};
    static const char prompt[] = "quote \" backslash \\ slash / tab \t nl \n cr \r ctl \x01\x1f del \x7f "
                                 "utf-8 \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80 u2028 \xe2\x80\xa8";
    turns[1].prompt = prompt;
    turns[1].prompt_len = sizeof prompt - 1;
    turns[1].response = "line 1\nline 2\b\f";
    turns[1].response_len = strlen(turns[1].response);
    turns[1].model = "m\"odel";
    turns[1].finish_reason = "len\\gth";
    turns[1].prompt_tokens = -1;
    turns[1].completion_tokens = 2147483647;
    turns[1].total_tokens = 4294967298; /* truncated to int, as json_pack's "i" */
    struct conv conv = {.id = "x", .nturns = 1, .turn = turns, .created_at = INT64_MAX, .updated_at = INT64_MIN};
    check_same(&conv);
    /* the response counts by its length, not up to a NUL */
    turns[1].response = "abcdef";
    turns[1].response_len = 3;
    check_same(&conv);
}

static void test_moderation(void **state)
{
    (void)state;
    struct turn turns[2] = {{0}, complete_turn()};
    struct conv conv = {.id = "m", .nturns = 1, .turn = turns, .created_at = 1, .updated_at = 2};
    static const char *verdicts[] = {
        "{\"flagged\":true,\"categories\":[\"violence\",\"x\\\"y\"],\"checked_at\":1700000000000,\"score\":0.25}",
        "{ \"b\" : 1 , \"a\" : [ ] , \"n\" : null, \"t\": false, \"big\": 1e300 }",
        "[1, 2]", /* not an object: no moderation member */
        "not json",
        "",
    };
    for (size_t i = 0; i < sizeof verdicts / sizeof verdicts[0]; i++) {
        turns[1].moderation = verdicts[i];
        check_same(&conv);
        turns[1].status = TURN_PENDING;
        check_same(&conv);
        turns[1].status = TURN_COMPLETE;
    }
}

static void test_gives_up_on_invalid_utf8(void **state)
{
    (void)state;
    struct turn turns[2] = {{0}, complete_turn()};
    struct conv conv = {.id = "u", .nturns = 1, .turn = turns};
    struct buf b;
    buf_init(&b, 1 << 20);
    turns[1].response = "bad \xff byte";
    turns[1].response_len = strlen(turns[1].response);
    assert_int_equal(api_conv_view_write(&b, &conv), -1);
    turns[1] = complete_turn();
    turns[1].model = "\xc3";
    buf_reset(&b);
    assert_int_equal(api_conv_view_write(&b, &conv), -1);
    turns[1] = complete_turn();
    turns[1].prompt = "nul \0 inside";
    turns[1].prompt_len = 12;
    buf_reset(&b);
    assert_int_equal(api_conv_view_write(&b, &conv), -1);
    /* and the limit of the buffer is honoured */
    struct buf small;
    buf_init(&small, 16);
    turns[1] = complete_turn();
    assert_int_equal(api_conv_view_write(&small, &conv), -1);
    assert_true(small.len <= 16);
    buf_free(&small);
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_status), cmocka_unit_test(test_no_turn_and_defaults),
        cmocka_unit_test(test_current_turn), cmocka_unit_test(test_escapes_and_numbers),
        cmocka_unit_test(test_moderation),   cmocka_unit_test(test_gives_up_on_invalid_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
