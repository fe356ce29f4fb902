/* map.c - see map.h. FNV-1a hashing; entries are allocated one by one, which is fine at the sizes we keep
 * (bounded by the worker's max-buffered). */
#include "core/map.h"

#include "core/util.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct entry {
    struct entry *next;
    const char *key;
    uint64_t hash;
    void *value;
};

struct map {
    struct entry **buckets;
    size_t nbuckets; /* a power of two */
    size_t count;
};

static uint64_t hash_str(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ULL;
    }
    return h;
}

struct map *map_new(void)
{
    struct map *m = xcalloc(1, sizeof *m);
    m->nbuckets = 64;
    m->buckets = xcalloc(m->nbuckets, sizeof *m->buckets);
    return m;
}

void map_free(struct map *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->nbuckets; i++) {
        struct entry *e = m->buckets[i];
        while (e) {
            struct entry *next = e->next;
            free(e);
            e = next;
        }
    }
    free(m->buckets);
    free(m);
}

static struct entry **find(const struct map *m, const char *key, uint64_t h)
{
    struct entry **pe = &m->buckets[h & (m->nbuckets - 1)];
    while (*pe && ((*pe)->hash != h || strcmp((*pe)->key, key) != 0))
        pe = &(*pe)->next;
    return pe;
}

void *map_get(const struct map *m, const char *key)
{
    struct entry *e = *find(m, key, hash_str(key));
    return e ? e->value : NULL;
}

static void grow(struct map *m)
{
    size_t n = m->nbuckets * 2;
    struct entry **b = xcalloc(n, sizeof *b);
    for (size_t i = 0; i < m->nbuckets; i++) {
        struct entry *e = m->buckets[i];
        while (e) {
            struct entry *next = e->next;
            e->next = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
            e = next;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = n;
}

void *map_put(struct map *m, const char *key, void *value)
{
    uint64_t h = hash_str(key);
    struct entry **pe = find(m, key, h);
    if (*pe) {
        void *old = (*pe)->value;
        (*pe)->value = value;
        (*pe)->key = key;
        return old;
    }
    struct entry *e = xmalloc(sizeof *e);
    e->next = NULL;
    e->key = key;
    e->hash = h;
    e->value = value;
    *pe = e;
    if (++m->count > m->nbuckets)
        grow(m);
    return NULL;
}

void *map_del(struct map *m, const char *key)
{
    struct entry **pe = find(m, key, hash_str(key));
    struct entry *e = *pe;
    if (!e)
        return NULL;
    void *v = e->value;
    *pe = e->next;
    free(e);
    m->count--;
    return v;
}

size_t map_count(const struct map *m)
{
    return m->count;
}

size_t map_values(const struct map *m, void **out, size_t max)
{
    size_t n = 0;
    for (size_t i = 0; i < m->nbuckets && n < max; i++)
        for (struct entry *e = m->buckets[i]; e && n < max; e = e->next)
            out[n++] = e->value;
    return n;
}
