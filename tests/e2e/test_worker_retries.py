"""Retries and failures, deterministic: the fake LLM's directives decide each call's fate.

- 429 twice then success: complete after exactly 3 calls (t1.attempts = 3), each retry waiting the
  Retry-After the 429 carried;
- Retry-After honoured: a 429 asking for 2 s is retried no sooner;
- 400: failed at once, after 1 call, no retry;
- 500 forever and a hang forever (past --llm-timeout-ms): failed after --max-attempts calls;
- a retry that would pass --prompt-deadline-ms: failed without waiting for it;
- a failure shows on /polling (status failed, error {code, message}), in Redis, as a failure record on the
  responses topic and as the original message on the dead-letter topic with headers saying why;
- a waiting retry holds no in-flight slot and blocks no other conversation, only its own later turns.
"""

import time

import pytest

from conftest import llm_answer, unique, wait_for

MAX_ATTEMPTS = 4
LLM_TIMEOUT_MS = 1000
DEADLINE_MS = 4000
MAX_IN_FLIGHT = 2
# Timer slack: the fake LLM logs a call's arrival in whole milliseconds, and libevent times a timer from
# its loop's cached clock, which can be a few milliseconds old (a 2 s Retry-After measured 1,996 ms).
SLACK_MS = 50


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all", max_attempts=MAX_ATTEMPTS, llm_timeout_ms=LLM_TIMEOUT_MS, retry_base_ms=100,
                         retry_max_ms=400, prompt_deadline_ms=DEADLINE_MS, max_in_flight=MAX_IN_FLIGHT)


def calls_ts(fakellm, prompt):
    """Arrival times (ms) of the LLM calls whose last user message is prompt."""
    return [r["ts_ms"] for r in fakellm.requests_with_last_user(prompt)]


def wait_terminal(node, cid, timeout=60):
    return wait_for(lambda: (lambda b: b if b["status"] in ("complete", "failed") else None)(node.poll(cid).json()),
                    timeout, f"conversation {cid} to complete or fail", interval=0.05)


def test_a_waiting_retry_holds_no_slot_and_blocks_only_its_conversation(node, fakellm):
    """MAX_IN_FLIGHT (2) conversations whose first call gets a 429 asking for 3 s, then 6 other
    conversations and a second turn of a waiting one. The others complete while both retries wait (had
    the retries kept their slots, nothing else could run for 3 s); the second turn reaches the LLM only
    after its first turn's retry succeeded."""
    tag = unique("slot")
    waiting = [f"{tag} w{i} [[fail-times=1]][[status=429]][[retry-after=3]]" for i in range(MAX_IN_FLIGHT)]
    wcids = [node.submit(p)["conversation_id"] for p in waiting]
    wait_for(lambda: all(calls_ts(fakellm, p) for p in waiting), 30, "the first calls of the retried prompts")
    others = [f"{tag} o{i}" for i in range(6)]
    ocids = [node.submit(p)["conversation_id"] for p in others]
    follow = f"{tag} w0 turn 2"
    node.submit(follow, conversation_id=wcids[0])
    for cid, p in zip(ocids, others):
        b = node.wait_done(cid, timeout=30)
        assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p)), b
    for cid, p in zip(wcids, waiting):
        wait_terminal(node, cid)
    b = node.wait_done(wcids[0], user_prompt=follow)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(follow, messages=3)), b

    first_calls = [calls_ts(fakellm, p) for p in waiting]
    assert all(len(c) == 2 for c in first_calls), f"calls of the retried prompts: {first_calls}"
    retry_at = min(c[1] for c in first_calls)
    done_others = max(calls_ts(fakellm, p)[0] for p in others)
    assert done_others < retry_at, f"the other conversations' calls ({done_others}) waited for the retries ({retry_at})"
    (f_ts,) = [r["ts_ms"] for r in fakellm.requests() if r["messages"][-1]["content"] == follow]
    assert f_ts >= first_calls[0][1], f"turn 2 reached the LLM at {f_ts}, before turn 1's retry at {first_calls[0][1]}"


# The deterministic cases, submitted together (they run concurrently) and checked one per test.
CASES = {
    "429x2": "[[fail-times=2]][[status=429]]",
    "retry-after-2": "[[retry-after=2]][[status=429]][[fail-times=1]]",
    "400": "[[status=400]]",
    "500": "[[status=500]]",
    "hang": "[[hang]]",
    "deadline": "[[status=429]][[retry-after=5]]",
}


@pytest.fixture(scope="module")
def cases(node):
    tag = unique("case")
    out = {}
    for name, directives in CASES.items():
        p = f"{tag} {name} {directives}"
        t0 = time.time() * 1000
        out[name] = {"prompt": p, "cid": node.submit(p)["conversation_id"], "submitted_ms": t0}
    for c in out.values():
        c["body"] = wait_terminal(node, c["cid"], timeout=90)
    return out


