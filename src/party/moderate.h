/* moderate.h - `asyncllm moderate`: an interested party of async_llm_response that checks every answer and
 * records a verdict on its conversation turn, and publishes the flagged ones to async_llm_moderation.
 *
 * The verdict, a JSON object stored once per turn as t<n>.moderation (store_moderation):
 *
 *   {"flagged": true, "categories": ["profanity", "truncated"], "reasons": ["listed word \"...\"", ...],
 *    "checked_at": 1764230001456}
 *
 * Categories: "profanity" (the word list, see screen.h), "empty", "truncated" (finish_reason "length"),
 * "repeats_prompt", and those the moderation API reports (its own names, e.g. "harassment"). */
#ifndef ASYNCLLM_MODERATE_H
#define ASYNCLLM_MODERATE_H

#include <jansson.h>
#include <stddef.h>

struct event_base;
struct config;
struct moderate;

/* Loads the word list (moderation-words) and joins moderation-group-id. NULL with a message in err. */
struct moderate *moderate_new(struct event_base *base, const struct config *cfg, char *err, size_t errlen);
void moderate_drain(struct moderate *md, void (*on_drained)(void *arg), void *arg);
void moderate_free(struct moderate *md);

/* How the API shows a stored verdict (JSON text, or NULL for none: then nothing is added). */
/* Sets view's "moderation" to the verdict object (a /polling answer). */
void moderation_polling_view(json_t *view, const char *verdict);
/* Adds moderation_flagged ("true"/"false"), moderation_categories ("profanity,empty") and
 * moderation_checked_at (Unix ms) as string values to metadata (a Response object's). */
void moderation_metadata(json_t *metadata, const char *verdict);

#endif
