/*
 * fakellm: a fake OpenAI-compatible Chat Completions server for the
 * end-to-end tests and the benchmarks.
 *
 * What it answers. The reply is a pure function of the request, so a test
 * can predict it: "echo: <last user message> [messages=N]", or the text of
 * a [[reply=...]] directive. Tokens are whitespace-separated words. Faults
 * (error statuses, hangs, malformed bodies) come from directives written in
 * the last user message, or at random from a seeded xorshift PRNG.
 *
 * Threads. Each thread runs one event_base and one evhttp on its own
 * SO_REUSEPORT socket, so threads share only atomic counters, the
 * fail-times map (under a mutex) and the log descriptor (O_APPEND and one
 * write() per line, so lines never interleave).
 *
 * Latency. A request that must wait becomes a `struct chat` holding the
 * whole answer, released by an event timer and never by sleeping, so one
 * thread can hold tens of thousands of slow requests.
 *
 * Lifetimes. evhttp stops reading a connection while its request waits for
 * an answer, so it would never notice a client that gives up. A waiting
 * chat therefore watches the socket itself (one-shot EV_READ plus MSG_PEEK)
 * and frees the connection on EOF. The connection's close callback is the
 * single place where an unfinished chat is torn down, whoever closed it: the
 * client, a write error in the middle of a stream, or shutdown. When a write
 * error closes the connection, evhttp detaches the request and leaves it to
 * us to free; the close callback does that too.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/event_struct.h> /* to embed the timer and watch in struct chat */
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>

/* The pure text functions; see the note at the top of that file. */
#include "fakellm_text.c"

#define MAX_BODY_BYTES (8 * 1024 * 1024)
#define MAX_HEADER_BYTES (64 * 1024)
#define MAX_THREADS 256
#define LISTEN_BACKLOG 65535 /* the kernel caps it at net.core.somaxconn */
#define NO_TIMER UINT64_MAX  /* delay of a chat that hangs */

/* Appends a string literal without its NUL. */
#define ADD_LIT(out, lit) evbuffer_add((out), (lit), sizeof(lit) - 1)

/* ------------------------------------------------------------------------
 * Configuration: one table drives parsing, bounds checking and --help.
 */

static struct config {
    const char *host;
    long port, threads, latency_ms, jitter_ms, seed, timeout_s;
    double rate_429, rate_500, rate_hang, rate_malformed;
    const char *api_key, *log_path;
} cfg = {.host = "127.0.0.1", .port = 8089, .threads = 1, .seed = 1, .timeout_s = 60};

enum opt_type { OPT_STR, OPT_LONG, OPT_PROB };

static const struct option_def {
    const char *name, *arg;
    enum opt_type type;
    void *dst;
    double min, max;
    const char *help;
} options[] = {
    {"host", "H", OPT_STR, &cfg.host, 0, 0, "address to listen on"},
    {"port", "N", OPT_LONG, &cfg.port, 0, 65535, "port; 0 picks a free one (the ready line shows it)"},
    {"threads", "N", OPT_LONG, &cfg.threads, 1, MAX_THREADS, "event loops, each with an SO_REUSEPORT listener"},
    {"latency-ms", "N", OPT_LONG, &cfg.latency_ms, 0, MAX_LATENCY_MS, "latency of every answer"},
    {"jitter-ms", "J", OPT_LONG, &cfg.jitter_ms, 0, MAX_LATENCY_MS, "adds a uniform 0..J ms to the latency"},
    {"rate-429", "P", OPT_PROB, &cfg.rate_429, 0, 1, "probability of a random 429"},
    {"rate-500", "P", OPT_PROB, &cfg.rate_500, 0, 1, "probability of a random 500"},
    {"rate-hang", "P", OPT_PROB, &cfg.rate_hang, 0, 1, "probability of a random hang"},
    {"rate-malformed", "P", OPT_PROB, &cfg.rate_malformed, 0, 1, "probability of a random malformed body"},
    {"seed", "N", OPT_LONG, &cfg.seed, 0, 0x1p53, "seed of the random faults and jitter (per thread)"},
    {"api-key", "KEY", OPT_STR, &cfg.api_key, 0, 0, "require 'Authorization: Bearer KEY' on chat and models"},
    {"log", "FILE", OPT_STR, &cfg.log_path, 0, 0, "append one JSON line per chat request"},
    {"timeout-s", "N", OPT_LONG, &cfg.timeout_s, 1, 86400, "evhttp read/write timeout of a connection"},
};

static const char directives_help[] =
    "Directives, written anywhere in the last user message (several may be combined;\n"
    "they are removed from the echoed text):\n"
    "  [[reply=TEXT]]      reply exactly TEXT (up to the first ']]')\n"
    "  [[latency=MS]]      latency of this request, replacing --latency-ms and --jitter-ms\n"
    "  [[status=CODE]]     answer CODE (400..599) with an OpenAI error body\n"
    "  [[hang]]            never answer; the connection is freed when the client closes it\n"
    "  [[malformed]]       answer 200 with a body that is not JSON (or a broken SSE event)\n"
    "  [[fail-times=K]]    the first K requests with this exact last user message get the\n"
    "                      fault of the other directives (500 if none), later ones succeed\n"
    "  [[retry-after=S]]   Retry-After seconds of a 429 (default 1)\n"
    "\n"
    "Reply: 'echo: <last user message> [messages=N]'; tokens are words; a reply longer\n"
    "than max_tokens is cut (finish_reason 'length'). Every answer, faults included,\n"
    "waits for the latency; a stream sends its first word at latency/2 and spreads\n"
    "the others over the second half.\n"
    "\n"
    "Endpoints: POST /v1/chat/completions (and /chat/completions), GET /v1/models,\n"
    "GET /healthz, GET /stats, POST /reset. Ready line on stderr:\n"
    "'fakellm listening on http://H:P'.\n";

