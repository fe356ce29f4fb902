/* Unit tests of the allocation-free query reader of /polling (api_query_value): on chosen and on random query
 * strings it must find what libevent's evhttp_parse_query_str and evhttp_find_header (http_query) find. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/util.h"
#include "http/api_internal.h"

#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *names[] = {"conversationId", "conversation_id", "wait", "a"};

static int found_some; /* queries in which libevent found one of the names: the random test must make some */

/* Asserts that api_query_value agrees with libevent on every name for query q. */
static void check_query(const char *q)
{
    struct evkeyvalq params;
    params.tqh_first = NULL;
    params.tqh_last = &params.tqh_first;
    bool parsed = evhttp_parse_query_str(q, &params) == 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *want = parsed ? evhttp_find_header(&params, names[i]) : NULL;
        char out[64];
        size_t full = 0;
        bool got = api_query_value(q, names[i], out, sizeof out, &full);
        if (got != (want != NULL))
            fail_msg("query '%s', name %s: found %d, libevent %d", q, names[i], got, want != NULL);
        if (!want)
            continue;
        found_some++;
        if (full < sizeof out) {
            if (strcmp(out, want) != 0)
                fail_msg("query '%s', name %s: '%s', libevent '%s'", q, names[i], out, want);
        } else { /* cut short: the caller then asks http_query; what fits must agree */
            assert_int_equal(strlen(out), sizeof out - 1);
            assert_true(strncmp(out, want, sizeof out - 1) == 0 || strlen(want) < sizeof out - 1);
        }
    }
    evhttp_clear_headers(&params);
}

static void test_chosen(void **state)
{
    (void)state;
    static const char *queries[] = {
        "",
        "conversationId=abc",
        "conversationId=abc&wait=5",
        "wait=5&conversationId=abc&",
        "CONVERSATIONID=upper&conversationid=lower",
        "conversationId=first&conversationId=second",
        "conversation_id=x&conversationId=y",
        "conversationId=",
        "conversationId",
        "conversationId=abc&broken",
        "conversationId=abc&&wait=1",
        "&conversationId=abc",
        "=x&conversationId=abc",
        "conversationId=a=b=c",
        "conversationId=%41%62%2d%5F&wait=%31%30",
        "conversationId=%4&wait=%",
        "conversationId=%zz%4G%%41",
        "conversationId=a+b%20c?d",
        "conversationId=abc%00def",
        "conversationId%3D=abc",
        "wait=+5",
        "wait=5%",
        "wait=05%41",
        "conversationId=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "conversationId=%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61"
        "%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61%61",
        "a=1",
        "A=2&a=3",
    };
    for (size_t i = 0; i < sizeof queries / sizeof queries[0]; i++)
        check_query(queries[i]);
}

/* Appends p to q (of size 256), if it fits. */
static void append(char *q, const char *p)
{
    size_t len = strlen(q), pl = strlen(p);
    if (len + pl < 256)
        memcpy(q + len, p, pl + 1);
}

/* Appends a random pick of pieces to q. */
static void append_random(char *q, const char *const *pieces, size_t npieces)
{
    append(q, pieces[rand_below(npieces)]);
}

static void test_random(void **state)
{
    (void)state;
    /* mostly well-formed pairs, with now and then a pair that libevent refuses */
    static const char *keys[] = {"conversationId", "conversation_id", "wait", "WAIT", "a", "A", "x", "", "a=b"};
    static const char *values[] = {"abc", "%41", "%4", "%", "+", "?", "%00", "%2B", "=", "5", "%zz", ""};
    static const char *seps[] = {"=", "=", "=", "=", "=", "=", "=", "=", "=", "=", "=", ""};
    char q[256];
    found_some = 0;
    for (int round = 0; round < 20000; round++) {
        q[0] = '\0';
        size_t pairs = rand_below(4);
        for (size_t k = 0; k < pairs; k++) {
            if (k)
                append(q, "&");
            append_random(q, keys, sizeof keys / sizeof keys[0]);
            append_random(q, seps, sizeof seps / sizeof seps[0]);
            for (size_t v = rand_below(4); v; v--)
                append_random(q, values, sizeof values / sizeof values[0]);
        }
        if (rand_below(8) == 0)
            append(q, "&");
        check_query(q);
    }
    assert_true(found_some > 1000);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chosen),
        cmocka_unit_test(test_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
