/* main.c - the asyncllm command: one binary, roles chosen by subcommand.
 *
 * Each role runs one libevent loop per thread. `all` runs the API on a second thread with its own loop; the
 * main thread runs the worker and takes the signals, and tells the API thread to stop through a pipe (threads
 * signal each other only through file descriptors). */
#include "core/config.h"
#include "core/log.h"
#include "http/api.h"
#include "kafka/kafka.h"
#include "party/roles.h"
#include "worker/worker.h"

#include <event2/event.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define ASYNCLLM_VERSION "0.1.0"

static const char usage[] =
    "asyncllm " ASYNCLLM_VERSION " - an asynchronous LLM API on Kafka and Redis\n"
    "\n"
    "usage: asyncllm <command> [--setting=value ...] [-X kafka.property=value ...]\n"
    "\n"
    "commands:\n"
    "  api       the HTTP API: POST/GET /answer queue a prompt (202), GET /polling reads the result\n"
    "  worker    consume prompts, call the LLM (many at once, in order per conversation), store and publish\n"
    "  all       api and worker in one process (two threads)\n"
    "  webhooks  deliver signed events (Standard Webhooks) for finished responses to callback_url and\n"
    "            --webhook-urls, with retries and a dead-letter topic\n"
    "  moderate  check every answer (word list, empty, truncated, echo, optional moderation API), store the\n"
    "            verdict on its turn and publish flagged ones to --topic-moderation\n"
    "  exec      post-process every response with a command: asyncllm exec [settings] -- COMMAND [ARGS...]\n"
    "            (one JSON line in, one JSON line out), results to --topic-postprocessed\n"
    "  tail      print responses as they come: [--from-beginning] [--format=json|text] [--conversation=ID]\n"
    "            [--topic=NAME]; joins no group, commits nothing\n"
    "  topics    create the Kafka topics if missing, then exit\n"
    "  config    print the settings as a Markdown table\n"
    "  version   print the version\n"
    "\n"
    "Every setting can be given as a flag or an environment variable (flags win):\n";

static const char usage_tail[] =
    "\n"
    "Signals: SIGTERM or SIGINT stop gracefully (the API answers what it holds, the worker finishes what is in\n"
    "flight within --shutdown-grace-ms and commits); a second signal exits at once. Nothing accepted is lost\n"
    "either way: an unfinished prompt is redelivered to the next worker.\n"
    "\n"
    "Examples:\n"
    "  asyncllm all --llm-base-url=http://127.0.0.1:11434/v1 --llm-model=llama3.2   # Ollama\n"
    "  OPENAI_API_KEY=sk-... asyncllm worker --max-in-flight=1024\n"
    "  curl -s -X POST localhost:8080/answer -d '{\"prompt\": \"Hello\"}'\n"
    "  curl -s 'localhost:8080/polling?conversationId=<id>'\n";

static struct config cfg;

/* An API thread's event loop. With epoll, the changelist batches the changes made to a descriptor's events during one
 * loop iteration into one epoll_ctl call. It was chosen for libevent's evhttp, which enabled and disabled a
 * connection's events several times per request (18.2 -> 15.0 us of CPU per /healthz, bench/ANALYSIS.md); our
 * HTTP server (http.c) changes none per request, but hiredis still arms and disarms writing per command batch. Only for
 * the API: libevent warns that the changelist can be confused by descriptors closed and reused within one iteration,
 * which libcurl does on the worker's loop. */
static struct event_base *loop_new(void)
{
    struct event_config *ec = event_config_new();
    event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    struct event_base *base = event_base_new_with_config(ec);
    event_config_free(ec);
    return base ? base : event_base_new();
}

/* ---------------------------------------------------------------- API role */

/* One API instance on its own thread and loop. The main thread asks it to stop by writing a byte to its pipe. */
struct api_role {
    struct event_base *base;
    struct api *api;
    struct event *stop_ev, *wait_ev;
    int64_t stop_deadline;
    int stop_fd[2];
    pthread_t thr;
    bool started;
};

static void api_wait_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct api_role *r = arg;
    if (api_pending(r->api) == 0 || --r->stop_deadline <= 0) {
        event_base_loopbreak(r->base);
        return;
    }
    struct timeval tv = {0, 50 * 1000};
    evtimer_add(r->wait_ev, &tv);
}

