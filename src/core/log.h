/* log.h - leveled, one-line-per-event logging to stderr.
 *
 * The macros test the level before formatting anything, so a disabled debug line costs one comparison.
 * Lines look like `2026-11-27T06:30:00.123Z info  worker: committed partition=3 offset=120` and never carry
 * secrets; prompt text is logged only at debug level. */
#ifndef ASYNCLLM_LOG_H
#define ASYNCLLM_LOG_H

enum log_level { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERROR };

extern enum log_level log_min_level;

/* Sets the level from a name ("debug", "info", "warn", "error"); returns -1 for an unknown name. */
int log_set_level(const char *name);
/* Sets the component name printed on every line ("api", "worker", ...). The string must outlive the logger. */
void log_set_role(const char *role);
void log_write(enum log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_at(lvl, ...)                                                                                               \
    do {                                                                                                               \
        if ((lvl) >= log_min_level)                                                                                    \
            log_write((lvl), __VA_ARGS__);                                                                             \
    } while (0)
#define log_debug(...) log_at(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_at(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_at(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_at(LOG_ERROR, __VA_ARGS__)

#endif
