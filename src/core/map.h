/* map.h - a hash map from NUL-terminated string keys to pointers (chained, power-of-two buckets, grows at a
 * load factor of 1). The map does not own keys or values: a key must stay valid while its entry exists
 * (typically it lives inside the value). */
#ifndef ASYNCLLM_MAP_H
#define ASYNCLLM_MAP_H

#include <stddef.h>

struct map;

struct map *map_new(void);
/* Frees the map, not the keys or values. */
void map_free(struct map *m);
void *map_get(const struct map *m, const char *key);
/* Inserts or replaces; returns the previous value or NULL. */
void *map_put(struct map *m, const char *key, void *value);
/* Removes and returns the value, or NULL. */
void *map_del(struct map *m, const char *key);
size_t map_count(const struct map *m);
/* Copies up to max values into out (in no particular order) and returns how many: a snapshot, so that the
 * caller may change the map while it goes through them. */
size_t map_values(const struct map *m, void **out, size_t max);

#endif
