/* reply.c - see reply.h.
 *
 * The reader creates a reply's root first (task->parent NULL), then each element with its parent's task, so
 * every object can find its arena through its parent: each redisReply is the tail of a struct node that points
 * to the arena. Blocks of about 1 KB are added as the reply grows (an object bigger than that, a long string or
 * a long element vector, gets a block of its own). hiredis frees only roots (after a callback, or a half-read
 * reply on a protocol error or when the context is freed), and freeing a root frees every block. */
#include "store/reply.h"

#include "core/util.h"

#include <hiredis/hiredis.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* Blocks of this size (header included) come from glibc's per-thread cache, which serves requests of up to 1032
 * bytes without searching its bins (one 4 KiB block per reply cost about 1,000 instructions in malloc, a 1 KiB
 * one about 50). An allocation that does not fit one gets a block of its own. */
#define BLOCK_BYTES 1024
#define ALIGN sizeof(void *) /* enough for redisReply and element vectors; strings need none */

struct block {
    struct block *next; /* the previous (older) block */
    size_t used, cap;
    alignas(void *) unsigned char data[];
};

struct arena {
    struct block *head; /* the block being filled, then older ones; the first one holds this struct */
    const redisReply *root;
};

struct node {
    struct arena *arena;
    redisReply r;
};

static size_t round_up(size_t n)
{
    return (n + ALIGN - 1) & ~(ALIGN - 1);
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
    if (b->cap - b->used >= n) {
        void *p = b->data + b->used;
        b->used += n;
        return p;
    }
    size_t cap = BLOCK_BYTES - sizeof *b;
    if (n > cap) { /* a block of its own, behind the head, whose free space stays in use */
        struct block *big = block_new(n);
        big->used = n;
        big->next = b->next;
        b->next = big;
        return big->data;
    }
    b = block_new(cap);
    b->next = a->head;
    a->head = b;
    b->used = n;
    return b->data;
}

/* A new object of type for task, followed by extra bytes (its string, its element vector): in its parent's arena
 * and linked into the parent, or, for a root, in a new arena. */
static redisReply *node_new(const redisReadTask *task, int type, size_t extra)
{
    struct arena *a;
    if (task->parent) {
        a = arena_of(task->parent->obj);
    } else {
        struct block *b = block_new(BLOCK_BYTES - sizeof *b);
        a = (struct arena *)b->data;
        b->used = round_up(sizeof *a);
        a->head = b;
        a->root = NULL;
    }
    struct node *nd = arena_alloc(a, sizeof *nd + extra);
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

/* The extra bytes that node_new put after r. */
static void *node_extra(redisReply *r)
{
    return (struct node *)((char *)r - offsetof(struct node, r)) + 1;
}

static void *create_string(const redisReadTask *task, char *str, size_t len)
{
    redisReply *r = node_new(task, task->type, len + 1);
    r->str = node_extra(r);
    memcpy(r->str, str, len);
    r->str[len] = '\0';
    r->len = len;
    return r;
}

static void *create_array(const redisReadTask *task, int elements)
{
    size_t n = elements > 0 ? (size_t)elements : 0;
    redisReply *r = node_new(task, REDIS_REPLY_ARRAY, n * sizeof(redisReply *));
    r->elements = n;
    if (n) {
        r->element = node_extra(r);
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
    struct block *b = a->head; /* a is in one of them: not read once freeing starts */
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
