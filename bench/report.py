#!/usr/bin/env python3
"""report.py - turns a bench/results/*.json into docs/PERFORMANCE.md and its PNG plots (gnuplot).

    report.py --results bench/results/X.json --doc docs/PERFORMANCE.md --plots bench/results [--check]

--check (the smoke): fails if a step produced no figures. It never judges the figures themselves.
The hand-written analysis in bench/ANALYSIS.md, if present, is copied into the document.
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import TARGETS  # noqa: E402


def fnum(x, digits=0):
    if x is None:
        return "n/a"
    if digits == 0:
        return "{:,.0f}".format(x)
    return "{:,.{d}f}".format(x, d=digits)


def fs(s, digits=0, scale=1.0, unit=""):
    """A spread {median, min, max} as 'median (min–max)'."""
    if not s or s.get("median") is None:
        return "n/a"
    m, lo, hi = s["median"] * scale, s["min"] * scale, s["max"] * scale
    if s.get("n", 1) <= 1 or lo == hi:
        return "%s%s" % (fnum(m, digits), unit)
    return "%s%s (%s–%s)" % (fnum(m, digits), unit, fnum(lo, digits), fnum(hi, digits))


def pct(s):
    return fs(s, 0, 100.0, "%")


def mib(b):
    return "%.1f MiB" % (b / 2 ** 20)


def verdict(ok):
    if ok is None:
        return "n/a"
    return "**met**" if ok else "**missed**"


def gnuplot(script):
    r = subprocess.run(["gnuplot"], input=script, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("gnuplot: " + r.stderr)


def plot_submit(res, path, datdir):
    ol = res["open_loop"]
    series = []
    for name, title in (("submit_answer", "POST /answer"), ("submit_responses", "POST /v1/responses"),
                        ("poll_complete", "GET /polling (complete)"), ("poll_pending", "GET /polling (pending)")):
        if name not in ol:
            continue
        dat = os.path.join(datdir, "plot-%s.dat" % name)
        with open(dat, "w") as f:
            f.write("# offered_rps p50 p90 p99 p99.9 (ms, medians)\n")
            for row in sorted(ol[name], key=lambda r: r["offered_rps"]):
                f.write("%f %f %f %f %f\n" % (row["offered_rps"], row["p50_ms"]["median"], row["p90_ms"]["median"],
                                              row["p99_ms"]["median"], row["p999_ms"]["median"]))
        series.append((dat, title))
    plots = []
    for i, (dat, title) in enumerate(series):
        plots.append("'%s' using 1:2 with linespoints lc %d dt 2 pt 7 title '%s p50'" % (dat, i + 1, title))
        plots.append("'%s' using 1:4 with linespoints lc %d dt 1 pt 5 title '%s p99'" % (dat, i + 1, title))
    gnuplot("""
set terminal pngcairo size 1000,600 font 'sans,10'
set output '%s'
set title 'Latency against offered load (open loop; 25/50/75%% of each path''s maximum; medians)'
set xlabel 'offered load (requests/s)'
set ylabel 'latency (ms)'
set logscale y
set grid
set key outside right
set arrow from graph 0, first 10 to graph 1, first 10 nohead lc rgb 'red' dt 3
set label 'target: p99 < 10 ms at 50%% (submit)' at graph 0.02, first 11 tc rgb 'red'
plot %s
""" % (path, ", ".join(plots)))


def plot_worker(res, path, datdir):
    runs = res["worker"]["runs"]
    series = []
    lats = sorted({r["llm_latency_ms"] for r in runs})
    for lat in lats:
        dat = os.path.join(datdir, "plot-worker-%d.dat" % lat)
        by = {}
        for r in runs:
            if r["llm_latency_ms"] == lat:
                by.setdefault(r["in_flight"], []).append(r["completions_per_s"])
        with open(dat, "w") as f:
            f.write("# in_flight completions_per_s(median) min max bound\n")
            for k in sorted(by):
                v = sorted(by[k])
                f.write("%d %f %f %f %f\n" % (k, v[len(v) // 2], v[0], v[-1], k * 1000.0 / lat))
        series.append((dat, lat))
    plots = []
    for i, (dat, lat) in enumerate(series):
        plots.append("'%s' using 1:2:3:4 with yerrorlines lc %d pt 7 title 'LLM %d ms: measured'" % (dat, i + 1, lat))
        plots.append("'%s' using 1:5 with lines lc %d dt 3 title 'LLM %d ms: in-flight / latency'" % (dat, i + 1, lat))
    gnuplot("""
