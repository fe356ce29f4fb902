/* metrics.h - Prometheus text exposition helpers: a fixed-bucket histogram and line writers over an evbuffer. */
#ifndef ASYNCLLM_METRICS_H
#define ASYNCLLM_METRICS_H

#include <stdint.h>

struct evbuffer;

#define HIST_BUCKETS 14

/* Latency histogram in seconds with fixed upper bounds (see metrics.c), plus sum and count. */
struct hist {
    uint64_t counts[HIST_BUCKETS]; /* non-cumulative; the last bucket is +Inf */
    double sum;
    uint64_t count;
};

void hist_observe(struct hist *h, double seconds);
/* Writes "# HELP", "# TYPE" and the lines of one metric. */
void metric_counter(struct evbuffer *out, const char *name, const char *help, double value);
void metric_gauge(struct evbuffer *out, const char *name, const char *help, double value);
void metric_hist(struct evbuffer *out, const char *name, const char *help, const struct hist *h);

#endif
