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
#include <stddef.h>

/* Like json_loadb(s, len, 0, err): a new reference, or NULL with err (if not NULL) filled by jansson. */
json_t *jsonr_loadb(const char *s, size_t len, json_error_t *err);

#endif
