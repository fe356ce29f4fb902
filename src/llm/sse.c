/* sse.c - see sse.h. Lines end with "\n", "\r\n" or "\r"; an empty line dispatches the event. */
#include "llm/sse.h"

#include <string.h>

void sse_init(struct sse *p, size_t max_line, sse_event_cb *cb, void *arg)
{
    buf_init(&p->line, max_line);
    buf_init(&p->data, max_line);
    p->cb = cb;
    p->arg = arg;
    p->last_cr = false;
}

void sse_free(struct sse *p)
{
    buf_free(&p->line);
    buf_free(&p->data);
}

static int dispatch(struct sse *p)
{
    if (p->data.len == 0)
        return 0;
    int rc = p->cb(p->arg, p->data.data, p->data.len);
    buf_reset(&p->data);
    return rc;
}

static int handle_line(struct sse *p, const char *l, size_t n)
{
    if (n == 0)
        return dispatch(p);
    if (l[0] == ':')
        return 0; /* comment */
    const char *colon = memchr(l, ':', n);
    size_t flen = colon ? (size_t)(colon - l) : n;
    if (flen != 4 || memcmp(l, "data", 4) != 0)
        return 0; /* event, id, retry, unknown: ignored */
    const char *v = colon ? colon + 1 : l + n;
    if (v < l + n && *v == ' ')
        v++;
    size_t vlen = (size_t)(l + n - v);
    if (p->data.len && buf_append(&p->data, "\n", 1))
        return -1;
    if (buf_append(&p->data, v, vlen))
        return -1;
    if (!p->data.data) /* "data:" with nothing: keep an empty, present value */
        buf_append(&p->data, "", 0);
    return 0;
}

int sse_feed(struct sse *p, const char *bytes, size_t len)
{
    size_t i = 0;
    if (p->last_cr && len > 0 && bytes[0] == '\n')
        i = 1;
    p->last_cr = false;
    while (i < len) {
        const char *nl = NULL;
        for (size_t k = i; k < len; k++) {
            if (bytes[k] == '\n' || bytes[k] == '\r') {
                nl = bytes + k;
                break;
            }
        }
        if (!nl)
            return buf_append(&p->line, bytes + i, len - i);
        size_t n = (size_t)(nl - (bytes + i));
        int rc;
        if (p->line.len) {
            if (buf_append(&p->line, bytes + i, n))
                return -1;
            rc = handle_line(p, p->line.data, p->line.len);
            buf_reset(&p->line);
        } else {
            rc = handle_line(p, bytes + i, n);
        }
        if (rc)
            return -1;
        i += n + 1;
        if (*nl == '\r') {
            if (i < len && bytes[i] == '\n')
                i++;
            else if (i == len)
                p->last_cr = true;
        }
    }
    return 0;
}
