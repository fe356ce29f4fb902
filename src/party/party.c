/* party.c - see party.h. The structure mirrors the worker (src/worker/worker.c): read that file's opening
 * comment for the reasoning behind rings, key queues, commits and revocation. */
#include "party/party.h"

#include "core/config.h"
#include "core/log.h"
#include "core/map.h"
#include "core/util.h"
#include "kafka/kafka.h"

#include <event2/event.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

enum item_state { I_WAITING, I_RUNNING, I_DONE };

struct item {
    struct party_msg m; /* first: party_msg pointers are item pointers */
    struct party *p;
    struct part *part;     /* NULL once abandoned */
    struct keyq *kq;       /* ordered parties: the item's key queue */
    struct item *key_next; /* next of the same key */
    struct item *wnext;    /* on p->waiting, when waiting for room */
    enum item_state state;
    bool abandoned;
};

struct keyq {
    char key[96];
    struct item *head, *tail;
};

struct part {
    int32_t partition;
    struct item **ring;
    size_t head, count, cap;
    int64_t next_offset, committed;
};

struct party {
    struct event_base *base;
    const struct config *cfg;
    struct party_opts o;
    char topic[256], group[256];
    struct party_hooks hooks;
    void *ctx;
    struct kafka_consumer *kc;
    struct map *keys;
    struct part **parts;
    int nparts;
    rd_kafka_topic_partition_list_t *assignment;
    struct item *wait_head, *wait_tail; /* ready to run, waiting for room */
    long running, buffered;
    bool paused, draining;
    bool starting; /* inside start_waiting() */
    struct event *commit_timer, *grace_timer;
    void (*on_drained)(void *);
    void *drained_arg;
    unsigned long consumed, done;
};

static void item_free(struct item *it)
{
    free(it->m.key);
    free(it->m.value);
    free(it);
}

static struct part *part_get(struct party *p, int32_t n)
{
    return n >= 0 && n < p->nparts ? p->parts[n] : NULL;
}

static int64_t committable(const struct part *part)
{
    return part->count ? part->ring[part->head]->m.offset : part->next_offset;
}

static void commit(struct party *p, const rd_kafka_topic_partition_list_t *only, bool async)
{
    rd_kafka_topic_partition_list_t *offs = rd_kafka_topic_partition_list_new(8);
    for (int n = 0; n < p->nparts; n++) {
        struct part *part = p->parts[n];
        if (!part || (only && !rd_kafka_topic_partition_list_find(only, p->topic, n)))
            continue;
        int64_t off = committable(part);
        if (off < 0 || (async && off <= part->committed))
            continue;
        rd_kafka_topic_partition_list_add(offs, p->topic, n)->offset = off;
        part->committed = off;
    }
    if (offs->cnt)
        kafka_consumer_commit(p->kc, offs, async);
    rd_kafka_topic_partition_list_destroy(offs);
}

static void commit_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    commit(arg, NULL, true);
}

static void backpressure(struct party *p)
{
    if (!p->assignment || p->draining)
        return;
    long limit = p->o.max_in_flight * 4;
    if (!p->paused && p->buffered >= limit) {
        kafka_consumer_pause(p->kc, p->assignment, true);
        p->paused = true;
    } else if (p->paused && p->buffered <= limit * 3 / 4) {
        kafka_consumer_pause(p->kc, p->assignment, false);
        p->paused = false;
    }
}

static void run(struct item *it)
{
    struct party *p = it->p;
    it->state = I_RUNNING;
    p->running++;
    p->hooks.process(p->ctx, p, &it->m);
}

/* Runs it now if there is room, else queues it. */
static void start(struct item *it)
{
    struct party *p = it->p;
    if (p->draining)
        return;
    if (p->running < p->o.max_in_flight && !p->wait_head) {
        run(it);
        return;
    }
    it->wnext = NULL;
    if (p->wait_tail)
        p->wait_tail->wnext = it;
    else
        p->wait_head = it;
    p->wait_tail = it;
}

/* Guarded like the worker's slot_release(): a message finished at once starts the next from inside this loop. */
static void start_waiting(struct party *p)
{
    if (p->starting)
        return;
    p->starting = true;
    while (p->wait_head && p->running < p->o.max_in_flight && !p->draining) {
        struct item *it = p->wait_head;
        p->wait_head = it->wnext;
        if (!p->wait_head)
            p->wait_tail = NULL;
        run(it);
    }
    p->starting = false;
}

