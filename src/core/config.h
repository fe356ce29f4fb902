/* config.h - every setting of asyncllm, in one declarative table (config.c).
 *
 * Each setting has a flag name (`--http-port`), an environment variable derived from it (`ASYNCLLM_HTTP_PORT`),
 * a type, bounds, a default and a help text. `--help` and the README's configuration table are printed from the
 * same table. Flags override the environment, which overrides defaults. Strings point into argv, environ or
 * static storage and are never freed. */
#ifndef ASYNCLLM_CONFIG_H
#define ASYNCLLM_CONFIG_H

#include <stddef.h>
#include <stdio.h>

#define CONFIG_MAX_KAFKA_PROPS 32

struct config {
    const char *log_level;
    /* Kafka */
    const char *kafka_brokers;
    const char *topic_prompts;
    const char *topic_responses;
    const char *topic_dlq;
    const char *topic_webhook_dlq;
    const char *topic_moderation;
    const char *topic_postprocessed;
    const char *topic_postprocess_dlq;
    long partitions;
    long replication;
    long produce_timeout_ms;
    long prompt_linger_ms;
    long prompt_sticky_ms;
    long response_linger_ms;
    long fetch_wait_ms;
    /* Redis */
    const char *redis_host;
    long redis_port;
    const char *redis_password;
    long redis_timeout_ms;
    long conversation_ttl_s;
    long stream_max_events;
    long stream_ttl_s;
    /* HTTP API */
    const char *http_addr;
    long http_port;
    long http_threads;
    long http_max_body;
    long http_idle_timeout_s;
    long request_timeout_ms;
    const char *public_url;
    long retry_after_s;
    long poll_max_wait_s;
    long sync_timeout_s;
    /* LLM */
    const char *llm_base_url;
    const char *llm_api_key;
    const char *llm_model;
    long llm_timeout_ms;
    long llm_max_tokens;
    long llm_max_response_bytes;
    long llm_endpoint_max_in_flight;
    /* worker */
    const char *group_id;
    const char *instance_id;
    long max_in_flight;
    long max_buffered;
    long max_attempts;
    long retry_base_ms;
    long retry_max_ms;
    long prompt_deadline_ms;
    long commit_interval_ms;
    long shutdown_grace_ms;
    long revoke_grace_ms;
    const char *metrics_addr;
    long metrics_port;
    /* webhooks */
    const char *webhook_urls;
    const char *webhook_secret;
    const char *webhook_group_id;
    long webhook_max_attempts;
    long webhook_retry_base_ms;
    long webhook_retry_max_ms;
    long webhook_timeout_ms;
    long webhook_max_in_flight;
    long webhook_allow_private;
    long webhook_from_beginning;
    /* moderation, post-processing */
    const char *moderation_words;
    const char *moderation_url;
    const char *moderation_api_key;
    const char *moderation_model;
    const char *moderation_group_id;
    long moderation_max_in_flight;
    long moderation_timeout_ms;
    long moderation_max_attempts;
    const char *exec_group_id;
    long exec_per_message;
    long exec_max_in_flight;
    long exec_timeout_ms;
    long exec_max_attempts;
    long exec_retry_base_ms;
    long exec_max_output_bytes;
    /* `-X key=value` pass-through to librdkafka, applied to every Kafka client after our own settings. */
    const char *kafka_props[CONFIG_MAX_KAFKA_PROPS][2];
    int kafka_nprops;
};

/* Fills cfg with defaults, then the environment, then argv[first..argc). Returns 0, or -1 with a message in
 * err (an unknown flag, a malformed number, a value out of bounds). `--help` is not handled here. */
int config_load(struct config *cfg, int argc, char **argv, int first, char *err, size_t errlen);

/* Prints the settings as help text (for --help) or as a Markdown table (for the README). */
void config_print_help(FILE *out);
void config_print_markdown(FILE *out);

#endif
