/* kbench.c - Kafka helper for asyncllm's benchmarks (bench/run.sh), on librdkafka.
 *
 *   kbench create  -b BROKERS -t T1,T2,... [-p PARTITIONS]
 *       creates the topics with message.timestamp.type=LogAppendTime, so that a message's timestamp is the
 *       broker's append time (with acks=all on one broker: when it acknowledged the message)
 *   kbench produce -b BROKERS -t TOPIC -n COUNT [-r RATE] [--id-prefix P] [--prompt TEXT]
 *       produces COUNT prompts {"conversation_id","prompt","turn":1}, keyed by conversation id (murmur2, as
 *       asyncllm and Java clients), acks=all; as fast as possible, or on a timetable at RATE per second.
 *       Prints {"produced","failed","seconds"} as JSON.
 *   kbench stamps  -b BROKERS -t TOPIC
 *       reads the topic from the beginning to its current end and prints "key<TAB>timestamp_ms" per message
 */
#include <getopt.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *brokers = "127.0.0.1:9092";
static const char *topics;
static int partitions = 6;
static long count;
static double rate;
static const char *id_prefix = "b";
static const char *prompt_text = "hi";
static long delivered, failed;

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "kbench: %s: %s\n", what, why);
    exit(1);
}

static rd_kafka_conf_t *conf_new(void)
{
    char err[512];
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    if (rd_kafka_conf_set(c, "bootstrap.servers", brokers, err, sizeof err) != RD_KAFKA_CONF_OK)
        die("config", err);
    return c;
}

static void set(rd_kafka_conf_t *c, const char *k, const char *v)
{
    char err[512];
    if (rd_kafka_conf_set(c, k, v, err, sizeof err) != RD_KAFKA_CONF_OK)
        die(k, err);
}

/* ---------------------------------------------------------------- create */

static int cmd_create(void)
{
    char err[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf_new(), err, sizeof err);
    if (!rk)
        die("rd_kafka_new", err);
    char *list = strdup(topics);
    rd_kafka_NewTopic_t *nt[16];
    size_t n = 0;
    char *save = NULL;
    for (char *t = strtok_r(list, ",", &save); t && n < 16; t = strtok_r(NULL, ",", &save)) {
        nt[n] = rd_kafka_NewTopic_new(t, partitions, 1, err, sizeof err);
        if (!nt[n])
            die(t, err);
        rd_kafka_NewTopic_set_config(nt[n], "message.timestamp.type", "LogAppendTime");
        n++;
    }
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_AdminOptions_t *o = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_AdminOptions_set_operation_timeout(o, 30000, err, sizeof err);
    rd_kafka_CreateTopics(rk, nt, n, o, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 60000);
    int rc = 0;
    if (!ev || rd_kafka_event_error(ev)) {
        fprintf(stderr, "kbench: create: %s\n", ev ? rd_kafka_event_error_string(ev) : "timed out");
        rc = 1;
    } else {
        size_t cnt;
        const rd_kafka_topic_result_t **res =
            rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &cnt);
        for (size_t i = 0; i < cnt; i++) {
            rd_kafka_resp_err_t e = rd_kafka_topic_result_error(res[i]);
            if (e && e != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) {
                fprintf(stderr, "kbench: create %s: %s\n", rd_kafka_topic_result_name(res[i]),
                        rd_kafka_topic_result_error_string(res[i]));
                rc = 1;
            }
        }
    }
    if (ev)
        rd_kafka_event_destroy(ev);
    rd_kafka_AdminOptions_destroy(o);
    rd_kafka_queue_destroy(q);
    for (size_t i = 0; i < n; i++)
        rd_kafka_NewTopic_destroy(nt[i]);
    rd_kafka_destroy(rk);
    free(list);
    return rc;
}

/* ---------------------------------------------------------------- produce */

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    (void)opaque;
    if (m->err) {
        if (failed++ < 5)
            fprintf(stderr, "kbench: delivery failed: %s\n", rd_kafka_err2str(m->err));
    } else {
        delivered++;
    }
}

