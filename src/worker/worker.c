/* worker.c - see worker.h and docs/WORKER.md.
 *
 * Data structures
 *   part   one per assigned partition: its jobs in offset order (a ring). The committable offset of a partition
 *          is the offset of its first unfinished job, or the offset after the last message when all are done.
 *   keyq   one per (partition, conversation): the jobs of that conversation in offset order. Only its head
 *          runs; the next starts when the head is done. This is what keeps a conversation's turns in order.
 *   ready  jobs at the head of their keyq waiting for an LLM slot (max-in-flight), in arrival order.
 *
 * A job's life: WAIT_KEY -> READY -> BEGIN (Redis: take the turn, read the history) -> CALL (LLM) ->
 * FINISH (Redis: store the result once) -> PUBLISH (Kafka: response, and dead letter on failure) -> DONE.
 * Failures of Redis or Kafka are retried on a timer forever (nothing is dropped); LLM failures are retried up
 * to max-attempts and prompt-deadline-ms, then the turn fails for good. A job waiting on a timer holds no slot.
 *
 * Lifetimes: a job belongs to its part's ring until it is done and every job before it is done. When a
 * partition is revoked, its jobs are abandoned: timers and LLM calls are cancelled at once; a job waiting on a
 * Redis reply or a delivery report is marked and freed when that callback arrives. Every job is also on
 * w->jobs, so nothing leaks at exit. */
#include "worker/worker.h"

#include "core/config.h"
#include "core/jsonr.h"
#include "core/log.h"
#include "core/map.h"
#include "core/metrics.h"
#include "core/util.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "llm/chat.h"
#include "llm/llm.h"
#include "llm/sse.h"
#include "store/notify.h"
#include "store/store.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <assert.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define STORE_RETRY_MS 200
#define STORE_RETRY_MAX_MS 5000

enum job_state { J_WAIT_KEY, J_READY, J_BEGIN, J_CALL, J_BACKOFF, J_FINISH, J_PUBLISH, J_DONE };
enum job_step { STEP_BEGIN, STEP_CALL, STEP_FINISH, STEP_PUBLISH };

struct part;
struct keyq;

/* The longest error message kept (the rest is cut, as the 512-byte field it replaces did). */
#define ERR_MSG_MAX 511
#define ERR_CODE_MAX 47

/* Streaming state, allocated by the first streamed call of a job. */
struct job_stream {
    struct sse sse;   /* the parser of the LLM's answer */
    struct buf delta; /* text received in the current network read, appended as one event */
    bool done;        /* the closing [DONE] arrived */
    bool failed;      /* err says why */
    char err[ERR_MSG_MAX + 1];
};

/* A prompt held by the worker. Its memory is counted per in-flight prompt (issue 6): what is only needed on
 * failure or when streaming is allocated then; the message is kept once, as consumed (for the dead-letter
 * topic), and read again where its optional fields are needed; the conversation id and the running key live in
 * the same allocation as the struct (ids[]). */
struct job {
    struct worker *w;
    struct part *part;                   /* NULL once abandoned */
    struct keyq *kq;                     /* NULL for an invalid message, or once abandoned */
    struct job *key_next;                /* next job of the same keyq */
    struct job *ready_prev, *ready_next; /* on w->ready while J_READY */
    struct job *all_prev, *all_next;     /* on w->jobs always */
    enum job_state state;
    enum job_step step;       /* what the backoff timer resumes */
    enum turn_status outcome; /* TURN_COMPLETE or TURN_FAILED once known */
    int ep;                   /* the LLM endpoint reserved with the slot */
    int drs_pending;          /* delivery reports due */
    int attempts;             /* LLM calls made */
    int store_failures;       /* consecutive Redis/Kafka failures, for their backoff */
    int32_t partition;
    bool abandoned;
    bool has_slot;
    bool op_pending; /* a Redis reply is due */
    bool publish_failed;
    bool invalid;      /* not a usable prompt message: dead-lettered only */
    bool stream;       /* stream the LLM's answer into the turn's event stream */
    bool cancelled;    /* a client cancelled the turn while it ran */
    bool prompt_owned; /* prompt is a copy (its JSON text had escapes), not a pointer into orig_value */
    bool has_opts;     /* the message has members beyond conversation_id, prompt, turn and callback_url */
    int64_t offset;
    long turn;
    int64_t taken_ms;   /* monotonic time the worker took the job */
    const char *prompt; /* inside orig_value when its text has no escapes, else a copy; not NUL-terminated */
    size_t prompt_len;
    char *orig_value; /* the message as consumed, for the dead-letter topic (and its optional fields) */
    size_t orig_len;
    char *callback_url; /* the message's callback_url, or NULL */
    char *req_body;
    size_t req_len;
    struct llm_call *call;
    struct event *timer;
    struct job_stream *st; /* streaming only */
    char *err_code;        /* failures only: malloc'd */
    char *err_msg;
    struct chat_result res;
    char *conv_id; /* ids, or NULL for a message without a usable one */
    char *run_key; /* "<conversation> <turn>" in w->running while the turn runs, else "" (after conv_id) */
    char ids[];
};

struct keyq {
    struct job *head, *tail;
    char key[]; /* "<partition>/<conversation id>" */
};

struct part {
    int32_t partition;
    struct job **ring;
    size_t head, count, cap;
    int64_t next_offset; /* offset after the last message received, -1 if none yet */
    int64_t committed;   /* last offset we committed, -1 if none */
    long active;         /* jobs started and not done */
    bool revoking;       /* being revoked: nothing new starts */
};

struct worker {
    struct event_base *base;
    const struct config *cfg;
    struct kafka_consumer *kc;
    struct kafka_producer *kp;
    struct store *st;
    struct llm *llm;
    struct map *keys;
    struct map *running; /* "<conversation> <turn>" -> job, for cancellation */
    struct notify *notify;
    struct part **parts; /* indexed by partition number */
    int nparts;
    rd_kafka_topic_partition_list_t *assignment;
    struct job *ready_head, *ready_tail;
    struct job *jobs; /* every job alive */
    long in_flight;   /* slots held */
    long buffered;    /* jobs on part rings */
    long active;      /* jobs past READY and not done */
    bool paused;
    bool draining;
    bool releasing; /* inside slot_release() */
    struct event *commit_timer;
    struct event *grace_timer;
    struct event *revoke_timer;
    rd_kafka_topic_partition_list_t *revoking; /* a revocation waiting for in-flight work */
    void (*on_drained)(void *);
    void *drained_arg;
    struct http_server *metrics;
    /* counters for /metrics */
    unsigned long completed, failed, retried, llm_calls, dead_lettered, redelivered_done, cancelled;
    struct hist llm_latency;
};

static void job_step_run(struct job *job);
static void job_shrink(struct job *job);
static void job_done(struct job *job);
static void job_publish(struct job *job);
static void job_finish(struct job *job);
static void check_drained(struct worker *w);
static void drained_now(struct worker *w);
static void revoke_check(struct worker *w);

/* A started job stops counting as active: done, abandoned, or put back unstarted. */
static void job_inactive(struct job *job)
{
    job->w->active--;
    if (job->part)
        job->part->active--;
}

/* ---------------------------------------------------------------- job memory */

static void job_unrun(struct job *job)
{
    if (job->run_key && job->run_key[0]) {
        map_del(job->w->running, job->run_key);
        job->run_key[0] = '\0';
    }
}

