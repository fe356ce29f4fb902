/* kafka.c - see kafka.h. */
#include "kafka/kafka.h"

#include "core/config.h"
#include "core/log.h"
#include "core/util.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define POLL_INTERVAL_MS 100
#define MAX_EVENTS_PER_WAKEUP 10000 /* then yield to the loop and come back at once */

/* The pipe and events that wake a loop for one librdkafka queue. */
struct kqueue_io {
    int fds[2];
    struct event *ev_read;
    struct event *ev_timer;
};

static int set_conf(rd_kafka_conf_t *conf, const char *k, const char *v, char *err, size_t errlen)
{
    if (rd_kafka_conf_set(conf, k, v, err, errlen) != RD_KAFKA_CONF_OK)
        return -1;
    return 0;
}

static void kafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    /* syslog levels: 0..3 errors, 4 warning, 5..6 info, 7 debug */
    enum log_level l = level <= 3 ? LOG_ERROR : level == 4 ? LOG_WARN : level <= 6 ? LOG_INFO : LOG_DEBUG;
    log_at(l, "kafka %s: %s", fac, buf);
}

/* Settings shared by every client, then the user's -X pass-through, which wins. */
static rd_kafka_conf_t *base_conf(const struct config *cfg, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (set_conf(conf, "bootstrap.servers", cfg->kafka_brokers, err, errlen) ||
        set_conf(conf, "client.id", "asyncllm", err, errlen) ||
        set_conf(conf, "topic.metadata.refresh.interval.ms", "10000", err, errlen))
        goto fail;
    rd_kafka_conf_set_log_cb(conf, kafka_log_cb);
    for (int i = 0; i < cfg->kafka_nprops; i++) {
        if (set_conf(conf, cfg->kafka_props[i][0], cfg->kafka_props[i][1], err, errlen))
            goto fail;
    }
    return conf;
fail:
    rd_kafka_conf_destroy(conf);
    return NULL;
}

static int kqueue_io_init(struct kqueue_io *io, struct event_base *base, rd_kafka_queue_t *q, event_callback_fn cb,
                          void *arg)
{
    if (pipe2(io->fds, O_NONBLOCK | O_CLOEXEC))
        return -1;
    rd_kafka_queue_io_event_enable(q, io->fds[1], "1", 1);
    io->ev_read = event_new(base, io->fds[0], EV_READ | EV_PERSIST, cb, arg);
    io->ev_timer = event_new(base, -1, EV_PERSIST, cb, arg);
    struct timeval tv = {0, POLL_INTERVAL_MS * 1000};
    event_add(io->ev_read, NULL);
    event_add(io->ev_timer, &tv);
    return 0;
}

static void kqueue_io_drain_pipe(struct kqueue_io *io)
{
    char b[256];
    while (read(io->fds[0], b, sizeof b) > 0)
        ;
}

static void kqueue_io_free(struct kqueue_io *io, rd_kafka_queue_t *q)
{
    if (q)
        rd_kafka_queue_io_event_enable(q, -1, NULL, 0);
    if (io->ev_read)
        event_free(io->ev_read);
    if (io->ev_timer)
        event_free(io->ev_timer);
    io->ev_read = io->ev_timer = NULL;
    close(io->fds[0]);
    close(io->fds[1]);
}

/* ---------------------------------------------------------------- producer */

struct kafka_producer {
    rd_kafka_t *rk;
    rd_kafka_queue_t *mainq;
    struct kqueue_io io;
    kafka_dr_cb *dr;
    bool up;
    rd_kafka_topic_t *warm[4]; /* topic handles held so their metadata stays known */
    /* each warmed topic's partition count as librdkafka last partitioned a message with it (0: not yet, or
     * another partitioner than murmur2_random was configured); written by whichever thread partitions */
    _Atomic int32_t warm_cnt[4];
    int nwarm;
    /* readiness probe (see probe_cb); off unless kafka_producer_watch() was called */
    char probe_topic[256];
    rd_kafka_queue_t *probe_q;
    struct event *probe_ev;
    bool probe_inflight;
    int64_t probe_started_ms;
    int64_t last_ok_ms;
    int64_t down_ms; /* when librdkafka last said all brokers are down */
};