static void print_help(FILE *out)
{
    fprintf(out, "usage: fakellm [--OPTION VALUE]... (or --OPTION=VALUE)\n\n"
                 "A fake OpenAI-compatible Chat Completions server for tests and benchmarks.\n\n"
                 "Options:\n");
    for (size_t i = 0; i < sizeof(options) / sizeof(options[0]); i++) {
        const struct option_def *o = &options[i];
        char flag[40], def[64];
        snprintf(flag, sizeof(flag), "--%s %s", o->name, o->arg);
        if (o->type == OPT_STR)
            snprintf(def, sizeof(def), "%s", *(const char **)o->dst ? *(const char **)o->dst : "none");
        else if (o->type == OPT_LONG)
            snprintf(def, sizeof(def), "%ld", *(long *)o->dst);
        else
            snprintf(def, sizeof(def), "%g", *(double *)o->dst);
        fprintf(out, "  %-22s %s (default %s)\n", flag, o->help, def);
    }
    fprintf(out, "  %-22s %s\n\n%s", "--help", "show this help", directives_help);
}

static int set_option(const struct option_def *o, const char *value)
{
    char *end;
    if (o->type == OPT_STR) {
        *(const char **)o->dst = value;
        return 0;
    }
    if (o->type == OPT_LONG)
        return parse_long(value, strlen(value), (long)o->min, (long)o->max, (long *)o->dst);
    errno = 0;
    double v = strtod(value, &end);
    if (errno || *end != '\0' || end == value || !(v >= o->min && v <= o->max))
        return -1;
    *(double *)o->dst = v;
    return 0;
}

/* Returns 0 to run, 1 when --help was printed, -1 on a usage error. */
static int parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            print_help(stdout); /* before any flag changes the defaults shown */
            return 1;
        }
    int i;
    for (i = 1; i < argc; i++) {
        const char *arg = argv[i], *eq, *value;
        size_t name_len;
        if (strncmp(arg, "--", 2) != 0)
            goto bad;
        arg += 2;
        eq = strchr(arg, '=');
        name_len = eq ? (size_t)(eq - arg) : strlen(arg);
        const struct option_def *o = NULL;
        for (size_t k = 0; k < sizeof(options) / sizeof(options[0]); k++)
            if (strlen(options[k].name) == name_len && memcmp(options[k].name, arg, name_len) == 0)
                o = &options[k];
        if (o == NULL)
            goto bad;
        if (eq)
            value = eq + 1;
        else if (i + 1 < argc)
            value = argv[++i];
        else
            goto bad;
        /* value is argv's, which lives as long as the process */
        if (set_option(o, value)) {
            fprintf(stderr, "fakellm: bad value '%s' for --%s\n", value, o->name);
            return -1;
        }
    }
    if (cfg.rate_429 + cfg.rate_500 + cfg.rate_hang + cfg.rate_malformed > 1.0) {
        fprintf(stderr, "fakellm: the --rate-* probabilities add up to more than 1\n");
        return -1;
    }
    return 0;
bad:
    fprintf(stderr, "fakellm: bad argument '%s' (see --help)\n", argv[i]);
    return -1;
}

/* ------------------------------------------------------------------------
 * Shared state: counters, the fail-times map, the request log.
 */

static struct stats {
    atomic_ullong requests;  /* chat requests received */
    atomic_ullong completed; /* chat answers sent, whatever their status */
    atomic_ullong hangs;     /* chats that chose never to answer */
    atomic_ullong malformed; /* answers with a broken body (counted as 200 too) */
    atomic_ullong aborted;   /* chats whose connection closed before the answer */
    atomic_llong in_flight;  /* chats waiting on a timer or hanging */
    atomic_ullong by_status[600];
    atomic_ullong next_id; /* the n of "chatcmpl-<n>" */
} stats;

static void stats_answered(int status)
{
    atomic_fetch_add(&stats.completed, 1);
    if (status >= 100 && status < 600)
        atomic_fetch_add(&stats.by_status[status], 1);
}

/*
 * [[fail-times=K]] needs to count earlier requests that carried the same
 * text. The map is keyed by a 64-bit FNV-1a hash of that text rather than a
 * copy, so its memory is fixed whatever the prompts' size; a collision
 * would need ~2^32 distinct prompts. When it is three quarters full it is
 * emptied (and a warning printed): a test suite stays far below that.
 */
#define FAIL_MAP_SLOTS 4096

static struct fail_slot {
    uint64_t key; /* 0 marks an empty slot */
    long count;
} fail_map[FAIL_MAP_SLOTS];
static size_t fail_map_used;
static pthread_mutex_t fail_map_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t fnv1a(const char *s, size_t len)
{
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    return h ? h : 1;
}

static void fail_map_clear_locked(void)
{
    memset(fail_map, 0, sizeof(fail_map));
    fail_map_used = 0;
}

/* Counts one more request with this text; returns how many came before. */
static long fail_map_bump(const char *text, size_t len)
{
    uint64_t key = fnv1a(text, len);
    long before;
    pthread_mutex_lock(&fail_map_lock);
    if (fail_map_used >= FAIL_MAP_SLOTS / 4 * 3) {
        fprintf(stderr, "fakellm: fail-times map full, forgetting all counts\n");
        fail_map_clear_locked();
    }
    size_t i = key & (FAIL_MAP_SLOTS - 1);
    while (fail_map[i].key != 0 && fail_map[i].key != key)
        i = (i + 1) & (FAIL_MAP_SLOTS - 1);
    if (fail_map[i].key == 0) {
        fail_map[i].key = key;
        fail_map_used++;
    }
    before = fail_map[i].count++;
    pthread_mutex_unlock(&fail_map_lock);
    return before;
}

static int log_fd = -1;

