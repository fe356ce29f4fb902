/* exec.c - see exec.h.
 *
 * Processes. COMMAND is started with posix_spawnp() in its own process group (so that killing it also kills
 * what a shell script started), with pipes for stdin and stdout whose ends are non-blocking and watched by the
 * party's event loop; SIGPIPE is reset to its default for it. SIGCHLD (a libevent signal event) reaps it:
 * waitid(WNOWAIT) first, so that the group is killed while its id cannot have been reused, then waitpid().
 * All the consequences of a death (which message to blame, restart) happen there, in one place, whatever
 * caused it: a crash, our SIGKILL after a timeout, or a command that closed its stdout (killed 1 s later).
 *
 * Long-running mode. Messages are written to the command as they come (up to exec-max-in-flight at once, the
 * party's limit) and wait in the command's FIFO for their result line. Only the head of the FIFO has a
 * deadline, exec-timeout-ms from when it became the head, because the command answers in order: a message
 * queued behind a slow one is not late. When the command dies, the head is the message it was working on:
 * that one counts a failed attempt; the others are given back, in order, to the next instance. The command is
 * restarted after a backoff that grows while it keeps dying without answering.
 *
 * Per message. A failed attempt (crash, timeout, a result that is not JSON, a non-zero exit) is retried after
 * exec-retry-base-ms, doubling, up to exec-max-attempts; then the original message goes to
 * topic-postprocess-dlq with headers saying why. After the result (or the dead letter) is acknowledged, a
 * marker asyncllm:done:exec:<group>:<conversation>:<turn> is set in Redis, and a redelivered message whose
 * marker is set is skipped: each turn is post-processed once per group, unless the process dies between the
 * ack and the marker (at least once). */
#include "party/exec.h"

#include "core/config.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/util.h"
#include "http/http.h"
#include "kafka/kafka.h"
#include "party/party.h"
#include "store/store.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define MAX_BACKOFF_MS 30000
#define EOF_GRACE_MS 1000

struct xmsg;

struct proc {
    struct exec *ex;
    pid_t pid;
    int in_fd, out_fd; /* our ends of its stdin and stdout; -1 once closed */
    struct event *in_ev, *out_ev, *deadline;
    struct evbuffer *out;     /* bytes waiting to be written to its stdin */
    struct buf line;          /* what it wrote since its last newline (per message: all it wrote) */
    struct xmsg *head, *tail; /* long-running: messages written, waiting for their result, in order */
    struct xmsg *single;      /* per message: its message */
    char why[256];            /* why we killed it */
    bool killed, eof, broken;
    struct proc *next;
};

enum xstate { X_TEST, X_QUEUED, X_SENT, X_BACKOFF, X_PRODUCE, X_MARK };

struct xmsg {
    struct exec *ex;
    struct party *p;
    struct party_msg *m;
    char *line; /* the message as one line of JSON, with its newline */
    size_t line_len;
    char conv_id[72];
    char marker[256]; /* "" when the message names no turn */
    long turn;
    int attempts;
    enum xstate state;
    bool dlq;    /* what is produced is the dead letter, not a result */
    char *value; /* what is being produced */
    size_t value_len;
    char why[256];
    struct proc *proc;
    struct xmsg *next; /* on the ready queue or a proc's FIFO */
    struct event *timer;
    bool busy; /* a Redis reply or a delivery report is due */
    bool abandoned;
};

struct exec {
    struct event_base *base;
    const struct config *cfg;
    char **argv;
    struct party *party;
    struct kafka_producer *kp;
    struct store *st;
    struct http_server *metrics;
    struct event *sigchld, *restart_ev;
    struct proc *procs; /* every process not yet reaped */
    struct proc *hook;  /* long-running: the current instance, NULL while restarting */
    struct xmsg *ready, *ready_tail;
    int deaths_in_row;
    unsigned long results, skipped, retries, dead_lettered, restarts, timeouts, empty;
};

static void pump(struct exec *ex);
static void step(struct xmsg *x);
static void proc_kill(struct proc *pr, const char *why);

/* ---------------------------------------------------------------- messages */

