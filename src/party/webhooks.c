/* webhooks.c - see webhooks.h.
 *
 * Each message of async_llm_response with a final status becomes one event, delivered to every target (the
 * configured endpoints, and the callback_url the client gave at submit time):
 *
 *   {"object": "event", "id": "evt_<conversation>_<turn>", "type": "response.completed", "created_at": <s>,
 *    "data": {"id": "resp_<conversation>_<turn>", "conversation_id": ..., "turn": ...}}
 *
 * with the headers webhook-id (the event id: the same on every retry and redelivery, for deduplication),
 * webhook-timestamp and webhook-signature. A 2xx answer delivers; 410 Gone stops delivery to that target
 * (a configured endpoint is then skipped until restart); anything else is retried with exponential backoff and
 * full jitter, at least as long as Retry-After asks, up to webhook-max-attempts, after which the event goes
 * to the webhook dead-letter topic with headers saying why. A target that resolves to a loopback, private or
 * link-local address is refused (unless webhook-allow-private) and dead-lettered at once.
 *
 * The offset of a message is committed once all its deliveries are finished (delivered, gone or dead-lettered):
 * at least once, so a receiver must use webhook-id to drop duplicates, as the spec says.
 *
 * HMAC-SHA256 comes from OpenSSL's libcrypto, which libcurl (OpenSSL flavour) already loads into the process:
 * no new dependency, and no home-made cryptography. */
#include "party/webhooks.h"

#include "core/config.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/util.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "llm/llm.h"
#include "party/party.h"

#include <curl/curl.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <string.h>

#define MAX_URLS 16

struct webhooks {
    struct event_base *base;
    const struct config *cfg;
    struct party *party;
    struct kafka_producer *kp;
    struct llm *llm;
    struct http_server *metrics;
    unsigned char key[256];
    int keylen;
    char *urls[MAX_URLS];
    bool gone[MAX_URLS];
    int nurls;
    unsigned long delivered, retried, dead_lettered, gone_count, skipped;
};

struct wmsg;

struct delivery {
    struct wmsg *wm;
    char *url;
    int url_idx; /* configured endpoint index, or -1 for a callback_url */
    int attempts;
    struct llm_call *call;
    struct event *timer;
    bool finished, dr_pending;
    char last_error[256];
};

struct wmsg {
    struct webhooks *wh;
    struct party *p;
    struct party_msg *m;
    char evt_id[128];
    char *body;
    char conv_id[72];
    struct delivery d[MAX_URLS + 1];
    int nd, pending;
    bool abandoned;
};

/* ---------------------------------------------------------------- signing */

int webhooks_secret_decode(const char *secret, unsigned char *key, size_t keymax)
{
    if (strncmp(secret, "whsec_", 6) != 0)
        return -1;
    const char *b64 = secret + 6;
    size_t n = strlen(b64);
    if (n == 0 || n % 4 || n / 4 * 3 > keymax)
        return -1;
    int len = EVP_DecodeBlock(key, (const unsigned char *)b64, (int)n);
    if (len < 0)
        return -1;
    if (n >= 1 && b64[n - 1] == '=')
        len--;
    if (n >= 2 && b64[n - 2] == '=')
        len--;
    return len;
}

void webhooks_sign(const unsigned char *key, size_t keylen, const char *id, long long ts, const char *body, size_t len,
                   char *out, size_t outlen)
{
    char prefix[192];
    int pl = snprintf(prefix, sizeof prefix, "%s.%lld.", id, ts);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    unsigned char *content = xmalloc((size_t)pl + len);
    memcpy(content, prefix, (size_t)pl);
    memcpy(content + pl, body, len);
    HMAC(EVP_sha256(), key, (int)keylen, content, (size_t)pl + len, mac, &maclen);
    free(content);
    unsigned char b64[128];
    EVP_EncodeBlock(b64, mac, (int)maclen);
    snprintf(out, outlen, "v1,%s", (const char *)b64);
}

/* ---------------------------------------------------------------- delivery */

static void attempt(struct delivery *d);

static void wmsg_finish(struct wmsg *wm)
{
    struct party *p = wm->p;
    struct party_msg *m = wm->m;
    for (int i = 0; i < wm->nd; i++) {
        free(wm->d[i].url);
        if (wm->d[i].timer)
            event_free(wm->d[i].timer);
    }
    free(wm->body);
    free(wm);
    party_done(p, m);
}

static void delivery_finished(struct delivery *d)
{
    if (d->finished)
        return;
    d->finished = true;
    if (--d->wm->pending == 0)
        wmsg_finish(d->wm);
}

