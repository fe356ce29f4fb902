"""Submit (GET and POST /answer), poll until complete, and read the conversation back from Redis and
both Kafka topics: the seed's routes, fields and topics are a contract."""

import urllib.parse

import pytest

from conftest import CONV_ID_RE, llm_answer, unique, wait_for

SEED_POLL_FIELDS = ("status", "conversation_id", "user_prompt", "llm_response")


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all")


def check_accepted(resp):
    """A 202 of /answer: the body, Location and Retry-After; returns the body."""
    assert resp.status == 202, f"expected 202 Accepted, got {resp!r}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    body = resp.json()
    cid = body.get("conversation_id")
    assert isinstance(cid, str) and CONV_ID_RE.match(cid), f"conversation_id not >= 22 URL-safe chars: {body!r}"
    assert body.get("status") == "pending", body
    polling_url = body.get("polling_url")
    assert isinstance(polling_url, str), body
    parsed = urllib.parse.urlsplit(polling_url)
    assert parsed.path == "/polling", body
    assert urllib.parse.parse_qs(parsed.query) == {"conversationId": [cid]}, body
    assert resp.headers.get("location") == polling_url, f"Location must equal polling_url: {resp!r}"
    retry_after = resp.headers.get("retry-after")
    assert retry_after is not None and retry_after.strip().isdigit(), f"Retry-After missing or not seconds: {resp!r}"
    return body


def check_complete(node, redis, kafka, cluster, cid, prompt, answer, polling_url=None):
    """The conversation cid completed with answer: /polling, Redis and both topics agree."""
    body = node.wait_done(cid)
    assert {k: body.get(k) for k in SEED_POLL_FIELDS} == {
        "status": "complete",
        "conversation_id": cid,
        "user_prompt": prompt,
        "llm_response": answer,
    }, body
    if polling_url is not None:  # the polling_url itself answers the same
        parsed = urllib.parse.urlsplit(polling_url)
        r = node.get(parsed.path + "?" + parsed.query)
        assert r.status == 200, r
        assert {k: r.json().get(k) for k in SEED_POLL_FIELDS} == {k: body[k] for k in SEED_POLL_FIELDS}

    h = redis.conversation(cid)
    assert h.get("t1.prompt") == prompt, h
    assert h.get("t1.response") == answer, h
    assert h.get("t1.status") == "complete", h
    assert h.get("turns") == "1", h

    prompts = [m for m in kafka.read(cluster.topic_prompts) if m["key"] == cid]
    assert len(prompts) == 1, f"expected one message keyed {cid} on {cluster.topic_prompts}: {prompts!r}"
    v = prompts[0]["value"]
    assert isinstance(v, dict), prompts[0]
    assert v.get("conversation_id") == cid and v.get("prompt") == prompt, v

    responses = kafka.wait_for_key(cluster.topic_responses, cid)
    for m in responses:
        v = m["value"]
        assert isinstance(v, dict), m
        assert v.get("conversation_id") == cid, v
        assert v.get("user_prompt") == prompt, v
        assert v.get("llm_response") == answer, v
    return body


def test_get_answer_then_poll(node, redis, kafka, cluster, fakellm):
    prompt = unique("what is your favourite food")
    resp = node.submit_get(prompt)
    body = check_accepted(resp)
    cid = body["conversation_id"]
    answer = llm_answer(prompt)
    check_complete(node, redis, kafka, cluster, cid, prompt, answer, body["polling_url"])
    reqs = fakellm.requests_with_last_user(prompt)
    assert reqs and reqs[0]["messages"] == [{"role": "user", "content": prompt}], reqs
    assert reqs[0]["model"] == "fake", reqs


def test_post_answer_then_poll(node, redis, kafka, cluster):
    prompt = unique("post me")
    resp = node.submit_post(prompt)
    body = check_accepted(resp)
    check_complete(node, redis, kafka, cluster, body["conversation_id"], prompt, llm_answer(prompt), body["polling_url"])


def test_pending_until_the_llm_answers(node, redis, kafka, cluster):
    """While the LLM is working, /polling answers the seed's pending object."""
    prompt = unique("slow one") + " [[latency=1500]]"
    body = check_accepted(node.submit_post(prompt))
    cid = body["conversation_id"]
    r = node.poll(cid)
    assert r.status == 200, r
    b = r.json()
    assert {k: b.get(k) for k in SEED_POLL_FIELDS} == {
        "status": "pending",
        "conversation_id": cid,
        "user_prompt": prompt,
        "llm_response": "",
    }, b
    check_complete(node, redis, kafka, cluster, cid, prompt, llm_answer(prompt))


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unicode_round_trip(node, redis, kafka, cluster, method):
    prompt = "héllo 世界 🎉 " + unique("u")
    resp = node.submit_get(prompt) if method == "GET" else node.submit_post(prompt)
    body = check_accepted(resp)
    check_complete(node, redis, kafka, cluster, body["conversation_id"], prompt, llm_answer(prompt))


def test_json_special_characters_round_trip(node, redis, kafka, cluster):
    prompt = unique('say "hi" \\ back\\slash') + "\n\ttabbed </script> & 'quoted' \u0001"
    body = check_accepted(node.submit_post(prompt))
    check_complete(node, redis, kafka, cluster, body["conversation_id"], prompt, llm_answer(prompt))


def test_conversation_ids_are_distinct(node):
    ids = {node.submit_post(unique("distinct")).json()["conversation_id"] for _ in range(20)}
    assert len(ids) == 20
    for cid in ids:
        node.wait_done(cid)


def test_failed_llm_call_answers_failed(node, kafka, cluster):
    """A prompt the LLM keeps refusing (400) ends as "failed" with an error object."""
    prompt = unique("refused") + " [[status=400]]"
    cid = node.submit(prompt)["conversation_id"]
    body = wait_for(lambda: (lambda b: b if b["status"] != "pending" else None)(node.poll(cid).json()),
                    60, "the refused prompt to fail")
    assert body["status"] == "failed", body
    assert body["conversation_id"] == cid and body["user_prompt"] == prompt, body
    assert isinstance(body.get("error"), dict) and body["error"], body
    # The response topic says so too (docs/CONTRACTS.md: status "failed" and an error object).
    msgs = kafka.wait_for_key(cluster.topic_responses, cid)
    v = msgs[-1]["value"]
    assert v.get("conversation_id") == cid and v.get("user_prompt") == prompt, v
    assert v.get("status") == "failed" and isinstance(v.get("error"), dict), v
