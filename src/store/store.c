/* store.c - see store.h.
 *
 * Connection: one redisAsyncContext on the loop. When it drops, hiredis answers every command written to it
 * with a NULL reply (which we turn into STORE_EUNAVAILABLE) and a timer reconnects with a growing delay (50 ms
 * to 2 s). A new connection is ready (st->connected) only once Redis has taken our scripts (SCRIPT LOAD, see
 * script_load_cb): a Redis still loading its data set answers -LOADING, and a connection taken as ready then
 * answered NOSCRIPT to every script call for as long as it lasted. Until it is ready, the timeout check's
 * timer is the connection's deadline. A script cache emptied later (SCRIPT FLUSH, a failover) is loaded again
 * and the script calls it refused are written again, in order (see NOSCRIPT below).
 *
 * Window. At most STORE_WINDOW operations are written to the connection and not yet answered (st->sent, in
 * write order, which is reply order); further ones wait in st->queued, a FIFO, and are written one per reply
 * that comes back. Pipelining is kept (the window is large), but a burst (a worker starting with 16,384
 * prompts waiting sends as many BEGIN scripts) no longer sits in Redis' queue and our socket all at once.
 * Every operation goes through the FIFO when anything is queued, so operations are written in call order
 * (the order of one conversation's operations is the callers' order). A MULTI/EXEC group is one operation:
 * its commands are written together, never split by the window.
 *
 * Timeout. hiredis 0.14 has no command timeout. A single timer checks that the oldest command written (the
 * head of st->sent: Redis answers in order) is younger than --redis-timeout-ms; when it is not, Redis is
 * treated as down: the connection is dropped, so every written operation answers STORE_EUNAVAILABLE, and
 * every queued one after them (in call order). The clock starts when a command is written, so it measures
 * Redis (and our loop reading its replies), not the time an operation waited in our queue. While commands are
 * still in hiredis' output buffer (our loop was busy, or the socket buffers are full while Redis reads a
 * backlog), Redis may not have been sent the oldest one, or what is ahead of it: the oldest gets a fresh
 * timeout, but only if the socket took bytes since its clock started. A Redis that stops reading takes
 * nothing once the buffers are full, and is down like one that stops answering (granted unconditionally,
 * this kept a stopped Redis' connection forever when the written commands outgrew the socket buffers).
 * st->obuf_in counts the bytes handed to hiredis on the connection; less what is still in its buffer, that is
 * what the socket took (sock_taken), and each written op keeps what the socket had taken when its clock
 * started.
 *
 * Queued operations have no deadline of their own: while the oldest written command keeps being answered
 * within the timeout, Redis is alive and working through a backlog, and failing the operations behind it
 * would only turn load into retries (the start-up livelock this design removes: a burst timed out, the jobs
 * retried, the next burst timed out again). When Redis stops answering, the oldest written command ages past
 * the timeout and the queue fails with the connection: an operation fails at most --redis-timeout-ms after
 * Redis last answered or read anything (twice that if commands were still waiting in hiredis' buffer). The
 * queue's length is bounded (STORE_QUEUE_MAX): past it an operation fails at once, as when Redis is down.
 * Operations issued while disconnected fail at once, as before. */
#include "store/store.h"

#include "core/config.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/util.h"
#include "store/hiev.h"
#include "store/notify.h"
#include "store/reply.h"

#include <assert.h>
#include <event2/event.h>
#include <event2/event_struct.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <inttypes.h>
#include <limits.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/queue.h>

#define KEY_PREFIX "asyncllm:conv:"
#define RECONNECT_MIN_MS 50
#define RECONNECT_MAX_MS 2000
/* Operations written and not answered. Large enough to keep the connection busy (a reply is about 10 us of
 * Redis' time, so a full window is a few ms of work), small enough that the oldest of them is answered well
 * within the timeout even when Redis or our loop is slow. */
#define STORE_WINDOW 512
/* Operations waiting for the window: a hard limit on the queue's memory, far above what the callers' own
 * limits (in-flight prompts, HTTP connections) let through. */
#define STORE_QUEUE_MAX (1 << 18)
#define STR_(x) #x
#define STR(x) STR_(x)
/* Commands written as one operation: the plain submit's HSET and EXPIRE. */
#define CMD_PIECES_MAX 2
/* Times a script call answered NOSCRIPT is written again (after SCRIPT LOAD on the same connection, so only
 * another flush in between can make it fail again): then NOSCRIPT is a failure like any error reply. */
#define NOSCRIPT_RETRIES 1

/* Every script that changes a turn notifies the conversation's channel (NOTIFY_CHANNEL_PREFIX + id, and cancels
 * NOTIFY_CANCEL_CHANNEL too) with "<conversation> <turn> <what>" (notify.h), and
 * a turn with an event stream gets its events in asyncllm:ev:<conversation>:<turn> (ids 0-1, 0-2, ...: the
 * position is the id's sequence part). Scripts build that key themselves, so this store needs a single Redis,
 * not a cluster. The common ARGV tail of the scripts that touch events: conversation id, stream max length,
 * stream ttl. */
#define LUA_EVENT_FN                                                                                                   \
    "local function ev(conv, n, kind, text, maxlen, ttl)\n"                                                            \
    "  local ek = 'asyncllm:ev:' .. conv .. ':' .. n\n"                                                                \
    "  if text then redis.call('XADD', ek, 'MAXLEN', '~', maxlen, '0-*', 'k', kind, 't', text)\n"                      \
    "  else redis.call('XADD', ek, 'MAXLEN', '~', maxlen, '0-*', 'k', kind) end\n"                                     \
    "  redis.call('EXPIRE', ek, ttl)\n"                                                                                \
    "end\n"                                                                                                            \
    "local function notify(conv, n, what)\n"                                                                           \
    "  local m = conv .. ' ' .. n .. ' ' .. what\n"                                                                    \
    "  redis.call('PUBLISH', '" NOTIFY_CHANNEL_PREFIX "' .. conv, m)\n"                                                \
    "  if what == 'cancel' then redis.call('PUBLISH', '" NOTIFY_CANCEL_CHANNEL "', m) end\n"                           \
    "end\n"

/* A turn's status: its status field, or 'pending' when the field is absent but the prompt is stored (a new
 * conversation's first turn as the API writes it: see submit_new_plain). p is the turn's prefix ("t<n>."). */
#define LUA_STATUS_FN                                                                                                  \
    "local function status(k, p)\n"                                                                                    \
    "  local s = redis.call('HGET', k, p .. 'status')\n"                                                               \
    "  if not s and redis.call('HEXISTS', k, p .. 'prompt') == 1 then s = 'pending' end\n"                             \
    "  return s\n"                                                                                                     \
    "end\n"

/* Allocates a turn for a prompt. ARGV: prompt, now, ttl, is_new, req, input, stream, conv, maxlen, evttl,
 * previous turn (0: none). Returns the turn, -1 unknown conversation, -2 id taken, -3 no such previous turn. */
static const char LUA_SUBMIT[] = LUA_EVENT_FN LUA_STATUS_FN
    "local n\n"
    "if ARGV[4] == '1' then\n"
    "  if redis.call('EXISTS', KEYS[1]) == 1 then return -2 end\n"
    "  n = 1\n"
    "  redis.call('HSET', KEYS[1], 'turns', 1, 'created_at', ARGV[2])\n"
    "else\n"
    "  if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end\n"
    "  if ARGV[11] ~= '0' then\n"
    "    local ps = status(KEYS[1], 't' .. ARGV[11] .. '.')\n"
    "    if not ps or ps == 'deleted' or ps == 'rejected' then return -3 end\n"
    "  end\n"
    "  n = redis.call('HINCRBY', KEYS[1], 'turns', 1)\n"
    "end\n"
    "local p = 't' .. n .. '.'\n"
    "redis.call('HSET', KEYS[1], p .. 'prompt', ARGV[1], p .. 'status', 'pending', p .. 'submitted_at', ARGV[2],\n"
    "           'updated_at', ARGV[2])\n"
    "if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], p .. 'req', ARGV[5]) end\n"
    "if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], p .. 'input', ARGV[6]) end\n"
    "if ARGV[7] == '1' then\n"
    "  redis.call('HSET', KEYS[1], p .. 'stream', '1')\n"
    "  redis.call('DEL', 'asyncllm:ev:' .. ARGV[8] .. ':' .. n)\n"
    "  ev(ARGV[8], n, 'q', nil, ARGV[9], ARGV[10])\n"
    "end\n"
    "if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end\n"
    "if ARGV[4] ~= '1' then notify(ARGV[8], n, 'status') end\n" /* nobody can wait on a new conversation yet */
    "return n\n";

/* A turn whose produce failed. ARGV: turn, is_new, and for turn 0 (a submit lost with the connection: Redis may
 * have run it, its reply never came) submitted_at, the prompt's length and its first PROMPT_HEAD bytes, which
 * find the turn among the conversation's last 64 if it was stored. */
static const char LUA_REJECT[] =
    LUA_STATUS_FN "local t = ARGV[1]\n"
                  "if t == '0' then\n"
                  "  local last = tonumber(redis.call('HGET', KEYS[1], 'turns') or '0')\n"
                  "  local low = last - 63\n"
                  "  if low < 1 then low = 1 end\n"
                  "  t = nil\n"
                  "  for n = last, low, -1 do\n"
                  "    local q = 't' .. n .. '.'\n"
                  "    local f = redis.call('HMGET', KEYS[1], q .. 'submitted_at', q .. 'status', q .. "
                  "'prompt')\n"
                  "    if f[1] == ARGV[3] and (f[2] == 'pending' or not f[2]) and f[3] and string.len(f[3]) == "
                  "tonumber(ARGV[4]) and string.sub(f[3], 1, string.len(ARGV[5])) == ARGV[5] then\n"
                  "      t = tostring(n)\n"
                  "      break\n"
                  "    end\n"
                  "  end\n"
                  "  if not t then return 0 end\n"
                  "end\n"
                  "local p = 't' .. t .. '.'\n"
                  "if status(KEYS[1], p) ~= 'pending' then return 0 end\n"
                  "if ARGV[2] == '1' and redis.call('HGET', KEYS[1], 'turns') == '1' then\n"
                  "  redis.call('DEL', KEYS[1])\n"
                  "  return 1\n"
                  "end\n"
                  "redis.call('HSET', KEYS[1], p .. 'status', 'rejected')\n"
                  "return 1\n";

/* The worker takes a prompt. ARGV: turn (0 = allocate), prompt, now, ttl, source field (k.<partition>.<offset>),
 * conv, maxlen, evttl. A pending turn becomes in_progress (a cancelled or deleted one stays so: the worker skips
 * it). Returns {turn, HGETALL}. */