static void dlq_dr(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset)
{
    (void)partition;
    (void)offset;
    struct delivery *d = opaque;
    d->dr_pending = false;
    if (err && !d->wm->abandoned) {
        log_warn("dead-letter produce failed (%s); retrying", rd_kafka_err2str(err));
        d->attempts = (int)d->wm->wh->cfg->webhook_max_attempts; /* straight back to the dead letter */
        struct timeval tv = {1, 0};
        evtimer_add(d->timer, &tv);
        return;
    }
    delivery_finished(d);
}

static void dead_letter(struct delivery *d, const char *why)
{
    struct webhooks *wh = d->wm->wh;
    log_warn("giving up %s for %s after %d attempt(s): %s", d->wm->evt_id, d->url, d->attempts, why);
    wh->dead_lettered++;
    char n[16], ts[24];
    snprintf(n, sizeof n, "%d", d->attempts);
    snprintf(ts, sizeof ts, "%lld", (long long)now_ms());
    rd_kafka_headers_t *h = rd_kafka_headers_new(4);
    rd_kafka_header_add(h, "asyncllm-webhook-url", -1, d->url, -1);
    rd_kafka_header_add(h, "asyncllm-error-message", -1, why, -1);
    rd_kafka_header_add(h, "asyncllm-attempts", -1, n, -1);
    rd_kafka_header_add(h, "asyncllm-failed-at", -1, ts, -1);
    rd_kafka_resp_err_t e = kafka_produce(wh->kp, wh->cfg->topic_webhook_dlq, d->wm->conv_id, strlen(d->wm->conv_id),
                                          d->wm->body, strlen(d->wm->body), h, d);
    if (e) {
        rd_kafka_headers_destroy(h);
        log_warn("dead-letter produce refused (%s); retrying", rd_kafka_err2str(e));
        struct timeval tv = {1, 0};
        evtimer_add(d->timer, &tv);
        return;
    }
    d->dr_pending = true;
}

static void delivered_cb(void *arg, const struct llm_response *r)
{
    struct delivery *d = arg;
    struct webhooks *wh = d->wm->wh;
    d->call = NULL;
    if (r->http_status >= 200 && r->http_status < 300) {
        wh->delivered++;
        log_debug("%s delivered to %s", d->wm->evt_id, d->url);
        delivery_finished(d);
        return;
    }
    if (r->http_status == 410) {
        log_warn("%s answered 410 Gone: no more events to it%s", d->url, d->url_idx >= 0 ? " until restart" : "");
        if (d->url_idx >= 0)
            wh->gone[d->url_idx] = true;
        wh->gone_count++;
        delivery_finished(d);
        return;
    }
    if (r->blocked) {
        dead_letter(d, "the URL resolves to a loopback, private or link-local address (see --webhook-allow-private)");
        return;
    }
    if (r->http_status)
        snprintf(d->last_error, sizeof d->last_error, "HTTP %ld", r->http_status);
    else
        snprintf(d->last_error, sizeof d->last_error, "%s", r->curl_error);
    if (d->attempts >= wh->cfg->webhook_max_attempts) {
        dead_letter(d, d->last_error);
        return;
    }
    int64_t cap = wh->cfg->webhook_retry_base_ms << (d->attempts - 1 < 20 ? d->attempts - 1 : 20);
    if (cap > wh->cfg->webhook_retry_max_ms)
        cap = wh->cfg->webhook_retry_max_ms;
    int64_t delay = (int64_t)rand_below((uint64_t)cap + 1);
    if (r->retry_after_ms > delay)
        delay = r->retry_after_ms;
    wh->retried++;
    log_info("%s to %s failed (%s); retry %d in %lld ms", d->wm->evt_id, d->url, d->last_error, d->attempts,
             (long long)delay);
    struct timeval tv = {(time_t)(delay / 1000), (suseconds_t)(delay % 1000) * 1000};
    evtimer_add(d->timer, &tv);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct delivery *d = arg;
    if (d->attempts >= d->wm->wh->cfg->webhook_max_attempts)
        dead_letter(d, d->last_error[0] ? d->last_error : "undeliverable");
    else
        attempt(d);
}

