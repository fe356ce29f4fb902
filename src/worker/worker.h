/* worker.h - the prompt consumer (`asyncllm worker`).
 *
 * Reads async_user_prompt in a consumer group, calls the LLM for many prompts at once (max-in-flight), keeps
 * the turns of one conversation strictly in order, stores each result in Redis, publishes it to
 * async_llm_response, and commits a partition's offset only up to the first prompt that is not finished.
 * The design is in docs/WORKER.md. */
#ifndef ASYNCLLM_WORKER_H
#define ASYNCLLM_WORKER_H

#include <stdbool.h>
#include <stddef.h>

struct event_base;
struct config;
struct worker;

struct worker *worker_new(struct event_base *base, const struct config *cfg, char *err, size_t errlen);
/* Starts a graceful stop: no new prompts; in-flight ones get shutdown-grace-ms to finish. on_drained runs on the
 * loop once nothing is in flight or the grace period ended. */
void worker_drain(struct worker *w, void (*on_drained)(void *arg), void *arg);
/* Commits what is finished, leaves the group, flushes the producer, frees everything (blocking, bounded). */
void worker_free(struct worker *w);

#endif
