/* http.h - the HTTP/1.1 server every role uses (the API's routes, the metrics endpoints): a small layer on the
 * thread's libevent loop, with limits, JSON replies, OpenAI-shaped errors, query, header and body access, and
 * Server-Sent Event streams. Route handlers live in their own modules (api.c). Design: docs/HTTP.md.
 *
 * A request is handed to the server's callback once it is complete (head and body). It belongs to its handler
 * until the handler answers it (http_reply_* or http_stream_end), which frees it; every request must be answered
 * exactly once, even if its client has gone (the answer is then dropped). */
#ifndef ASYNCLLM_HTTP_H
#define ASYNCLLM_HTTP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

struct event_base;
struct config;
struct http_server;
struct http_req;

enum http_method {
    HTTP_GET,
    HTTP_HEAD,
    HTTP_POST,
    HTTP_PUT,
    HTTP_DELETE,
    HTTP_OPTIONS,
    HTTP_PATCH,
    HTTP_TRACE,
    HTTP_CONNECT,
    HTTP_OTHER /* any other token: routes answer 405 */
};

typedef void (*http_cb)(struct http_req *req, void *arg);

/* Creates a server on addr:port_wanted with cfg's limits (docs/HTTP.md): request heads 64 KiB, bodies
 * http-max-body (a body up to twice that is read and left to the route to refuse in its words; a larger one is
 * refused with 413 before it is read), connections idle or slow for http-idle-timeout-s closed. Every request
 * goes to cb. *port receives the port actually bound (useful with port 0). Returns NULL with a message in err. */
struct http_server *http_server_new(struct event_base *base, const struct config *cfg, const char *addr,
                                    int port_wanted, http_cb cb, void *arg, int *port, char *err, size_t errlen);
/* Like http_server_new, for one of several listeners sharing a port (SO_REUSEPORT), one per thread: the first
 * checks that the port is free; the others join it. */
struct http_server *http_server_new_shared(struct event_base *base, const struct config *cfg, const char *addr,
                                           int port_wanted, http_cb cb, void *arg, int *port, bool first, char *err,
                                           size_t errlen);
/* Stops accepting connections; the open ones go on. */
void http_server_stop_listening(struct http_server *srv);
/* Closes every connection and frees the server. A request still unanswered is detached from its connection:
 * its owner must still answer it (which frees it). */
void http_server_free(struct http_server *srv);

/* The request. Strings are valid until it is answered. */
enum http_method http_method(const struct http_req *req);
const char *http_method_name(const struct http_req *req);
/* The path (without the query), not decoded: "/v1/responses/abc". */
const char *http_path(const struct http_req *req);
/* The raw query (after '?', not decoded), or NULL. */
const char *http_query_string(const struct http_req *req);
/* Copies the decoded query parameter into a malloc'd string (caller frees), or returns NULL if absent. */
char *http_query(const struct http_req *req, const char *name);
/* The value of the first request header called name (case-insensitive), or NULL. */
const char *http_header(const struct http_req *req, const char *name);
/* The body (decoded if it came chunked; NUL-terminated) and its length. */
const char *http_body(const struct http_req *req, size_t *len);

/* Adds a header to the answer (before it is sent). name and value must not contain CR or LF. */
void http_add_header(struct http_req *req, const char *name, const char *value);

/* Answers with body[0..len) as content_type (NULL: no Content-Type). */
void http_reply(struct http_req *req, int code, const char *content_type, const char *body, size_t len);
/* Sends obj as the JSON body (steals the reference). */
void http_reply_json(struct http_req *req, int code, json_t *obj);
/* Sends json[0..len) (a JSON document the caller wrote) as the body. */
void http_reply_text(struct http_req *req, int code, const char *json, size_t len);
/* Sends a constant JSON body: the cheapest answer, for health checks. */
void http_reply_static(struct http_req *req, int code, const char *json);
/* Like http_reply_error, naming the offending parameter. */
void http_reply_error_param(struct http_req *req, int code, const char *type, const char *errcode, const char *param,
                            const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Sends {"error": {"message", "type", "param": null, "code"}} in OpenAI's shape. */
void http_reply_error(struct http_req *req, int code, const char *type, const char *errcode, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* A streamed answer (Server-Sent Events): the head now (with the headers added so far; chunked over HTTP/1.1,
 * closed at the end over HTTP/1.0), then any number of writes, then the end, which frees the request. If the
 * client goes away meanwhile, closed(req, arg) is called once; the owner must still end the stream. */
void http_stream_start(struct http_req *req, int code, void (*closed)(struct http_req *req, void *arg), void *arg);
void http_stream_write(struct http_req *req, const char *data, size_t len);
void http_stream_end(struct http_req *req);

#endif