static void set_up(struct kafka_producer *kp, bool up, const char *why)
{
    if (up != kp->up)
        log_info("kafka: brokers %s%s%s", up ? "reachable" : "unreachable", why ? ": " : "", why ? why : "");
    kp->up = up;
}

static void producer_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    struct kafka_producer *kp = opaque;
    rd_kafka_resp_err_t err = m->err;
    /* Belt and braces: a success must mean "persisted by the broker, at an offset". Anything else is reported
     * as a failure, so that a client never gets 202 for a prompt that is not in the log. */
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR &&
        (rd_kafka_message_status(m) != RD_KAFKA_MSG_STATUS_PERSISTED || m->offset < 0)) {
        log_error("kafka: delivery reported without a persisted offset (partition %d, offset %lld, status %d)",
                  (int)m->partition, (long long)m->offset, (int)rd_kafka_message_status(m));
        err = RD_KAFKA_RESP_ERR__FAIL;
    }
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        kp->last_ok_ms = mono_ms();
        set_up(kp, true, NULL);
    }
    kp->dr(m->_private, err, m->partition, m->offset);
}

static void producer_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    (void)rk;
    struct kafka_producer *kp = opaque;
    if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN || err == RD_KAFKA_RESP_ERR__TRANSPORT) {
        if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN) {
            kp->down_ms = mono_ms();
            set_up(kp, false, reason);
        }
        log_warn("kafka producer: %s", reason);
        return;
    }
    log_error("kafka producer error: %s: %s", rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

/* Readiness. librdkafka connects sparsely and its broker states cycle (CONNECT, DOWN, INIT) while a broker is
 * away, so neither states nor statistics say reliably whether the cluster answers. A probe does: while no
 * delivery report has succeeded in the last second, a DescribeConfigs request for a known topic goes out (at
 * most one at a time, 2 s timeout) and its answer, served from its own queue by a 1 s timer, sets `up`. A
 * successful delivery sets `up`; librdkafka's "all brokers down" clears it. */
#define PROBE_INTERVAL_MS 1000
#define PROBE_TIMEOUT_MS 2000

static void probe_start(struct kafka_producer *kp)
{
    rd_kafka_ConfigResource_t *res = rd_kafka_ConfigResource_new(RD_KAFKA_RESOURCE_TOPIC, kp->probe_topic);
    rd_kafka_AdminOptions_t *opt = rd_kafka_AdminOptions_new(kp->rk, RD_KAFKA_ADMIN_OP_DESCRIBECONFIGS);
    rd_kafka_AdminOptions_set_request_timeout(opt, PROBE_TIMEOUT_MS, NULL, 0);
    rd_kafka_DescribeConfigs(kp->rk, &res, 1, opt, kp->probe_q);
    rd_kafka_AdminOptions_destroy(opt);
    rd_kafka_ConfigResource_destroy(res);
    kp->probe_inflight = true;
    kp->probe_started_ms = mono_ms();
}

static void probe_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct kafka_producer *kp = arg;
    if (kp->probe_inflight) {
        rd_kafka_event_t *ev = rd_kafka_queue_poll(kp->probe_q, 0);
        if (!ev)
            return;
        kp->probe_inflight = false;
        rd_kafka_resp_err_t e = rd_kafka_event_error(ev);
        /* A success of a probe sent before the brokers went down says nothing about now. */
        if (e || kp->down_ms < kp->probe_started_ms)
            set_up(kp, e == RD_KAFKA_RESP_ERR_NO_ERROR, e ? rd_kafka_event_error_string(ev) : NULL);
        rd_kafka_event_destroy(ev);
    }
    if (mono_ms() - kp->last_ok_ms >= PROBE_INTERVAL_MS)
        probe_start(kp);
}