static const char LUA_BEGIN[] = LUA_EVENT_FN
    "local n = tonumber(ARGV[1])\n"
    "if redis.call('EXISTS', KEYS[1]) == 0 then\n"
    "  redis.call('HSET', KEYS[1], 'turns', 0, 'created_at', ARGV[3])\n"
    "end\n"
    "if n == 0 then\n"
    "  local known = redis.call('HGET', KEYS[1], ARGV[5])\n"
    "  if known then n = tonumber(known) else\n"
    "    n = redis.call('HINCRBY', KEYS[1], 'turns', 1)\n"
    "    redis.call('HSET', KEYS[1], ARGV[5], n)\n"
    "  end\n"
    "elseif tonumber(redis.call('HGET', KEYS[1], 'turns') or '0') < n then\n"
    "  redis.call('HSET', KEYS[1], 'turns', n)\n"
    "end\n"
    "local p = 't' .. n .. '.'\n"
    "if not redis.call('HGET', KEYS[1], p .. 'prompt') then\n"
    "  redis.call('HSET', KEYS[1], p .. 'prompt', ARGV[2], p .. 'submitted_at', ARGV[3])\n"
    "end\n"
    "local s = redis.call('HGET', KEYS[1], p .. 'status')\n"
    "if not s or s == 'pending' or s == 'rejected' then\n"
    "  redis.call('HSET', KEYS[1], p .. 'status', 'in_progress', p .. 'started_at', ARGV[3], 'updated_at', ARGV[3])\n"
    "  if redis.call('HGET', KEYS[1], p .. 'stream') == '1' then ev(ARGV[6], n, 's', nil, ARGV[7], ARGV[8]) end\n"
    "  notify(ARGV[6], n, 'status')\n"
    "end\n"
    "if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end\n"
    "return {n, redis.call('HGETALL', KEYS[1])}\n";

/* Records a turn's outcome once. ARGV: turn, status, response, model, prompt_tokens, completion_tokens,
 * total_tokens, finish_reason, error_code, error_message, now, attempts, ttl, conv, maxlen, evttl. Returns 1
 * stored, 0 already final (or cancelled, deleted), -1 conversation gone (deleted or expired: not resurrected). */
static const char LUA_FINISH[] = LUA_EVENT_FN
    "if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end\n"
    "local p = 't' .. ARGV[1] .. '.'\n"
    "local s = redis.call('HGET', KEYS[1], p .. 'status')\n"
    "if s == 'complete' or s == 'failed' then return 0 end\n"
    "if s == 'cancelled' or s == 'deleted' then return -4 end\n"
    "redis.call('HSET', KEYS[1], p .. 'status', ARGV[2], p .. 'response', ARGV[3], p .. 'model', ARGV[4],\n"
    "  p .. 'prompt_tokens', ARGV[5], p .. 'completion_tokens', ARGV[6], p .. 'total_tokens', ARGV[7],\n"
    "  p .. 'finish_reason', ARGV[8], p .. 'completed_at', ARGV[11], p .. 'attempts', ARGV[12],\n"
    "  'updated_at', ARGV[11])\n"
    "if ARGV[2] == 'failed' then\n"
    "  redis.call('HSET', KEYS[1], p .. 'error_code', ARGV[9], p .. 'error_message', ARGV[10])\n"
    "end\n"
    "if redis.call('HGET', KEYS[1], p .. 'stream') == '1' then ev(ARGV[14], ARGV[1], 'e', nil, ARGV[15], ARGV[16]) "
    "end\n"
    "if tonumber(ARGV[13]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[13]) end\n"
    "notify(ARGV[14], ARGV[1], 'status')\n"
    "return 1\n";

/* Marks turns published, several at once: KEYS[i] is a conversation, ARGV[i] its turn. */
static const char LUA_PUBLISHED[] = "for i = 1, #KEYS do\n"
                                    "  if redis.call('EXISTS', KEYS[i]) == 1 then\n"
                                    "    redis.call('HSET', KEYS[i], 't' .. ARGV[i] .. '.published', '1')\n"
                                    "  end\n"
                                    "end\n"
                                    "return 1\n";

/* A client cancels a turn. ARGV: turn, now, conv, maxlen, evttl. */
static const char LUA_CANCEL[] = LUA_EVENT_FN LUA_STATUS_FN
    "local p = 't' .. ARGV[1] .. '.'\n"
    "local s = status(KEYS[1], p)\n"
    "if not s or s == 'rejected' or s == 'deleted' then return -1 end\n"
    "if s == 'cancelled' then return 0 end\n"
    "if s ~= 'pending' and s ~= 'in_progress' then return -4 end\n"
    "redis.call('HSET', KEYS[1], p .. 'status', 'cancelled', p .. 'completed_at', ARGV[2], 'updated_at', ARGV[2])\n"
    "if redis.call('HGET', KEYS[1], p .. 'stream') == '1' then ev(ARGV[3], ARGV[1], 'e', nil, ARGV[4], ARGV[5]) end\n"
    "notify(ARGV[3], ARGV[1], 'cancel')\n"
    "return 1\n";

/* A client deletes a turn. ARGV: turn, now, conv. */
static const char LUA_DELETE[] =
    LUA_EVENT_FN LUA_STATUS_FN "local p = 't' .. ARGV[1] .. '.'\n"
                               "local s = status(KEYS[1], p)\n"
                               "if not s or s == 'rejected' or s == 'deleted' then return -1 end\n"
                               "redis.call('HSET', KEYS[1], p .. 'status', 'deleted', 'updated_at', ARGV[2])\n"
                               "redis.call('HDEL', KEYS[1], p .. 'response', p .. 'input', p .. 'req', p .. 'prompt')\n"
                               "redis.call('DEL', 'asyncllm:ev:' .. ARGV[3] .. ':' .. ARGV[1])\n"
                               "if s == 'pending' or s == 'in_progress' then notify(ARGV[3], ARGV[1], 'cancel') end\n"
                               "notify(ARGV[3], ARGV[1], 'status')\n"
                               "return 1\n";

/* The conversation and a turn's events after a position. KEYS: conversation, events. ARGV: start, count. */
static const char LUA_EVENTS[] =
    "return {redis.call('HGETALL', KEYS[1]), redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])}\n";

/* A worker's event. ARGV: turn, kind, text, conv, maxlen, evttl. */
static const char LUA_EVENT[] =
    LUA_EVENT_FN "if ARGV[3] == '' then ev(ARGV[4], ARGV[1], ARGV[2], nil, ARGV[5], ARGV[6])\n"
                 "else ev(ARGV[4], ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[6]) end\n"
                 "notify(ARGV[4], ARGV[1], 'events')\n"
                 "return 1\n";

/* Claims an idempotency key. ARGV: ttl. Returns {} when claimed, {value} when taken. */
static const char LUA_IDEM[] = "if redis.call('SET', KEYS[1], 'pending', 'NX', 'EX', ARGV[1]) then return {} end\n"
                               "return {redis.call('GET', KEYS[1])}\n";

/* Moderation: a turn's verdict, stored once. ARGV: turn, verdict ('' only reads). Returns -1 when the conversation
 * is gone, else {1 stored now | 0, the verdict ('' if none), 1 if its message was acknowledged | 0}. */
