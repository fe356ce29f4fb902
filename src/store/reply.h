/* reply.h - hiredis reply objects built in one arena per reply.
 *
 * hiredis' default reader allocates every object of a reply twice (the redisReply and a copy of its string)
 * and frees them one by one: an HGETALL of a conversation (about 35 objects) cost more in malloc and free than
 * in parsing. With these functions a reply and everything in it live in a few large blocks, allocated as the
 * reader goes and freed at once with the reply. The objects are ordinary redisReply structs, so callers read
 * them as before; the usual rule holds (a reply is valid only until hiredis frees it after the callback). */
#ifndef ASYNCLLM_REPLY_H
#define ASYNCLLM_REPLY_H

#include <hiredis/read.h>

/* Makes reader (a context's c.reader, before any reply arrives) build its replies in arenas. Replies must then be
 * freed with reader->fn->freeObject (hiredis does so itself for the replies of an async context), never with
 * freeReplyObject. */
void reply_arena_use(redisReader *reader);

#endif
