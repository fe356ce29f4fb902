/* reply.c - see reply.h.
 *
 * The reader creates a reply's root first (task->parent NULL), then each element with its parent's task, so
 * every object can find its arena through its parent: each redisReply is the tail of a struct node that points
 * to the arena. The first block is sized from what the root announces (an array's element count, a string's
 * length); further blocks are added as needed, a string larger than a block gets a block of its own. hiredis
 * frees only roots (after a callback, or a half-read reply on a protocol error or when the context is freed),
 * and freeing a root frees every block. */
#include "store/reply.h"

#include "core/util.h"

#include <hiredis/hiredis.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK_MIN 4096
#define GUESS_BYTES 32     /* bytes of string per array element expected in the first block */
#define GUESS_ELEMENTS 256 /* elements counted in the first block's size: more get blocks of their own */

struct block {
    struct block *next; /* the previous (older) block */
    size_t used, cap;
    alignas(max_align_t) unsigned char data[];
};

struct arena {
    struct block *head; /* the newest block; the oldest one holds this struct */
    const redisReply *root;
};

struct node {
    struct arena *arena;
    redisReply r;
};

static size_t round_up(size_t n)
{
    return (n + alignof(max_align_t) - 1) & ~(alignof(max_align_t) - 1);
}

static struct arena *arena_of(const redisReply *r)
{
    return ((const struct node *)((const char *)r - offsetof(struct node, r)))->arena;
}

static struct block *block_new(size_t cap)
{
    struct block *b = xmalloc(sizeof *b + cap);
    b->next = NULL;
    b->used = 0;
    b->cap = cap;
    return b;
}

static void *arena_alloc(struct arena *a, size_t n)
{
    n = round_up(n);
    struct block *b = a->head;
    if (b->cap - b->used < n) {
        b = block_new(n > BLOCK_MIN ? n : BLOCK_MIN);
        b->next = a->head;
        a->head = b;
    }
    void *p = b->data + b->used;
    b->used += n;
    return p;
}

/* A new object of type for task: in its parent's arena and linked into the parent, or, for a root, in a new
 * arena with room for about extra more bytes. */
static redisReply *node_new(const redisReadTask *task, int type, size_t extra)
{
    struct arena *a;
    if (task->parent) {
        a = arena_of(task->parent->obj);
    } else {
        struct block *b = block_new(round_up(sizeof *a) + round_up(sizeof(struct node)) + round_up(extra));
        a = (struct arena *)b->data;
        b->used = round_up(sizeof *a);
        a->head = b;
        a->root = NULL;
    }
    struct node *nd = arena_alloc(a, sizeof *nd);
    memset(nd, 0, sizeof *nd);
    nd->arena = a;
    nd->r.type = type;
    if (task->parent) {
        redisReply *parent = task->parent->obj;
        parent->element[task->idx] = &nd->r;
    } else {
        a->root = &nd->r;
    }
    return &nd->r;
}

static void *create_string(const redisReadTask *task, char *str, size_t len)
{
    redisReply *r = node_new(task, task->type, len + 1);
    r->str = arena_alloc(arena_of(r), len + 1);
    memcpy(r->str, str, len);
    r->str[len] = '\0';
    r->len = len;
    return r;
}

static void *create_array(const redisReadTask *task, int elements)
{
    size_t n = elements > 0 ? (size_t)elements : 0, guess = n < GUESS_ELEMENTS ? n : GUESS_ELEMENTS;
    redisReply *r =
        node_new(task, REDIS_REPLY_ARRAY, guess * (sizeof(redisReply *) + round_up(sizeof(struct node)) + GUESS_BYTES));
    r->elements = n;
    if (n) {
        r->element = arena_alloc(arena_of(r), n * sizeof *r->element);
        memset(r->element, 0, n * sizeof *r->element);
    }
    return r;
}

static void *create_integer(const redisReadTask *task, long long value)
{
    redisReply *r = node_new(task, REDIS_REPLY_INTEGER, 0);
    r->integer = value;
    return r;
}

static void *create_nil(const redisReadTask *task)
{
    return node_new(task, REDIS_REPLY_NIL, 0);
}

static void free_object(void *obj)
{
    if (!obj)
        return;
    const redisReply *r = obj;
    struct arena *a = arena_of(r);
    if (a->root != r) /* an element: freed with its root */
        return;
    struct block *b = a->head; /* the arena itself is in the last block freed */
    while (b) {
        struct block *next = b->next;
        free(b);
        b = next;
    }
}

static redisReplyObjectFunctions arena_fns = {create_string, create_array, create_integer, create_nil, free_object};

void reply_arena_use(redisReader *reader)
{
    reader->fn = &arena_fns;
}