static const char LUA_MODERATION[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end\n"
    "local p = 't' .. ARGV[1] .. '.'\n"
    "local v = redis.call('HGET', KEYS[1], p .. 'moderation')\n"
    "if v then\n"
    "  return {0, v, redis.call('HGET', KEYS[1], p .. 'moderation_published') and 1 or 0}\n"
    "end\n"
    "if ARGV[2] == '' then return {0, '', 0} end\n"
    "redis.call('HSET', KEYS[1], p .. 'moderation', ARGV[2])\n"
    "return {1, ARGV[2], 0}\n";

/* Moderation: the verdict's message was acknowledged. ARGV: turn. */
static const char LUA_MODERATION_PUBLISHED[] =
    "if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end\n"
    "redis.call('HSET', KEYS[1], 't' .. ARGV[1] .. '.moderation_published', '1')\n"
    "return 1\n";

/* Parties' markers. ARGV: ttl (0: none). */
static const char LUA_MARKER_SET[] = "if tonumber(ARGV[1]) > 0 then redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])\n"
                                     "else redis.call('SET', KEYS[1], '1') end\n"
                                     "return 1\n";
static const char LUA_MARKER_TEST[] = "return redis.call('EXISTS', KEYS[1])\n";

/* The scripts are loaded on every (re)connection (SCRIPT LOAD, pipelined before any other command) and run by
 * their SHA-1 (EVALSHA): Redis then neither receives nor hashes a script's text on every call. */
static struct script {
    const char *text;
    size_t len;
    char sha[41];
} scripts[] = {
#define SCRIPT(x)                                                                                                      \
    {                                                                                                                  \
        x, sizeof x - 1, ""                                                                                            \
    }
    SCRIPT(LUA_SUBMIT),     SCRIPT(LUA_REJECT),      SCRIPT(LUA_BEGIN),      SCRIPT(LUA_FINISH),
    SCRIPT(LUA_PUBLISHED),  SCRIPT(LUA_CANCEL),      SCRIPT(LUA_DELETE),     SCRIPT(LUA_EVENTS),
    SCRIPT(LUA_EVENT),      SCRIPT(LUA_IDEM),        SCRIPT(LUA_MODERATION), SCRIPT(LUA_MODERATION_PUBLISHED),
    SCRIPT(LUA_MARKER_SET), SCRIPT(LUA_MARKER_TEST),
#undef SCRIPT
};
static pthread_once_t scripts_once = PTHREAD_ONCE_INIT;

static void scripts_hash(void)
{
    for (size_t i = 0; i < sizeof scripts / sizeof scripts[0]; i++) {
        unsigned char md[SHA_DIGEST_LENGTH];
        SHA1((const unsigned char *)scripts[i].text, scripts[i].len, md);
        for (int k = 0; k < SHA_DIGEST_LENGTH; k++)
            snprintf(scripts[i].sha + 2 * k, 3, "%02x", md[k]);
    }
}

/* The SHA-1 of one of our scripts, or NULL for a text that is not one (it is then sent whole, with EVAL). */
static const char *script_sha(const char *text)
{
    for (size_t i = 0; i < sizeof scripts / sizeof scripts[0]; i++)
        if (scripts[i].text == text)
            return scripts[i].sha;
    return NULL;
}

enum op_kind {
    OP_SUBMIT,
    OP_REJECT,
    OP_LOAD,
    OP_BEGIN,
    OP_FINISH,
    OP_PUBLISHED,
    OP_RC, /* cancel, delete */
    OP_EVENTS,
    OP_EVENT,
    OP_IDEM,
    OP_IDEM_SET,
    OP_VERDICT,
};

struct store {
    struct event_base *base;
    const struct config *cfg;
    redisAsyncContext *ac; /* NULL while disconnected */
    bool connected;        /* ac is connected and our scripts are loaded on it: operations may be written */
    int scripts_waiting;   /* SCRIPT LOAD replies still awaited on ac */
    bool scripts_failed;   /* one of them was an error: ac is closed once all have come */
    bool closing;
    struct event *reconnect_ev;
    int reconnect_ms;
    int pending;             /* operations written and not answered (in sent): at most STORE_WINDOW */
    uint64_t obuf_in;        /* bytes handed to this connection's output buffer (hiredis' obuf), see sock_taken */
    size_t nqueued;          /* operations in queued */
    TAILQ_HEAD(, op) sent;   /* written, in write order (= reply order): the head is the oldest */
    TAILQ_HEAD(, op) queued; /* waiting for the window, in call order */
    struct event *check_ev;  /* the oldest written command's deadline (see the top of this file) */
    bool check_armed;        /* check_ev is pending */
    bool overflowed;         /* the queue reached STORE_QUEUE_MAX (logged once until it empties) */
    uint64_t timeouts;       /* connections dropped because Redis stopped answering */
    /* Script calls answered NOSCRIPT (Redis lost its script cache: SCRIPT FLUSH, a failover), in reply order, to
     * be written again ahead of everything queued once every operation written before is answered (stalled
     * until then: nothing new is written). See noscript_retry. */
    TAILQ_HEAD(, op) retry;
    size_t nretry;
    bool stalled;
    uint64_t noscript_retries; /* operations written again after NOSCRIPT */
    struct buf scratch;        /* for formatting commands */
    /* settings every script call sends, formatted once */
    char num_ttl[24], num_maxlen[24], num_evttl[24];
    /* Rejections (store_reject) that could not be written: Redis was down. Written again once it is back, so
     * that a turn whose client got a 503 does not stay "pending". */
    struct reject *rejects;
    size_t nrejects;
    struct event *reject_ev;
    long reject_delay_ms; /* until the next round of rejections while Redis refuses them: doubles up to a cap */
    bool rejects_failing; /* a rejection failed and none has been written since (logged once until then) */
    /* Published marks are sent in batches, one script call per loop iteration (or per PUBMARKS_MAX): a script
     * call costs Redis about as much again as the commands it runs. */
    struct pubmark *marks;
    size_t nmarks;
    struct event *marks_ev;
};

/* A published mark waiting for the batch of its loop iteration (store_mark_published). */
struct pubmark {
    char key[96];
    char turn[24];
};

#define PUBMARKS_MAX 256 /* marks per script call */

#define PROMPT_HEAD 32 /* bytes of a lost submit's prompt kept to find its turn (LUA_REJECT, turn 0) */

/* What finds a turn whose submit's outcome is unknown (turn 0 in a rejection). */
struct lost_submit {
    int64_t submitted_at;
    size_t prompt_len;
    size_t head_len;
    char head[PROMPT_HEAD];
};

struct reject {
    struct reject *next;
    long turn;
    bool is_new;
    struct lost_submit lost; /* turn 0 */
    char conv_id[72];
};

#define REJECTS_MAX 100000
#define REJECT_RETRY_MS 500
#define REJECT_RETRY_MAX_MS 30000

static void reject_retry_cb(evutil_socket_t fd, short what, void *arg);
static void marks_cb(evutil_socket_t fd, short what, void *arg);
static void marks_flush(struct store *st);

struct op {
    TAILQ_ENTRY(op) link; /* in st->queued, then in st->sent */
    struct store *st;
    enum op_kind kind;
    bool is_new;          /* OP_REJECT */
    bool plain;           /* OP_SUBMIT of submit_new_plain: its reply is EXPIRE's (HSET's without a TTL) */
    bool evalsha;         /* a script call by SHA-1: NOSCRIPT is answered by writing it again (cmd is kept) */
    int noscript_tries;   /* times it was written again after NOSCRIPT */
    int npieces;          /* commands in cmd: 1, or the plain submit's 2 */
    int64_t sent_at;      /* mono_ms() when written, or when the timeout check last gave it a fresh timeout */
    uint64_t stream_mark; /* what the socket had taken (sock_taken) when its clock (sent_at) started */
    /* The command(s) in RESP (owned), piece i ending at ends[i]: while queued, and for a script call (evalsha)
     * until it is answered. NULL once written otherwise. */
    char *cmd;
    size_t ends[CMD_PIECES_MAX];
    void *arg;
    union {
        store_submit_cb *submit;
        store_conv_cb *conv;
        store_begin_cb *begin;
        store_done_cb *done;
        store_rc_cb *rc;
        store_events_cb *events;
        store_idem_cb *idem;
        store_verdict_cb *verdict;
    } cb;
    long turn;
    struct lost_submit lost; /* OP_SUBMIT; OP_REJECT of turn 0 */
    char conv_id[72];
};

static void store_connect(struct store *st);
static void queue_fail(struct store *st);
static void op_reply_cb(redisAsyncContext *ac, void *r, void *privdata);
static void reject_later(struct store *st, const struct op *op, const char *why);
static void check_cb(evutil_socket_t fd, short what, void *arg);
static void check_arm(struct store *st, int64_t ms);

const char *turn_status_name(enum turn_status s)
{
    switch (s) {
    case TURN_PENDING:
        return "pending";
    case TURN_IN_PROGRESS:
        return "in_progress";
    case TURN_COMPLETE:
        return "complete";
    case TURN_FAILED:
        return "failed";
    case TURN_REJECTED:
        return "rejected";
    case TURN_CANCELLED:
        return "cancelled";
    case TURN_DELETED:
        return "deleted";
    case TURN_NONE:
        break;
    }
    return "none";
}

static enum turn_status parse_status(const char *s)
{
    if (strcmp(s, "pending") == 0)
        return TURN_PENDING;
    if (strcmp(s, "in_progress") == 0)
        return TURN_IN_PROGRESS;
    if (strcmp(s, "complete") == 0)
        return TURN_COMPLETE;
    if (strcmp(s, "failed") == 0)
        return TURN_FAILED;
    if (strcmp(s, "rejected") == 0)
        return TURN_REJECTED;
    if (strcmp(s, "cancelled") == 0)
        return TURN_CANCELLED;
    if (strcmp(s, "deleted") == 0)
        return TURN_DELETED;
    return TURN_NONE;
}

bool turn_status_final(enum turn_status s)
{
    return s == TURN_COMPLETE || s == TURN_FAILED || s == TURN_CANCELLED;
}

long conv_current_turn(const struct conv *conv)
{
    for (long n = conv->nturns; n >= 1; n--)
        if (conv->turn[n].status != TURN_REJECTED && conv->turn[n].status != TURN_NONE &&
            conv->turn[n].status != TURN_DELETED)
            return n;
    return 0;
}

/* ---------------------------------------------------------------- connection */

static void schedule_reconnect(struct store *st)
{
    if (st->closing || evtimer_pending(st->reconnect_ev, NULL))
        return;
    struct timeval tv = {st->reconnect_ms / 1000, (st->reconnect_ms % 1000) * 1000};
    evtimer_add(st->reconnect_ev, &tv);
    st->reconnect_ms = st->reconnect_ms * 2 > RECONNECT_MAX_MS ? RECONNECT_MAX_MS : st->reconnect_ms * 2;
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct store *st = ac->data;
    if (status != REDIS_OK) {
        log_warn("redis: cannot connect to %s:%ld: %s", st->cfg->redis_host, st->cfg->redis_port, ac->errstr);
        st->ac = NULL; /* hiredis frees the context after this callback */
        schedule_reconnect(st);
        return;
    }
    /* ready once the scripts are loaded (script_load_cb) */
    log_debug("redis: connected to %s:%ld, loading scripts", st->cfg->redis_host, st->cfg->redis_port);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    struct store *st = ac->data;
    if (!st->closing && (st->connected || !st->scripts_failed)) /* else script_load_cb said why */
        log_warn("redis: disconnected%s%s", status == REDIS_OK ? "" : ": ", status == REDIS_OK ? "" : ac->errstr);
    st->ac = NULL;
    st->connected = false;
    /* hiredis has answered every written operation (NULL replies); the queued ones follow, in call order */
    queue_fail(st);
    schedule_reconnect(st);
}

static void reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    store_connect(arg);
}

/* The connection is ready once every script is loaded. Without them it is useless: every call would answer
 * NOSCRIPT until the next reconnection. A Redis that is still loading its data set when we connect (after a
 * restart) answers -LOADING to everything: such a connection is closed and made again with the growing delay,
 * until Redis takes the scripts. It used to be taken as ready: the operations written meanwhile failed, a
 * rejection (store_reject) with an error reply was lost, and once Redis was loaded every script call answered
 * NOSCRIPT. */
static void script_load_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    (void)privdata;
    struct store *st = ac->data;
    redisReply *reply = r;
    if (!reply)
        return; /* the connection is gone; on_disconnect reconnects */
    if (reply->type == REDIS_REPLY_ERROR && !st->scripts_failed) {
        st->scripts_failed = true;
        log_warn("redis: SCRIPT LOAD failed: %s; connecting again", reply->str);
    }
    if (--st->scripts_waiting > 0)
        return;
    if (st->scripts_failed) {
        redisAsyncDisconnect(ac); /* once this callback returns (no other reply is awaited): on_disconnect */
        return;
    }
    log_info("redis: connected to %s:%ld", st->cfg->redis_host, st->cfg->redis_port);
    st->connected = true;
    st->reconnect_ms = RECONNECT_MIN_MS;
}

static void auth_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    (void)ac;
    (void)privdata;
    redisReply *reply = r;
    if (reply && reply->type == REDIS_REPLY_ERROR)
        log_error("redis: AUTH failed: %s", reply->str);
}

