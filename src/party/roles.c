/* roles.c - see roles.h. */
#include "party/roles.h"

#include "party/exec.h"
#include "party/moderate.h"
#include "party/tail.h"
#include "party/webhooks.h"

#include <string.h>

static char **exec_argv; /* the command after "--", pointing into main's argv */
static struct tail_opts tail_o;

static void *webhooks_create(struct event_base *base, const struct config *cfg, char *err, size_t errlen)
{
    return webhooks_new(base, cfg, err, errlen);
}
static void webhooks_drain_obj(void *obj, void (*on_drained)(void *), void *arg)
{
    webhooks_drain(obj, on_drained, arg);
}
static void webhooks_destroy(void *obj)
{
    webhooks_free(obj);
}

static void *moderate_create(struct event_base *base, const struct config *cfg, char *err, size_t errlen)
{
    return moderate_new(base, cfg, err, errlen);
}
static void moderate_drain_obj(void *obj, void (*on_drained)(void *), void *arg)
{
    moderate_drain(obj, on_drained, arg);
}
static void moderate_destroy(void *obj)
{
    moderate_free(obj);
}

static void *exec_create(struct event_base *base, const struct config *cfg, char *err, size_t errlen)
{
    return exec_new(base, cfg, exec_argv, err, errlen);
}
static void exec_drain_obj(void *obj, void (*on_drained)(void *), void *arg)
{
    exec_drain(obj, on_drained, arg);
}
static void exec_destroy(void *obj)
{
    exec_free(obj);
}

static const struct party_role roles[] = {
    {"webhooks", webhooks_create, webhooks_drain_obj, webhooks_destroy},
    {"moderate", moderate_create, moderate_drain_obj, moderate_destroy},
    {"exec", exec_create, exec_drain_obj, exec_destroy},
};

const struct party_role *party_role_find(const char *name)
{
    for (size_t i = 0; i < sizeof roles / sizeof roles[0]; i++)
        if (strcmp(roles[i].name, name) == 0)
            return &roles[i];
    return NULL;
}

int party_role_args(const char *name, int *argc, char **argv, char *err, size_t errlen)
{
    if (strcmp(name, "tail") == 0)
        return tail_args(argc, argv, 2, &tail_o, err, errlen);
    if (strcmp(name, "exec") != 0)
        return 0;
    for (int i = 2; i < *argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            exec_argv = argv + i + 1; /* argv[argc] is NULL: the command's list is terminated */
            argv[i] = NULL;
            *argc = i;
            break;
        }
    }
    return 0; /* without a command, exec_new() says how to give one */
}

int party_role_tail(const struct config *cfg)
{
    return tail_run(cfg, &tail_o);
}