static void xmsg_finish(struct xmsg *x)
{
    struct party *p = x->p;
    struct party_msg *m = x->m;
    event_free(x->timer);
    free(x->line);
    free(x->value);
    free(x);
    party_done(p, m);
}

static int64_t backoff_ms(const struct exec *ex, int n)
{
    int64_t d = ex->cfg->exec_retry_base_ms << (n - 1 < 16 ? (n > 0 ? n - 1 : 0) : 16);
    return d > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : d;
}

static void timer_in(struct event *ev, int64_t ms)
{
    struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
    evtimer_add(ev, &tv);
}

static void ready_push(struct exec *ex, struct xmsg *x, bool front)
{
    x->state = X_QUEUED;
    x->next = NULL;
    if (front) {
        x->next = ex->ready;
        ex->ready = x;
        if (!ex->ready_tail)
            ex->ready_tail = x;
    } else {
        if (ex->ready_tail)
            ex->ready_tail->next = x;
        else
            ex->ready = x;
        ex->ready_tail = x;
    }
}

static void ready_remove(struct exec *ex, struct xmsg *x)
{
    struct xmsg *prev = NULL;
    for (struct xmsg *i = ex->ready; i; prev = i, i = i->next) {
        if (i != x)
            continue;
        if (prev)
            prev->next = x->next;
        else
            ex->ready = x->next;
        if (ex->ready_tail == x)
            ex->ready_tail = prev;
        return;
    }
}

/* An attempt failed: retry it later, or dead-letter it after the last one. */
static void attempt_failed(struct xmsg *x, const char *why)
{
    struct exec *ex = x->ex;
    x->proc = NULL;
    snprintf(x->why, sizeof x->why, "%s", why);
    if (x->attempts >= ex->cfg->exec_max_attempts) {
        log_warn("conversation %s turn %ld: giving up after %d attempt(s): %s", x->conv_id, x->turn, x->attempts, why);
        x->dlq = true;
        x->state = X_PRODUCE;
        step(x);
        return;
    }
    ex->retries++;
    int64_t delay = backoff_ms(ex, x->attempts);
    log_info("conversation %s turn %ld: attempt %d failed (%s); retry in %lld ms", x->conv_id, x->turn, x->attempts,
             why, (long long)delay);
    x->state = X_BACKOFF;
    timer_in(x->timer, delay);
}

/* A result line for x: produce it (a JSON value), or nothing for null. */
static void got_result(struct xmsg *x, const char *line, size_t len)
{
    struct exec *ex = x->ex;
    x->proc = NULL;
    json_error_t jerr;
    json_t *v = json_loadb(line, len, JSON_DECODE_ANY, &jerr);
    if (!v) {
        char why[256];
        snprintf(why, sizeof why, "the command's result is not JSON: %s", jerr.text);
        attempt_failed(x, why);
        return;
    }
    bool null = json_is_null(v);
    json_decref(v);
    if (null) {
        ex->empty++;
        x->state = X_MARK;
        step(x);
        return;
    }
    free(x->value);
    x->value = xstrndup(line, len);
    x->value_len = len;
    x->dlq = false;
    x->state = X_PRODUCE;
    step(x);
}

static void marker_cb(void *arg, int rc)
{
    struct xmsg *x = arg;
    x->busy = false;
    if (x->abandoned) {
        xmsg_finish(x);
        return;
    }
    if (rc == STORE_EUNAVAILABLE) {
        timer_in(x->timer, 500);
        return;
    }
    if (x->state == X_TEST && rc == 1) {
        log_debug("conversation %s turn %ld: done already", x->conv_id, x->turn);
        x->ex->skipped++;
        xmsg_finish(x);
        return;
    }
    if (x->state == X_TEST) {
        ready_push(x->ex, x, false);
        pump(x->ex);
        return;
    }
    xmsg_finish(x); /* X_MARK: done */
}

static void dr_cb(void *opaque, rd_kafka_resp_err_t err, int32_t partition, int64_t offset)
{
    (void)partition;
    (void)offset;
    struct xmsg *x = opaque;
    x->busy = false;
    if (x->abandoned) {
        xmsg_finish(x);
        return;
    }
    if (err) {
        log_warn("produce to %s failed (%s); retrying", x->dlq ? "the dead-letter topic" : "the results topic",
                 rd_kafka_err2str(err));
        timer_in(x->timer, 1000);
        return;
    }
    if (x->dlq)
        x->ex->dead_lettered++;
    else
        x->ex->results++;
    x->state = X_MARK;
    step(x);
}