static void attempt(struct delivery *d)
{
    struct wmsg *wm = d->wm;
    struct webhooks *wh = wm->wh;
    d->attempts++;
    long long ts = (long long)(now_ms() / 1000);
    char sig[128], h[256];
    size_t blen = strlen(wm->body);
    webhooks_sign(wh->key, (size_t)wh->keylen, wm->evt_id, ts, wm->body, blen, sig, sizeof sig);
    struct curl_slist *hs = curl_slist_append(NULL, "Content-Type: application/json");
    hs = curl_slist_append(hs, "Expect:");
    snprintf(h, sizeof h, "webhook-id: %s", wm->evt_id);
    hs = curl_slist_append(hs, h);
    snprintf(h, sizeof h, "webhook-timestamp: %lld", ts);
    hs = curl_slist_append(hs, h);
    snprintf(h, sizeof h, "webhook-signature: %s", sig);
    hs = curl_slist_append(hs, h);
    struct llm_req r = {d->url, hs, wm->body, blen, wh->cfg->webhook_timeout_ms, !wh->cfg->webhook_allow_private};
    d->call = llm_request(wh->llm, &r, delivered_cb, d);
    curl_slist_free_all(hs);
}

/* ---------------------------------------------------------------- messages */

static const char *event_type(const char *status, const char *finish_reason)
{
    if (!status)
        return NULL;
    if (strcmp(status, "complete") == 0)
        return finish_reason && strcmp(finish_reason, "length") == 0 ? "response.incomplete" : "response.completed";
    if (strcmp(status, "failed") == 0)
        return "response.failed";
    if (strcmp(status, "cancelled") == 0)
        return "response.cancelled";
    return NULL;
}

static bool url_ok(const char *u)
{
    return u && strlen(u) < 2048 && (strncmp(u, "http://", 7) == 0 || strncmp(u, "https://", 8) == 0);
}

static void add_target(struct wmsg *wm, const char *url, int idx)
{
    struct delivery *d = &wm->d[wm->nd++];
    d->wm = wm;
    d->url = xstrdup(url);
    d->url_idx = idx;
    d->timer = evtimer_new(wm->wh->base, timer_cb, d);
}

static void process(void *ctx, struct party *p, struct party_msg *m)
{
    struct webhooks *wh = ctx;
    json_t *v = json_loadb(m->value, m->len, 0, NULL);
    const char *conv = json_string_value(json_object_get(v, "conversation_id"));
    json_t *turn = json_object_get(v, "turn");
    const char *type = event_type(json_string_value(json_object_get(v, "status")),
                                  json_string_value(json_object_get(v, "finish_reason")));
    const char *cb_url = json_string_value(json_object_get(v, "callback_url"));
    if (!conv || !conv_id_valid(conv, strlen(conv)) || !json_is_integer(turn) || !type) {
        wh->skipped++;
        json_decref(v);
        party_done(p, m);
        return;
    }
    struct wmsg *wm = xcalloc(1, sizeof *wm);
    wm->wh = wh;
    wm->p = p;
    wm->m = m;
    m->user = wm;
    snprintf(wm->conv_id, sizeof wm->conv_id, "%s", conv);
    long long t = (long long)json_integer_value(turn);
    snprintf(wm->evt_id, sizeof wm->evt_id, "evt_%s_%lld", conv, t);
    char rid[128];
    snprintf(rid, sizeof rid, "resp_%s_%lld", conv, t);
    json_t *ev = json_pack("{s:s, s:s, s:s, s:I, s:{s:s, s:s, s:I}}", "object", "event", "id", wm->evt_id, "type", type,
                           "created_at", (json_int_t)(now_ms() / 1000), "data", "id", rid, "conversation_id", conv,
                           "turn", (json_int_t)t);
    wm->body = json_dumps(ev, JSON_COMPACT);
    json_decref(ev);
    for (int i = 0; i < wh->nurls; i++)
        if (!wh->gone[i])
            add_target(wm, wh->urls[i], i);
    if (url_ok(cb_url))
        add_target(wm, cb_url, -1);
    json_decref(v);
    wm->pending = wm->nd;
    if (wm->nd == 0) {
        wmsg_finish(wm);
        return;
    }
    for (int i = 0; i < wm->nd; i++)
        attempt(&wm->d[i]);
}

static void abandon(void *ctx, struct party *p, struct party_msg *m)
{
    (void)ctx;
    (void)p;
    struct wmsg *wm = m->user;
    wm->abandoned = true;
    int dr = 0;
    for (int i = 0; i < wm->nd; i++) {
        struct delivery *d = &wm->d[i];
        if (d->call) {
            llm_cancel(d->call);
            d->call = NULL;
        }
        evtimer_del(d->timer);
        if (d->dr_pending)
            dr++;
        else
            d->finished = true;
    }
    wm->pending = dr;
    if (dr == 0)
        wmsg_finish(wm); /* calls party_done, which frees the abandoned message */
}

