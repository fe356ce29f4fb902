/* chat.c - see chat.h. */
#include "llm/chat.h"

#include "core/jsonr.h"
#include "core/util.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

char *chat_request_new(const char *model, long max_tokens, const struct chat_msg *msgs, size_t n, size_t *len)
{
    struct chat_opts o = {.max_tokens = max_tokens, .temperature = -1, .top_p = -1};
    return chat_request_new_opts(model, &o, msgs, n, len);
}

/* A real number as jansson writes it ("%.17g", with ".0" when it would read as an integer). */
static void json_real_append(struct buf *b, double d)
{
    char num[40];
    int k = snprintf(num, sizeof num, "%.17g", d);
    buf_append(b, num, (size_t)k);
    if (!strpbrk(num, ".eE") && strcmp(num, "inf") && strcmp(num, "nan"))
        buf_append(b, ".0", 2);
}

char *chat_request_new_opts(const char *model, const struct chat_opts *o, const struct chat_msg *msgs, size_t n,
                            size_t *len)
{
    struct buf b;
    buf_init(&b, (size_t)-1);
    buf_append(&b, "{\"model\":", 9);
    buf_append_json_string(&b, model, strlen(model));
    buf_append(&b, ",\"messages\":[", 13);
    for (size_t i = 0; i < n; i++) {
        buf_append(&b, i ? ",{\"role\":" : "{\"role\":", i ? 9 : 8);
        buf_append_json_string(&b, msgs[i].role, strlen(msgs[i].role));
        buf_append(&b, ",\"content\":", 11);
        buf_append_json_string(&b, msgs[i].content ? msgs[i].content : "", msgs[i].content ? msgs[i].len : 0);
        buf_append(&b, "}", 1);
    }
    buf_append(&b, "]", 1);
    char num[32];
    if (o->max_tokens > 0) {
        int k = snprintf(num, sizeof num, ",\"max_tokens\":%ld", o->max_tokens);
        buf_append(&b, num, (size_t)k);
    }
    if (o->temperature >= 0) {
        buf_append(&b, ",\"temperature\":", 15);
        json_real_append(&b, o->temperature);
    }
    if (o->top_p >= 0) {
        buf_append(&b, ",\"top_p\":", 9);
        json_real_append(&b, o->top_p);
    }
    if (o->stream) {
        static const char st[] = ",\"stream\":true,\"stream_options\":{\"include_usage\":true}";
        buf_append(&b, st, sizeof st - 1);
    }
    buf_append(&b, "}", 1);
    *len = b.len;
    return b.data;
}

/* ---------------------------------------------------------------- reading a chat.completion
 *
 * An answer is read once per completion, and building a tree of it (jansson's or jsonr's) was most of the
 * worker's own work per prompt. skim_* below walks the text once, checks it as jansson would, and takes only
 * choices[0].message.content, choices[0].finish_reason, model and usage.*_tokens. It handles the common case
 * and gives up (SKIM_OTHER) on anything it is not sure to read as jansson does: an escaped key, a string
 * jsonr_string refuses, a number that could overflow, nesting deeper than 64, text that is not an object. parse_tree
 * then reads the text the old way, so the result never depends on which path read it. */

enum { SKIM_OTHER = -2 };

#define SKIM_COPIES 8

struct skim {
    const char *p, *end;
    struct buf str;            /* the last string read with escapes */
    char *copies[SKIM_COPIES]; /* strings of interest that had escapes, unescaped (freed with the skim) */
    int ncopies;
};

/* What one object of interest keeps: its members named as wanted, the last of each (as jansson keeps). */
struct skim_found {
    const char *s[3];
    size_t n[3];
    bool is_str[3], is_null[3], is_int[3], present[3];
    long long i[3];
};

static void skim_ws(struct skim *k)
{
    while (k->p < k->end && (*k->p == ' ' || *k->p == '\n' || *k->p == '\r' || *k->p == '\t'))
        k->p++;
}