static void store_connect(struct store *st)
{
    redisAsyncContext *ac = redisAsyncConnect(st->cfg->redis_host, (int)st->cfg->redis_port);
    if (!ac || ac->err) {
        log_warn("redis: connect: %s", ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        schedule_reconnect(st);
        return;
    }
    ac->data = st;
    reply_arena_use(ac->c.reader); /* replies in one arena each, not an allocation per object */
    hiev_attach(ac, st->base);
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    st->ac = ac;
    if (st->cfg->redis_password[0])
        redisAsyncCommand(ac, auth_cb, NULL, "AUTH %s", st->cfg->redis_password);
    st->scripts_waiting = (int)(sizeof scripts / sizeof scripts[0]);
    st->scripts_failed = false;
    for (size_t i = 0; i < sizeof scripts / sizeof scripts[0]; i++) {
        const char *argv[] = {"SCRIPT", "LOAD", scripts[i].text};
        size_t lens[] = {6, 4, scripts[i].len};
        redisAsyncCommandArgv(ac, script_load_cb, NULL, 3, argv, lens);
    }
    st->obuf_in = sdslen(ac->c.obuf);         /* a new byte stream: nothing written yet */
    check_arm(st, st->cfg->redis_timeout_ms); /* the connection and its scripts have a deadline too (check_cb) */
}

struct store *store_new(struct event_base *base, const struct config *cfg)
{
    pthread_once(&scripts_once, scripts_hash);
    struct store *st = xcalloc(1, sizeof *st);
    st->base = base;
    TAILQ_INIT(&st->sent);
    TAILQ_INIT(&st->queued);
    TAILQ_INIT(&st->retry);
    st->check_ev = evtimer_new(base, check_cb, st);
    fmt_i64(st->num_ttl, cfg->conversation_ttl_s);
    fmt_i64(st->num_maxlen, cfg->stream_max_events);
    fmt_i64(st->num_evttl, cfg->stream_ttl_s);
    buf_init(&st->scratch, SIZE_MAX / 2);
    st->cfg = cfg;
    st->reconnect_ms = RECONNECT_MIN_MS;
    st->reconnect_ev = evtimer_new(base, reconnect_cb, st);
    st->reject_ev = evtimer_new(base, reject_retry_cb, st);
    st->reject_delay_ms = REJECT_RETRY_MS;
    st->marks_ev = event_new(base, -1, 0, marks_cb, st);
    store_connect(st);
    return st;
}

void store_free(struct store *st)
{
    if (!st)
        return;
    st->closing = true;
    if (st->ac)
        redisAsyncFree(st->ac); /* answers written commands with NULL replies, then queued ones (on_disconnect) */
    queue_fail(st);             /* in case the connection never came up */
    event_free(st->check_ev);
    event_free(st->reconnect_ev);
    event_free(st->reject_ev);
    event_free(st->marks_ev);
    free(st->marks);
    if (st->nrejects)
        log_warn("redis: %zu turn(s) answered 503 could not be marked rejected before exit: they stay pending",
                 st->nrejects);
    while (st->rejects) {
        struct reject *rj = st->rejects;
        st->rejects = rj->next;
        free(rj);
    }
    buf_free(&st->scratch);
    free(st);
}

bool store_connected(const struct store *st)
{
    return st->connected;
}

void store_metrics(const struct store *st, struct evbuffer *out)
{
    metric_gauge(out, "asyncllm_redis_commands_written", "store operations written to Redis and not answered",
                 (double)st->pending);
    metric_gauge(out, "asyncllm_redis_commands_queued",
                 "store operations waiting for room on the Redis connection (at most " STR(STORE_WINDOW) " written)",
                 (double)st->nqueued);
    metric_counter(out, "asyncllm_redis_timeouts_total",
                   "Redis connections dropped because the oldest command went unanswered for --redis-timeout-ms",
                   (double)st->timeouts);
    metric_counter(out, "asyncllm_redis_noscript_retries_total",
                   "script calls written again after Redis answered NOSCRIPT (its script cache was emptied)",
                   (double)st->noscript_retries);
}

void store_drain(struct store *st, int timeout_ms)
{
    int64_t deadline = mono_ms() + timeout_ms;
    marks_flush(st);
    while ((st->pending > 0 || st->nqueued > 0 || st->nretry > 0) && st->ac && mono_ms() < deadline)
        event_base_loop(st->base, EVLOOP_ONCE);
    if (st->pending > 0 || st->nqueued > 0 || st->nretry > 0)
        log_warn("redis: %d command(s) unanswered and %zu not written at shutdown", st->pending,
                 st->nqueued + st->nretry);
}

/* ---------------------------------------------------------------- operations */

static void op_answer_error(struct op *op, int rc)
{
    switch (op->kind) {
    case OP_SUBMIT:
        op->cb.submit(op->arg, rc, 0);
        break;
    case OP_LOAD:
        op->cb.conv(op->arg, rc, NULL);
        break;
    case OP_BEGIN:
        op->cb.begin(op->arg, rc, 0, NULL);
        break;
    case OP_FINISH:
        op->cb.done(op->arg, rc, false);
        break;
    case OP_RC:
        op->cb.rc(op->arg, rc);
        break;
    case OP_EVENTS:
        op->cb.events(op->arg, rc, NULL, NULL, 0);
        break;
    case OP_IDEM:
        op->cb.idem(op->arg, rc, NULL);
        break;
    case OP_VERDICT:
        op->cb.verdict(op->arg, rc, false, NULL, false);
        break;
    default:
        break;
    }
}

static bool has_callback(const struct op *op)
{
    return op->kind == OP_SUBMIT || op->kind == OP_LOAD || op->kind == OP_BEGIN || op->kind == OP_FINISH ||
           op->kind == OP_RC || op->kind == OP_EVENTS || op->kind == OP_IDEM || op->kind == OP_VERDICT;
}

static void op_free(struct op *op)
{
    free(op->cmd);
    free(op);
}

/* An operation that cannot be written (Redis down, or the queue full) answers STORE_EUNAVAILABLE; a rejection
 * waits for Redis instead. */
static void op_fail(struct store *st, struct op *op)
{
    if (op->kind == OP_REJECT)
        reject_later(st, op, "Redis unavailable");
    if (has_callback(op))
        op_answer_error(op, STORE_EUNAVAILABLE);
    op_free(op);
}

/* hiredis takes commands: connected, and not being torn down (it would refuse them). */
static bool writable(const struct store *st)
{
    return st->ac && st->connected && !(st->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING));
}

/* Bytes of the connection's stream the socket has taken: those handed to hiredis' output buffer less those still
 * in it (hiredis removes what write() took from the buffer's front). */
static uint64_t sock_taken(const struct store *st)
{
    return st->obuf_in - sdslen(st->ac->c.obuf);
}

static void check_arm(struct store *st, int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(st->check_ev, &tv);
    st->check_armed = true;
}

/* The reply to a piece of an operation other than its last (the plain submit's HSET): nobody waits for it, but
 * an error is worth a line (the last piece's reply tells the operation's caller the outcome). */
static void piece_reply_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    (void)ac;
    (void)privdata;
    const redisReply *reply = r;
    if (reply && reply->type == REDIS_REPLY_ERROR)
        log_error("redis: %s", reply->str);
}

/* Hands op's command(s), cmd with piece i ending at ends[i], to hiredis; the last piece carries op's callback,
 * the others piece_reply_cb. Returns -1 if hiredis refused. */
static int op_write(struct store *st, struct op *op, const char *cmd, const size_t *ends, int npieces)
{
    size_t before = sdslen(st->ac->c.obuf);
    size_t from = 0;
    for (int i = 0; i < npieces; i++) {
        bool last = i == npieces - 1;
        int rc = redisAsyncFormattedCommand(st->ac, last ? op_reply_cb : piece_reply_cb, last ? op : NULL, cmd + from,
                                            ends[i] - from);
        if (rc != REDIS_OK)
            return -1; /* the context is being torn down: its byte count no longer matters */
        from = ends[i];
    }
    st->obuf_in += sdslen(st->ac->c.obuf) - before; /* hiredis appends here; it writes from the loop only */
    op->stream_mark = sock_taken(st);
    st->pending++;
    op->sent_at = mono_ms();
    TAILQ_INSERT_TAIL(&st->sent, op, link);
    if (!st->check_armed)
        check_arm(st, st->cfg->redis_timeout_ms);
    return 0;
}

/* A copy of op's command(s) in op->cmd. */
static void op_keep_cmd(struct op *op, const char *cmd, const size_t *ends, int npieces)
{
    size_t len = ends[npieces - 1];
    op->cmd = xmalloc(len);
    memcpy(op->cmd, cmd, len);
    memcpy(op->ends, ends, (size_t)npieces * sizeof *ends);
    op->npieces = npieces;
}

/* Sends op's command(s) (see op_write): written now if the window has room and nothing waits (queued, or
 * stalled for NOSCRIPT retries), else queued behind the operations waiting (a copy of cmd is kept, as it is
 * for a script call written at once: see noscript_retry). Answers STORE_EUNAVAILABLE at once if Redis is down
 * or the queue is full. Takes op. */
static void op_submit(struct store *st, struct op *op, const char *cmd, const size_t *ends, int npieces)
{
    assert(npieces >= 1 && npieces <= CMD_PIECES_MAX);
    op->st = st;
    if (!st->ac || !st->connected) {
        op_fail(st, op);
        return;
    }
    if (TAILQ_EMPTY(&st->queued) && !st->stalled && st->pending < STORE_WINDOW) {
        if (op_write(st, op, cmd, ends, npieces)) {
            op_fail(st, op); /* the context is being torn down */
            return;
        }
        if (op->evalsha) /* kept until answered, for NOSCRIPT */
            op_keep_cmd(op, cmd, ends, npieces);
        return;
    }
    if (st->nqueued >= STORE_QUEUE_MAX) {
        if (!st->overflowed)
            log_error("redis: %zu operations wait for the connection already: failing new ones until the queue "
                      "empties",
                      st->nqueued);
        st->overflowed = true;
        op_fail(st, op);
        return;
    }
    op_keep_cmd(op, cmd, ends, npieces);
    TAILQ_INSERT_TAIL(&st->queued, op, link);
    st->nqueued++;
}

/* Writes queued operations while the window has room (none while stalled for NOSCRIPT retries). */
static void queue_pump(struct store *st)
{
    while (st->pending < STORE_WINDOW && !TAILQ_EMPTY(&st->queued) && !st->stalled && writable(st)) {
        struct op *op = TAILQ_FIRST(&st->queued);
        TAILQ_REMOVE(&st->queued, op, link);
        st->nqueued--;
        if (op_write(st, op, op->cmd, op->ends, op->npieces)) {
            op_fail(st, op);
            continue;
        }
        if (!op->evalsha) { /* a script call keeps its command until answered (NOSCRIPT) */
            free(op->cmd);
            op->cmd = NULL;
        }
    }
    if (st->nqueued == 0)
        st->overflowed = false;
}

/* Fails every operation waiting to be written again after NOSCRIPT, then every queued one, in call order (the
 * connection is gone). One that a callback issues meanwhile fails at once (not connected) rather than joining
 * the queue. */
static void queue_fail(struct store *st)
{
    struct op *op;
    st->stalled = false;
    while ((op = TAILQ_FIRST(&st->retry))) {
        TAILQ_REMOVE(&st->retry, op, link);
        st->nretry--;
        op_fail(st, op);
    }
    while ((op = TAILQ_FIRST(&st->queued))) {
        TAILQ_REMOVE(&st->queued, op, link);
        st->nqueued--;
        op_fail(st, op);
    }
    st->overflowed = false;
}

/* Drops the connection of a Redis that stopped answering and reconnects later. Answers every written command,
 * then (on_disconnect) every queued one. Not redisAsyncDisconnect(), which would wait for the replies of a server
 * that stopped answering. */
static void conn_drop(struct store *st)
{
    redisAsyncContext *ac = st->ac;
    st->ac = NULL;
    st->connected = false;
    redisAsyncFree(ac);
    queue_fail(st);
    schedule_reconnect(st);
}

/* The oldest written command's deadline: rearmed for the new oldest one while Redis answers, else drops the
 * connection (see the top of this file). */
static void check_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store *st = arg;
    st->check_armed = false;
    if (st->ac && !st->connected) {
        /* Armed by store_connect: no operation is written before the scripts are loaded, so this deadline is the
         * connection's own (a Redis that accepts the connection and stops there would otherwise keep it). */
        log_warn("redis: not ready %ld ms after connecting (SCRIPT LOAD unanswered); connecting again",
                 st->cfg->redis_timeout_ms);
        conn_drop(st);
        return;
    }
    struct op *head = TAILQ_FIRST(&st->sent);
    if (!head)
        return; /* armed again by the next write */
    int64_t age = mono_ms() - head->sent_at;
    if (age >= st->cfg->redis_timeout_ms && writable(st)) {
        /* The loop may have been busy with other work while the replies arrived: read what is there before
         * judging (libevent may run this timer before the socket's read event in the same iteration). One
         * read takes at most 16 KiB (hiredis): go on while more has arrived and the oldest is still unanswered. */
        int avail;
        do {
            hiev_read(st->ac);
            head = TAILQ_FIRST(&st->sent);
            if (!head)
                return;
            age = mono_ms() - head->sent_at;
            avail = 0;
        } while (age >= st->cfg->redis_timeout_ms && writable(st) && ioctl(st->ac->c.fd, FIONREAD, &avail) == 0 &&
                 avail > 0);
    }
    if (age >= st->cfg->redis_timeout_ms && writable(st) && sdslen(st->ac->c.obuf) > 0) {
        /* Commands are still in hiredis' output buffer: our loop was too busy to send them, or the socket
         * buffers are full while Redis works through a large backlog. Redis cannot be blamed for what it was
         * not sent, and the oldest command's clock started when it joined that buffer, behind whatever was
         * ahead of it. Send what the socket takes now; if it took anything since the command's clock started,
         * the command gets a full timeout from now. If it took nothing, Redis has stopped reading (its socket
         * buffer and ours are full): that is Redis being down, and granting the timeout again would keep the
         * connection, and every operation on it, forever. */
        redisAsyncHandleWrite(st->ac); /* a failure drops the connection: nothing is left in sent */
        head = TAILQ_FIRST(&st->sent);
        if (!head)
            return;
        if (writable(st) && sock_taken(st) > head->stream_mark) {
            head->sent_at = mono_ms();
            head->stream_mark = sock_taken(st);
            check_arm(st, st->cfg->redis_timeout_ms);
            return;
        }
    }
    if (age < st->cfg->redis_timeout_ms) {
        /* even if armed: a write from a reply callback above armed it for a full timeout, not this deadline */
        check_arm(st, st->cfg->redis_timeout_ms - age);
        return;
    }
    if (!st->ac)
        return; /* already dropped (the read above found the connection closed) */
    log_warn("redis: command timed out after %ld ms; dropping the connection (%d written, %zu queued)",
             st->cfg->redis_timeout_ms, st->pending, st->nqueued);
    st->timeouts++;
    conn_drop(st);
}

