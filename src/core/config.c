/* config.c - the table of settings and its loader. See config.h. */
#include "core/config.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum cfg_type { CFG_STR, CFG_INT };

struct cfg_entry {
    const char *name; /* flag name without dashes; the environment variable is ASYNCLLM_ + upper(name) */
    enum cfg_type type;
    size_t offset;
    long min, max;
    const char *def;
    const char *help;
};

#define S(name, field, def, help)                                                                                      \
    {                                                                                                                  \
        name, CFG_STR, offsetof(struct config, field), 0, 0, def, help                                                 \
    }
#define I(name, field, min, max, def, help)                                                                            \
    {                                                                                                                  \
        name, CFG_INT, offsetof(struct config, field), min, max, def, help                                             \
    }

static const struct cfg_entry entries[] = {
    S("log-level", log_level, "info", "debug, info, warn or error"),
    /* Kafka */
    S("kafka-brokers", kafka_brokers, "localhost:9092", "Kafka bootstrap servers (host:port,...)"),
    S("topic-prompts", topic_prompts, "async_user_prompt", "topic the API produces prompts to"),
    S("topic-responses", topic_responses, "async_llm_response", "topic the worker produces responses to"),
    S("topic-dlq", topic_dlq, "async_user_prompt.dlq", "dead-letter topic for prompts that failed for good"),
    S("topic-webhook-dlq", topic_webhook_dlq, "async_llm_response.webhooks.dlq",
      "dead-letter topic for webhook events that could not be delivered"),
    S("topic-moderation", topic_moderation, "async_llm_moderation", "topic of flagged responses (asyncllm moderate)"),
    S("topic-postprocessed", topic_postprocessed, "async_llm_postprocessed",
      "topic of post-processing results (asyncllm exec)"),
    S("topic-postprocess-dlq", topic_postprocess_dlq, "async_llm_postprocessed.dlq",
      "dead-letter topic of post-processing (asyncllm exec)"),
    I("partitions", partitions, 1, 10000, "6", "partitions of each topic when asyncllm creates it at start-up"),
    I("replication", replication, 1, 16, "1", "replication factor of topics asyncllm creates"),
    I("produce-timeout-ms", produce_timeout_ms, 100, 600000, "5000",
      "how long a produce may wait for the broker's ack before the request fails (503)"),
    I("prompt-linger-ms", prompt_linger_ms, 0, 1000, "1",
      "the API batches prompts this long into one produce request per partition (adds up to this much to a 202)"),
    I("prompt-sticky-ms", prompt_sticky_ms, 0, 10000, "10",
      "new conversations get ids whose partition (of the prompts topic) is the same for this many ms, then "
      "another: their prompts share produce requests (the broker pays per request). 0: each on a random "
      "partition"),
    I("response-linger-ms", response_linger_ms, 0, 1000, "1",
      "the worker batches responses this long into one produce request per partition (fewer requests for the "
      "broker; a response is published up to this much later)"),
    I("fetch-wait-ms", fetch_wait_ms, 0, 1000, "0",
      "> 0: the worker reads prompts in fetches the broker answers every this many ms (or at 1 MiB) instead of "
      "one small fetch per round trip: about a quarter less broker CPU per prompt when busy, a prompt waits up to "
      "this much more, and an idle worker then costs the broker about 10% of a core (5 ms). 0: an answer as soon "
      "as a prompt is there, a long poll (up to 100 ms) when there is none"),
    /* Redis */
    S("redis-host", redis_host, "127.0.0.1", "Redis host"),
    I("redis-port", redis_port, 1, 65535, "6379", "Redis port"),
    S("redis-password", redis_password, "", "Redis password (AUTH), empty for none"),
    I("redis-timeout-ms", redis_timeout_ms, 10, 600000, "5000",
      "how long the oldest command written to Redis may go unanswered before the connection is dropped"),
    I("conversation-ttl-s", conversation_ttl_s, 0, 315360000, "86400",
      "seconds a conversation is kept in Redis after its last change (0: forever)"),
    I("stream-max-events", stream_max_events, 16, 100000000, "10000",
      "events kept per streamed response for resuming (older ones are trimmed)"),
    I("stream-ttl-s", stream_ttl_s, 1, 315360000, "86400", "seconds a streamed response's events are kept"),
    /* HTTP */
    S("http-addr", http_addr, "127.0.0.1", "address the HTTP API listens on"),
    I("http-port", http_port, 0, 65535, "8080", "port the HTTP API listens on"),
    I("http-threads", http_threads, 1, 64, "1",
      "API threads, each with its own event loop, listener (SO_REUSEPORT), Kafka producer and Redis connections"),
    I("http-max-body", http_max_body, 64, 67108864, "1048576", "largest request body accepted, bytes (413 above)"),
    I("http-idle-timeout-s", http_idle_timeout_s, 1, 3600, "30",
      "a connection idle this long, or a request still incomplete this long after its first byte, is closed (408)"),
    I("request-timeout-ms", request_timeout_ms, 100, 600000, "10000",
      "deadline of one API request; past it the client gets 503 with Retry-After"),
    S("public-url", public_url, "", "absolute base of polling_url (e.g. https://llm.example.com); empty: relative"),
    I("retry-after-s", retry_after_s, 0, 3600, "1", "Retry-After suggested to clients on 202 and 503"),
    I("poll-max-wait-s", poll_max_wait_s, 0, 3600, "60", "longest long poll (GET /polling?wait=N) allowed"),
    I("sync-timeout-s", sync_timeout_s, 1, 86400, "300",
      "POST /v1/responses without background waits this long for the result, then answers it as it is"),
    /* LLM */
    S("llm-base-url", llm_base_url, "https://api.openai.com/v1",
      "OpenAI-compatible base URL; the worker POSTs to {base}/chat/completions. Several, comma-separated: each "
      "call goes to the least busy"),
    I("llm-endpoint-max-in-flight", llm_endpoint_max_in_flight, 0, 1000000, "0",
      "LLM calls in flight at once per base URL (0: only max-in-flight applies)"),
    S("llm-api-key", llm_api_key, "", "bearer token for the LLM (falls back to OPENAI_API_KEY)"),
    S("llm-model", llm_model, "gpt-4o-mini", "model name sent to the LLM"),
    I("llm-timeout-ms", llm_timeout_ms, 100, 3600000, "120000", "deadline of one LLM call"),
    I("llm-max-tokens", llm_max_tokens, 0, 1000000, "0", "max_tokens sent with each call (0: not sent)"),
    I("llm-max-response-bytes", llm_max_response_bytes, 1024, 268435456, "8388608",
      "largest LLM response body accepted"),
    /* worker */
    S("group-id", group_id, "asyncllm-worker", "Kafka consumer group of the workers"),
    S("instance-id", instance_id, "", "static group membership id (group.instance.id); empty: dynamic"),
    I("max-in-flight", max_in_flight, 1, 1000000, "4096", "LLM calls in flight at once per worker"),
    I("max-buffered", max_buffered, 0, 10000000, "0",
      "prompts held in memory (running + waiting) before the worker stops taking more (0: 4 x max-in-flight)"),
    I("max-attempts", max_attempts, 1, 100, "5", "LLM attempts per prompt before it fails for good"),
    I("retry-base-ms", retry_base_ms, 1, 3600000, "500", "first retry backoff (exponential, full jitter)"),
    I("retry-max-ms", retry_max_ms, 1, 3600000, "30000", "largest retry backoff"),
    I("prompt-deadline-ms", prompt_deadline_ms, 1000, 86400000, "600000",
      "a prompt still failing this long after the worker took it fails for good"),
    I("commit-interval-ms", commit_interval_ms, 10, 600000, "1000", "how often finished offsets are committed"),
    I("shutdown-grace-ms", shutdown_grace_ms, 0, 3600000, "30000",
      "on SIGTERM, how long in-flight work may take to finish"),
    I("revoke-grace-ms", revoke_grace_ms, 0, 250000, "10000",
      "on a rebalance, how long in-flight prompts of revoked partitions may take to finish"),
    S("webhook-urls", webhook_urls, "", "endpoints that receive every event (comma-separated), besides callback_url"),
    S("webhook-secret", webhook_secret, "",
      "signing secret, whsec_<base64> (Standard Webhooks); required by asyncllm webhooks"),
    S("webhook-group-id", webhook_group_id, "asyncllm-webhooks", "consumer group of asyncllm webhooks"),
    I("webhook-max-attempts", webhook_max_attempts, 1, 100, "8", "delivery attempts before an event is dead-lettered"),
    I("webhook-retry-base-ms", webhook_retry_base_ms, 1, 86400000, "1000", "first webhook retry backoff"),
    I("webhook-retry-max-ms", webhook_retry_max_ms, 1, 86400000, "600000", "largest webhook retry backoff"),
    I("webhook-timeout-ms", webhook_timeout_ms, 100, 600000, "10000", "deadline of one webhook delivery"),
    I("webhook-max-in-flight", webhook_max_in_flight, 1, 100000, "256", "events being delivered at once"),
    I("webhook-allow-private", webhook_allow_private, 0, 1, "0",
      "1: allow webhook URLs that resolve to loopback, private or link-local addresses"),
    I("webhook-from-beginning", webhook_from_beginning, 0, 1, "0",
      "1: a new webhooks group starts at the beginning of the topic (0: at its end, no events for past responses)"),
    /* interested parties: asyncllm moderate, asyncllm exec */
    S("moderation-words", moderation_words, "",
      "word list of asyncllm moderate, a file: one word per line, matched as whole words after Unicode folding, "
      "with repeated letters and digit or symbol swaps caught"),
    S("moderation-url", moderation_url, "",
      "OpenAI-compatible moderation API: asyncllm moderate POSTs every answer to {base}/moderations (empty: off)"),
    S("moderation-api-key", moderation_api_key, "", "bearer token for the moderation API (empty: none)"),
    S("moderation-model", moderation_model, "", "model sent to the moderation API (empty: its default)"),
    S("moderation-group-id", moderation_group_id, "asyncllm-moderation", "consumer group of asyncllm moderate"),
    I("moderation-max-in-flight", moderation_max_in_flight, 1, 100000, "64", "responses being checked at once"),
    I("moderation-timeout-ms", moderation_timeout_ms, 100, 600000, "10000", "deadline of one moderation API call"),
    I("moderation-max-attempts", moderation_max_attempts, 1, 100, "3",
      "moderation API attempts per response; after the last one the verdict records the failure as a reason"),
    S("exec-group-id", exec_group_id, "asyncllm-exec", "consumer group of asyncllm exec (one per command)"),
    I("exec-per-message", exec_per_message, 0, 1, "0",
      "1: asyncllm exec runs COMMAND once per message (the message on its stdin, the result on its stdout); 0: "
      "one long-running COMMAND, one line in and one line out per message"),
    I("exec-max-in-flight", exec_max_in_flight, 1, 10000, "16",
      "messages given to the command at once (lines written ahead, or processes with exec-per-message)"),
    I("exec-timeout-ms", exec_timeout_ms, 10, 3600000, "30000",
      "how long the command may take over one message; then it is killed (and restarted) and the message retried"),
    I("exec-max-attempts", exec_max_attempts, 1, 100, "3",
      "attempts per message before it goes to the post-processing dead-letter topic"),
    I("exec-retry-base-ms", exec_retry_base_ms, 1, 3600000, "500",
      "backoff before a message is retried or a crashed command restarted (doubling up to 30 s)"),
    I("exec-max-output-bytes", exec_max_output_bytes, 64, 268435456, "1048576",
      "longest result line the command may write for one message"),
    S("metrics-addr", metrics_addr, "127.0.0.1", "address of the worker's metrics server"),
    I("metrics-port", metrics_port, 0, 65535, "9464", "port of the worker's GET /metrics (Prometheus text); 0: off"),
};