set terminal pngcairo size 1000,600 font 'sans,10'
set output '%s'
set title 'Worker: completions per second against the in-flight limit (backlog preloaded in Kafka)'
set xlabel 'max in flight'
set ylabel 'completions / s'
set logscale xy 2
set format x '%%g'
set format y '%%g'
set grid
set key top left
set arrow from 4096, graph 0 to 4096, graph 1 nohead lc rgb 'gray' dt 3
set label 'target: 3,000/s at 1,000 ms and 4,096 in flight' at 4096, 3000 right point pt 2 lc rgb 'red' offset -1,0
plot %s
""" % (path, ", ".join(plots)))


def ratio_ok(s, goal):
    return None if not s or s.get("median") is None else s["median"] >= goal


def build(res, plots_rel):
    T = TARGETS
    errors = {e["step"]: e["error"] for e in res.get("errors", [])}
    http = res.get("http") or {}
    ra = http.get("ratios") or {}
    ol = res.get("open_loop") or {}
    wk = res.get("worker") or {"runs": [], "latency": [], "failed": []}
    mem = res.get("memory") or {}
    cpu = res.get("cpu") or {}
    m = res["machine"]
    key = tuple(res["params"]["key_config"])

    def at_level(name, lv):
        for row in ol.get(name, []):
            if abs(row["level"] - lv) < 1e-9:
                return row
        return None

    key_runs = [r for r in wk["runs"] if (r["llm_latency_ms"], r["in_flight"]) == key]
    key_rate = {"median": sorted(r["completions_per_s"] for r in key_runs)[len(key_runs) // 2] if key_runs else None,
                "min": min((r["completions_per_s"] for r in key_runs), default=None),
                "max": max((r["completions_per_s"] for r in key_runs), default=None), "n": len(key_runs)}
    key_lat = next((x for x in wk["latency"] if (x["llm_latency_ms"], x["in_flight"]) == key), None)
    one_runs = [r for r in wk["runs"] if (r["llm_latency_ms"], r["in_flight"]) == (key[0], 1)]

    rows = []

    def target(what, goal, measured, ok):
        rows.append("| %s | %s | %s | %s |" % (what, goal, measured, verdict(ok)))

    def guarded(fn):
        try:
            fn()
        except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            rows.append("| (a step failed: %s) | | n/a | n/a |" % ("; ".join(errors.values()) or repr(e)))

    def _t0():
        target("`/healthz` vs nginx, 1 worker process (like for like: one event loop each)", "≥ 60%",
               pct(ra["healthz_vs_nginx_1"]), ratio_ok(ra["healthz_vs_nginx_1"], T["healthz_vs_nginx"]))
        target("`/healthz` vs nginx, `worker_processes auto` (%d)" % m["cores"], "(for information)",
               pct(ra["healthz_vs_nginx_auto"]), None)
    guarded(_t0)

    def _t1():
        for name, title in (("answer", "`POST /answer`"), ("responses", "`POST /v1/responses` (background)")):
            target("%s vs `/healthz` (max throughput)" % title, "≥ 40%", pct(ra["submit_%s_vs_healthz" % name]),
                   ratio_ok(ra["submit_%s_vs_healthz" % name], T["submit_vs_healthz"]))
            row = at_level("submit_" + name, 0.5)
            p99 = row["p99_ms"] if row else None
            target("%s p99 at 50%% of its maximum (%s/s)" % (title, fnum(row["offered_rps"]) if row else "?"),
                   "< 10 ms", fs(p99, 2, unit=" ms"),
                   None if not p99 or p99["median"] is None else p99["median"] < T["submit_p99_at_50pct_ms"])
    guarded(_t1)

    def _t2():
        for name, title in (("complete", "`GET /polling` (complete)"), ("pending", "`GET /polling` (pending)")):
            target("%s vs `/healthz`" % title, "≥ 60%", pct(ra["poll_%s_vs_healthz" % name]),
                   ratio_ok(ra["poll_%s_vs_healthz" % name], T["poll_vs_healthz"]))
    guarded(_t2)

    def _t3():
        crashed = [f for f in wk.get("failed", []) if (f["llm_latency_ms"], f["in_flight"]) == key]
        target("worker, LLM %d ms, %s in flight: completions/s sustained" % (key[0], fnum(key[1])), "≥ 3,000/s",
               fs(key_rate, 0, unit="/s") + (" (%d of %d runs failed: %s)" % (
                   len(crashed), len(crashed) + len(key_runs), crashed[0]["error"]) if crashed else ""),
               False if crashed else
               None if key_rate["median"] is None else key_rate["median"] >= T["worker_rate_1000ms_4096"])
        if one_runs:
            target("worker, LLM %d ms, 1 in flight (what a one-at-a-time consumer gets)" % key[0], "(for information)",
                   fnum(one_runs[0]["completions_per_s"], 2) + "/s", None)
        if key_lat:
            a = key_lat["added_ms"]
            target("worker added latency p50 (at %s prompts/s)" % fnum(key_lat["rate"]), "< 10 ms",
                   "%s ms" % fnum(a["p50"]), None if a["p50"] is None else a["p50"] < T["worker_added_p50_ms"])
            target("worker added latency p99 (at %s prompts/s)" % fnum(key_lat["rate"]), "< 100 ms",
                   "%s ms" % fnum(a["p99"]), None if a["p99"] is None else a["p99"] < T["worker_added_p99_ms"])
    guarded(_t3)

    def _t4():
        wm = mem["worker"]
        target("worker memory per in-flight prompt (beyond idle, %s in flight)" % fnum(wm["in_flight"]), "< 16 KiB",
               "%s bytes (slope %s)" % (fnum(wm["bytes_per_prompt_beyond_idle"]), fnum(wm["bytes_per_prompt_slope"])),
               wm["bytes_per_prompt_beyond_idle"] < T["worker_bytes_per_prompt"])
    guarded(_t4)

    def _t5():
        am = mem["api"]
        target("API RSS with %s idle keep-alive connections" % fnum(am["established"]), "< 64 MiB",
               mib(am["rss_with_idle"]), am["rss_with_idle"] < T["api_rss_10k_idle_bytes"] and
               am["established"] >= am["connections"])
    guarded(_t5)

    def _t6():
        target("CPU seconds per 1,000 prompts (api + worker)", "(for information)",
               fs(cpu["per_1000"]["total"], 3, unit=" s"), None)
    guarded(_t6)

    v = m["versions"]
    out = []
    w = out.append

    def section(fn):
        n = len(out)
        try:
            fn()
        except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            del out[n:]
            w("")
            w("This step failed in this run: %s" % ("; ".join("%s: %s" % kv for kv in errors.items()) or repr(e)))
            w("")
    w("# Performance")
    w("")
    w("<!-- Generated by bench/report.py from %s: do not edit; run `make bench`. -->" % res["_file"])
    w("")
    w("Measured by `make bench` (bench/run.sh) on %s, in %.0f minutes; raw figures in `%s`. Each figure is the "
      "median of its repetitions with the range (min–max) in brackets; each ratio is computed per repetition from "
      "two figures measured seconds apart, then the median taken. The machine is shared with other people's "
      "test runs, so absolute figures move by tens of percent from run to run; the ratios move less."
      % (res["started_at"], res["duration_s"] / 60, res["_file"]))
    w("")
    w("## Targets")
    w("")
    w("| what | target | measured | |")
    w("|---|---|---|---|")
    out.extend(rows)
    w("")
    w("## Machine")
    w("")
    w("%d cores (%s), %s memory, kernel %s, %s. %s (commit %s%s), gcc: %s; nginx: %s; %s; %s; Kafka %s "
      "(KRaft, one node, acks=all); librdkafka %s, libevent %s, hiredis %s, libcurl %s, jansson %s. Load "
      "average at start %s, at end %s."
      % (m["cores"], m["cpu_model"], mib(m["memory_bytes"]), m["kernel"], m["os"], v["asyncllm"],
         (v["asyncllm_git"] or "?")[:12], ", with local changes" if v["asyncllm_src_dirty"] else "", v["gcc"],
         v["nginx"], v["redis"], v["java"], v["kafka"], v["librdkafka"], v["libevent"], v["hiredis"], v["libcurl"],
         v["jansson"], " ".join(m["loadavg_at_start"]), " ".join(m.get("loadavg_at_end", []))))
    w("")
    p = res["params"]
    names = [("nginx_1", "nginx 1.22, `worker_processes 1`, fixed 200"),
             ("nginx_auto", "nginx, `worker_processes auto` (%d)" % m["cores"]),
             ("healthz", "asyncllm `GET /healthz` (one event loop)"),
             ("submit_answer", "`POST /answer` (202 after the broker's ack)"),
             ("submit_responses", "`POST /v1/responses`, `background: true`"),
             ("poll_complete", "`GET /polling`, complete conversations"),
             ("poll_pending", "`GET /polling`, pending conversations")]
    w("## 1. HTTP: maximum throughput")

    def _s1():
        w("")
        w("Closed loop, %d keep-alive connections, %s s measured after %s s of warm-up, %d repetitions interleaved "
          "(nginx, /healthz, nginx auto, the submit and poll paths, then again). The load generator "
          "(bench/loadgen.c, one thread) runs on the same 2 cores as the server."
          % (p["conns"], fnum(p["http_dur"], 1), fnum(p["http_warm"], 1), p["http_reps"]))
        w("")
        w("| server / path | requests/s | p50 | p99 | server CPU per request | other tenants' CPU (cores) | errors |")
        w("|---|---|---|---|---|---|---|")
        for k, title in names:
            h = http[k]
            w("| %s | %s | %s | %s | %s | %s | %d |" % (
                title, fs(h["throughput_rps"]), fs(h["p50_ms"], 2, unit=" ms"), fs(h["p99_ms"], 2, unit=" ms"),
                fs(h.get("server_cpu_us"), 1, unit=" µs"), fs(h.get("others_cpu_cores"), 2), h["errors"]))
        w("")
        w("Server CPU per request is the CPU time (utime + stime) of the server's processes (nginx's workers, or "
          "`asyncllm api` with its librdkafka threads) during the run divided by the answers: it depends much less "
          "on the other tenants of the machine than the throughput does. Other tenants' CPU is the machine's busy "
          "time (/proc/stat) minus the load generator, the server, Kafka and Redis: what other people's tests took "
          "from the 2 cores meanwhile.")
        w("")
        w("| ratio | median (range) |")
        w("|---|---|")
        for k, title in (("healthz_vs_nginx_1", "/healthz ÷ nginx (1 worker)"),
                         ("healthz_vs_nginx_auto", "/healthz ÷ nginx (auto)"),
                         ("submit_answer_vs_healthz", "POST /answer ÷ /healthz"),
                         ("submit_responses_vs_healthz", "POST /v1/responses ÷ /healthz"),
                         ("poll_complete_vs_healthz", "GET /polling complete ÷ /healthz"),
                         ("poll_pending_vs_healthz", "GET /polling pending ÷ /healthz")):
            w("| %s | %s |" % (title, pct(ra[k])))
        w("")
    section(_s1)

    w("## 2. Latency at a fixed offered rate")

    def _s2():
        w("")
        w("Open loop (bench/loadgen.c `--rate`): request *i* is due at t0 + i/rate whatever happened before; a due "
          "request waits for a free connection if none is idle, and its latency counts from when it was due, so a "
          "stall is charged to every request that should have been sent meanwhile (no coordinated omission). "
          "%d connections, %s s measured after %s s, %d repetitions." % (
              p["conns"], fnum(p["open_dur"], 1), fnum(p["open_warm"], 1), p["open_reps"]))
        if p.get("open_max_dur"):
            w("Each repetition first measures the path's maximum again (closed loop, %s s), and its rates are 25, 50 "
              "and 75%% of that: the machine's capacity moves within minutes, so a maximum from section 1 can be "
              "far from the machine's capacity by the time the open loop runs. The offered rate shown is the "
              "median of the repetitions'." % fnum(p["open_max_dur"], 1))
        else:
            w("Rates are 25, 50 and 75% of the median maximum above.")
        w("")
        w("![latency against offered load](%s/submit-latency.png)" % plots_rel)
        w("")
        w("| path | load | maximum/s | offered/s | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for k, title in names[3:]:
            for row in sorted(ol.get(k, []), key=lambda r: r["level"]):
                w("| %s | %d%% | %s | %s | %s | %s | %s | %s | %s | %d |" % (
                    title, row["level"] * 100, fs(row["max_rps"]) if row.get("max_rps") else "(section 1)",
                    fnum(row["offered_rps"]), fs(row["achieved_rps"]), fs(row["p50_ms"], 2), fs(row["p90_ms"], 2),
                    fs(row["p99_ms"], 2), fs(row["p999_ms"], 2), row["errors"]))
        w("")
    section(_s2)

    w("## 3. Worker")

    def _s3():
        w("")
        w("Prompts `{\"conversation_id\",\"prompt\":\"hi\",\"turn\":1}` keyed by id are preloaded into a fresh "
          "6-partition topic (bench/kbench.c, acks=all), then `asyncllm worker` starts against the fake LLM at a "
          "fixed latency. Its `/metrics` counter `asyncllm_worker_completed_total` is sampled every second; the "
          "rate is taken over %s s starting %s after the first completion (the pipeline filling), with the spread "
          "of the %s-s sub-windows. The in-flight limit's bound is in-flight ÷ LLM latency."
          % (fnum(p["window"]), "3 s + 2 LLM latencies", fnum(p["sub_window"])))
        w("")
        w("![completions per second against the in-flight limit](%s/worker-throughput.png)" % plots_rel)
        w("")
        w("| LLM latency | in flight | completions/s | sub-windows | bound | of bound | calls in flight (mean) | "
          "buffered (mean) | worker CPU (cores) | fake LLM CPU | worker peak RSS |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in wk["runs"]:
            w("| %d ms | %s | %s%s | %s | %s | %.0f%% | %s | %s | %.2f | %.2f | %s |" % (
                r["llm_latency_ms"], fnum(r["in_flight"]), fnum(r["completions_per_s"], 1),
                " (backlog ran out: a lower bound)" if r["backlog_exhausted"] else "", fs(r["sub_windows"]),
                fnum(r["bound_rps"]), 100.0 * r["completions_per_s"] / r["bound_rps"],
                fnum(r.get("in_flight_mean")), fnum(r.get("buffered_mean")), r["worker_cpu_cores"] or 0,
                r["fakellm_cpu_cores"] or 0, mib(r["worker_rss_max"])))
        for f in wk.get("failed", []):
            if f["step"] == "throughput":
                w("| %d ms | %s | **failed**: %s | | | | | | | | |" % (f["llm_latency_ms"], fnum(f["in_flight"]),
                                                                    f["error"]))
        w("")
        w("**Added latency.** A second, fresh topic pair per configuration is created with "
          "`message.timestamp.type=LogAppendTime`, so that each message's timestamp is the broker's append time "
          "(with acks=all on one broker, when it acknowledged it). With the worker idle and assigned, prompts are "
          "produced live at a fixed rate (75%% of the in-flight bound, at most 75%% of the throughput measured "
          "above) for %s s; added latency = response's broker timestamp − prompt's broker timestamp − the LLM's "
          "fixed latency, over all prompts but the first 10%%. The prompts are produced live rather than preloaded "
          "because a preloaded prompt's timestamp would also count the time it waited in the backlog." % fnum(p["live_dur"]))
        w("")
        w("| LLM latency | in flight | rate/s | samples | p50 ms | p90 ms | p99 ms | max ms |")
        w("|---|---|---|---|---|---|---|---|")
        for x in wk["latency"]:
            a = x["added_ms"]
            w("| %d ms | %s | %s | %d | %s | %s | %s | %s |" % (
                x["llm_latency_ms"], fnum(x["in_flight"]), fnum(x["rate"], 1), x["samples"], fnum(a["p50"]),
                fnum(a["p90"]), fnum(a["p99"]), fnum(a["max"])))
        for f in wk.get("failed", []):
            if f["step"] == "latency":
                w("| %d ms | %s | **failed**: %s | | | | | |" % (f["llm_latency_ms"], fnum(f["in_flight"]), f["error"]))
        w("")
    section(_s3)

    w("## 4. Memory")

    def _s4():
        wm = mem["worker"]
        am = mem["api"]
        w("")
        w("**Worker.** `--max-in-flight=%s`, the fake LLM holding every call (a `[[latency=300000]]` directive in "
          "the short prompt): RSS idle (assigned, nothing to do) %s; %s. Beyond idle: %s bytes per in-flight "
          "prompt; slope between the last two points: %s bytes."
          % (fnum(wm["in_flight"]), mib(wm["idle_rss"]),
             ", ".join("%s with %s in flight" % (mib(b), fnum(a)) for a, b in wm["points"][1:]),
             fnum(wm["bytes_per_prompt_beyond_idle"]), fnum(wm["bytes_per_prompt_slope"])))
        w("")
        w("**API.** A fresh `asyncllm api`: RSS %s; then %s keep-alive connections, each having made one "
          "`GET /healthz` and then silent (%s established, %s still open after %s s; the API then held %s file "
          "descriptors): RSS %s, %s bytes per connection."
          % (mib(am["rss_before"]), fnum(am["connections"]), fnum(am["established"]), fnum(am["open_after_hold"]),
             fnum(p["idle_hold"]), fnum(am["api_fds"]), mib(am["rss_with_idle"]), fnum(am["bytes_per_connection"])))
        w("")
    section(_s4)

    w("## 5. CPU per 1,000 prompts")

    def _s5():
        w("")
        w("`asyncllm api` and `asyncllm worker` (4,096 in flight, fake LLM at 100 ms); `POST /answer` at %s/s "
          "(open loop) for %s s, then until the worker completed every accepted prompt; CPU = utime + stime from "
          "`/proc/<pid>/stat`. %d repetitions." % (fnum(cpu["rate"]), fnum(p["cpu_dur"]), p["cpu_reps"]))
        w("")
        w("| process | CPU s per 1,000 prompts |")
        w("|---|---|")
        for k in ("api", "worker", "total"):
            w("| %s | %s |" % ("api + worker" if k == "total" else "asyncllm " + k, fs(cpu["per_1000"][k], 3)))
        for k, s in cpu["others_per_1000"].items():
            w("| (not counted) %s | %s |" % (k, fs(s, 3)))
        w("")
    section(_s5)

    w("## Method and reproduction")
    w("")
    w("```sh\nmake bench            # bench/run.sh: about 20 minutes\nmake bench-smoke      # bench/run.sh --smoke: "
      "every step for a second or two, no assertions on the figures\n```")
    w("")
    w("- Everything runs on loopback on this machine: the bench's own Kafka (KRaft) and redis-server "
      "(scripts/stack.sh with `ASYNCLLM_STACK_DIR=/tmp/asyncllm-bench-stack` and the first free block of ports "
      "below 32768 among 21000, 17000, ... (Kafka +92, Redis +390, `BENCH_PORT_BASE` to choose); AOF on, as in "
      "`make run`), the optimised build (`make build/asyncllm build/fakellm`, "
      "`-O2`), nginx from Debian, the fake LLM (tests/fakellm, one thread) and the load generator.")
    w("- nginx is compared like for like: `worker_processes 1` against asyncllm's single HTTP event loop (the "
      "target's ratio); `worker_processes auto` is printed for information. Its response has the same body as "
      "`/healthz` and keep-alive without a request cap.")
    w("- `bench/loadgen.c`: one thread, epoll, keep-alive, HTTP/1.1 GET and POST with a body; closed loop for "
      "the maximum and open loop (scheduled send times) for latency; every sample is kept and sorted for the "
      "percentiles. `bench/kbench.c`: topic creation with LogAppendTime, fast or paced produce, and broker "
      "timestamps of a topic.")
    w("- Each open-loop run also writes a timeline (`loadgen --timeline`: per 10 ms, the answers, their worst "
      "latency, the backlog and loadgen's own longest turn); the results keep its stalls over 10 ms "
      "(`loadgen_raw[].stalls`) and the broker's GC pauses inside the run (`broker_gc_pauses`, from the "
      "stack's `logs/kafka-gc.log`), and the bench's log names the worst of each, so that a tail can be "
      "traced to its cause.")
    w("- Submits create new conversations (`{\"prompt\":\"hi\"}`); polls cycle over %s conversation ids of "
      "each kind, made beforehand through the API (complete: with a worker running; pending: with none)."
      % fnum(p["poll_ids"]))
    w("- Every worker configuration uses fresh topics and a fresh consumer group; the worker is stopped with "
      "SIGKILL between steps (what it held is of no interest).")
    forks = res.get("http_redis_forks")
    w("- Redis: the HTTP steps store about 2 million conversations; its automatic AOF rewrite (a fork, then a "
      "child writing the whole dataset for seconds on the same cores) is off during them, so that no run measures "
      "when a rewrite happened to fall (every write is still appended and fsynced each second); forks during the "
      "HTTP steps: %s. The worker, memory and CPU steps each start from an empty Redis, rewrite on."
      % ("not recorded" if forks is None else fnum(forks)))
    w("- Descriptors: `ulimit -n` is raised to the hard limit (20,000 here), enough for 16,384 LLM calls or "
      "10,000 idle client connections per process.")
    analysis = os.path.join(REPO, "bench", "ANALYSIS.md")
    if os.path.exists(analysis):
        w("")
        with open(analysis) as f:
            w(f.read().rstrip())
    w("")
    return "\n".join(out)


def check(res):
    """The smoke's check: every step produced figures."""
    probs = ["step %s failed: %s" % (e["step"], e["error"]) for e in res.get("errors", [])]
    probs += ["worker %s/%s %s failed: %s" % (f["llm_latency_ms"], f["in_flight"], f["step"], f["error"])
              for f in res.get("worker", {}).get("failed", [])]
    if probs:
        return probs
    for k in ("nginx_1", "nginx_auto", "healthz", "submit_answer", "submit_responses", "poll_complete",
              "poll_pending"):
        if not res["http"][k]["throughput_rps"]["median"]:
            probs.append("http %s: no throughput" % k)
    for k, rows in res["open_loop"].items():
        for row in rows:
            if row["p99_ms"]["median"] is None or row["p99_ms"]["median"] < 0:
                probs.append("open loop %s %s: no latency" % (k, row["level"]))
    for r in res["worker"]["runs"]:
        if not r["completions_per_s"] > 0:
            probs.append("worker %s/%s: no completions" % (r["llm_latency_ms"], r["in_flight"]))
    for x in res["worker"]["latency"]:
        if not x["samples"]:
            probs.append("worker latency %s/%s: no samples" % (x["llm_latency_ms"], x["in_flight"]))
    if not res["memory"]["worker"]["idle_rss"] or not res["memory"]["api"]["established"]:
        probs.append("memory: no figures")
    if not res["cpu"]["per_1000"]["total"]["median"]:
        probs.append("cpu: no figures")
    return probs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--doc", required=True)
    ap.add_argument("--plots", required=True)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    with open(a.results) as f:
        res = json.load(f)
    res["_file"] = os.path.relpath(a.results, REPO) if a.results.startswith(REPO) else a.results
    os.makedirs(a.plots, exist_ok=True)
    datdir = os.path.join(a.plots, ".plotdata") if not a.check else a.plots
    os.makedirs(datdir, exist_ok=True)
    plot_submit(res, os.path.join(a.plots, "submit-latency.png"), datdir)
    plot_worker(res, os.path.join(a.plots, "worker-throughput.png"), datdir)
    if not a.check:
        import shutil
        shutil.rmtree(datdir, ignore_errors=True)
    rel = os.path.relpath(a.plots, os.path.dirname(os.path.abspath(a.doc)))
    text = build(res, rel)
    tmp = a.doc + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, a.doc)
    if a.check:
        probs = check(res)
        if probs:
            for p in probs:
                print("bench smoke: " + p, file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