/* A decimal integer as the scripts store them (an optional '-', digits; stops at anything else), saturating like
 * strtol. Written out because strtol's locale and base handling were a visible share of a poll. */
static long parse_long(const char *s, size_t len)
{
    size_t i = 0;
    bool neg = len > 0 && s[0] == '-';
    i += neg;
    unsigned long v = 0, lim = neg ? (unsigned long)LONG_MAX + 1 : (unsigned long)LONG_MAX;
    /* up to 18 digits cannot overflow: no division per digit (timestamps have 13, and a poll parses several) */
    size_t fast = len - i < 18 ? len : i + 18;
    for (; i < fast && s[i] >= '0' && s[i] <= '9'; i++)
        v = v * 10 + (unsigned)(s[i] - '0');
    for (; i < len && s[i] >= '0' && s[i] <= '9'; i++) {
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (lim - d) / 10)
            return neg ? LONG_MIN : LONG_MAX;
        v = v * 10 + d;
    }
    return neg ? (long)(0 - v) : (long)v; /* 0 - v of LONG_MAX + 1 is LONG_MIN's bits */
}

/* The per-turn fields (t<n>.<name>) and where each goes in struct turn: conv_parse looks a field up by length
 * first, so most fields cost one memcmp. */
enum tf_kind { TF_STATUS, TF_STR, TF_TEXT, TF_LONG, TF_I64, TF_FLAG };

static const struct turn_field {
    const char *name;
    size_t len;
    enum tf_kind kind;
    size_t off, len_off; /* of the member in struct turn; len_off: its length (TF_TEXT) */
} turn_fields[] = {
#define TF(name, kind, member)                                                                                         \
    {                                                                                                                  \
        name, sizeof name - 1, kind, offsetof(struct turn, member), 0                                                  \
    }
    TF("status", TF_STATUS, status),
    {"prompt", 6, TF_TEXT, offsetof(struct turn, prompt), offsetof(struct turn, prompt_len)},
    {"response", 8, TF_TEXT, offsetof(struct turn, response), offsetof(struct turn, response_len)},
    TF("model", TF_STR, model),
    TF("finish_reason", TF_STR, finish_reason),
    TF("error_code", TF_STR, error_code),
    TF("error_message", TF_STR, error_message),
    TF("prompt_tokens", TF_LONG, prompt_tokens),
    TF("completion_tokens", TF_LONG, completion_tokens),
    TF("total_tokens", TF_LONG, total_tokens),
    TF("attempts", TF_LONG, attempts),
    TF("submitted_at", TF_I64, submitted_at),
    TF("completed_at", TF_I64, completed_at),
    TF("started_at", TF_I64, started_at),
    TF("published", TF_FLAG, published),
    TF("moderation", TF_STR, moderation),
    TF("stream", TF_FLAG, stream),
    TF("req", TF_STR, req),
    TF("input", TF_STR, input),
#undef TF
};

#define TURN_FIELDS (sizeof turn_fields / sizeof turn_fields[0])
#define FIELD_LEN_MAX 24 /* longer than every name in turn_fields */
#define SAME_LEN_MAX 4   /* names of one length, at most */

/* turn_fields' indexes by name length, each list ended by -1: a field is found in at most 3 comparisons rather
 * than a scan of the table (a complete poll sets about 12 turn fields). */
static int8_t field_by_len[FIELD_LEN_MAX][SAME_LEN_MAX + 1];
static pthread_once_t field_by_len_once = PTHREAD_ONCE_INIT;

static void field_by_len_init(void)
{
    memset(field_by_len, -1, sizeof field_by_len);
    for (size_t i = 0; i < TURN_FIELDS; i++) {
        size_t len = turn_fields[i].len, k = 0;
        assert(len < FIELD_LEN_MAX);
        while (field_by_len[len][k] >= 0)
            k++;
        assert(k < SAME_LEN_MAX);
        field_by_len[len][k] = (int8_t)i;
    }
}

/* Sets turn field f[0..flen) of t from v (strings point into the reply); other fields are ignored. */
static void turn_set(struct turn *t, const char *f, size_t flen, const redisReply *v)
{
    if (flen >= FIELD_LEN_MAX)
        return;
    for (const int8_t *ix = field_by_len[flen]; *ix >= 0; ix++) {
        const struct turn_field *tf = &turn_fields[*ix];
        if (memcmp(tf->name, f, flen) != 0)
            continue;
        char *m = (char *)t + tf->off;
        switch (tf->kind) {
        case TF_STATUS:
            t->status = parse_status(v->str);
            break;
        case TF_TEXT:
            *(size_t *)((char *)t + tf->len_off) = v->len;
            /* fall through */
        case TF_STR:
            *(const char **)m = v->str;
            break;
        case TF_LONG:
            *(long *)m = parse_long(v->str, v->len);
            break;
        case TF_I64:
            *(int64_t *)m = parse_long(v->str, v->len);
            break;
        case TF_FLAG:
            *(bool *)m = true;
            break;
        }
        return;
    }
}

#define FIELD_IS(k, lit) ((k)->len == sizeof(lit) - 1 && memcmp((k)->str, lit, sizeof(lit) - 1) == 0)

/* Sets a conversation-level field (turns is read beforehand). */
static void conv_set(struct conv *conv, const redisReply *k, const redisReply *v)
{
    if (FIELD_IS(k, "created_at"))
        conv->created_at = parse_long(v->str, v->len);
    else if (FIELD_IS(k, "updated_at"))
        conv->updated_at = parse_long(v->str, v->len);
}

#define CONV_TURNS_INLINE 4 /* turn arrays (turns + 1 entries) this small live in the caller's frame */

/* Builds a struct conv over an HGETALL reply (strings point into the reply). Its turn array is small (the caller's,
 * CONV_TURNS_INLINE entries) when that holds it, else allocated: conv_done frees it. Returns -1 on a malformed
 * reply. */
static int conv_parse(struct conv *conv, const char *id, const redisReply *r, struct turn *small)
{
    memset(conv, 0, sizeof *conv);
    conv->id = id;
    if (r->type != REDIS_REPLY_ARRAY || r->elements % 2)
        return -1;
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        if (r->element[i]->type == REDIS_REPLY_STRING && FIELD_IS(r->element[i], "turns"))
            conv->nturns = parse_long(r->element[i + 1]->str, r->element[i + 1]->len);
    }
    if (conv->nturns < 0 || conv->nturns > 1000000)
        return -1;
    if (conv->nturns + 1 <= CONV_TURNS_INLINE) { /* most conversations: no allocation per poll */
        memset(small, 0, ((size_t)conv->nturns + 1) * sizeof *small);
        conv->turn = small;
    } else {
        conv->turn = xcalloc((size_t)conv->nturns + 1, sizeof *conv->turn);
    }
    pthread_once(&field_by_len_once, field_by_len_init);
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *k = r->element[i], *v = r->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        if (k->str[0] != 't' || k->len < 2 || k->str[1] < '0' || k->str[1] > '9') {
            conv_set(conv, k, v);
            continue;
        }
        long n = 0;
        size_t j = 1;
        for (; j < k->len && k->str[j] >= '0' && k->str[j] <= '9' && n <= conv->nturns; j++)
            n = n * 10 + (k->str[j] - '0');
        if (j >= k->len || k->str[j] != '.' || n < 1 || n > conv->nturns)
            continue;
        turn_set(&conv->turn[n], k->str + j + 1, k->len - j - 1, v);
    }
    /* What submit_new_plain leaves out: a stored prompt without a status is pending, and a conversation
     * nothing has changed since is as new as it was created. */
    for (long n = 1; n <= conv->nturns; n++)
        if (conv->turn[n].status == TURN_NONE && conv->turn[n].prompt)
            conv->turn[n].status = TURN_PENDING;
    if (!conv->updated_at)
        conv->updated_at = conv->created_at;
    return 0;
}

static void conv_done(struct conv *conv, const struct turn *small)
{
    if (conv->turn != small)
        free(conv->turn);
    conv->turn = NULL;
}

/* {HGETALL, XRANGE} -> conversation and events. */
static void events_reply(struct op *op, const redisReply *reply)
{
    struct conv conv = {0};
    struct turn small[CONV_TURNS_INLINE];
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
        conv_parse(&conv, op->conv_id, reply->element[0], small)) {
        op->cb.events(op->arg, STORE_EUNAVAILABLE, NULL, NULL, 0);
        conv_done(&conv, small);
        return;
    }
    if (reply->element[0]->elements == 0) {
        op->cb.events(op->arg, STORE_ENOTFOUND, NULL, NULL, 0);
        conv_done(&conv, small);
        return;
    }
    const redisReply *xr = reply->element[1];
    size_t n = xr->type == REDIS_REPLY_ARRAY ? xr->elements : 0;
    struct turn_event *evs = xcalloc(n ? n : 1, sizeof *evs);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const redisReply *e = xr->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        const char *dash = strchr(e->element[0]->str, '-');
        struct turn_event *te = &evs[k];
        te->seq = dash ? strtol(dash + 1, NULL, 10) : 0;
        te->text = "";
        const redisReply *f = e->element[1];
        for (size_t j = 0; f->type == REDIS_REPLY_ARRAY && j + 1 < f->elements; j += 2) {
            const redisReply *fk = f->element[j], *fv = f->element[j + 1];
            if (fk->type != REDIS_REPLY_STRING || fv->type != REDIS_REPLY_STRING)
                continue;
            if (strcmp(fk->str, "k") == 0)
                te->kind = fv->str[0];
            else if (strcmp(fk->str, "t") == 0) {
                te->text = fv->str;
                te->text_len = fv->len;
            }
        }
        if (te->kind)
            k++;
    }
    op->cb.events(op->arg, STORE_OK, &conv, evs, k);
    free(evs);
    conv_done(&conv, small);
}

/* -1 or {is_new, verdict, published} -> the verdict callback. */
static void verdict_reply(struct op *op, const redisReply *reply)
{
    if (reply->type == REDIS_REPLY_INTEGER && reply->integer == -1) {
        op->cb.verdict(op->arg, STORE_ENOTFOUND, false, NULL, false);
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3 || reply->element[0]->type != REDIS_REPLY_INTEGER ||
        reply->element[1]->type != REDIS_REPLY_STRING || reply->element[2]->type != REDIS_REPLY_INTEGER) {
        op->cb.verdict(op->arg, STORE_EUNAVAILABLE, false, NULL, false);
        return;
    }
    const char *v = reply->element[1]->len ? reply->element[1]->str : NULL;
    op->cb.verdict(op->arg, STORE_OK, reply->element[0]->integer == 1, v, reply->element[2]->integer == 1);
}

