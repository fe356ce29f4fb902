/* moderate.c - see moderate.h.
 *
 * One response message goes through these steps, each retried on a timer until it succeeds (Redis or Kafka
 * down: 200 ms doubling to 5 s), so that its offset is committed only once its side effects are done:
 *
 *   PEEK     read the turn's verdict; a redelivered message finds it there and skips to PUBLISH (or to done)
 *   CHECK    the text checks (screen.h) and, if moderation-url is set, the moderation API (retried with
 *            backoff up to moderation-max-attempts; after that the verdict says the API failed)
 *   STORE    store the verdict unless the turn has one (the earlier one wins: one verdict per turn, ever)
 *   PUBLISH  a flagged verdict that was not yet acknowledged goes to topic-moderation, keyed by conversation
 *   MARK     once acknowledged, t<n>.moderation_published is set, so a redelivery does not publish it again
 *
 * A crash between the broker's ack and MARK publishes the verdict a second time after the restart: at least
 * once, with the same content; consumers deduplicate by (conversation_id, turn). */
#include "party/moderate.h"

#include "core/config.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/util.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "llm/llm.h"
#include "party/party.h"
#include "party/screen.h"
#include "store/store.h"

#include <curl/curl.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FOUND 8

struct moderate {
    struct event_base *base;
    const struct config *cfg;
    struct party *party;
    struct kafka_producer *kp;
    struct store *st;
    struct llm *llm;
    struct screen_words *words;
    struct http_server *metrics;
    unsigned long checked, flagged, published, duplicates, skipped, api_errors;
};

enum step { S_PEEK, S_CHECK, S_STORE, S_PUBLISH, S_MARK };

struct mmsg {
    struct moderate *md;
    struct party *p;
    struct party_msg *m;
    json_t *msg; /* the response message */
    char conv_id[72];
    long turn;
    enum step step;
    json_t *categories, *reasons; /* the verdict being built */
    char *verdict;                /* the stored verdict (JSON text), once known */
    int api_attempts, failures;
    char api_error[256];
    struct llm_call *call;
    struct event *timer;
    bool busy; /* a Redis reply or a delivery report is due: its callback finishes an abandoned message */
    bool abandoned;
};

static void step_run(struct mmsg *mm);

static void mmsg_finish(struct mmsg *mm)
{
    struct party *p = mm->p;
    struct party_msg *m = mm->m;
    if (mm->call)
        llm_cancel(mm->call);
    event_free(mm->timer);
    json_decref(mm->msg);
    json_decref(mm->categories);
    json_decref(mm->reasons);
    free(mm->verdict);
    free(mm);
    party_done(p, m);
}

/* Runs the current step again later: Redis or Kafka is unavailable. */
static void retry_later(struct mmsg *mm, const char *what)
{
    mm->failures++;
    int64_t delay = 200 << (mm->failures < 5 ? mm->failures - 1 : 4);
    if (delay > 5000)
        delay = 5000;
    if (mm->failures == 1 || mm->failures % 10 == 0)
        log_warn("conversation %s turn %ld: %s unavailable; retrying (%d failures)", mm->conv_id, mm->turn, what,
                 mm->failures);
    struct timeval tv = {(time_t)(delay / 1000), (suseconds_t)(delay % 1000) * 1000};
    evtimer_add(mm->timer, &tv);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    step_run(arg);
}

/* ---------------------------------------------------------------- checks */

static void add_category(struct mmsg *mm, const char *category, const char *reason)
{
    size_t i;
    json_t *c;
    bool seen = false;
    json_array_foreach(mm->categories, i, c) seen = seen || strcmp(json_string_value(c), category) == 0;
    if (!seen)
        json_array_append_new(mm->categories, json_string(category));
    json_array_append_new(mm->reasons, json_string(reason));
}