def check_failed(c, node, redis, kafka, cluster, fakellm, code, attempts, message_part=None):
    """The case failed for good with code after attempts LLM calls, and says so everywhere."""
    cid, p = c["cid"], c["prompt"]
    b = c["body"]
    assert (b["status"], b["user_prompt"], b["llm_response"]) == ("failed", p, ""), b
    err = b.get("error")
    assert isinstance(err, dict) and err.get("code") == code and isinstance(err.get("message"), str) and err["message"], b
    if message_part:
        assert message_part in err["message"], b
    h = redis.conversation(cid)
    assert (h.get("t1.status"), h.get("t1.error_code"), h.get("t1.attempts")) == ("failed", code, str(attempts)), h
    assert h.get("t1.error_message") == err["message"], h
    assert len(calls_ts(fakellm, p)) == attempts, f"LLM calls of {p!r}: {calls_ts(fakellm, p)}"

    resp = [m["value"] for m in kafka.wait_for_key(cluster.topic_responses, cid)]
    assert len(resp) == 1, resp
    v = resp[0]
    assert (v["conversation_id"], v["user_prompt"], v["llm_response"], v["status"], v["turn"]) == (cid, p, "", "failed", 1), v
    assert v.get("error") == {"code": code, "message": err["message"]}, v

    (orig,) = [m for m in kafka.read(cluster.topic_prompts) if m["key"] == cid]
    dlq = [m for m in kafka.wait_for_key(cluster.topic_dlq, cid)]
    assert len(dlq) == 1, dlq
    d = dlq[0]
    assert d["payload"] == orig["payload"], f"dead letter {d['payload']!r} is not the original {orig['payload']!r}"
    hd = d["headers"]
    assert hd.get("asyncllm-error-code") == code, hd
    assert hd.get("asyncllm-error-message") == err["message"], hd
    assert hd.get("asyncllm-attempts") == str(attempts), hd
    failed_at = int(hd.get("asyncllm-failed-at", "0"))
    assert c["submitted_ms"] - 1000 <= failed_at <= time.time() * 1000 + 1000, hd
    assert (hd.get("asyncllm-original-partition"), hd.get("asyncllm-original-offset")) == (
        str(orig["partition"]), str(orig["offset"])), hd


def test_429_twice_then_success_takes_exactly_3_calls(cases, redis, fakellm, kafka, cluster):
    c = cases["429x2"]
    b = c["body"]
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(c["prompt"])), b
    h = redis.conversation(c["cid"])
    assert (h.get("t1.status"), h.get("t1.attempts")) == ("complete", "3"), h
    ts = calls_ts(fakellm, c["prompt"])
    assert len(ts) == 3, ts
    gaps = [b_ - a for a, b_ in zip(ts, ts[1:])]
    # Each 429 said Retry-After: 1 (the fake LLM's default).
    assert all(g >= 1000 - SLACK_MS for g in gaps), f"retries came sooner than Retry-After 1 s: gaps {gaps} ms"
    (v,) = [m["value"] for m in kafka.wait_for_key(cluster.topic_responses, c["cid"])]
    assert (v["status"], v["attempts"]) == ("complete", 3), v


def test_retry_after_is_honoured(cases, fakellm, redis):
    c = cases["retry-after-2"]
    assert (c["body"]["status"], c["body"]["llm_response"]) == ("complete", llm_answer(c["prompt"])), c["body"]
    ts = calls_ts(fakellm, c["prompt"])
    assert len(ts) == 2, ts
    gap = ts[1] - ts[0]
    print(f"\nRetry-After: 2 -> second call {gap} ms after the first")
    assert gap >= 2000 - SLACK_MS, f"the retry came {gap} ms after a 429 with Retry-After: 2"
    assert redis.conversation(c["cid"]).get("t1.attempts") == "2"


def test_400_fails_at_once(cases, node, redis, kafka, cluster, fakellm):
    check_failed(cases["400"], node, redis, kafka, cluster, fakellm, "llm_request_rejected", 1, "400")


def test_500_fails_after_max_attempts(cases, node, redis, kafka, cluster, fakellm):
    check_failed(cases["500"], node, redis, kafka, cluster, fakellm, "llm_server_error", MAX_ATTEMPTS,
                 f"after {MAX_ATTEMPTS} attempt")


def test_hang_times_out_and_fails_after_max_attempts(cases, node, redis, kafka, cluster, fakellm):
    check_failed(cases["hang"], node, redis, kafka, cluster, fakellm, "llm_timeout", MAX_ATTEMPTS)
    ts = calls_ts(fakellm, cases["hang"]["prompt"])
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert all(g >= LLM_TIMEOUT_MS - SLACK_MS for g in gaps), f"a hung call was given up before the timeout: {gaps}"
    # The fake LLM saw the worker give up on each hung call.
    st = fakellm.stats()
    assert st["hangs"] >= MAX_ATTEMPTS and st["aborted"] >= MAX_ATTEMPTS, st


def test_a_retry_past_the_prompt_deadline_fails_without_waiting(cases, node, redis, kafka, cluster, fakellm):
    c = cases["deadline"]
    check_failed(c, node, redis, kafka, cluster, fakellm, "llm_rate_limited", 1, "deadline")


def test_a_failed_turn_is_not_history(cases, node, fakellm):
    """A follow-up to a conversation whose first turn failed: the LLM gets the new prompt alone."""
    c = cases["400"]
    p2 = unique("after a failure")
    node.submit(p2, conversation_id=c["cid"])
    b = node.wait_done(c["cid"], user_prompt=p2)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p2, messages=1)), b
    (req,) = fakellm.requests_with_last_user(p2)
    assert req["messages"] == [{"role": "user", "content": p2}], req


def test_counters(node, cases):
    m = node.metrics()
    # 429x2: 2 retries, retry-after-2: 1, 500 and hang: 3 each, the slot test: 2 at least.
    assert m["asyncllm_worker_retried_total"] >= 2 + 1 + 3 + 3, m
    assert m["asyncllm_worker_failed_total"] >= 4, m
    assert m["asyncllm_worker_dead_lettered_total"] >= 4, m
