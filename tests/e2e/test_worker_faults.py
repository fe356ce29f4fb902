"""Faults at random (issue 3): the fake LLM answers 20% 429 (with Retry-After), 10% 500 and leaves 5% of the
calls hanging past the worker's --llm-timeout-ms. Every prompt completes or fails with a clear error after
at most --max-attempts calls; a failure is on /polling, in Redis, on the responses topic (status failed) and
on the dead-letter topic with headers; the worker never crashes and the sanitizers stay clean (checked by
the module's teardown in conftest). A few prompts that always fail (a 503 forever, a hang forever) make sure
the failure path is taken whatever the random draws."""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import llm_answer, unique, wait_for

FAKELLM_ARGS = ("--rate-429", "0.2", "--rate-500", "0.1", "--rate-hang", "0.05", "--seed", "7", "--jitter-ms", "300")
MAX_ATTEMPTS = 4
LLM_TIMEOUT_MS = 1500
N_CONV, N_TURNS = 80, 3
RETRYABLE_CODES = {"llm_rate_limited", "llm_server_error", "llm_timeout"}


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all", max_attempts=MAX_ATTEMPTS, llm_timeout_ms=LLM_TIMEOUT_MS, retry_base_ms=100,
                         retry_max_ms=1000)


def expected_messages(turns, n):
    """The messages of turn n's LLM call: every earlier complete turn, then turn n's prompt. turns maps a
    turn number to its Redis fields {prompt, status, response}."""
    msgs = []
    for i in range(1, n):
        if turns[i]["status"] == "complete":
            msgs += [{"role": "user", "content": turns[i]["prompt"]},
                     {"role": "assistant", "content": turns[i]["response"]}]
    return msgs + [{"role": "user", "content": turns[n]["prompt"]}]