static void local_checks(struct mmsg *mm)
{
    const char *answer = json_string_value(json_object_get(mm->msg, "llm_response"));
    size_t alen = json_string_length(json_object_get(mm->msg, "llm_response"));
    const char *prompt = json_string_value(json_object_get(mm->msg, "user_prompt"));
    size_t plen = json_string_length(json_object_get(mm->msg, "user_prompt"));
    const char *finish = json_string_value(json_object_get(mm->msg, "finish_reason"));
    if (!answer)
        answer = "";
    const char *found[MAX_FOUND];
    size_t n = screen_find(mm->md->words, answer, alen, found, MAX_FOUND);
    for (size_t i = 0; i < n; i++) {
        char reason[128];
        snprintf(reason, sizeof reason, "listed word \"%s\"", found[i]);
        add_category(mm, "profanity", reason);
    }
    if (screen_empty(answer, alen))
        add_category(mm, "empty", "the answer is empty");
    if (finish && strcmp(finish, "length") == 0)
        add_category(mm, "truncated", "the answer was cut short (finish_reason \"length\")");
    if (prompt && alen && screen_echoes(prompt, plen, answer, alen))
        add_category(mm, "repeats_prompt", "the answer only repeats the prompt");
}

/* The moderation API's answer: {"results": [{"flagged": bool, "categories": {"name": bool, ...}}]}. */
static int api_result(struct mmsg *mm, const char *body, size_t len)
{
    json_t *r = json_loadb(body, len, 0, NULL);
    json_t *res = json_array_get(json_object_get(r, "results"), 0);
    if (!json_is_object(res)) {
        json_decref(r);
        return -1;
    }
    bool any = false;
    const char *name;
    json_t *v;
    json_object_foreach(json_object_get(res, "categories"), name, v)
    {
        if (!json_is_true(v))
            continue;
        char reason[192];
        snprintf(reason, sizeof reason, "moderation API: %.160s", name);
        add_category(mm, name, reason);
        any = true;
    }
    if (json_is_true(json_object_get(res, "flagged")) && !any)
        add_category(mm, "moderation", "moderation API: flagged");
    json_decref(r);
    return 0;
}

static void api_cb(void *arg, const struct llm_response *r)
{
    struct mmsg *mm = arg;
    struct moderate *md = mm->md;
    mm->call = NULL;
    if (r->http_status >= 200 && r->http_status < 300 && api_result(mm, r->body, r->body_len) == 0) {
        mm->step = S_STORE;
        step_run(mm);
        return;
    }
    md->api_errors++;
    if (r->http_status >= 200 && r->http_status < 300)
        snprintf(mm->api_error, sizeof mm->api_error, "unexpected answer");
    else if (r->http_status)
        snprintf(mm->api_error, sizeof mm->api_error, "HTTP %ld", r->http_status);
    else
        snprintf(mm->api_error, sizeof mm->api_error, "%s", r->curl_error);
    bool retryable = r->http_status == 0 || r->http_status == 408 || r->http_status == 429 || r->http_status >= 500;
    if (!retryable || mm->api_attempts >= md->cfg->moderation_max_attempts) {
        char reason[320];
        snprintf(reason, sizeof reason, "moderation API failed after %d attempt(s): %s", mm->api_attempts,
                 mm->api_error);
        json_array_append_new(mm->reasons, json_string(reason));
        log_warn("conversation %s turn %ld: %s", mm->conv_id, mm->turn, reason);
        mm->step = S_STORE;
        step_run(mm);
        return;
    }
    int64_t delay = 500 << (mm->api_attempts - 1 < 4 ? mm->api_attempts - 1 : 4);
    if (r->retry_after_ms > delay)
        delay = r->retry_after_ms < 60000 ? r->retry_after_ms : 60000;
    struct timeval tv = {(time_t)(delay / 1000), (suseconds_t)(delay % 1000) * 1000};
    evtimer_add(mm->timer, &tv);
}

static void call_api(struct mmsg *mm)
{
    const struct config *cfg = mm->md->cfg;
    mm->api_attempts++;
    json_t *req = json_pack("{s:O}", "input", json_object_get(mm->msg, "llm_response"));
    if (cfg->moderation_model[0])
        json_object_set_new(req, "model", json_string(cfg->moderation_model));
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    char url[2048], auth[1024];
    size_t ul = strlen(cfg->moderation_url);
    snprintf(url, sizeof url, "%.*s/moderations", (int)(ul && cfg->moderation_url[ul - 1] == '/' ? ul - 1 : ul),
             cfg->moderation_url);
    struct curl_slist *hs = curl_slist_append(NULL, "Content-Type: application/json");
    hs = curl_slist_append(hs, "Expect:");
    if (cfg->moderation_api_key[0]) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", cfg->moderation_api_key);
        hs = curl_slist_append(hs, auth);
    }
    /* The URL is the operator's, not a client's: private addresses are allowed (a moderation service on the
     * local network is the usual case). */
    struct llm_req r = {url, hs, body, strlen(body), cfg->moderation_timeout_ms, false};
    mm->call = llm_request(mm->md->llm, &r, api_cb, mm);
    curl_slist_free_all(hs);
    free(body);
}