#define NENTRIES (sizeof entries / sizeof entries[0])

static void env_name(const struct cfg_entry *e, char *buf, size_t len)
{
    size_t n = (size_t)snprintf(buf, len, "ASYNCLLM_");
    for (const char *p = e->name; *p && n + 1 < len; p++)
        buf[n++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
    buf[n] = '\0';
}

static int set_value(struct config *cfg, const struct cfg_entry *e, const char *value, const char *origin, char *err,
                     size_t errlen)
{
    char *field = (char *)cfg + e->offset;
    if (e->type == CFG_STR) {
        *(const char **)field = value;
        return 0;
    }
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end != '\0') {
        snprintf(err, errlen, "%s: '%s' is not an integer", origin, value);
        return -1;
    }
    if (v < e->min || v > e->max) {
        snprintf(err, errlen, "%s: %ld is outside [%ld, %ld]", origin, v, e->min, e->max);
        return -1;
    }
    *(long *)field = v;
    return 0;
}

static const struct cfg_entry *find_entry(const char *name, size_t len)
{
    for (size_t i = 0; i < NENTRIES; i++)
        if (strlen(entries[i].name) == len && memcmp(entries[i].name, name, len) == 0)
            return &entries[i];
    return NULL;
}

static int add_kafka_prop(struct config *cfg, char *kv, char *err, size_t errlen)
{
    char *eq = strchr(kv, '=');
    if (!eq || eq == kv) {
        snprintf(err, errlen, "-X expects key=value, got '%s'", kv);
        return -1;
    }
    if (cfg->kafka_nprops == CONFIG_MAX_KAFKA_PROPS) {
        snprintf(err, errlen, "too many -X settings (at most %d)", CONFIG_MAX_KAFKA_PROPS);
        return -1;
    }
    *eq = '\0'; /* argv strings are ours to split */
    cfg->kafka_props[cfg->kafka_nprops][0] = kv;
    cfg->kafka_props[cfg->kafka_nprops][1] = eq + 1;
    cfg->kafka_nprops++;
    return 0;
}

