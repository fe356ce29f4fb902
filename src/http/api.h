/* api.h - the HTTP front end (`asyncllm api`): /answer, /polling, /healthz, /readyz.
 *
 * A submitted prompt gets a turn in Redis (pending), is produced to the prompts topic keyed by its
 * conversation id, and the client gets 202 only after the broker acknowledged it (acks=all). Anything else
 * (Redis or Kafka down, a produce error or timeout) answers 503 with Retry-After and marks the turn rejected. */
#ifndef ASYNCLLM_API_H
#define ASYNCLLM_API_H

#include <stddef.h>

struct event_base;
struct config;
struct api;

/* Listens on port (-1: the configured one) and connects to Kafka and Redis on base. Several APIs (one per
 * thread) may listen on the same port. Returns NULL with a message in err. */
struct api *api_new(struct event_base *base, const struct config *cfg, int port, char *err, size_t errlen);
/* The port the API listens on. */
int api_port(const struct api *api);
/* Stops accepting connections (the first step of a graceful shutdown). */
void api_stop_listening(struct api *api);
/* The number of submits whose request is still unanswered (each answers by its deadline at the latest). */
int api_pending(const struct api *api);
/* Answers what is still waiting, waits for outstanding produces (bounded), closes everything. */
void api_free(struct api *api);

#endif
