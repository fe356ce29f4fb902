/* util.c - see util.h. */
#include "core/util.h"

#include "core/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

const char conv_id_alphabet[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

int conv_id_new(char *out)
{
    /* 144 bits: 24 characters; we keep 22 (132 bits). Taken from a per-thread pool that one getrandom call
     * fills for 56 ids: a system call per id was 1 in 6 of a submit's. */
    static _Thread_local unsigned char pool[18 * 56];
    static _Thread_local size_t left;
    if (left < 18) {
        size_t got = 0;
        while (got < sizeof pool) {
            ssize_t n = getrandom(pool + got, sizeof pool - got, 0);
            if (n < 0)
                return -1;
            got += (size_t)n;
        }
        left = sizeof pool;
    }
    left -= 18;
    unsigned char *r = pool + left;
    for (int i = 0, o = 0; i < 18 && o < CONV_ID_LEN; i += 3) {
        uint32_t v = (uint32_t)r[i] << 16 | (uint32_t)r[i + 1] << 8 | r[i + 2];
        for (int k = 3; k >= 0 && o < CONV_ID_LEN; k--)
            out[o++] = conv_id_alphabet[(v >> (6 * k)) & 63];
    }
    out[CONV_ID_LEN] = '\0';
    memset(r, 0, 18); /* used once */
    return 0;
}

bool conv_id_valid(const char *s, size_t len)
{
    if (len == 0 || len > 64)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
            return false;
    }
    return true;
}

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool utf8_valid(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        /* ASCII without NUL, eight bytes at a time (most text, and every id and timestamp) */
        while (i + 8 <= len) {
            uint64_t x = word_at(s + i);
            if ((x & WORD_HIGHS) || word_has_zero(x))
                break;
            i += 8;
        }
        if (i >= len)
            break;
        unsigned char c = s[i];
        if (c == 0)
            return false;
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return false; /* continuation byte first, overlong 2-byte lead, or beyond U+10FFFF */
        }
        if (len - i <= n)
            return false;
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

bool has_non_space(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (!(s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' || s[i] == '\f' || s[i] == '\v'))
            return true;
    return false;
}

void buf_init(struct buf *b, size_t max)
{
    b->data = NULL;
    b->len = b->cap = 0;
    b->max = max;
}

int buf_reserve(struct buf *b, size_t n)
{
    if (n > b->max - b->len)
        return -1;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        b->data = xrealloc(b->data, cap);
        b->cap = cap;
    }
    return 0;
}

int buf_append_grow(struct buf *b, const void *p, size_t n)
{
    if (buf_reserve(b, n))
        return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

size_t fmt_i64(char *out, int64_t v)
{
    /* Two digits at a time from a table: half the divisions of the digit-by-digit loop (timestamps have 13
     * digits, and a Redis command has a length for each argument). */
    static const char pairs[201] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                   "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                   "8081828384858687888990919293949596979899";
    char tmp[24];
    char *p = tmp + sizeof tmp;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    while (u >= 100) {
        p -= 2;
        memcpy(p, pairs + 2 * (u % 100), 2);
        u /= 100;
    }
    if (u >= 10) {
        p -= 2;
        memcpy(p, pairs + 2 * u, 2);
    } else {
        *--p = (char)('0' + u);
    }
    if (v < 0)
        *--p = '-';
    size_t n = (size_t)(tmp + sizeof tmp - p);
    memcpy(out, p, n);
    out[n] = '\0';
    return n;
}

int buf_printf(struct buf *b, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0)
        return -1;
    if ((size_t)n < sizeof small)
        return buf_append(b, small, (size_t)n);
    char *big = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int rc = buf_append(b, big, (size_t)n);
    free(big);
    return rc;
}

/* 1 for the bytes a JSON string must escape: control characters, '"' and '\\'. */
static const unsigned char json_escape[256] = {
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,         1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ['"'] = 1, ['\\'] = 1,
};

int buf_append_json_string(struct buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    const unsigned char *u = (const unsigned char *)s;
    size_t clean = 0;        /* the common case: nothing to escape, one copy */
    while (clean + 8 <= n) { /* eight bytes at a time while none is a control character, " or \ */
        uint64_t x = word_at(u + clean);
        if (word_has_less(x, 0x20) | word_has_byte(x, '"') | word_has_byte(x, '\\'))
            break;
        clean += 8;
    }
    while (clean < n && !json_escape[u[clean]])
        clean++;
    if (buf_reserve(b, n + 2))
        return -1;
    size_t len0 = b->len;
    b->data[b->len++] = '"';
    memcpy(b->data + b->len, s, clean);
    b->len += clean;
    b->data[b->len] = '\0';
    size_t run = clean; /* start of the bytes copied as they are */
    for (size_t i = clean; i < n; i++) {
        unsigned char c = u[i];
        if (!json_escape[c])
            continue;
        char esc[6] = {'\\', 0};
        size_t el = 2;
        switch (c) {
        case '"':
        case '\\':
            esc[1] = (char)c;
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            el = 6;
            break;
        }
        if (buf_append(b, s + run, i - run) || buf_append(b, esc, el))
            goto fail;
        run = i + 1;
    }
    if (buf_append(b, s + run, n - run) == 0 && buf_append(b, "\"", 1) == 0)
        return 0;
fail:
    b->len = len0;
    b->data[len0] = '\0';
    return -1;
}

void buf_reset(struct buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void buf_free(struct buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

static _Thread_local uint64_t rng_state;

uint64_t rand_below(uint64_t n)
{
    if (rng_state == 0) {
        if (getrandom(&rng_state, sizeof rng_state, 0) != sizeof rng_state || rng_state == 0)
            rng_state = (uint64_t)mono_ms() | 1;
    }
    uint64_t x = rng_state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return (x * 0x2545F4914F6CDD1DULL) % n;
}

static void oom(size_t n)
{
    log_error("out of memory allocating %zu bytes", n);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        oom(n * size);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}
