"""Result lifetime: a response reports `expires_at` (its conversation is kept --conversation-ttl-s after its
last change) and answers 404 once that has passed; with a TTL of 0 it is kept forever (`expires_at` null)."""

import time

import openai
import pytest

from conftest import unique, wait_for

TTL_S = 3


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all", conversation_ttl_s=TTL_S, stream_ttl_s=TTL_S)


def test_expires_at_then_404(node, redis):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{node.port}/v1", api_key="x", max_retries=0, timeout=60)
    r = client.responses.create(model="fake", input=unique("short-lived"), background=True)
    done = wait_for(lambda: (lambda x: x if x.status == "completed" else None)(client.responses.retrieve(r.id)), 30,
                    "completion")
    s = client.responses.create(model="fake", input=unique("short-lived stream"), background=True, stream=True)
    sid = next(iter(s)).response.id
    s.close()
    cid = r.id[len("resp_"):].rsplit("_", 1)[0]
    updated_s = int(redis.conversation(cid)["updated_at"]) // 1000
    expires_at = done.to_dict()["expires_at"]
    assert expires_at == updated_s + TTL_S, (expires_at, updated_s)
    # Gone when it says so (the hash expires in Redis; a little slack for Redis' expiry cycle).
    wait_for(lambda: time.time() > expires_at + 1, TTL_S + 5, "expires_at to pass", interval=0.2)
    t0 = time.monotonic()
    wait_for(lambda: node.get(f"/v1/responses/{r.id}").status == 404, 10, f"{r.id} to expire", interval=0.2)
    print(f"404 {time.monotonic() - t0 + 1:.1f} s after expires_at")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert node.get(f"/polling?conversationId={cid}").status == 404
    assert node.post(f"/v1/responses/{r.id}/cancel").status == 404
    wait_for(lambda: node.get(f"/v1/responses/{sid}?stream=true").status == 404, 10, f"{sid}'s events to expire")


def test_ttl_zero_keeps_forever(cluster):
    forever = cluster.start("all", conversation_ttl_s=0)
    r = forever.post("/v1/responses", {"input": unique("forever")})
    assert r.status == 200, r
    assert r.json()["expires_at"] is None, r.json()