static uint64_t now_us(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Appends one line to the log with a single write(), so that lines from
 * several threads never interleave and a test can read it at once. */
static void log_request(json_t *model, json_t *messages, bool stream, json_t *max_tokens)
{
    if (log_fd < 0)
        return;
    json_t *line = json_pack("{s:I, s:O, s:O, s:b, s:O}", "ts_ms", (json_int_t)(now_us(CLOCK_REALTIME) / 1000), "model",
                             model ? model : json_null(), "messages", messages, "stream", stream, "max_tokens",
                             max_tokens ? max_tokens : json_null());
    size_t len = line ? json_dumpb(line, NULL, 0, JSON_COMPACT) : 0;
    char *buf = len ? xmalloc(len + 1) : NULL;
    if (buf && json_dumpb(line, buf, len, JSON_COMPACT) == len) {
        buf[len] = '\n';
        if (write(log_fd, buf, len + 1) != (ssize_t)(len + 1))
            fprintf(stderr, "fakellm: writing the log: %s\n", strerror(errno));
    }
    free(buf);
    json_decref(line);
}

/* ------------------------------------------------------------------------
 * Workers and their PRNG.
 */

struct worker {
    int index;
    pthread_t thread;
    struct event_base *base;
    struct evhttp *http;
    int wake[2]; /* a byte written here stops this worker's loop */
    struct event *wake_ev, *sigint_ev, *sigterm_ev;
    uint64_t rng; /* xorshift64* state, never 0 */
};

static struct worker *workers;

static uint64_t rng_next(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

/* Uniform in [0, 1). */
static double rng_unit(uint64_t *s)
{
    return (double)(rng_next(s) >> 11) * 0x1.0p-53;
}

/* ------------------------------------------------------------------------
 * Answers.
 */

/*
 * Appends s as a JSON string literal. The text comes from jansson, which
 * only accepts valid UTF-8 without NUL, and is only ever cut at ASCII
 * whitespace, so escaping quotes, backslashes and control bytes suffices.
 */
static void add_json_string(struct evbuffer *out, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0;
    evbuffer_add(out, "\"", 1);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        evbuffer_add(out, s + run, i - run);
        if (c == '"' || c == '\\' || c == '\n' || c == '\t') {
            char esc[2] = {'\\', c == '\n' ? 'n' : c == '\t' ? 't' : (char)c};
            evbuffer_add(out, esc, sizeof(esc));
        } else {
            char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            evbuffer_add(out, esc, sizeof(esc));
        }
        run = i + 1;
    }
    evbuffer_add(out, s + run, len - run);
    evbuffer_add(out, "\"", 1);
}

enum answer_kind { ANSWER_BODY, ANSWER_STREAM, ANSWER_HANG };

struct chat {
    struct evhttp_request *req; /* owned by evhttp while attached */
    struct evhttp_connection *evcon;
    struct event timer, watch; /* latency timer; close detection */
    bool waiting;              /* close callback, watch and in_flight are set */
    enum answer_kind kind;
    int status;
    const char *content_type;
    long retry_after; /* seconds for a 429 */
    struct evbuffer *body;
    /* streaming: */
    char *content, *prefix;              /* prefix: the events' common `{"id":...,"model":...,` */
    size_t content_len, pos, prefix_len; /* pos: next byte of content to stream */
    long words, sent, prompt_tokens, completion_tokens;
    bool include_usage, started;
    const char *finish_reason;
    uint64_t start_us, latency_us;
};

static void chat_on_timer(evutil_socket_t fd, short what, void *arg);
static void chat_on_readable(evutil_socket_t fd, short what, void *arg);

static struct chat *chat_new(struct worker *w, struct evhttp_request *req)
{
    struct chat *chat = xcalloc(1, sizeof(*chat));
    chat->req = req;
    chat->evcon = evhttp_request_get_connection(req);
    chat->body = evbuffer_new();
    chat->content_type = "application/json";
    chat->status = 200;
    chat->start_us = now_us(CLOCK_MONOTONIC);
    evtimer_assign(&chat->timer, w->base, chat_on_timer, chat);
    event_assign(&chat->watch, w->base, bufferevent_getfd(evhttp_connection_get_bufferevent(chat->evcon)), EV_READ,
                 chat_on_readable, chat);
    return chat;
}

/* Frees the chat, not its request (evhttp owns that, or the close callback
 * already freed it). The chat must not be waiting. */
static void chat_free(struct chat *chat)
{
    evbuffer_free(chat->body);
    free(chat->content);
    free(chat->prefix);
    free(chat);
}

static void chat_on_close(struct evhttp_connection *evcon, void *arg)
{
    struct chat *chat = arg;
    (void)evcon;
    event_del(&chat->timer);
    event_del(&chat->watch);
    atomic_fetch_sub(&stats.in_flight, 1);
    atomic_fetch_add(&stats.aborted, 1);
    /* A write error detaches the request from its connection before the
     * close, and then nobody but us will free it. */
    if (evhttp_request_get_connection(chat->req) == NULL)
        evhttp_request_free(chat->req);
    chat_free(chat);
}

/* Makes the chat survive its callback: the close callback and socket watch
 * catch a client that leaves; then arms the timer (unless it hangs). */
static void chat_wait(struct chat *chat, uint64_t delay_us)
{
    if (!chat->waiting) {
        chat->waiting = true;
        atomic_fetch_add(&stats.in_flight, 1);
        evhttp_connection_set_closecb(chat->evcon, chat_on_close, chat);
        event_add(&chat->watch, NULL);
    }
    if (delay_us != NO_TIMER) {
        struct timeval tv = {.tv_sec = (time_t)(delay_us / 1000000u), .tv_usec = (suseconds_t)(delay_us % 1000000u)};
        evtimer_add(&chat->timer, &tv);
    }
}

/* Undoes chat_wait before the final send, because completing the answer
 * may close the connection and must not run chat_on_close. */
static void chat_unwait(struct chat *chat)
{
    if (!chat->waiting)
        return;
    chat->waiting = false;
    atomic_fetch_sub(&stats.in_flight, 1);
    evhttp_connection_set_closecb(chat->evcon, NULL, NULL);
    event_del(&chat->timer);
    event_del(&chat->watch);
}

static void chat_on_readable(evutil_socket_t fd, short what, void *arg)
{
    struct chat *chat = arg;
    char c;
    (void)what;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0)
        return; /* a pipelined request: evhttp reads it after our answer */
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        event_add(&chat->watch, NULL);
        return;
    }
    evhttp_connection_free(chat->evcon); /* runs chat_on_close, which frees chat */
}

