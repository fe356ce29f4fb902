/* jsonw.h - a fast writer for jansson values.
 *
 * json_dumps(JSON_COMPACT) costs about 90 instructions per byte written (a callback per chunk, a UTF-8 decode
 * per character); on the API's answers it was a fifth of the user-space work of a poll. This writer produces the
 * same text (compact, members in insertion order, jansson's escapes and number formats) several times faster.
 * Strings inside jansson values are valid UTF-8 (jansson checks on the way in), so none is checked again. */
#ifndef ASYNCLLM_JSONW_H
#define ASYNCLLM_JSONW_H

#include <jansson.h>

#include "core/util.h"

/* Appends v's compact JSON to b. Returns 0, or -1 past b's limit (b then holds a truncated text) or for a
 * value nested deeper than 64 levels. */
int jsonw_append(struct buf *b, const json_t *v);

/* v's compact JSON as a malloc'd NUL-terminated string (*len its length if len is not NULL), like
 * json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY); NULL if too deep. */
char *jsonw_dumps(const json_t *v, size_t *len);

#endif
