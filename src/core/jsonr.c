/* jsonr.c - see jsonr.h. A recursive descent over [p, end) that gives up (returns NULL) at the first thing it
 * does not handle exactly as jansson would; jsonr_loadb then hands the whole text to jansson. */
#include "core/jsonr.h"

#include "core/util.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64
#define MAX_NUMBER 63 /* longer numbers go to jansson */

struct reader {
    const char *p, *end;
    struct buf tmp; /* unescaped strings */
};

static json_t *read_value(struct reader *r, int depth);

static void skip_ws(struct reader *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\n' || *r->p == '\r' || *r->p == '\t'))
        r->p++;
}

static int hex4(const char *s)
{
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int d = hex_digit(s[i]);
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Appends the UTF-8 of code point cp (not a surrogate, not 0). */
static void put_utf8(struct buf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | cp >> 6);
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | cp >> 12);
        u[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | cp >> 18);
        u[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (char)(0x80 | (cp >> 6 & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_append(b, u, n);
}

/* One escape at *pp (just past the backslash) into tmp; false for what jansson rejects (or we leave to it):
 * unknown escapes, \u0000, a lone or misordered surrogate. */
static bool read_escape(const char **pp, const char *end, struct buf *tmp)
{
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    const char *p = *pp;
    if (p >= end)
        return false;
    const char *e = strchr(from, *p);
    if (*p != 'u') {
        if (!e || !*p)
            return false;
        buf_append(tmp, &to[e - from], 1);
        *pp = p + 1;
        return true;
    }
    if (end - p < 5)
        return false;
    int cp = hex4(p + 1);
    p += 5;
    if (cp <= 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
        return false;
    if (cp >= 0xD800 && cp <= 0xDBFF) { /* a high surrogate: its low one must follow */
        if (end - p < 6 || p[0] != '\\' || p[1] != 'u')
            return false;
        int lo = hex4(p + 2);
        if (lo < 0xDC00 || lo > 0xDFFF)
            return false;
        p += 6;
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    }
    put_utf8(tmp, (unsigned)cp);
    *pp = p;
    return true;
}

bool jsonr_string(const char **pp, const char *end, struct buf *tmp, const char **s, size_t *n, bool *escaped)
{
    const char *p = *pp, *start = p;
    /* ASCII text needs no UTF-8 check: most strings */
    while (p < end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20 && (unsigned char)*p < 0x80)
        p++;
    bool ascii = p >= end || (unsigned char)*p < 0x80;
    while (p < end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
        p++;
    if (p >= end || (unsigned char)*p < 0x20)
        return false;
    *escaped = *p == '\\';
    if (!*escaped) { /* the common case: the text in place */
        *s = start;
        *n = (size_t)(p - start);
        *pp = p + 1;
        return ascii || utf8_valid(*s, *n);
    }
    buf_reset(tmp);
    buf_append(tmp, start, (size_t)(p - start));
    while (p < end && *p != '"') {
        const char *run = p;
        while (p < end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
            p++;
        buf_append(tmp, run, (size_t)(p - run));
        if (p >= end || (unsigned char)*p < 0x20)
            return false;
        if (*p == '\\') {
            p++;
            if (!read_escape(&p, end, tmp))
                return false;
        }
    }
    if (p >= end)
        return false;
    *pp = p + 1;
    *s = tmp->data;
    *n = tmp->len;
    return utf8_valid(*s, *n);
}

/* A string at r->p (just past its opening quote): *s and *n point at its text, in place when it has no escapes,
 * else in r->tmp (valid until the next string). */
static bool read_string(struct reader *r, const char **s, size_t *n)
{
    bool escaped;
    return jsonr_string(&r->p, r->end, &r->tmp, s, n, &escaped);
}

/* A number as JSON's grammar has it; an integer unless it has a fraction or an exponent, like jansson. */
static json_t *read_number(struct reader *r)
{
    const char *start = r->p, *q = r->p;
    bool real = false;
    if (q < r->end && *q == '-')
        q++;
    if (q < r->end && *q == '0')
        q++;
    else if (q < r->end && *q >= '1' && *q <= '9')
        while (q < r->end && *q >= '0' && *q <= '9')
            q++;
    else
        return NULL;
    if (q < r->end && *q == '.') {
        real = true;
        if (++q >= r->end || *q < '0' || *q > '9')
            return NULL;
        while (q < r->end && *q >= '0' && *q <= '9')
            q++;
    }
    if (q < r->end && (*q == 'e' || *q == 'E')) {
        real = true;
        q++;
        if (q < r->end && (*q == '+' || *q == '-'))
            q++;
        if (q >= r->end || *q < '0' || *q > '9')
            return NULL;
        while (q < r->end && *q >= '0' && *q <= '9')
            q++;
    }
    if (q < r->end && (*q == '.' || *q == 'e' || *q == 'E' || (*q >= '0' && *q <= '9')))
        return NULL; /* "01", "1.2.3": jansson's error */
    size_t n = (size_t)(q - start);
    if (n > MAX_NUMBER)
        return NULL;
    char num[MAX_NUMBER + 1], *end;
    memcpy(num, start, n);
    num[n] = '\0';
    errno = 0;
    json_t *v;
    if (real) {
        double d = strtod(num, &end);
        v = errno || end != num + n ? NULL : json_real(d); /* overflow (and underflow) left to jansson */
    } else {
        long long i = strtoll(num, &end, 10);
        v = errno || end != num + n ? NULL : json_integer((json_int_t)i);
    }
    r->p = q;
    return v;
}

static json_t *read_object(struct reader *r, int depth)
{
    json_t *obj = json_object();
    skip_ws(r);
    if (r->p < r->end && *r->p == '}') {
        r->p++;
        return obj;
    }
    for (;;) {
        const char *key;
        size_t kl;
        if (r->p >= r->end || *r->p != '"')
            break;
        r->p++;
        if (!read_string(r, &key, &kl))
            break;
        char small[64], *k = kl < sizeof small ? small : xmalloc(kl + 1); /* r->tmp is reused by the value */
        memcpy(k, key, kl);
        k[kl] = '\0';
        skip_ws(r);
        json_t *v = NULL;
        if (r->p < r->end && *r->p == ':') {
            r->p++;
            v = read_value(r, depth + 1);
        }
        int rc = v ? json_object_setn_new_nocheck(obj, k, kl, v) : -1;
        if (k != small)
            free(k);
        if (rc)
            break;
        skip_ws(r);
        if (r->p < r->end && *r->p == '}') {
            r->p++;
            return obj;
        }
        if (r->p >= r->end || *r->p != ',')
            break;
        r->p++;
        skip_ws(r);
    }
    json_decref(obj);
    return NULL;
}

static json_t *read_array(struct reader *r, int depth)
{
    json_t *arr = json_array();
    skip_ws(r);
    if (r->p < r->end && *r->p == ']') {
        r->p++;
        return arr;
    }
    for (;;) {
        json_t *v = read_value(r, depth + 1);
        if (!v || json_array_append_new(arr, v))
            break;
        skip_ws(r);
        if (r->p < r->end && *r->p == ']') {
            r->p++;
            return arr;
        }
        if (r->p >= r->end || *r->p != ',')
            break;
        r->p++;
    }
    json_decref(arr);
    return NULL;
}

static bool literal(struct reader *r, const char *word, size_t n)
{
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0)
        return false;
    r->p += n;
    return true;
}

static json_t *read_value(struct reader *r, int depth)
{
    if (depth > MAX_DEPTH)
        return NULL;
    skip_ws(r);
    if (r->p >= r->end)
        return NULL;
    const char *s;
    size_t n;
    switch (*r->p) {
    case '{':
        r->p++;
        return read_object(r, depth);
    case '[':
        r->p++;
        return read_array(r, depth);
    case '"':
        r->p++;
        return read_string(r, &s, &n) ? json_stringn_nocheck(s, n) : NULL;
    case 't':
        return literal(r, "true", 4) ? json_true() : NULL;
    case 'f':
        return literal(r, "false", 5) ? json_false() : NULL;
    case 'n':
        return literal(r, "null", 4) ? json_null() : NULL;
    default:
        return read_number(r);
    }
}

json_t *jsonr_loadb(const char *s, size_t len, json_error_t *err)
{
    struct reader r = {s, s + len, {0}};
    buf_init(&r.tmp, len + 1); /* unescaping only shortens a string */
    skip_ws(&r);
    json_t *v = NULL;
    if (r.p < r.end && (*r.p == '{' || *r.p == '['))
        v = read_value(&r, 1);
    skip_ws(&r);
    if (v && r.p != r.end) { /* trailing text: jansson's error */
        json_decref(v);
        v = NULL;
    }
    buf_free(&r.tmp);
    return v ? v : json_loadb(s, len, 0, err);
}
