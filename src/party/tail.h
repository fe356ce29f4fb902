/* tail.h - `asyncllm tail`: follows async_llm_response and prints each response, for people and scripts.
 *
 * It joins no consumer group and commits nothing: it assigns itself every partition of the topic, from the
 * current end (the default: responses produced after it started) or from the beginning, so it can run beside
 * the real parties without taking anything from them. A plain blocking poll loop: nothing else runs in it. */
#ifndef ASYNCLLM_TAIL_H
#define ASYNCLLM_TAIL_H

#include <stdbool.h>
#include <stddef.h>

struct config;

struct tail_opts {
    bool from_beginning;
    bool text;                /* readable text instead of JSON lines */
    const char *conversation; /* only this conversation, or NULL */
    const char *topic;        /* another topic than topic-responses (e.g. the moderation topic), or NULL */
};

/* Takes tail's own options out of argv[first..*argc) (--from-beginning, --format=json|text,
 * --conversation=ID, --topic=NAME), leaving the settings. The strings stay in argv. Returns 0, or -1 with a
 * message in err. */
int tail_args(int *argc, char **argv, int first, struct tail_opts *o, char *err, size_t errlen);
/* Runs until SIGINT or SIGTERM (or a closed stdout). Returns the exit status. */
int tail_run(const struct config *cfg, const struct tail_opts *o);

#endif