/* ---------------------------------------------------------------- storing and publishing */

static void done_ok(struct mmsg *mm)
{
    mmsg_finish(mm);
}

static void marked_cb(void *arg, int rc)
{
    struct mmsg *mm = arg;
    mm->busy = false;
    if (mm->abandoned) {
        mmsg_finish(mm);
        return;
    }
    if (rc == STORE_EUNAVAILABLE) {
        retry_later(mm, "redis");
        return;
    }
    done_ok(mm);
}

static void dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset)
{
    (void)partition;
    (void)offset;
    struct mmsg *mm = opaque;
    mm->busy = false;
    if (mm->abandoned) {
        mmsg_finish(mm);
        return;
    }
    if (err) {
        retry_later(mm, rd_kafka_err2str(err));
        return;
    }
    mm->md->published++;
    mm->failures = 0;
    mm->step = S_MARK;
    step_run(mm);
}

static void publish(struct mmsg *mm)
{
    struct moderate *md = mm->md;
    json_t *out = json_deep_copy(mm->msg);
    json_object_set_new(out, "moderation", json_loads(mm->verdict, 0, NULL));
    char *value = json_dumps(out, JSON_COMPACT);
    json_decref(out);
    rd_kafka_resp_err_t e = kafka_produce(md->kp, md->cfg->topic_moderation, mm->conv_id, strlen(mm->conv_id), value,
                                          strlen(value), NULL, mm);
    free(value);
    if (e) {
        retry_later(mm, rd_kafka_err2str(e));
        return;
    }
    mm->busy = true;
}

/* The turn's verdict is known (stored now or earlier): publish it if flagged and not yet acknowledged. */
static void verdict_known(struct mmsg *mm, const char *verdict, bool published)
{
    free(mm->verdict);
    mm->verdict = xstrdup(verdict);
    json_t *v = json_loads(verdict, 0, NULL);
    bool flagged = json_is_true(json_object_get(v, "flagged"));
    json_decref(v);
    if (!flagged || published) {
        done_ok(mm);
        return;
    }
    mm->failures = 0;
    mm->step = S_PUBLISH;
    step_run(mm);
}

static void verdict_cb(void *arg, int rc, bool is_new, const char *verdict, bool published)
{
    struct mmsg *mm = arg;
    struct moderate *md = mm->md;
    mm->busy = false;
    if (mm->abandoned) {
        mmsg_finish(mm);
        return;
    }
    if (rc == STORE_EUNAVAILABLE) {
        retry_later(mm, "redis");
        return;
    }
    mm->failures = 0;
    if (rc == STORE_ENOTFOUND) {
        log_info("conversation %s is gone (deleted or expired): turn %ld not moderated", mm->conv_id, mm->turn);
        md->skipped++;
        done_ok(mm);
        return;
    }
    if (mm->step == S_PEEK && !verdict) {
        mm->step = S_CHECK;
        step_run(mm);
        return;
    }
    if (mm->step == S_PEEK || !is_new) {
        md->duplicates++;
        log_debug("conversation %s turn %ld already has a verdict", mm->conv_id, mm->turn);
    } else {
        md->checked++;
        json_t *v = json_loads(verdict, 0, NULL);
        if (json_is_true(json_object_get(v, "flagged"))) {
            md->flagged++;
            char *cats = json_dumps(json_object_get(v, "categories"), JSON_COMPACT);
            log_info("conversation %s turn %ld flagged: %s", mm->conv_id, mm->turn, cats);
            free(cats);
        }
        json_decref(v);
    }
    verdict_known(mm, verdict, published);
}

