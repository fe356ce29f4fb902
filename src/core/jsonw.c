/* jsonw.c - see jsonw.h. */
#include "core/jsonw.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

static int append_real(struct buf *b, double d)
{
    /* jansson: "%.17g", then ".0" when the text would read back as an integer */
    if (!isfinite(d))
        return -1; /* jansson refuses them too */
    char s[40];
    int n = snprintf(s, sizeof s, "%.17g", d);
    if (n < 0 || (size_t)n >= sizeof s - 3)
        return -1;
    if (!strpbrk(s, ".eE")) {
        s[n++] = '.';
        s[n++] = '0';
        s[n] = '\0';
    }
    char *e = strchr(s, 'e');
    if (e) { /* and, like jansson, no '+' and no leading zeros in the exponent: 1e300, 1e-05 -> 1e-5 */
        char *dst = e + 1, *src = e + 1;
        if (*src == '+')
            src++;
        else if (*src == '-')
            dst++, src++;
        while (*src == '0' && src[1])
            src++;
        memmove(dst, src, strlen(src) + 1);
        n = (int)strlen(s);
    }
    return buf_append(b, s, (size_t)n);
}

static int append_value(struct buf *b, const json_t *v, int depth)
{
    if (depth > MAX_DEPTH)
        return -1;
    char num[24];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        if (buf_append(b, "{", 1))
            return -1;
        const char *key;
        json_t *val;
        bool first = true;
        void *it = json_object_iter((json_t *)v);
        for (; it; it = json_object_iter_next((json_t *)v, it)) {
            key = json_object_iter_key(it);
            val = json_object_iter_value(it);
            if ((!first && buf_append(b, ",", 1)) || buf_append_json_string(b, key, strlen(key)) ||
                buf_append(b, ":", 1) || append_value(b, val, depth + 1))
                return -1;
            first = false;
        }
        return buf_append(b, "}", 1);
    }
    case JSON_ARRAY: {
        if (buf_append(b, "[", 1))
            return -1;
        size_t n = json_array_size(v);
        for (size_t i = 0; i < n; i++)
            if ((i && buf_append(b, ",", 1)) || append_value(b, json_array_get(v, i), depth + 1))
                return -1;
        return buf_append(b, "]", 1);
    }
    case JSON_STRING:
        return buf_append_json_string(b, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
        return buf_append(b, num, fmt_i64(num, (int64_t)json_integer_value(v)));
    case JSON_REAL:
        return append_real(b, json_real_value(v));
    case JSON_TRUE:
        return buf_append(b, "true", 4);
    case JSON_FALSE:
        return buf_append(b, "false", 5);
    case JSON_NULL:
        return buf_append(b, "null", 4);
    }
    return -1;
}

int jsonw_append(struct buf *b, const json_t *v)
{
    return v ? append_value(b, v, 0) : -1;
}

char *jsonw_dumps(const json_t *v, size_t *len)
{
    struct buf b;
    buf_init(&b, SIZE_MAX / 2);
    if (jsonw_append(&b, v)) {
        buf_free(&b);
        return NULL;
    }
    if (len)
        *len = b.len;
    if (!b.data)
        return xstrdup("");
    return b.data;
}
