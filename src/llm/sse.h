/* sse.h - an incremental parser of Server-Sent Events, as sent by a streaming Chat Completions answer.
 *
 * Bytes arrive in arbitrary pieces (curl's write callback); the parser buffers an incomplete line (up to a
 * limit) and calls back once per complete event with its `data` (multi-line data joined by '\n'). Comments
 * (":"), `event:`, `id:` and `retry:` fields are accepted and ignored: OpenAI-compatible servers put all in
 * `data`. */
#ifndef ASYNCLLM_SSE_H
#define ASYNCLLM_SSE_H

#include "core/util.h"

#include <stdbool.h>
#include <stddef.h>

/* data is NUL-terminated and valid during the call only. Return 0 to go on, -1 to stop parsing. */
typedef int sse_event_cb(void *arg, const char *data, size_t len);

struct sse {
    struct buf line; /* the incomplete line */
    struct buf data; /* the data of the event being read */
    sse_event_cb *cb;
    void *arg;
    bool last_cr; /* the previous feed ended with "\r": a "\n" starting this one belongs to it */
};

/* max_line bounds one line and one event's data. */
void sse_init(struct sse *p, size_t max_line, sse_event_cb *cb, void *arg);
/* Feeds bytes. Returns 0, or -1 if a line or an event passed the limit or the callback stopped. */
int sse_feed(struct sse *p, const char *bytes, size_t len);
void sse_free(struct sse *p);

#endif