static void job_free(struct job *job)
{
    struct worker *w = job->w;
    job_unrun(job);
    if (job->all_prev)
        job->all_prev->all_next = job->all_next;
    else
        w->jobs = job->all_next;
    if (job->all_next)
        job->all_next->all_prev = job->all_prev;
    if (job->timer)
        event_free(job->timer);
    if (job->call)
        llm_cancel(job->call);
    job_shrink(job);
    free(job);
}

static void job_stream_free(struct job *job)
{
    if (job->st) {
        sse_free(&job->st->sse);
        buf_free(&job->st->delta);
        free(job->st);
        job->st = NULL;
    }
}

/* Drops the heavy parts of a finished job; the struct stays on its ring until the offsets before it finish. */
static void job_shrink(struct job *job)
{
    if (job->prompt_owned)
        free((char *)job->prompt);
    job->prompt = NULL;
    job->prompt_owned = false;
    free(job->orig_value);
    free(job->callback_url);
    free(job->req_body);
    job->orig_value = job->callback_url = job->req_body = NULL;
    chat_result_free(&job->res);
    job_stream_free(job);
    free(job->err_code);
    free(job->err_msg);
    job->err_code = job->err_msg = NULL;
}

/* Sets the error of a failed job (copies of code and msg, cut as the fixed fields of old were). code and msg
 * may be the job's own. */
static void job_set_err(struct job *job, const char *code, const char *msg)
{
    char *c = xstrndup(code, strnlen(code, ERR_CODE_MAX));
    char *m = xstrndup(msg, strnlen(msg, ERR_MSG_MAX));
    free(job->err_code);
    free(job->err_msg);
    job->err_code = c;
    job->err_msg = m;
}

/* ---------------------------------------------------------------- partitions and offsets */

static struct part *part_get(struct worker *w, int32_t p)
{
    return p >= 0 && p < w->nparts ? w->parts[p] : NULL;
}

static void part_push(struct part *part, struct job *job)
{
    if (part->count == part->cap) {
        size_t cap = part->cap ? part->cap * 2 : 64;
        struct job **ring = xcalloc(cap, sizeof *ring);
        for (size_t i = 0; i < part->count; i++)
            ring[i] = part->ring[(part->head + i) % part->cap];
        free(part->ring);
        part->ring = ring;
        part->cap = cap;
        part->head = 0;
    }
    part->ring[(part->head + part->count) % part->cap] = job;
    part->count++;
}

/* The offset to commit: the first unfinished one. */
static int64_t part_committable(const struct part *part)
{
    return part->count ? part->ring[part->head]->offset : part->next_offset;
}

/* Backpressure: the consumer hands over messages only while fewer than max-buffered jobs are held (room_cb);
 * the rest wait in librdkafka's partition queues, fetched already. Partitions are not paused for it: librdkafka
 * 2.0.2 drops the prefetch of a paused partition and serves a resumed one late. Once an eighth of the room is
 * free again, the consumer is told to go on. */
static long room_cb(void *ctx)
{
    struct worker *w = ctx;
    return w->draining || w->buffered >= w->cfg->max_buffered ? 0 : w->cfg->max_buffered - w->buffered;
}

static void check_backpressure(struct worker *w)
{
    long step = w->cfg->max_buffered / 8 > 1 ? w->cfg->max_buffered / 8 : 1;
    if (!w->draining && w->cfg->max_buffered - w->buffered >= step)
        kafka_consumer_kick(w->kc);
}

/* Frees the finished jobs at the head of the ring. */
static void part_advance(struct worker *w, struct part *part)
{
    while (part->count && part->ring[part->head]->state == J_DONE) {
        job_free(part->ring[part->head]);
        part->head = (part->head + 1) % part->cap;
        part->count--;
        w->buffered--;
    }
    check_backpressure(w);
}

/* Commits every partition whose committable offset moved. With a list, only those partitions. */
static void commit_finished(struct worker *w, const rd_kafka_topic_partition_list_t *only, bool async)
{
    rd_kafka_topic_partition_list_t *offs = rd_kafka_topic_partition_list_new(8);
    for (int p = 0; p < w->nparts; p++) {
        struct part *part = w->parts[p];
        if (!part)
            continue;
        if (only && !rd_kafka_topic_partition_list_find(only, w->cfg->topic_prompts, p))
            continue;
        int64_t off = part_committable(part);
        /* A synchronous commit (revoke, shutdown) repeats the last one too, in case an async one failed. */
        if (off < 0 || (async && off <= part->committed))
            continue;
        rd_kafka_topic_partition_list_add(offs, w->cfg->topic_prompts, p)->offset = off;
        part->committed = off;
    }
    if (offs->cnt > 0) {
        log_debug("committing %d partition(s)", offs->cnt);
        kafka_consumer_commit(w->kc, offs, async);
    }
    rd_kafka_topic_partition_list_destroy(offs);
}

static void commit_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    commit_finished(arg, NULL, true);
}

/* ---------------------------------------------------------------- slots and the ready queue */

static void ready_remove(struct worker *w, struct job *job)
{
    if (job->ready_prev)
        job->ready_prev->ready_next = job->ready_next;
    else
        w->ready_head = job->ready_next;
    if (job->ready_next)
        job->ready_next->ready_prev = job->ready_prev;
    else
        w->ready_tail = job->ready_prev;
    job->ready_prev = job->ready_next = NULL;
}

/* Runs the job's next step that needs an LLM slot, now or when one frees. */
static void slot_acquire(struct job *job)
{
    struct worker *w = job->w;
    if (w->draining || (job->part && job->part->revoking && job->step == STEP_BEGIN)) {
        /* Not started after all: the next owner of the partition will do it. */
        job->state = J_WAIT_KEY;
        job_inactive(job);
        check_drained(w);
        return;
    }
    if (w->in_flight < w->cfg->max_in_flight && !w->ready_head && (job->ep = llm_reserve(w->llm)) >= 0) {
        w->in_flight++;
        job->has_slot = true;
        job_step_run(job);
        return;
    }
    job->state = J_READY;
    job->ready_prev = w->ready_tail;
    job->ready_next = NULL;
    if (w->ready_tail)
        w->ready_tail->ready_next = job;
    else
        w->ready_head = job;
    w->ready_tail = job;
}

/* Starts the jobs waiting for a slot, in order, while there is room. A job can fail at once (Redis down: the
 * store answers synchronously) and give its slot back, which calls this again: the guard keeps that a loop
 * here instead of a recursion as deep as the queue (16,384 jobs overflowed the stack). */
static void slot_release(struct worker *w)
{
    if (w->releasing)
        return;
    w->releasing = true;
    while (w->ready_head && w->in_flight < w->cfg->max_in_flight && !w->draining) {
        struct job *job = w->ready_head;
        if ((job->ep = llm_reserve(w->llm)) < 0)
            break;
        ready_remove(w, job);
        w->in_flight++;
        job->has_slot = true;
        job_step_run(job);
    }
    w->releasing = false;
}

static void job_drop_slot(struct job *job)
{
    if (job->has_slot) {
        job->has_slot = false;
        job->w->in_flight--;
        llm_release(job->w->llm, job->ep);
        slot_release(job->w);
    }
}

/* ---------------------------------------------------------------- backoff */

static void backoff_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct job *job = arg;
    if (job->step == STEP_BEGIN || job->step == STEP_CALL)
        slot_acquire(job);
    else
        job_step_run(job);
}

