/* chat.h - the Chat Completions wire format: building requests and reading answers. Pure functions. */
#ifndef ASYNCLLM_CHAT_H
#define ASYNCLLM_CHAT_H

#include <stdbool.h>
#include <stddef.h>

struct chat_msg {
    const char *role; /* "system", "user", "assistant" */
    const char *content;
    size_t len;
};

/* Returns a malloc'd JSON request body (the caller frees it) and its length in *len. max_tokens <= 0: not sent. */
char *chat_request_new(const char *model, long max_tokens, const struct chat_msg *msgs, size_t n, size_t *len);

struct chat_result {
    char *content; /* malloc'd, NUL-terminated (may hold "" for an empty answer) */
    size_t content_len;
    char *finish_reason; /* malloc'd; "stop", "length", ... or "" */
    char *model;         /* malloc'd; the model that answered, or "" */
    long prompt_tokens, completion_tokens, total_tokens;
};

/* Reads a non-streaming chat.completion body. Returns 0, or -1 with a reason in err (not JSON, no choices, no
 * message content). */
int chat_parse_response(const char *body, size_t len, struct chat_result *out, char *err, size_t errlen);
void chat_result_free(struct chat_result *r);

/* Options of one request beyond the messages. Zero/NULL members are not sent. */
struct chat_opts {
    long max_tokens;
    double temperature, top_p; /* < 0: not sent */
    bool stream;               /* also asks for usage in the stream (stream_options.include_usage) */
};

/* Like chat_request_new, with options. model may be overridden per request. */
char *chat_request_new_opts(const char *model, const struct chat_opts *o, const struct chat_msg *msgs, size_t n,
                            size_t *len);

/* Folds one streamed chunk (an SSE event's data) into r: appends choices[0].delta.content to r->content and
 * takes finish_reason, model and usage when present. Returns 1 for the closing "[DONE]", 0 for a chunk, -1 for
 * something that is not a chunk (the reason in err). *delta and *delta_len point at the new text inside r->content
 * (valid until the next call) so it can be forwarded. r must be zeroed before the first chunk. */
int chat_stream_chunk(struct chat_result *r, const char *data, size_t len, const char **delta, size_t *delta_len,
                      char *err, size_t errlen);

/* Copies a short description of an error answer into out: error.message from an OpenAI error body when there
 * is one, else the start of the body. */
void chat_error_summary(const char *body, size_t len, char *out, size_t outlen);

#endif
