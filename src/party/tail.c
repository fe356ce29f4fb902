/* tail.c - see tail.h. */
#include "party/tail.h"

#include "core/config.h"
#include "core/log.h"
#include "core/util.h"

#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

int tail_args(int *argc, char **argv, int first, struct tail_opts *o, char *err, size_t errlen)
{
    memset(o, 0, sizeof *o);
    int out = first;
    for (int i = first; i < *argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        size_t nl = 0;
        if (strcmp(a, "--from-beginning") == 0) {
            o->from_beginning = true;
            continue;
        }
        const char *names[] = {"--format", "--conversation", "--topic"};
        int which = -1;
        for (int k = 0; k < 3; k++) {
            nl = strlen(names[k]);
            if (strncmp(a, names[k], nl) == 0 && (a[nl] == '=' || a[nl] == '\0')) {
                which = k;
                break;
            }
        }
        if (which < 0) {
            argv[out++] = argv[i];
            continue;
        }
        if (a[nl] == '=')
            val = a + nl + 1;
        else if (i + 1 < *argc)
            val = argv[++i];
        if (!val || !val[0]) {
            snprintf(err, errlen, "%.*s needs a value", (int)nl, a);
            return -1;
        }
        if (which == 0) {
            if (strcmp(val, "text") && strcmp(val, "json")) {
                snprintf(err, errlen, "--format is json or text, not '%s'", val);
                return -1;
            }
            o->text = strcmp(val, "text") == 0;
        } else if (which == 1) {
            o->conversation = val;
        } else {
            o->topic = val;
        }
    }
    *argc = out;
    argv[out] = NULL;
    return 0;
}

static void kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void)rk;
    if (level <= 3)
        log_warn("kafka: %s: %s", fac, buf);
}

static void format_time(int64_t ms, char *out, size_t len)
{
    time_t s = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&s, &tm);
    char b[32];
    strftime(b, sizeof b, "%Y-%m-%d %H:%M:%S", &tm);
    snprintf(out, len, "%s.%03dZ", b, (int)(ms % 1000));
}

/* Prints one message; returns -1 when stdout is gone. */
static int print_msg(const struct tail_opts *o, const rd_kafka_message_t *km)
{
    json_t *v = json_loadb(km->payload ? km->payload : "", km->len, 0, NULL);
    const char *conv = json_string_value(json_object_get(v, "conversation_id"));
    if (o->conversation) {
        bool by_key =
            km->key && km->key_len == strlen(o->conversation) && memcmp(km->key, o->conversation, km->key_len) == 0;
        if (!by_key && !(conv && strcmp(conv, o->conversation) == 0)) {
            json_decref(v);
            return 0;
        }
    }
    if (!o->text) {
        /* One line per message whatever was produced: compact JSON, or the raw value as a JSON string. */
        json_t *line = v ? json_incref(v) : json_stringn(km->payload ? km->payload : "", km->len);
        char *s = json_dumps(line ? line : json_null(), JSON_COMPACT | JSON_ENCODE_ANY);
        json_decref(line);
        printf("%s\n", s ? s : "null");
        free(s);
    } else {
        char when[40];
        json_t *at = json_object_get(v, "completed_at");
        format_time(json_is_integer(at) ? (int64_t)json_integer_value(at) : rd_kafka_message_timestamp(km, NULL), when,
                    sizeof when);
        const char *status = json_string_value(json_object_get(v, "status"));
        printf("%s  %s  turn %lld  %s", when, conv ? conv : "?",
               (long long)json_integer_value(json_object_get(v, "turn")), status ? status : "?");
        const char *model = json_string_value(json_object_get(v, "model"));
        json_t *usage = json_object_get(v, "usage");
        const char *fin = json_string_value(json_object_get(v, "finish_reason"));
        if (model && model[0])
            printf("  (%s, %lld tokens%s%s)", model,
                   (long long)json_integer_value(json_object_get(usage, "total_tokens")), fin && fin[0] ? ", " : "",
                   fin ? fin : "");
        json_t *mod = json_object_get(v, "moderation");
        if (json_is_object(mod)) {
            char *cats = json_dumps(json_object_get(mod, "categories"), JSON_COMPACT);
            printf("  moderation: %s %s", json_is_true(json_object_get(mod, "flagged")) ? "flagged" : "ok",
                   cats ? cats : "");
            free(cats);
        }
        printf("\n");
        const char *prompt = json_string_value(json_object_get(v, "user_prompt"));
        const char *answer = json_string_value(json_object_get(v, "llm_response"));
        json_t *error = json_object_get(v, "error");
        if (prompt)
            printf("  user: %s\n", prompt);
        if (json_is_object(error))
            printf("  error: %s: %s\n", json_string_value(json_object_get(error, "code")),
                   json_string_value(json_object_get(error, "message")));
        else if (answer)
            printf("  llm:  %s\n", answer);
        if (!v)
            printf("  (not JSON) %.*s\n", (int)km->len, km->payload ? (const char *)km->payload : "");
    }
    json_decref(v);
    return fflush(stdout) == 0 && !ferror(stdout) ? 0 : -1;
}

