/* util.h - small pure helpers shared by every role: ids, clocks, UTF-8, bounded buffers. */
#ifndef ASYNCLLM_UTIL_H
#define ASYNCLLM_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* A conversation id: 128 bits from getrandom(2), base64url without padding: 22 characters. */
#define CONV_ID_LEN 22
/* The characters of an id (base64url). */
extern const char conv_id_alphabet[65];
/* Writes a new id and its NUL into out (at least CONV_ID_LEN + 1 bytes). Returns 0, -1 if no randomness. */
int conv_id_new(char *out);
/* True if s looks like an id we could have issued: 1..64 characters of [A-Za-z0-9_-]. Anything else cannot name
 * a conversation and is rejected before it reaches Redis. */
bool conv_id_valid(const char *s, size_t len);

/* Writes v in decimal and a NUL into out (at least 21 bytes); returns the length. Faster than snprintf, for
 * the hot paths. */
size_t fmt_i64(char *out, int64_t v);

/* The value of a hexadecimal digit, or -1. */
static inline int hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* Wall clock in Unix milliseconds, and a monotonic clock in milliseconds. */
int64_t now_ms(void);
int64_t mono_ms(void);

/* True if s[0..len) is well-formed UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF) and has no NUL. */
bool utf8_valid(const char *s, size_t len);

/* Eight bytes at a time (scanning text for the bytes that need attention). A word flagged by word_has_less may
 * be a false alarm (a borrow from a lower byte that is a true one): callers look at a flagged word byte by byte. */
#define WORD_ONES 0x0101010101010101ull
#define WORD_HIGHS 0x8080808080808080ull
static inline uint64_t word_at(const void *p)
{
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}
/* Nonzero if some byte of x is under n (n <= 128). */
static inline uint64_t word_has_less(uint64_t x, unsigned n)
{
    return (x - WORD_ONES * n) & ~x & WORD_HIGHS;
}
/* Nonzero if some byte of x is zero. */
static inline uint64_t word_has_zero(uint64_t x)
{
    return (x - WORD_ONES) & ~x & WORD_HIGHS;
}
/* Nonzero if some byte of x is c. */
static inline uint64_t word_has_byte(uint64_t x, unsigned char c)
{
    return word_has_zero(x ^ (WORD_ONES * c));
}

/* True if s has at least one character that is not ASCII whitespace. */
bool has_non_space(const char *s, size_t len);

/* A growable byte buffer with a hard limit fixed at init (STYLE.md rule 6). Always NUL-terminated. */
struct buf {
    char *data;
    size_t len, cap, max;
};
void buf_init(struct buf *b, size_t max);
/* Room for n more bytes and the NUL (for writers that fill data + len themselves); -1 past max. */
int buf_reserve(struct buf *b, size_t n);
/* buf_append's slow path: grows the buffer first. */
int buf_append_grow(struct buf *b, const void *p, size_t n);
/* Appends n bytes; returns -1 (and appends nothing) if the result would exceed max. Inline because the writers
 * of JSON and of Redis commands append many short pieces into room already there: a call for each cost more
 * than the copy (about a tenth of a background Responses create). cap > len whenever data is set (the NUL). */
static inline int buf_append(struct buf *b, const void *p, size_t n)
{
    if (n >= b->cap - b->len || n > b->max - b->len)
        return buf_append_grow(b, p, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}
/* Appends a string literal (its length known at compile time). The "" around lit make anything but a literal a
 * compile error: sizeof of a pointer (say, of a ?: between two literals) would be silently wrong. */
#define buf_append_lit(b, lit) buf_append((b), "" lit "", sizeof(lit) - 1)
/* Appends printf-formatted text; -1 (nothing appended) past max. */
int buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s[0..n) (UTF-8) as a quoted JSON string, escaped as jansson would: ", \ and control characters. */
int buf_append_json_string(struct buf *b, const char *s, size_t n);
void buf_reset(struct buf *b);
void buf_free(struct buf *b);

/* A uniformly random integer in [0, n) (n > 0) from a per-thread xorshift seeded by getrandom. */
uint64_t rand_below(uint64_t n);

/* Allocation wrappers: on out-of-memory they log and abort (the one OOM policy, STYLE.md rule 5). */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

#endif
