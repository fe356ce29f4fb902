/* Unit tests of the pure helpers: ids, UTF-8, bounded buffers, the hash map, config loading. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/config.h"
#include "core/jsonw.h"
#include "core/map.h"
#include "core/util.h"

#include <jansson.h>

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static void check_fmt(int64_t v)
{
    char got[24], want[24];
    size_t n = fmt_i64(got, v);
    snprintf(want, sizeof want, "%lld", (long long)v);
    assert_string_equal(got, want);
    assert_int_equal(n, strlen(want));
}

static void test_conv_id(void **state)
{
    (void)state;
    char a[CONV_ID_LEN + 1], b[CONV_ID_LEN + 1];
    assert_int_equal(conv_id_new(a), 0);
    assert_int_equal(conv_id_new(b), 0);
    assert_int_equal(strlen(a), CONV_ID_LEN);
    assert_true(conv_id_valid(a, strlen(a)));
    assert_string_not_equal(a, b);
    assert_false(conv_id_valid("", 0));
    assert_false(conv_id_valid("a b", 3));
    assert_false(conv_id_valid("../etc", 6));
    assert_false(conv_id_valid("x:y", 3));
    char longid[70];
    memset(longid, 'a', 65);
    longid[65] = '\0';
    assert_false(conv_id_valid(longid, 65));
    assert_true(conv_id_valid(longid, 64));
}

static void test_utf8(void **state)
{
    (void)state;
    const char ok[] = "h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x8e\x89";
    assert_true(utf8_valid(ok, strlen(ok)));
    assert_true(utf8_valid("", 0));
    assert_false(utf8_valid("\xff", 1));
    assert_false(utf8_valid("\xc3", 1));             /* truncated */
    assert_false(utf8_valid("\xc0\xaf", 2));         /* overlong '/' */
    assert_false(utf8_valid("\xe0\x80\xaf", 3));     /* overlong */
    assert_false(utf8_valid("\xed\xa0\x80", 3));     /* surrogate U+D800 */
    assert_false(utf8_valid("\xf4\x90\x80\x80", 4)); /* above U+10FFFF */
    assert_false(utf8_valid("a\0b", 3));             /* NUL */
    assert_true(utf8_valid("\xf4\x8f\xbf\xbf", 4));  /* U+10FFFF */
    assert_false(utf8_valid("\xe4\xb8", 2));
}

static void test_non_space(void **state)
{
    (void)state;
    assert_false(has_non_space(" \t\r\n", 4));
    assert_false(has_non_space("", 0));
    assert_true(has_non_space("  x ", 4));
}

static void test_buf_limit(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b, 10);
    assert_int_equal(buf_append(&b, "hello", 5), 0);
    assert_int_equal(buf_append(&b, "world", 5), 0);
    assert_int_equal(buf_append(&b, "!", 1), -1);
    assert_int_equal(b.len, 10);
    assert_string_equal(b.data, "helloworld");
    buf_free(&b);
}

/* buf_append_json_string writes what jansson writes for the same string, and unique ids keep coming from the
 * per-thread pool (more than one refill). */
static void test_json_string(void **state)
{
    (void)state;
    static const char *cases[] = {"",
                                  "hi",
                                  "a\"b\\c/d",
                                  "line\nbreak\ttab\r\b\f",
                                  "\x01\x1f\x7f",
                                  "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
                                  "</script>"};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct buf b;
        buf_init(&b, 1000);
        assert_int_equal(buf_append(&b, "x", 1), 0);
        assert_int_equal(buf_append_json_string(&b, cases[i], strlen(cases[i])), 0);
        json_t *js = json_string(cases[i]);
        char *want = json_dumps(js, JSON_ENCODE_ANY);
        assert_string_equal(b.data + 1, want);
        free(want);
        json_decref(js);
        buf_free(&b);
    }
    /* too long for the limit: nothing appended */
    struct buf b;
    buf_init(&b, 8);
    assert_int_equal(buf_append(&b, "ab", 2), 0);
    assert_int_equal(buf_append_json_string(&b, "\n\n\n", 3), -1);
    assert_int_equal(b.len, 2);
    assert_string_equal(b.data, "ab");
    assert_int_equal(buf_printf(&b, "%d", 12345), 0);
    assert_string_equal(b.data, "ab12345");
    assert_int_equal(buf_printf(&b, "%s", "xx"), -1);
    buf_free(&b);
    static const int64_t nums[] = {0, 1, -1, 9, 10, 1234567890123LL, INT64_MAX, INT64_MIN};
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        char got[24], want[24];
        size_t n = fmt_i64(got, nums[i]);
        snprintf(want, sizeof want, "%lld", (long long)nums[i]);
        assert_string_equal(got, want);
        assert_int_equal(n, strlen(want));
    }
    for (int64_t v = -1100; v <= 1100; v++) /* every two-digit step of fmt_i64 */
        check_fmt(v);
    for (int64_t p = 10; p <= INT64_MAX / 10; p *= 10) { /* every digit count */
        check_fmt(p - 1);
        check_fmt(p);
        check_fmt(p + 1);
        check_fmt(-p);
    }
    char prev[CONV_ID_LEN + 1] = "", id[CONV_ID_LEN + 1];
    for (int i = 0; i < 200; i++) {
        assert_int_equal(conv_id_new(id), 0);
        assert_true(conv_id_valid(id, strlen(id)));
        assert_string_not_equal(id, prev);
        memcpy(prev, id, sizeof id);
    }
}

