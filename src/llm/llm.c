/* llm.c - see llm.h. The libevent/multi_socket glue follows curl's ephiperfifo/hiperfifo examples. */
#include "llm/llm.h"

#include "core/config.h"
#include "core/log.h"
#include "core/util.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <event2/event.h>
#include <event2/event_struct.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define MAX_ENDPOINTS 16
/* Calls per curl multi handle. libcurl 7.88 looks for a reusable connection by walking every connection of the
 * host's bundle in the multi's connection cache (url.c ConnectionExists), busy ones included, so each new call
 * costs O(connections). Spreading the calls over several multi handles, each with its own cache, bounds that
 * walk by this number. */
#define CALLS_PER_SHARD 128
#define LLM_RECV_BUFFER 2048L /* curl accepts 1,024 to 10 MiB (CURLOPT_BUFFERSIZE) */
#define MAX_SHARDS 128

/* One base URL and the calls in flight to it. */
struct endpoint {
    char base[1024]; /* without trailing slashes */
    long reserved;   /* reservations held (see llm_reserve) */
};

/* One curl multi handle, its connection cache and its timer; all shards run on the same loop. */
struct shard {
    struct llm *llm;
    CURLM *multi;
    struct event *timer;
    int in_flight;
};

struct llm {
    struct event_base *base;
    struct endpoint ep[MAX_ENDPOINTS];
    int nep;
    const struct config *cfg;
    struct shard *shards;
    int nshards;
    struct curl_slist *headers;
    struct llm_call *calls; /* every call in flight, so that llm_free() can cancel them */
    int in_flight;
    CURL **idle; /* easy handles kept for reuse (reset), so a call does not allocate one */
    int nidle, idle_cap;
};

struct llm_call {
    struct llm *llm;
    struct shard *shard;
    struct endpoint *ep;
    struct llm_call *prev, *next;
    CURL *eh;
    llm_cb *cb;
    llm_data_cb *on_data; /* streaming: 2xx bodies go here */
    int status;           /* 0 until known, then the HTTP status of the final answer */
    void *arg;
    struct buf body;
    bool too_large;
    bool block_private, blocked;
    struct curl_slist *headers; /* per-call headers (llm_request), or NULL for the LLM's */
    char retry_after[64];
    char retry_after_ms[32];
    int64_t started_ms;
    char errbuf[CURL_ERROR_SIZE];
};

/* The event watching one socket for curl; hung on the socket with curl_multi_assign. */
struct sock {
    struct event ev;
};

static void check_done(struct shard *sh);

/* True for addresses a webhook must not reach: loopback, private (RFC 1918, ULA), link-local, CGNAT, unspecified,
 * multicast and broadcast, and IPv4-mapped IPv6 forms of those. */
static bool addr_private(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET) {
        uint32_t a = ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr);
        return (a >> 24) == 0 || (a >> 24) == 10 || (a >> 24) == 127 || (a >> 16) == 0xA9FE || (a >> 20) == 0xAC1 ||
               (a >> 16) == 0xC0A8 || (a >> 22) == (100u << 2 | 1) || (a >> 28) == 0xE || a == 0xFFFFFFFFu;
    }
    if (sa->sa_family == AF_INET6) {
        const unsigned char *b = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(b, mapped, 12) == 0) {
            struct sockaddr_in v4 = {.sin_family = AF_INET};
            memcpy(&v4.sin_addr, b + 12, 4);
            return addr_private((const struct sockaddr *)&v4);
        }
        bool zero = true;
        for (int i = 0; i < 15; i++)
            zero = zero && b[i] == 0;
        return (zero && (b[15] == 0 || b[15] == 1)) || (b[0] & 0xfe) == 0xfc ||
               (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) || b[0] == 0xff;
    }
    return true;
}

static curl_socket_t opensocket_cb(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
    (void)purpose;
    struct llm_call *call = clientp;
    if (addr_private(&a->addr)) {
        call->blocked = true;
        return CURL_SOCKET_BAD;
    }
    return socket(a->family, a->socktype, a->protocol);
}

static void call_free(struct llm_call *call)
{
    if (call->prev)
        call->prev->next = call->next;
    else
        call->llm->calls = call->next;
    if (call->next)
        call->next->prev = call->prev;
    struct llm *llm = call->llm;
    curl_multi_remove_handle(call->shard->multi, call->eh);
    if (llm->nidle < llm->idle_cap) {
        curl_easy_reset(call->eh); /* keeps its buffers; forgets every option, this call's pointers included */
        llm->idle[llm->nidle++] = call->eh;
    } else {
        curl_easy_cleanup(call->eh);
    }
    curl_slist_free_all(call->headers);
    buf_free(&call->body);
    call->shard->in_flight--;
    llm->in_flight--;
    free(call);
}