/* Waits delay_ms, then resumes at step. Holds no slot while waiting. */
static void job_backoff(struct job *job, enum job_step step, int64_t delay_ms)
{
    /* Timers count from the loop's cached time, which may be a few ms old: a Retry-After must not fire early. */
    event_base_update_cache_time(job->w->base);
    job_drop_slot(job);
    job->state = J_BACKOFF;
    job->step = step;
    if (!job->timer)
        job->timer = evtimer_new(job->w->base, backoff_cb, job);
    struct timeval tv = {(time_t)(delay_ms / 1000), (suseconds_t)((delay_ms % 1000) * 1000)};
    evtimer_add(job->timer, &tv);
}

/* Redis or Kafka failed: retry forever, with a capped exponential delay. */
static void job_retry_infra(struct job *job, enum job_step step, const char *what)
{
    int n = job->store_failures < 10 ? job->store_failures : 10;
    int64_t delay = (int64_t)STORE_RETRY_MS << n;
    if (delay > STORE_RETRY_MAX_MS)
        delay = STORE_RETRY_MAX_MS;
    job->store_failures++;
    if (job->store_failures == 1 || job->store_failures % 20 == 0)
        log_warn("conversation %s: %s unavailable; retrying (%d failures)", job->conv_id, what, job->store_failures);
    job_backoff(job, step, delay);
}

/* ---------------------------------------------------------------- response messages */

static void json_key_str(struct buf *b, const char *key, const char *s, size_t n)
{
    buf_append(b, key, strlen(key));
    buf_append_json_string(b, s ? s : "", s ? n : 0);
}

static void json_key_int(struct buf *b, const char *key, long long v)
{
    char num[24];
    buf_append(b, key, strlen(key));
    buf_append(b, num, fmt_i64(num, v));
}

/* The response record, written directly (jansson's tree and dump cost 5% of the worker's CPU). */
static char *response_json(const struct job *job)
{
    bool ok = job->outcome == TURN_COMPLETE;
    struct buf b;
    buf_init(&b, (size_t)-1);
    json_key_str(&b, "{\"conversation_id\":", job->conv_id, strlen(job->conv_id));
    json_key_str(&b, ",\"user_prompt\":", job->prompt, job->prompt_len);
    json_key_str(&b, ",\"llm_response\":", ok ? job->res.content : NULL, job->res.content_len);
    json_key_str(&b, ",\"status\":", ok ? "complete" : "failed", ok ? 8 : 6);
    json_key_int(&b, ",\"turn\":", job->turn);
    json_key_str(&b, ",\"model\":", job->res.model, job->res.model ? strlen(job->res.model) : 0);
    json_key_int(&b, ",\"usage\":{\"prompt_tokens\":", job->res.prompt_tokens);
    json_key_int(&b, ",\"completion_tokens\":", job->res.completion_tokens);
    json_key_int(&b, ",\"total_tokens\":", job->res.total_tokens);
    json_key_str(&b, "},\"finish_reason\":", job->res.finish_reason,
                 job->res.finish_reason ? strlen(job->res.finish_reason) : 0);
    json_key_int(&b, ",\"completed_at\":", (long long)now_ms());
    json_key_int(&b, ",\"attempts\":", job->attempts);
    if (!ok) {
        json_key_str(&b, ",\"error\":{\"code\":", job->err_code, job->err_code ? strlen(job->err_code) : 0);
        json_key_str(&b, ",\"message\":", job->err_msg, job->err_msg ? strlen(job->err_msg) : 0);
        buf_append(&b, "}", 1);
    }
    /* "resp_<conversation>_<turn>"; an id has at most 64 characters (conv_id_valid) */
    char rid[5 + 64 + 1 + 21];
    size_t cl = strlen(job->conv_id), k = 5 + cl + 1;
    assert(cl <= 64);
    memcpy(rid, "resp_", 5);
    memcpy(rid + 5, job->conv_id, cl);
    rid[5 + cl] = '_';
    k += fmt_i64(rid + k, job->turn);
    json_key_str(&b, ",\"response_id\":", rid, k);
    if (job->callback_url)
        json_key_str(&b, ",\"callback_url\":", job->callback_url, strlen(job->callback_url));
    buf_append(&b, "}", 1);
    return b.data;
}

static rd_kafka_headers_t *dlq_headers(const struct job *job)
{
    char n[32], ts[32], part[16], off[32];
    rd_kafka_headers_t *h = rd_kafka_headers_new(6);
    snprintf(n, sizeof n, "%d", job->attempts);
    snprintf(ts, sizeof ts, "%" PRId64, now_ms());
    snprintf(part, sizeof part, "%" PRId32, job->partition);
    snprintf(off, sizeof off, "%" PRId64, job->offset);
    rd_kafka_header_add(h, "asyncllm-error-code", -1, job->err_code ? job->err_code : "", -1);
    rd_kafka_header_add(h, "asyncllm-error-message", -1, job->err_msg ? job->err_msg : "", -1);
    rd_kafka_header_add(h, "asyncllm-attempts", -1, n, -1);
    rd_kafka_header_add(h, "asyncllm-failed-at", -1, ts, -1);
    rd_kafka_header_add(h, "asyncllm-original-partition", -1, part, -1);
    rd_kafka_header_add(h, "asyncllm-original-offset", -1, off, -1);
    return h;
}

static void job_publish(struct job *job)
{
    struct worker *w = job->w;
    job->state = J_PUBLISH;
    job->publish_failed = false;
    const char *key = job->conv_id ? job->conv_id : "";
    rd_kafka_resp_err_t e = RD_KAFKA_RESP_ERR_NO_ERROR;
    if (!job->invalid) {
        char *value = response_json(job);
        e = kafka_produce(w->kp, w->cfg->topic_responses, key, strlen(key), value, strlen(value), NULL, job);
        free(value);
        if (!e)
            job->drs_pending++;
    }
    if (!e && job->outcome == TURN_FAILED && job->orig_value) {
        rd_kafka_headers_t *h = dlq_headers(job);
        e = kafka_produce(w->kp, w->cfg->topic_dlq, key, strlen(key), job->orig_value, job->orig_len, h, job);
        if (e)
            rd_kafka_headers_destroy(h);
        else
            job->drs_pending++;
    }
    if (e) {
        log_warn("conversation %s: produce failed: %s", key, rd_kafka_err2str(e));
        if (job->drs_pending == 0)
            job_retry_infra(job, STEP_PUBLISH, "Kafka");
        else
            job->publish_failed = true; /* retried when the outstanding reports arrive */
    }
}

static void worker_dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset)
{
    (void)partition;
    (void)offset;
    struct job *job = opaque;
    job->drs_pending--;
    if (err) {
        log_warn("conversation %s: response not delivered: %s", job->conv_id ? job->conv_id : "?",
                 rd_kafka_err2str(err));
        job->publish_failed = true;
    }
    if (job->drs_pending > 0)
        return;
    if (job->abandoned) {
        job_free(job);
        return;
    }
    if (job->publish_failed) {
        job_retry_infra(job, STEP_PUBLISH, "Kafka");
        return;
    }
    job->store_failures = 0;
    if (job->outcome == TURN_FAILED)
        job->w->dead_lettered++;
    if (!job->invalid)
        store_mark_published(job->w->st, job->conv_id, job->turn);
    job_done(job);
}

/* ---------------------------------------------------------------- finishing */