static void check_drained(struct party *p)
{
    if (p->draining && p->on_drained && p->running == 0) {
        void (*cb)(void *) = p->on_drained;
        p->on_drained = NULL;
        cb(p->drained_arg);
    }
}

void party_done(struct party *p, struct party_msg *m)
{
    struct item *it = (struct item *)m;
    if (it->abandoned) {
        item_free(it);
        return;
    }
    it->state = I_DONE;
    p->running--;
    p->done++;
    free(it->m.value); /* keep only the small struct until the offsets before it are done */
    it->m.value = NULL;
    if (it->kq) {
        struct keyq *kq = it->kq;
        kq->head = it->key_next;
        it->kq = NULL;
        if (kq->head)
            start(kq->head);
        else {
            map_del(p->keys, kq->key);
            free(kq);
        }
    }
    struct part *part = it->part;
    while (part->count && part->ring[part->head]->state == I_DONE) {
        item_free(part->ring[part->head]);
        part->head = (part->head + 1) % part->cap;
        part->count--;
        p->buffered--;
    }
    start_waiting(p);
    backpressure(p);
    check_drained(p);
}

static void on_message(void *ctx, rd_kafka_message_t *km)
{
    struct party *p = ctx;
    struct part *part = part_get(p, km->partition);
    if (!part) {
        rd_kafka_message_destroy(km);
        return;
    }
    struct item *it = xcalloc(1, sizeof *it);
    it->p = p;
    it->part = part;
    it->m.partition = km->partition;
    it->m.offset = km->offset;
    it->m.timestamp_ms = rd_kafka_message_timestamp(km, NULL);
    it->m.key = xstrndup(km->key ? km->key : "", km->key_len);
    it->m.key_len = km->key_len;
    it->m.value = xstrndup(km->payload ? km->payload : "", km->len);
    it->m.len = km->len;
    rd_kafka_message_destroy(km);
    p->consumed++;
    part->next_offset = it->m.offset + 1;
    if (part->count == part->cap) {
        size_t cap = part->cap ? part->cap * 2 : 64;
        struct item **ring = xcalloc(cap, sizeof *ring);
        for (size_t i = 0; i < part->count; i++)
            ring[i] = part->ring[(part->head + i) % part->cap];
        free(part->ring);
        part->ring = ring;
        part->cap = cap;
        part->head = 0;
    }
    part->ring[(part->head + part->count) % part->cap] = it;
    part->count++;
    p->buffered++;
    if (p->o.ordered) {
        char key[96];
        snprintf(key, sizeof key, "%" PRId32 "/%.80s", it->m.partition, it->m.key);
        struct keyq *kq = map_get(p->keys, key);
        if (!kq) {
            kq = xcalloc(1, sizeof *kq);
            snprintf(kq->key, sizeof kq->key, "%s", key);
            map_put(p->keys, kq->key, kq);
        }
        it->kq = kq;
        if (kq->head) {
            kq->tail->key_next = it;
            kq->tail = it;
            backpressure(p);
            return;
        }
        kq->head = kq->tail = it;
    }
    start(it);
    backpressure(p);
}

static void on_assign(void *ctx, const rd_kafka_topic_partition_list_t *parts)
{
    struct party *p = ctx;
    kafka_consumer_pause(p->kc, parts, false); /* librdkafka keeps pauses across rebalances */
    for (int i = 0; i < parts->cnt; i++) {
        int32_t n = parts->elems[i].partition;
        if (n >= p->nparts) {
            p->parts = xrealloc(p->parts, (size_t)(n + 1) * sizeof *p->parts);
            memset(p->parts + p->nparts, 0, (size_t)(n + 1 - p->nparts) * sizeof *p->parts);
            p->nparts = n + 1;
        }
        if (!p->parts[n]) {
            p->parts[n] = xcalloc(1, sizeof *p->parts[n]);
            p->parts[n]->partition = n;
            p->parts[n]->next_offset = p->parts[n]->committed = -1;
        }
    }
    if (p->assignment)
        rd_kafka_topic_partition_list_destroy(p->assignment);
    p->assignment = rd_kafka_topic_partition_list_copy(parts);
    p->paused = false;
}

