"""Idempotency-Key on the submit routes (POST/GET /answer, POST /v1/responses): a repeated request from the
same caller gets the same id and result, and only one message reaches the prompts topic."""

import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import llm_answer, unique, wait_for


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all")


def key():
    return "idem-" + uuid.uuid4().hex


def prompt_messages(kafka, cluster, prompt):
    return [m for m in kafka.read(cluster.topic_prompts) if m["value"] and m["value"].get("prompt") == prompt]


def answer_get(node, prompt, headers):
    return node.get("/answer?" + urllib.parse.urlencode({"prompt": prompt}), headers=headers)


def test_answer_post_repeat_gets_same_id_and_one_message(node, kafka, cluster):
    p, k = unique("idem answer"), key()
    r1 = node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": k})
    r2 = node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": k})
    assert (r1.status, r2.status) == (202, 202), (r1, r2)
    assert r1.json() == r2.json(), (r1.json(), r2.json())
    assert r1.headers["location"] == r2.headers["location"]
    # After completion, a third repeat still names the same conversation and turn.
    cid = r1.json()["conversation_id"]
    node.wait_done(cid)
    r3 = node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": k})
    assert r3.status == 202 and r3.json() == r1.json(), r3
    assert len(prompt_messages(kafka, cluster, p)) == 1
    # Another key is another prompt.
    r4 = node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": key()})
    assert r4.status == 202 and r4.json()["conversation_id"] != cid
    assert len(prompt_messages(kafka, cluster, p)) == 2


def test_answer_get_repeat_gets_same_id(node, kafka, cluster):
    p, k = unique("idem get"), key()
    r1 = answer_get(node, p, {"Idempotency-Key": k})
    r2 = answer_get(node, p, {"Idempotency-Key": k})
    assert (r1.status, r2.status) == (202, 202), (r1, r2)
    assert r1.json()["conversation_id"] == r2.json()["conversation_id"]
    assert len(prompt_messages(kafka, cluster, p)) == 1


def test_follow_up_repeat_gets_same_turn(node, kafka, cluster):
    p1, p2, k = unique("idem first"), unique("idem follow-up"), key()
    cid = node.submit(p1)["conversation_id"]
    r1 = node.post("/answer", {"prompt": p2, "conversation_id": cid}, headers={"Idempotency-Key": k})
    r2 = node.post("/answer", {"prompt": p2, "conversation_id": cid}, headers={"Idempotency-Key": k})
    assert r1.json() == r2.json() and r1.json()["turn"] == 2, (r1, r2)
    b = node.wait_done(cid, user_prompt=p2)
    assert b["turn"] == 2 and b["llm_response"] == llm_answer(p2, messages=3), b
    assert len(prompt_messages(kafka, cluster, p2)) == 1


def test_responses_background_repeat(node, kafka, cluster):
    p, k = unique("idem bg"), key()
    body = {"model": "fake", "input": p, "background": True}
    a = node.post("/v1/responses", body, headers={"Idempotency-Key": k})
    b = node.post("/v1/responses", body, headers={"Idempotency-Key": k})
    assert (a.status, b.status) == (200, 200), (a, b)
    rid = a.json()["id"]
    assert b.json()["id"] == rid
    wait_for(lambda: node.get(f"/v1/responses/{rid}").json()["status"] == "completed", 30, f"{rid} to complete")
    c = node.post("/v1/responses", body, headers={"Idempotency-Key": k})
    assert c.status == 200 and c.json()["id"] == rid, c
    # The same result: the repeat answers the response as it is now.
    assert c.json()["status"] == "completed" and c.json()["output_text"] == llm_answer(p), c.json()
    assert len(prompt_messages(kafka, cluster, p)) == 1


def test_responses_sync_and_stream_repeat(node, kafka, cluster):
    p, k = unique("idem sync"), key()
    a = node.post("/v1/responses", {"input": p}, headers={"Idempotency-Key": k})
    b = node.post("/v1/responses", {"input": p}, headers={"Idempotency-Key": k})
    assert a.status == b.status == 200, (a, b)
    assert a.json() == b.json() and a.json()["status"] == "completed", (a.json(), b.json())
    assert len(prompt_messages(kafka, cluster, p)) == 1

    p, k = unique("idem stream"), key()
    a = node.post("/v1/responses", {"input": p, "stream": True, "background": True}, headers={"Idempotency-Key": k})
    b = node.post("/v1/responses", {"input": p, "stream": True, "background": True}, headers={"Idempotency-Key": k})
    assert a.status == b.status == 200, (a, b)
    assert a.headers["content-type"].startswith("text/event-stream")
    assert a.body == b.body, "the repeat of a streamed create must replay the same events"
    assert len(prompt_messages(kafka, cluster, p)) == 1