static void finish_cb(void *arg, int rc, bool stored)
{
    struct job *job = arg;
    job->op_pending = false;
    if (job->abandoned) {
        job_free(job);
        return;
    }
    if (rc == STORE_EUNAVAILABLE) {
        job_retry_infra(job, STEP_FINISH, "Redis");
        return;
    }
    job->store_failures = 0;
    if (rc == STORE_ENOTFOUND || rc == STORE_ECONFLICT) {
        log_info("conversation %s turn %ld was %s before it finished; not published", job->conv_id, job->turn,
                 rc == STORE_ENOTFOUND ? "deleted or expired" : "cancelled or deleted");
        job_done(job);
        return;
    }
    if (!stored)
        log_info("conversation %s turn %ld was already stored; publishing again", job->conv_id, job->turn);
    if (job->outcome == TURN_COMPLETE)
        job->w->completed++;
    else
        job->w->failed++;
    job_publish(job);
}

static void job_finish(struct job *job)
{
    struct worker *w = job->w;
    job->state = J_FINISH;
    struct turn_result r = {
        .status = job->outcome,
        .response = job->outcome == TURN_COMPLETE ? job->res.content : "",
        .response_len = job->outcome == TURN_COMPLETE ? job->res.content_len : 0,
        .model = job->res.model,
        .finish_reason = job->res.finish_reason,
        .error_code = job->err_code,
        .error_message = job->err_msg,
        .prompt_tokens = job->res.prompt_tokens,
        .completion_tokens = job->res.completion_tokens,
        .total_tokens = job->res.total_tokens,
        .attempts = job->attempts,
    };
    job->op_pending = true;
    store_finish(w->st, job->conv_id, job->turn, &r, finish_cb, job);
}

static void job_fail(struct job *job, const char *code, const char *msg)
{
    job->outcome = TURN_FAILED;
    job_set_err(job, code, msg);
    log_warn("conversation %s turn %ld failed after %d attempt(s): %s: %s", job->conv_id ? job->conv_id : "?",
             job->turn, job->attempts, code, msg);
    if (job->invalid)
        job_publish(job);
    else
        job_finish(job);
}

/* ---------------------------------------------------------------- the LLM call */

static bool retryable_status(long status)
{
    return status == 408 || status == 409 || status == 429 || status >= 500;
}

static void call_cb(void *arg, const struct llm_response *r)
{
    struct job *job = arg;
    struct worker *w = job->w;
    job->call = NULL;
    hist_observe(&w->llm_latency, (double)r->elapsed_ms / 1000.0);
    char msg[512], detail[300];
    const char *code = NULL;
    if (job->stream && (job->st->failed || (r->http_status == 200 && !job->st->done &&
                                            !(job->res.finish_reason && job->res.finish_reason[0])))) {
        code = "llm_bad_response";
        snprintf(msg, sizeof msg, "%s",
                 job->st->failed ? job->st->err : "the LLM's stream ended before its last chunk");
    } else if (job->stream && r->http_status == 200) {
        job_drop_slot(job);
        job->outcome = TURN_COMPLETE;
        job_finish(job);
        return;
    } else if (r->http_status == 200) {
        if (chat_parse_response(r->body, r->body_len, &job->res, msg, sizeof msg) == 0) {
            job_drop_slot(job);
            job->outcome = TURN_COMPLETE;
            job_finish(job);
            return;
        }
        code = "llm_bad_response";
    } else if (r->too_large) {
        job_drop_slot(job);
        job_fail(job, "llm_response_too_large", "the LLM's answer is larger than llm-max-response-bytes");
        return;
    } else if (r->http_status == 0) {
        code = r->timed_out ? "llm_timeout" : "llm_connection_error";
        snprintf(msg, sizeof msg, "%s", r->curl_error);
    } else {
        chat_error_summary(r->body, r->body_len, detail, sizeof detail);
        snprintf(msg, sizeof msg, "the LLM answered HTTP %ld: %s", r->http_status, detail);
        if (!retryable_status(r->http_status)) {
            job_drop_slot(job);
            job_fail(job, "llm_request_rejected", msg);
            return;
        }
        code = r->http_status == 429 ? "llm_rate_limited" : "llm_server_error";
    }
    /* A retryable failure. */
    int64_t cap = w->cfg->retry_base_ms << (job->attempts - 1 < 20 ? job->attempts - 1 : 20);
    if (cap > w->cfg->retry_max_ms)
        cap = w->cfg->retry_max_ms;
    int64_t delay = (int64_t)rand_below((uint64_t)cap + 1); /* full jitter */
    if (r->retry_after_ms >= 0 && r->retry_after_ms > delay)
        delay = r->retry_after_ms;
    bool past_deadline = mono_ms() + delay - job->taken_ms > w->cfg->prompt_deadline_ms;
    if (job->attempts >= w->cfg->max_attempts || past_deadline) {
        char final[600];
        snprintf(final, sizeof final, "%s (gave up after %d attempt(s)%s)", msg, job->attempts,
                 past_deadline ? ", past the prompt deadline" : "");
        job_drop_slot(job);
        job_fail(job, code, final);
        return;
    }
    w->retried++;
    log_info("conversation %s turn %ld: %s: %s; retry %d in %" PRId64 " ms", job->conv_id, job->turn, code, msg,
             job->attempts, delay);
    job_backoff(job, STEP_CALL, delay);
}

/* Streaming: one SSE event of the LLM's answer. */
static int stream_event_cb(void *arg, const char *data, size_t len)
{
    struct job *job = arg;
    struct job_stream *st = job->st;
    const char *d;
    size_t dl;
    int rc = chat_stream_chunk(&job->res, data, len, &d, &dl, st->err, sizeof st->err);
    if (rc < 0) {
        st->failed = true;
        return -1;
    }
    if (rc == 1)
        st->done = true;
    if (dl && buf_append(&st->delta, d, dl)) {
        snprintf(st->err, sizeof st->err, "the LLM's answer is larger than llm-max-response-bytes");
        st->failed = true;
        return -1;
    }
    return 0;
}

/* Streaming: bytes of the LLM's answer; the text of one network read becomes one delta event. */
static int stream_data_cb(void *arg, const char *data, size_t len)
{
    struct job *job = arg;
    struct job_stream *st = job->st;
    if (sse_feed(&st->sse, data, len)) {
        if (!st->failed) {
            snprintf(st->err, sizeof st->err, "the LLM's stream has a line or event over the size limit");
            st->failed = true;
        }
        return -1;
    }
    if (job->res.content_len > (size_t)job->w->cfg->llm_max_response_bytes) {
        snprintf(st->err, sizeof st->err, "the LLM's answer is larger than llm-max-response-bytes");
        st->failed = true;
        return -1;
    }
    if (st->delta.len) {
        store_event(job->w->st, job->conv_id, job->turn, 'd', st->delta.data, st->delta.len);
        buf_reset(&st->delta);
    }
    return 0;
}

static void job_call(struct job *job)
{
    struct worker *w = job->w;
    job->state = J_CALL;
    job->attempts++;
    w->llm_calls++;
    chat_result_free(&job->res); /* a retry starts over */
    if (!job->stream) {
        job->call = llm_post(w->llm, job->ep, "/chat/completions", job->req_body, job->req_len, call_cb, job);
        return;
    }
    job_stream_free(job); /* a retry starts over */
    job->st = xcalloc(1, sizeof *job->st);
    sse_init(&job->st->sse, (size_t)w->cfg->llm_max_response_bytes, stream_event_cb, job);
    buf_init(&job->st->delta, (size_t)w->cfg->llm_max_response_bytes);
    job->call = llm_post_stream(w->llm, job->ep, "/chat/completions", job->req_body, job->req_len, stream_data_cb,
                                call_cb, job);
}