static void event_cb(evutil_socket_t fd, short what, void *arg)
{
    struct shard *sh = arg;
    int running;
    int action = ((what & EV_READ) ? CURL_CSELECT_IN : 0) | ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);
    curl_multi_socket_action(sh->multi, fd, action, &running);
    check_done(sh);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct shard *sh = arg;
    int running;
    curl_multi_socket_action(sh->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(sh);
}

static int socket_cb(CURL *eh, curl_socket_t s, int what, void *userp, void *socketp)
{
    (void)eh;
    struct shard *sh = userp;
    struct sock *sk = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (sk) {
            event_del(&sk->ev);
            free(sk);
            curl_multi_assign(sh->multi, s, NULL);
        }
        return 0;
    }
    short kind = EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0) | ((what & CURL_POLL_OUT) ? EV_WRITE : 0);
    if (!sk) {
        sk = xcalloc(1, sizeof *sk);
        curl_multi_assign(sh->multi, s, sk);
    } else {
        event_del(&sk->ev);
    }
    event_assign(&sk->ev, sh->llm->base, s, kind, event_cb, sh);
    event_add(&sk->ev, NULL);
    return 0;
}

static int multi_timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    (void)multi;
    struct shard *sh = userp;
    if (timeout_ms < 0) {
        evtimer_del(sh->timer);
        return 0;
    }
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    evtimer_add(sh->timer, &tv);
    return 0;
}

static size_t write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct llm_call *call = userdata;
    size_t n = size * nmemb;
    if (call->on_data && call->status == 0) {
        long code = 0;
        curl_easy_getinfo(call->eh, CURLINFO_RESPONSE_CODE, &code);
        call->status = (int)code;
    }
    if (call->on_data && call->status >= 200 && call->status < 300)
        return call->on_data(call->arg, ptr, n) == 0 ? n : 0;
    if (buf_append(&call->body, ptr, n)) {
        call->too_large = true;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    return n;
}

static void header_value(const char *line, size_t n, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);
    if (n <= nl + 1 || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return;
    const char *v = line + nl + 1;
    const char *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
        end--;
    size_t len = (size_t)(end - v) < outlen - 1 ? (size_t)(end - v) : outlen - 1;
    memcpy(out, v, len);
    out[len] = '\0';
}

static size_t header_cb(char *line, size_t size, size_t nmemb, void *userdata)
{
    struct llm_call *call = userdata;
    size_t n = size * nmemb;
    header_value(line, n, "retry-after", call->retry_after, sizeof call->retry_after);
    header_value(line, n, "retry-after-ms", call->retry_after_ms, sizeof call->retry_after_ms);
    return n;
}

static void check_done(struct shard *sh)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(sh->multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        struct llm_call *call;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&call);
        struct llm_response res = {0};
        res.curl_code = msg->data.result;
        res.curl_error = res.curl_code ? (call->errbuf[0] ? call->errbuf : curl_easy_strerror(msg->data.result)) : "";
        res.timed_out = msg->data.result == CURLE_OPERATION_TIMEDOUT;
        res.too_large = call->too_large;
        res.blocked = call->blocked;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &res.http_status);
        if (res.curl_code)
            res.http_status = 0;
        res.body = call->body.data ? call->body.data : "";
        res.body_len = call->body.len;
        res.retry_after_ms = llm_parse_retry_after(call->retry_after, call->retry_after_ms, now_ms());
        res.elapsed_ms = mono_ms() - call->started_ms;
        llm_cb *cb = call->cb;
        void *arg = call->arg;
        /* The callback may start new calls; this one is finished with curl but freed after it returns. */
        cb(arg, &res);
        call_free(call);
    }
}

