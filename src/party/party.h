/* party.h - a reusable engine for the consumers of a topic ("interested parties": webhooks, moderation,
 * post-processing): consume in a group, process many messages at once, optionally one at a time per key, and
 * commit a partition's offset only up to its first unfinished message (at least once).
 *
 * It is the worker's engine (docs/WORKER.md) without the LLM-specific steps: per-partition rings of messages
 * in offset order, optional per-key queues, backpressure by pausing partitions at max_in_flight + max_waiting,
 * periodic asynchronous commits, a synchronous commit on revoke and at shutdown, and a graceful drain. */
#ifndef ASYNCLLM_PARTY_H
#define ASYNCLLM_PARTY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct config;
struct party;

/* One consumed message. The party owns it; the process hook owns the right to finish it with party_done(). */
struct party_msg {
    int32_t partition;
    int64_t offset;
    int64_t timestamp_ms; /* the broker's (or producer's) timestamp */
    char *key;            /* NUL-terminated copies */
    size_t key_len;
    char *value;
    size_t len;
    void *user; /* free for the hooks */
};

struct party_hooks {
    /* Starts processing m; call party_done(p, m) when its side effects are done (now or later). */
    void (*process)(void *ctx, struct party *p, struct party_msg *m);
    /* m's partition was revoked, or the party is shutting down, while m was being processed: stop what can
     * be stopped. party_done() must still be called for m, now or when its last callback arrives. */
    void (*abandon)(void *ctx, struct party *p, struct party_msg *m);
};

struct party_opts {
    const char *group_id;
    const char *topic;
    long max_in_flight; /* messages processed at once */
    bool ordered;       /* one at a time per key (per partition) */
    bool from_latest;   /* a new group starts at the end of the topic, not its beginning */
};

struct party *party_new(struct event_base *base, const struct config *cfg, const struct party_opts *o,
                        const struct party_hooks *hooks, void *ctx, char *err, size_t errlen);
/* m is finished (its side effects are done): it may be committed once every message before it is. */
void party_done(struct party *p, struct party_msg *m);
/* Stops fetching; on_drained runs once nothing is processed any more, or after shutdown-grace-ms. */
void party_drain(struct party *p, void (*on_drained)(void *arg), void *arg);
/* Commits, leaves the group, frees (messages still processing are abandoned first). */
void party_free(struct party *p);
/* Counters for /metrics. */
struct party_stats {
    long in_flight, buffered;
    unsigned long consumed, done;
};
void party_stats(const struct party *p, struct party_stats *s);

#endif