def test_keys_are_scoped_by_route_and_caller(node, kafka, cluster):
    p, k = unique("idem scope"), key()
    a = node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": k})
    b = node.post("/v1/responses", {"input": p, "background": True}, headers={"Idempotency-Key": k})
    c = node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": k, "Authorization": "Bearer other-caller"})
    d = node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": k, "Authorization": "Bearer other-caller"})
    assert a.status == c.status == d.status == 202 and b.status == 200, (a, b, c, d)
    ids = {a.json()["conversation_id"], b.json()["id"][len("resp_"):].rsplit("_", 1)[0], c.json()["conversation_id"]}
    assert len(ids) == 3, ids
    assert d.json()["conversation_id"] == c.json()["conversation_id"]
    assert len(prompt_messages(kafka, cluster, p)) == 3


def test_concurrent_repeats_queue_once(node, kafka, cluster):
    """20 requests with one key at once: each answers the one id, or 409 while the first is being queued;
    one message on the topic."""
    p, k = unique("idem race"), key()
    with ThreadPoolExecutor(20) as ex:
        rs = list(ex.map(lambda _: node.post("/answer", {"prompt": p}, headers={"Idempotency-Key": k}), range(20)))
    ok = [r for r in rs if r.status == 202]
    conflicts = [r for r in rs if r.status == 409]
    print(f"20 concurrent repeats: {len(ok)} x 202, {len(conflicts)} x 409")
    assert len(ok) + len(conflicts) == 20, [r for r in rs if r.status not in (202, 409)]
    assert ok and len({r.json()["conversation_id"] for r in ok}) == 1, ok
    for r in conflicts:
        err = r.json()["error"]
        assert err["code"] == "idempotency_key_in_use" and set(err) >= {"message", "type", "param"}, err
    assert len(prompt_messages(kafka, cluster, p)) == 1


def test_key_is_kept_for_24_hours(node, redis):
    k = key()
    r = node.post("/answer", {"prompt": unique("idem ttl")}, headers={"Idempotency-Key": k})
    assert r.status == 202
    keys = redis.command("KEYS", f"asyncllm:idem:*:{k}")
    assert len(keys) == 1, keys
    ttl = redis.command("TTL", keys[0])
    assert 24 * 3600 - 120 <= ttl <= 24 * 3600, ttl


def test_long_keys_are_not_confused(node, kafka, cluster):
    """Two different keys that share their first 500 characters are two keys (or refused): the server must
    not cut keys short and then match the wrong request."""
    base = "k" * 500
    p1, p2 = unique("long key one"), unique("long key two")
    a = node.post("/answer", {"prompt": p1}, headers={"Idempotency-Key": base + "-one"})
    b = node.post("/answer", {"prompt": p2}, headers={"Idempotency-Key": base + "-two"})
    assert a.status == 202, a
    if b.status == 400:  # refusing over-long keys is fine too
        return
    assert b.status == 202, b
    assert b.json()["conversation_id"] != a.json()["conversation_id"], (
        f"a different Idempotency-Key got the first request's conversation {a.json()['conversation_id']}; "
        f"prompt {p2!r} was never queued ({len(prompt_messages(kafka, cluster, p2))} message(s))")


def test_repeat_after_delete_is_not_a_ghost(node):
    """A repeat whose response was deleted must not answer a made-up object: 404 (as GET does), or a new
    response. It must never claim the deleted one `failed` without an error."""
    p, k = unique("idem deleted"), key()
    body = {"input": p, "background": True}
    a = node.post("/v1/responses", body, headers={"Idempotency-Key": k})
    rid = a.json()["id"]
    wait_for(lambda: node.get(f"/v1/responses/{rid}").json()["status"] == "completed", 30, f"{rid} to complete")
    assert node.request("DELETE", f"/v1/responses/{rid}").status == 200
    assert node.get(f"/v1/responses/{rid}").status == 404
    b = node.post("/v1/responses", body, headers={"Idempotency-Key": k})
    if b.status == 404:
        return
    assert b.status == 200, b
    obj = b.json()
    assert obj["id"] != rid, (
        f"the repeat answered the deleted response {rid} as status {obj['status']!r} (error {obj['error']!r}), "
        f"while GET {rid} is 404")
