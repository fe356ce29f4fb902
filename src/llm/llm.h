/* llm.h - HTTP calls to an OpenAI-compatible server through libcurl's multi interface on a libevent loop.
 *
 * Any number of calls run at once on the caller's thread: curl tells us which sockets to watch and when to
 * wake (CURLMOPT_SOCKETFUNCTION, CURLMOPT_TIMERFUNCTION), the loop tells curl what happened
 * (curl_multi_socket_action). Nothing blocks. Connections are kept alive and reused between calls.
 *
 * Each call answers exactly once through its callback, unless it is cancelled first. */
#ifndef ASYNCLLM_LLM_H
#define ASYNCLLM_LLM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct curl_slist;
struct config;
struct llm;
struct llm_call;

struct llm_response {
    long http_status;       /* 0 if no HTTP answer (connection error, timeout) */
    int curl_code;          /* CURLcode, 0 on success */
    const char *curl_error; /* human-readable, "" when curl_code is 0 */
    bool timed_out;
    bool too_large;   /* the body passed llm-max-response-bytes */
    const char *body; /* NUL-terminated; valid during the callback only */
    size_t body_len;
    int64_t retry_after_ms; /* from retry-after-ms or Retry-After (seconds or HTTP date); -1 if absent */
    bool blocked;           /* llm_request with block_private: the address was loopback, private or link-local */
    int64_t elapsed_ms;
};

typedef void llm_cb(void *arg, const struct llm_response *res);
/* Streaming: receives the body of a 2xx answer as it arrives (instead of res->body). Return 0 to go on, -1 to
 * abort the call (it then completes with curl_code set). */
typedef int llm_data_cb(void *arg, const char *data, size_t len);

struct llm *llm_new(struct event_base *base, const struct config *cfg);
/* Cancels every call (no callbacks) and frees the client. */
void llm_free(struct llm *llm);

/* Reserves room on the least busy endpoint (base URL) below llm-endpoint-max-in-flight and returns its index,
 * or -1 if all are full. The reservation is held until llm_release(), across any number of calls. */
int llm_reserve(struct llm *llm);
void llm_release(struct llm *llm, int ep);
/* POSTs body as JSON to {base of endpoint ep}{path}. body is not copied: it must stay valid and unchanged until
 * the callback runs or the call is cancelled. Returns a handle valid until then. Never NULL. */
struct llm_call *llm_post(struct llm *llm, int ep, const char *path, const char *body, size_t len, llm_cb *cb,
                          void *arg);
/* Like llm_post, but a 2xx body goes to on_data as it arrives. */
struct llm_call *llm_post_stream(struct llm *llm, int ep, const char *path, const char *body, size_t len,
                                 llm_data_cb *on_data, llm_cb *cb, void *arg);
/* Any POST (webhooks): an absolute http(s) URL, extra headers (copied: curl_slist of "Name: value"), a
 * timeout, and optionally a refusal to connect to loopback, private, link-local or unspecified addresses
 * (checked on the resolved address at connect time, so DNS cannot smuggle one in). */
struct llm_req {
    const char *url;
    const struct curl_slist *headers;
    const char *body;
    size_t len;
    long timeout_ms;
    bool block_private;
};
struct llm_call *llm_request(struct llm *llm, const struct llm_req *r, llm_cb *cb, void *arg);

/* Aborts a call; its callback will not run. Must not be called from that call's own callback. */
void llm_cancel(struct llm_call *call);
int llm_in_flight(const struct llm *llm);
/* The number of configured endpoints (base URLs). */
int llm_endpoints(const struct llm *llm);

/* Parses retry-after-ms (milliseconds) or Retry-After (delta seconds or an HTTP date, relative to now_ms).
 * Returns milliseconds (>= 0) or -1 when neither header is usable. Exposed for tests. */
int64_t llm_parse_retry_after(const char *retry_after, const char *retry_after_ms, int64_t now_ms);

#endif