static void api_stop_pipe_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    struct api_role *r = arg;
    char b;
    if (read(fd, &b, 1) < 0) {
        /* nothing to do: the byte only wakes us */
    }
    if (r->wait_ev)
        return;
    log_info("api: stopping; answering %d request(s) still waiting", api_pending(r->api));
    api_stop_listening(r->api);
    r->stop_deadline = cfg.request_timeout_ms / 50 + 2; /* each waiting submit answers by its deadline */
    r->wait_ev = evtimer_new(r->base, api_wait_cb, r);
    api_wait_cb(-1, 0, r);
}

static void *api_thread_main(void *arg)
{
    struct api_role *r = arg;
    event_base_dispatch(r->base);
    api_free(r->api);
    r->api = NULL;
    return NULL;
}

/* Creates the API on a new loop, listening on port (-1: configured). */
static int api_role_init(struct api_role *r, int port)
{
    char err[512];
    memset(r, 0, sizeof *r);
    r->stop_fd[0] = r->stop_fd[1] = -1;
    r->base = loop_new();
    r->api = api_new(r->base, &cfg, port, err, sizeof err);
    if (!r->api) {
        log_error("api: %s", err);
        return -1;
    }
    if (pipe(r->stop_fd)) {
        log_error("pipe failed");
        return -1;
    }
    r->stop_ev = event_new(r->base, r->stop_fd[0], EV_READ, api_stop_pipe_cb, r);
    event_add(r->stop_ev, NULL);
    return 0;
}

static void api_role_stop(struct api_role *r)
{
    if (r->stop_fd[1] >= 0 && write(r->stop_fd[1], "x", 1) < 0)
        log_warn("cannot signal an API thread");
}

static void api_role_free(struct api_role *r)
{
    if (r->started)
        pthread_join(r->thr, NULL);
    else
        api_free(r->api);
    if (r->wait_ev)
        event_free(r->wait_ev);
    if (r->stop_ev)
        event_free(r->stop_ev);
    for (int i = 0; i < 2; i++)
        if (r->stop_fd[i] >= 0)
            close(r->stop_fd[i]);
    if (r->base)
        event_base_free(r->base);
}

static void ensure_topics(void)
{
    char err[512];
    if (kafka_ensure_topics(&cfg, 15000, err, sizeof err))
        log_warn("kafka: could not check or create topics (%s); continuing, topics may be created later", err);
}

/* ---------------------------------------------------------------- signals */

struct main_ctx {
    struct event_base *base;
    struct worker *worker;
    struct api_role *apis; /* the API threads */
    int napis;
    /* an interested party (webhooks, ...): its drain function and object */
    void (*party_drain)(void *obj, void (*on_drained)(void *), void *arg);
    void *party;
    int signals;
};

static void drained_cb(void *arg)
{
    struct main_ctx *m = arg;
    event_base_loopbreak(m->base);
}

static void signal_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    struct main_ctx *m = arg;
    if (++m->signals > 1) {
        log_warn("second signal: exiting now (unfinished prompts will be redelivered)");
        _exit(1);
    }
    log_info("%s received: shutting down gracefully (send it again to exit at once)", strsignal((int)sig));
    for (int i = 0; i < m->napis; i++)
        api_role_stop(&m->apis[i]);
    if (m->worker)
        worker_drain(m->worker, drained_cb, m);
    if (m->party)
        m->party_drain(m->party, drained_cb, m);
    if (!m->worker && !m->party)
        event_base_loopbreak(m->base); /* the API threads stop by themselves; run() joins them */
}

/* A role that is one interested party on its own loop (src/party/roles.h). */
static int run_party(const struct party_role *role)
{
    char err[512];
    log_set_role(role->name);
    ensure_topics();
    struct main_ctx m = {0};
    m.base = event_base_new();
    void *obj = role->create(m.base, &cfg, err, sizeof err);
    if (!obj) {
        log_error("%s: %s", role->name, err);
        event_base_free(m.base);
        return 2;
    }
    m.party = obj;
    m.party_drain = role->drain;
    struct event *sigint = evsignal_new(m.base, SIGINT, signal_cb, &m);
    struct event *sigterm = evsignal_new(m.base, SIGTERM, signal_cb, &m);
    event_add(sigint, NULL);
    event_add(sigterm, NULL);
    event_base_dispatch(m.base);
    event_free(sigint);
    event_free(sigterm);
    role->destroy(obj);
    event_base_free(m.base);
    log_info("stopped");
    return 0;
}