/* ---------------------------------------------------------------- beginning */

/* Copies a stored result into the job, for a redelivered turn that is already finished. */
static void job_take_stored(struct job *job, const struct turn *t)
{
    job->outcome = t->status;
    job->res.content = xstrndup(t->response ? t->response : "", t->response ? t->response_len : 0);
    job->res.content_len = t->response ? t->response_len : 0;
    job->res.model = xstrdup(t->model ? t->model : "");
    job->res.finish_reason = xstrdup(t->finish_reason ? t->finish_reason : "");
    job->res.prompt_tokens = t->prompt_tokens;
    job->res.completion_tokens = t->completion_tokens;
    job->res.total_tokens = t->total_tokens;
    job->attempts = (int)t->attempts;
    job_set_err(job, t->error_code ? t->error_code : "", t->error_message ? t->error_message : "");
}

/* Chat messages from a turn's stored input list ([{role, content}], normalised by the API), appended to msgs. */
static void add_input_msgs(struct chat_msg **msgs, size_t *n, size_t *cap, json_t *input)
{
    size_t i;
    json_t *m;
    json_array_foreach(input, i, m)
    {
        const char *role = json_string_value(json_object_get(m, "role"));
        json_t *c = json_object_get(m, "content");
        if (!role || !json_is_string(c))
            continue;
        if (*n == *cap) {
            *cap *= 2;
            *msgs = xrealloc(*msgs, *cap * sizeof **msgs);
        }
        (*msgs)[(*n)++] = (struct chat_msg){role, json_string_value(c), json_string_length(c)};
    }
}

static void add_msg(struct chat_msg **msgs, size_t *n, size_t *cap, const char *role, const char *s, size_t len)
{
    if (*n == *cap) {
        *cap *= 2;
        *msgs = xrealloc(*msgs, *cap * sizeof **msgs);
    }
    (*msgs)[(*n)++] = (struct chat_msg){role, s ? s : "", s ? len : 0};
}

/* The request for this turn: the system instructions of this request, the earlier complete turns of the
 * conversation (up to context_turn when the request continued an older response), then this turn's input. */
static void job_build_request(struct job *job, const struct conv *conv)
{
    struct worker *w = job->w;
    /* The message was read once already (on_message), so this gives the same object; without optional
     * members (the common case) there is nothing to read. */
    json_t *m = job->has_opts ? jsonr_loadb(job->orig_value, job->orig_len, NULL) : NULL;
    size_t n = 0, cap = 16;
    struct chat_msg *msgs = xcalloc(cap, sizeof *msgs);
    json_t *held[64]; /* parsed inputs of earlier turns, alive until the body is built */
    size_t nheld = 0;
    json_t *instr = json_object_get(m, "instructions");
    if (json_is_string(instr) && json_string_length(instr) > 0)
        add_msg(&msgs, &n, &cap, "system", json_string_value(instr), json_string_length(instr));
    long last = job->turn - 1;
    json_t *ctx = json_object_get(m, "context_turn");
    if (json_is_integer(ctx) && json_integer_value(ctx) >= 0 && json_integer_value(ctx) < last)
        last = (long)json_integer_value(ctx);
    for (long i = 1; i <= last; i++) {
        const struct turn *p = &conv->turn[i];
        if (p->status != TURN_COMPLETE || !p->prompt)
            continue;
        json_t *in = p->input && nheld < 64 ? json_loads(p->input, 0, NULL) : NULL;
        if (json_is_array(in)) {
            held[nheld++] = in;
            add_input_msgs(&msgs, &n, &cap, in);
        } else {
            json_decref(in);
            add_msg(&msgs, &n, &cap, "user", p->prompt, p->prompt_len);
        }
        add_msg(&msgs, &n, &cap, "assistant", p->response, p->response_len);
    }
    json_t *input = json_object_get(m, "input");
    if (json_is_array(input) && json_array_size(input) > 0)
        add_input_msgs(&msgs, &n, &cap, input);
    else
        add_msg(&msgs, &n, &cap, "user", job->prompt, job->prompt_len);

    struct chat_opts o = {.max_tokens = w->cfg->llm_max_tokens, .temperature = -1, .top_p = -1};
    json_t *v;
    if (json_is_integer(v = json_object_get(m, "max_output_tokens")) && json_integer_value(v) > 0)
        o.max_tokens = (long)json_integer_value(v);
    if (json_is_number(v = json_object_get(m, "temperature")))
        o.temperature = json_number_value(v);
    if (json_is_number(v = json_object_get(m, "top_p")))
        o.top_p = json_number_value(v);
    o.stream = job->stream;
    const char *model = json_string_value(json_object_get(m, "model"));
    free(job->req_body);
    job->req_body = chat_request_new_opts(model && model[0] ? model : w->cfg->llm_model, &o, msgs, n, &job->req_len);
    for (size_t i = 0; i < nheld; i++)
        json_decref(held[i]);
    json_decref(m);
    free(msgs);
}

static void begin_cb(void *arg, int rc, long turn, const struct conv *conv)
{
    struct job *job = arg;
    struct worker *w = job->w;
    job->op_pending = false;
    if (job->abandoned) {
        job_free(job);
        return;
    }
    if (rc != STORE_OK) {
        job_retry_infra(job, STEP_BEGIN, "Redis");
        return;
    }
    if (turn < 1 || turn > conv->nturns) {
        job_retry_infra(job, STEP_BEGIN, "Redis (unexpected answer)");
        return;
    }
    job->store_failures = 0;
    job->turn = turn;
    const struct turn *t = &conv->turn[turn];
    if (t->status == TURN_COMPLETE || t->status == TURN_FAILED) {
        /* A redelivery of a finished turn: no second LLM call, no second stored result. */
        job_drop_slot(job);
        w->redelivered_done++;
        job_take_stored(job, t);
        if (t->published) {
            log_debug("conversation %s turn %ld already finished and published", job->conv_id, turn);
            job_done(job);
        } else {
            job_publish(job);
        }
        return;
    }
    if (t->status == TURN_CANCELLED || t->status == TURN_DELETED) {
        log_info("conversation %s turn %ld was %s before it ran; skipped", job->conv_id, turn,
                 turn_status_name(t->status));
        job_done(job);
        return;
    }
    job->stream = t->stream;
    /* ids[] has room for the key after the conversation id (see on_message) */
    size_t cl = strlen(job->conv_id);
    memcpy(job->run_key, job->conv_id, cl);
    job->run_key[cl] = ' ';
    fmt_i64(job->run_key + cl + 1, turn);
    if (map_put(w->running, job->run_key, job)) /* the same turn twice at once: keep the newest */
        log_warn("conversation %s turn %ld is running twice", job->conv_id, turn);
    job_build_request(job, conv);
    job_call(job);
}

static void job_begin(struct job *job)
{
    job->state = J_BEGIN;
    job->op_pending = true;
    store_begin(job->w->st, job->conv_id, job->turn, job->prompt, job->prompt_len, job->partition, job->offset,
                begin_cb, job);
}

static void job_step_run(struct job *job)
{
    switch (job->step) {
    case STEP_BEGIN:
        job_begin(job);
        break;
    case STEP_CALL:
        job_call(job);
        break;
    case STEP_FINISH:
        job_finish(job);
        break;
    case STEP_PUBLISH:
        job_publish(job);
        break;
    }
}

