/* webhooks.h - `asyncllm webhooks`: an interested party of async_llm_response that POSTs a signed event for
 * every finished response to its callback_url and to the configured endpoints (Standard Webhooks). */
#ifndef ASYNCLLM_WEBHOOKS_H
#define ASYNCLLM_WEBHOOKS_H

#include <stddef.h>

struct event_base;
struct config;
struct webhooks;

struct webhooks *webhooks_new(struct event_base *base, const struct config *cfg, char *err, size_t errlen);
void webhooks_drain(struct webhooks *wh, void (*on_drained)(void *arg), void *arg);
void webhooks_free(struct webhooks *wh);

/* Standard Webhooks signature: "v1," + base64(HMAC-SHA256(key, "<id>.<timestamp>.<body>")). Writes a
 * NUL-terminated string into out (at least 64 bytes). Exposed for tests. */
void webhooks_sign(const unsigned char *key, size_t keylen, const char *id, long long ts, const char *body, size_t len,
                   char *out, size_t outlen);
/* Decodes a "whsec_<base64>" secret into key (at most 256 bytes). Returns the key length, or -1. */
int webhooks_secret_decode(const char *secret, unsigned char *key, size_t keymax);

#endif