/* ---------------------------------------------------------------- main */

static int run(const char *role)
{
    bool want_api = strcmp(role, "api") == 0 || strcmp(role, "all") == 0;
    bool want_worker = strcmp(role, "worker") == 0 || strcmp(role, "all") == 0;
    char err[512];
    int rc = 1;

    log_set_role(role);
    ensure_topics();
    struct main_ctx m = {0};
    m.base = event_base_new();
    if (want_api) {
        m.napis = (int)cfg.http_threads;
        m.apis = calloc((size_t)m.napis, sizeof *m.apis);
        int port = -1;
        for (int i = 0; i < m.napis; i++) {
            if (api_role_init(&m.apis[i], port)) {
                m.napis = i + 1;
                goto out;
            }
            port = api_port(m.apis[i].api); /* the others share it (SO_REUSEPORT), even if 0 was asked */
        }
        log_info("api: listening on http://%s:%d with %d thread(s) (POST /answer, GET /polling, /v1/responses)",
                 cfg.http_addr, port, m.napis);
    }
    if (want_worker) {
        m.worker = worker_new(m.base, &cfg, err, sizeof err);
        if (!m.worker) {
            log_error("worker: %s", err);
            goto out;
        }
    }
    /* Signals go to the main thread only: block them while the API threads start (they inherit the mask). */
    sigset_t set, old;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    for (int i = 0; i < m.napis; i++) {
        m.apis[i].started = pthread_create(&m.apis[i].thr, NULL, api_thread_main, &m.apis[i]) == 0;
        if (!m.apis[i].started) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            log_error("cannot start an API thread");
            goto out;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    struct event *sigint = evsignal_new(m.base, SIGINT, signal_cb, &m);
    struct event *sigterm = evsignal_new(m.base, SIGTERM, signal_cb, &m);
    event_add(sigint, NULL);
    event_add(sigterm, NULL);
    event_base_dispatch(m.base);
    event_free(sigint);
    event_free(sigterm);
    rc = 0;
out:
    for (int i = 0; i < m.napis; i++)
        api_role_stop(&m.apis[i]);
    for (int i = 0; i < m.napis; i++)
        api_role_free(&m.apis[i]); /* joins the thread, which freed its API */
    free(m.apis);
    worker_free(m.worker);
    event_base_free(m.base);
    log_info("stopped");
    return rc;
}

int main(int argc, char **argv)
{
    char err[512];
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        fputs(usage, argc < 2 ? stderr : stdout);
        config_print_help(argc < 2 ? stderr : stdout);
        fputs(usage_tail, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (party_role_args(cmd, &argc, argv, err, sizeof err)) { /* exec's command, tail's options */
        fprintf(stderr, "asyncllm: %s\n", err);
        return 2;
    }
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(usage, stdout);
            config_print_help(stdout);
            fputs(usage_tail, stdout);
            return 0;
        }
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("asyncllm %s\n", ASYNCLLM_VERSION);
        return 0;
    }
    if (strcmp(cmd, "config") == 0) {
        config_print_markdown(stdout);
        return 0;
    }
    if (config_load(&cfg, argc, argv, 2, err, sizeof err)) {
        fprintf(stderr, "asyncllm: %s\n", err);
        return 2;
    }
    if (log_set_level(cfg.log_level)) {
        fprintf(stderr, "asyncllm: unknown log level '%s' (debug, info, warn, error)\n", cfg.log_level);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    /* Thousands of LLM calls and client connections need as many descriptors. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (strcmp(cmd, "topics") == 0) {
        log_set_role("topics");
        if (kafka_ensure_topics(&cfg, 60000, err, sizeof err)) {
            log_error("kafka: %s", err);
            return 1;
        }
        log_info("topics %s, %s and %s exist", cfg.topic_prompts, cfg.topic_responses, cfg.topic_dlq);
        return 0;
    }
    if (strcmp(cmd, "api") == 0 || strcmp(cmd, "worker") == 0 || strcmp(cmd, "all") == 0)
        return run(cmd);
    if (party_role_find(cmd))
        return run_party(party_role_find(cmd));
    if (strcmp(cmd, "tail") == 0) {
        log_set_role("tail");
        return party_role_tail(&cfg);
    }
    fprintf(stderr, "asyncllm: unknown command '%s' (see asyncllm --help)\n", cmd);
    return 2;
}