static void produce(struct xmsg *x)
{
    struct exec *ex = x->ex;
    const struct config *cfg = ex->cfg;
    rd_kafka_headers_t *h = NULL;
    const char *topic = cfg->topic_postprocessed;
    const char *value = x->value;
    size_t len = x->value_len;
    if (x->dlq) {
        char n[16], ts[24], part[16], off[24];
        snprintf(n, sizeof n, "%d", x->attempts);
        snprintf(ts, sizeof ts, "%lld", (long long)now_ms());
        snprintf(part, sizeof part, "%" PRId32, x->m->partition);
        snprintf(off, sizeof off, "%" PRId64, x->m->offset);
        h = rd_kafka_headers_new(8);
        rd_kafka_header_add(h, "asyncllm-error-message", -1, x->why, -1);
        rd_kafka_header_add(h, "asyncllm-attempts", -1, n, -1);
        rd_kafka_header_add(h, "asyncllm-failed-at", -1, ts, -1);
        rd_kafka_header_add(h, "asyncllm-original-topic", -1, cfg->topic_responses, -1);
        rd_kafka_header_add(h, "asyncllm-original-partition", -1, part, -1);
        rd_kafka_header_add(h, "asyncllm-original-offset", -1, off, -1);
        rd_kafka_header_add(h, "asyncllm-command", -1, ex->argv[0], -1);
        topic = cfg->topic_postprocess_dlq;
        value = x->m->value;
        len = x->m->len;
    }
    rd_kafka_resp_err_t e =
        kafka_produce(ex->kp, topic, x->conv_id, strlen(x->conv_id), value ? value : "", value ? len : 0, h, x);
    if (e) {
        if (h)
            rd_kafka_headers_destroy(h);
        log_warn("produce to %s refused (%s); retrying", topic, rd_kafka_err2str(e));
        timer_in(x->timer, 1000);
        return;
    }
    x->busy = true;
}

/* Runs (or runs again, from its timer) the step x is at. */
static void step(struct xmsg *x)
{
    struct exec *ex = x->ex;
    switch (x->state) {
    case X_TEST:
        x->busy = true;
        store_marker_test(ex->st, x->marker, marker_cb, x);
        break;
    case X_BACKOFF:
        ready_push(ex, x, false);
        pump(ex);
        break;
    case X_PRODUCE:
        produce(x);
        break;
    case X_MARK:
        if (!x->marker[0]) {
            xmsg_finish(x);
            break;
        }
        x->busy = true;
        store_marker_set(ex->st, x->marker, ex->cfg->conversation_ttl_s, marker_cb, x);
        break;
    case X_QUEUED:
    case X_SENT:
        break;
    }
}

static void xtimer_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    step(arg);
}

/* ---------------------------------------------------------------- processes */

static void proc_close_io(struct proc *pr)
{
    if (pr->in_ev) {
        event_free(pr->in_ev);
        pr->in_ev = NULL;
    }
    if (pr->in_fd >= 0) {
        close(pr->in_fd);
        pr->in_fd = -1;
    }
}

static void proc_free(struct proc *pr)
{
    proc_close_io(pr);
    if (pr->out_ev)
        event_free(pr->out_ev);
    if (pr->out_fd >= 0)
        close(pr->out_fd);
    event_free(pr->deadline);
    evbuffer_free(pr->out);
    buf_free(&pr->line);
    free(pr);
}

static void proc_kill(struct proc *pr, const char *why)
{
    if (pr->killed)
        return;
    pr->killed = true;
    snprintf(pr->why, sizeof pr->why, "%s", why);
    kill(-pr->pid, SIGKILL);
    log_warn("command (pid %d) killed: %s", (int)pr->pid, why);
}

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct proc *pr = arg;
    if (!pr->single && (pr->eof || pr->broken)) {
        proc_kill(pr, pr->eof ? "it closed its standard output" : "it closed its standard input");
        return;
    }
    char why[128];
    snprintf(why, sizeof why, "timed out after %ld ms", pr->ex->cfg->exec_timeout_ms);
    pr->ex->timeouts++;
    proc_kill(pr, why);
}

