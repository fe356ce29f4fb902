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

/* Copies a short description of an error answer into out: error.message from an OpenAI error body when there
 * is one, else the start of the body. */
void chat_error_summary(const char *body, size_t len, char *out, size_t outlen);

#endif
