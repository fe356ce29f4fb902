/* http.h - helpers over libevent's evhttp: a server with limits, JSON replies, OpenAI-shaped errors, query and
 * body access. Route handlers live in their own modules (api.c). */
#ifndef ASYNCLLM_HTTP_H
#define ASYNCLLM_HTTP_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

struct event_base;
struct evhttp;
struct evhttp_request;
struct evhttp_bound_socket;
struct config;

/* Creates a server on addr:port_wanted with cfg's limits: headers 64 KiB, bodies (see http.c), idle
 * connections closed after http-idle-timeout-s. Every request goes to cb. *port receives the port actually
 * bound (useful with --http-port=0), *bound the listener (for evhttp_del_accept_socket). Returns NULL with a message in
 * err. */
struct evhttp *http_server_new(struct event_base *base, const struct config *cfg, const char *addr, int port_wanted,
                               void (*cb)(struct evhttp_request *, void *), void *arg, int *port,
                               struct evhttp_bound_socket **bound, char *err, size_t errlen);

/* Like http_server_new, for one of several listeners sharing a port (SO_REUSEPORT), one per thread: first
 * checks that the port is free; the others join it. */
struct evhttp *http_server_new_shared(struct event_base *base, const struct config *cfg, const char *addr,
                                      int port_wanted, void (*cb)(struct evhttp_request *, void *), void *arg,
                                      int *port, struct evhttp_bound_socket **bound, bool first, char *err,
                                      size_t errlen);
/* Sends obj as the JSON body (steals the reference). */
void http_reply_json(struct evhttp_request *req, int code, json_t *obj);
/* Sends json[0..len) (a JSON document the caller wrote) as the body. */
void http_reply_text(struct evhttp_request *req, int code, const char *json, size_t len);
/* Sends a constant JSON body (no copy, no JSON encoding): the cheapest answer, for health checks. */
void http_reply_static(struct evhttp_request *req, int code, const char *json);
/* Like http_reply_error, naming the offending parameter. */
void http_reply_error_param(struct evhttp_request *req, int code, const char *type, const char *errcode,
                            const char *param, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* Sends {"error": {"message", "type", "param": null, "code"}} in OpenAI's shape. */
void http_reply_error(struct evhttp_request *req, int code, const char *type, const char *errcode, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* The request's path (without the query), or "" . Valid while req is. */
const char *http_path(struct evhttp_request *req);
/* Copies the decoded query parameter into a malloc'd string (caller frees), or returns NULL if absent. */
char *http_query(struct evhttp_request *req, const char *name);
/* The body, made contiguous (valid until the reply is sent), and its length. */
const char *http_body(struct evhttp_request *req, size_t *len);

#endif