static void producer_io_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    struct kafka_producer *kp = arg;
    if (what & EV_READ)
        kqueue_io_drain_pipe(&kp->io);
    int served = 0;
    while (served < MAX_EVENTS_PER_WAKEUP) {
        int n = rd_kafka_poll(kp->rk, 0);
        if (n <= 0)
            break;
        served += n;
    }
    if (served >= MAX_EVENTS_PER_WAKEUP)
        event_active(kp->io.ev_read, EV_READ, 0);
}

struct kafka_producer *kafka_producer_new(struct event_base *base, const struct config *cfg, long linger_ms,
                                          kafka_dr_cb *dr, char *err, size_t errlen)
{
    char tmo[32], linger[32];
    rd_kafka_conf_t *conf = base_conf(cfg, err, errlen);
    if (!conf)
        return NULL;
    snprintf(tmo, sizeof tmo, "%ld", cfg->produce_timeout_ms);
    snprintf(linger, sizeof linger, "%ld", linger_ms);
    if (set_conf(conf, "enable.idempotence", "true", err, errlen) || set_conf(conf, "acks", "all", err, errlen) ||
        set_conf(conf, "partitioner", "murmur2_random", err, errlen) ||
        set_conf(conf, "message.timeout.ms", tmo, err, errlen) || set_conf(conf, "linger.ms", linger, err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    /* -X settings are applied again so that they win over ours. */
    for (int i = 0; i < cfg->kafka_nprops; i++)
        set_conf(conf, cfg->kafka_props[i][0], cfg->kafka_props[i][1], err, errlen);

    struct kafka_producer *kp = xcalloc(1, sizeof *kp);
    kp->dr = dr;
    kp->up = true; /* optimistic until librdkafka says otherwise */
    rd_kafka_conf_set_opaque(conf, kp);
    rd_kafka_conf_set_dr_msg_cb(conf, producer_dr_cb);
    rd_kafka_conf_set_error_cb(conf, producer_error_cb);
    kp->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, errlen);
    if (!kp->rk) {
        rd_kafka_conf_destroy(conf);
        free(kp);
        return NULL;
    }
    kp->mainq = rd_kafka_queue_get_main(kp->rk);
    if (kqueue_io_init(&kp->io, base, kp->mainq, producer_io_cb, kp)) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        rd_kafka_queue_destroy(kp->mainq);
        rd_kafka_destroy(kp->rk);
        free(kp);
        return NULL;
    }
    return kp;
}