static void step_run(struct mmsg *mm)
{
    struct moderate *md = mm->md;
    switch (mm->step) {
    case S_PEEK:
        mm->busy = true;
        store_moderation(md->st, mm->conv_id, mm->turn, NULL, verdict_cb, mm);
        break;
    case S_CHECK:
        if (mm->api_attempts == 0)
            local_checks(mm);
        if (md->cfg->moderation_url[0])
            call_api(mm);
        else {
            mm->step = S_STORE;
            step_run(mm);
        }
        break;
    case S_STORE: {
        json_t *v = json_pack("{s:b, s:O, s:O, s:I}", "flagged", json_array_size(mm->categories) > 0, "categories",
                              mm->categories, "reasons", mm->reasons, "checked_at", (json_int_t)now_ms());
        char *text = json_dumps(v, JSON_COMPACT);
        json_decref(v);
        mm->busy = true;
        store_moderation(md->st, mm->conv_id, mm->turn, text, verdict_cb, mm);
        free(text);
        break;
    }
    case S_PUBLISH:
        publish(mm);
        break;
    case S_MARK:
        mm->busy = true;
        store_moderation_published(md->st, mm->conv_id, mm->turn, marked_cb, mm);
        break;
    }
}

static void process(void *ctx, struct party *p, struct party_msg *m)
{
    struct moderate *md = ctx;
    json_t *msg = json_loadb(m->value, m->len, 0, NULL);
    const char *conv = json_string_value(json_object_get(msg, "conversation_id"));
    json_t *turn = json_object_get(msg, "turn");
    const char *status = json_string_value(json_object_get(msg, "status"));
    /* Only answers are moderated: a failed turn has none. */
    if (!conv || !conv_id_valid(conv, strlen(conv)) || !json_is_integer(turn) || json_integer_value(turn) < 1 ||
        !status || strcmp(status, "complete") != 0 || !json_is_string(json_object_get(msg, "llm_response"))) {
        md->skipped++;
        json_decref(msg);
        party_done(p, m);
        return;
    }
    struct mmsg *mm = xcalloc(1, sizeof *mm);
    mm->md = md;
    mm->p = p;
    mm->m = m;
    m->user = mm;
    mm->msg = msg;
    snprintf(mm->conv_id, sizeof mm->conv_id, "%s", conv);
    mm->turn = (long)json_integer_value(turn);
    mm->categories = json_array();
    mm->reasons = json_array();
    mm->timer = evtimer_new(md->base, timer_cb, mm);
    mm->step = S_PEEK;
    step_run(mm);
}

static void abandon(void *ctx, struct party *p, struct party_msg *m)
{
    (void)ctx;
    (void)p;
    struct mmsg *mm = m->user;
    mm->abandoned = true;
    if (mm->call) {
        llm_cancel(mm->call);
        mm->call = NULL;
    }
    evtimer_del(mm->timer);
    if (!mm->busy)
        mmsg_finish(mm); /* party_done frees the abandoned message */
}

/* ---------------------------------------------------------------- views for the API */

void moderation_polling_view(json_t *view, const char *verdict)
{
    json_t *v = verdict ? json_loads(verdict, 0, NULL) : NULL;
    if (json_is_object(v))
        json_object_set_new(view, "moderation", v);
    else
        json_decref(v);
}

void moderation_metadata(json_t *metadata, const char *verdict)
{
    json_t *v = verdict ? json_loads(verdict, 0, NULL) : NULL;
    if (!json_is_object(v)) {
        json_decref(v);
        return;
    }
    char cats[513] = "", at[24];
    size_t o = 0, i;
    json_t *c;
    json_array_foreach(json_object_get(v, "categories"), i, c)
    {
        const char *s = json_string_value(c);
        if (s && o < sizeof cats - 1)
            o += (size_t)snprintf(cats + o, sizeof cats - o, "%s%s", o ? "," : "", s);
    }
    snprintf(at, sizeof at, "%lld", (long long)json_integer_value(json_object_get(v, "checked_at")));
    json_object_set_new(metadata, "moderation_flagged",
                        json_string(json_is_true(json_object_get(v, "flagged")) ? "true" : "false"));
    json_object_set_new(metadata, "moderation_categories", json_string(cats));
    json_object_set_new(metadata, "moderation_checked_at", json_string(at));
    json_decref(v);
}

/* ---------------------------------------------------------------- role */

