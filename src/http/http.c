/* http.c - see http.h.
 *
 * Limits. libevent's evhttp has none by default. Headers are capped at 64 KiB. The body cap given to libevent
 * is twice http-max-body: a body between the two is read and answered by the route with a 413 in OpenAI's
 * error shape; a larger one is refused by libevent itself (also 413, with an HTML body) before it is read, so
 * memory per connection stays bounded. A connection idle for http-idle-timeout-s is closed, which also bounds
 * how long a slow client can take to send its request. */
#include "http/http.h"

#include "core/config.h"
#include "core/jsonw.h"
#include "core/log.h"
#include "core/util.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <netinet/in.h>
#include <sys/socket.h>

/* mode 0: an exclusive listener; 1: the first of a group sharing the port with SO_REUSEPORT (the port is
 * first checked free with an exclusive bind, since a REUSEPORT bind would silently share a port that another
 * process holds with REUSEPORT); 2: another of that group. */
static struct evhttp *server_new(struct event_base *base, const struct config *cfg, const char *addr, int port_wanted,
                                 void (*cb)(struct evhttp_request *, void *), void *arg, int *port,
                                 struct evhttp_bound_socket **bound, int mode, char *err, size_t errlen)
{
    struct evhttp *http = evhttp_new(base);
    if (!http) {
        snprintf(err, errlen, "evhttp_new failed");
        return NULL;
    }
    evhttp_set_max_headers_size(http, 64 * 1024);
    evhttp_set_max_body_size(http, (ev_ssize_t)cfg->http_max_body * 2);
    evhttp_set_timeout(http, (int)cfg->http_idle_timeout_s);
    /* Every method reaches the router, which answers 405 with Allow in OpenAI's error shape (libevent would
     * answer others itself, in HTML). */
    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                         EVHTTP_REQ_HEAD | EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH | EVHTTP_REQ_TRACE);
    evhttp_set_default_content_type(http, "application/json");
    evhttp_set_gencb(http, cb, arg);
    /* With several API threads, each has its own listener on the same port (SO_REUSEPORT: the kernel spreads
     * the connections), as nginx's workers do. */
    struct evutil_addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = EVUTIL_AI_PASSIVE};
    struct evutil_addrinfo *ai = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port_wanted);
    struct evhttp_bound_socket *bs = NULL;
    if (evutil_getaddrinfo(addr, portstr, &hints, &ai) == 0 && ai) {
        bool free_port = true;
        if (mode == 1 && port_wanted != 0) {
            evutil_socket_t probe = socket(ai->ai_family, SOCK_STREAM, 0);
            int one = 1;
            setsockopt(probe, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            free_port = probe >= 0 && bind(probe, ai->ai_addr, (socklen_t)ai->ai_addrlen) == 0;
            if (probe >= 0)
                evutil_closesocket(probe);
        }
        unsigned flags =
            LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC | (mode ? LEV_OPT_REUSEABLE_PORT : 0);
        struct evconnlistener *l =
            free_port ? evconnlistener_new_bind(base, NULL, NULL, flags, 1024, ai->ai_addr, (int)ai->ai_addrlen) : NULL;
        if (l)
            bs = evhttp_bind_listener(http, l);
        evutil_freeaddrinfo(ai);
    }
    if (!bs) {
        snprintf(err, errlen, "cannot listen on %s:%d (in use, or a bad address?)", addr, port_wanted);
        evhttp_free(http);
        return NULL;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    *bound = bs;
    *port = port_wanted;
    if (getsockname(evhttp_bound_socket_get_fd(bs), (struct sockaddr *)&ss, &sl) == 0)
        *port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                               : ((struct sockaddr_in *)&ss)->sin_port);
    return http;
}

/* The Date header's value (RFC 9110's IMF-fixdate), formatted once a second per thread. libevent formats it
 * for every answer it sends without one (gmtime and a printf: about a tenth of what a /healthz costs). */
static const char *http_date(void)
{
    static _Thread_local time_t sec = -1;
    static _Thread_local char text[32];
    time_t now = time(NULL);
    if (now != sec) {
        static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
        static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
        struct tm tm;
        gmtime_r(&now, &tm);
        snprintf(text, sizeof text, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday % 7], tm.tm_mday,
                 months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
        sec = now;
    }
    return text;
}

/* The headers of every JSON answer, then the answer (its body is in the output buffer). Date and Content-Length
 * are set here, where they are cheap, so that libevent does not format them itself. */
