#!/usr/bin/env python3
"""bench.py - asyncllm's benchmark: every path against its ceiling, on loopback, in one run.

Run through bench/run.sh (which installs what is missing, builds, and starts the bench's own Kafka + Redis
stack). This script starts and stops everything else it measures (nginx, asyncllm api and worker, the fake
LLM), writes bench/results/<time>.json and regenerates docs/PERFORMANCE.md with its plots.

The machine is shared and noisy: every comparison is a ratio of figures measured side by side in the same
run (interleaved repetitions), and every figure is the median of several repetitions, given with its spread
(min..max). --smoke runs a few-second version of every step, asserts nothing about performance, and writes
into a scratch directory instead of bench/results and docs/.
"""
import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# The targets (docs/PERFORMANCE.md prints them beside the figures).
TARGETS = {
    "healthz_vs_nginx": 0.60,
    "submit_vs_healthz": 0.40,
    "submit_p99_at_50pct_ms": 10.0,
    "poll_vs_healthz": 0.60,
    "worker_rate_1000ms_4096": 3000.0,
    "worker_added_p50_ms": 10.0,
    "worker_added_p99_ms": 100.0,
    "worker_bytes_per_prompt": 16 * 1024,
    "api_rss_10k_idle_bytes": 64 * 1024 * 1024,
}

FULL = dict(
    conns=256,
    warm_s=10.0,
    http_reps=5, http_dur=5.0, http_warm=1.0,
    open_reps=3, open_dur=8.0, open_warm=1.0, open_max_dur=3.0, levels=[0.25, 0.50, 0.75],
    poll_ids=2000,
    worker_latencies=[100, 1000], worker_inflight=[1, 256, 1024, 4096, 16384],
    key_config=(1000, 4096), key_reps=3,
    window=30.0, sub_window=5.0, worker_rate_cap=8000, live_dur=10.0,
    mem_inflight=16384, idle_conns=10000, idle_hold=10.0,
    cpu_rate=1000, cpu_dur=10.0, cpu_reps=3,
)
SMOKE = dict(
    conns=16,
    warm_s=0.5,
    http_reps=1, http_dur=0.5, http_warm=0.2,
    open_reps=1, open_dur=0.5, open_warm=0.1, open_max_dur=0.5, levels=[0.25, 0.50, 0.75],
    poll_ids=50,
    worker_latencies=[100], worker_inflight=[1, 64],
    key_config=(100, 64), key_reps=1,
    window=2.0, sub_window=1.0, worker_rate_cap=500, live_dur=1.5,
    mem_inflight=64, idle_conns=100, idle_hold=2.0,
    cpu_rate=100, cpu_dur=1.0, cpu_reps=1,
)