static void metrics_cb(struct http_req *req, void *arg)
{
    struct moderate *md = arg;
    struct party_stats s;
    party_stats(md->party, &s);
    struct evbuffer *out = evbuffer_new();
    metric_gauge(out, "asyncllm_moderate_in_flight", "responses being checked", (double)s.in_flight);
    metric_gauge(out, "asyncllm_moderate_buffered", "responses held in memory", (double)s.buffered);
    metric_counter(out, "asyncllm_moderate_consumed_total", "response messages consumed", (double)s.consumed);
    metric_counter(out, "asyncllm_moderate_checked_total", "verdicts stored", (double)md->checked);
    metric_counter(out, "asyncllm_moderate_flagged_total", "verdicts stored with flagged true", (double)md->flagged);
    metric_counter(out, "asyncllm_moderate_published_total", "flagged verdicts acknowledged on the moderation topic",
                   (double)md->published);
    metric_counter(out, "asyncllm_moderate_duplicates_total", "redelivered responses whose turn had a verdict",
                   (double)md->duplicates);
    metric_counter(out, "asyncllm_moderate_skipped_total", "messages without an answer to check", (double)md->skipped);
    metric_counter(out, "asyncllm_moderate_api_errors_total", "failed moderation API calls", (double)md->api_errors);
    size_t len = evbuffer_get_length(out);
    http_reply(req, 200, "text/plain; version=0.0.4", len ? (const char *)evbuffer_pullup(out, -1) : "", len);
    evbuffer_free(out);
}

struct moderate *moderate_new(struct event_base *base, const struct config *cfg, char *err, size_t errlen)
{
    struct moderate *md = xcalloc(1, sizeof *md);
    md->base = base;
    md->cfg = cfg;
    if (cfg->moderation_words[0]) {
        size_t skipped = 0;
        md->words = screen_words_load(cfg->moderation_words, &skipped, err, errlen);
        if (!md->words) {
            free(md);
            return NULL;
        }
        log_info("word list %s: %zu word(s)%s", cfg->moderation_words, screen_words_count(md->words),
                 skipped ? " (some lines skipped: not one word of letters and digits)" : "");
    } else {
        log_warn("no --moderation-words: answers are checked for emptiness, truncation and echoes only");
    }
    md->kp = kafka_producer_new(base, cfg, 1, dr_cb, err, errlen);
    if (!md->kp)
        goto fail;
    kafka_producer_warm(md->kp, cfg->topic_moderation);
    md->st = store_new(base, cfg);
    md->llm = llm_new(base, cfg);
    /* A new group starts at the beginning of the topic: a party killed before its first commit must find the
     * responses it missed, and the stored verdicts make the replay cheap and duplicate-free. */
    struct party_opts o = {cfg->moderation_group_id, cfg->topic_responses, cfg->moderation_max_in_flight, false, false};
    static const struct party_hooks hooks = {process, abandon};
    md->party = party_new(base, cfg, &o, &hooks, md, err, errlen);
    if (!md->party)
        goto fail;
    if (cfg->metrics_port > 0) {
        int port;
        char merr[256];
        md->metrics = http_server_new(base, cfg, cfg->metrics_addr, (int)cfg->metrics_port, metrics_cb, md, &port, merr,
                                      sizeof merr);
        if (!md->metrics)
            log_error("no metrics server: %s", merr);
    }
    log_info("group %s on %s, flagged responses to %s%s%s", cfg->moderation_group_id, cfg->topic_responses,
             cfg->topic_moderation, cfg->moderation_url[0] ? ", moderation API " : "", cfg->moderation_url);
    return md;
fail:
    llm_free(md->llm);
    store_free(md->st);
    kafka_producer_free(md->kp, 0);
    screen_words_free(md->words);
    free(md);
    return NULL;
}

void moderate_drain(struct moderate *md, void (*on_drained)(void *arg), void *arg)
{
    party_drain(md->party, on_drained, arg);
}

void moderate_free(struct moderate *md)
{
    if (!md)
        return;
    if (md->metrics)
        http_server_free(md->metrics);
    party_free(md->party);             /* abandons what runs: calls and timers cancelled */
    store_free(md->st);                /* answers pending Redis commands: abandoned messages are freed */
    kafka_producer_free(md->kp, 5000); /* the last delivery reports, likewise */
    llm_free(md->llm);
    log_info("moderate stopped: %lu checked, %lu flagged, %lu published, %lu redelivered", md->checked, md->flagged,
             md->published, md->duplicates);
    screen_words_free(md->words);
    free(md);
}