static void add_headers(struct evhttp_request *req, const char *content_type)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", content_type);
}

/* Sends a complete non-streamed answer and frees the chat. */
static void chat_send_body(struct chat *chat)
{
    chat_unwait(chat);
    add_headers(chat->req, chat->content_type);
    if (chat->status == 429) {
        char s[32], ms[32];
        snprintf(s, sizeof(s), "%ld", chat->retry_after);
        snprintf(ms, sizeof(ms), "%ld", chat->retry_after * 1000);
        evhttp_add_header(evhttp_request_get_output_headers(chat->req), "Retry-After", s);
        evhttp_add_header(evhttp_request_get_output_headers(chat->req), "retry-after-ms", ms);
    }
    evhttp_send_reply(chat->req, chat->status, NULL, chat->body);
    stats_answered(chat->status);
    chat_free(chat);
}

/* Streamed word k is due at latency/2 + k * step; the end at latency. */
static uint64_t stream_due_us(const struct chat *chat, long k)
{
    uint64_t ttft = chat->latency_us / 2;
    if (k >= chat->words)
        return chat->latency_us;
    return ttft + (chat->latency_us - ttft) * (uint64_t)k / (uint64_t)chat->words;
}

static void add_event_head(struct chat *chat, struct evbuffer *out)
{
    ADD_LIT(out, "data: ");
    evbuffer_add(out, chat->prefix, chat->prefix_len);
    ADD_LIT(out, "\"choices\":[{\"index\":0,\"delta\":");
}

static void add_event_tail(struct chat *chat, struct evbuffer *out, const char *finish_reason)
{
    evbuffer_add_printf(out, "},\"logprobs\":null,\"finish_reason\":%s%s%s}]%s}\n\n", finish_reason ? "\"" : "",
                        finish_reason ? finish_reason : "null", finish_reason ? "\"" : "",
                        chat->include_usage ? ",\"usage\":null" : "");
}

/* Appends the finish event, the usage event and [DONE]. */
static void add_stream_end(struct chat *chat, struct evbuffer *out)
{
    add_event_head(chat, out);
    ADD_LIT(out, "{");
    add_event_tail(chat, out, chat->finish_reason);
    if (chat->include_usage)
        evbuffer_add_printf(out,
                            "data: %s\"choices\":[],\"usage\":{\"prompt_tokens\":%ld,\"completion_tokens\":%ld,"
                            "\"total_tokens\":%ld}}\n\n",
                            chat->prefix, chat->prompt_tokens, chat->completion_tokens,
                            chat->prompt_tokens + chat->completion_tokens);
    ADD_LIT(out, "data: [DONE]\n\n");
}

/*
 * Sends every stream event that is due, as one HTTP chunk, then either
 * waits for the next one or ends the answer and frees the chat.
 */
static void chat_stream_step(struct chat *chat)
{
    uint64_t elapsed = now_us(CLOCK_MONOTONIC) - chat->start_us;
    struct evbuffer *out = chat->body;
    if (!chat->started) {
        chat->started = true;
        add_headers(chat->req, "text/event-stream");
        evhttp_add_header(evhttp_request_get_output_headers(chat->req), "Cache-Control", "no-cache");
        evhttp_send_reply_start(chat->req, 200, NULL);
        add_event_head(chat, out);
        ADD_LIT(out, "{\"role\":\"assistant\",\"content\":\"\"");
        add_event_tail(chat, out, NULL);
    }
    while (chat->sent < chat->words && stream_due_us(chat, chat->sent) <= elapsed) {
        /* Each word carries its leading whitespace; the last one also the
         * trailing whitespace, so the pieces add up to the content. */
        size_t end =
            ++chat->sent == chat->words ? chat->content_len : word_end(chat->content, chat->content_len, chat->pos);
        add_event_head(chat, out);
        ADD_LIT(out, "{\"content\":");
        add_json_string(out, chat->content + chat->pos, end - chat->pos);
        add_event_tail(chat, out, NULL);
        chat->pos = end;
    }
    bool done = chat->sent == chat->words && chat->latency_us <= elapsed;
    if (done) {
        add_stream_end(chat, out);
        chat_unwait(chat);
    }
    evhttp_send_reply_chunk(chat->req, out);
    if (!done) {
        chat_wait(chat, stream_due_us(chat, chat->sent) - elapsed);
        return;
    }
    evhttp_send_reply_end(chat->req);
    stats_answered(200);
    chat_free(chat);
}

static void chat_on_timer(evutil_socket_t fd, short what, void *arg)
{
    struct chat *chat = arg;
    (void)fd;
    (void)what;
    if (chat->kind == ANSWER_STREAM)
        chat_stream_step(chat);
    else
        chat_send_body(chat);
}

static void add_json(struct evbuffer *out, json_t *value)
{
    char *s = json_dumps(value, JSON_COMPACT);
    assert(s != NULL); /* only a NULL value (a bad json_pack format) fails */
    evbuffer_add(out, s, strlen(s));
    free(s);
}

/* Writes OpenAI's error shape; code may be NULL. */
static void add_error(struct evbuffer *out, const char *message, const char *type, const char *code)
{
    json_t *err =
        json_pack("{s:{s:s, s:s, s:n, s:s?}}", "error", "message", message, "type", type, "param", "code", code);
    add_json(out, err);
    json_decref(err);
}

