#!/usr/bin/env python3
"""worker_ab.py - alternate asyncllm worker binaries on one bench stack (experiments, not part of make bench).

For each round and each binary in turn: bench.py's worker_throughput (a preloaded backlog, one window) and,
unless --no-lat, worker_latency at a fixed live rate. Prints one JSON line per run with completions/s, the
worker's CPU (cores) and CPU per completion (us_per), and the added latency p50/p90/p99 (ms). Alternating
binaries under the same conditions is what makes the comparison fair on a shared machine.

The stack must be up, e.g.
  ASYNCLLM_STACK_DIR=/tmp/asyncllm-bench-worker KAFKA_PORT=17092 KAFKA_CONTROLLER_PORT=17093 REDIS_PORT=17390 \\
      scripts/stack.sh up
  python3 bench/worker_ab.py --bins 'old=/tmp/asyncllm.old,new=build/asyncllm' --rounds 2 --rate 3000
A binary may carry extra worker flags after '|': 'l5=build/asyncllm|-X linger.ms=5'.
Needs build/fakellm, build/bench/loadgen and build/bench/kbench (bench/run.sh builds them).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bins", required=True, help="tag=path[|flags],... binaries to alternate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pair", default="1000:4096", help="LLM latency ms:in-flight")
    ap.add_argument("--window", type=float, default=15.0, help="throughput window, seconds")
    ap.add_argument("--rate", type=float, default=3000.0, help="live prompts/s of the latency run")
    ap.add_argument("--no-tput", action="store_true", help="skip the throughput run")
    ap.add_argument("--no-lat", action="store_true", help="skip the latency run")
    ap.add_argument("--port-base", type=int, default=17000)
    ap.add_argument("--kafka-port", type=int, default=17092)
    ap.add_argument("--redis-port", type=int, default=17390)
    ap.add_argument("--stack-dir", default="/tmp/asyncllm-bench-worker")
    a = ap.parse_args()
    lat, inflight = (int(x) for x in a.pair.split(":"))
    work = "/tmp/asyncllm-worker-ab-%d" % os.getpid()
    os.makedirs(work, exist_ok=True)
    ns = argparse.Namespace(
        smoke=False, work=work, out=os.path.join(work, "results.json"), asyncllm="",
        fakellm=os.path.join(REPO, "build/fakellm"), loadgen=os.path.join(REPO, "build/bench/loadgen"),
        kbench=os.path.join(REPO, "build/bench/kbench"), kafka_port=a.kafka_port, redis_port=a.redis_port,
        stack_dir=a.stack_dir, port_base=a.port_base, only="worker", worker=a.pair)
    ns.bin = {"asyncllm": "", "fakellm": ns.fakellm, "loadgen": ns.loadgen, "kbench": ns.kbench}
    b = B.Bench(ns)
    b.p["window"] = a.window
    flags = {"x": []}
    start = b.start_worker
    b.start_worker = lambda t, f, extra=(): start(t, f, tuple(extra) + tuple(flags["x"]))
    bins = []
    for item in a.bins.split(","):
        tag, rest = item.split("=", 1)
        path, _, extra = rest.partition("|")
        bins.append((tag, path, extra.split()))
    try:
        for r in range(a.rounds):
            for tag, path, extra in bins:
                b.bin["asyncllm"] = path
                flags["x"] = extra
                res = {"tag": tag, "round": r}
                if not a.no_tput:
                    b.flush_redis()
                    t = b.worker_throughput(lat, inflight, r)
                    res.update(rate=t["completions_per_s"], cpu=t["worker_cpu_cores"],
                               us_per=1e6 * t["worker_cpu_cores"] / t["completions_per_s"])
                if not a.no_lat:
                    b.flush_redis()
                    lr = b.worker_latency(lat, inflight, a.rate)
                    res.update(p50=lr["added_ms"]["p50"], p90=lr["added_ms"]["p90"], p99=lr["added_ms"]["p99"])
                print(json.dumps(res), flush=True)
    finally:
        b.procs.stop_all()


if __name__ == "__main__":
    main()
