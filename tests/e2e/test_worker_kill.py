"""A worker killed with SIGKILL while prompts are in flight, then restarted with the same static
membership id: every accepted prompt completes with the right answer, and each turn is stored once."""

import pytest

from conftest import llm_answer, unique, wait_for

INSTANCE_ID = "e2e-kill-worker-1"
LATENCY_MS = 1000


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.start("api")


def test_sigkill_worker_with_prompts_in_flight(cluster, api, fakellm, redis, kafka):
    worker = cluster.start("worker", instance_id=INSTANCE_ID)
    tag = unique("kill")
    accepted = {}  # cid -> prompt

    def submit(i):
        p = f"{tag} n{i} [[latency={LATENCY_MS}]]"
        r = api.submit_post(p)
        if r.status == 202:
            accepted[r.json()["conversation_id"]] = p
        else:  # not accepted: allowed (and then not owed an answer), but should not happen here
            assert r.status == 503, r

    for i in range(30):
        submit(i)
    # In flight: the LLM has received some of them (each takes LATENCY_MS to answer).
    wait_for(lambda: len([r for r in fakellm.requests() if tag in r["messages"][-1]["content"]]) >= 10,
             30, "the worker to start LLM calls")
    worker.proc.kill()
    # More prompts while no worker runs: accepted, queued in Kafka.
    for i in range(30, 50):
        submit(i)
    assert len(accepted) >= 45, f"only {len(accepted)} of 50 prompts accepted"

    cluster.start("worker", instance_id=INSTANCE_ID)
    bodies = api.wait_all_done(accepted, timeout=90, kafka=kafka, topic=cluster.topic_prompts)
    for cid, p in accepted.items():
        b = bodies[cid]
        assert (b["status"], b["user_prompt"], b["llm_response"]) == ("complete", p, llm_answer(p)), b

    for cid, p in accepted.items():
        h = redis.conversation(cid)
        assert h.get("turns") == "1", h
        assert (h.get("t1.prompt"), h.get("t1.status"), h.get("t1.response")) == (p, "complete", llm_answer(p)), h
        assert not any(k.startswith("t2.") for k in h), f"turn stored twice: {h}"

    # The kill did interrupt LLM calls: those prompts reached the LLM again after the restart.
    calls = [r for r in fakellm.requests() if tag in r["messages"][-1]["content"]]
    assert len(calls) > len(accepted), f"{len(calls)} LLM calls for {len(accepted)} prompts: none was in flight at the kill"

    # Each prompt is on the prompts topic once and answered on the responses topic (at least once).
    prompts = [m for m in kafka.read(cluster.topic_prompts) if m["key"] in accepted]
    assert sorted(m["key"] for m in prompts) == sorted(accepted), "prompts topic does not hold each accepted prompt once"

    def all_answered():
        seen = {}
        for m in kafka.read(cluster.topic_responses):
            if m["key"] in accepted:
                seen.setdefault(m["key"], []).append(m["value"])
        return seen if len(seen) == len(accepted) else None

    seen = wait_for(all_answered, 60, "a response message for every accepted prompt", interval=0.3)
    for cid, vals in seen.items():
        for v in vals:
            assert (v["conversation_id"], v["user_prompt"], v["llm_response"]) == (cid, accepted[cid], llm_answer(accepted[cid])), v