/* The command stopped reading or writing but runs on: kill it if it does not exit by itself soon. */
static void proc_stalled(struct proc *pr)
{
    if (!pr->single)
        timer_in(pr->deadline, EOF_GRACE_MS);
}

static void write_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    struct proc *pr = arg;
    while (evbuffer_get_length(pr->out) > 0) {
        int n = evbuffer_write(pr->out, fd);
        if (n > 0)
            continue;
        if (n == 0 || errno == EAGAIN || errno == EINTR)
            return; /* the event stays armed */
        /* EPIPE: it closed its stdin (exiting, most likely) */
        evbuffer_drain(pr->out, evbuffer_get_length(pr->out));
        pr->broken = true;
        proc_close_io(pr);
        proc_stalled(pr);
        return;
    }
    event_del(pr->in_ev);
    if (pr->single)
        proc_close_io(pr); /* end of file: the whole message is written */
}

static void proc_write(struct proc *pr, const char *data, size_t len)
{
    if (pr->in_fd < 0)
        return;
    evbuffer_add(pr->out, data, len);
    write_cb(pr->in_fd, EV_WRITE, pr);
    if (pr->in_ev && evbuffer_get_length(pr->out) > 0)
        event_add(pr->in_ev, NULL);
}

/* Long-running: one complete line of output. */
static void proc_line(struct proc *pr, const char *line, size_t len)
{
    while (len && (line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t'))
        len--;
    if (len == 0)
        return;
    struct xmsg *x = pr->head;
    if (!x) {
        log_warn("command (pid %d) wrote a line nobody asked for; ignored", (int)pr->pid);
        return;
    }
    pr->head = x->next;
    if (!pr->head)
        pr->tail = NULL;
    evtimer_del(pr->deadline);
    if (pr->head)
        timer_in(pr->deadline, pr->ex->cfg->exec_timeout_ms);
    pr->ex->deaths_in_row = 0;
    if (x->abandoned) {
        xmsg_finish(x);
        return;
    }
    got_result(x, line, len);
}

static void proc_input(struct proc *pr, const char *data, size_t len)
{
    if (pr->single) {
        if (buf_append(&pr->line, data, len))
            proc_kill(pr, "its output is longer than exec-max-output-bytes");
        return;
    }
    while (len && !pr->killed) {
        const char *nl = memchr(data, '\n', len);
        size_t n = nl ? (size_t)(nl - data) : len;
        if (buf_append(&pr->line, data, n)) {
            proc_kill(pr, "it wrote a line longer than exec-max-output-bytes");
            return;
        }
        if (!nl)
            return;
        proc_line(pr, pr->line.data ? pr->line.data : "", pr->line.len);
        buf_reset(&pr->line);
        data += n + 1;
        len -= n + 1;
    }
}

/* Reads what is there. Returns false at end of file. */
static bool proc_read(struct proc *pr)
{
    char chunk[65536];
    while (pr->out_fd >= 0) {
        ssize_t n = read(pr->out_fd, chunk, sizeof chunk);
        if (n > 0) {
            if (!pr->killed)
                proc_input(pr, chunk, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return true;
        return false;
    }
    return false;
}

static void read_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct proc *pr = arg;
    if (proc_read(pr))
        return;
    pr->eof = true;
    event_del(pr->out_ev);
    proc_stalled(pr);
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* Starts the command. Returns NULL with a reason in why. */
static struct proc *proc_spawn(struct exec *ex, char *why, size_t whylen)
{
    int in[2] = {-1, -1}, out[2] = {-1, -1};
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC)) {
        snprintf(why, whylen, "pipe: %s", strerror(errno));
        for (int i = 0; i < 2; i++) {
            if (in[i] >= 0)
                close(in[i]);
            if (out[i] >= 0)
                close(out[i]);
        }
        return NULL;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0); /* dup2 clears close-on-exec on 0 and 1 only */
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawnattr_t at;
    posix_spawnattr_init(&at);
    sigset_t none, def;
    sigemptyset(&none);
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE); /* we ignore it; the command should not inherit that */
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &def);
    posix_spawnattr_setpgroup(&at, 0);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid;
    int rc = posix_spawnp(&pid, ex->argv[0], &fa, &at, ex->argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    close(in[0]);
    close(out[1]);
    if (rc) {
        snprintf(why, whylen, "cannot start %s: %s", ex->argv[0], strerror(rc));
        close(in[1]);
        close(out[0]);
        return NULL;
    }
    set_nonblock(in[1]);
    set_nonblock(out[0]);
    struct proc *pr = xcalloc(1, sizeof *pr);
    pr->ex = ex;
    pr->pid = pid;
    pr->in_fd = in[1];
    pr->out_fd = out[0];
    pr->out = evbuffer_new();
    buf_init(&pr->line, (size_t)ex->cfg->exec_max_output_bytes);
    pr->in_ev = event_new(ex->base, pr->in_fd, EV_WRITE | EV_PERSIST, write_cb, pr);
    pr->out_ev = event_new(ex->base, pr->out_fd, EV_READ | EV_PERSIST, read_cb, pr);
    pr->deadline = evtimer_new(ex->base, deadline_cb, pr);
    event_add(pr->out_ev, NULL);
    pr->next = ex->procs;
    ex->procs = pr;
    log_debug("command started (pid %d)", (int)pid);
    return pr;
}

/* Gives x to the command: writes it to the running one, or starts one for it. */
static void send_msg(struct exec *ex, struct xmsg *x)
{
    x->attempts++;
    x->state = X_SENT;
    x->next = NULL;
    if (ex->cfg->exec_per_message) {
        char why[256];
        struct proc *pr = proc_spawn(ex, why, sizeof why);
        if (!pr) {
            attempt_failed(x, why);
            return;
        }
        pr->single = x;
        x->proc = pr;
        timer_in(pr->deadline, ex->cfg->exec_timeout_ms);
        proc_write(pr, x->line, x->line_len);
        return;
    }
    struct proc *pr = ex->hook;
    x->proc = pr;
    if (pr->tail)
        pr->tail->next = x;
    else {
        pr->head = x;
        timer_in(pr->deadline, ex->cfg->exec_timeout_ms);
    }
    pr->tail = x;
    proc_write(pr, x->line, x->line_len);
}

static bool hook_usable(const struct proc *pr)
{
    return pr && !pr->killed && !pr->eof && !pr->broken;
}

static void start_hook(struct exec *ex)
{
    char why[256];
    ex->hook = proc_spawn(ex, why, sizeof why);
    if (ex->hook)
        return;
    log_error("%s", why);
    /* Each waiting message loses an attempt, so that a command gone for good ends in the dead letters. */
    while (ex->ready) {
        struct xmsg *x = ex->ready;
        ex->ready = x->next;
        if (!ex->ready)
            ex->ready_tail = NULL;
        x->attempts++;
        attempt_failed(x, why);
    }
    ex->deaths_in_row++;
    timer_in(ex->restart_ev, backoff_ms(ex, ex->deaths_in_row));
}

static void pump(struct exec *ex)
{
    if (!ex->cfg->exec_per_message && !ex->hook && !evtimer_pending(ex->restart_ev, NULL) && ex->ready)
        start_hook(ex);
    while (ex->ready && (ex->cfg->exec_per_message || hook_usable(ex->hook))) {
        struct xmsg *x = ex->ready;
        ex->ready = x->next;
        if (!ex->ready)
            ex->ready_tail = NULL;
        send_msg(ex, x);
    }
}

static void restart_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    struct exec *ex = arg;
    if (ex->hook)
        return;
    ex->restarts++;
    start_hook(ex);
    pump(ex);
}