/* ---------------------------------------------------------------- role */

static void metrics_cb(struct http_req *req, void *arg)
{
    struct webhooks *wh = arg;
    struct party_stats s;
    party_stats(wh->party, &s);
    struct evbuffer *out = evbuffer_new();
    metric_gauge(out, "asyncllm_webhooks_in_flight", "events being delivered", (double)s.in_flight);
    metric_counter(out, "asyncllm_webhooks_consumed_total", "response messages consumed", (double)s.consumed);
    metric_counter(out, "asyncllm_webhooks_delivered_total", "deliveries answered 2xx", (double)wh->delivered);
    metric_counter(out, "asyncllm_webhooks_retried_total", "delivery attempts retried", (double)wh->retried);
    metric_counter(out, "asyncllm_webhooks_dead_lettered_total", "deliveries dead-lettered", (double)wh->dead_lettered);
    metric_counter(out, "asyncllm_webhooks_gone_total", "deliveries stopped by 410 Gone", (double)wh->gone_count);
    size_t len = evbuffer_get_length(out);
    http_reply(req, 200, "text/plain; version=0.0.4", len ? (const char *)evbuffer_pullup(out, -1) : "", len);
    evbuffer_free(out);
}

struct webhooks *webhooks_new(struct event_base *base, const struct config *cfg, char *err, size_t errlen)
{
    struct webhooks *wh = xcalloc(1, sizeof *wh);
    wh->base = base;
    wh->cfg = cfg;
    wh->keylen = webhooks_secret_decode(cfg->webhook_secret, wh->key, sizeof wh->key);
    if (wh->keylen <= 0) {
        snprintf(err, errlen, "--webhook-secret must be whsec_<base64> (Standard Webhooks), e.g. whsec_%s",
                 "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        free(wh);
        return NULL;
    }
    for (const char *s = cfg->webhook_urls; *s && wh->nurls < MAX_URLS;) {
        size_t n = strcspn(s, ",");
        char *u = xstrndup(s, n);
        if (url_ok(u))
            wh->urls[wh->nurls++] = u;
        else {
            if (n)
                log_warn("ignoring '%s' (not an http or https URL)", u);
            free(u);
        }
        s += n + (s[n] == ',');
    }
    wh->kp = kafka_producer_new(base, cfg, 1, dlq_dr, err, errlen);
    if (!wh->kp)
        goto fail;
    kafka_producer_warm(wh->kp, cfg->topic_webhook_dlq);
    wh->llm = llm_new(base, cfg);
    /* A new webhooks group starts at the end of the topic: a first deployment must not send events for
     * every response of the past. */
    struct party_opts o = {cfg->webhook_group_id, cfg->topic_responses, cfg->webhook_max_in_flight, false,
                           !cfg->webhook_from_beginning};
    static const struct party_hooks hooks = {process, abandon};
    wh->party = party_new(base, cfg, &o, &hooks, wh, err, errlen);
    if (!wh->party)
        goto fail;
    if (cfg->metrics_port > 0) {
        int port;
        char merr[256];
        wh->metrics = http_server_new(base, cfg, cfg->metrics_addr, (int)cfg->metrics_port, metrics_cb, wh, &port, merr,
                                      sizeof merr);
        if (!wh->metrics)
            log_error("no metrics server: %s", merr);
    }
    log_info("group %s on %s, %d configured endpoint(s), private addresses %s", cfg->webhook_group_id,
             cfg->topic_responses, wh->nurls, cfg->webhook_allow_private ? "allowed" : "refused");
    return wh;
fail:
    llm_free(wh->llm);
    kafka_producer_free(wh->kp, 0);
    for (int i = 0; i < wh->nurls; i++)
        free(wh->urls[i]);
    free(wh);
    return NULL;
}

void webhooks_drain(struct webhooks *wh, void (*on_drained)(void *arg), void *arg)
{
    party_drain(wh->party, on_drained, arg);
}

void webhooks_free(struct webhooks *wh)
{
    if (!wh)
        return;
    if (wh->metrics)
        http_server_free(wh->metrics);
    party_free(wh->party);             /* abandons what runs: calls and timers cancelled */
    kafka_producer_free(wh->kp, 5000); /* the last dead letters */
    llm_free(wh->llm);
    for (int i = 0; i < wh->nurls; i++)
        free(wh->urls[i]);
    log_info("webhooks stopped: %lu delivered, %lu retries, %lu dead-lettered, %lu gone", wh->delivered, wh->retried,
             wh->dead_lettered, wh->gone_count);
    free(wh);
}