int config_load(struct config *cfg, int argc, char **argv, int first, char *err, size_t errlen)
{
    char env[96];
    memset(cfg, 0, sizeof *cfg);
    for (size_t i = 0; i < NENTRIES; i++) {
        const struct cfg_entry *e = &entries[i];
        if (set_value(cfg, e, e->def, e->name, err, errlen))
            return -1;
        env_name(e, env, sizeof env);
        const char *v = getenv(env);
        if (v && set_value(cfg, e, v, env, err, errlen))
            return -1;
    }
    if (cfg->llm_api_key[0] == '\0' && getenv("OPENAI_API_KEY"))
        cfg->llm_api_key = getenv("OPENAI_API_KEY");

    for (int i = first; i < argc; i++) {
        char *a = argv[i];
        if (strcmp(a, "-X") == 0) {
            if (i + 1 == argc) {
                snprintf(err, errlen, "-X needs key=value");
                return -1;
            }
            if (add_kafka_prop(cfg, argv[++i], err, errlen))
                return -1;
            continue;
        }
        if (strncmp(a, "--", 2) != 0) {
            snprintf(err, errlen, "unexpected argument '%s' (settings are --name=value)", a);
            return -1;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const struct cfg_entry *e = find_entry(name, nlen);
        if (!e) {
            snprintf(err, errlen, "unknown setting '%.*s' (see --help)", (int)nlen, name);
            return -1;
        }
        const char *value = eq ? eq + 1 : NULL;
        /* A switch (an integer in [0, 1]) alone means 1: --exec-per-message. */
        if (!value && e->type == CFG_INT && e->min == 0 && e->max == 1 &&
            (i + 1 == argc || (strcmp(argv[i + 1], "0") && strcmp(argv[i + 1], "1"))))
            value = "1";
        if (!value) {
            if (i + 1 == argc) {
                snprintf(err, errlen, "--%s needs a value", e->name);
                return -1;
            }
            value = argv[++i];
        }
        if (set_value(cfg, e, value, a, err, errlen))
            return -1;
    }
    if (cfg->max_buffered == 0)
        cfg->max_buffered = cfg->max_in_flight * 4;
    if (cfg->max_buffered < cfg->max_in_flight)
        cfg->max_buffered = cfg->max_in_flight;
    return 0;
}

void config_print_help(FILE *out)
{
    char env[96];
    for (size_t i = 0; i < NENTRIES; i++) {
        const struct cfg_entry *e = &entries[i];
        env_name(e, env, sizeof env);
        fprintf(out, "  --%-24s %s\n  %26s env %s, default '%s'\n", e->name, e->help, "", env, e->def);
    }
    fprintf(out, "  -X key=value               any librdkafka setting, for every Kafka client (e.g. -X "
                 "security.protocol=ssl)\n");
}

void config_print_markdown(FILE *out)
{
    char env[96];
    fprintf(out, "| flag | environment variable | default | meaning |\n|---|---|---|---|\n");
    for (size_t i = 0; i < NENTRIES; i++) {
        const struct cfg_entry *e = &entries[i];
        env_name(e, env, sizeof env);
        fprintf(out, "| `--%s` | `%s` | `%s` | %s |\n", e->name, env, e->def, e->help);
    }
}