rd_kafka_resp_err_t kafka_produce(struct kafka_producer *kp, const char *topic, const char *key, size_t keylen,
                                  const void *value, size_t valuelen, rd_kafka_headers_t *hdrs, void *opaque)
{
    if (hdrs)
        return rd_kafka_producev(kp->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_KEY(key, keylen), RD_KAFKA_V_VALUE((void *)value, valuelen),
                                 RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
    return rd_kafka_producev(kp->rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                             RD_KAFKA_V_KEY(key, keylen), RD_KAFKA_V_VALUE((void *)value, valuelen),
                             RD_KAFKA_V_OPAQUE(opaque), RD_KAFKA_V_END);
}

/* murmur2_random, noting the partition count it was given (topic opaque: the topic's warm_cnt slot). Called on
 * the producing thread, or on librdkafka's for messages produced before the topic's metadata was known. */
static int32_t counting_partitioner(const rd_kafka_topic_t *rkt, const void *key, size_t keylen, int32_t cnt,
                                    void *rkt_opaque, void *msg_opaque)
{
    _Atomic int32_t *seen = rkt_opaque;
    if (atomic_load_explicit(seen, memory_order_relaxed) != cnt)
        atomic_store_explicit(seen, cnt, memory_order_relaxed);
    return rd_kafka_msg_partitioner_murmur2_random(rkt, key, keylen, cnt, NULL, msg_opaque);
}

void kafka_producer_warm(struct kafka_producer *kp, const char *topic)
{
    if (kp->nwarm >= (int)(sizeof kp->warm / sizeof kp->warm[0]))
        return;
    int i = kp->nwarm++;
    atomic_init(&kp->warm_cnt[i], 0);
    /* The same partitioner with a count we can read (kafka_producer_partitions), unless -X chose another. */
    rd_kafka_topic_conf_t *tc = rd_kafka_default_topic_conf_dup(kp->rk);
    char name[64];
    size_t len = sizeof name;
    if (tc && rd_kafka_topic_conf_get(tc, "partitioner", name, &len) == RD_KAFKA_CONF_OK &&
        !strcmp(name, "murmur2_random")) {
        rd_kafka_topic_conf_set_opaque(tc, &kp->warm_cnt[i]);
        rd_kafka_topic_conf_set_partitioner_cb(tc, counting_partitioner);
    }
    /* queries the leaders in the background; tc is librdkafka's now, freed by it even on failure */
    kp->warm[i] = rd_kafka_topic_new(kp->rk, topic, tc);
}

int32_t kafka_producer_partitions(struct kafka_producer *kp, const char *topic)
{
    for (int i = 0; i < kp->nwarm; i++)
        if (kp->warm[i] && !strcmp(rd_kafka_topic_name(kp->warm[i]), topic))
            return atomic_load_explicit(&kp->warm_cnt[i], memory_order_relaxed);
    return 0;
}

int32_t kafka_key_partition(const char *key, size_t keylen, int32_t cnt)
{
    return rd_kafka_msg_partitioner_murmur2_random(NULL, key, keylen, cnt, NULL, NULL);
}

void kafka_producer_watch(struct kafka_producer *kp, struct event_base *base, const char *topic)
{
    if (kp->probe_ev)
        return;
    snprintf(kp->probe_topic, sizeof kp->probe_topic, "%s", topic);
    kp->probe_q = rd_kafka_queue_new(kp->rk);
    kp->probe_ev = event_new(base, -1, EV_PERSIST, probe_cb, kp);
    struct timeval tv = {0, PROBE_INTERVAL_MS * 1000};
    event_add(kp->probe_ev, &tv);
    probe_start(kp);
}

bool kafka_producer_up(const struct kafka_producer *kp)
{
    return kp->up;
}

int kafka_producer_outq(const struct kafka_producer *kp)
{
    return rd_kafka_outq_len(kp->rk);
}

void kafka_producer_free(struct kafka_producer *kp, int timeout_ms)
{
    if (!kp)
        return;
    rd_kafka_flush(kp->rk, timeout_ms); /* serves delivery reports: their callbacks run here */
    if (kp->probe_ev) {
        event_free(kp->probe_ev);
        rd_kafka_event_t *ev;
        while ((ev = rd_kafka_queue_poll(kp->probe_q, kp->probe_inflight ? PROBE_TIMEOUT_MS + 500 : 0))) {
            kp->probe_inflight = false;
            rd_kafka_event_destroy(ev);
        }
        rd_kafka_queue_destroy(kp->probe_q);
    }
    for (int i = 0; i < kp->nwarm; i++)
        if (kp->warm[i])
            rd_kafka_topic_destroy(kp->warm[i]);
    kqueue_io_free(&kp->io, kp->mainq);
    rd_kafka_queue_destroy(kp->mainq);
    rd_kafka_destroy(kp->rk);
    free(kp);
}

/* ---------------------------------------------------------------- consumer */

/* An assigned partition's own queue (hooks.room set): not forwarded to the consumer queue. */
struct part_queue {
    rd_kafka_queue_t *q;
    int32_t partition;
};

struct kafka_consumer {
    rd_kafka_t *rk;
    rd_kafka_queue_t *q;
    struct kqueue_io io;
    struct kafka_consumer_hooks hooks;
    void *ctx;
    struct part_queue *pq; /* hooks.room set: the assigned partitions' queues */
    int npq;
    int next_pq;  /* where the next round of taking messages starts, for fairness between partitions */
    bool blocked; /* room() said 0 while messages may be waiting */
    bool fetching;
    bool closing;        /* inside rd_kafka_consumer_close(): revocations cannot wait */
    bool revoke_pending; /* on_revoke deferred; kafka_consumer_revoke_done() completes it */
};

/* Forgets the partitions' own queues; what they still hold is never delivered (nor committed). */
static void part_queues_clear(struct kafka_consumer *kc)
{
    for (int i = 0; i < kc->npq; i++) {
        rd_kafka_queue_io_event_enable(kc->pq[i].q, -1, NULL, 0);
        rd_kafka_queue_destroy(kc->pq[i].q);
    }
    free(kc->pq);
    kc->pq = NULL;
    kc->npq = 0;
    kc->next_pq = 0;
}

/* Before the assignment takes effect: each partition's messages stay in its own queue (librdkafka forwards a
 * partition's queue to the consumer queue when it starts fetching, unless the application set the forwarding). */
static void part_queues_set(struct kafka_consumer *kc, const rd_kafka_topic_partition_list_t *parts)
{
    part_queues_clear(kc);
    kc->pq = xcalloc((size_t)parts->cnt + 1, sizeof *kc->pq);
    for (int i = 0; i < parts->cnt; i++) {
        rd_kafka_queue_t *q = rd_kafka_queue_get_partition(kc->rk, parts->elems[i].topic, parts->elems[i].partition);
        if (!q) {
            log_error("kafka: no queue for partition %d", (int)parts->elems[i].partition);
            continue;
        }
        rd_kafka_queue_forward(q, NULL);
        rd_kafka_queue_io_event_enable(q, kc->io.fds[1], "1", 1);
        kc->pq[kc->npq].q = q;
        kc->pq[kc->npq].partition = parts->elems[i].partition;
        kc->npq++;
    }
}

static void consumer_rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *parts,
                                  void *opaque)
{
    struct kafka_consumer *kc = opaque;
    /* Eager protocol (see docs/WORKER.md): every rebalance revokes everything, then assigns. */
    if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
        log_info("kafka: assigned %d partition(s)", parts->cnt);
        if (kc->hooks.room)
            part_queues_set(kc, parts);
        rd_kafka_assign(rk, parts);
        if (kc->hooks.on_assign)
            kc->hooks.on_assign(kc->ctx, parts);
    } else {
        log_info("kafka: revoking %d partition(s)", parts->cnt);
        if (kc->hooks.on_revoke && kc->hooks.on_revoke(kc->ctx, parts, !kc->closing)) {
            kc->revoke_pending = true;
            return;
        }
        rd_kafka_assign(rk, NULL);
        part_queues_clear(kc);
    }
}