/* ------------------------------------------------------------ NOSCRIPT
 *
 * Redis can lose its script cache while our connection stays up: SCRIPT FLUSH, a failover to a replica that
 * never ran SCRIPT LOAD, a restart behind a proxy. Every EVALSHA then answers -NOSCRIPT, and it used to fail
 * the operation, so every script call failed until the connection happened to drop. Now an operation answered
 * NOSCRIPT is written again, transparently to its caller, after SCRIPT LOAD of every script on the same
 * connection (which also serves the operations after it, unlike an EVAL of one script's text).
 *
 * Order. Operations are written in call order, and a caller may issue several for one conversation without
 * waiting (a stream's events, then the turn's FINISH). Writing a retry at once, when its NOSCRIPT arrives,
 * would put it behind operations written after the failed one and still unanswered: those met the same empty
 * cache and come back NOSCRIPT too, each retried later still, and any new operation written in between (by
 * then the cache is loaded again, so it succeeds) would overtake them: a stream's delta after its end event.
 * So the first NOSCRIPT stalls the connection: nothing new is written (op_submit and queue_pump queue it), the
 * operations already written come back, those answered NOSCRIPT join st->retry in reply order (= write order),
 * and once the last written one is answered, SCRIPT LOAD and then the retries are written, in that order,
 * ahead of everything queued. Among themselves and against every later call, the operations keep their order;
 * the stall lasts one round trip, and the timeout check covers it like any wait for Redis.
 *
 * What it cannot do: an operation written after the failed one and answered without NOSCRIPT has run before
 * the failed one's retry. That takes a command that runs no script (HGETALL, the MULTI/EXEC of a new
 * conversation, SET/DEL of an idempotency key), or the script cache filled again between the two by another
 * client (another asyncllm process reloading after the same flush) within one pipeline's round trip. The
 * store's callers do not issue a plain command behind an unanswered write of the same conversation, and the
 * second case needs a flush racing another process' reload; we accept it rather than give up pipelining.
 *
 * Bound. An operation is written again at most NOSCRIPT_RETRIES times; after that NOSCRIPT is an error reply
 * like any other (the caller gets STORE_EUNAVAILABLE), so a Redis that keeps flushing, or refuses SCRIPT LOAD,
 * cannot keep one in a loop. The retries' memory is that of the window: only written operations are retried,
 * and a script call keeps a copy of its command until it is answered (op->cmd). */

static void reload_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    (void)ac;
    (void)privdata;
    redisReply *reply = r;
    if (reply && reply->type == REDIS_REPLY_ERROR) /* the retries behind it will answer NOSCRIPT: failures */
        log_warn("redis: SCRIPT LOAD after NOSCRIPT failed: %s", reply->str);
}

static bool is_noscript(const redisReply *reply)
{
    return reply && reply->type == REDIS_REPLY_ERROR && reply->len >= 8 && memcmp(reply->str, "NOSCRIPT", 8) == 0;
}

/* Once every operation written before the stall is answered: SCRIPT LOAD of every script, then the retries in
 * order, then the queue. Not writable (the connection is going away): queue_fail fails them. */
static void noscript_replay(struct store *st)
{
    assert(st->stalled && st->pending == 0);
    if (!writable(st))
        return;
    size_t before = sdslen(st->ac->c.obuf);
    for (size_t i = 0; i < sizeof scripts / sizeof scripts[0]; i++) {
        const char *argv[] = {"SCRIPT", "LOAD", scripts[i].text};
        size_t lens[] = {6, 4, scripts[i].len};
        redisAsyncCommandArgv(st->ac, reload_cb, NULL, 3, argv, lens);
    }
    st->obuf_in += sdslen(st->ac->c.obuf) - before;
    log_warn("redis: scripts loaded again; writing %zu operation(s) answered NOSCRIPT again", st->nretry);
    st->stalled = false;
    struct op *op;
    while ((op = TAILQ_FIRST(&st->retry))) {
        TAILQ_REMOVE(&st->retry, op, link);
        st->nretry--;
        op->noscript_tries++;
        st->noscript_retries++;
        if (op_write(st, op, op->cmd, op->ends, op->npieces))
            op_fail(st, op);
    }
    queue_pump(st);
}

/* op (just removed from sent) was answered NOSCRIPT: it waits in st->retry, and the connection is stalled (see
 * above). Takes op. */
static void noscript_retry(struct store *st, struct op *op)
{
    if (!st->stalled)
        log_warn("redis: NOSCRIPT: Redis lost our scripts (SCRIPT FLUSH, failover?): loading them again, then "
                 "writing again what it refused (after the %d operation(s) still unanswered)",
                 st->pending);
    st->stalled = true;
    TAILQ_INSERT_TAIL(&st->retry, op, link);
    st->nretry++;
}

static void op_reply_cb(redisAsyncContext *ac, void *r, void *privdata)
{
    (void)ac;
    struct op *op = privdata;
    struct store *st = op->st;
    assert(op == TAILQ_FIRST(&st->sent)); /* Redis answers in order */
    TAILQ_REMOVE(&st->sent, op, link);
    st->pending--;
    redisReply *reply = r;
    bool retry = op->evalsha && op->noscript_tries < NOSCRIPT_RETRIES && is_noscript(reply);
    if (retry)
        noscript_retry(st, op);
    if (st->stalled && st->pending == 0)
        noscript_replay(st);
    queue_pump(st); /* before the callback: the window stays full, and the queue keeps call order */
    if (retry)
        return;
    if (op->kind == OP_REJECT) {
        /* Lost with the connection, or refused (-OOM, -MISCONF, -LOADING, -READONLY, NOSCRIPT twice...): either
         * way the turn is still pending while its client was told 503, so it is tried again. An error reply
         * used to drop it. */
        if (!reply || reply->type == REDIS_REPLY_ERROR) {
            if (!reply) /* Redis is not refusing: tried again as soon as it is back */
                st->reject_delay_ms = REJECT_RETRY_MS;
            reject_later(st, op, reply ? reply->str : "connection lost");
        } else if (st->rejects_failing) {
            st->rejects_failing = false;
            st->reject_delay_ms = REJECT_RETRY_MS;
            log_info("redis: Redis takes rejections again (%zu turn(s) answered 503 still to mark as rejected)",
                     st->nrejects);
        }
        op_free(op);
        return;
    }
    if (!reply && op->kind == OP_SUBMIT && op->lost.submitted_at && !op->plain) {
        /* Written, then the connection was lost: Redis may have stored the turn, and its client is told 503.
         * Found by its time and prompt, it is marked rejected once Redis is back (nothing, if it was not run).
         * Not a plain submit's: its prompt was produced at the same time, and its caller rejects the turn only
         * if that produce failed (store_submit). */
        reject_later(st, op, "connection lost with the submit's reply");
    }
    if (!has_callback(op)) {
        if (reply && reply->type == REDIS_REPLY_ERROR)
            log_error("redis: %s", reply->str);
        op_free(op);
        return;
    }
    if (!reply || reply->type == REDIS_REPLY_ERROR) {
        if (reply)
            log_error("redis: %s", reply->str);
        op_answer_error(op, STORE_EUNAVAILABLE);
        op_free(op);
        return;
    }
    struct conv conv = {0};
    struct turn small[CONV_TURNS_INLINE];
    switch (op->kind) {
    case OP_SUBMIT:
        if (reply->type != REDIS_REPLY_INTEGER)
            op->cb.submit(op->arg, STORE_EUNAVAILABLE, 0);
        else if (op->plain) /* EXPIRE's 1: HSET made the key; 0: it did not (piece_reply_cb logged why) */
            op->cb.submit(op->arg, reply->integer > 0 ? STORE_OK : STORE_EUNAVAILABLE, 1);
        else if (reply->integer == -1)
            op->cb.submit(op->arg, STORE_ENOTFOUND, 0);
        else if (reply->integer == -2)
            op->cb.submit(op->arg, STORE_EEXISTS, 0);
        else if (reply->integer == -3)
            op->cb.submit(op->arg, STORE_ENOPREV, 0);
        else
            op->cb.submit(op->arg, STORE_OK, (long)reply->integer);
        break;
    case OP_LOAD:
        if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 0)
            op->cb.conv(op->arg, STORE_ENOTFOUND, NULL);
        else if (conv_parse(&conv, op->conv_id, reply, small))
            op->cb.conv(op->arg, STORE_EUNAVAILABLE, NULL);
        else
            op->cb.conv(op->arg, STORE_OK, &conv);
        break;
    case OP_BEGIN:
        if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
            reply->element[0]->type != REDIS_REPLY_INTEGER || conv_parse(&conv, op->conv_id, reply->element[1], small))
            op->cb.begin(op->arg, STORE_EUNAVAILABLE, 0, NULL);
        else
            op->cb.begin(op->arg, STORE_OK, (long)reply->element[0]->integer, &conv);
        break;
    case OP_FINISH:
        if (reply->type != REDIS_REPLY_INTEGER)
            op->cb.done(op->arg, STORE_EUNAVAILABLE, false);
        else if (reply->integer == -4)
            op->cb.done(op->arg, STORE_ECONFLICT, false);
        else if (reply->integer < 0)
            op->cb.done(op->arg, STORE_ENOTFOUND, false);
        else
            op->cb.done(op->arg, STORE_OK, reply->integer == 1);
        break;
    case OP_RC:
        if (reply->type != REDIS_REPLY_INTEGER)
            op->cb.rc(op->arg, STORE_EUNAVAILABLE);
        else
            op->cb.rc(op->arg, reply->integer == -1   ? STORE_ENOTFOUND
                               : reply->integer == -4 ? STORE_ECONFLICT
                                                      : (int)reply->integer);
        break;
    case OP_EVENTS:
        events_reply(op, reply);
        break;
    case OP_IDEM:
        if (reply->type != REDIS_REPLY_ARRAY)
            op->cb.idem(op->arg, STORE_EUNAVAILABLE, NULL);
        else if (reply->elements == 0)
            op->cb.idem(op->arg, STORE_OK, NULL);
        else if (reply->element[0]->type == REDIS_REPLY_STRING)
            op->cb.idem(op->arg, STORE_OK, reply->element[0]->str);
        else
            op->cb.idem(op->arg, STORE_OK, NULL); /* expired between SET and GET: claim again is not needed */
        break;
    case OP_VERDICT:
        verdict_reply(op, reply);
        break;
    default:
        break;
    }
    if (op->kind == OP_LOAD || op->kind == OP_BEGIN)
        conv_done(&conv, small);
    op_free(op);
}

/* Writes c, v in decimal and CRLF at p; returns the end. */
static char *resp_num(char *p, char c, size_t v)
{
    *p++ = c;
    if (v < 10) { /* most lengths and counts: without fmt_i64's call and copy */
        *p++ = (char)('0' + v);
    } else if (v < 100) {
        *p++ = (char)('0' + v / 10);
        *p++ = (char)('0' + v % 10);
    } else {
        p += fmt_i64(p, (int64_t)v);
    }
    memcpy(p, "\r\n", 2);
    return p + 2;
}