struct llm *llm_new(struct event_base *base, const struct config *cfg)
{
    static bool global_init;
    if (!global_init) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        global_init = true;
    }
    struct llm *llm = xcalloc(1, sizeof *llm);
    llm->base = base;
    llm->cfg = cfg;
    long max = cfg->max_in_flight < 100000 ? cfg->max_in_flight : 100000L;
    llm->nshards = (int)((max + CALLS_PER_SHARD - 1) / CALLS_PER_SHARD);
    if (llm->nshards > MAX_SHARDS)
        llm->nshards = MAX_SHARDS;
    llm->shards = xcalloc((size_t)llm->nshards, sizeof *llm->shards);
    for (int i = 0; i < llm->nshards; i++) {
        struct shard *sh = &llm->shards[i];
        sh->llm = llm;
        sh->multi = curl_multi_init();
        sh->timer = evtimer_new(base, timer_cb, sh);
        curl_multi_setopt(sh->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
        curl_multi_setopt(sh->multi, CURLMOPT_SOCKETDATA, sh);
        curl_multi_setopt(sh->multi, CURLMOPT_TIMERFUNCTION, multi_timer_cb);
        curl_multi_setopt(sh->multi, CURLMOPT_TIMERDATA, sh);
        /* Keep a warm connection for every call that may run at once: calls go to the least busy shard, so a
         * shard holds about its share of them, with room for unevenness. */
        curl_multi_setopt(sh->multi, CURLMOPT_MAXCONNECTS, 2 * max / llm->nshards + 8);
    }
    llm->idle_cap = (int)max;
    llm->idle = xcalloc((size_t)llm->idle_cap, sizeof *llm->idle);
    for (const char *p = cfg->llm_base_url; *p && llm->nep < MAX_ENDPOINTS;) {
        size_t n = strcspn(p, ",");
        const char *s = p, *e = p + n;
        while (s < e && *s == ' ')
            s++;
        while (e > s && (e[-1] == ' ' || e[-1] == '/'))
            e--;
        if (e > s && (size_t)(e - s) < sizeof llm->ep[0].base) {
            memcpy(llm->ep[llm->nep].base, s, (size_t)(e - s));
            llm->ep[llm->nep].base[e - s] = '\0';
            llm->nep++;
        }
        p += n + (p[n] == ',');
    }
    if (llm->nep == 0)
        snprintf(llm->ep[llm->nep++].base, sizeof llm->ep[0].base, "%s", "https://api.openai.com/v1");
    llm->headers = curl_slist_append(NULL, "Content-Type: application/json");
    llm->headers = curl_slist_append(llm->headers, "Expect:"); /* no 100-continue round trip */
    if (cfg->llm_api_key[0]) {
        char auth[1024];
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", cfg->llm_api_key);
        llm->headers = curl_slist_append(llm->headers, auth);
    }
    return llm;
}

int llm_reserve(struct llm *llm)
{
    int best = 0;
    for (int i = 1; i < llm->nep; i++)
        if (llm->ep[i].reserved < llm->ep[best].reserved)
            best = i;
    long limit = llm->cfg->llm_endpoint_max_in_flight;
    if (limit > 0 && llm->ep[best].reserved >= limit)
        return -1;
    llm->ep[best].reserved++;
    return best;
}

void llm_release(struct llm *llm, int ep)
{
    if (ep >= 0 && ep < llm->nep && llm->ep[ep].reserved > 0)
        llm->ep[ep].reserved--;
}

struct llm_call *llm_post(struct llm *llm, int epi, const char *path, const char *body, size_t len, llm_cb *cb,
                          void *arg)
{
    return llm_post_stream(llm, epi, path, body, len, NULL, cb, arg);
}