static void send_json(struct evhttp_request *req, int code)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    char len[24];
    fmt_i64(len, (int64_t)evbuffer_get_length(evhttp_request_get_output_buffer(req)));
    evhttp_add_header(h, "Content-Type", "application/json");
    evhttp_add_header(h, "Cache-Control", "no-store");
    evhttp_add_header(h, "Date", http_date());
    if (code >= 200 && code != 204 && code != 304) /* the answers that carry a body */
        evhttp_add_header(h, "Content-Length", len);
    evhttp_send_reply(req, code, NULL, NULL);
}

static void free_text(const void *data, size_t len, void *arg)
{
    (void)len;
    (void)arg;
    free((void *)data);
}

void http_reply_json(struct evhttp_request *req, int code, json_t *obj)
{
    struct buf b;
    buf_init(&b, SIZE_MAX / 2);
    bool ok = jsonw_append(&b, obj) == 0 && buf_append(&b, "\n", 1) == 0;
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    if (ok && evbuffer_add_reference(out, b.data, b.len, free_text, NULL) == 0) {
        b.data = NULL; /* the buffer frees it once sent */
    } else {           /* deeper than jsonw goes: jansson's own writer */
        char *s = json_dumps(obj, JSON_COMPACT);
        if (s) {
            evbuffer_add(out, s, strlen(s));
            evbuffer_add(out, "\n", 1);
            free(s);
        }
    }
    json_decref(obj);
    buf_free(&b);
    send_json(req, code);
}

struct evhttp *http_server_new(struct event_base *base, const struct config *cfg, const char *addr, int port_wanted,
                               void (*cb)(struct evhttp_request *, void *), void *arg, int *port,
                               struct evhttp_bound_socket **bound, char *err, size_t errlen)
{
    return server_new(base, cfg, addr, port_wanted, cb, arg, port, bound, 0, err, errlen);
}

struct evhttp *http_server_new_shared(struct event_base *base, const struct config *cfg, const char *addr,
                                      int port_wanted, void (*cb)(struct evhttp_request *, void *), void *arg,
                                      int *port, struct evhttp_bound_socket **bound, bool first, char *err,
                                      size_t errlen)
{
    return server_new(base, cfg, addr, port_wanted, cb, arg, port, bound, first ? 1 : 2, err, errlen);
}

void http_reply_text(struct evhttp_request *req, int code, const char *json, size_t len)
{
    evbuffer_add(evhttp_request_get_output_buffer(req), json, len);
    send_json(req, code);
}

void http_reply_static(struct evhttp_request *req, int code, const char *json)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    evbuffer_add_reference(out, json, strlen(json), NULL, NULL);
    send_json(req, code);
}

static void reply_error_v(struct evhttp_request *req, int code, const char *type, const char *errcode,
                          const char *param, const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    json_t *err = json_pack("{s:{s:s, s:s, s:o, s:s}}", "error", "message", msg, "type", type, "param",
                            param && param[0] ? json_string(param) : json_null(), "code", errcode);
    if (code >= 500)
        log_warn("%d %s %s: %s", code, evhttp_request_get_command(req) == EVHTTP_REQ_GET ? "GET" : "POST",
                 http_path(req), msg);
    http_reply_json(req, code, err);
}

void http_reply_error(struct evhttp_request *req, int code, const char *type, const char *errcode, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    reply_error_v(req, code, type, errcode, NULL, fmt, ap);
    va_end(ap);
}

void http_reply_error_param(struct evhttp_request *req, int code, const char *type, const char *errcode,
                            const char *param, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    reply_error_v(req, code, type, errcode, param, fmt, ap);
    va_end(ap);
}

const char *http_path(struct evhttp_request *req)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *p = uri ? evhttp_uri_get_path(uri) : NULL;
    return p ? p : "";
}

char *http_query(struct evhttp_request *req, const char *name)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *q = uri ? evhttp_uri_get_query(uri) : NULL;
    if (!q)
        return NULL;
    struct evkeyvalq params;
    params.tqh_first = NULL;
    params.tqh_last = &params.tqh_first;
    if (evhttp_parse_query_str(q, &params) != 0) {
        evhttp_clear_headers(&params);
        return NULL;
    }
    const char *v = evhttp_find_header(&params, name);
    char *copy = v ? xstrdup(v) : NULL;
    evhttp_clear_headers(&params);
    return copy;
}

const char *http_body(struct evhttp_request *req, size_t *len)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    *len = evbuffer_get_length(in);
    if (*len == 0)
        return "";
    return (const char *)evbuffer_pullup(in, -1);
}
