/* roles.h - the interested parties as subcommands of asyncllm (webhooks, moderate, exec, tail): what main.c
 * needs to run one by name, so that adding a party does not touch main.c beyond its usage text. */
#ifndef ASYNCLLM_ROLES_H
#define ASYNCLLM_ROLES_H

#include <stddef.h>

struct event_base;
struct config;

/* A party that runs on an event loop: created, drained on SIGTERM, freed. */
struct party_role {
    const char *name;
    void *(*create)(struct event_base *base, const struct config *cfg, char *err, size_t errlen);
    void (*drain)(void *obj, void (*on_drained)(void *arg), void *arg);
    void (*destroy)(void *obj);
};

/* The role named name (webhooks, moderate, exec), or NULL. tail is not one: see party_role_tail(). */
const struct party_role *party_role_find(const char *name);
/* Before the settings are read: takes the role's own arguments out of argv[2..*argc): for exec, "--" and the
 * command after it (kept for create); for tail, its options. Other commands are left alone. Returns 0, or -1
 * with a message in err (a bad tail option). */
int party_role_args(const char *name, int *argc, char **argv, char *err, size_t errlen);
/* Runs `asyncllm tail` (blocking) with the options party_role_args() took. Returns the exit status. */
int party_role_tail(const struct config *cfg);

#endif