static void error_for_status(int status, const char **type, const char **code)
{
    *code = NULL;
    if (status == 429)
        *type = *code = "rate_limit_exceeded";
    else if (status == 401)
        *type = "authentication_error", *code = "invalid_api_key";
    else if (status == 403)
        *type = "permission_error";
    else if (status == 404)
        *type = "not_found_error";
    else if (status >= 500)
        *type = "server_error";
    else
        *type = "invalid_request_error";
}

/* Answers at once with an error (not a chat: no latency applies). */
static void reply_error(struct evhttp_request *req, int status, const char *message)
{
    const char *type, *code;
    struct evbuffer *out = evbuffer_new();
    error_for_status(status, &type, &code);
    add_error(out, message, type, code);
    add_headers(req, "application/json");
    evhttp_send_reply(req, status, NULL, out);
    evbuffer_free(out);
}

/* ------------------------------------------------------------------------
 * Chat completions.
 */

/* What one request asks for, taken from its body; pointers borrow from it. */
struct chat_request {
    json_t *body, *messages, *model, *max_tokens;
    const char *model_name;
    bool stream, include_usage;
    long prompt_tokens;
    char *user; /* last user message, malloc'd */
    size_t user_len;
    struct directives d; /* from the last user message */
    char *stripped;      /* user without directives, malloc'd */
    size_t stripped_len;
};

static void chat_request_free(struct chat_request *cr)
{
    json_decref(cr->body);
    free(cr->user);
    free(cr->stripped);
}

/* Parses and checks the body; returns 0, or -1 with the reason in err. */
static int chat_request_parse(struct evhttp_request *req, struct chat_request *cr, char *err, size_t errlen)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t len = evbuffer_get_length(in), i;
    json_error_t jerr;
    json_t *msg;
    *cr = (struct chat_request){0};
    cr->body = json_loadb((const char *)evbuffer_pullup(in, -1), len, 0, &jerr);
    if (!json_is_object(cr->body)) {
        snprintf(err, errlen, "request body is not a JSON object: %s", cr->body ? "wrong type" : jerr.text);
        return -1;
    }
    if (request_check(cr->body, err, errlen))
        return -1;
    cr->messages = json_object_get(cr->body, "messages");
    cr->model = json_object_get(cr->body, "model");
    cr->model_name = cr->model ? json_string_value(cr->model) : "fake";
    cr->stream = json_is_true(json_object_get(cr->body, "stream"));
    cr->include_usage = json_is_true(json_object_get(json_object_get(cr->body, "stream_options"), "include_usage"));
    cr->max_tokens = json_object_get(cr->body, "max_completion_tokens");
    if (cr->max_tokens == NULL || json_is_null(cr->max_tokens))
        cr->max_tokens = json_object_get(cr->body, "max_tokens");
    if (json_is_null(cr->max_tokens))
        cr->max_tokens = NULL;
    if (cr->max_tokens && (!json_is_integer(cr->max_tokens) || json_integer_value(cr->max_tokens) < 0)) {
        snprintf(err, errlen, "'max_tokens' must be a non-negative integer");
        return -1;
    }
    log_request(cr->model, cr->messages, cr->stream, cr->max_tokens);
    json_array_foreach(cr->messages, i, msg)
    {
        json_t *content = json_object_get(msg, "content");
        cr->prompt_tokens += content_words(content);
        if (strcmp(json_string_value(json_object_get(msg, "role")), "user") == 0) {
            free(cr->user);
            cr->user = content_text(content, &cr->user_len);
        }
    }
    if (cr->user == NULL) { /* no user message: echo nothing */
        cr->user = xcalloc(1, 1);
    }
    return directives_parse(cr->user, cr->user_len, &cr->d, &cr->stripped, &cr->stripped_len, err, errlen);
}

/* Directive faults first (gated by fail-times), then random ones. The
 * PRNG is drawn for every request so that its sequence depends only on
 * the number of requests, not on which of them carried directives. */
static enum answer_kind pick_fault(struct worker *w, const struct chat_request *cr, int *status, bool *malformed)
{
    const struct directives *d = &cr->d;
    double rates = cfg.rate_429 + cfg.rate_500 + cfg.rate_hang + cfg.rate_malformed;
    double u = rates > 0 ? rng_unit(&w->rng) : 1.0;
    *status = 200;
    *malformed = false;
    if (d->status || d->hang || d->malformed || d->fail_times >= 0) {
        if (d->fail_times >= 0 && fail_map_bump(cr->user, cr->user_len) >= d->fail_times)
            return cr->stream ? ANSWER_STREAM : ANSWER_BODY;
        if (d->hang)
            return ANSWER_HANG;
        *malformed = d->malformed;
        *status = d->malformed ? 200 : d->status ? (int)d->status : 500;
        return ANSWER_BODY;
    }
    if (u < cfg.rate_429)
        *status = 429;
    else if (u < cfg.rate_429 + cfg.rate_500)
        *status = 500;
    else if (u < cfg.rate_429 + cfg.rate_500 + cfg.rate_hang)
        return ANSWER_HANG;
    else if (u < rates)
        *malformed = true;
    return cr->stream && *status == 200 && !*malformed ? ANSWER_STREAM : ANSWER_BODY;
}

