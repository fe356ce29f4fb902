"""The store's window on its Redis connection: a worker that starts with thousands of prompts waiting sends
their BEGIN scripts through a window of written commands (src/store/store.c), not all at once, and its
Redis timeout measures Redis, not the store's own queue.

The prompts are produced before the worker starts (a backlog, as after an outage), the worker may run all
of them at once (--max-in-flight = the backlog), and --redis-timeout-ms is low, so that a burst written at
once cannot be answered within it: the old store then dropped the connection, every operation failed, the
jobs retried into another burst, and the worker went round in "command timed out ... dropping the
connection" (seen with 16,384 prompts and the default 5 s on a loaded machine). With the window, the oldest
written command is answered within the timeout, so the connection is never dropped and every prompt
completes once. A pause of Redis shorter than the timeout in the middle of the run changes nothing."""

import threading
import uuid

import pytest

from conftest import llm_answer, unique, wait_for

FAKELLM_ARGS = ("--latency-ms", "50", "--jitter-ms", "50")
N = 8192
REDIS_TIMEOUT_MS = 1000
DROP = "dropping the connection"


def test_a_backlog_started_at_once_never_times_the_connection_out(cluster, fakellm, kafka, redis):
    cluster.start("api")  # creates the topics (the broker does not auto-create them)
    tag = unique("win")
    prompts = {"w" + uuid.uuid4().hex[:21]: f"{tag} n{i}" for i in range(N)}
    kafka.produce(cluster.topic_prompts, [(cid, {"conversation_id": cid, "prompt": p, "turn": 1})
                                          for cid, p in prompts.items()])

    worker = cluster.start("worker", max_in_flight=N, max_buffered=N, redis_timeout_ms=REDIS_TIMEOUT_MS)

    # Once the burst is under way, pause Redis' clients for half the timeout: written commands wait in
    # Redis, queued ones in the store; neither may drop the connection.
    paused = threading.Event()

    def pause_redis():
        try:
            wait_for(lambda: worker.metrics()["asyncllm_worker_completed_total"] >= N // 4, 240,
                     "a quarter of the backlog to complete", interval=0.05)
            redis.command("CLIENT", "PAUSE", str(REDIS_TIMEOUT_MS // 2), "WRITE")
            paused.set()
        except BaseException:  # noqa: BLE001 - reported by the main thread's checks
            pass

    pauser = threading.Thread(target=pause_redis, daemon=True)
    pauser.start()

    def done():
        log = worker.proc.log()
        if DROP in log:
            line = next(ln for ln in log.splitlines() if DROP in ln)
            pytest.fail(f"the worker dropped its Redis connection: {line}", pytrace=False)
        return worker.metrics()["asyncllm_worker_completed_total"] >= N

    try:
        wait_for(done, 300, f"the worker to complete {N} prompts", interval=0.2)
    finally:
        pauser.join(timeout=5)

    convs = redis.conversations(prompts)
    wrong = [(cid, convs[cid].get("t1.status")) for cid, p in prompts.items()
             if (convs[cid].get("t1.status"), convs[cid].get("t1.response")) != ("complete", llm_answer(p))]
    assert not wrong, f"{len(wrong)} prompt(s) not complete with their answer: {wrong[:5]}"
    assert paused.is_set(), "Redis was not paused during the run"
    m = worker.metrics()
    assert m["asyncllm_worker_completed_total"] == N, m
    assert DROP not in worker.proc.log()
    print(f"\nstore window: {N} prompts started at once with --redis-timeout-ms={REDIS_TIMEOUT_MS}: all complete, "
          f"no connection dropped; LLM calls {m['asyncllm_worker_llm_calls_total']:.0f}")

