/* kafka.h - librdkafka clients attached to a libevent loop.
 *
 * librdkafka runs its own threads for the network; it hands results to the application through queues. Each
 * client here redirects its queue to a pipe with rd_kafka_queue_io_event_enable(), so the event loop wakes when
 * a delivery report, a message or a rebalance is waiting, and serves them on the loop's thread. librdkafka
 * writes to the pipe only when a queue goes from empty to non-empty, so each wakeup drains the queue, and a
 * 100 ms timer polls as well (a consumer that never polls leaves its group after max.poll.interval.ms).
 *
 * Producers are idempotent (acks=all, ordered retries) and use the murmur2_random partitioner, as Java clients
 * do, so every producer of a topic puts a conversation in the same partition. */
#ifndef ASYNCLLM_KAFKA_H
#define ASYNCLLM_KAFKA_H

#include <librdkafka/rdkafka.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct config;

/* ---- producer ---- */

struct kafka_producer;

/* Called on the loop's thread once per produced message: err is RD_KAFKA_RESP_ERR_NO_ERROR when the broker
 * acknowledged it (acks=all). opaque is the pointer given to kafka_produce(). */
typedef void kafka_dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset);

/* Creates a producer whose delivery reports are served on base. It waits up to linger_ms (linger.ms) to batch
 * messages into one produce request per partition: fewer, larger requests cost the broker much less (it pays
 * per request), each message's ack comes up to linger_ms later. Returns NULL with a message in err. */
struct kafka_producer *kafka_producer_new(struct event_base *base, const struct config *cfg, long linger_ms,
                                          kafka_dr_cb *dr, char *err, size_t errlen);
/* Enqueues a copy of key and value (and takes ownership of hdrs on success, which may be NULL). Returns
 * RD_KAFKA_RESP_ERR_NO_ERROR, or an error now (QUEUE_FULL, UNKNOWN_TOPIC...), in which case dr is not called. */
rd_kafka_resp_err_t kafka_produce(struct kafka_producer *kp, const char *topic, const char *key, size_t keylen,
                                  const void *value, size_t valuelen, rd_kafka_headers_t *hdrs, void *opaque);
/* Looks up topic's metadata now rather than at the first produce (which would otherwise wait for it). */
void kafka_producer_warm(struct kafka_producer *kp, const char *topic);
/* A warmed topic's partition count as the producer last used it, or 0 before its first message (or when -X
 * set a partitioner other than murmur2_random). Any thread. */
int32_t kafka_producer_partitions(struct kafka_producer *kp, const char *topic);
/* The partition the producer puts a message with this key in when the topic has cnt > 0 partitions. */
int32_t kafka_key_partition(const char *key, size_t keylen, int32_t cnt);
/* Probes the cluster every second (a DescribeConfigs of topic) while no delivery succeeded lately, so that
 * kafka_producer_up() is accurate even when nothing is produced. */
void kafka_producer_watch(struct kafka_producer *kp, struct event_base *base, const char *topic);
/* False while the cluster is not answering (probe failed, all brokers down); true after a successful delivery
 * or probe. Optimistic until the first probe answers. */
bool kafka_producer_up(const struct kafka_producer *kp);
/* Number of messages waiting for a delivery report. */
int kafka_producer_outq(const struct kafka_producer *kp);
/* Waits up to timeout_ms for outstanding messages (blocking; only at shutdown), then destroys the producer. */
void kafka_producer_free(struct kafka_producer *kp, int timeout_ms);

/* ---- consumer ---- */

struct kafka_consumer;

struct kafka_consumer_hooks {
    /* A message; the callee owns it and must rd_kafka_message_destroy() it. */
    void (*on_message)(void *ctx, rd_kafka_message_t *msg);
    /* Partitions assigned (after the assignment took effect). The list is only valid during the call. */
    void (*on_assign)(void *ctx, const rd_kafka_topic_partition_list_t *parts);
    /* Partitions about to be revoked. The list is only valid during the call. With may_defer, the callee may
     * return true to keep the partitions a while (to let work finish) and call kafka_consumer_revoke_done()
     * later; the group's rebalance waits for it (up to max.poll.interval.ms). Otherwise it returns false and
     * the revocation takes effect when it returns. */
    bool (*on_revoke)(void *ctx, const rd_kafka_topic_partition_list_t *parts, bool may_defer);
    /* Optional: how many more messages the callee takes now. With it, each assigned partition has its own
     * queue in librdkafka (not forwarded to the consumer queue) and messages stay there while room() is 0:
     * backpressure without pausing, so librdkafka keeps its prefetch (it drops it for a paused partition) and
     * rebalances, errors and commit results are still served. Call kafka_consumer_kick() when room comes
     * back. */
    long (*room)(void *ctx);
};

/* Creates a consumer in group_id subscribed to topic, served on base. A new group starts at offset_reset
 * ("earliest" or "latest"). Offsets are never committed automatically: the caller commits with
 * kafka_consumer_commit(). fetch_wait_ms > 0: the broker answers a fetch every fetch_wait_ms (or once 1 MiB is
 * waiting), so a busy topic is read in a few large fetches instead of one small fetch per round trip (each costs
 * the broker about as much as a produce request), and a message waits up to fetch_wait_ms more; an idle
 * consumer then fetches 1000/fetch_wait_ms times a second. 0: librdkafka's default, an answer as soon as any
 * message is there (a long poll of up to 500 ms when there is none). */
struct kafka_consumer *kafka_consumer_new(struct event_base *base, const struct config *cfg, const char *group_id,
                                          const char *topic, const char *offset_reset, long fetch_wait_ms,
                                          const struct kafka_consumer_hooks *hooks, void *ctx, char *err,
                                          size_t errlen);
/* Commits offsets (each the next offset to read). async=false blocks until the broker answers. */
int kafka_consumer_commit(struct kafka_consumer *kc, const rd_kafka_topic_partition_list_t *offsets, bool async);
/* There may be room again (see hooks.room): messages waiting in the partition queues are delivered soon, from the
 * loop. Cheap; call it whenever room may have grown. */
void kafka_consumer_kick(struct kafka_consumer *kc);
/* Stops or restarts fetching from the listed partitions. */
void kafka_consumer_pause(struct kafka_consumer *kc, const rd_kafka_topic_partition_list_t *parts, bool pause);
/* The partition's high watermark as last seen by the consumer (cached, non-blocking), or -1. */
int64_t kafka_consumer_high_watermark(struct kafka_consumer *kc, const char *topic, int32_t partition);
/* The next offset the consumer will fetch for the partition (non-blocking), or -1 if not known yet. */
int64_t kafka_consumer_position(struct kafka_consumer *kc, const char *topic, int32_t partition);
/* Completes a revocation that on_revoke deferred. */
void kafka_consumer_revoke_done(struct kafka_consumer *kc);
/* Stops delivering messages (no more on_message calls), so that a shutdown can drain. */
void kafka_consumer_stop_fetching(struct kafka_consumer *kc);
/* Leaves the group (revoking, so on_revoke runs) and destroys the consumer. Blocking; only at shutdown. */
void kafka_consumer_free(struct kafka_consumer *kc);

/* ---- admin ---- */

/* Creates the prompt, response and dead-letter topics if missing (blocking, up to timeout_ms). Returns 0 when
 * all exist, -1 with a message in err otherwise. */
int kafka_ensure_topics(const struct config *cfg, int timeout_ms, char *err, size_t errlen);

#endif