/* A job at the head of its keyq (or an invalid message) starts. */
static void job_start(struct job *job)
{
    if (job->part && job->part->revoking)
        return; /* stays WAIT_KEY: the partition's next owner does it */
    job->w->active++;
    if (job->part)
        job->part->active++;
    job->taken_ms = mono_ms();
    if (job->invalid) {
        job_fail(job, job->err_code, job->err_msg);
        return;
    }
    job->step = STEP_BEGIN;
    slot_acquire(job);
}

static void job_done(struct job *job)
{
    struct worker *w = job->w;
    job_drop_slot(job);
    job->state = J_DONE;
    job_inactive(job);
    job_unrun(job);
    job_shrink(job);
    struct keyq *kq = job->kq;
    if (kq) {
        kq->head = job->key_next;
        job->kq = NULL;
        if (kq->head) {
            if (!w->draining)
                job_start(kq->head);
        } else {
            map_del(w->keys, kq->key);
            free(kq);
        }
    }
    struct part *part = job->part;
    if (part) {
        bool revoking = part->revoking;
        part_advance(w, part); /* may free job */
        if (revoking)
            revoke_check(w);
    }
    check_drained(w);
}

/* ---------------------------------------------------------------- consuming */

/* The prompt of a valid message: a pointer into the message text when the string is there as it is (no
 * escapes: the common case), else a copy. Any place where the bytes match will do: they are the same bytes. */
static void job_take_prompt(struct job *job, json_t *prompt)
{
    const char *v = json_string_value(prompt);
    size_t n = json_string_length(prompt);
    const char *at = n ? memmem(job->orig_value, job->orig_len, v, n) : job->orig_value;
    job->prompt_owned = !at;
    job->prompt = at ? at : xstrndup(v, n);
    job->prompt_len = n;
}

static void on_message(void *ctx, rd_kafka_message_t *m)
{
    struct worker *w = ctx;
    struct part *part = part_get(w, m->partition);
    if (!part || part->revoking) {
        rd_kafka_message_destroy(m);
        return; /* a partition we no longer own, or are giving up: not tracked, so never committed */
    }
    const char *payload = m->payload ? (const char *)m->payload : "";
    json_t *v = jsonr_loadb(payload, m->len, NULL);
    const char *cid = json_string_value(json_object_get(v, "conversation_id"));
    json_t *prompt = json_object_get(v, "prompt");
    json_t *turn = json_object_get(v, "turn");
    const char *id = NULL;
    size_t idl = 0;
    if (m->key_len > 0 && m->key_len < 65) {
        id = m->key;
        idl = m->key_len;
    } else if (cid) {
        id = cid;
        idl = strlen(cid);
    }
    /* ids[]: the conversation id, then room for the running key "<id> <turn>" */
    struct job *job = xcalloc(1, sizeof *job + (id ? 2 * idl + 23 : 0));
    if (id) {
        job->conv_id = job->ids;
        memcpy(job->conv_id, id, idl);
        job->conv_id[idl] = '\0'; /* calloc'd: run_key starts as "" */
        job->run_key = job->ids + idl + 1;
    }
    job->w = w;
    job->part = part;
    job->partition = m->partition;
    job->offset = m->offset;
    job->orig_value = xstrndup(payload, m->len);
    job->orig_len = m->len;
    job->all_next = w->jobs;
    if (w->jobs)
        w->jobs->all_prev = job;
    w->jobs = job;
    part->next_offset = m->offset + 1;
    part_push(part, job);
    w->buffered++;

    if (!v || !json_is_object(v) || !json_is_string(prompt) || !job->conv_id ||
        !conv_id_valid(job->conv_id, strlen(job->conv_id))) {
        job->invalid = true;
        job_set_err(job, "invalid_message",
                    "not a prompt message: expected JSON {\"conversation_id\", \"prompt\"} keyed by conversation_id");
    } else {
        job_take_prompt(job, prompt);
        job->turn = json_is_integer(turn) && json_integer_value(turn) > 0 ? (long)json_integer_value(turn) : 0;
        json_t *cb = json_object_get(v, "callback_url");
        if (json_is_string(cb))
            job->callback_url = xstrndup(json_string_value(cb), json_string_length(cb));
        size_t known = 1 + (cid != NULL) + (turn != NULL) + (cb != NULL);
        job->has_opts = json_object_size(v) > known;
    }
    json_decref(v);
    rd_kafka_message_destroy(m);

    if (job->invalid) {
        job_start(job);
    } else {
        char key[12 + 64 + 1]; /* "<partition>/<conversation id>" */
        size_t cl = strlen(job->conv_id), kl = fmt_i64(key, job->partition);
        assert(cl <= 64);
        key[kl++] = '/';
        memcpy(key + kl, job->conv_id, cl + 1);
        kl += cl;
        struct keyq *kq = map_get(w->keys, key);
        if (!kq) {
            kq = xcalloc(1, sizeof *kq + kl + 1);
            memcpy(kq->key, key, kl + 1);
            map_put(w->keys, kq->key, kq);
        }
        job->kq = kq;
        if (kq->head) {
            kq->tail->key_next = job; /* waits for the turns before it */
            kq->tail = job;
        } else {
            kq->head = kq->tail = job;
            job_start(job);
        }
    }
    check_backpressure(w);
}

static void on_assign(void *ctx, const rd_kafka_topic_partition_list_t *parts)
{
    struct worker *w = ctx;
    /* librdkafka keeps a partition paused across rebalances: one we paused while revoking it (or at
     * shutdown) and that comes back to us must be resumed. */
    kafka_consumer_pause(w->kc, parts, false);
    for (int i = 0; i < parts->cnt; i++) {
        int32_t p = parts->elems[i].partition;
        if (p >= w->nparts) {
            w->parts = xrealloc(w->parts, (size_t)(p + 1) * sizeof *w->parts);
            memset(w->parts + w->nparts, 0, (size_t)(p + 1 - w->nparts) * sizeof *w->parts);
            w->nparts = p + 1;
        }
        if (!w->parts[p]) {
            struct part *part = xcalloc(1, sizeof *part);
            part->partition = p;
            part->next_offset = -1;
            part->committed = -1;
            w->parts[p] = part;
        }
    }
    if (w->assignment)
        rd_kafka_topic_partition_list_destroy(w->assignment);
    w->assignment = rd_kafka_topic_partition_list_copy(parts);
    w->paused = false;
    check_backpressure(w);
}

/* Gives up a job of a revoked partition: the next owner processes it again. */
static void job_abandon(struct job *job)
{
    struct worker *w = job->w;
    if (job->state == J_DONE) {
        job_free(job);
        return;
    }
    if (job->state == J_READY)
        ready_remove(w, job);
    if (job->state != J_WAIT_KEY)
        job_inactive(job);
    if (job->call) {
        llm_cancel(job->call);
        job->call = NULL;
    }
    if (job->timer)
        evtimer_del(job->timer);
    job_drop_slot(job);
    job->part = NULL;
    job->kq = NULL;
    job->abandoned = true;
    if (!job->op_pending && job->drs_pending == 0)
        job_free(job);
}

