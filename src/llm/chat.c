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

int chat_parse_response(const char *body, size_t len, struct chat_result *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
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
