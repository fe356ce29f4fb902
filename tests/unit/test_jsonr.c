/* Unit tests of the fast JSON reader (src/core/jsonr.c): on every text it must give what json_loadb gives, the
 * same value written the same way, or the same error. Hand-picked texts at the edges of the grammar, then many
 * random mutations of them. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "core/jsonr.h"
#include "core/util.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const TEXTS[] = {
    "{}",
    "[]",
    " {\"a\":1} ",
    "\t\r\n[\n1 , 2 ]\n",
    "{\"model\":\"fake\",\"input\":\"hello\",\"background\":true}",
    "{\"a\":{\"b\":[1,2,{\"c\":null}]},\"d\":false,\"e\":true}",
    "{\"a\":1,\"a\":2,\"b\":3,\"a\":4}",
    "{\"\":\"\"}",
    "{\"s\":\"h\\u00e9llo \\\"w\\\" \\\\ \\/ \\b\\f\\n\\r\\t \\ud83c\\udf89 \\u2028 \\u001f\"}",
    "{\"s\":\"h\xc3\xa9 \xe4\xb8\x96 \xf0\x9f\x8e\x89\"}",
    "{\"k\\u00e9y\\n\":1}",
    "[\"\\u0000\"]",
    "[\"\\ud83c\"]",
    "[\"\\udf89\"]",
    "[\"\\ud83c\\u0041\"]",
    "[\"\\ud83cx\"]",
    "[\"\\uZZZZ\"]",
    "[\"\\u12\"]",
    "[\"\\x\"]",
    "[\"a\tb\"]",
    "[\"a\nb\"]",
    "[\"\xc3\"]",
    "[\"\xc0\xaf\"]",
    "[\"\xed\xa0\x80\"]",
    "[\"\xf4\x90\x80\x80\"]",
    "[\"a\\",
    "[\"a",
    "[0]",
    "[-0]",
    "[-0.0]",
    "[0.5]",
    "[1e5]",
    "[1E+5]",
    "[1e-5]",
    "[1.0]",
    "[-1]",
    "[01]",
    "[1.]",
    "[.5]",
    "[1.e5]",
    "[1e]",
    "[1e+]",
    "[-]",
    "[+1]",
    "[1.2.3]",
    "[9223372036854775807]",
    "[9223372036854775808]",
    "[-9223372036854775808]",
    "[-9223372036854775809]",
    "[1e308]",
    "[1e309]",
    "[-1e309]",
    "[1e-400]",
    "[0.1000000000000000055511151231257827]",
    "[123456789012345678901234567890123456789012345678901234567890123456789]",
    "[true]",
    "[false]",
    "[null]",
    "[tru]",
    "[truex]",
    "[nul]",
    "[True]",
    "1",
    "\"s\"",
    "null",
    "true",
    "",
    " ",
    "{",
    "}",
    "[",
    "]",
    "{\"a\"}",
    "{\"a\":}",
    "{\"a\":1,}",
    "[1,]",
    "[,1]",
    "{,}",
    "{\"a\" 1}",
    "{a:1}",
    "{'a':1}",
    "[1 2]",
    "{}x",
    "[] []",
    "{} ",
    "\xef\xbb\xbf{}",
    "[1]\0",
    "{\"a\":1}\n\n",
    "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]",
    "[\"\x7f\"]",
    "{\"a\":\"b\",\"c\":[1.5,-2,3e2,{\"d\":\"\\\"\"}]}",
};

static char *dump(const json_t *v)
{
    return json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
}

/* Both readers on s[0..n): the same value (types and member order included), or the same error. */
static void same(const char *s, size_t n)
{
    json_error_t e1, e2;
    json_t *a = json_loadb(s, n, 0, &e1);
    json_t *b = jsonr_loadb(s, n, &e2);
    if (!a || !b) {
        if (a || b)
            fail_msg("one reader failed on [%.*s]: jansson %s, jsonr %s", (int)n, s, a ? "ok" : e1.text,
                     b ? "ok" : e2.text);
        assert_string_equal(e1.text, e2.text);
        assert_int_equal(e1.position, e2.position);
        return;
    }
    char *da = dump(a), *db = dump(b);
    if (strcmp(da, db) != 0)
        fail_msg("[%.*s]: jansson %s, jsonr %s", (int)n, s, da, db);
    free(da);
    free(db);
    json_decref(a);
    json_decref(b);
}

static void test_texts(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof TEXTS / sizeof TEXTS[0]; i++)
        same(TEXTS[i], strlen(TEXTS[i]));
    same("[1]\0", 4);
    same("[\"a\0b\"]", 7);
    char deep[300];
    for (int d = 60; d < 70; d++) { /* about jsonr's depth limit */
        memset(deep, '[', (size_t)d);
        memset(deep + d, ']', (size_t)d);
        same(deep, 2 * (size_t)d);
    }
}

/* Random byte changes, insertions and deletions of the texts above: most are invalid in some new way. */
static void test_mutations(void **state)
{
    (void)state;
    static const char alphabet[] = "{}[]\":,\\u0123456789abcdefABCDEF.eE+- \t\n\r\x01\x7f\xc3\xa9\xed\xf0tfn";
    char m[512];
    for (int round = 0; round < 200000; round++) {
        const char *s = TEXTS[rand_below(sizeof TEXTS / sizeof TEXTS[0])];
        size_t n = strlen(s);
        memcpy(m, s, n);
        for (int k = (int)rand_below(3) + 1; k > 0; k--) {
            size_t at = n ? rand_below(n + 1) : 0;
            char c = alphabet[rand_below(sizeof alphabet - 1)];
            switch (rand_below(3)) {
            case 0: /* change */
                if (at < n)
                    m[at] = c;
                break;
            case 1: /* insert */
                if (n + 1 < sizeof m) {
                    memmove(m + at + 1, m + at, n - at);
                    m[at] = c;
                    n++;
                }
                break;
            default: /* delete */
                if (at < n) {
                    memmove(m + at, m + at + 1, n - at - 1);
                    n--;
                }
            }
        }
        same(m, n);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_texts),
        cmocka_unit_test(test_mutations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
