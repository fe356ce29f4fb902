/*
 * The pure half of fakellm: words, directives, and the text of chat
 * messages. Nothing here does I/O or touches libevent, so a unit test can
 * include this file and call any function.
 *
 * fakellm.c includes this file rather than linking it: the program stays
 * one translation unit and builds with a single gcc line. Do not compile it
 * on its own (every function is static).
 *
 * Ownership: functions that return char * return memory from xmalloc that
 * the caller frees; json_t arguments are borrowed.
 */
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#define MAX_LATENCY_MS 3600000L /* an hour: longer waits are typos */

/* The out-of-memory policy of the whole tool, libevent's and jansson's
 * allocations included: a test server has nothing better to do than stop
 * loudly. */
static void *xmalloc(size_t size)
{
    void *p = malloc(size ? size : 1);
    if (p == NULL) {
        fputs("fakellm: out of memory\n", stderr);
        abort();
    }
    return p;
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) {
        fputs("fakellm: out of memory\n", stderr);
        abort();
    }
    return p;
}

static void *xrealloc(void *old, size_t size)
{
    void *p = realloc(old, size ? size : 1);
    if (p == NULL) {
        fputs("fakellm: out of memory\n", stderr);
        abort();
    }
    return p;
}

/* Parses a whole decimal number of bounded size; returns 0 or -1. */
static int parse_long(const char *s, size_t len, long min, long max, long *out)
{
    char buf[32], *end;
    if (len == 0 || len >= sizeof(buf))
        return -1;
    memcpy(buf, s, len);
    buf[len] = '\0';
    errno = 0;
    long v = strtol(buf, &end, 10);
    if (errno || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------------
 * Words and directives.
 */

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* Returns the offset just past the first word that starts at or after pos,
 * or len when only whitespace is left. */
static size_t word_end(const char *s, size_t len, size_t pos)
{
    while (pos < len && is_space(s[pos]))
        pos++;
    while (pos < len && !is_space(s[pos]))
        pos++;
    return pos;
}

static long count_words(const char *s, size_t len)
{
    long n = 0;
    bool in_word = false;
    for (size_t i = 0; i < len; i++) {
        bool space = is_space(s[i]);
        n += !space && !in_word;
        in_word = !space;
    }
    return n;
}

struct directives {
    const char *reply; /* not NUL-terminated; NULL without [[reply=]] */
    size_t reply_len;
    long latency_ms;  /* -1: not given */
    long status;      /* 0: not given */
    long fail_times;  /* -1: not given */
    long retry_after; /* seconds */
    bool hang, malformed;
};

/* Applies one directive; returns 1 if the name is not ours, 0 when applied,
 * -1 for a bad value. */
static int directive_apply(struct directives *d, const char *name, size_t name_len, const char *value, size_t value_len,
                           bool has_value)
{
#define IS(lit) (name_len == sizeof(lit) - 1 && memcmp(name, lit, name_len) == 0)
    if (IS("reply")) {
        if (!has_value)
            return -1;
        d->reply = value;
        d->reply_len = value_len;
        return 0;
    }
    if (IS("hang") || IS("malformed")) {
        if (has_value)
            return -1;
        *(IS("hang") ? &d->hang : &d->malformed) = true;
        return 0;
    }
    if (IS("latency"))
        return parse_long(value, value_len, 0, MAX_LATENCY_MS, &d->latency_ms);
    if (IS("status"))
        return parse_long(value, value_len, 400, 599, &d->status);
    if (IS("fail-times"))
        return parse_long(value, value_len, 0, LONG_MAX, &d->fail_times);
    if (IS("retry-after"))
        return parse_long(value, value_len, 0, 86400, &d->retry_after);
    return 1;
#undef IS
}

/*
 * Reads the directives out of text. *stripped receives a malloc'd copy of
 * text without them and without surrounding whitespace (the caller frees
 * it). Unknown [[...]] are kept as text. Returns 0, or -1 with a message
 * in err when a directive has a bad value.
 */
static int directives_parse(const char *text, size_t len, struct directives *d, char **stripped, size_t *stripped_len,
                            char *err, size_t errlen)
{
    char *out = xmalloc(len + 1);
    size_t n = 0, i = 0;
    *d = (struct directives){.latency_ms = -1, .fail_times = -1, .retry_after = 1};
    while (i < len) {
        const char *open = i + 1 < len ? memmem(text + i, len - i, "[[", 2) : NULL;
        const char *close = open ? memmem(open + 2, (size_t)(text + len - open - 2), "]]", 2) : NULL;
        if (close == NULL) {
            memcpy(out + n, text + i, len - i);
            n += len - i;
            break;
        }
        const char *name = open + 2, *eq = memchr(name, '=', (size_t)(close - name));
        size_t name_len = (size_t)((eq ? eq : close) - name);
        const char *value = eq ? eq + 1 : close;
        int rc = directive_apply(d, name, name_len, value, (size_t)(close - value), eq != NULL);
        if (rc < 0) {
            snprintf(err, errlen, "bad directive '%.*s'", (int)(close + 2 - open), open);
            free(out);
            return -1;
        }
        size_t keep = (size_t)(open - (text + i)) + (rc == 1 ? 2 : 0);
        memcpy(out + n, text + i, keep);
        n += keep;
        i = (size_t)((rc == 1 ? open + 2 : close + 2) - text);
    }
    size_t start = 0;
    while (start < n && is_space(out[start]))
        start++;
    while (n > start && is_space(out[n - 1]))
        n--;
    memmove(out, out + start, n - start);
    out[n - start] = '\0';
    *stripped = out;
    *stripped_len = n - start;
    return 0;
}

/* ------------------------------------------------------------------------
 * Requests: validation and the text of messages.
 */

/* Text parts of a content value: a string, or a list of {type, text}. */
static bool content_valid(json_t *content)
{
    size_t i;
    json_t *part;
    if (content == NULL || json_is_null(content) || json_is_string(content))
        return true;
    if (!json_is_array(content))
        return false;
    json_array_foreach(content, i, part)
    {
        if (!json_is_object(part) || !json_is_string(json_object_get(part, "type")))
            return false;
        json_t *text = json_object_get(part, "text");
        if (text != NULL && !json_is_string(text))
            return false;
    }
    return true;
}

/* The text of a content part, or NULL for parts that are not text
 * (images, audio): those carry no words. */
static json_t *part_text(json_t *part)
{
    json_t *type = json_object_get(part, "type"), *text = json_object_get(part, "text");
    return json_is_string(type) && strcmp(json_string_value(type), "text") == 0 && json_is_string(text) ? text : NULL;
}

static long content_words(json_t *content)
{
    size_t i;
    json_t *part;
    long n = 0;
    if (json_is_string(content))
        return count_words(json_string_value(content), json_string_length(content));
    json_array_foreach(content, i, part)
    {
        json_t *text = part_text(part);
        if (text)
            n += count_words(json_string_value(text), json_string_length(text));
    }
    return n;
}

/* Returns the text of a content value (the caller frees it); the text
 * parts of a list are joined with newlines, null content is "". */
static char *content_text(json_t *content, size_t *len)
{
    size_t i, n = 0;
    json_t *part;
    char *out;
    if (json_is_string(content)) {
        *len = json_string_length(content);
        out = xmalloc(*len + 1);
        memcpy(out, json_string_value(content), *len + 1);
        return out;
    }
    json_array_foreach(content, i, part) n += json_string_length(part_text(part)) + 1;
    out = xmalloc(n + 1);
    n = 0;
    json_array_foreach(content, i, part)
    {
        json_t *text = part_text(part);
        if (text == NULL)
            continue;
        if (n > 0)
            out[n++] = '\n';
        memcpy(out + n, json_string_value(text), json_string_length(text));
        n += json_string_length(text);
    }
    out[n] = '\0';
    *len = n;
    return out;
}

static bool role_known(const char *role)
{
    static const char *const roles[] = {"system", "developer", "user", "assistant", "tool", "function"};
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++)
        if (strcmp(role, roles[i]) == 0)
            return true;
    return false;
}

/* Checks a request body; returns 0 or -1 with the reason in err. */
static int request_check(json_t *body, char *err, size_t errlen)
{
    json_t *messages = json_object_get(body, "messages"), *msg;
    size_t i;
    json_t *model = json_object_get(body, "model");
    if (model != NULL && !json_is_string(model)) {
        snprintf(err, errlen, "'model' must be a string");
        return -1;
    }
    if (!json_is_array(messages) || json_array_size(messages) == 0) {
        snprintf(err, errlen, "'messages' must be a non-empty array");
        return -1;
    }
    json_array_foreach(messages, i, msg)
    {
        json_t *role = json_object_get(msg, "role");
        if (!json_is_object(msg) || !json_is_string(role) || !role_known(json_string_value(role)) ||
            !content_valid(json_object_get(msg, "content"))) {
            snprintf(err, errlen, "messages[%zu] needs a known 'role' and a string or text-parts 'content'", i);
            return -1;
        }
    }
    return 0;
}