/* A string at k->p (its opening quote). *s, *n: its text, in place, or in k->str when it has escapes (then
 * valid until the next string read). Returns 0 or SKIM_OTHER. */
static int skim_string(struct skim *k, const char **s, size_t *n, bool *escaped)
{
    k->p++;
    return jsonr_string(&k->p, k->end, &k->str, s, n, escaped) ? 0 : SKIM_OTHER;
}

/* A number at k->p, by JSON's grammar. *is_int and *i for an integer (no fraction, no exponent). Numbers that
 * might overflow (more than 18 digits, a longer real or a 3-digit exponent) are left to jansson. */
static int skim_number(struct skim *k, bool *is_int, long long *i)
{
    const char *q = k->p, *start = k->p;
    bool neg = false;
    long long v = 0;
    int digits = 0;
    *is_int = true;
    if (q < k->end && *q == '-') {
        neg = true;
        q++;
    }
    if (q < k->end && *q == '0') {
        q++;
        digits = 1;
    } else if (q < k->end && *q >= '1' && *q <= '9') {
        for (; q < k->end && *q >= '0' && *q <= '9'; q++, digits++)
            if (digits < 18) /* more digits are left to jansson below */
                v = v * 10 + (*q - '0');
    } else {
        return SKIM_OTHER;
    }
    if (digits > 18)
        return SKIM_OTHER;
    if (q < k->end && *q == '.') {
        *is_int = false;
        if (++q >= k->end || *q < '0' || *q > '9')
            return SKIM_OTHER;
        while (q < k->end && *q >= '0' && *q <= '9')
            q++;
    }
    if (q < k->end && (*q == 'e' || *q == 'E')) {
        *is_int = false;
        q++;
        if (q < k->end && (*q == '+' || *q == '-'))
            q++;
        const char *ed = q;
        while (q < k->end && *q >= '0' && *q <= '9')
            q++;
        if (q == ed || q - ed > 2)
            return SKIM_OTHER;
    }
    if (q - start > 40 || (q < k->end && (*q == '.' || *q == 'e' || *q == 'E' || (*q >= '0' && *q <= '9'))))
        return SKIM_OTHER;
    k->p = q;
    *i = neg ? -v : v;
    return 0;
}

enum skim_role { SK_NONE, SK_ROOT, SK_CHOICES, SK_CHOICE, SK_MESSAGE, SK_USAGE };

struct skim_out {
    struct skim_found root, choice, message, usage; /* root: model; choice: message (seen), finish_reason */
    bool has_choice;                                /* choices is an array with an element */
    bool choice_obj, message_obj, usage_obj;
};

static int skim_value(struct skim *k, int depth, enum skim_role role, struct skim_out *o, struct skim_found *f,
                      int slot);

static const char *const wanted[][3] = {
    [SK_ROOT] = {"model", "choices", "usage"},
    [SK_CHOICE] = {"message", "finish_reason", NULL},
    [SK_MESSAGE] = {"content", NULL, NULL},
    [SK_USAGE] = {"prompt_tokens", "completion_tokens", "total_tokens"},
};

/* The role of the member at slot of an object of role r. */
static enum skim_role member_role(enum skim_role r, int slot)
{
    if (r == SK_ROOT)
        return slot == 1 ? SK_CHOICES : slot == 2 ? SK_USAGE : SK_NONE;
    if (r == SK_CHOICE)
        return slot == 0 ? SK_MESSAGE : SK_NONE;
    return SK_NONE;
}

static struct skim_found *found_of(struct skim_out *o, enum skim_role r)
{
    return r == SK_ROOT ? &o->root : r == SK_CHOICE ? &o->choice : r == SK_MESSAGE ? &o->message : &o->usage;
}