def log(msg):
    print("bench %s %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- processes

class Procs:
    """Children started by this run, stopped (by pid) at the end whatever happens."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.live = []

    def start(self, name, argv, env=None):
        out = open(os.path.join(self.logdir, name + ".log"), "ab")
        out.write(("\n=== %s %s\n" % (time.strftime("%H:%M:%S"), " ".join(argv))).encode())
        out.flush()
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=REPO)
        p.bench_name = name
        p.bench_log = out
        self.live.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=15):
        if p is None:
            return
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        p.bench_log.close()
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(self.live):
            self.stop(p, signal.SIGKILL, 5)


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except Exception:
        return 0, ""


def wait_until(pred, timeout, what, proc=None, step=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s: process exited with %s (see its log)" % (what, proc.returncode))
        if pred():
            return
        time.sleep(step)
    raise RuntimeError("%s: not ready after %.0f s" % (what, timeout))


def port_open(port):
    s = socket.socket()
    s.settimeout(0.5)
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def proc_cpu_s(pid):
    """utime + stime of a process, seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_s():
    """CPU seconds the whole machine spent busy (every core, every process), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK_TCK


def proc_rss(pid):
    """Resident set size, bytes."""
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * PAGE


def proc_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def metrics(port):
    st, body = http_get("http://127.0.0.1:%d/metrics" % port)
    if st != 200:
        return None
    m = {}
    parts = 0
    for line in body.splitlines():
        if line.startswith("#") or not line:
            continue
        k, _, v = line.rpartition(" ")
        if k.startswith("asyncllm_worker_partition_committed_offset"):
            parts += 1
        try:
            m[k] = float(v)
        except ValueError:
            pass
    m["partitions"] = parts
    return m


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs):
    xs = [x for x in xs if x is not None]
    return {"median": med(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs),
            "samples": xs}


def stalls(timeline, over_ms=10.0):
    """From a loadgen --timeline file: the stretches of 10 ms slots whose requests waited over over_ms, as
    [start s, length s, worst ms], and the longest gap between two turns of loadgen's own loop (ms): a stall of
    the servers shows as a stretch while loadgen kept turning."""
    out, cur, gap = [], None, 0.0
    with open(timeline) as f:
        next(f)
        for line in f:
            t_ms, _, lat, _, g = line.split()
            t, lat = int(t_ms) / 1000.0, float(lat)
            gap = max(gap, float(g))
            if lat > over_ms:
                if cur and t - (cur[0] + cur[1]) <= 0.011:
                    cur[1] = t + 0.01 - cur[0]
                    cur[2] = max(cur[2], lat)
                else:
                    cur = [t, 0.01, lat]
                    out.append(cur)
    return [[round(a, 3), round(b, 3), round(c, 1)] for a, b, c in out], gap


GC_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+[+-]\d{4})\].*\bPause\b.* ([\d.]+)ms$")


def gc_pauses(log_dir):
    """The broker's stop-the-world pauses from its GC log (scripts/stack.sh writes logs/kafka-gc.log*), as
    [(end, seconds)] with end in Unix time."""
    out = []
    for name in sorted(glob.glob(os.path.join(log_dir, "kafka-gc.log*"))):
        try:
            with open(name) as f:
                for line in f:
                    m = GC_LINE.match(line.strip())
                    if m:
                        end = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
                        out.append((end, float(m.group(2)) / 1000.0))
        except OSError:
            pass
    return out


def percentile(sorted_xs, p):
    if not sorted_xs:
        return None
    i = int(round(p / 100.0 * (len(sorted_xs) - 1)))
    return sorted_xs[min(max(i, 0), len(sorted_xs) - 1)]


# --------------------------------------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args):
        self.args = args
        self.p = dict(SMOKE if args.smoke else FULL)
        # BENCH_WORKER=1000:4096,100:256 narrows the worker step to those (latency, in-flight) pairs
        if args.worker:
            pairs = [tuple(int(x) for x in pr.split(":")) for pr in args.worker.split(",")]
            self.p["worker_latencies"] = sorted({lat for lat, _ in pairs})
            self.p["worker_inflight"] = sorted({f for _, f in pairs})
            self.p["worker_pairs"] = pairs
        self.bin = args.bin
        self.work = args.work
        os.makedirs(self.work, exist_ok=True)
        self.procs = Procs(self.work)
        self.ports = dict(api=args.port_base + 80, nginx1=args.port_base + 81, nginx_auto=args.port_base + 82,
                          fakellm=args.port_base + 89, metrics=args.port_base + 64)
        self.brokers = "127.0.0.1:%d" % args.kafka_port
        self.redis_port = args.redis_port
        self.raw = []  # every measurement, as measured
        self.res = {}  # the figures
        self.api = None
        self.worker = None
        self.fake = None
        self.fake_latency = None
        self.seq = 0

    # ---- helpers

    def loadgen(self, label, url, rate=0, conns=None, dur=None, warm=None, method="GET", body=None,
                paths=None, requests=None, save=None, extra=(), timeline=False):
        argv = [self.bin["loadgen"], "--label", label, "-c", str(conns or self.p["conns"]),
                "-d", str(dur if dur is not None else self.p["http_dur"]),
                "-w", str(warm if warm is not None else self.p["http_warm"]), "-r", str(rate), "-m", method]
        if body is not None:
            argv += ["-b", body, "-H", "Content-Type: application/json"]
        if paths:
            argv += ["--paths-file", paths]
        if requests:
            argv += ["-n", str(requests)]
        if save:
            argv += ["--save", save]
        tl = os.path.join(self.work, "timeline-%d.txt" % len(self.raw)) if timeline else None
        if tl:
            argv += ["--timeline", tl]
        argv += list(extra) + [url]
        b0, t0, ru0 = machine_busy_s(), time.time(), os.times()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        b1, t1, ru1 = machine_busy_s(), time.time(), os.times()
        if out.returncode != 0:
            raise RuntimeError("loadgen %s failed: %s" % (label, out.stderr.strip()))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        # how busy the machine was (all processes, the load generator's own share apart): a noise indicator
        r["machine_busy_cores"] = (b1 - b0) / (t1 - t0)
        r["loadgen_cpu_cores"] = ((ru1.children_user + ru1.children_system) -
                                  (ru0.children_user + ru0.children_system)) / (t1 - t0)
        # open loop: loadgen's own t0 (after its connections are up), which its timeline counts from
        r["started_at"] = r.get("t0_unix") or t0
        if tl:
            r["stalls"], r["loadgen_loop_gap_max_ms"] = stalls(tl)
        self.raw.append(r)
        return r

    def kbench(self, *argv, capture=True):
        out = subprocess.run([self.bin["kbench"], argv[0], "-b", self.brokers] + list(argv[1:]),
                             capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError("kbench %s failed: %s" % (argv[0], out.stderr.strip()[-2000:]))
        return out.stdout

    def topics(self, name):
        """Fresh topics for one step: prompts, responses, dead letters (LogAppendTime)."""
        self.seq += 1
        base = "bench_%s_%d_%d" % (name, os.getpid(), self.seq)
        t = dict(p=base + "_p", r=base + "_r", d=base + "_d", g=base + "_g")
        self.kbench("create", "-t", "%s,%s,%s" % (t["p"], t["r"], t["d"]), "-p", "6")
        return t

    def common_flags(self, t):
        return ["--kafka-brokers=" + self.brokers, "--redis-host=127.0.0.1", "--redis-port=%d" % self.redis_port,
                "--topic-prompts=" + t["p"], "--topic-responses=" + t["r"], "--topic-dlq=" + t["d"],
                "--group-id=" + t["g"], "--conversation-ttl-s=3600", "--log-level=warn",
                "--llm-base-url=http://127.0.0.1:%d/v1" % self.ports["fakellm"], "--llm-model=fake"]

    def start_api(self, t):
        self.stop_api()
        argv = [self.bin["asyncllm"], "api", "--http-port=%d" % self.ports["api"]] + self.common_flags(t)
        self.api = self.procs.start("api", argv)
        wait_until(lambda: http_get("http://127.0.0.1:%d/readyz" % self.ports["api"])[0] == 200, 60, "api",
                   self.api, 0.2)
        return self.api

    def stop_api(self):
        if self.api:
            self.procs.stop(self.api)
            self.api = None

    def start_worker(self, t, inflight, extra=()):
        self.stop_worker()
        argv = [self.bin["asyncllm"], "worker", "--max-in-flight=%d" % inflight,
                "--metrics-port=%d" % self.ports["metrics"]] + self.common_flags(t) + list(extra)
        self.worker = self.procs.start("worker", argv)
        # ready: its metrics list every partition of the topic (the group assigned them)
        wait_until(lambda: (metrics(self.ports["metrics"]) or {}).get("partitions", 0) >= 6, 60,
                   "worker (partition assignment)", self.worker, 0.2)
        return self.worker

    def stop_worker(self, kill=True):
        if self.worker:
            # in-flight prompts of a finished step are of no interest: SIGKILL (no grace period)
            self.procs.stop(self.worker, signal.SIGKILL if kill else signal.SIGTERM, 60)
            self.worker = None

    def start_fake(self, latency_ms):
        if self.fake and self.fake_latency == latency_ms and self.fake.poll() is None:
            return
        self.stop_fake()
        argv = [self.bin["fakellm"], "--port", str(self.ports["fakellm"]), "--latency-ms", str(latency_ms),
                "--timeout-s", "600"]
        self.fake = self.procs.start("fakellm", argv)
        self.fake_latency = latency_ms
        wait_until(lambda: http_get("http://127.0.0.1:%d/healthz" % self.ports["fakellm"])[0] == 200, 30,
                   "fakellm", self.fake)

    def stop_fake(self):
        if self.fake:
            self.procs.stop(self.fake)
            self.fake = None

    def redis_cmd(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.redis_port)] + list(args), capture_output=True,
                              text=True, timeout=60).stdout

    def redis_forks(self):
        m = re.search(r"^total_forks:(\d+)", self.redis_cmd("INFO", "stats"), re.M)
        return int(m.group(1)) if m else None

    # Deletes every key but the ones named in ARGV (the poll steps' conversations), a SCAN batch at a time.
    TRIM_LUA = ("local keep = {} for _, k in ipairs(ARGV) do keep[k] = true end "
                "local c, n = '0', 0 repeat local r = redis.call('SCAN', c, 'COUNT', 10000) c = r[1] "
                "for _, k in ipairs(r[2]) do if not keep[k] then redis.call('UNLINK', k) n = n + 1 end end "
                "until c == '0' return n")

    def trim_redis(self, paths):
        """Before each submit run: only the poll conversations are left in Redis, so that every submit run starts
        from the same keyspace. Left to grow (about 2 million conversations over the HTTP steps), Redis' hash
        tables doubled during whichever runs crossed 2^k keys, and its CPU per submit moved between about 7 and
        17 us from one run to the next (bench/ANALYSIS.md, session 8)."""
        keep = []
        for f in paths.values():
            with open(f) as fh:
                keep += ["asyncllm:conv:" + line.strip().rpartition("=")[2] for line in fh if line.strip()]
        self.redis_cmd("EVAL", self.TRIM_LUA, "0", *keep)

    def flush_redis(self):
        """Each worker step starts from an empty Redis (a small dataset: no AOF rewrite of old steps' data)."""
        self.redis_cmd("FLUSHALL")

    def log_tail(self, name, n=20):
        try:
            with open(os.path.join(self.work, name + ".log"), "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - 8192))
                return f.read().decode("utf-8", "replace").splitlines()[-n:]
        except OSError:
            return []

    def stack_pids(self):
        pids = {}
        for name, pidfile in (("kafka", "kafka.pid"), ("redis", "redis.pid")):
            try:
                with open(os.path.join(self.args.stack_dir, "run", pidfile)) as f:
                    pids[name] = int(f.read().strip())
            except (OSError, ValueError):
                pass
        return pids

    def url(self, path, port=None):
        return "http://127.0.0.1:%d%s" % (port or self.ports["api"], path)

    # ---- steps

    def machine(self):
        def cmd(argv):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
                return (r.stdout + r.stderr).strip().splitlines()[0]
            except Exception:
                return None

        def pkgc(name):
            return cmd(["pkg-config", "--modversion", name])

        model = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        mem = None
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) * 1024
        kafka_jars = os.path.expanduser(os.environ.get("ASYNCLLM_CACHE", "~/.cache/asyncllm"))
        kafka = sorted(d for d in os.listdir(kafka_jars) if d.startswith("kafka-")) if os.path.isdir(
            kafka_jars) else []
        git = cmd(["git", "-C", REPO, "rev-parse", "HEAD"])
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "tests/fakellm"],
                               capture_output=True, text=True).stdout.strip() != ""
        if os.environ.get("BENCH_SOURCE_COMMIT"):
            # the binaries were built elsewhere (BENCH_ASYNCLLM), from a clean checkout of this commit
            git, dirty = os.environ["BENCH_SOURCE_COMMIT"], False
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        return {
            "cores": os.cpu_count(), "cpu_model": model, "memory_bytes": mem,
            "kernel": platform.release(), "os": cmd(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"]),
            "debian_version": open("/etc/debian_version").read().strip() if os.path.exists(
                "/etc/debian_version") else None,
            "loadavg_at_start": load,
            "versions": {
                "asyncllm": cmd([self.bin["asyncllm"], "version"]),
                "asyncllm_git": git, "asyncllm_src_dirty": dirty, "asyncllm_binary": self.bin["asyncllm"],
                "gcc": cmd(["gcc", "--version"]), "nginx": cmd(["nginx", "-v"]),
                "redis": cmd(["redis-server", "--version"]), "java": cmd(["java", "-version"]),
                "kafka": kafka[-1] if kafka else None,
                "librdkafka": pkgc("rdkafka"), "libevent": pkgc("libevent"), "hiredis": pkgc("hiredis"),
                "libcurl": pkgc("libcurl"), "jansson": pkgc("jansson"),
                "gnuplot": cmd(["gnuplot", "--version"]),
            },
        }

    def prep_poll_ids(self):
        """Conversations to poll: some complete, some pending (submitted while no worker runs)."""
        log("poll ids: submitting %d prompts with a worker running, %d without" % (self.p["poll_ids"],
                                                                                   self.p["poll_ids"]))
        self.start_fake(0)
        t = self.topics("prep")
        self.start_api(t)
        self.start_worker(t, 4096)
        ids = {}
        for kind in ("complete", "pending"):
            if kind == "pending":
                self.stop_worker()
            save = os.path.join(self.work, "ids-%s.jsonl" % kind)
            if os.path.exists(save):
                os.remove(save)
            self.loadgen("prep/" + kind, self.url("/answer"), method="POST", body='{"prompt":"hi"}',
                         requests=self.p["poll_ids"], save=save, conns=16)
            got = []
            with open(save) as f:
                for line in f:
                    try:
                        got.append(json.loads(line)["conversation_id"])
                    except (ValueError, KeyError):
                        pass
            ids[kind] = got
            if kind == "complete":
                n = len(got)
                wait_until(lambda: (metrics(self.ports["metrics"]) or {}).get("asyncllm_worker_completed_total",
                                                                              0) >= n, 120,
                           "worker completing the poll ids", self.worker, 0.3)
        self.stop_api()
        paths = {}
        for kind, got in ids.items():
            paths[kind] = os.path.join(self.work, "paths-%s.txt" % kind)
            with open(paths[kind], "w") as f:
                for i in got:
                    f.write("/polling?conversationId=%s\n" % i)
        # the pending ones stay pending: nobody consumes that topic any more
        return paths

    def nginx(self, name, workers, port):
        d = os.path.join(self.work, "nginx-" + name)
        os.makedirs(os.path.join(d, "logs"), exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        with open(os.path.join(BENCH, "nginx.conf.in")) as f:
            text = f.read()
        text = text.replace("@WORKERS@", str(workers)).replace("@PORT@", str(port)).replace("@DIR@", d)
        with open(conf, "w") as f:
            f.write(text)
        p = self.procs.start("nginx-" + name, ["nginx", "-p", d, "-c", conf, "-e", os.path.join(d, "logs/error.log")])
        wait_until(lambda: port_open(port), 20, "nginx " + name, p)
        return p

    def http(self, paths):
        """Closed-loop maximum throughput of nginx, /healthz, the submit and the poll paths, interleaved."""
        p = self.p
        ng1 = self.nginx("1", 1, self.ports["nginx1"])
        nga = self.nginx("auto", "auto", self.ports["nginx_auto"])
        t = self.topics("http")
        self.start_api(t)
        targets = [
            ("nginx_1", dict(url=self.url("/healthz", self.ports["nginx1"]))),
            ("healthz", dict(url=self.url("/healthz"))),
            ("nginx_auto", dict(url=self.url("/healthz", self.ports["nginx_auto"]))),
            ("submit_answer", dict(url=self.url("/answer"), method="POST", body='{"prompt":"hi"}')),
            ("submit_responses", dict(url=self.url("/v1/responses"), method="POST",
                                      body='{"model":"fake","input":"hi","background":true}')),
            ("poll_complete", dict(url=self.url("/polling"), paths=paths["complete"])),
            ("poll_pending", dict(url=self.url("/polling"), paths=paths["pending"])),
        ]
        # The broker's JIT and every cache warm up first (not measured).
        self.loadgen("warm-up", self.url("/answer"), method="POST", body='{"prompt":"hi"}', dur=p["warm_s"], warm=0)
        runs = {k: [] for k, _ in targets}

        def server_pids(name):
            if name.startswith("nginx"):
                master = ng1 if name == "nginx_1" else nga
                kids = subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True, text=True).stdout
                return [int(x) for x in kids.split()]
            return [self.api.pid]

        stack = list(self.stack_pids().values())
        for rep in range(p["http_reps"]):
            for name, kw in targets:
                if name.startswith("submit"):
                    self.trim_redis(paths)
                pids = server_pids(name)
                c0 = sum(proc_cpu_s(x) for x in pids)
                s0 = sum(proc_cpu_s(x) for x in stack)
                t0 = time.time()
                r = self.loadgen("max/%s/%d" % (name, rep), **kw)
                el = time.time() - t0
                c1 = sum(proc_cpu_s(x) for x in pids)
                s1 = sum(proc_cpu_s(x) for x in stack)
                # server CPU per answer (warm-up included on both sides): less sensitive to the other tenants
                # of the machine than the throughput
                r["server_cpu_us_per_request"] = (c1 - c0) * 1e6 / r["ok"] if r["ok"] else None
                r["server_cpu_cores"] = (c1 - c0) / el
                r["stack_cpu_cores"] = (s1 - s0) / el
                # what the rest of the machine (other people's tests) took meanwhile
                r["others_cpu_cores"] = max(0.0, r["machine_busy_cores"] - r["loadgen_cpu_cores"] -
                                            r["server_cpu_cores"] - r["stack_cpu_cores"])
                runs[name].append(r)
                log("max %-16s rep %d: %8.0f req/s  p99 %.2f ms  errors %d  server CPU %.1f us/request, "
                    "others %.2f cores" % (name, rep, r["throughput_rps"], r["latency_ms"]["p99"] or -1,
                                           r["errors"]["total"], r["server_cpu_us_per_request"] or -1,
                                           r["others_cpu_cores"]))
        self.procs.stop(ng1)
        self.procs.stop(nga)
        out = {}
        for name, _ in targets:
            rs = runs[name]
            out[name] = {"throughput_rps": spread([r["throughput_rps"] for r in rs]),
                         "p50_ms": spread([r["latency_ms"]["p50"] for r in rs]),
                         "p99_ms": spread([r["latency_ms"]["p99"] for r in rs]),
                         "server_cpu_us": spread([r["server_cpu_us_per_request"] for r in rs]),
                         "others_cpu_cores": spread([r["others_cpu_cores"] for r in rs]),
                         "errors": sum(r["errors"]["total"] for r in rs),
                         "status": [r["status"] for r in rs]}

        # ratios per repetition (the two figures of a ratio were measured a few seconds apart)
        def ratio(a, b):
            return spread([ra["throughput_rps"] / rb["throughput_rps"] if rb["throughput_rps"] else None
                           for ra, rb in zip(runs[a], runs[b])])

        out["ratios"] = {
            "healthz_vs_nginx_1": ratio("healthz", "nginx_1"),
            "healthz_vs_nginx_auto": ratio("healthz", "nginx_auto"),
            "submit_answer_vs_healthz": ratio("submit_answer", "healthz"),
            "submit_responses_vs_healthz": ratio("submit_responses", "healthz"),
            "poll_complete_vs_healthz": ratio("poll_complete", "healthz"),
            "poll_pending_vs_healthz": ratio("poll_pending", "healthz"),
        }
        self.res["http"] = out
        self.res["http_api_topics"] = t
        return out

    def open_loop(self, paths):
        """Latency at 25/50/75% of each path's maximum, open loop (scheduled send times).

        The maximum the levels are taken from is measured again (closed loop, open_max_dur seconds) right before
        each repetition's three runs, not taken from step 1, which ran minutes earlier: this machine's capacity
        moves by up to half within minutes (other tenants), and a "50%" from an earlier, faster minute can be
        80-90% of what the machine has now (bench/ANALYSIS.md, session 9)."""
        p = self.p
        t = self.topics("open")
        self.start_api(t)
        eps = [
            ("submit_answer", dict(url=self.url("/answer"), method="POST", body='{"prompt":"hi"}')),
            ("submit_responses", dict(url=self.url("/v1/responses"), method="POST",
                                      body='{"model":"fake","input":"hi","background":true}')),
            ("poll_complete", dict(url=self.url("/polling"), paths=paths["complete"])),
            ("poll_pending", dict(url=self.url("/polling"), paths=paths["pending"])),
        ]
        runs = {}
        maxes = {}
        for rep in range(p["open_reps"]):
            for name, kw in eps:
                if name.startswith("submit"):
                    self.trim_redis(paths)
                m = self.loadgen("open/%s/max/%d" % (name, rep), dur=p["open_max_dur"], **kw)
                mx = m["throughput_rps"]
                maxes.setdefault(name, []).append(mx)
                log("open %-16s max rep %d: %.0f/s (step 1's median: %.0f/s)" % (
                    name, rep, mx, self.res["http"][name]["throughput_rps"]["median"]))
                for lv in p["levels"]:
                    rate = max(1.0, round(mx * lv))
                    if name.startswith("submit"):
                        self.trim_redis(paths)
                    r = self.loadgen("open/%s/%d/%d" % (name, int(lv * 100), rep), rate=rate,
                                     dur=p["open_dur"], warm=p["open_warm"], timeline=True, **kw)
                    r["others_cpu_cores"] = None
                    runs.setdefault((name, lv), []).append(r)
                    # the broker's GC pauses inside the measured window, as [s into the run, ms]
                    w0 = r["started_at"] + p["open_warm"]
                    r["broker_gc_pauses"] = [[round(end - sec - r["started_at"], 3), round(sec * 1000, 1)]
                                             for end, sec in gc_pauses(os.path.join(self.args.stack_dir, "logs"))
                                             if w0 <= end and end - sec <= w0 + p["open_dur"]]
                    worst = max(r["stalls"], key=lambda x: x[2], default=None)
                    gcw = max(r["broker_gc_pauses"], key=lambda x: x[1], default=None)
                    log("open %-16s %3d%% (%6.0f/s) rep %d: p50 %.2f p99 %.2f p99.9 %.2f ms, got %.0f/s, err %d; "
                        "%d stalls over 10 ms%s, loadgen's longest turn %.1f ms; %d broker GC pauses%s" % (
                            name, lv * 100, rate, rep, r["latency_ms"]["p50"], r["latency_ms"]["p99"],
                            r["latency_ms"]["p99.9"], r["throughput_rps"], r["errors"]["total"], len(r["stalls"]),
                            " (worst %.0f ms at %.2f s, %.2f s long)" % (worst[2], worst[0], worst[1]) if worst
                            else "", r["loadgen_loop_gap_max_ms"], len(r["broker_gc_pauses"]),
                            " (longest %.0f ms at %.2f s)" % (gcw[1], gcw[0]) if gcw else ""))
        out = {}
        for (name, lv), rs in runs.items():
            out.setdefault(name, []).append({
                "level": lv, "offered_rps": med([r["offered_rps"] for r in rs]),
                "offered_rps_spread": spread([r["offered_rps"] for r in rs]),
                "max_rps": spread(maxes[name]),
                "achieved_rps": spread([r["throughput_rps"] for r in rs]),
                "p50_ms": spread([r["latency_ms"]["p50"] for r in rs]),
                "p90_ms": spread([r["latency_ms"]["p90"] for r in rs]),
                "p99_ms": spread([r["latency_ms"]["p99"] for r in rs]),
                "p999_ms": spread([r["latency_ms"]["p99.9"] for r in rs]),
                "max_ms": spread([r["latency_ms"]["max"] for r in rs]),
                "errors": sum(r["errors"]["total"] for r in rs),
                "backlog_max": max(r["backlog_max"] for r in rs),
            })
        self.stop_api()
        self.res["open_loop"] = out
        return out

    def worker_throughput(self, lat, inflight, rep):
        """Completions/s with a preloaded backlog, sampled from /metrics over >= window seconds."""
        p = self.p
        self.start_fake(lat)
        bound = inflight * 1000.0 / lat
        ramp = 3.0 + 2.0 * lat / 1000.0
        expect = min(bound, p["worker_rate_cap"])
        n = int(math.ceil(expect * (p["window"] + ramp + 8))) + inflight
        t = self.topics("w%d_%d" % (lat, inflight))
        t0 = time.time()
        pr = json.loads(self.kbench("produce", "-t", t["p"], "-n", str(n), "--id-prefix", "w%d" % self.seq))
        log("worker %d ms / %d in flight: preloaded %d prompts in %.1f s" % (lat, inflight, n, time.time() - t0))
        w = self.start_worker(t, inflight)
        samples = []
        start = time.time()
        first = None
        wstart = None
        exhausted = False
        while True:
            time.sleep(0.25 if self.args.smoke else 1.0)
            m = metrics(self.ports["metrics"])
            if m is None:
                if w.poll() is not None:
                    raise RuntimeError("worker exited with status %s%s (see worker.log)" % (
                        w.returncode, " (SIGSEGV)" if w.returncode == -11 else ""))
                continue
            now = time.time()
            try:
                cpu = proc_cpu_s(w.pid)
                rss = proc_rss(w.pid)
            except OSError:
                cpu = rss = None
            done = m.get("asyncllm_worker_completed_total", 0)
            samples.append({"t": now - start, "completed": done, "in_flight": m.get("asyncllm_worker_in_flight"),
                            "buffered": m.get("asyncllm_worker_buffered"), "cpu_s": cpu, "rss": rss,
                            "fake_cpu_s": proc_cpu_s(self.fake.pid)})
            if first is None and done > 0:
                first = now - start
                wstart = first + ramp
            if done >= n - inflight:
                exhausted = True
                break
            if wstart is not None and now - start >= wstart + p["window"]:
                break
            if now - start > p["window"] + ramp + 120:
                raise RuntimeError("worker %d/%d: no completions" % (lat, inflight))
        self.stop_worker()
        win = [s for s in samples if s["t"] >= (wstart or 0)]
        if len(win) < 2:
            win = samples[-2:]
        a, b = win[0], win[-1]
        rate = (b["completed"] - a["completed"]) / (b["t"] - a["t"])
        # sub-windows: the spread of the rate inside the run
        subs = []
        i = 0
        while i < len(win):
            j = i
            while j < len(win) and win[j]["t"] - win[i]["t"] < p["sub_window"]:
                j += 1
            if j < len(win):
                subs.append((win[j]["completed"] - win[i]["completed"]) / (win[j]["t"] - win[i]["t"]))
            i = j if j > i else i + 1
        cpu = (b["cpu_s"] - a["cpu_s"]) / (b["t"] - a["t"]) if a["cpu_s"] is not None else None
        fcpu = (b["fake_cpu_s"] - a["fake_cpu_s"]) / (b["t"] - a["t"])
        r = {"llm_latency_ms": lat, "in_flight": inflight, "rep": rep, "bound_rps": bound, "preloaded": n,
             "produce": pr, "window_s": b["t"] - a["t"], "completions_per_s": rate,
             "sub_windows": spread(subs), "backlog_exhausted": exhausted, "worker_cpu_cores": cpu,
             "fakellm_cpu_cores": fcpu, "worker_rss_max": max((s["rss"] or 0) for s in samples),
             "in_flight_mean": statistics.mean(s["in_flight"] or 0 for s in win),
             "buffered_mean": statistics.mean(s["buffered"] or 0 for s in win),
             "samples": samples}
        log("worker %d ms / %d in flight rep %d: %.0f completions/s over %.0f s (bound %.0f, %.0f%%), "
            "worker CPU %.2f cores, in flight %.0f, buffered %.0f on average%s" % (
                lat, inflight, rep, rate, r["window_s"], bound, 100 * rate / bound, cpu or 0, r["in_flight_mean"],
                r["buffered_mean"], ", BACKLOG EXHAUSTED" if exhausted else ""))
        return r

    def worker_latency(self, lat, inflight, rate):
        """Added latency: broker append time of the prompt -> of its response, minus the LLM's latency."""
        p = self.p
        self.start_fake(lat)
        t = self.topics("l%d_%d" % (lat, inflight))
        self.start_worker(t, inflight)
        # A new assignment's partitions join the worker's fetches one by one (librdkafka starts each when its
        # offset is known) and the first fetch, naming only some, is a long poll of up to fetch.wait.max.ms
        # (500 ms): a prompt arriving meanwhile in another partition waits for it (docs/WORKER.md, Fetching).
        # That is start-up, not the added latency this step measures: the first prompt comes after that poll.
        time.sleep(1.0)
        n = max(3, int(round(rate * p["live_dur"])))
        log("latency %d ms / %d in flight: producing %d prompts at %.1f/s" % (lat, inflight, n, rate))
        self.kbench("produce", "-t", t["p"], "-n", str(n), "-r", "%.3f" % rate, "--id-prefix", "l%d" % self.seq)
        wait_until(lambda: (metrics(self.ports["metrics"]) or {}).get("asyncllm_worker_completed_total", 0) >= n,
                   60 + 3 * lat / 1000.0 * max(1, n / max(inflight, 1)), "worker completing the live prompts",
                   self.worker, 0.2)
        time.sleep(0.5)  # the last responses' delivery reports
        self.stop_worker()
        ps = dict(line.split("\t") for line in self.kbench("stamps", "-t", t["p"]).splitlines() if "\t" in line)
        rs = dict(line.split("\t") for line in self.kbench("stamps", "-t", t["r"]).splitlines() if "\t" in line)
        keys = sorted(ps)
        skip = len(keys) // 10  # the first 10% warm the pipeline up
        added = sorted(int(rs[k]) - int(ps[k]) - lat for k in keys[skip:] if k in rs)
        r = {"llm_latency_ms": lat, "in_flight": inflight, "rate": rate, "prompts": n,
             "responses": len(rs), "samples": len(added),
             "added_ms": {"p50": percentile(added, 50), "p90": percentile(added, 90), "p99": percentile(added, 99),
                          "max": added[-1] if added else None, "min": added[0] if added else None}}
        log("latency %d ms / %d in flight at %.0f/s: added p50 %s p99 %s max %s ms (%d samples)" % (
            lat, inflight, rate, r["added_ms"]["p50"], r["added_ms"]["p99"], r["added_ms"]["max"], len(added)))
        return r

    def worker_all(self):
        p = self.p
        out = {"runs": [], "latency": []}
        out["failed"] = []
        self.res["worker"] = out
        for lat in p["worker_latencies"]:
            for f in p["worker_inflight"]:
                if "worker_pairs" in p and (lat, f) not in p["worker_pairs"]:
                    continue
                reps = p["key_reps"] if (lat, f) == tuple(p["key_config"]) else 1
                runs = []
                for rep in range(reps):
                    try:
                        self.flush_redis()
                        runs.append(self.worker_throughput(lat, f, rep))
                    except Exception as e:  # noqa: BLE001
                        log("worker %d ms / %d in flight rep %d FAILED: %s" % (lat, f, rep, e))
                        out["failed"].append({"llm_latency_ms": lat, "in_flight": f, "rep": rep, "step": "throughput",
                                              "error": str(e), "worker_log_tail": self.log_tail("worker")})
                        self.stop_worker()
                out["runs"].extend(runs)
                measured = med([r["completions_per_s"] for r in runs])
                bound = f * 1000.0 / lat
                # 75% of what the in-flight limit allows, and at most 75% of what the worker sustained
                rate = min(0.75 * bound, 0.75 * measured) if measured else 0.75 * bound
                try:
                    self.flush_redis()
                    out["latency"].append(self.worker_latency(lat, f, max(rate, 0.5)))
                except Exception as e:  # noqa: BLE001
                    log("latency %d ms / %d in flight FAILED: %s" % (lat, f, e))
                    out["failed"].append({"llm_latency_ms": lat, "in_flight": f, "step": "latency", "error": str(e),
                                          "worker_log_tail": self.log_tail("worker")})
                    self.stop_worker()
        return out

    def memory(self):
        p = self.p
        out = {}
        # worker: RSS idle, then with F/4 and F prompts in flight (the fake LLM holds them for 5 minutes)
        self.flush_redis()
        self.start_fake(100)
        f = p["mem_inflight"]
        t = self.topics("mem")
        w = self.start_worker(t, f)
        time.sleep(2)
        idle = proc_rss(w.pid)
        steps = [("quarter", f // 4), ("full", f - f // 4)]
        pts = [(0, idle)]
        for name, k in steps:
            self.kbench("produce", "-t", t["p"], "-n", str(k), "--id-prefix", "m%s%d" % (name, self.seq),
                        "--prompt", "[[latency=300000]] hi")
            want = pts[-1][0] + k
            wait_until(lambda: (metrics(self.ports["metrics"]) or {}).get("asyncllm_worker_in_flight", 0) >= want,
                       120, "worker holding %d prompts" % want, w, 0.5)
            time.sleep(2)
            pts.append((want, proc_rss(w.pid)))
            log("memory: worker RSS %.1f MiB with %d in flight" % (pts[-1][1] / 2 ** 20, want))
        m = metrics(self.ports["metrics"])
        self.stop_worker()
        self.stop_fake()  # drops its 16k held requests
        out["worker"] = {"in_flight": f, "idle_rss": idle, "points": pts,
                         "bytes_per_prompt_beyond_idle": (pts[-1][1] - idle) / f,
                         "bytes_per_prompt_slope": (pts[-1][1] - pts[1][1]) / (pts[-1][0] - pts[1][0]),
                         "buffered": m.get("asyncllm_worker_buffered") if m else None}
        log("memory: worker %.0f bytes per in-flight prompt beyond idle (slope %.0f)" % (
            out["worker"]["bytes_per_prompt_beyond_idle"], out["worker"]["bytes_per_prompt_slope"]))

        # API: a fresh process, then N idle keep-alive connections (each made one GET /healthz)
        t = self.topics("idle")
        api = self.start_api(t)
        time.sleep(1)
        rss0 = proc_rss(api.pid)
        n = p["idle_conns"]
        errpath = os.path.join(self.work, "idle.err")
        with open(errpath, "w") as err:
            lg = subprocess.Popen([self.bin["loadgen"], "--label", "idle", "--idle", str(n), "--hold",
                                   str(p["idle_hold"]), "--connect-batch", "500", self.url("/healthz")],
                                  stdout=subprocess.PIPE, stderr=err, text=True)
        wait_until(lambda: "ready" in open(errpath).read(), 120, "idle connections", lg, 0.2)
        time.sleep(2)
        rss1 = proc_rss(api.pid)
        fds = proc_fds(api.pid)
        lgout, _ = lg.communicate(timeout=p["idle_hold"] + 60)
        lr = json.loads(lgout.strip().splitlines()[-1])
        self.raw.append(lr)
        self.stop_api()
        out["api"] = {"connections": n, "established": lr["established"], "open_after_hold": lr["open_after_hold"],
                      "api_fds": fds, "rss_before": rss0, "rss_with_idle": rss1,
                      "bytes_per_connection": (rss1 - rss0) / max(1, lr["established"])}
        log("memory: api RSS %.1f MiB -> %.1f MiB with %d idle connections (%.0f bytes each)" % (
            rss0 / 2 ** 20, rss1 / 2 ** 20, lr["established"], out["api"]["bytes_per_connection"]))
        self.res["memory"] = out
        return out

    def cpu(self):
        """CPU seconds per 1,000 prompts, submitted through the API and answered by the worker."""
        p = self.p
        self.flush_redis()
        self.start_fake(100)
        t = self.topics("cpu")
        api = self.start_api(t)
        w = self.start_worker(t, 4096)
        others = self.stack_pids()
        others["fakellm"] = self.fake.pid
        reps = []
        for rep in range(p["cpu_reps"]):
            m0 = metrics(self.ports["metrics"])["asyncllm_worker_completed_total"]
            c0 = {"api": proc_cpu_s(api.pid), "worker": proc_cpu_s(w.pid)}
            o0 = {k: proc_cpu_s(v) for k, v in others.items()}
            t0 = time.time()
            r = self.loadgen("cpu/%d" % rep, self.url("/answer"), rate=p["cpu_rate"], dur=p["cpu_dur"], warm=0,
                             method="POST", body='{"prompt":"hi"}')
            n = r["ok"]
            wait_until(lambda: metrics(self.ports["metrics"])["asyncllm_worker_completed_total"] >= m0 + n, 120,
                       "worker completing the CPU prompts", w, 0.1)
            el = time.time() - t0
            c1 = {"api": proc_cpu_s(api.pid), "worker": proc_cpu_s(w.pid)}
            o1 = {k: proc_cpu_s(v) for k, v in others.items()}
            d = {k: c1[k] - c0[k] for k in c0}
            per = {k: v / n * 1000 for k, v in d.items()}
            per["total"] = per["api"] + per["worker"]
            reps.append({"prompts": n, "elapsed_s": el, "cpu_s": d, "per_1000": per,
                         "others_per_1000": {k: (o1[k] - o0[k]) / n * 1000 for k in o0},
                         "submit_p99_ms": r["latency_ms"]["p99"]})
            log("cpu rep %d: %d prompts, api %.3f + worker %.3f = %.3f CPU s per 1000 prompts" % (
                rep, n, per["api"], per["worker"], per["total"]))
        self.stop_worker()
        self.stop_api()
        out = {"rate": p["cpu_rate"], "reps": reps,
               "per_1000": {k: spread([r["per_1000"][k] for r in reps]) for k in ("api", "worker", "total")},
               "others_per_1000": {k: spread([r["others_per_1000"][k] for r in reps]) for k in others}}
        self.res["cpu"] = out
        return out

    def run(self):
        t0 = time.time()
        self.res["mode"] = "smoke" if self.args.smoke else "full"
        self.res["started_at"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.res["machine"] = self.machine()
        self.res["params"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.p.items()}
        self.res["errors"] = []

        def step(name, fn):
            # a step that fails is recorded and the run goes on: the other figures are still worth having
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                log("STEP FAILED: %s: %s" % (name, e))
                self.res["errors"].append({"step": name, "error": str(e)})
                self.stop_worker()
                self.stop_api()

        try:
            def http_steps():
                # These steps store about 2 million conversations (1 h TTL). Redis' automatic AOF rewrite (a
                # fork, then a child writing the whole dataset for seconds on the same 2 cores) would fall on
                # whichever run happened to be going: off here, on again for the worker steps, which start
                # from an empty Redis. Every write is still appended to the AOF and fsynced each second.
                self.redis_cmd("CONFIG", "SET", "auto-aof-rewrite-percentage", "0")
                forks = self.redis_forks()
                try:
                    paths = self.prep_poll_ids()
                    log("== 1. HTTP ceiling, submit and poll: maximum throughput (closed loop, %d connections)" %
                        self.p["conns"])
                    self.http(paths)
                    log("== 2. latency at fixed offered rates (open loop)")
                    self.open_loop(paths)
                finally:
                    after = self.redis_forks()
                    self.res["http_redis_forks"] = after - forks if None not in (after, forks) else None
                    self.redis_cmd("CONFIG", "SET", "auto-aof-rewrite-percentage", "100")
                    self.flush_redis()

            only = set(self.args.only.split(",")) if self.args.only else None
            if only is None or "http" in only:
                step("http", http_steps)
            if only is None or "worker" in only:
                log("== 3. worker")
                step("worker", self.worker_all)
            if only is None or "memory" in only:
                log("== 4. memory")
                step("memory", self.memory)
            if only is None or "cpu" in only:
                log("== 5. CPU per 1,000 prompts")
                step("cpu", self.cpu)
        finally:
            self.procs.stop_all()
        with open("/proc/loadavg") as f:
            self.res["machine"]["loadavg_at_end"] = f.read().split()[:3]
        self.res["duration_s"] = time.time() - t0
        self.res["loadgen_raw"] = self.raw
        return self.res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--work", required=True, help="scratch directory (logs, id files)")
    ap.add_argument("--out", required=True, help="results JSON to write")
    ap.add_argument("--asyncllm", required=True)
    ap.add_argument("--fakellm", required=True)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--kbench", required=True)
    ap.add_argument("--kafka-port", type=int, required=True)
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--stack-dir", required=True)
    ap.add_argument("--port-base", type=int, required=True)
    ap.add_argument("--only", default="", help="comma-separated steps to run: http,worker,memory,cpu (default all)")
    ap.add_argument("--worker", default="", help="worker (latency ms:in-flight) pairs, e.g. 1000:4096,100:256")
    args = ap.parse_args()
    args.bin = {"asyncllm": args.asyncllm, "fakellm": args.fakellm, "loadgen": args.loadgen, "kbench": args.kbench}
    b = Bench(args)

    def on_signal(sig, frame):
        b.procs.stop_all()
        sys.exit(128 + sig)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    res = b.run()
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, args.out)
    log("results: %s (%.0f s)" % (args.out, res["duration_s"]))


if __name__ == "__main__":
    main()
