/* sbuf.h - a growable string for the unit tests that build protocol streams (test_http.c, test_hiev.c).
 * Include after cmocka.h: an allocation failure fails the test. */
#ifndef ASYNCLLM_TEST_SBUF_H
#define ASYNCLLM_TEST_SBUF_H

#include <stdlib.h>
#include <string.h>

struct sbuf {
    char *p;
    size_t len, cap;
};

static inline void sb_add(struct sbuf *b, const void *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        b->p = realloc(b->p, cap);
        assert_non_null(b->p);
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static inline void sb_str(struct sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

#endif
