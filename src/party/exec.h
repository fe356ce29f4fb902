/* exec.h - `asyncllm exec -- COMMAND [ARGS...]`: post-processing of async_llm_response in any language.
 *
 * COMMAND gets each response message as one line of JSON on its standard input and answers with one line of
 * JSON on its standard output, in the same order (results are matched to messages by position). The results
 * go to topic-postprocessed, keyed by conversation id, in order per conversation. A result line `null` means
 * "nothing to publish"; blank lines are ignored; standard error is passed through to ours. With
 * exec-per-message, COMMAND runs once per message instead: the message on its stdin (then end of file), the
 * result on its stdout, exit status 0.
 *
 * The command comes only from the operator's command line (never from a message). */
#ifndef ASYNCLLM_EXEC_H
#define ASYNCLLM_EXEC_H

#include <stddef.h>

struct event_base;
struct config;
struct exec;

/* argv: the command and its arguments, NULL-terminated (copied). Starts the command (unless
 * exec-per-message) and joins exec-group-id. NULL with a message in err (e.g. the command is not found). */
struct exec *exec_new(struct event_base *base, const struct config *cfg, char *const *argv, char *err, size_t errlen);
void exec_drain(struct exec *ex, void (*on_drained)(void *arg), void *arg);
/* Stops the command (end of file on its stdin, then SIGKILL after 2 s), commits, frees. */
void exec_free(struct exec *ex);

#endif
