/* metrics.c - see metrics.h. */
#include "core/metrics.h"

#include <event2/buffer.h>

static const double bounds[HIST_BUCKETS - 1] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120};

void hist_observe(struct hist *h, double seconds)
{
    int i = 0;
    while (i < HIST_BUCKETS - 1 && seconds > bounds[i])
        i++;
    h->counts[i]++;
    h->sum += seconds;
    h->count++;
}

static void head(struct evbuffer *out, const char *name, const char *help, const char *type)
{
    evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metric_counter(struct evbuffer *out, const char *name, const char *help, double value)
{
    head(out, name, help, "counter");
    evbuffer_add_printf(out, "%s %.17g\n", name, value);
}

void metric_gauge(struct evbuffer *out, const char *name, const char *help, double value)
{
    head(out, name, help, "gauge");
    evbuffer_add_printf(out, "%s %.17g\n", name, value);
}

void metric_hist(struct evbuffer *out, const char *name, const char *help, const struct hist *h)
{
    head(out, name, help, "histogram");
    uint64_t cum = 0;
    for (int i = 0; i < HIST_BUCKETS - 1; i++) {
        cum += h->counts[i];
        evbuffer_add_printf(out, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i], (unsigned long long)cum);
    }
    cum += h->counts[HIST_BUCKETS - 1];
    evbuffer_add_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.17g\n%s_count %llu\n", name,
                        (unsigned long long)cum, name, h->sum, name, (unsigned long long)h->count);
}
