"""Bad requests to OpenAI's Responses API routes: 400/404/405/409/413 in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}), and nothing queued on Kafka for a refused request."""

import json
import urllib.parse

import openai
import pytest

from conftest import assert_error, unique

MAX_BODY = 65536


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all", http_max_body=MAX_BODY)


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{node.port}/v1", api_key="x", max_retries=0, timeout=60)


def openai_error(resp, status, param=None, code=None):
    """assert_error plus OpenAI's `param` key (present, a string or null; equal to param if given)."""
    err = assert_error(resp, status, code)
    assert "param" in err, f"error object lacks 'param': {resp!r}"
    assert err["param"] is None or isinstance(err["param"], str), err
    if param is not None:
        assert err["param"] == param, f"expected param {param!r}: {err!r}"
    return err


def prompts_count(kafka, cluster):
    return kafka.count(cluster.topic_prompts)


BAD_CREATE = [
    # (id, body, param)
    ("missing input", {"model": "fake"}, "input"),
    ("input null", {"input": None}, "input"),
    ("input number", {"input": 5}, "input"),
    ("input object", {"input": {"role": "user", "content": "hi"}}, "input"),
    ("input empty list", {"input": []}, "input"),
    ("input blank string", {"input": "  \n\t "}, "input"),
    ("input empty string", {"input": ""}, "input"),
    ("last user message empty", {"input": [{"role": "user", "content": "hi"}, {"role": "user", "content": " "}]}, "input"),
    ("no user message", {"input": [{"role": "assistant", "content": "hello"}]}, "input"),
    ("only a system message", {"input": [{"role": "system", "content": "be nice"}]}, "input"),
    ("unknown role", {"input": [{"role": "tool", "content": "x"}]}, "input"),
    ("message without role", {"input": [{"content": "x"}]}, "input"),
    ("message without content", {"input": [{"role": "user"}]}, "input"),
    ("content a number", {"input": [{"role": "user", "content": 7}]}, "input"),
    ("image part", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input"),
    ("text part without text", {"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input"),
    ("function call output item", {"input": [{"type": "function_call_output", "call_id": "c", "output": "o"}]}, "input"),
    ("list item a string", {"input": ["hello"]}, "input"),
    ("model number", {"input": "x", "model": 5}, "model"),
    ("instructions number", {"input": "x", "instructions": 5}, "instructions"),
    ("instructions list", {"input": "x", "instructions": [{"role": "system", "content": "y"}]}, "instructions"),
    ("temperature too high", {"input": "x", "temperature": 2.5}, "temperature"),
    ("temperature negative", {"input": "x", "temperature": -0.1}, "temperature"),
    ("temperature string", {"input": "x", "temperature": "hot"}, "temperature"),
    ("top_p too high", {"input": "x", "top_p": 1.5}, "top_p"),
    ("top_p string", {"input": "x", "top_p": "0.5"}, "top_p"),
    ("max_output_tokens zero", {"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("max_output_tokens negative", {"input": "x", "max_output_tokens": -3}, "max_output_tokens"),
    ("max_output_tokens string", {"input": "x", "max_output_tokens": "5"}, "max_output_tokens"),
    ("max_output_tokens fraction", {"input": "x", "max_output_tokens": 2.5}, "max_output_tokens"),
    ("metadata string", {"input": "x", "metadata": "m"}, "metadata"),
    ("metadata list", {"input": "x", "metadata": ["m"]}, "metadata"),
    ("metadata number value", {"input": "x", "metadata": {"a": 1}}, "metadata"),
    ("metadata 17 keys", {"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ("metadata key too long", {"input": "x", "metadata": {"k" * 65: "v"}}, "metadata"),
    ("metadata value too long", {"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
    ("background string", {"input": "x", "background": "yes"}, "background"),
    ("stream number", {"input": "x", "stream": 1}, "stream"),
    ("tools given", {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ("tools not a list", {"input": "x", "tools": "web_search"}, "tools"),
]


def test_bad_create_requests_are_400(node, kafka, cluster):
    before = prompts_count(kafka, cluster)
    for name, body, param in BAD_CREATE:
        r = node.post("/v1/responses", body)
        try:
            err = openai_error(r, 400, param=param)
        except AssertionError as e:
            raise AssertionError(f"case {name!r} ({json.dumps(body)[:200]}): {e}") from None
        assert err["type"] == "invalid_request_error", (name, err)
    # Limits that are accepted, just below the refusals above.
    ok = {"input": "x", "metadata": {f"k{i}": "v" * 512 for i in range(16)} | {"k" * 64: "v"},
          "temperature": 2, "top_p": 0, "max_output_tokens": 1, "tools": [], "model": None, "instructions": None,
          "background": True}
    ok["metadata"].pop("k0")
    r = node.post("/v1/responses", ok)
    assert r.status == 200, r
    assert prompts_count(kafka, cluster) == before + 1, "a refused request reached the prompts topic"


def test_bad_bodies_are_400(node, kafka, cluster):
    before = prompts_count(kafka, cluster)
    for name, body in [("not JSON", b"input=hello"), ("truncated JSON", b'{"input": "x"'),
                       ("a JSON list", b'[{"input": "x"}]'), ("a JSON string", b'"x"'), ("empty", b""),
                       ("invalid UTF-8", b'{"input": "caf\xe9"}'), ("NUL in a string", b'{"input": "a\\u0000b"}')]:
        r = node.post("/v1/responses", body, headers={"Content-Type": "application/json"})
        try:
            openai_error(r, 400)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
    assert prompts_count(kafka, cluster) == before


def test_too_large_body_is_413(node, kafka, cluster):
    before = prompts_count(kafka, cluster)
    r = node.post("/v1/responses", {"input": "x" * (MAX_BODY + 10), "background": True})
    openai_error(r, 413)
    r = node.post("/answer", {"prompt": "x" * (MAX_BODY + 10)})
    openai_error(r, 413)
    assert prompts_count(kafka, cluster) == before


def test_sdk_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.responses.create(model="fake", input="x", tools=[{"type": "function", "name": "f", "parameters": {}}])
    assert ei.value.status_code == 400
    assert ei.value.body["param"] == "tools", ei.value.body
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="fake", input="   ")


def test_unknown_previous_response_id_is_404(node, client, kafka, cluster):
    before = prompts_count(kafka, cluster)
    # Not one of this server's ids at all.
    openai_error(node.post("/v1/responses", {"input": "x", "previous_response_id": "resp_bogus"}), 404)
    openai_error(node.post("/v1/responses", {"input": "x", "previous_response_id": "chatcmpl-123"}), 404)
    # Well formed, but no such conversation.
    openai_error(node.post("/v1/responses", {"input": "x", "previous_response_id": "resp_AAAAAAAAAAAAAAAAAAAAAA_1"}), 404)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="fake", input="x", previous_response_id="resp_AAAAAAAAAAAAAAAAAAAAAA_1")
    assert prompts_count(kafka, cluster) == before


def test_unknown_previous_response_id_error_names_it(node):
    """The 404 for an unknown previous_response_id is the same whatever the id looks like: OpenAI's code
    `previous_response_not_found` and param `previous_response_id` (a Responses client knows nothing of
    conversations)."""
    for prev in ("resp_bogus", "resp_AAAAAAAAAAAAAAAAAAAAAA_1"):
        r = node.post("/v1/responses", {"input": "x", "previous_response_id": prev})
        err = openai_error(r, 404)
        assert (err["code"], err["param"]) == ("previous_response_not_found", "previous_response_id"), (prev, err)


def test_previous_response_id_of_a_missing_turn_is_404(node, client, kafka, cluster, fakellm):
    """previous_response_id naming a turn that does not exist (or was deleted) in an existing conversation
    is unknown too: 404, nothing queued (and no turn silently continued from the whole conversation)."""
    r1 = client.responses.create(model="fake", input=unique("base"))
    assert r1.status == "completed"
    conv = r1.id[len("resp_"):].rsplit("_", 1)[0]
    r2 = client.responses.create(model="fake", input=unique("deleted later"), previous_response_id=r1.id)
    client.responses.delete(r2.id)
    before = prompts_count(kafka, cluster)
    wrong = []
    for what, prev in (("a turn that never existed", f"resp_{conv}_7"), ("a deleted turn", r2.id)):
        p = unique("orphan")
        r = node.post("/v1/responses", {"input": p, "previous_response_id": prev})
        if r.status != 404:
            sent = [q["messages"] for q in fakellm.requests_with_last_user(p)]
            wrong.append(f"previous_response_id = {what} ({prev}): expected 404, got {r.status} "
                         f"{r.body[:120]!r}...; the LLM was sent {sent}")
    assert not wrong, "\n".join(wrong)
    assert prompts_count(kafka, cluster) == before


def test_previous_response_id_of_wrong_type_is_400(node):
    for prev in (5, ["resp_x_1"], {"id": "resp_x_1"}, True):
        r = node.post("/v1/responses", {"input": "x", "previous_response_id": prev})
        openai_error(r, 400, param="previous_response_id")


def test_unknown_ids_and_routes_are_404(node):
    for rid in ("resp_AAAAAAAAAAAAAAAAAAAAAA_1", "resp_AAAAAAAAAAAAAAAAAAAAAA_0", "resp_AAAA_x", "resp__1",
                "resp_" + "A" * 80 + "_1", "msg_AAAAAAAAAAAAAAAAAAAAAA_1", "x"):
        q = urllib.parse.quote(rid)
        openai_error(node.get(f"/v1/responses/{q}"), 404)
        openai_error(node.get(f"/v1/responses/{q}?stream=true"), 404)
        openai_error(node.request("DELETE", f"/v1/responses/{q}"), 404)
        openai_error(node.post(f"/v1/responses/{q}/cancel"), 404)
    openai_error(node.get("/v1/responses/resp_AAAAAAAAAAAAAAAAAAAAAA_1/other"), 404)
    openai_error(node.get("/v1/chat/completions"), 404)
    openai_error(node.get("/v1/responses/"), 404)


def test_wrong_methods_are_405_with_allow(node):
    rid = "resp_AAAAAAAAAAAAAAAAAAAAAA_1"
    for method, path, allow in [("GET", "/v1/responses", "POST"), ("PUT", "/v1/responses", "POST"),
                                ("DELETE", "/v1/responses", "POST"), ("PUT", f"/v1/responses/{rid}", "GET, DELETE"),
                                ("POST", f"/v1/responses/{rid}", "GET, DELETE"),
                                ("PATCH", f"/v1/responses/{rid}", "GET, DELETE"),
                                ("GET", f"/v1/responses/{rid}/cancel", "POST"),
                                ("DELETE", f"/v1/responses/{rid}/cancel", "POST")]:
        r = node.request(method, path)
        openai_error(r, 405)
        assert r.headers.get("allow") == allow, (method, path, r)


def test_stream_of_a_response_created_without_stream_is_400(node, client):
    r = client.responses.create(model="fake", input=unique("plain"))
    assert r.status == "completed"
    openai_error(node.get(f"/v1/responses/{r.id}?stream=true"), 400, code="stream_not_available")
    # Without stream=true it is the object.
    assert node.get(f"/v1/responses/{r.id}?stream=false").json()["id"] == r.id