/* Commits what is finished in the revoked partitions and abandons the rest. */
static void revoke_finish(struct worker *w)
{
    rd_kafka_topic_partition_list_t *parts = w->revoking;
    w->revoking = NULL;
    if (w->revoke_timer)
        evtimer_del(w->revoke_timer);
    commit_finished(w, parts, false);
    for (int i = 0; i < parts->cnt; i++) {
        struct part *part = part_get(w, parts->elems[i].partition);
        if (!part)
            continue;
        size_t unfinished = 0;
        for (size_t k = 0; k < part->count; k++) {
            struct job *job = part->ring[(part->head + k) % part->cap];
            if (job->state != J_DONE)
                unfinished++;
            if (job->kq) {
                struct keyq *kq = map_del(w->keys, job->kq->key);
                free(kq);
                /* every job of that keyq is on this ring, so no dangling kq pointer survives */
                for (struct job *j = job; j; j = j->key_next)
                    j->kq = NULL;
            }
        }
        while (part->count) {
            struct job *job = part->ring[part->head];
            part->head = (part->head + 1) % part->cap;
            part->count--;
            w->buffered--;
            job_abandon(job);
        }
        if (unfinished)
            log_info("partition %d revoked with %zu unfinished prompt(s); the next owner redoes them",
                     parts->elems[i].partition, unfinished);
        free(part->ring);
        free(part);
        w->parts[parts->elems[i].partition] = NULL;
    }
    rd_kafka_topic_partition_list_destroy(parts);
    if (w->assignment)
        rd_kafka_topic_partition_list_destroy(w->assignment);
    w->assignment = NULL;
    w->paused = false;
    check_drained(w);
}

static long revoking_active(struct worker *w)
{
    long n = 0;
    for (int i = 0; w->revoking && i < w->revoking->cnt; i++) {
        struct part *part = part_get(w, w->revoking->elems[i].partition);
        if (part)
            n += part->active;
    }
    return n;
}

/* A deferred revocation completes once the revoked partitions have nothing running. */
static void revoke_check(struct worker *w)
{
    if (w->revoking && revoking_active(w) == 0) {
        revoke_finish(w);
        kafka_consumer_revoke_done(w->kc);
    }
}

static void revoke_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct worker *w = arg;
    if (!w->revoking)
        return;
    log_warn("rebalance: %ld prompt(s) still running after %ld ms; giving them up", revoking_active(w),
             w->cfg->revoke_grace_ms);
    revoke_finish(w);
    kafka_consumer_revoke_done(w->kc);
}

/* Revocation: nothing new starts in these partitions; what runs gets revoke-grace-ms to finish (the group's
 * rebalance waits), then what is finished is committed and the rest is left to the next owner. */
static bool on_revoke(void *ctx, const rd_kafka_topic_partition_list_t *parts, bool may_defer)
{
    struct worker *w = ctx;
    if (w->revoking) /* a revocation already under way; should not happen with the eager protocol */
        revoke_finish(w);
    for (int i = 0; i < parts->cnt; i++) {
        struct part *part = part_get(w, parts->elems[i].partition);
        if (part)
            part->revoking = true;
    }
    /* Prompts waiting for a slot in these partitions never started: put them back. */
    for (struct job *job = w->ready_head, *next; job; job = next) {
        next = job->ready_next;
        if (job->part && job->part->revoking && job->step == STEP_BEGIN) {
            ready_remove(w, job);
            job->state = J_WAIT_KEY;
            job_inactive(job);
        }
    }
    kafka_consumer_pause(w->kc, parts, true);
    w->revoking = rd_kafka_topic_partition_list_copy(parts);
    long running = revoking_active(w);
    if (!may_defer || running == 0 || w->cfg->revoke_grace_ms == 0) {
        revoke_finish(w);
        return false;
    }
    log_info("rebalance: waiting up to %ld ms for %ld running prompt(s) of the revoked partitions",
             w->cfg->revoke_grace_ms, running);
    if (!w->revoke_timer)
        w->revoke_timer = evtimer_new(w->base, revoke_timer_cb, w);
    struct timeval tv = {w->cfg->revoke_grace_ms / 1000, (w->cfg->revoke_grace_ms % 1000) * 1000};
    evtimer_add(w->revoke_timer, &tv);
    return true;
}

/* ---------------------------------------------------------------- cancellation */

/* A client cancelled (or deleted) a turn: abort it if it runs here. The store already says cancelled, so the
 * result is neither stored nor published. A job waiting on Redis or Kafka finds out from the store's answer. */
static void on_notify(void *arg, const char *conv_id, long turn, const char *what)
{
    struct worker *w = arg;
    if (strcmp(what, "cancel") != 0)
        return;
    char key[96];
    snprintf(key, sizeof key, "%s %ld", conv_id, turn);
    struct job *job = map_get(w->running, key);
    if (!job)
        return;
    job->cancelled = true;
    if (job->state != J_CALL && job->state != J_BACKOFF && job->state != J_READY)
        return;
    log_info("conversation %s turn %ld cancelled by a client: aborting its LLM call", conv_id, turn);
    if (job->call) {
        llm_cancel(job->call);
        job->call = NULL;
    }
    if (job->state == J_READY)
        ready_remove(w, job);
    if (job->timer)
        evtimer_del(job->timer);
    w->cancelled++;
    job_done(job);
}

/* ---------------------------------------------------------------- metrics */

static void metrics_cb(struct http_req *req, void *arg)
{
    struct worker *w = arg;
    if (strcmp(http_path(req), "/healthz") == 0) {
        http_reply_json(req, 200, json_pack("{s:s}", "status", "ok"));
        return;
    }
    if (strcmp(http_path(req), "/metrics") != 0) {
        http_reply_error(req, 404, "invalid_request_error", "not_found", "routes: /metrics, /healthz");
        return;
    }
    struct evbuffer *out = evbuffer_new();
    store_metrics(w->st, out);
    metric_gauge(out, "asyncllm_worker_in_flight", "LLM calls in flight", (double)w->in_flight);
    metric_gauge(out, "asyncllm_worker_buffered",
                 "prompts held in memory (running, waiting or finished behind "
                 "an unfinished one)",
                 (double)w->buffered);
    metric_gauge(out, "asyncllm_worker_active", "prompts started and not finished", (double)w->active);
    metric_gauge(out, "asyncllm_worker_llm_max_in_flight", "the in-flight limit", (double)w->cfg->max_in_flight);
    metric_counter(out, "asyncllm_worker_completed_total", "turns stored as complete", (double)w->completed);
    metric_counter(out, "asyncllm_worker_failed_total", "turns stored as failed", (double)w->failed);
    metric_counter(out, "asyncllm_worker_retried_total", "LLM calls retried", (double)w->retried);
    metric_counter(out, "asyncllm_worker_llm_calls_total", "LLM calls made", (double)w->llm_calls);
    metric_counter(out, "asyncllm_worker_cancelled_total", "turns aborted because a client cancelled them",
                   (double)w->cancelled);
    metric_counter(out, "asyncllm_worker_dead_lettered_total", "prompts sent to the dead-letter topic",
                   (double)w->dead_lettered);
    metric_counter(out, "asyncllm_worker_redelivered_finished_total",
                   "redelivered prompts found already finished (no LLM call)", (double)w->redelivered_done);
    metric_hist(out, "asyncllm_worker_llm_latency_seconds", "LLM call latency", &w->llm_latency);
    evbuffer_add_printf(out, "# HELP asyncllm_worker_partition_committed_offset last offset committed\n"
                             "# TYPE asyncllm_worker_partition_committed_offset gauge\n");
    for (int p = 0; p < w->nparts; p++)
        if (w->parts[p])
            evbuffer_add_printf(out, "asyncllm_worker_partition_committed_offset{partition=\"%d\"} %lld\n", p,
                                (long long)w->parts[p]->committed);
    evbuffer_add_printf(out, "# HELP asyncllm_worker_partition_lag messages between the high watermark and the "
                             "first unfinished offset\n# TYPE asyncllm_worker_partition_lag gauge\n");
    for (int p = 0; p < w->nparts; p++) {
        if (!w->parts[p])
            continue;
        int64_t hi = kafka_consumer_high_watermark(w->kc, w->cfg->topic_prompts, p);
        int64_t from = part_committable(w->parts[p]);
        if (from < 0)
            from = kafka_consumer_position(w->kc, w->cfg->topic_prompts, p);
        if (hi >= 0 && from >= 0)
            evbuffer_add_printf(out, "asyncllm_worker_partition_lag{partition=\"%d\"} %lld\n", p,
                                (long long)(hi >= from ? hi - from : 0));
    }
    metric_gauge(out, "asyncllm_worker_paused_partitions",
                 "partitions not read: max-buffered prompts held (backpressure) or shutting down",
                 (w->paused || w->buffered >= w->cfg->max_buffered) && w->assignment ? (double)w->assignment->cnt : 0);
    size_t len = evbuffer_get_length(out);
    http_reply(req, 200, "text/plain; version=0.0.4", len ? (const char *)evbuffer_pullup(out, -1) : "", len);
    evbuffer_free(out);
}