/* Sets chat->content: the reply, cut to max_tokens words. */
static void chat_set_content(struct chat *chat, const struct chat_request *cr)
{
    size_t cap = cr->stripped_len + 64;
    if (cr->d.reply) {
        chat->content = xmalloc(cr->d.reply_len + 1);
        memcpy(chat->content, cr->d.reply, cr->d.reply_len);
        chat->content_len = cr->d.reply_len;
    } else {
        chat->content = xmalloc(cap);
        chat->content_len = (size_t)snprintf(chat->content, cap, "echo: %s [messages=%zu]", cr->stripped,
                                             json_array_size(cr->messages));
    }
    chat->content[chat->content_len] = '\0';
    chat->words = count_words(chat->content, chat->content_len);
    chat->finish_reason = "stop";
    if (cr->max_tokens && chat->words > json_integer_value(cr->max_tokens)) {
        size_t end = 0;
        chat->words = (long)json_integer_value(cr->max_tokens);
        for (long k = 0; k < chat->words; k++)
            end = word_end(chat->content, chat->content_len, end);
        chat->content_len = end;
        chat->content[end] = '\0';
        chat->finish_reason = "length";
    }
    chat->completion_tokens = chat->words;
    chat->prompt_tokens = cr->prompt_tokens;
}

static void chat_build_body(struct chat *chat, const struct chat_request *cr, unsigned long long id, long created)
{
    char idbuf[48];
    snprintf(idbuf, sizeof(idbuf), "chatcmpl-%llu", id);
    json_t *resp =
        json_pack("{s:s, s:s, s:I, s:s, s:[{s:i, s:{s:s, s:s%, s:n}, s:n, s:s}], s:{s:I, s:I, s:I}}", "id", idbuf,
                  "object", "chat.completion", "created", (json_int_t)created, "model", cr->model_name, "choices",
                  "index", 0, "message", "role", "assistant", "content", chat->content, chat->content_len, "refusal",
                  "logprobs", "finish_reason", chat->finish_reason, "usage", "prompt_tokens",
                  (json_int_t)chat->prompt_tokens, "completion_tokens", (json_int_t)chat->completion_tokens,
                  "total_tokens", (json_int_t)(chat->prompt_tokens + chat->completion_tokens));
    add_json(chat->body, resp);
    json_decref(resp);
}

/* The part every chunk of a stream shares, up to "choices". */
static void chat_build_prefix(struct chat *chat, const struct chat_request *cr, unsigned long long id, long created)
{
    struct evbuffer *b = evbuffer_new();
    evbuffer_add_printf(
        b, "{\"id\":\"chatcmpl-%llu\",\"object\":\"chat.completion.chunk\",\"created\":%ld,\"model\":", id, created);
    add_json_string(b, cr->model_name, strlen(cr->model_name));
    ADD_LIT(b, ",\"system_fingerprint\":null,");
    size_t len = evbuffer_get_length(b);
    chat->prefix = xmalloc(len + 1);
    evbuffer_remove(b, chat->prefix, len);
    chat->prefix[len] = '\0';
    chat->prefix_len = len;
    evbuffer_free(b);
}

static void chat_build_fault(struct chat *chat, const struct chat_request *cr)
{
    char message[128];
    const char *type, *code;
    if (chat->status == 200) { /* malformed */
        atomic_fetch_add(&stats.malformed, 1);
        static const char json_cut[] = "{\"id\":\"chatcmpl-malformed\",\"object\":\"chat.completion\",\"choices\":[";
        static const char sse_cut[] = "data: {\"choices\":[{\"delta\":{\"content\":\n\ndata: [DONE]\n\n";
        chat->content_type = cr->stream ? "text/event-stream" : "application/json";
        evbuffer_add(chat->body, cr->stream ? sse_cut : json_cut,
                     cr->stream ? sizeof(sse_cut) - 1 : sizeof(json_cut) - 1);
        return;
    }
    error_for_status(chat->status, &type, &code);
    if (chat->status == 429)
        snprintf(message, sizeof(message), "Rate limit reached for %s (fakellm fault).", cr->model_name);
    else
        snprintf(message, sizeof(message), "fakellm fault: status %d", chat->status);
    add_error(chat->body, message, type, code);
}

/* Latency of this request in microseconds: the directive, or the flags. */
static uint64_t chat_latency_us(struct worker *w, const struct chat_request *cr)
{
    long ms = cfg.latency_ms;
    if (cfg.jitter_ms > 0) /* drawn always, so the sequence stays predictable */
        ms += (long)(rng_next(&w->rng) % (uint64_t)(cfg.jitter_ms + 1));
    if (cr->d.latency_ms >= 0)
        ms = cr->d.latency_ms;
    return (uint64_t)ms * 1000u;
}

static void handle_chat(struct worker *w, struct evhttp_request *req)
{
    struct chat_request cr;
    char err[256];
    int status;
    bool malformed;
    atomic_fetch_add(&stats.requests, 1);
    if (chat_request_parse(req, &cr, err, sizeof(err))) {
        reply_error(req, 400, err);
        stats_answered(400);
        chat_request_free(&cr);
        return;
    }
    struct chat *chat = chat_new(w, req);
    chat->kind = pick_fault(w, &cr, &status, &malformed);
    chat->status = status;
    chat->retry_after = cr.d.retry_after;
    chat->latency_us = chat_latency_us(w, &cr);
    chat->include_usage = cr.include_usage;
    unsigned long long id = atomic_fetch_add(&stats.next_id, 1) + 1;
    long created = (long)time(NULL);
    if (chat->kind == ANSWER_HANG) {
        atomic_fetch_add(&stats.hangs, 1);
        chat_wait(chat, NO_TIMER);
    } else if (status != 200 || malformed) {
        chat_build_fault(chat, &cr);
    } else {
        chat_set_content(chat, &cr);
        if (chat->kind == ANSWER_STREAM)
            chat_build_prefix(chat, &cr, id, created);
        else
            chat_build_body(chat, &cr, id, created);
    }
    chat_request_free(&cr);
    if (chat->kind == ANSWER_HANG)
        return;
    uint64_t first = chat->kind == ANSWER_STREAM ? chat->latency_us / 2 : chat->latency_us;
    if (first > 0)
        chat_wait(chat, first);
    else
        chat_on_timer(-1, 0, chat);
}