static int skim_object(struct skim *k, int depth, enum skim_role r, struct skim_out *o)
{
    struct skim_found *mine = r == SK_NONE || r == SK_CHOICES ? NULL : found_of(o, r);
    if (mine)
        memset(mine, 0, sizeof *mine); /* a repeated member: the last one counts, whole */
    k->p++;
    skim_ws(k);
    if (k->p < k->end && *k->p == '}') {
        k->p++;
        return 0;
    }
    for (;;) {
        if (k->p >= k->end || *k->p != '"')
            return SKIM_OTHER;
        const char *key;
        size_t kl;
        bool esc;
        if (skim_string(k, &key, &kl, &esc))
            return SKIM_OTHER;
        int slot = -1;
        if (mine) {
            if (esc)
                return SKIM_OTHER; /* a key with escapes might be one we want */
            for (int i = 0; i < 3 && wanted[r][i]; i++)
                if (kl && key[0] == wanted[r][i][0] && strlen(wanted[r][i]) == kl && memcmp(wanted[r][i], key, kl) == 0)
                    slot = i;
        }
        skim_ws(k);
        if (k->p >= k->end || *k->p != ':')
            return SKIM_OTHER;
        k->p++;
        int rc = skim_value(k, depth + 1, slot >= 0 ? member_role(r, slot) : SK_NONE, o, slot >= 0 ? mine : NULL, slot);
        if (rc)
            return rc;
        skim_ws(k);
        if (k->p < k->end && *k->p == '}') {
            k->p++;
            return 0;
        }
        if (k->p >= k->end || *k->p != ',')
            return SKIM_OTHER;
        k->p++;
        skim_ws(k);
    }
}

static int skim_array(struct skim *k, int depth, enum skim_role r, struct skim_out *o)
{
    k->p++;
    skim_ws(k);
    if (k->p < k->end && *k->p == ']') {
        k->p++;
        return 0;
    }
    for (int idx = 0;; idx++) {
        int rc = skim_value(k, depth + 1, r == SK_CHOICES && idx == 0 ? SK_CHOICE : SK_NONE, o, NULL, -1);
        if (rc)
            return rc;
        if (r == SK_CHOICES && idx == 0)
            o->has_choice = true;
        skim_ws(k);
        if (k->p < k->end && *k->p == ']') {
            k->p++;
            return 0;
        }
        if (k->p >= k->end || *k->p != ',')
            return SKIM_OTHER;
        k->p++;
    }
}

static bool skim_literal(struct skim *k, const char *word, size_t n)
{
    if ((size_t)(k->end - k->p) < n || memcmp(k->p, word, n) != 0)
        return false;
    k->p += n;
    return true;
}

/* A value at k->p (after white space). role: what it is to the answer; f and slot: where a member of an
 * object of interest is noted (its type, and its text or integer). */
static int skim_value(struct skim *k, int depth, enum skim_role role, struct skim_out *o, struct skim_found *f,
                      int slot)
{
    if (depth > 64)
        return SKIM_OTHER;
    skim_ws(k);
    if (k->p >= k->end)
        return SKIM_OTHER;
    if (f) {
        f->present[slot] = true;
        f->is_str[slot] = f->is_null[slot] = f->is_int[slot] = false;
    }
    /* a member of interest that is not an object (or array) resets what an earlier one of that name gave */
    if (role == SK_CHOICES)
        o->has_choice = o->choice_obj = o->message_obj = false;
    if (role == SK_CHOICE)
        o->choice_obj = o->message_obj = false;
    if (role == SK_MESSAGE)
        o->message_obj = false;
    if (role == SK_USAGE)
        o->usage_obj = false;
    const char *s;
    size_t n;
    bool esc, is_int;
    long long i;
    int rc;
    switch (*k->p) {
    case '{':
        rc = skim_object(k, depth, role == SK_CHOICES ? SK_NONE : role, o);
        if (!rc && role == SK_CHOICE)
            o->choice_obj = true;
        if (!rc && role == SK_MESSAGE)
            o->message_obj = true;
        if (!rc && role == SK_USAGE)
            o->usage_obj = true;
        return rc;
    case '[':
        return skim_array(k, depth, role == SK_CHOICES ? SK_CHOICES : SK_NONE, o);
    case '"':
        rc = skim_string(k, &s, &n, &esc);
        if (!rc && f) {
            if (esc) { /* k->str is reused by the next string: keep a copy of this one */
                if (k->ncopies == SKIM_COPIES)
                    return SKIM_OTHER;
                s = k->copies[k->ncopies++] = xstrndup(s, n);
            }
            f->s[slot] = s;
            f->n[slot] = n;
            f->is_str[slot] = true;
        }
        return rc;
    case 't':
        return skim_literal(k, "true", 4) ? 0 : SKIM_OTHER;
    case 'f':
        return skim_literal(k, "false", 5) ? 0 : SKIM_OTHER;
    case 'n':
        if (!skim_literal(k, "null", 4))
            return SKIM_OTHER;
        if (f)
            f->is_null[slot] = true;
        return 0;
    default:
        rc = skim_number(k, &is_int, &i);
        if (!rc && f && is_int) {
            f->is_int[slot] = true;
            f->i[slot] = i;
        }
        return rc;
    }
}