/* Assigns every partition of topic, at its end or beginning. Returns the partition count, or -1. */
static int assign_all(rd_kafka_t *rk, const char *topic, bool from_beginning, char *err, size_t errlen)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e = rd_kafka_metadata(rk, 0, rkt, &md, 5000);
    rd_kafka_topic_destroy(rkt);
    if (e || md->topic_cnt != 1 || md->topics[0].err || md->topics[0].partition_cnt == 0) {
        snprintf(err, errlen, "no metadata for topic %s (%s)", topic,
                 rd_kafka_err2str(e                    ? e
                                  : md->topic_cnt == 1 ? md->topics[0].err
                                                       : RD_KAFKA_RESP_ERR_UNKNOWN));
        if (md)
            rd_kafka_metadata_destroy(md);
        return -1;
    }
    int n = md->topics[0].partition_cnt;
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(n);
    for (int i = 0; i < n && !stop; i++) {
        int32_t part = md->topics[0].partitions[i].id;
        int64_t lo = 0, hi = RD_KAFKA_OFFSET_END;
        /* "From now" is the end as of this call, not as of the first fetch: a response produced right after the
         * start line is printed is not skipped. */
        if (!from_beginning && rd_kafka_query_watermark_offsets(rk, topic, part, &lo, &hi, 5000))
            hi = RD_KAFKA_OFFSET_END;
        rd_kafka_topic_partition_list_add(l, topic, part)->offset = from_beginning ? RD_KAFKA_OFFSET_BEGINNING : hi;
    }
    rd_kafka_metadata_destroy(md);
    e = rd_kafka_assign(rk, l);
    rd_kafka_topic_partition_list_destroy(l);
    if (e) {
        snprintf(err, errlen, "assign: %s", rd_kafka_err2str(e));
        return -1;
    }
    return n;
}

int tail_run(const struct config *cfg, const struct tail_opts *o)
{
    const char *topic = o->topic ? o->topic : cfg->topic_responses;
    char err[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *props[][2] = {{"bootstrap.servers", cfg->kafka_brokers},
                              {"client.id", "asyncllm-tail"},
                              {"enable.auto.commit", "false"},
                              {"enable.auto.offset.store", "false"},
                              {"enable.partition.eof", "false"}};
    for (size_t i = 0; i < sizeof props / sizeof props[0]; i++)
        rd_kafka_conf_set(conf, props[i][0], props[i][1], err, sizeof err);
    /* librdkafka 2.0 refuses assign() without a group.id ("Unknown group"), though assign() never joins the
     * group: a name of its own, never used to subscribe or commit, keeps this consumer out of every group. */
    char group[64];
    snprintf(group, sizeof group, "asyncllm-tail-%016llx", (unsigned long long)rand_below(UINT64_MAX));
    rd_kafka_conf_set(conf, "group.id", group, err, sizeof err);
    for (int i = 0; i < cfg->kafka_nprops; i++)
        if (rd_kafka_conf_set(conf, cfg->kafka_props[i][0], cfg->kafka_props[i][1], err, sizeof err))
            log_warn("-X %s: %s", cfg->kafka_props[i][0], err);
    rd_kafka_conf_set_log_cb(conf, kafka_log);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, err, sizeof err);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        log_error("kafka: %s", err);
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    int n = -1, waited = 0;
    while (!stop && (n = assign_all(rk, topic, o->from_beginning, err, sizeof err)) < 0) {
        if (waited++ % 10 == 0)
            log_warn("%s; retrying", err);
        struct timespec ts = {0, 500 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (n > 0) {
        log_info("following %s (%d partitions) from %s%s%s", topic, n, o->from_beginning ? "the beginning" : "now",
                 o->conversation ? ", conversation " : "", o->conversation ? o->conversation : "");
        while (!stop) {
            rd_kafka_message_t *km = rd_kafka_consumer_poll(rk, 200);
            if (!km)
                continue;
            if (km->err)
                log_warn("kafka: %s", rd_kafka_message_errstr(km));
            else if (print_msg(o, km)) {
                rd_kafka_message_destroy(km);
                break; /* stdout closed (tail | head): done */
            }
            rd_kafka_message_destroy(km);
        }
    }
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    log_info("stopped");
    return 0;
}