/* Appends argv[0..argc) (lens[i], or strlen where lens is NULL) to b in RESP. hiredis' own formatter
 * (sdscatfmt for every argument) was the costliest step of a submit in the store. With lens, the room is
 * reserved once (a header is at most 23 bytes) and written in place: a checked append per piece was about
 * half the cost of a command. */
static void resp_append(struct buf *b, int argc, const char **argv, const size_t *lens)
{
    if (lens) {
        size_t room = 23;
        for (int i = 0; i < argc; i++)
            room += 23 + lens[i] + 2;
        if (buf_reserve(b, room))
            return; /* past SIZE_MAX / 2: cannot happen */
        char *p = resp_num(b->data + b->len, '*', (size_t)argc);
        for (int i = 0; i < argc; i++) {
            p = resp_num(p, '$', lens[i]);
            memcpy(p, argv[i], lens[i]);
            memcpy(p + lens[i], "\r\n", 2);
            p += lens[i] + 2;
        }
        b->len = (size_t)(p - b->data);
        b->data[b->len] = '\0';
        return;
    }
    char num[24];
    num[0] = '*';
    size_t n = 1 + fmt_i64(num + 1, argc);
    buf_append(b, num, n);
    buf_append(b, "\r\n", 2);
    for (int i = 0; i < argc; i++) {
        size_t len = lens ? lens[i] : strlen(argv[i]);
        num[0] = '$';
        n = 1 + fmt_i64(num + 1, (int64_t)len);
        buf_append(b, num, n);
        buf_append(b, "\r\n", 2);
        buf_append(b, argv[i], len);
        buf_append(b, "\r\n", 2);
    }
}

/* The store's scratch buffer for formatting commands (hiredis copies them into its output buffer). */
static struct buf *resp_scratch(struct store *st)
{
    struct buf *b = &st->scratch;
    if (b->cap > 256 * 1024) /* one huge command must not pin its memory */
        buf_free(b);
    buf_reset(b);
    return b;
}

/* Sends a command in RESP (cmd[0..len)) for op (see op_submit). */
static void op_send_formatted(struct store *st, struct op *op, const char *cmd, size_t len)
{
    op_submit(st, op, cmd, &len, 1);
}

/* Sends a command for op (argv[0..argc)); answers STORE_EUNAVAILABLE at once if Redis is down. */
static void op_send(struct store *st, struct op *op, int argc, const char **argv, const size_t *lens)
{
    struct buf *b = resp_scratch(st);
    resp_append(b, argc, argv, lens);
    op_send_formatted(st, op, b->data, b->len);
}

static struct op *op_new(enum op_kind kind, const char *conv_id, void *arg)
{
    struct op *op = xmalloc(sizeof *op);
    memset(op, 0, offsetof(struct op, conv_id));
    op->kind = kind;
    op->arg = arg;
    size_t n = strnlen(conv_id, sizeof op->conv_id - 1);
    memcpy(op->conv_id, conv_id, n);
    op->conv_id[n] = '\0';
    return op;
}

/* KEY_PREFIX + id, truncated to size like snprintf (ids are at most 64 characters). */
static void key_fill(char *out, size_t size, const char *id)
{
    size_t pl = sizeof KEY_PREFIX - 1, n = strnlen(id, size - pl - 1);
    memcpy(out, KEY_PREFIX, pl);
    memcpy(out + pl, id, n);
    out[pl + n] = '\0';
}

#define KEYBUF(name, id)                                                                                               \
    char name[96];                                                                                                     \
    key_fill(name, sizeof name, id)

/* The common numbers of a call: the time and the turn formatted per call, the settings once (store_new). */
struct nums {
    char now[24], turn[24];
    const char *ttl, *maxlen, *evttl;
};

static void nums_fill(struct nums *n, const struct store *st, long turn)
{
    fmt_i64(n->now, now_ms());
    fmt_i64(n->turn, turn);
    n->ttl = st->num_ttl;
    n->maxlen = st->num_maxlen;
    n->evttl = st->num_evttl;
}

/* Sends EVAL script with argv[0..argc) (lengths from strlen unless lens gives them) for op. */
static void eval(struct store *st, struct op *op, const char *script, size_t script_len, int nkeys, int argc,
                 const char **argv, const size_t *lens)
{
    const char *a[24];
    size_t l[24];
    char nk[24];
    fmt_i64(nk, nkeys);
    const char *sha = script_sha(script);
    op->evalsha = sha != NULL;
    a[0] = sha ? "EVALSHA" : "EVAL";
    l[0] = strlen(a[0]);
    a[1] = sha ? sha : script;
    l[1] = sha ? 40 : script_len;
    a[2] = nk;
    l[2] = strlen(nk);
    for (int i = 0; i < argc && i < 21; i++) {
        a[3 + i] = argv[i];
        l[3 + i] = lens && lens[i] != (size_t)-1 ? lens[i] : strlen(argv[i]);
    }
    op_send(st, op, 3 + argc, a, l);
}

#define NOLEN ((size_t)-1)
#define EVAL(st, op, script, nkeys, argv, lens)                                                                        \
    eval(st, op, script, sizeof script - 1, nkeys, (int)(sizeof argv / sizeof argv[0]), argv, lens)

/* The common submit, a new conversation's first turn without an event stream, as HSET then EXPIRE rather than
 * LUA_SUBMIT: running a script costs Redis about as much again as the commands it runs. The id is 132 fresh
 * random bits (conv_id_new), so the script's check that it is unused is left out.
 *
 * Its caller produces the prompt at the same time (http/submit.c), so a worker may take it, and write the
 * turn's status (in_progress, even complete with a fast model) before this reaches Redis. So the HSET carries
 * only what a worker would write the same or not at all (turns 1, created_at, the prompt, submitted_at, the
 * request's parameters), never t1.status or updated_at: a stored prompt without a status reads as pending
 * (conv_parse, LUA_STATUS_FN), and updated_at defaults to created_at.
 *
 * No MULTI/EXEC around the two (it cost Redis a fifth of the submit's instructions: bench/ANALYSIS.md, session
 * 8): they are written together and Redis runs a connection's commands in order. EXPIRE answers 1 only if the
 * key exists; an HSET refused (say, out of memory) is logged (piece_reply_cb) and makes the operation
 * STORE_EUNAVAILABLE. Whether the client gets 202 is the produce's to decide; a turn whose produce failed is
 * rejected by the caller (which deletes a new conversation, expiry or not). */
static void submit_new_plain(struct store *st, const char *key, const char *prompt, size_t prompt_len,
                             const struct turn_meta *meta, const struct nums *n, struct op *op)
{
    if (!st->ac || !st->connected) {
        op_fail(st, op);
        return;
    }
    const char *a[24];
    size_t l[24];
    int c = 0;
#define ARG(s, len) (a[c] = (s), l[c] = (len), c++)
#define ARGS(s) ARG(s, strlen(s))
    ARGS("HSET");
    ARGS(key);
    ARGS("turns");
    ARGS("1");
    ARGS("created_at");
    ARGS(n->now);
    ARGS("t1.prompt");
    ARG(prompt, prompt_len);
    ARGS("t1.submitted_at");
    ARGS(n->now);
    if (meta && meta->req && meta->req[0]) {
        ARGS("t1.req");
        ARGS(meta->req);
    }
    if (meta && meta->input && meta->input[0]) {
        ARGS("t1.input");
        ARGS(meta->input);
    }
#undef ARG
#undef ARGS
    /* one operation of 3 or 4 commands, written together (op_submit) */
    struct buf *b = resp_scratch(st);
    size_t ends[CMD_PIECES_MAX];
    int np = 0;
    resp_append(b, c, a, l);
    ends[np++] = b->len;
    if (st->cfg->conversation_ttl_s > 0) {
        const char *e[] = {"EXPIRE", key, n->ttl};
        resp_append(b, 3, e, NULL);
        ends[np++] = b->len;
    }
    op->plain = true;
    op_submit(st, op, b->data, ends, np);
}

/* What a rejection needs to find the submit's turn if the connection is lost before its reply. */
static void submit_lost_fill(struct op *op, bool is_new, const struct turn_meta *meta, const char *prompt,
                             size_t prompt_len)
{
    op->is_new = is_new;
    op->lost.submitted_at = meta ? meta->submitted_at : 0;
    op->lost.prompt_len = prompt_len;
    op->lost.head_len = prompt_len < PROMPT_HEAD ? prompt_len : PROMPT_HEAD;
    memcpy(op->lost.head, prompt, op->lost.head_len);
}

static void reject_send(struct store *st, const char *conv_id, long turn, bool is_new, const struct lost_submit *lost)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    char at[24] = "0", plen[24] = "0";
    if (!turn) {
        fmt_i64(at, lost->submitted_at);
        fmt_i64(plen, (int64_t)lost->prompt_len);
    }
    const char *argv[] = {key, n.turn, is_new ? "1" : "0", at, plen, turn ? "" : lost->head};
    size_t lens[] = {NOLEN, NOLEN, NOLEN, NOLEN, NOLEN, turn ? 0 : lost->head_len};
    struct op *op = op_new(OP_REJECT, conv_id, NULL);
    op->turn = turn;
    op->is_new = is_new;
    if (!turn)
        op->lost = *lost;
    EVAL(st, op, LUA_REJECT, 1, argv, lens);
}

void store_submit(struct store *st, const char *conv_id, const char *prompt, size_t prompt_len, bool is_new,
                  const struct turn_meta *meta, store_submit_cb *cb, void *arg)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, 0);
    if (meta && meta->submitted_at)
        fmt_i64(n.now, meta->submitted_at);
    if (is_new && !(meta && (meta->stream || meta->prev_turn > 0))) {
        struct op *op = op_new(OP_SUBMIT, conv_id, arg);
        op->cb.submit = cb;
        submit_lost_fill(op, is_new, meta, prompt, prompt_len);
        submit_new_plain(st, key, prompt, prompt_len, meta, &n, op);
        return;
    }
    char prev[24];
    fmt_i64(prev, meta && meta->prev_turn > 0 ? meta->prev_turn : 0);
    const char *argv[] = {key,
                          prompt,
                          n.now,
                          n.ttl,
                          is_new ? "1" : "0",
                          meta && meta->req ? meta->req : "",
                          meta && meta->input ? meta->input : "",
                          meta && meta->stream ? "1" : "0",
                          conv_id,
                          n.maxlen,
                          n.evttl,
                          prev};
    size_t lens[] = {NOLEN, prompt_len, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN};
    struct op *op = op_new(OP_SUBMIT, conv_id, arg);
    op->cb.submit = cb;
    submit_lost_fill(op, is_new, meta, prompt, prompt_len);
    EVAL(st, op, LUA_SUBMIT, 1, argv, lens);
}

void store_reject(struct store *st, const char *conv_id, long turn, bool is_new)
{
    if (turn > 0)
        reject_send(st, conv_id, turn, is_new, NULL);
}

/* A rejection that failed (not written, lost with the connection, or answered with an error: why) is written
 * again while connected until Redis takes it: REJECT_RETRY_MS later, and while Redis keeps answering errors, at
 * twice the previous delay each round up to REJECT_RETRY_MAX_MS (a Redis out of memory is not asked every 500 ms
 * for ever); back to REJECT_RETRY_MS once it takes one or the connection was what failed. Bounded: past
 * REJECTS_MAX waiting, the turn stays pending (logged). A Redis that keeps refusing keeps it until exit. */