static void consumer_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *offsets,
                               void *opaque)
{
    (void)rk;
    (void)opaque;
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
        log_warn("kafka: commit of %d partition(s) failed: %s", offsets ? offsets->cnt : 0, rd_kafka_err2str(err));
}

static void consumer_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    (void)rk;
    (void)opaque;
    log_warn("kafka consumer: %s: %s", rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

static bool take_from_partitions(struct kafka_consumer *kc);

static void consumer_io_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    struct kafka_consumer *kc = arg;
    if (what & EV_READ)
        kqueue_io_drain_pipe(&kc->io);
    for (int served = 0; served < MAX_EVENTS_PER_WAKEUP; served++) {
        /* Rebalances and errors are served inside this call even when we do not want messages. */
        rd_kafka_message_t *m = rd_kafka_consumer_poll(kc->rk, 0);
        if (!m) {
            if (kc->hooks.room && take_from_partitions(kc))
                break;
            return;
        }
        if (m->err) {
            if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                log_warn("kafka consume: %s", rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            continue;
        }
        if (!kc->fetching) {
            /* Shutting down: not processed, not committed; the next owner reads it again. */
            rd_kafka_message_destroy(m);
            continue;
        }
        kc->hooks.on_message(kc->ctx, m);
    }
    event_active(kc->io.ev_read, EV_READ, 0);
}

/* hooks.room set: takes messages from the partitions' own queues while there is room, a few from each in
 * turn. Returns true if it stopped at MAX_EVENTS_PER_WAKEUP with room and messages left. */
static bool take_from_partitions(struct kafka_consumer *kc)
{
    long room = kc->fetching ? kc->hooks.room(kc->ctx) : 0;
    kc->blocked = room <= 0;
    int served = 0;
    while (room > 0 && kc->npq > 0) {
        bool any = false;
        for (int k = 0; k < kc->npq && room > 0; k++) {
            struct part_queue *pq = &kc->pq[(kc->next_pq + k) % kc->npq];
            for (int i = 0; i < 64 && room > 0; i++) {
                rd_kafka_message_t *m = rd_kafka_consume_queue(pq->q, 0);
                if (!m)
                    break;
                any = true;
                served++;
                if (m->err) {
                    if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                        log_warn("kafka consume: %s", rd_kafka_message_errstr(m));
                    rd_kafka_message_destroy(m);
                    continue;
                }
                struct part_queue *before = kc->pq;
                kc->hooks.on_message(kc->ctx, m);
                room--;
                if (kc->pq != before)
                    return false; /* the assignment changed under us (should not happen from on_message) */
            }
        }
        kc->next_pq = (kc->next_pq + 1) % (kc->npq ? kc->npq : 1);
        if (!any)
            return false;
        if (served >= MAX_EVENTS_PER_WAKEUP)
            return room > 0;
        if (room <= 0)
            room = kc->hooks.room(kc->ctx); /* jobs may have finished meanwhile */
    }
    kc->blocked = room <= 0 && kc->npq > 0;
    return false;
}

/* The longest a fetch waits for a first message when fetch-wait-ms is 0 (librdkafka's default is 500). After an
 * assignment the first fetch names only the first partition ready (docs/WORKER.md, "Fetching"): a message in
 * another waits for that poll to end. 100 ms bounds that wait; an idle consumer then sends 10 empty fetches a
 * second instead of 2 (measured: at most 1% of a core of the broker's CPU, 0.1-0.25% of the consumer's). */
#define LONG_POLL_MS "100"

struct kafka_consumer *kafka_consumer_new(struct event_base *base, const struct config *cfg, const char *group_id,
                                          const char *topic, const char *offset_reset, long fetch_wait_ms,
                                          const struct kafka_consumer_hooks *hooks, void *ctx, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = base_conf(cfg, err, errlen);
    if (!conf)
        return NULL;
    /* With a queue per partition (hooks.room), librdkafka's prefetch limit applies to each partition, not to
     * the consumer queue they all shared: at most max-buffered messages each. */
    char qmin[32], fwait[32];
    snprintf(qmin, sizeof qmin, "%ld", cfg->max_buffered > 1000 ? cfg->max_buffered : 1000L);
    snprintf(fwait, sizeof fwait, "%ld", fetch_wait_ms);
    if (set_conf(conf, "group.id", group_id, err, errlen) ||
        set_conf(conf, "enable.auto.commit", "false", err, errlen) ||
        set_conf(conf, "enable.auto.offset.store", "false", err, errlen) ||
        set_conf(conf, "auto.offset.reset", offset_reset, err, errlen) ||
        set_conf(conf, "partition.assignment.strategy", "roundrobin", err, errlen) ||
        set_conf(conf, "session.timeout.ms", "10000", err, errlen) ||
        set_conf(conf, "heartbeat.interval.ms", "1000", err, errlen) ||
        (hooks->room && set_conf(conf, "queued.min.messages", qmin, err, errlen)) ||
        (fetch_wait_ms > 0 ? (set_conf(conf, "fetch.wait.max.ms", fwait, err, errlen) ||
                              set_conf(conf, "fetch.min.bytes", "1048576", err, errlen))
                           : set_conf(conf, "fetch.wait.max.ms", LONG_POLL_MS, err, errlen)) ||
        (cfg->instance_id[0] && set_conf(conf, "group.instance.id", cfg->instance_id, err, errlen))) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    for (int i = 0; i < cfg->kafka_nprops; i++)
        set_conf(conf, cfg->kafka_props[i][0], cfg->kafka_props[i][1], err, errlen);

    struct kafka_consumer *kc = xcalloc(1, sizeof *kc);
    kc->hooks = *hooks;
    kc->ctx = ctx;
    kc->fetching = true;
    rd_kafka_conf_set_opaque(conf, kc);
    rd_kafka_conf_set_rebalance_cb(conf, consumer_rebalance_cb);
    rd_kafka_conf_set_offset_commit_cb(conf, consumer_commit_cb);
    rd_kafka_conf_set_error_cb(conf, consumer_error_cb);
    kc->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, errlen);
    if (!kc->rk) {
        rd_kafka_conf_destroy(conf);
        free(kc);
        return NULL;
    }
    rd_kafka_poll_set_consumer(kc->rk);
    kc->q = rd_kafka_queue_get_consumer(kc->rk);
    rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(sub, topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(kc->rk, sub);
    rd_kafka_topic_partition_list_destroy(sub);
    if (e || kqueue_io_init(&kc->io, base, kc->q, consumer_io_cb, kc)) {
        snprintf(err, errlen, "subscribe %s: %s", topic, e ? rd_kafka_err2str(e) : strerror(errno));
        rd_kafka_queue_destroy(kc->q);
        rd_kafka_destroy(kc->rk);
        free(kc);
        return NULL;
    }
    return kc;
}

int kafka_consumer_commit(struct kafka_consumer *kc, const rd_kafka_topic_partition_list_t *offsets, bool async)
{
    rd_kafka_resp_err_t e = rd_kafka_commit(kc->rk, offsets, async ? 1 : 0);
    if (e && e != RD_KAFKA_RESP_ERR__NO_OFFSET) {
        log_warn("kafka: commit failed: %s", rd_kafka_err2str(e));
        return -1;
    }
    return 0;
}

void kafka_consumer_kick(struct kafka_consumer *kc)
{
    if (kc->blocked) {
        kc->blocked = false;
        event_active(kc->io.ev_read, EV_READ, 0);
    }
}

void kafka_consumer_pause(struct kafka_consumer *kc, const rd_kafka_topic_partition_list_t *parts, bool pause)
{
    rd_kafka_topic_partition_list_t *copy = rd_kafka_topic_partition_list_copy(parts);
    rd_kafka_resp_err_t e = pause ? rd_kafka_pause_partitions(kc->rk, copy) : rd_kafka_resume_partitions(kc->rk, copy);
    if (e)
        log_warn("kafka: %s failed: %s", pause ? "pause" : "resume", rd_kafka_err2str(e));
    rd_kafka_topic_partition_list_destroy(copy);
}

int64_t kafka_consumer_high_watermark(struct kafka_consumer *kc, const char *topic, int32_t partition)
{
    int64_t lo = -1, hi = -1;
    if (rd_kafka_get_watermark_offsets(kc->rk, topic, partition, &lo, &hi))
        return -1;
    return hi;
}

int64_t kafka_consumer_position(struct kafka_consumer *kc, const char *topic, int32_t partition)
{
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, partition);
    int64_t off = -1;
    if (rd_kafka_position(kc->rk, l) == RD_KAFKA_RESP_ERR_NO_ERROR && l->elems[0].offset >= 0)
        off = l->elems[0].offset;
    rd_kafka_topic_partition_list_destroy(l);
    return off;
}

