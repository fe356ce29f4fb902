/* party_min.c - a minimal interested party of async_llm_response in C, on the project's consumer engine
 * (src/party/party.h, itself on the Kafka module src/kafka/kafka.h): it prints one line per response, one
 * conversation's responses in order, and commits a message's offset only after its line is printed, so a crash
 * loses nothing (a restart may print a line again: at least once).
 *
 * Build and run (tests/unit/test_party_example.c compiles this file, so `make unit` keeps it true):
 *
 *   make build/asan/test_party_example
 *   build/asan/test_party_example run --kafka-brokers=localhost:9092 --group-id=my-party
 *
 * Any asyncllm setting works (--topic-responses, -X security.protocol=ssl, ...). Ctrl-C stops it: the engine
 * drains, commits and leaves the group. A real party does its side effect in process() and calls party_done()
 * when that side effect is complete, possibly later from a callback; see src/party/moderate.c. */
#include "core/config.h"
#include "core/log.h"
#include "party/party.h"

#include <event2/event.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>

/* The side effect, kept pure so that a test can check it: one line describing a response message. Returns -1
 * for a message that is not a response. */
int party_min_describe(const char *value, size_t len, char *out, size_t outlen);
int party_min_describe(const char *value, size_t len, char *out, size_t outlen)
{
    json_t *v = json_loadb(value, len, 0, NULL);
    const char *conv = json_string_value(json_object_get(v, "conversation_id"));
    const char *status = json_string_value(json_object_get(v, "status"));
    json_t *turn = json_object_get(v, "turn");
    int rc = -1;
    if (conv && status && json_is_integer(turn)) {
        snprintf(out, outlen, "%s turn %lld %s: %zu bytes of answer", conv, (long long)json_integer_value(turn), status,
                 json_string_length(json_object_get(v, "llm_response")));
        rc = 0;
    }
    json_decref(v);
    return rc;
}

/* Called for each message; at most max_in_flight at once, one at a time per conversation (ordered). */
static void process(void *ctx, struct party *p, struct party_msg *m)
{
    (void)ctx;
    char line[256];
    if (party_min_describe(m->value, m->len, line, sizeof line) == 0) {
        printf("%s\n", line);
        fflush(stdout);
    }
    party_done(p, m); /* the side effect is done: the offset may be committed */
}

/* Only for messages still running at a rebalance or shutdown; process() above never leaves one running. */
static void abandon(void *ctx, struct party *p, struct party_msg *m)
{
    (void)ctx;
    (void)p;
    (void)m;
}

static void drained(void *arg)
{
    event_base_loopbreak(arg);
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    void **ctx = arg;
    party_drain(ctx[1], drained, ctx[0]); /* finish what runs (up to --shutdown-grace-ms), then stop */
}

int main(int argc, char **argv)
{
    static struct config cfg;
    char err[512];
    if (config_load(&cfg, argc, argv, 1, err, sizeof err)) {
        fprintf(stderr, "party_min: %s\n", err);
        return 2;
    }
    log_set_role("party_min");
    struct event_base *base = event_base_new();
    /* group, topic, messages at once, ordered per key, and a new group starts at the beginning (not the end) */
    struct party_opts o = {cfg.group_id, cfg.topic_responses, 64, true, false};
    static const struct party_hooks hooks = {process, abandon};
    struct party *p = party_new(base, &cfg, &o, &hooks, NULL, err, sizeof err);
    if (!p) {
        fprintf(stderr, "party_min: %s\n", err);
        event_base_free(base);
        return 1;
    }
    void *ctx[2] = {base, p};
    struct event *sigint = evsignal_new(base, SIGINT, on_signal, ctx);
    struct event *sigterm = evsignal_new(base, SIGTERM, on_signal, ctx);
    event_add(sigint, NULL);
    event_add(sigterm, NULL);
    event_base_dispatch(base);
    party_free(p); /* commits, leaves the group */
    event_free(sigint);
    event_free(sigterm);
    event_base_free(base);
    return 0;
}