static int cmd_produce(void)
{
    char err[512];
    rd_kafka_conf_t *c = conf_new();
    set(c, "acks", "all");
    set(c, "enable.idempotence", "true");
    set(c, "partitioner", "murmur2_random");
    set(c, "linger.ms", rate > 0 ? "1" : "20");
    set(c, "batch.num.messages", "10000");
    set(c, "queue.buffering.max.messages", "1000000");
    set(c, "compression.type", "none");
    rd_kafka_conf_set_dr_msg_cb(c, dr_cb);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, c, err, sizeof err);
    if (!rk)
        die("rd_kafka_new", err);
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topics, NULL);
    int64_t t0 = mono_ns();
    int64_t interval = rate > 0 ? (int64_t)(1e9 / rate) : 0;
    char key[96], val[4096];
    for (long i = 0; i < count; i++) {
        if (interval) {
            int64_t due = t0 + i * interval;
            for (;;) {
                int64_t now = mono_ns();
                if (now >= due)
                    break;
                int64_t wait_ms = (due - now) / 1000000;
                rd_kafka_poll(rk, wait_ms > 0 ? (int)wait_ms : 0);
                if (wait_ms == 0) {
                    struct timespec ts = {0, (long)(due - mono_ns() > 0 ? due - mono_ns() : 0)};
                    nanosleep(&ts, NULL);
                }
            }
        }
        int kl = snprintf(key, sizeof key, "%s%09ld", id_prefix, i);
        int vl =
            snprintf(val, sizeof val, "{\"conversation_id\":\"%s\",\"prompt\":\"%s\",\"turn\":1}", key, prompt_text);
        for (;;) {
            if (rd_kafka_produce(rkt, RD_KAFKA_PARTITION_UA, RD_KAFKA_MSG_F_COPY, val, (size_t)vl, key, (size_t)kl,
                                 NULL) == 0)
                break;
            if (rd_kafka_last_error() != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                die("produce", rd_kafka_err2str(rd_kafka_last_error()));
            rd_kafka_poll(rk, 10);
        }
        rd_kafka_poll(rk, 0);
    }
    rd_kafka_flush(rk, 60000);
    double secs = (double)(mono_ns() - t0) / 1e9;
    printf("{\"produced\":%ld,\"failed\":%ld,\"seconds\":%.3f,\"rate\":%.1f}\n", delivered, failed, secs,
           secs > 0 ? (double)delivered / secs : 0);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    return failed || delivered != count;
}

/* ---------------------------------------------------------------- stamps */

static int cmd_stamps(void)
{
    char err[512];
    rd_kafka_conf_t *c = conf_new();
    set(c, "group.id", "kbench-stamps");
    set(c, "enable.auto.commit", "false");
    set(c, "enable.partition.eof", "true");
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, c, err, sizeof err);
    if (!rk)
        die("rd_kafka_new", err);
    const struct rd_kafka_metadata *md;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topics, NULL);
    if (rd_kafka_metadata(rk, 0, rkt, &md, 10000) != RD_KAFKA_RESP_ERR_NO_ERROR || md->topic_cnt != 1 ||
        md->topics[0].err)
        die(topics, "no metadata");
    int np = md->topics[0].partition_cnt;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(np);
    int64_t *hi = calloc((size_t)np, sizeof *hi);
    int left = 0;
    for (int p = 0; p < np; p++) {
        int64_t lo;
        if (rd_kafka_query_watermark_offsets(rk, topics, p, &lo, &hi[p], 10000))
            die(topics, "watermarks");
        if (hi[p] > lo) {
            rd_kafka_topic_partition_list_add(l, topics, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
            left++;
        }
    }
    rd_kafka_metadata_destroy(md);
    rd_kafka_assign(rk, l);
    int64_t deadline = mono_ns() + 120 * 1000000000LL;
    while (left > 0 && mono_ns() < deadline) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 500);
        if (!m)
            continue;
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->err) {
            fprintf(stderr, "kbench: consume: %s\n", rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            continue;
        }
        rd_kafka_timestamp_type_t tt;
        int64_t ts = rd_kafka_message_timestamp(m, &tt);
        printf("%.*s\t%" PRId64 "\n", (int)m->key_len, m->key ? (const char *)m->key : "", ts);
        if (m->offset + 1 >= hi[m->partition])
            left--;
        rd_kafka_message_destroy(m);
    }
    fflush(stdout);
    rd_kafka_consumer_close(rk);
    rd_kafka_topic_partition_list_destroy(l);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    free(hi);
    return left ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: kbench create|produce|stamps [-b brokers] -t topic[,topic] [-p partitions] "
                        "[-n count] [-r rate] [--id-prefix P] [--prompt TEXT]\n");
        return 2;
    }
    const char *cmd = argv[1];
    static const struct option lo[] = {
        {"brokers", required_argument, NULL, 'b'},    {"topic", required_argument, NULL, 't'},
        {"partitions", required_argument, NULL, 'p'}, {"count", required_argument, NULL, 'n'},
        {"rate", required_argument, NULL, 'r'},       {"id-prefix", required_argument, NULL, 1},
        {"prompt", required_argument, NULL, 2},       {NULL, 0, NULL, 0}};
    int ch;
    optind = 2;
    while ((ch = getopt_long(argc, argv, "b:t:p:n:r:", lo, NULL)) != -1) {
        switch (ch) {
        case 'b':
            brokers = optarg;
            break;
        case 't':
            topics = optarg;
            break;
        case 'p':
            partitions = (int)strtol(optarg, NULL, 10);
            break;
        case 'n':
            count = strtol(optarg, NULL, 10);
            break;
        case 'r':
            rate = atof(optarg);
            break;
        case 1:
            id_prefix = optarg;
            break;
        case 2:
            prompt_text = optarg;
            break;
        default:
            return 2;
        }
    }
    if (!topics)
        die("usage", "-t TOPIC is required");
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(cmd, "create") == 0)
        return cmd_create();
    if (strcmp(cmd, "produce") == 0)
        return cmd_produce();
    if (strcmp(cmd, "stamps") == 0)
        return cmd_stamps();
    die("unknown command", cmd);
}