static void describe_status(int status, char *out, size_t len)
{
    if (WIFEXITED(status))
        snprintf(out, len, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, len, "killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(out, len, "ended with wait status %d", status);
}

/* The process is reaped: settle its messages. */
static void proc_ended(struct exec *ex, struct proc *pr, int status)
{
    if (!pr->killed)
        proc_read(pr); /* what it wrote before it exited */
    char why[300];
    if (pr->killed)
        snprintf(why, sizeof why, "%s", pr->why);
    else
        describe_status(status, why, sizeof why);
    if (pr->single) {
        struct xmsg *x = pr->single;
        x->proc = NULL;
        if (x->abandoned)
            xmsg_finish(x);
        else if (!pr->killed && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            const char *s = pr->line.data ? pr->line.data : "";
            size_t n = pr->line.len;
            const char *nl = memchr(s, '\n', n);
            size_t first = nl ? (size_t)(nl - s) : n;
            while (first && (s[first - 1] == '\r' || s[first - 1] == ' ' || s[first - 1] == '\t'))
                first--;
            if (first == 0)
                attempt_failed(x, "the command wrote no result");
            else
                got_result(x, s, first);
        } else {
            attempt_failed(x, why);
        }
        proc_free(pr);
        return;
    }
    /* Long-running: blame the message it was working on, give the others back. */
    if (ex->hook == pr)
        ex->hook = NULL;
    struct xmsg *head = pr->head, *rest = head ? head->next : NULL;
    pr->head = pr->tail = NULL;
    if (head) {
        head->proc = NULL;
        if (head->abandoned)
            xmsg_finish(head);
        else
            attempt_failed(head, why);
    }
    struct xmsg *back = NULL, *back_tail = NULL;
    while (rest) {
        struct xmsg *x = rest;
        rest = x->next;
        x->proc = NULL;
        x->next = NULL;
        if (x->abandoned) {
            xmsg_finish(x);
            continue;
        }
        x->attempts--; /* not its fault */
        x->state = X_QUEUED;
        if (back_tail)
            back_tail->next = x;
        else
            back = x;
        back_tail = x;
    }
    if (back) {
        back_tail->next = ex->ready;
        if (!ex->ready)
            ex->ready_tail = back_tail;
        ex->ready = back;
    }
    proc_free(pr);
    ex->deaths_in_row++;
    int64_t delay = backoff_ms(ex, ex->deaths_in_row);
    log_warn("command %s (%s); restarting it in %lld ms", ex->argv[0], why, (long long)delay);
    timer_in(ex->restart_ev, delay);
}

static void sigchld_cb(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    struct exec *ex = arg;
    struct proc **pp = &ex->procs;
    while (*pp) {
        struct proc *pr = *pp;
        siginfo_t si;
        memset(&si, 0, sizeof si);
        if (waitid(P_PID, (id_t)pr->pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0 || si.si_pid == 0) {
            pp = &pr->next;
            continue;
        }
        kill(-pr->pid, SIGKILL); /* what it started in its group, while the group id is still its own */
        int status = 0;
        waitpid(pr->pid, &status, 0);
        *pp = pr->next; /* new processes go to the head of the list: pp stays valid */
        proc_ended(ex, pr, status);
    }
    pump(ex);
}

/* ---------------------------------------------------------------- party hooks */

static void process(void *ctx, struct party *p, struct party_msg *m)
{
    struct exec *ex = ctx;
    struct xmsg *x = xcalloc(1, sizeof *x);
    x->ex = ex;
    x->p = p;
    x->m = m;
    m->user = x;
    x->timer = evtimer_new(ex->base, xtimer_cb, x);
    json_t *v = json_loadb(m->value, m->len, 0, NULL);
    const char *conv = json_string_value(json_object_get(v, "conversation_id"));
    json_t *turn = json_object_get(v, "turn");
    snprintf(x->conv_id, sizeof x->conv_id, "%.64s", conv && conv_id_valid(conv, strlen(conv)) ? conv : m->key);
    x->turn = json_is_integer(turn) ? (long)json_integer_value(turn) : 0;
    if (conv && conv_id_valid(conv, strlen(conv)) && x->turn > 0)
        snprintf(x->marker, sizeof x->marker, "exec:%.80s:%s:%ld", ex->cfg->exec_group_id, conv, x->turn);
    if (!json_is_object(v)) {
        json_decref(v);
        x->attempts = 0;
        snprintf(x->why, sizeof x->why, "the message is not a JSON object");
        x->dlq = true;
        x->state = X_PRODUCE;
        step(x);
        return;
    }
    /* One line whatever the producer sent: compact JSON has no raw newline. */
    char *line = json_dumps(v, JSON_COMPACT);
    json_decref(v);
    x->line_len = strlen(line) + 1;
    x->line = xmalloc(x->line_len + 1);
    memcpy(x->line, line, x->line_len - 1);
    x->line[x->line_len - 1] = '\n';
    x->line[x->line_len] = '\0';
    free(line);
    if (x->marker[0]) {
        x->state = X_TEST;
        step(x);
    } else {
        ready_push(ex, x, false);
        pump(ex);
    }
}

static void abandon(void *ctx, struct party *p, struct party_msg *m)
{
    (void)p;
    struct exec *ex = ctx;
    struct xmsg *x = m->user;
    x->abandoned = true;
    if (x->busy)
        return; /* its callback finishes it */
    if (x->proc) {
        /* With the command: per message, stop it; long-running, its result will be dropped when it comes. */
        if (x->proc->single)
            proc_kill(x->proc, "its message was given up (rebalance or shutdown)");
        return;
    }
    if (x->state == X_QUEUED)
        ready_remove(ex, x);
    evtimer_del(x->timer);
    xmsg_finish(x);
}

/* ---------------------------------------------------------------- role */

static void metrics_cb(struct http_req *req, void *arg)
{
    struct exec *ex = arg;
    struct party_stats s;
    party_stats(ex->party, &s);
    struct evbuffer *out = evbuffer_new();
    metric_gauge(out, "asyncllm_exec_in_flight", "messages being post-processed", (double)s.in_flight);
    metric_gauge(out, "asyncllm_exec_buffered", "messages held in memory", (double)s.buffered);
    metric_counter(out, "asyncllm_exec_consumed_total", "response messages consumed", (double)s.consumed);
    metric_counter(out, "asyncllm_exec_results_total", "results acknowledged on the results topic",
                   (double)ex->results);
    metric_counter(out, "asyncllm_exec_null_results_total", "messages the command answered with null",
                   (double)ex->empty);
    metric_counter(out, "asyncllm_exec_skipped_total", "redelivered messages already done", (double)ex->skipped);
    metric_counter(out, "asyncllm_exec_retries_total", "failed attempts retried", (double)ex->retries);
    metric_counter(out, "asyncllm_exec_dead_lettered_total", "messages dead-lettered", (double)ex->dead_lettered);
    metric_counter(out, "asyncllm_exec_timeouts_total", "commands killed for taking too long", (double)ex->timeouts);
    metric_counter(out, "asyncllm_exec_restarts_total", "long-running command restarts", (double)ex->restarts);
    size_t len = evbuffer_get_length(out);
    http_reply(req, 200, "text/plain; version=0.0.4", len ? (const char *)evbuffer_pullup(out, -1) : "", len);
    evbuffer_free(out);
}

/* True if file names an executable, directly or through PATH (as posix_spawnp will look it up). */
static bool findable(const char *file)
{
    if (strchr(file, '/'))
        return access(file, X_OK) == 0;
    const char *path = getenv("PATH");
    for (const char *s = path ? path : "/usr/bin:/bin"; *s;) {
        size_t n = strcspn(s, ":");
        char full[4096];
        snprintf(full, sizeof full, "%.*s/%s", (int)(n ? n : 1), n ? s : ".", file);
        struct stat sb;
        if (stat(full, &sb) == 0 && S_ISREG(sb.st_mode) && access(full, X_OK) == 0)
            return true;
        s += n + (s[n] == ':');
    }
    return false;
}

static void free_argv(char **argv)
{
    for (char **a = argv; a && *a; a++)
        free(*a);
    free(argv);
}

struct exec *exec_new(struct event_base *base, const struct config *cfg, char *const *argv, char *err, size_t errlen)
{
    if (!argv || !argv[0] || !argv[0][0]) {
        snprintf(err, errlen, "no command: asyncllm exec [--setting=value...] -- COMMAND [ARGS...]");
        return NULL;
    }
    if (!findable(argv[0])) {
        snprintf(err, errlen, "command not found or not executable: %s", argv[0]);
        return NULL;
    }
    struct exec *ex = xcalloc(1, sizeof *ex);
    ex->base = base;
    ex->cfg = cfg;
    size_t n = 0;
    while (argv[n])
        n++;
    ex->argv = xcalloc(n + 1, sizeof *ex->argv);
    for (size_t i = 0; i < n; i++)
        ex->argv[i] = xstrdup(argv[i]);
    ex->sigchld = evsignal_new(base, SIGCHLD, sigchld_cb, ex);
    event_add(ex->sigchld, NULL);
    ex->restart_ev = evtimer_new(base, restart_cb, ex);
    ex->kp = kafka_producer_new(base, cfg, 1, dr_cb, err, errlen);
    if (!ex->kp)
        goto fail;
    kafka_producer_warm(ex->kp, cfg->topic_postprocessed);
    kafka_producer_warm(ex->kp, cfg->topic_postprocess_dlq);
    ex->st = store_new(base, cfg);
    if (!cfg->exec_per_message) {
        char why[256];
        ex->hook = proc_spawn(ex, why, sizeof why);
        if (!ex->hook) {
            snprintf(err, errlen, "%s", why);
            goto fail;
        }
    }
    /* Ordered: a conversation's results come out in the order of its responses. A new group starts at the
     * beginning of the topic, so that a party killed before its first commit misses nothing. */
    struct party_opts o = {cfg->exec_group_id, cfg->topic_responses, cfg->exec_max_in_flight, true, false};
    static const struct party_hooks hooks = {process, abandon};
    ex->party = party_new(base, cfg, &o, &hooks, ex, err, errlen);
    if (!ex->party)
        goto fail;
    if (cfg->metrics_port > 0) {
        int port;
        char merr[256];
        ex->metrics = http_server_new(base, cfg, cfg->metrics_addr, (int)cfg->metrics_port, metrics_cb, ex, &port, merr,
                                      sizeof merr);
        if (!ex->metrics)
            log_error("no metrics server: %s", merr);
    }
    log_info("group %s on %s: %s%s, results to %s, dead letters to %s", cfg->exec_group_id, cfg->topic_responses,
             ex->argv[0], cfg->exec_per_message ? " (one process per message)" : "", cfg->topic_postprocessed,
             cfg->topic_postprocess_dlq);
    return ex;
fail:
    exec_free(ex);
    return NULL;
}

void exec_drain(struct exec *ex, void (*on_drained)(void *arg), void *arg)
{
    party_drain(ex->party, on_drained, arg);
}

/* Waits up to ms for pid to exit, without reaping it (blocking: shutdown only). */
static void wait_exit(pid_t pid, int ms)
{
    for (int i = 0; i <= ms / 10; i++) {
        siginfo_t si;
        memset(&si, 0, sizeof si);
        if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0 || si.si_pid != 0)
            return;
        usleep(10000);
    }
}

void exec_free(struct exec *ex)
{
    if (!ex)
        return;
    if (ex->metrics)
        http_server_free(ex->metrics);
    party_free(ex->party); /* abandons what runs */
    /* The long-running command gets end of file and 2 s to exit; per-message ones were killed by abandon. */
    while (ex->procs) {
        struct proc *pr = ex->procs;
        ex->procs = pr->next;
        proc_close_io(pr);
        if (!pr->single)
            wait_exit(pr->pid, 2000);
        kill(-pr->pid, SIGKILL); /* the group too, before the leader is reaped and its id free */
        waitpid(pr->pid, NULL, 0);
        for (struct xmsg *x = pr->single ? pr->single : pr->head; x;) {
            struct xmsg *next = pr->single ? NULL : x->next;
            xmsg_finish(x); /* abandoned: party_done only frees it */
            x = next;
        }
        proc_free(pr);
    }
    store_free(ex->st);                /* answers pending Redis commands: abandoned messages are freed */
    kafka_producer_free(ex->kp, 5000); /* the last delivery reports, likewise */
    if (ex->sigchld)
        event_free(ex->sigchld);
    if (ex->restart_ev)
        event_free(ex->restart_ev);
    log_info("exec stopped: %lu results, %lu retries, %lu dead-lettered, %lu restarts", ex->results, ex->retries,
             ex->dead_lettered, ex->restarts);
    free_argv(ex->argv);
    free(ex);
}