/* Gives up a revoked partition's messages: finished ones are committed, the rest is redone by the next owner. */
static bool on_revoke(void *ctx, const rd_kafka_topic_partition_list_t *parts, bool may_defer)
{
    (void)may_defer;
    struct party *p = ctx;
    commit(p, parts, false);
    for (int i = 0; i < parts->cnt; i++) {
        int32_t n = parts->elems[i].partition;
        struct part *part = part_get(p, n);
        if (!part)
            continue;
        /* Out of the waiting queue first, so that nothing of this partition starts. */
        struct item **pp = &p->wait_head;
        p->wait_tail = NULL;
        while (*pp) {
            if ((*pp)->part == part)
                *pp = (*pp)->wnext;
            else {
                p->wait_tail = *pp;
                pp = &(*pp)->wnext;
            }
        }
        while (part->count) {
            struct item *it = part->ring[part->head];
            part->head = (part->head + 1) % part->cap;
            part->count--;
            p->buffered--;
            if (it->kq) {
                struct keyq *kq = map_del(p->keys, it->kq->key);
                for (struct item *j = kq ? kq->head : NULL; j; j = j->key_next)
                    j->kq = NULL;
                free(kq);
            }
            it->part = NULL;
            if (it->state == I_RUNNING) {
                it->abandoned = true;
                p->running--;
                p->hooks.abandon(p->ctx, p, &it->m); /* party_done() frees it, now or later */
            } else {
                item_free(it);
            }
        }
        free(part->ring);
        free(part);
        p->parts[n] = NULL;
    }
    if (p->assignment)
        rd_kafka_topic_partition_list_destroy(p->assignment);
    p->assignment = NULL;
    p->paused = false;
    check_drained(p);
    return false;
}

struct party *party_new(struct event_base *base, const struct config *cfg, const struct party_opts *o,
                        const struct party_hooks *hooks, void *ctx, char *err, size_t errlen)
{
    struct party *p = xcalloc(1, sizeof *p);
    p->base = base;
    p->cfg = cfg;
    p->o = *o;
    snprintf(p->topic, sizeof p->topic, "%s", o->topic);
    snprintf(p->group, sizeof p->group, "%s", o->group_id);
    p->o.topic = p->topic;
    p->o.group_id = p->group;
    if (p->o.max_in_flight < 1)
        p->o.max_in_flight = 1;
    p->hooks = *hooks;
    p->ctx = ctx;
    p->keys = map_new();
    static const struct kafka_consumer_hooks kh = {on_message, on_assign, on_revoke, NULL};
    p->kc = kafka_consumer_new(base, cfg, p->group, p->topic, o->from_latest ? "latest" : "earliest", 0, &kh, p, err,
                               errlen);
    if (!p->kc) {
        map_free(p->keys);
        free(p);
        return NULL;
    }
    p->commit_timer = event_new(base, -1, EV_PERSIST, commit_timer_cb, p);
    struct timeval tv = {cfg->commit_interval_ms / 1000, (cfg->commit_interval_ms % 1000) * 1000};
    evtimer_add(p->commit_timer, &tv);
    return p;
}

static void grace_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct party *p = arg;
    if (p->on_drained) {
        log_warn("shutdown grace period over with %ld message(s) unfinished; they will be redelivered", p->running);
        void (*cb)(void *) = p->on_drained;
        p->on_drained = NULL;
        cb(p->drained_arg);
    }
}

void party_drain(struct party *p, void (*on_drained)(void *arg), void *arg)
{
    p->draining = true;
    p->on_drained = on_drained;
    p->drained_arg = arg;
    kafka_consumer_stop_fetching(p->kc);
    if (p->assignment && !p->paused)
        kafka_consumer_pause(p->kc, p->assignment, true);
    p->paused = true;
    p->wait_head = p->wait_tail = NULL; /* not started: redelivered to the next owner */
    p->grace_timer = evtimer_new(p->base, grace_cb, p);
    struct timeval tv = {p->cfg->shutdown_grace_ms / 1000, (p->cfg->shutdown_grace_ms % 1000) * 1000};
    evtimer_add(p->grace_timer, &tv);
    check_drained(p);
}

void party_free(struct party *p)
{
    if (!p)
        return;
    commit(p, NULL, false);
    kafka_consumer_free(p->kc); /* revokes: running messages are abandoned */
    for (int n = 0; n < p->nparts; n++)
        if (p->parts[n]) {
            free(p->parts[n]->ring);
            free(p->parts[n]);
        }
    free(p->parts);
    map_free(p->keys);
    if (p->assignment)
        rd_kafka_topic_partition_list_destroy(p->assignment);
    event_free(p->commit_timer);
    if (p->grace_timer)
        event_free(p->grace_timer);
    free(p);
}

void party_stats(const struct party *p, struct party_stats *s)
{
    s->in_flight = p->running;
    s->buffered = p->buffered;
    s->consumed = p->consumed;
    s->done = p->done;
}