/* 0 read, -1 not an answer (err set), SKIM_OTHER: read it with parse_tree. */
static int parse_skim(const char *body, size_t len, struct chat_result *out, char *err, size_t errlen)
{
    struct skim k = {body, body + len, {0}, {0}, 0};
    struct skim_out o;
    memset(&o, 0, sizeof o);
    skim_ws(&k);
    if (k.p >= k.end || *k.p != '{')
        return SKIM_OTHER;
    buf_init(&k.str, len + 1); /* unescaping only shortens a string */
    int rc = skim_value(&k, 1, SK_ROOT, &o, NULL, -1);
    skim_ws(&k);
    if (rc || k.p != k.end) {
        rc = SKIM_OTHER;
        goto done;
    }
    struct skim_found *m = &o.message, *c = &o.choice, *u = &o.usage;
    bool has_content = o.has_choice && o.choice_obj && o.message_obj && (m->is_str[0] || m->is_null[0]);
    if (!has_content) {
        snprintf(err, errlen, "the LLM's answer has no choices[0].message.content");
        rc = -1;
        goto done;
    }
    out->content_len = m->is_str[0] ? m->n[0] : 0;
    out->content = xstrndup(m->is_str[0] ? m->s[0] : "", out->content_len);
    out->finish_reason = xstrndup(c->is_str[1] ? c->s[1] : "", c->is_str[1] ? c->n[1] : 0);
    out->model = xstrndup(o.root.is_str[0] ? o.root.s[0] : "", o.root.is_str[0] ? o.root.n[0] : 0);
    if (o.usage_obj) {
        out->prompt_tokens = u->is_int[0] ? (long)u->i[0] : 0;
        out->completion_tokens = u->is_int[1] ? (long)u->i[1] : 0;
        out->total_tokens = u->is_int[2] ? (long)u->i[2] : 0;
    }
    if (out->total_tokens == 0)
        out->total_tokens = out->prompt_tokens + out->completion_tokens;
done:
    buf_free(&k.str);
    for (int i = 0; i < k.ncopies; i++)
        free(k.copies[i]);
    return rc;
}

static int parse_tree(const char *body, size_t len, struct chat_result *out, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = jsonr_loadb(body, len, &jerr);
    if (!root || !json_is_object(root)) {
        snprintf(err, errlen, "the LLM answered something that is not a JSON object");
        json_decref(root);
        return -1;
    }
    json_t *choice = json_array_get(json_object_get(root, "choices"), 0);
    json_t *content = json_object_get(json_object_get(choice, "message"), "content");
    if (!choice || !(json_is_string(content) || json_is_null(content))) {
        snprintf(err, errlen, "the LLM's answer has no choices[0].message.content");
        json_decref(root);
        return -1;
    }
    const char *text = json_is_string(content) ? json_string_value(content) : "";
    out->content_len = json_is_string(content) ? json_string_length(content) : 0;
    out->content = xstrndup(text, out->content_len);
    const char *fr = json_string_value(json_object_get(choice, "finish_reason"));
    out->finish_reason = xstrdup(fr ? fr : "");
    const char *model = json_string_value(json_object_get(root, "model"));
    out->model = xstrdup(model ? model : "");
    json_t *usage = json_object_get(root, "usage");
    out->prompt_tokens = (long)json_integer_value(json_object_get(usage, "prompt_tokens"));
    out->completion_tokens = (long)json_integer_value(json_object_get(usage, "completion_tokens"));
    out->total_tokens = (long)json_integer_value(json_object_get(usage, "total_tokens"));
    if (out->total_tokens == 0)
        out->total_tokens = out->prompt_tokens + out->completion_tokens;
    json_decref(root);
    return 0;
}