/* jsonw writes what json_dumps(JSON_COMPACT) writes. */
/* utf8_valid and buf_append_json_string look at eight bytes at a time while nothing can need attention; byte-wise
 * references (the code before that change) must agree with them on random mixes of ASCII, every escape, valid
 * and invalid UTF-8 and NUL, and on every byte value at every position of two words. */
static bool ref_utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned char c = s[i];
        if (c == 0)
            return false;
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n = c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2 : c >= 0xF0 && c <= 0xF4 ? 3 : 0;
        if (!n || len - i <= n)
            return false;
        uint32_t cp = c & (n == 1 ? 0x1F : n == 2 ? 0x0F : 0x07);
        for (size_t k = 1; k <= n; k++) {
            if ((s[i + k] & 0xC0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if ((n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
            return false;
        i += n + 1;
    }
    return true;
}

static void ref_json_string(struct buf *b, const unsigned char *u, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    buf_append(b, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = u[i];
        char e[6] = {'\\', 0};
        size_t el = 2;
        if (c == '"' || c == '\\')
            e[1] = (char)c;
        else if (c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t')
            e[1] = c == '\b' ? 'b' : c == '\f' ? 'f' : c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
        else if (c < 0x20) {
            e[1] = 'u', e[2] = '0', e[3] = '0', e[4] = hex[c >> 4], e[5] = hex[c & 15];
            el = 6;
        } else {
            buf_append(b, &u[i], 1);
            continue;
        }
        buf_append(b, e, el);
    }
    buf_append(b, "\"", 1);
}

static void check_against_refs(const unsigned char *s, size_t n)
{
    assert_int_equal(utf8_valid((const char *)s, n), ref_utf8_valid(s, n));
    struct buf got, want;
    buf_init(&got, 1 << 16);
    buf_init(&want, 1 << 16);
    assert_int_equal(buf_append_json_string(&got, (const char *)s, n), 0);
    ref_json_string(&want, s, n);
    assert_int_equal(got.len, want.len);
    assert_memory_equal(got.data, want.data, got.len);
    buf_free(&got);
    buf_free(&want);
}

static void test_word_at_a_time_matches_bytewise(void **state)
{
    (void)state;
    static const char *pieces[] = {
        "abcdefghijklmnop", "\"",           "\\",       "\n",   "\x01", "\x1f", "\x7f", "\xc3\xa9", "\xe2\x82\xac",
        "\xf0\x9f\x98\x80", "\xed\xa0\x80", "\xc0\xaf", "\xff", "\x80"};
    unsigned char s[96];
    srand(7);
    for (int t = 0; t < 100000; t++) {
        size_t n = 0;
        for (int j = rand() % 12; j > 0; j--) {
            int q = rand() % 16;
            const char *p = q < 14 ? pieces[q] : "";
            size_t pl = q == 0 ? (size_t)(rand() % 17) : q < 14 ? strlen(p) : 1; /* 14, 15: a NUL */
            if (n + pl > sizeof s)
                break;
            memcpy(s + n, p, pl);
            n += pl;
        }
        check_against_refs(s, n);
    }
    for (int c = 0; c < 256; c++)
        for (size_t pos = 0; pos < 16; pos++) {
            memset(s, 'a', 16);
            s[pos] = (unsigned char)c;
            check_against_refs(s, 16);
            check_against_refs(s + 1, 15);
        }
}

static void test_jsonw(void **state)
{
    (void)state;
    static const char *docs[] = {
        "{}",
        "[]",
        "null",
        "true",
        "\"x\"",
        "0",
        "-12",
        "1.5",
        "1e300",
        "2.0",
        "-0.25",
        "{\"a\":1,\"b\":[true,false,null,\"s\\\"q\\n\\u0001\"],\"c\":{\"d\":{},\"e\":[]}}",
        "{\"z\":1,\"a\":2,\"m\":3}", /* insertion order kept */
        "{\"caf\u00e9 \\u20ac\":\"\\ud83d\\ude00 </x>\",\"n\":9223372036854775807,\"r\":0.1}",
    };
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        json_error_t err;
        json_t *v = json_loads(docs[i], JSON_DECODE_ANY, &err);
        assert_non_null(v);
        char *want = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        size_t len = 0;
        char *got = jsonw_dumps(v, &len);
        assert_string_equal(got, want);
        assert_int_equal(len, strlen(want));
        free(want);
        free(got);
        json_decref(v);
    }
    /* too deep: refused, not a stack overflow */
    json_t *deep = json_array();
    for (int i = 0; i < 100; i++) {
        json_t *outer = json_array();
        json_array_append_new(outer, deep);
        deep = outer;
    }
    assert_null(jsonw_dumps(deep, NULL));
    json_decref(deep);
}

static void test_map(void **state)
{
    (void)state;
    struct map *m = map_new();
    char keys[1000][16];
    for (int i = 0; i < 1000; i++) {
        snprintf(keys[i], sizeof keys[i], "k%d", i);
        assert_null(map_put(m, keys[i], (void *)(intptr_t)(i + 1)));
    }
    assert_int_equal(map_count(m), 1000);
    for (int i = 0; i < 1000; i++)
        assert_int_equal((intptr_t)map_get(m, keys[i]), i + 1);
    assert_null(map_get(m, "missing"));
    assert_int_equal((intptr_t)map_del(m, "k500"), 501);
    assert_null(map_get(m, "k500"));
    assert_null(map_del(m, "k500"));
    assert_int_equal(map_count(m), 999);
    map_free(m);
}

static void test_rand_below(void **state)
{
    (void)state;
    int seen[4] = {0};
    for (int i = 0; i < 4000; i++) {
        uint64_t v = rand_below(4);
        assert_true(v < 4);
        seen[v]++;
    }
    for (int i = 0; i < 4; i++)
        assert_true(seen[i] > 500); /* roughly uniform, not a constant */
}

static void test_config_defaults_env_flags(void **state)
{
    (void)state;
    struct config cfg;
    char err[256];
    setenv("ASYNCLLM_HTTP_PORT", "9999", 1);
    setenv("ASYNCLLM_MAX_IN_FLIGHT", "10", 1);
    char a0[] = "asyncllm", a1[] = "api", a2[] = "--max-in-flight=20", a3[] = "--llm-model", a4[] = "m", a5[] = "-X",
         a6[] = "linger.ms=5";
    char *argv[] = {a0, a1, a2, a3, a4, a5, a6};
    assert_int_equal(config_load(&cfg, 7, argv, 2, err, sizeof err), 0);
    assert_int_equal(cfg.http_port, 9999);   /* from the environment */
    assert_int_equal(cfg.max_in_flight, 20); /* the flag wins */
    assert_string_equal(cfg.llm_model, "m");
    assert_string_equal(cfg.topic_prompts, "async_user_prompt");
    assert_int_equal(cfg.max_buffered, 80); /* derived: 4 x max-in-flight */
    assert_int_equal(cfg.kafka_nprops, 1);
    assert_string_equal(cfg.kafka_props[0][0], "linger.ms");
    assert_string_equal(cfg.kafka_props[0][1], "5");
    unsetenv("ASYNCLLM_HTTP_PORT");
    unsetenv("ASYNCLLM_MAX_IN_FLIGHT");
}

static void test_config_errors(void **state)
{
    (void)state;
    struct config cfg;
    char err[256];
    char a0[] = "asyncllm", a1[] = "api", bad1[] = "--no-such=1", bad2[] = "--http-port=70000",
         bad3[] = "--http-port=12x", bad4[] = "stray";
    char *v1[] = {a0, a1, bad1};
    assert_int_equal(config_load(&cfg, 3, v1, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "unknown setting"));
    char *v2[] = {a0, a1, bad2};
    assert_int_equal(config_load(&cfg, 3, v2, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "outside"));
    char *v3[] = {a0, a1, bad3};
    assert_int_equal(config_load(&cfg, 3, v3, 2, err, sizeof err), -1);
    assert_non_null(strstr(err, "not an integer"));
    char *v4[] = {a0, a1, bad4};
    assert_int_equal(config_load(&cfg, 3, v4, 2, err, sizeof err), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_conv_id),       cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_non_space),     cmocka_unit_test(test_buf_limit),
        cmocka_unit_test(test_json_string),   cmocka_unit_test(test_word_at_a_time_matches_bytewise),
        cmocka_unit_test(test_jsonw),         cmocka_unit_test(test_map),
        cmocka_unit_test(test_rand_below),    cmocka_unit_test(test_config_defaults_env_flags),
        cmocka_unit_test(test_config_errors),
    };
    return cmocka_run_group_tests_name("util", tests, NULL, NULL);
}