/* Creates, configures and starts a call; the caller then sets what differs. */
static struct llm_call *call_start(struct llm *llm, const char *url, const struct curl_slist *headers, const char *body,
                                   size_t len, long timeout_ms, llm_data_cb *on_data, llm_cb *cb, void *arg,
                                   bool block_private, bool copy_body)
{
    struct llm_call *call = xcalloc(1, sizeof *call);
    call->llm = llm;
    call->ep = &llm->ep[0];
    call->cb = cb;
    call->on_data = on_data;
    call->arg = arg;
    call->block_private = block_private;
    call->started_ms = mono_ms();
    buf_init(&call->body, (size_t)llm->cfg->llm_max_response_bytes);
    CURL *eh = llm->nidle ? llm->idle[--llm->nidle] : curl_easy_init();
    if (!eh) {
        log_error("curl_easy_init failed");
        abort();
    }
    call->eh = eh;
    if (headers) {
        for (const struct curl_slist *h = headers; h; h = h->next)
            call->headers = curl_slist_append(call->headers, h->data);
    }
    curl_easy_setopt(eh, CURLOPT_URL, url);
    curl_easy_setopt(eh, CURLOPT_HTTPHEADER, call->headers ? call->headers : llm->headers);
    curl_easy_setopt(eh, CURLOPT_POSTFIELDSIZE, (long)len);
    /* The worker keeps its request body until the call ends (for retries), so curl need not copy it. */
    curl_easy_setopt(eh, copy_body ? CURLOPT_COPYPOSTFIELDS : CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(eh, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(eh, CURLOPT_WRITEDATA, call);
    curl_easy_setopt(eh, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(eh, CURLOPT_HEADERDATA, call);
    curl_easy_setopt(eh, CURLOPT_PRIVATE, call);
    curl_easy_setopt(eh, CURLOPT_ERRORBUFFER, call->errbuf);
    curl_easy_setopt(eh, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(eh, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(eh, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    curl_easy_setopt(eh, CURLOPT_TCP_NODELAY, 1L);
    /* curl's receive buffer is allocated per handle when it connects and kept while the handle is reused: 16 KiB
     * by default, times thousands of calls in flight. An LLM answer arrives over seconds in pieces far smaller
     * than that (a whole chat completion is a few KiB), so a small buffer costs a read or two more per answer
     * and saves most of the memory a waiting call holds (bench/ANALYSIS.md, worker memory). */
    curl_easy_setopt(eh, CURLOPT_BUFFERSIZE, LLM_RECV_BUFFER);
    curl_easy_setopt(eh, CURLOPT_ACCEPT_ENCODING, "");
    curl_easy_setopt(eh, CURLOPT_USERAGENT, "asyncllm/0.1");
    curl_easy_setopt(eh, CURLOPT_PROTOCOLS_STR, "http,https");
    if (block_private) {
        curl_easy_setopt(eh, CURLOPT_OPENSOCKETFUNCTION, opensocket_cb);
        curl_easy_setopt(eh, CURLOPT_OPENSOCKETDATA, call);
    }
    struct shard *sh = &llm->shards[0];
    for (int i = 1; i < llm->nshards; i++)
        if (llm->shards[i].in_flight < sh->in_flight)
            sh = &llm->shards[i];
    call->shard = sh;
    sh->in_flight++;
    llm->in_flight++;
    call->next = llm->calls;
    if (llm->calls)
        llm->calls->prev = call;
    llm->calls = call;
    curl_multi_add_handle(sh->multi, eh);
    return call;
}

struct llm_call *llm_post_stream(struct llm *llm, int epi, const char *path, const char *body, size_t len,
                                 llm_data_cb *on_data, llm_cb *cb, void *arg)
{
    char url[2048];
    struct endpoint *ep = &llm->ep[epi >= 0 && epi < llm->nep ? epi : 0];
    snprintf(url, sizeof url, "%s%s", ep->base, path);
    struct llm_call *call =
        call_start(llm, url, NULL, body, len, llm->cfg->llm_timeout_ms, on_data, cb, arg, false, false);
    call->ep = ep;
    return call;
}

struct llm_call *llm_request(struct llm *llm, const struct llm_req *r, llm_cb *cb, void *arg)
{
    return call_start(llm, r->url, r->headers, r->body, r->len, r->timeout_ms, NULL, cb, arg, r->block_private, true);
}

void llm_cancel(struct llm_call *call)
{
    call_free(call);
}

int llm_in_flight(const struct llm *llm)
{
    return llm->in_flight;
}

int llm_endpoints(const struct llm *llm)
{
    return llm->nep;
}

void llm_free(struct llm *llm)
{
    if (!llm)
        return;
    while (llm->calls)
        call_free(llm->calls);
    for (int i = 0; i < llm->nidle; i++)
        curl_easy_cleanup(llm->idle[i]);
    free(llm->idle);
    for (int i = 0; i < llm->nshards; i++) {
        curl_multi_cleanup(llm->shards[i].multi);
        event_free(llm->shards[i].timer);
    }
    free(llm->shards);
    curl_slist_free_all(llm->headers);
    free(llm);
}

int64_t llm_parse_retry_after(const char *retry_after, const char *retry_after_ms, int64_t now)
{
    char *end;
    if (retry_after_ms && retry_after_ms[0]) {
        double v = strtod(retry_after_ms, &end);
        if (end != retry_after_ms && *end == '\0' && v >= 0 && v < 1e12)
            return (int64_t)v;
    }
    if (!retry_after || !retry_after[0])
        return -1;
    long secs = strtol(retry_after, &end, 10);
    if (end != retry_after && *end == '\0')
        return secs >= 0 && secs < 100000000 ? (int64_t)secs * 1000 : -1;
    time_t t = curl_getdate(retry_after, NULL); /* IMF-fixdate, RFC 850 and asctime forms */
    if (t < 0)
        return -1;
    int64_t delta = (int64_t)t * 1000 - now;
    return delta > 0 ? delta : 0;
}
