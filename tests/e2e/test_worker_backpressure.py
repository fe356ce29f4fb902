"""Backpressure: a topic much deeper than the worker may hold (--max-buffered) is worked through with the
partitions paused and resumed many times; memory stays bounded (the buffered gauge), the in-flight limit
holds, and pausing loses, repeats and reorders nothing.

The prompts are produced straight to the topic with kcat, several turns per conversation with their turn
numbers, as another producer may write them (no Redis record made by the API)."""

import threading
import time
import uuid

import pytest

from conftest import llm_answer, unique, wait_for

FAKELLM_ARGS = ("--latency-ms", "50", "--jitter-ms", "100")
MAX_IN_FLIGHT = 10
MAX_BUFFERED = 40
N_CONV, N_TURNS = 150, 3


@pytest.fixture(scope="module")
def worker(cluster):
    return cluster.start("worker", max_in_flight=MAX_IN_FLIGHT, max_buffered=MAX_BUFFERED)


def history(prompts):
    msgs = []
    for i, p in enumerate(prompts):
        msgs.append({"role": "user", "content": p})
        if i < len(prompts) - 1:
            msgs.append({"role": "assistant", "content": llm_answer(p, messages=2 * i + 1)})
    return msgs


def test_a_deep_topic_is_worked_through_with_bounded_memory(cluster, worker, fakellm, kafka, redis):
    tag = unique("bp")
    prompts = {"b" + uuid.uuid4().hex[:21]: [f"{tag} c{c} t{t}" for t in range(1, N_TURNS + 1)] for c in range(N_CONV)}
    msgs = [(cid, {"conversation_id": cid, "prompt": ps[t - 1], "turn": t})
            for t in range(1, N_TURNS + 1) for cid, ps in prompts.items()]

    peak = {"buffered": 0.0, "in_flight": 0.0, "paused": 0.0, "llm_in_flight": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                m = worker.metrics()
                peak["buffered"] = max(peak["buffered"], m["asyncllm_worker_buffered"])
                peak["in_flight"] = max(peak["in_flight"], m["asyncllm_worker_in_flight"])
                peak["paused"] = max(peak["paused"], m["asyncllm_worker_paused_partitions"])
                peak["llm_in_flight"] = max(peak["llm_in_flight"], fakellm.stats()["in_flight"])
            except Exception:  # noqa: BLE001 - a sample lost is no harm
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        kafka.produce(cluster.topic_prompts, msgs)
        wait_for(lambda: worker.metrics()["asyncllm_worker_completed_total"] >= len(msgs), 120,
                 f"the worker to complete {len(msgs)} prompts", interval=0.1)
    finally:
        stop.set()
        sampler.join()

    convs = redis.conversations(prompts)
    for cid, ps in prompts.items():
        h = convs[cid]
        assert h.get("turns") == str(N_TURNS), h
        for n, p in enumerate(ps, start=1):
            assert (h.get(f"t{n}.prompt"), h.get(f"t{n}.status"), h.get(f"t{n}.response")) == (
                p, "complete", llm_answer(p, messages=2 * n - 1)), (cid, n, h)

    by_prompt = {p: (cid, n) for cid, ps in prompts.items() for n, p in enumerate(ps, start=1)}
    calls = {}
    for req in fakellm.requests():
        last = req["messages"][-1]["content"]
        if last in by_prompt:
            cid, n = by_prompt[last]
            assert req["messages"] == history(prompts[cid][:n]), f"turn {n} of {cid} reached the LLM with {req['messages']!r}"
            calls[last] = calls.get(last, 0) + 1
    assert set(calls) == set(by_prompt), f"{len(set(by_prompt) - set(calls))} prompt(s) never reached the LLM"
    dup = {p: n for p, n in calls.items() if n > 1}
    assert not dup, f"prompts sent to the LLM more than once (a paused partition refetched and redone?): {list(dup.items())[:5]}"

    m = worker.metrics()
    print(f"\nbackpressure: {len(msgs)} prompts, max-buffered {MAX_BUFFERED}, max-in-flight {MAX_IN_FLIGHT}: peak buffered "
          f"{peak['buffered']:.0f}, peak in flight {peak['in_flight']:.0f} (fake LLM {peak['llm_in_flight']}), "
          f"peak paused partitions {peak['paused']:.0f}; redelivered-finished {m['asyncllm_worker_redelivered_finished_total']:.0f}")
    assert peak["paused"] > 0, "the worker never paused its partitions with the topic 15 times deeper than max-buffered"
    assert peak["llm_in_flight"] <= MAX_IN_FLIGHT and peak["in_flight"] <= MAX_IN_FLIGHT, peak
    # Bounded: a little over max-buffered at most (messages librdkafka had already handed over when the
    # partitions paused), never the depth of the topic.
    assert peak["buffered"] <= 2 * MAX_BUFFERED, f"{peak['buffered']:.0f} prompts held with max-buffered {MAX_BUFFERED}"