/* ---------------------------------------------------------------- lifecycle */

static void drained_now(struct worker *w)
{
    void (*cb)(void *) = w->on_drained;
    w->on_drained = NULL;
    if (cb)
        cb(w->drained_arg);
}

static void check_drained(struct worker *w)
{
    if (!w->draining || !w->on_drained || w->active > 0)
        return;
    drained_now(w);
}

static void grace_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct worker *w = arg;
    if (w->on_drained) {
        log_warn("shutdown grace period over with %ld prompt(s) unfinished; they will be redelivered", w->active);
        drained_now(w);
    }
}

void worker_drain(struct worker *w, void (*on_drained)(void *arg), void *arg)
{
    w->draining = true;
    w->on_drained = on_drained;
    w->drained_arg = arg;
    kafka_consumer_stop_fetching(w->kc);
    if (w->assignment && !w->paused)
        kafka_consumer_pause(w->kc, w->assignment, true);
    w->paused = true;
    /* Prompts waiting for a slot never started: leave them to the next owner. */
    while (w->ready_head) {
        struct job *job = w->ready_head;
        ready_remove(w, job);
        job->state = J_WAIT_KEY;
        job_inactive(job);
    }
    log_info("draining: %ld prompt(s) in progress, grace %ld ms", w->active, w->cfg->shutdown_grace_ms);
    w->grace_timer = evtimer_new(w->base, grace_cb, w);
    struct timeval tv = {w->cfg->shutdown_grace_ms / 1000, (w->cfg->shutdown_grace_ms % 1000) * 1000};
    evtimer_add(w->grace_timer, &tv);
    check_drained(w);
}

struct worker *worker_new(struct event_base *base, const struct config *cfg, char *err, size_t errlen)
{
    struct worker *w = xcalloc(1, sizeof *w);
    w->base = base;
    w->cfg = cfg;
    w->keys = map_new();
    w->kp = kafka_producer_new(base, cfg, cfg->response_linger_ms, worker_dr_cb, err, errlen);
    if (!w->kp)
        goto fail;
    kafka_producer_warm(w->kp, cfg->topic_responses);
    kafka_producer_warm(w->kp, cfg->topic_dlq);
    w->st = store_new(base, cfg);
    w->llm = llm_new(base, cfg);
    w->running = map_new();
    static const struct notify_hooks nhooks = {on_notify, NULL};
    w->notify = notify_new(base, cfg, &nhooks, w, true);
    static const struct kafka_consumer_hooks hooks = {on_message, on_assign, on_revoke, room_cb};
    w->kc = kafka_consumer_new(base, cfg, cfg->group_id, cfg->topic_prompts, "earliest", cfg->fetch_wait_ms, &hooks, w,
                               err, errlen);
    if (!w->kc)
        goto fail;
    if (cfg->metrics_port > 0) {
        int port;
        w->metrics =
            http_server_new(base, cfg, cfg->metrics_addr, (int)cfg->metrics_port, metrics_cb, w, &port, err, errlen);
        /* Not fatal: a second worker on the same host should still work, only without metrics. */
        if (!w->metrics)
            log_error("worker: no metrics server: %s (set --metrics-port)", err);
        else
            log_info("worker: metrics on http://%s:%d/metrics", cfg->metrics_addr, port);
    }
    w->commit_timer = event_new(base, -1, EV_PERSIST, commit_timer_cb, w);
    struct timeval tv = {cfg->commit_interval_ms / 1000, (cfg->commit_interval_ms % 1000) * 1000};
    evtimer_add(w->commit_timer, &tv);
    log_info("worker: group %s, topic %s, LLM %s (model %s), max in flight %ld", cfg->group_id, cfg->topic_prompts,
             cfg->llm_base_url, cfg->llm_model, cfg->max_in_flight);
    return w;
fail:
    notify_free(w->notify);
    map_free(w->running);
    kafka_consumer_free(w->kc);
    llm_free(w->llm);
    store_free(w->st);
    kafka_producer_free(w->kp, 0);
    map_free(w->keys);
    free(w);
    return NULL;
}

void worker_free(struct worker *w)
{
    if (!w)
        return;
    if (w->metrics)
        http_server_free(w->metrics);
    notify_free(w->notify);
    w->notify = NULL;
    if (w->revoking) {
        revoke_finish(w);
        kafka_consumer_revoke_done(w->kc);
    }
    commit_finished(w, NULL, false);
    kafka_consumer_free(w->kc); /* revokes: abandons what is unfinished */
    w->kc = NULL;
    kafka_producer_free(w->kp, 5000); /* serves the last delivery reports */
    /* The timers go first: the loop runs once more below, for the last Redis writes (published marks). */
    event_free(w->commit_timer);
    w->commit_timer = NULL;
    if (w->grace_timer)
        event_free(w->grace_timer);
    w->grace_timer = NULL;
    if (w->revoke_timer)
        event_free(w->revoke_timer);
    w->revoke_timer = NULL;
    for (struct job *j = w->jobs; j; j = j->all_next)
        if (j->timer)
            evtimer_del(j->timer);
    store_drain(w->st, 3000);
    store_free(w->st); /* answers the last Redis commands */
    while (w->jobs)
        job_free(w->jobs); /* before llm_free: a job may still hold a call to cancel */
    llm_free(w->llm);
    for (int p = 0; p < w->nparts; p++) {
        if (w->parts[p]) {
            free(w->parts[p]->ring);
            free(w->parts[p]);
        }
    }
    free(w->parts);
    map_free(w->keys);
    map_free(w->running);
    if (w->assignment)
        rd_kafka_topic_partition_list_destroy(w->assignment);
    if (w->commit_timer)
        event_free(w->commit_timer);
    if (w->grace_timer)
        event_free(w->grace_timer);
    if (w->revoke_timer)
        event_free(w->revoke_timer);
    log_info("worker stopped: %lu completed, %lu failed, %lu retries, %lu LLM calls", w->completed, w->failed,
             w->retried, w->llm_calls);
    free(w);
}