def test_every_prompt_completes_or_fails_clearly(node, fakellm, redis, kafka, cluster):
    rng = random.Random(7)
    tag = unique("fault")
    prompts = {}  # cid -> [prompt of turn 1, 2, ...]
    # Always failing, whatever the random faults: a 503 forever, a hang forever; and a conversation
    # whose first turn fails and whose second turn (plain) must still complete.
    sure_fail = [f"{tag} always-503 [[status=503]]", f"{tag} always-503 b [[status=503]]", f"{tag} always-hang [[hang]]"]

    def new_conv(p):
        cid = node.submit(p)["conversation_id"]
        return cid

    with ThreadPoolExecutor(16) as pool:
        batch = [f"{tag} c{c} t1" for c in range(N_CONV)]
        for cid, p in zip(pool.map(new_conv, batch), batch):
            prompts[cid] = [p]
        for p in sure_fail:
            prompts[new_conv(p)] = [p]
        cids = [cid for cid in prompts if prompts[cid][0] in batch]
        for t in range(2, N_TURNS + 1):
            batch = [f"{tag} c{c} t{t}" for c in range(N_CONV)]
            list(pool.map(lambda a: node.submit(a[0], conversation_id=a[1], method=rng.choice(["GET", "POST"])),
                          zip(batch, cids)))
            for cid, p in zip(cids, batch):
                prompts[cid].append(p)
    mixed_cid = new_conv(f"{tag} fails first [[status=500]]")
    prompts[mixed_cid] = [f"{tag} fails first [[status=500]]", f"{tag} then succeeds"]
    node.submit(prompts[mixed_cid][1], conversation_id=mixed_cid)
    n_prompts = sum(len(v) for v in prompts.values())

    # Every accepted prompt is on the prompts topic (the API answers 202 only after the broker's ack).
    on_topic = {(m["key"], m["value"]["turn"]) for m in kafka.read(cluster.topic_prompts) if m["key"] in prompts}
    absent = [(cid, n, p) for cid, ps in prompts.items() for n, p in enumerate(ps, start=1) if (cid, n) not in on_topic]
    assert not absent, f"{len(absent)} prompt(s) answered 202 are not on the prompts topic: {absent[:5]}"

    # Hang guard: at most 4 attempts of at most 1.5 s plus backoffs per turn, 3 turns in a row.
    bodies = node.wait_all_done(prompts, timeout=180, kafka=kafka, topic=cluster.topic_prompts)

    convs = redis.conversations(prompts)
    turns = {}  # cid -> n -> {prompt, status, response, ...}
    by_prompt = {}  # prompt -> (cid, n)
    for cid, ps in prompts.items():
        h = convs[cid]
        assert h.get("turns") == str(len(ps)), h
        turns[cid] = {}
        for n, p in enumerate(ps, start=1):
            t = {k[len(f"t{n}."):]: v for k, v in h.items() if k.startswith(f"t{n}.")}
            assert t.get("prompt") == p, h
            assert t.get("status") in ("complete", "failed"), f"turn {n} of {cid} not finished: {h}"
            turns[cid][n] = t
            by_prompt[p] = (cid, n)

    complete = failed = 0
    for cid, ts in turns.items():
        for n, t in ts.items():
            if t["status"] == "complete":
                complete += 1
                c = sum(1 for i in range(1, n) if ts[i]["status"] == "complete")
                assert t["response"] == llm_answer(t["prompt"], messages=2 * c + 1), (cid, n, t)
                assert 1 <= int(t["attempts"]) <= MAX_ATTEMPTS, t
            else:
                failed += 1
                assert t.get("error_code") in RETRYABLE_CODES, (cid, n, t)
                assert t.get("error_message"), (cid, n, t)
                assert t["attempts"] == str(MAX_ATTEMPTS), (cid, n, t)
                assert f"gave up after {MAX_ATTEMPTS} attempt" in t["error_message"], t
    for p in sure_fail + [prompts[mixed_cid][0]]:
        cid, n = by_prompt[p]
        assert turns[cid][n]["status"] == "failed", turns[cid][n]
    # Turn 2 runs despite the failed turn 1 (it is not blocked behind it). It meets the same random faults as
    # every prompt here (35% per call), so it may itself fail after MAX_ATTEMPTS (about 1.5% of runs): what
    # matters is that it reached a final state; the LLM's view below checks it did not carry turn 1.
    assert turns[mixed_cid][2]["status"] in ("complete", "failed"), turns[mixed_cid]

    # /polling shows a failed latest turn with its error.
    for cid, b in bodies.items():
        last = turns[cid][len(prompts[cid])]
        assert b["status"] == last["status"], (b, last)
        if b["status"] == "failed":
            assert b.get("error") == {"code": last["error_code"], "message": last["error_message"]}, b

    # The LLM's view: each call carries exactly the earlier complete turns; no turn gets more calls
    # than --max-attempts, and (no crash here) exactly as many as its stored attempts.
    calls = {}
    for req in fakellm.requests():
        last = req["messages"][-1]["content"]
        if last not in by_prompt:
            continue
        cid, n = by_prompt[last]
        assert req["messages"] == expected_messages(turns[cid], n), f"turn {n} of {cid} reached the LLM with {req['messages']!r}"
        calls[last] = calls.get(last, 0) + 1
    for p, (cid, n) in by_prompt.items():
        assert calls.get(p, 0) == int(turns[cid][n]["attempts"]), (p, calls.get(p), turns[cid][n])

    # Responses topic: one record per turn (no crash, no rebalance here), saying what Redis says.
    def responses():
        seen = {}
        for m in kafka.read(cluster.topic_responses):
            if m["key"] in prompts:
                seen.setdefault((m["key"], m["value"]["turn"]), []).append(m["value"])
        return seen if len(seen) == n_prompts else None

    seen = wait_for(responses, 60, "a response record for every turn", interval=0.5)
    for (cid, n), vals in seen.items():
        t = turns[cid][n]
        assert len(vals) == 1, vals
        v = vals[0]
        assert (v["status"], v["user_prompt"], v["llm_response"]) == (
            t["status"], t["prompt"], t["response"] if t["status"] == "complete" else ""), (v, t)
        if t["status"] == "failed":
            assert v.get("error") == {"code": t["error_code"], "message": t["error_message"]}, v

    # Dead letters: exactly the failed turns, each the original message with its reasons in headers.
    originals = {}
    for m in kafka.read(cluster.topic_prompts):
        if m["key"] in prompts:
            originals[(m["key"], m["value"]["turn"])] = m
    want = {(cid, n) for cid, ts in turns.items() for n, t in ts.items() if t["status"] == "failed"}
    dlq = wait_for(lambda: (lambda ms: ms if len(ms) >= len(want) else None)(
        [m for m in kafka.read(cluster.topic_dlq) if m["key"] in prompts]), 60, "the dead letters", interval=0.5)
    got = {}
    for m in dlq:
        v = m["value"]
        key = (m["key"], v["turn"])
        assert key not in got, f"dead-lettered twice: {key}"
        got[key] = m
        o = originals[key]
        assert m["payload"] == o["payload"], (m, o)
        t = turns[key[0]][key[1]]
        hd = m["headers"]
        assert hd.get("asyncllm-error-code") == t["error_code"], hd
        assert hd.get("asyncllm-error-message") == t["error_message"], hd
        assert hd.get("asyncllm-attempts") == str(MAX_ATTEMPTS), hd
        assert abs(int(hd.get("asyncllm-failed-at", "0")) - time.time() * 1000) < 600_000, hd
        assert (hd.get("asyncllm-original-partition"), hd.get("asyncllm-original-offset")) == (
            str(o["partition"]), str(o["offset"])), hd
    assert set(got) == want, f"dead letters {sorted(set(got) ^ want)} differ from the failed turns"

    st = fakellm.stats()
    m = node.metrics()
    n_calls = sum(calls.values())
    print(f"\nfaults: {n_prompts} prompts: {complete} complete, {failed} failed; {n_calls} LLM calls "
          f"(fake LLM: {st['requests']} requests, answers by status {st['status']}, {st['hangs']} hangs, "
          f"{st['aborted']} given up); worker: {m['asyncllm_worker_retried_total']:.0f} retries, "
          f"{m['asyncllm_worker_llm_calls_total']:.0f} calls, {m['asyncllm_worker_failed_total']:.0f} failed")
    assert st["status"].get("429", 0) > 0 and st["status"].get("500", 0) > 0 and st["hangs"] > 0, st
    assert m["asyncllm_worker_retried_total"] > 0, m
    assert m["asyncllm_worker_llm_calls_total"] == n_calls == st["requests"], (m, st, n_calls)
    assert m["asyncllm_worker_retried_total"] == n_calls - n_prompts, (m, n_calls, n_prompts)
    assert (m["asyncllm_worker_completed_total"], m["asyncllm_worker_failed_total"]) == (complete, failed), m
    assert m["asyncllm_worker_dead_lettered_total"] == failed, m