int chat_parse_response(const char *body, size_t len, struct chat_result *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    int rc = parse_skim(body, len, out, err, errlen);
    return rc == SKIM_OTHER ? parse_tree(body, len, out, err, errlen) : rc;
}

static void set_str(char **dst, const char *v)
{
    if (!v)
        return;
    free(*dst);
    *dst = xstrdup(v);
}

int chat_stream_chunk(struct chat_result *r, const char *data, size_t len, const char **delta, size_t *delta_len,
                      char *err, size_t errlen)
{
    *delta = "";
    *delta_len = 0;
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0)
        return 1;
    json_t *root = jsonr_loadb(data, len, NULL);
    if (!json_is_object(root)) {
        snprintf(err, errlen, "the LLM streamed something that is not a JSON chunk");
        json_decref(root);
        return -1;
    }
    json_t *e = json_object_get(root, "error");
    if (e) {
        const char *m = json_string_value(json_object_get(e, "message"));
        snprintf(err, errlen, "the LLM streamed an error: %s", m ? m : "(no message)");
        json_decref(root);
        return -1;
    }
    set_str(&r->model, json_string_value(json_object_get(root, "model")));
    json_t *choice = json_array_get(json_object_get(root, "choices"), 0);
    json_t *content = json_object_get(json_object_get(choice, "delta"), "content");
    if (json_is_string(content) && json_string_length(content) > 0) {
        size_t n = json_string_length(content);
        r->content = xrealloc(r->content, r->content_len + n + 1);
        memcpy(r->content + r->content_len, json_string_value(content), n);
        r->content_len += n;
        r->content[r->content_len] = '\0';
        *delta = r->content + r->content_len - n; /* the new text, inside r->content */
        *delta_len = n;
    }
    set_str(&r->finish_reason, json_string_value(json_object_get(choice, "finish_reason")));
    json_t *usage = json_object_get(root, "usage");
    if (json_is_object(usage)) {
        r->prompt_tokens = (long)json_integer_value(json_object_get(usage, "prompt_tokens"));
        r->completion_tokens = (long)json_integer_value(json_object_get(usage, "completion_tokens"));
        r->total_tokens = (long)json_integer_value(json_object_get(usage, "total_tokens"));
        if (r->total_tokens == 0)
            r->total_tokens = r->prompt_tokens + r->completion_tokens;
    }
    json_decref(root);
    return 0;
}

void chat_result_free(struct chat_result *r)
{
    free(r->content);
    free(r->finish_reason);
    free(r->model);
    memset(r, 0, sizeof *r);
}

void chat_error_summary(const char *body, size_t len, char *out, size_t outlen)
{
    json_t *root = jsonr_loadb(body, len, NULL);
    const char *msg = json_string_value(json_object_get(json_object_get(root, "error"), "message"));
    if (msg) {
        snprintf(out, outlen, "%s", msg);
    } else {
        size_t n = len < 200 ? len : 200;
        snprintf(out, outlen, "%.*s", (int)n, body);
        /* keep the summary printable: a control byte or a cut UTF-8 sequence is replaced by '?' */
        for (char *p = out; *p; p++)
            if ((unsigned char)*p < 0x20)
                *p = '?';
        while (!utf8_valid(out, strlen(out)) && strlen(out) > 0)
            out[strlen(out) - 1] = '\0';
    }
    json_decref(root);
}