/* ------------------------------------------------------------------------
 * Other endpoints and routing.
 */

static void reply_json(struct evhttp_request *req, json_t *value)
{
    struct evbuffer *out = evbuffer_new();
    add_json(out, value);
    json_decref(value);
    add_headers(req, "application/json");
    evhttp_send_reply(req, 200, NULL, out);
    evbuffer_free(out);
}

static void handle_stats(struct evhttp_request *req)
{
    json_t *by_status = json_object();
    for (int code = 100; code < 600; code++) {
        unsigned long long n = atomic_load(&stats.by_status[code]);
        char key[16];
        snprintf(key, sizeof(key), "%d", code);
        if (n > 0)
            json_object_set_new(by_status, key, json_integer((json_int_t)n));
    }
    reply_json(req,
               json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:o}", "requests", (json_int_t)atomic_load(&stats.requests),
                         "completed", (json_int_t)atomic_load(&stats.completed), "hangs",
                         (json_int_t)atomic_load(&stats.hangs), "malformed", (json_int_t)atomic_load(&stats.malformed),
                         "aborted", (json_int_t)atomic_load(&stats.aborted), "in_flight",
                         (json_int_t)atomic_load(&stats.in_flight), "status", by_status));
}

/* Zeroes the counters (not in_flight, which tracks live chats) and the
 * fail-times map. The PRNG goes on: restart the server to replay it. */
static void handle_reset(struct evhttp_request *req)
{
    atomic_store(&stats.requests, 0);
    atomic_store(&stats.completed, 0);
    atomic_store(&stats.hangs, 0);
    atomic_store(&stats.malformed, 0);
    atomic_store(&stats.aborted, 0);
    atomic_store(&stats.next_id, 0);
    for (int code = 0; code < 600; code++)
        atomic_store(&stats.by_status[code], 0);
    pthread_mutex_lock(&fail_map_lock);
    fail_map_clear_locked();
    pthread_mutex_unlock(&fail_map_lock);
    reply_json(req, json_pack("{s:b}", "reset", 1));
}

static void reply_text(struct evhttp_request *req, const char *text)
{
    struct evbuffer *out = evbuffer_new();
    evbuffer_add(out, text, strlen(text));
    add_headers(req, "text/plain");
    evhttp_send_reply(req, 200, NULL, out);
    evbuffer_free(out);
}

static bool authorized(struct evhttp_request *req)
{
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(req), "Authorization");
    return cfg.api_key == NULL || (h && strncmp(h, "Bearer ", 7) == 0 && strcmp(h + 7, cfg.api_key) == 0);
}

static void on_request(struct evhttp_request *req, void *arg)
{
    struct worker *w = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    bool get = cmd == EVHTTP_REQ_GET || cmd == EVHTTP_REQ_HEAD, post = cmd == EVHTTP_REQ_POST;
    bool is_chat = path && (strcmp(path, "/v1/chat/completions") == 0 || strcmp(path, "/chat/completions") == 0);
    bool models = path && (strcmp(path, "/v1/models") == 0 || strcmp(path, "/models") == 0);
    if (path == NULL) {
        reply_error(req, 404, "no such path");
    } else if ((is_chat || models) && !authorized(req)) {
        if (is_chat) {
            atomic_fetch_add(&stats.requests, 1);
            stats_answered(401);
        }
        reply_error(req, 401, "Incorrect API key provided.");
    } else if (is_chat && post) {
        handle_chat(w, req);
    } else if (models && get) {
        reply_json(req, json_pack("{s:s, s:[{s:s, s:s, s:i, s:s}]}", "object", "list", "data", "id", "fake", "object",
                                  "model", "created", 0, "owned_by", "fakellm"));
    } else if (strcmp(path, "/healthz") == 0 && get) {
        reply_text(req, "ok");
    } else if (strcmp(path, "/stats") == 0 && get) {
        handle_stats(req);
    } else if (strcmp(path, "/reset") == 0 && post) {
        handle_reset(req);
    } else if (is_chat || models || strcmp(path, "/healthz") == 0 || strcmp(path, "/stats") == 0 ||
               strcmp(path, "/reset") == 0) {
        reply_error(req, 405, "method not allowed");
    } else {
        reply_error(req, 404, "no such path");
    }
}

/* ------------------------------------------------------------------------
 * Startup and shutdown.
 */

/* Opens a non-blocking listening socket; *port 0 is replaced by the port
 * the kernel chose. Returns the socket or -1 with a message printed. */
static int listen_on(const char *host, long *port, bool reuseport)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *ai;
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof(ss);
    char service[16];
    int one = 1, fd = -1;
    snprintf(service, sizeof(service), "%ld", *port);
    int rc = getaddrinfo(host, service, &hints, &ai);
    if (rc) {
        fprintf(stderr, "fakellm: %s: %s\n", host, gai_strerror(rc));
        return -1;
    }
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
        (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one))) ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, LISTEN_BACKLOG) ||
        getsockname(fd, (struct sockaddr *)&ss, &sslen)) {
        fprintf(stderr, "fakellm: listening on %s:%ld: %s\n", host, *port, strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return -1;
    }
    freeaddrinfo(ai);
    *port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                           : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;
}

/*
 * Opens one listener per thread into fds and returns the port, or -1.
 * Linux lets any two SO_REUSEPORT sockets of one user share a port, so a
 * second fakellm would silently take half of the first one's traffic. The
 * first bind is therefore a plain one: it fails on a port in use and turns
 * port 0 into a free port. One thread keeps it; with several, it is closed
 * and the SO_REUSEPORT group binds the same port (a start-up race with
 * another process in that instant is accepted).
 */
