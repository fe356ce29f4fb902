"""Follow-up prompts: a conversation's earlier turns reach the LLM, in order, as `messages`."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import assert_error, llm_answer, unique

# Six partitions and a small in-flight limit, so that in the interleaved test many conversations share a
# partition and prompts queue (per conversation, and for a slot) inside the worker. New conversations on random
# partitions (not sticky), so that they cover every partition.
PARTITIONS = 6
MAX_IN_FLIGHT = 8


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all", partitions=PARTITIONS, max_in_flight=MAX_IN_FLIGHT, prompt_sticky_ms=0)


def history(prompts):
    """The messages the LLM must receive for the last of prompts (turns 1..n of one conversation)."""
    msgs = []
    for i, p in enumerate(prompts):
        msgs.append({"role": "user", "content": p})
        if i < len(prompts) - 1:
            msgs.append({"role": "assistant", "content": llm_answer(p, messages=2 * i + 1)})
    return msgs


def test_three_turns_post_then_get(node, fakellm, redis, kafka, cluster):
    p1, p2, p3 = unique("first"), unique("second"), unique("third")

    cid = node.submit(p1, method="POST")["conversation_id"]
    b = node.wait_done(cid, user_prompt=p1)
    r1 = llm_answer(p1, messages=1)
    assert (b["status"], b["llm_response"]) == ("complete", r1), b

    # Turn 2: POST with conversation_id.
    acc = node.submit(p2, conversation_id=cid, method="POST")
    assert acc["status"] == "pending", acc
    b = node.wait_done(cid, user_prompt=p2)
    r2 = llm_answer(p2, messages=3)
    assert (b["status"], b["conversation_id"], b["llm_response"]) == ("complete", cid, r2), b

    # Turn 3: GET with conversationId.
    node.submit(p3, conversation_id=cid, method="GET")
    b = node.wait_done(cid, user_prompt=p3)
    r3 = llm_answer(p3, messages=5)
    # /polling shows the latest turn.
    assert {k: b[k] for k in ("status", "conversation_id", "user_prompt", "llm_response")} == {
        "status": "complete", "conversation_id": cid, "user_prompt": p3, "llm_response": r3}, b

    # What the LLM received, turn by turn.
    for prompts in ([p1], [p1, p2], [p1, p2, p3]):
        reqs = fakellm.requests_with_last_user(prompts[-1])
        assert reqs, f"the LLM never received {prompts[-1]!r}"
        for req in reqs:
            assert req["messages"] == history(prompts), req

    h = redis.conversation(cid)
    assert h.get("turns") == "3", h
    for n, (p, r) in enumerate([(p1, r1), (p2, r2), (p3, r3)], start=1):
        assert (h.get(f"t{n}.prompt"), h.get(f"t{n}.response"), h.get(f"t{n}.status")) == (p, r, "complete"), h

    # Every turn is on both topics, keyed by the conversation.
    prompts_msgs = [m["value"] for m in kafka.read(cluster.topic_prompts) if m["key"] == cid]
    assert [v["prompt"] for v in prompts_msgs] == [p1, p2, p3], prompts_msgs
    assert all(v["conversation_id"] == cid for v in prompts_msgs), prompts_msgs
    resp_msgs = [m["value"] for m in kafka.wait_for_key(cluster.topic_responses, cid, n=3)]
    assert {(v["user_prompt"], v["llm_response"]) for v in resp_msgs} == {(p1, r1), (p2, r2), (p3, r3)}, resp_msgs


def test_unknown_conversation_is_404(node, kafka, cluster):
    before = kafka.count(cluster.topic_prompts)
    ghost = "AAAAAAAAAAAAAAAAAAAAAA"
    assert_error(node.submit_post("hello?", conversation_id=ghost), 404)
    assert_error(node.submit_get("hello?", conversation_id=ghost), 404)
    assert_error(node.get("/polling?conversationId=" + ghost), 404)
    assert kafka.count(cluster.topic_prompts) == before, "a prompt for an unknown conversation was produced"


def test_many_conversations_interleaved(node, fakellm, kafka, cluster):
    """48 conversations x 5 turns over 6 partitions, with a worker allowed 8 LLM calls at once. Turn t of
    every conversation is submitted (16 at a time) right after turn t-1's 202, not after it completes, with
    a random LLM latency per prompt, so that later turns wait behind earlier ones and heads wait for a
    slot. Every call the LLM receives carries exactly that conversation's earlier turns, in order; turn t
    reaches the LLM only after turn t-1's answer was sent; the in-flight limit holds."""
    rng = random.Random(20251127)
    n_conv, n_turns = 48, 5
    tag = unique("il")
    latency = {}  # prompt -> its [[latency=MS]]

    def prompt_for(c, t):
        ms = rng.randint(0, 400)
        p = f"{tag} c{c} t{t} [[latency={ms}]]"
        latency[p] = ms
        return p

    # The LLM's view while the test runs: no more than MAX_IN_FLIGHT calls at once, and more than one.
    peak = {"llm_in_flight": 0, "buffered": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak["llm_in_flight"] = max(peak["llm_in_flight"], fakellm.stats()["in_flight"])
                peak["buffered"] = max(peak["buffered"], node.metrics()["asyncllm_worker_buffered"])
            except Exception:  # noqa: BLE001 - a sample lost is no harm
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    prompts = {}  # cid -> [prompt of turn 1, 2, ...]
    cids = []
    try:
        with ThreadPoolExecutor(16) as pool:
            for t in range(1, n_turns + 1):
                batch = [prompt_for(c, t) for c in range(n_conv)]
                if t == 1:
                    bodies = list(pool.map(lambda p: node.submit(p), batch))
                    for p, b in zip(batch, bodies):
                        cids.append(b["conversation_id"])
                        prompts[b["conversation_id"]] = [p]
                else:
                    methods = [rng.choice(["GET", "POST"]) for _ in range(n_conv)]
                    bodies = list(pool.map(lambda a: node.submit(a[0], conversation_id=a[1], method=a[2]),
                                           zip(batch, cids, methods)))
                    for p, cid, b in zip(batch, cids, bodies):
                        assert b["turn"] == t, b
                        prompts[cid].append(p)

        node.wait_all_done(cids, timeout=120)  # the latest turn is allocated at submit: done means turn 5 is done
    finally:
        stop.set()
        sampler.join()
    for cid in cids:
        b = node.wait_done(cid, user_prompt=prompts[cid][-1], timeout=5)
        assert b["status"] == "complete", b
        assert b["llm_response"] == llm_answer(prompts[cid][-1], messages=2 * n_turns - 1), b

    parts = {m["partition"] for m in kafka.read(cluster.topic_prompts) if m["key"] in prompts}
    assert len(parts) == PARTITIONS, f"the conversations did not cover every partition: {sorted(parts)}"

    # Each LLM request of this test belongs to the conversation of its first user message.
    first = {ps[0]: cid for cid, ps in prompts.items()}
    calls = {cid: {} for cid in cids}  # cid -> turn -> [ts_ms of each call]
    for req in fakellm.requests():
        msgs = req["messages"]
        if not msgs or not str(msgs[0].get("content", "")).startswith(tag + " "):
            continue
        cid = first.get(msgs[0]["content"])
        assert cid is not None, f"unexpected first message {msgs[0]!r}"
        k = (len(msgs) + 1) // 2
        assert 1 <= k <= n_turns and len(msgs) == 2 * k - 1, req
        assert msgs == history(prompts[cid][:k]), f"conversation {cid} turn {k} reached the LLM with {msgs!r}"
        calls[cid].setdefault(k, []).append(req["ts_ms"])
    for cid in cids:
        assert sorted(calls[cid]) == list(range(1, n_turns + 1)), f"turns of {cid} the LLM received: {sorted(calls[cid])}"
        assert all(len(v) == 1 for v in calls[cid].values()), f"a turn of {cid} reached the LLM twice: {calls[cid]}"
        # Strictly one after another: turn k's call arrives after turn k-1's answer left (its latency later).
        for k in range(2, n_turns + 1):
            prev_ts, ts = calls[cid][k - 1][0], calls[cid][k][0]
            # (20 ms of slack: whole milliseconds, and the fake LLM's timers run on libevent's cached clock.)
            assert ts >= prev_ts + latency[prompts[cid][k - 2]] - 20, (
                f"conversation {cid}: turn {k} reached the LLM at {ts}, before turn {k - 1} (sent at {prev_ts}, "
                f"latency {latency[prompts[cid][k - 2]]} ms) was answered")

    print(f"\ninterleaved: {n_conv * n_turns} prompts, peak LLM calls in flight {peak['llm_in_flight']}, "
          f"peak prompts buffered in the worker {peak['buffered']:.0f}")
    assert 1 < peak["llm_in_flight"] <= MAX_IN_FLIGHT, f"LLM calls in flight at once peaked at {peak['llm_in_flight']}"
    # The test did make prompts wait in the worker (not only run one per conversation as they arrived).
    assert peak["buffered"] > MAX_IN_FLIGHT, f"prompts buffered in the worker peaked at {peak['buffered']}"
