/* Unit tests of the arena reply objects (store/reply.c): a reader using them must build the same replies as
 * hiredis' own functions, for every kind of reply, strings larger than a block, replies fed a byte at a time and
 * replies abandoned half-read (ASan checks that nothing leaks or is freed twice). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "store/reply.h"

#include <hiredis/hiredis.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Asserts that a and b are the same reply, recursively. */
static void assert_same(const redisReply *a, const redisReply *b)
{
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(a->type, b->type);
    switch (a->type) {
    case REDIS_REPLY_INTEGER:
        assert_int_equal(a->integer, b->integer);
        break;
    case REDIS_REPLY_STRING:
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_ERROR:
        assert_int_equal(a->len, b->len);
        assert_memory_equal(a->str, b->str, a->len);
        assert_int_equal(a->str[a->len], '\0');
        break;
    case REDIS_REPLY_ARRAY:
        assert_int_equal(a->elements, b->elements);
        for (size_t i = 0; i < a->elements; i++)
            assert_same(a->element[i], b->element[i]);
        break;
    default:
        break;
    }
}

/* Parses resp with both readers, fed step bytes at a time, and compares; returns how many replies it held. */
static int check_resp(const char *resp, size_t len, size_t step)
{
    redisReader *plain = redisReaderCreate(), *arena = redisReaderCreate();
    reply_arena_use(arena);
    int n = 0;
    for (size_t off = 0; off < len; off += step) {
        size_t k = len - off < step ? len - off : step;
        assert_int_equal(redisReaderFeed(plain, resp + off, k), REDIS_OK);
        assert_int_equal(redisReaderFeed(arena, resp + off, k), REDIS_OK);
        for (;;) {
            void *a = NULL, *b = NULL;
            assert_int_equal(redisReaderGetReply(plain, &a), REDIS_OK);
            assert_int_equal(redisReaderGetReply(arena, &b), REDIS_OK);
            assert_true((a == NULL) == (b == NULL));
            if (!a)
                break;
            assert_same(a, b);
            freeReplyObject(a);
            arena->fn->freeObject(b);
            n++;
        }
    }
    redisReaderFree(plain);
    redisReaderFree(arena); /* a reply left half-read is freed here */
    return n;
}

static void test_every_kind(void **state)
{
    (void)state;
    static const char resp[] = "+OK\r\n"
                               "-ERR wrong\r\n"
                               ":-42\r\n"
                               "$5\r\nhello\r\n"
                               "$0\r\n\r\n"
                               "$-1\r\n"
                               "*-1\r\n"
                               "*0\r\n"
                               "*4\r\n$5\r\nturns\r\n$1\r\n1\r\n$9\r\nt1.status\r\n$8\r\ncomplete\r\n"
                               "*2\r\n:7\r\n*3\r\n*2\r\n$3\r\n0-1\r\n*2\r\n$1\r\nk\r\n$1\r\nq\r\n$-1\r\n*0\r\n"
                               "$3\r\na\0b\r\n";
    for (size_t step = 1; step <= sizeof resp; step++)
        assert_int_equal(check_resp(resp, sizeof resp - 1, step), 11);
}

static void test_large(void **state)
{
    (void)state;
    /* a conversation-like hash whose strings outgrow the first block, then a string alone bigger than a block */
    size_t cap = 1 << 20, len = 0;
    char *resp = malloc(cap);
    len += (size_t)snprintf(resp + len, cap - len, "*600\r\n");
    for (int i = 0; i < 300; i++) {
        char field[32], value[200];
        int fl = snprintf(field, sizeof field, "t%d.response", i);
        memset(value, 'a' + i % 26, sizeof value);
        len += (size_t)snprintf(resp + len, cap - len, "$%d\r\n%s\r\n$%zu\r\n", fl, field, sizeof value);
        memcpy(resp + len, value, sizeof value);
        len += sizeof value;
        memcpy(resp + len, "\r\n", 2);
        len += 2;
    }
    size_t big = 100000;
    len += (size_t)snprintf(resp + len, cap - len, "$%zu\r\n", big);
    memset(resp + len, 'z', big);
    len += big;
    memcpy(resp + len, "\r\n", 2);
    len += 2;
    assert_int_equal(check_resp(resp, len, len), 2);
    assert_int_equal(check_resp(resp, len, 4093), 2);
    free(resp);
}

static void test_half_read(void **state)
{
    (void)state;
    /* hiredis frees a half-built reply when the reader is freed, or when the stream turns out malformed */
    static const char partial[] = "*3\r\n$3\r\nabc\r\n*2\r\n:1\r\n";
    assert_int_equal(check_resp(partial, sizeof partial - 1, 5), 0);
    redisReader *r = redisReaderCreate();
    reply_arena_use(r);
    static const char bad[] = "*2\r\n$1\r\nx\r\n!oops\r\n";
    assert_int_equal(redisReaderFeed(r, bad, sizeof bad - 1), REDIS_OK);
    void *reply = NULL;
    assert_int_equal(redisReaderGetReply(r, &reply), REDIS_ERR);
    assert_null(reply);
    redisReaderFree(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_kind),
        cmocka_unit_test(test_large),
        cmocka_unit_test(test_half_read),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