static long open_listeners(int *fds)
{
    long port = cfg.port;
    int probe = listen_on(cfg.host, &port, false);
    if (probe < 0 || cfg.threads == 1) {
        fds[0] = probe;
        return probe < 0 ? -1 : port;
    }
    close(probe);
    for (long i = 0; i < cfg.threads; i++) {
        fds[i] = listen_on(cfg.host, &port, true);
        if (fds[i] < 0) {
            while (i-- > 0)
                close(fds[i]);
            return -1;
        }
    }
    return port;
}

static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    struct worker *w = arg;
    (void)fd;
    (void)what;
    event_base_loopbreak(w->base);
}

/* Stops the loops of workers 1..n-1 through their pipes: without
 * evthread_use_pthreads, a file descriptor is the only safe way to reach
 * another thread's event_base. */
static void wake_workers(long n)
{
    for (long i = 1; i < n; i++)
        if (write(workers[i].wake[1], "x", 1) < 0)
            fprintf(stderr, "fakellm: waking thread %ld: %s\n", i, strerror(errno));
}

/* SIGINT/SIGTERM arrive on worker 0, the main thread: the others block them. */
static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    struct worker *w = arg;
    (void)sig;
    (void)what;
    wake_workers(cfg.threads);
    event_base_loopbreak(w->base);
}

/* Sets up a worker around its listening socket fd, which it owns from now. */
static int worker_init(struct worker *w, int index, int fd)
{
    w->index = index;
    w->rng = (uint64_t)cfg.seed * 0x9E3779B97F4A7C15ULL + (uint64_t)index + 1;
    if (w->rng == 0) /* the one state xorshift never leaves */
        w->rng = 1;
    w->base = event_base_new();
    w->http = w->base ? evhttp_new(w->base) : NULL;
    if (w->http == NULL || pipe2(w->wake, O_CLOEXEC | O_NONBLOCK) ||
        evhttp_accept_socket_with_handle(w->http, fd) == NULL) {
        close(fd);
        return -1;
    }
    evhttp_set_gencb(w->http, on_request, w);
    evhttp_set_max_body_size(w->http, MAX_BODY_BYTES);
    evhttp_set_max_headers_size(w->http, MAX_HEADER_BYTES);
    evhttp_set_timeout(w->http, (int)cfg.timeout_s);
    evhttp_set_allowed_methods(w->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD | EVHTTP_REQ_POST | EVHTTP_REQ_PUT |
                                            EVHTTP_REQ_DELETE | EVHTTP_REQ_PATCH | EVHTTP_REQ_OPTIONS);
    w->wake_ev = event_new(w->base, w->wake[0], EV_READ, on_wake, w);
    event_add(w->wake_ev, NULL);
    if (index == 0) {
        w->sigint_ev = evsignal_new(w->base, SIGINT, on_signal, w);
        w->sigterm_ev = evsignal_new(w->base, SIGTERM, on_signal, w);
        event_add(w->sigint_ev, NULL);
        event_add(w->sigterm_ev, NULL);
    }
    return 0;
}

/* Frees a worker after its loop ended. evhttp_free closes every connection,
 * which frees the chats still waiting on them. */
static void worker_free(struct worker *w)
{
    if (w->http)
        evhttp_free(w->http);
    if (w->wake_ev)
        event_free(w->wake_ev);
    if (w->sigint_ev)
        event_free(w->sigint_ev);
    if (w->sigterm_ev)
        event_free(w->sigterm_ev);
    if (w->wake[0] > 0) {
        close(w->wake[0]);
        close(w->wake[1]);
    }
    if (w->base)
        event_base_free(w->base);
}

static void *worker_run(void *arg)
{
    struct worker *w = arg;
    event_base_dispatch(w->base);
    return NULL;
}

/* Tens of thousands of connections need as many descriptors. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl))
            fprintf(stderr, "fakellm: raising RLIMIT_NOFILE: %s\n", strerror(errno));
    }
}

int main(int argc, char **argv)
{
    int rc = parse_args(argc, argv);
    sigset_t block, old;
    if (rc)
        return rc > 0 ? 0 : 2;
    event_set_mem_functions(xmalloc, xrealloc, free);
    json_set_alloc_funcs(xmalloc, free);
    raise_nofile();
    signal(SIGPIPE, SIG_IGN); /* a client that left must not kill the server */
    if (cfg.log_path) {
        log_fd = open(cfg.log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (log_fd < 0) {
            fprintf(stderr, "fakellm: %s: %s\n", cfg.log_path, strerror(errno));
            return 1;
        }
    }
    workers = xcalloc((size_t)cfg.threads, sizeof(*workers));
    int *fds = xcalloc((size_t)cfg.threads, sizeof(*fds));
    long port = open_listeners(fds);
    rc = port < 0 ? -1 : 0;
    for (long i = 0; i < cfg.threads && rc == 0; i++) {
        rc = worker_init(&workers[i], (int)i, fds[i]);
        if (rc) /* close the sockets that no worker took yet */
            for (long k = i + 1; k < cfg.threads; k++)
                close(fds[k]);
    }
    free(fds);
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    long started = 1; /* worker 0 runs on this thread */
    while (rc == 0 && started < cfg.threads) {
        rc = pthread_create(&workers[started].thread, NULL, worker_run, &workers[started]);
        started += rc == 0;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc == 0) {
        bool v6 = strchr(cfg.host, ':') != NULL;
        fprintf(stderr, "fakellm listening on http://%s%s%s:%ld\n", v6 ? "[" : "", cfg.host, v6 ? "]" : "", port);
        worker_run(&workers[0]);
    } else {
        fprintf(stderr, "fakellm: startup failed\n");
        wake_workers(started);
    }
    for (long i = 1; i < started; i++)
        pthread_join(workers[i].thread, NULL);
    for (long i = 0; i < cfg.threads; i++)
        worker_free(&workers[i]);
    free(workers);
    if (log_fd >= 0)
        close(log_fd);
    libevent_global_shutdown();
    return rc ? 1 : 0;
}
