"""Graceful shutdown (SIGTERM): the worker stops fetching, lets the prompts it started finish within
--shutdown-grace-ms, commits and exits 0; what it had not started is redone by the next worker. One
partition, so that the offsets (committed, redelivered) are predictable."""

import pytest

from conftest import llm_answer, unique, wait_for

GRACE_MS = 4000


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.start("api", partitions=1)


def llm_calls(fakellm, prompt):
    return len(fakellm.requests_with_last_user(prompt))


def responses(kafka, cluster, cid):
    return [m["value"] for m in kafka.read(cluster.topic_responses) if m["key"] == cid]


def test_sigterm_finishes_started_prompts_and_the_next_worker_redoes_the_rest(cluster, api, fakellm, redis, kafka):
    """In the one partition: conversation A turn 1 (running at the SIGTERM), A turn 2 (queued behind it,
    so not started), then conversation B (running). A1 and B finish during the grace period and are
    published; A2 is left to the next worker. The committed offset stops at A2, so the next worker gets
    B again: B is stored and published already, so it must neither reach the LLM again nor be published
    a second time."""
    w1 = cluster.start("worker", shutdown_grace_ms=GRACE_MS)
    tag = unique("term")
    a1, a2, b1 = f"{tag} A1 [[latency=1500]]", f"{tag} A2", f"{tag} B1 [[latency=1500]]"
    a = api.submit(a1)["conversation_id"]
    api.submit(a2, conversation_id=a)
    b = api.submit(b1)["conversation_id"]
    wait_for(lambda: llm_calls(fakellm, a1) and llm_calls(fakellm, b1), 30, "A1 and B1 to reach the LLM")
    problems = w1.proc.stop()
    assert not problems, "\n".join(problems)
    assert "draining: 2 prompt(s) in progress" in w1.proc.log(), w1.proc.tail()

    # What the first worker did before it exited.
    ha, hb = redis.conversation(a), redis.conversation(b)
    assert (ha.get("t1.status"), hb.get("t1.status")) == ("complete", "complete"), (ha, hb)
    assert ha.get("t2.status") == "pending", f"A2 was started although it was queued at the SIGTERM: {ha}"
    assert llm_calls(fakellm, a2) == 0
    assert [v["turn"] for v in responses(kafka, cluster, a)] == [1]
    assert [v["turn"] for v in responses(kafka, cluster, b)] == [1]
    # The worker records that a turn's response was acknowledged by the broker (t<n>.published), so that a
    # redelivery does not publish it again. Those marks must reach Redis before the worker exits (checked
    # at the end, with their consequence).
    marks = (ha.get("t1.published"), hb.get("t1.published"))

    # The next worker: A2 is done; A1 and B are not called again nor published again.
    w2 = cluster.start("worker")
    b_ = api.wait_done(a, user_prompt=a2)
    assert (b_["status"], b_["llm_response"]) == ("complete", llm_answer(a2, messages=3)), b_
    wait_for(lambda: w2.metrics()["asyncllm_worker_redelivered_finished_total"] >= 1, 30,
             "the next worker to see B again (redelivered: its offset is after A2's)")
    assert (llm_calls(fakellm, a1), llm_calls(fakellm, a2), llm_calls(fakellm, b1)) == (1, 1, 1)
    wait_for(lambda: len(responses(kafka, cluster, a)) >= 2, 30, "A2's response")
    assert sorted(v["turn"] for v in responses(kafka, cluster, a)) == [1, 2]
    problems = w2.proc.stop()
    assert not problems, "\n".join(problems)
    rb = responses(kafka, cluster, b)
    assert marks == ("1", "1") and len(rb) == 1, (
        f"t1.published after the graceful stop: A {marks[0]!r}, B {marks[1]!r} (expected '1', '1'); "
        f"B's response records: {len(rb)} (expected 1, B was published and stored before the stop)")


def test_sigterm_gives_up_what_outlasts_the_grace_period(cluster, api, fakellm, redis):
    """A prompt that takes longer than --shutdown-grace-ms: the worker exits 0 at the end of the grace
    period without it, and the next worker completes it (the LLM is called again: allowed, the first call
    was given up)."""
    w1 = cluster.start("worker", shutdown_grace_ms=1000)
    p = f"{unique('slow')} [[latency=4000]]"
    cid = api.submit(p)["conversation_id"]
    wait_for(lambda: llm_calls(fakellm, p), 30, "the prompt to reach the LLM")
    problems = w1.proc.stop(timeout=20)
    assert not problems, "\n".join(problems)
    assert "shutdown grace period over with 1 prompt(s) unfinished" in w1.proc.log(), w1.proc.tail()
    assert redis.conversation(cid).get("t1.status") == "in_progress"
    cluster.start("worker")
    b = api.wait_done(cid, timeout=60)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p)), b
    assert llm_calls(fakellm, p) == 2