void kafka_consumer_revoke_done(struct kafka_consumer *kc)
{
    if (!kc->revoke_pending)
        return;
    kc->revoke_pending = false;
    rd_kafka_assign(kc->rk, NULL);
    part_queues_clear(kc);
    log_info("kafka: revocation complete");
}

void kafka_consumer_stop_fetching(struct kafka_consumer *kc)
{
    kc->fetching = false;
}

void kafka_consumer_free(struct kafka_consumer *kc)
{
    if (!kc)
        return;
    kc->fetching = false;
    kc->closing = true;
    rd_kafka_consumer_close(kc->rk); /* serves the final revoke through the rebalance callback */
    part_queues_clear(kc);
    kqueue_io_free(&kc->io, kc->q);
    rd_kafka_queue_destroy(kc->q);
    rd_kafka_destroy(kc->rk);
    free(kc);
}

/* ---------------------------------------------------------------- admin */

int kafka_ensure_topics(const struct config *cfg, int timeout_ms, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = base_conf(cfg, err, errlen);
    if (!conf)
        return -1;
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, errlen);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        return -1;
    }
    const char *names[] = {cfg->topic_prompts,        cfg->topic_responses,  cfg->topic_dlq,
                           cfg->topic_webhook_dlq,    cfg->topic_moderation, cfg->topic_postprocessed,
                           cfg->topic_postprocess_dlq};
    const size_t n = sizeof names / sizeof names[0];
    rd_kafka_NewTopic_t *topics[sizeof names / sizeof names[0]];
    for (size_t i = 0; i < n; i++)
        topics[i] = rd_kafka_NewTopic_new(names[i], (int)cfg->partitions, (int)cfg->replication, NULL, 0);

    int rc = -1;
    int64_t deadline = mono_ms() + timeout_ms;
    snprintf(err, errlen, "timed out");
    while (mono_ms() < deadline) {
        rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
        rd_kafka_AdminOptions_t *opt = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
        int left = (int)(deadline - mono_ms());
        rd_kafka_AdminOptions_set_request_timeout(opt, left > 0 ? left : 1, NULL, 0);
        rd_kafka_CreateTopics(rk, topics, n, opt, q);
        rd_kafka_event_t *ev = rd_kafka_queue_poll(q, left > 0 ? left : 1);
        bool retry = false;
        if (!ev) {
            snprintf(err, errlen, "no answer from %s", cfg->kafka_brokers);
        } else if (rd_kafka_event_error(ev)) {
            snprintf(err, errlen, "%s", rd_kafka_event_error_string(ev));
            retry = true;
        } else {
            size_t cnt;
            const rd_kafka_topic_result_t **res =
                rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &cnt);
            rc = 0;
            for (size_t i = 0; i < cnt; i++) {
                rd_kafka_resp_err_t e = rd_kafka_topic_result_error(res[i]);
                if (e == RD_KAFKA_RESP_ERR_NO_ERROR)
                    log_info("kafka: created topic %s (%ld partitions)", rd_kafka_topic_result_name(res[i]),
                             cfg->partitions);
                else if (e != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) {
                    snprintf(err, errlen, "topic %s: %s", rd_kafka_topic_result_name(res[i]),
                             rd_kafka_topic_result_error_string(res[i]));
                    rc = -1;
                    retry = true;
                }
            }
        }
        if (ev)
            rd_kafka_event_destroy(ev);
        rd_kafka_AdminOptions_destroy(opt);
        rd_kafka_queue_destroy(q);
        if (rc == 0 || !retry)
            break;
        usleep(500 * 1000);
    }
    for (size_t i = 0; i < n; i++)
        rd_kafka_NewTopic_destroy(topics[i]);
    rd_kafka_destroy(rk);
    return rc;
}
