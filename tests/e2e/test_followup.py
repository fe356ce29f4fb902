"""Follow-up prompts: a conversation's earlier turns reach the LLM, in order, as `messages`."""

import random

import pytest

from conftest import assert_error, llm_answer, unique


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all")


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


def test_many_conversations_interleaved(node, fakellm):
    """20 conversations x 4 turns; each turn is submitted right after the previous one's 202 (not after
    it completes), round-robin over the conversations, with a random LLM latency per prompt. Every
    call the LLM receives carries exactly that conversation's earlier turns, in order."""
    rng = random.Random(20251127)
    n_conv, n_turns = 20, 4
    tag = unique("il")
    prompts = {}  # cid -> [prompt of turn 1, 2, ...]
    cids = []
    for t in range(1, n_turns + 1):
        for c in range(n_conv):
            p = f"{tag} c{c} t{t} [[latency={rng.randint(0, 300)}]]"
            if t == 1:
                cid = node.submit(p)["conversation_id"]
                cids.append(cid)
                prompts[cid] = [p]
            else:
                cid = cids[c]
                node.submit(p, conversation_id=cid, method=rng.choice(["GET", "POST"]))
                prompts[cid].append(p)

    node.wait_all_done(cids)  # the latest turn is allocated at submit: done means turn 4 is done
    for cid in cids:
        b = node.wait_done(cid, user_prompt=prompts[cid][-1], timeout=5)
        assert b["status"] == "complete", b
        assert b["llm_response"] == llm_answer(prompts[cid][-1], messages=2 * n_turns - 1), b

    # Each LLM request of this test belongs to the conversation of its first user message.
    first = {ps[0]: cid for cid, ps in prompts.items()}
    seen = {cid: set() for cid in cids}
    for req in fakellm.requests():
        msgs = req["messages"]
        if not msgs or not str(msgs[0].get("content", "")).startswith(tag + " "):
            continue
        cid = first.get(msgs[0]["content"])
        assert cid is not None, f"unexpected first message {msgs[0]!r}"
        k = (len(msgs) + 1) // 2
        assert 1 <= k <= n_turns and len(msgs) == 2 * k - 1, req
        assert msgs == history(prompts[cid][:k]), f"conversation {cid} turn {k} reached the LLM with {msgs!r}"
        seen[cid].add(k)
    for cid in cids:
        assert seen[cid] == set(range(1, n_turns + 1)), f"turns of {cid} the LLM received: {sorted(seen[cid])}"
