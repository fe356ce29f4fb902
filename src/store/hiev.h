/* hiev.h - hiredis' async contexts on a libevent loop: our adapter in place of hiredis/adapters/libevent.h.
 *
 * Same hooks, three differences, each measured on the API's hot Redis connection (docs/STORE.md, "The
 * adapter"):
 *   - the read event stays armed for the connection's life (no event_add per read);
 *   - asking for the write event again while it is armed costs a flag test, not an event_add (hiredis asks
 *     once per command: four times per plain submit);
 *   - what one read brings is handed to the reply reader 1 KiB at a time, each piece's replies answered
 *     before the next is fed. hiredis 0.14's reader moves every unread byte to the front of its buffer
 *     whenever it has consumed 1 KiB: fed a whole 16 KiB read of HGETALL replies at once, it moved about
 *     eight times what it parsed. */
#ifndef ASYNCLLM_HIEV_H
#define ASYNCLLM_HIEV_H

#include <event2/event.h>
#include <hiredis/async.h>

/* Attaches ac (just made by redisAsyncConnect) to base. Returns REDIS_OK, or REDIS_ERR when ac already has an
 * adapter. hiredis frees the adapter with the context. */
int hiev_attach(redisAsyncContext *ac, struct event_base *base);

/* Reads what has arrived on ac's socket and runs the callbacks of the replies it completes, as the read event
 * does. ac may be freed by a callback or a failed read: use it afterwards only if its owner still has it. */
void hiev_read(redisAsyncContext *ac);

#endif