static void reject_later(struct store *st, const struct op *op, const char *why)
{
    if (st->closing)
        return;
    if (st->nrejects >= REJECTS_MAX) {
        log_error("redis: conversation %s turn %ld was answered 503 but cannot be marked rejected (%s; %zu waiting "
                  "already): it stays pending",
                  op->conv_id, op->turn, why, st->nrejects);
        return;
    }
    if (!st->rejects_failing)
        log_warn("redis: conversation %s turn %ld, answered 503, could not be marked rejected (%s): marking turns "
                 "answered 503 as rejected when Redis takes it (tried again after %d ms, then at doubling intervals "
                 "up to %d s while Redis refuses)",
                 op->conv_id, op->turn, why, REJECT_RETRY_MS, REJECT_RETRY_MAX_MS / 1000);
    else
        log_debug("redis: conversation %s turn %ld, answered 503, could not be marked rejected (%s)", op->conv_id,
                  op->turn, why);
    st->rejects_failing = true;
    struct reject *rj = xmalloc(sizeof *rj);
    rj->turn = op->kind == OP_REJECT ? op->turn : 0;
    rj->is_new = op->is_new;
    rj->lost = op->lost;
    snprintf(rj->conv_id, sizeof rj->conv_id, "%s", op->conv_id);
    rj->next = st->rejects;
    st->rejects = rj;
    st->nrejects++;
    if (!evtimer_pending(st->reject_ev, NULL)) {
        struct timeval tv = {st->reject_delay_ms / 1000, (st->reject_delay_ms % 1000) * 1000};
        evtimer_add(st->reject_ev, &tv);
    }
}

static void reject_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct store *st = arg;
    if (!st->connected) {
        struct timeval tv = {0, REJECT_RETRY_MS * 1000};
        evtimer_add(st->reject_ev, &tv);
        return;
    }
    struct reject *list = st->rejects;
    size_t n = st->nrejects;
    st->rejects = NULL;
    st->nrejects = 0;
    log_debug("redis: marking %zu turn(s) answered 503 as rejected", n);
    /* if Redis refuses this round too, the next one waits twice as long */
    st->reject_delay_ms = st->reject_delay_ms * 2 > REJECT_RETRY_MAX_MS ? REJECT_RETRY_MAX_MS : st->reject_delay_ms * 2;
    while (list) { /* a failure puts it back on st->rejects */
        struct reject *rj = list;
        list = rj->next;
        reject_send(st, rj->conv_id, rj->turn, rj->is_new, &rj->lost);
        free(rj);
    }
}

void store_load(struct store *st, const char *conv_id, store_conv_cb *cb, void *arg)
{
    KEYBUF(key, conv_id);
    const char *argv[] = {"HGETALL", key};
    size_t lens[] = {7, strlen(key)};
    struct op *op = op_new(OP_LOAD, conv_id, arg);
    op->cb.conv = cb;
    op_send(st, op, 2, argv, lens);
}

void store_begin(struct store *st, const char *conv_id, long turn, const char *prompt, size_t prompt_len,
                 int32_t partition, int64_t offset, store_begin_cb *cb, void *arg)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    char src[64] = "k."; /* k.<partition>.<offset> */
    size_t sl = 2 + fmt_i64(src + 2, partition);
    src[sl++] = '.';
    fmt_i64(src + sl, offset);
    const char *argv[] = {key, n.turn, prompt, n.now, n.ttl, src, conv_id, n.maxlen, n.evttl};
    size_t lens[] = {NOLEN, NOLEN, prompt_len, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN, NOLEN};
    struct op *op = op_new(OP_BEGIN, conv_id, arg);
    op->cb.begin = cb;
    EVAL(st, op, LUA_BEGIN, 1, argv, lens);
}

static const char *nz(const char *s)
{
    return s ? s : "";
}

void store_finish(struct store *st, const char *conv_id, long turn, const struct turn_result *res, store_done_cb *cb,
                  void *arg)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    char pt[24], ct[24], tt[24], att[24];
    fmt_i64(pt, res->prompt_tokens);
    fmt_i64(ct, res->completion_tokens);
    fmt_i64(tt, res->total_tokens);
    fmt_i64(att, res->attempts);
    const char *argv[] = {key,
                          n.turn,
                          turn_status_name(res->status),
                          nz(res->response),
                          nz(res->model),
                          pt,
                          ct,
                          tt,
                          nz(res->finish_reason),
                          nz(res->error_code),
                          nz(res->error_message),
                          n.now,
                          att,
                          n.ttl,
                          conv_id,
                          n.maxlen,
                          n.evttl};
    size_t lens[17];
    for (int i = 0; i < 17; i++)
        lens[i] = NOLEN;
    lens[3] = res->response ? res->response_len : 0;
    struct op *op = op_new(OP_FINISH, conv_id, arg);
    op->cb.done = cb;
    EVAL(st, op, LUA_FINISH, 1, argv, lens);
}

static void marks_flush(struct store *st)
{
    if (st->nmarks == 0)
        return;
    size_t n = st->nmarks;
    st->nmarks = 0;
    const char *sha = script_sha(LUA_PUBLISHED);
    char nk[24];
    fmt_i64(nk, (int64_t)n);
    const char **argv = xmalloc((3 + 2 * n) * sizeof *argv);
    argv[0] = "EVALSHA";
    argv[1] = sha;
    argv[2] = nk;
    for (size_t i = 0; i < n; i++) {
        argv[3 + i] = st->marks[i].key;
        argv[3 + n + i] = st->marks[i].turn;
    }
    struct buf *b = resp_scratch(st);
    resp_append(b, (int)(3 + 2 * n), argv, NULL);
    free(argv);
    /* the op's conversation is only for logs: the batch's first */
    struct op *op = op_new(OP_PUBLISHED, st->marks[0].key + sizeof KEY_PREFIX - 1, NULL);
    op->evalsha = true;
    op_send_formatted(st, op, b->data, b->len);
}

static void marks_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    marks_flush(arg);
}

void store_mark_published(struct store *st, const char *conv_id, long turn)
{
    if (!st->marks)
        st->marks = xmalloc(PUBMARKS_MAX * sizeof *st->marks);
    struct pubmark *m = &st->marks[st->nmarks++];
    key_fill(m->key, sizeof m->key, conv_id);
    fmt_i64(m->turn, turn);
    if (st->nmarks == PUBMARKS_MAX)
        marks_flush(st);
    else if (st->nmarks == 1)
        event_active(st->marks_ev, EV_TIMEOUT, 0); /* at the end of this loop iteration */
}

void store_cancel(struct store *st, const char *conv_id, long turn, store_rc_cb *cb, void *arg)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    const char *argv[] = {key, n.turn, n.now, conv_id, n.maxlen, n.evttl};
    struct op *op = op_new(OP_RC, conv_id, arg);
    op->cb.rc = cb;
    EVAL(st, op, LUA_CANCEL, 1, argv, NULL);
}

void store_delete(struct store *st, const char *conv_id, long turn, store_rc_cb *cb, void *arg)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    const char *argv[] = {key, n.turn, n.now, conv_id};
    struct op *op = op_new(OP_RC, conv_id, arg);
    op->cb.rc = cb;
    EVAL(st, op, LUA_DELETE, 1, argv, NULL);
}

void store_events_read(struct store *st, const char *conv_id, long turn, long after_seq, long max, store_events_cb *cb,
                       void *arg)
{
    KEYBUF(key, conv_id);
    char ekey[112], start[32], count[24];
    snprintf(ekey, sizeof ekey, "asyncllm:ev:%s:%ld", conv_id, turn);
    snprintf(start, sizeof start, "(0-%ld", after_seq > 0 ? after_seq : 0);
    snprintf(count, sizeof count, "%ld", max);
    const char *argv[] = {key, ekey, start, count};
    struct op *op = op_new(OP_EVENTS, conv_id, arg);
    op->turn = turn;
    op->cb.events = cb;
    EVAL(st, op, LUA_EVENTS, 2, argv, NULL);
}

void store_event(struct store *st, const char *conv_id, long turn, char kind, const char *text, size_t len)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    char k[2] = {kind, '\0'};
    const char *argv[] = {key, n.turn, k, text ? text : "", conv_id, n.maxlen, n.evttl};
    size_t lens[] = {NOLEN, NOLEN, NOLEN, text ? len : 0, NOLEN, NOLEN, NOLEN};
    EVAL(st, op_new(OP_EVENT, conv_id, NULL), LUA_EVENT, 1, argv, lens);
}

void store_idem_claim(struct store *st, const char *key, long ttl_s, store_idem_cb *cb, void *arg)
{
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%ld", ttl_s);
    const char *argv[] = {key, ttl};
    struct op *op = op_new(OP_IDEM, "", arg);
    op->cb.idem = cb;
    EVAL(st, op, LUA_IDEM, 1, argv, NULL);
}

void store_idem_set(struct store *st, const char *key, const char *value, long ttl_s)
{
    char ttl[24];
    snprintf(ttl, sizeof ttl, "%ld", ttl_s);
    struct op *op = op_new(OP_IDEM_SET, "", NULL);
    if (value) {
        const char *argv[] = {"SET", key, value, "EX", ttl};
        size_t lens[] = {3, strlen(key), strlen(value), 2, strlen(ttl)};
        op_send(st, op, 5, argv, lens);
    } else {
        const char *argv[] = {"DEL", key};
        size_t lens[] = {3, strlen(key)};
        op_send(st, op, 2, argv, lens);
    }
}

void store_moderation(struct store *st, const char *conv_id, long turn, const char *verdict, store_verdict_cb *cb,
                      void *arg)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    const char *argv[] = {key, n.turn, verdict ? verdict : ""};
    struct op *op = op_new(OP_VERDICT, conv_id, arg);
    op->cb.verdict = cb;
    EVAL(st, op, LUA_MODERATION, 1, argv, NULL);
}

void store_moderation_published(struct store *st, const char *conv_id, long turn, store_rc_cb *cb, void *arg)
{
    KEYBUF(key, conv_id);
    struct nums n;
    nums_fill(&n, st, turn);
    const char *argv[] = {key, n.turn};
    struct op *op = op_new(OP_RC, conv_id, arg);
    op->cb.rc = cb;
    EVAL(st, op, LUA_MODERATION_PUBLISHED, 1, argv, NULL);
}

void store_marker_test(struct store *st, const char *name, store_rc_cb *cb, void *arg)
{
    char key[256];
    snprintf(key, sizeof key, "asyncllm:done:%.200s", name);
    const char *argv[] = {key};
    struct op *op = op_new(OP_RC, "", arg);
    op->cb.rc = cb;
    EVAL(st, op, LUA_MARKER_TEST, 1, argv, NULL);
}

void store_marker_set(struct store *st, const char *name, long ttl_s, store_rc_cb *cb, void *arg)
{
    char key[256], ttl[24];
    snprintf(key, sizeof key, "asyncllm:done:%.200s", name);
    snprintf(ttl, sizeof ttl, "%ld", ttl_s);
    const char *argv[] = {key, ttl};
    struct op *op = op_new(OP_RC, "", arg);
    op->cb.rc = cb;
    EVAL(st, op, LUA_MARKER_SET, 1, argv, NULL);
}
