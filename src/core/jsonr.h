/* jsonr.h - a fast reader of JSON into jansson values.
 *
 * json_loadb costs about 200 instructions per byte of a small request (a callback per character, a token
 * buffer, UTF-8 decoding one character at a time): on a background Responses create it was a tenth of the
 * API's work. This reader scans the text in place and builds the same values (same types, members in the same
 * order, a repeated key keeping its first place and its last value) several times faster. It reads only
 * what it is sure of: anything unusual (invalid JSON, a number out of range, \u0000, nesting deeper than 64,
 * a top level that is not an object or an array) goes to json_loadb, which then gives its own value or error. */
#ifndef ASYNCLLM_JSONR_H
#define ASYNCLLM_JSONR_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

/* Like json_loadb(s, len, 0, err): a new reference, or NULL with err (if not NULL) filled by jansson. */
json_t *jsonr_loadb(const char *s, size_t len, json_error_t *err);

struct buf;
/* One JSON string, checked and unescaped exactly as jansson does, for readers of their own (chat.c). *pp is just
 * past its opening quote, and on success just past its closing one. *s, *n: its text, in place when it has no
 * escapes, else in tmp (valid until tmp's next use); *escaped says which. false for what json_loadb rejects or
 * that this reader leaves to it: a control character, invalid UTF-8, an unknown escape, \u0000, a lone
 * surrogate, a missing closing quote. */
bool jsonr_string(const char **pp, const char *end, struct buf *tmp, const char **s, size_t *n, bool *escaped);

#endif
