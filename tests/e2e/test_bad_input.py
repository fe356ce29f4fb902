"""Bad input: the right status, an OpenAI-shaped error body, and nothing produced to Kafka.

The module has its own, fresh prompts topic. Every bad request is checked against that topic (it must
stay empty); the last test then makes one good request, to prove that the check sees messages."""

import json

import pytest

from conftest import assert_error, unique

MAX_BODY = 1024


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.start("api")


@pytest.fixture(scope="module")
def small_api(cluster):
    """A second API on the same topics with a small body limit."""
    return cluster.start("api", http_max_body=MAX_BODY)


class NothingProduced:
    """Asserts that the module's prompts topic holds nothing but the messages of the few good
    requests the module makes on purpose (their conversation ids are in .allowed)."""

    def __init__(self, kafka, topic):
        self.kafka, self.topic, self.allowed = kafka, topic, set()

    def __call__(self):
        msgs = [m for m in self.kafka.read(self.topic) if m["key"] not in self.allowed]
        assert msgs == [], f"bad input was produced to {self.topic}: {msgs!r}"


@pytest.fixture(scope="module")
def nothing_produced(kafka, cluster, api):
    check = NothingProduced(kafka, cluster.topic_prompts)
    assert kafka.read(cluster.topic_prompts) == [], "the module's prompts topic is not fresh"
    return check


JSON = {"Content-Type": "application/json"}

BAD_ANSWER_REQUESTS = [
    # id, method, path, body, headers, status
    ("get-missing-prompt", "GET", "/answer", None, {}, 400),
    ("get-missing-prompt-other-param", "GET", "/answer?promptx=hi", None, {}, 400),
    ("get-empty-prompt", "GET", "/answer?prompt=", None, {}, 400),
    ("get-whitespace-prompt", "GET", "/answer?prompt=%20%09%20", None, {}, 400),
    ("get-invalid-utf8-query", "GET", "/answer?prompt=%FF", None, {}, 400),
    ("get-invalid-utf8-query-overlong", "GET", "/answer?prompt=a%C0%AFb", None, {}, 400),
    ("get-invalid-utf8-conversation-id", "GET", "/answer?prompt=hi&conversationId=%FF%FE", None, {}, None),
    ("post-missing-prompt", "POST", "/answer", b"{}", JSON, 400),
    ("post-missing-prompt-other-key", "POST", "/answer", b'{"promptx": "hi"}', JSON, 400),
    ("post-empty-body", "POST", "/answer", b"", JSON, 400),
    ("post-empty-prompt", "POST", "/answer", b'{"prompt": ""}', JSON, 400),
    ("post-whitespace-prompt", "POST", "/answer", b'{"prompt": " \\n\\t  "}', JSON, 400),
    ("post-invalid-json", "POST", "/answer", b'{"prompt": "hi"', JSON, 400),
    ("post-invalid-json-trailing", "POST", "/answer", b'{"prompt": "hi"} x', JSON, 400),
    ("post-json-array", "POST", "/answer", b'["hi"]', JSON, 400),
    ("post-json-string", "POST", "/answer", b'"hi"', JSON, 400),
    ("post-json-null", "POST", "/answer", b"null", JSON, 400),
    ("post-prompt-number", "POST", "/answer", b'{"prompt": 42}', JSON, 400),
    ("post-prompt-null", "POST", "/answer", b'{"prompt": null}', JSON, 400),
    ("post-prompt-array", "POST", "/answer", b'{"prompt": ["hi"]}', JSON, 400),
    ("post-prompt-object", "POST", "/answer", b'{"prompt": {"text": "hi"}}', JSON, 400),
    ("post-invalid-utf8-body", "POST", "/answer", b'{"prompt": "\xff\xfe"}', JSON, 400),
    ("post-invalid-utf8-truncated", "POST", "/answer", b'{"prompt": "abc\xe4\xb8"}', JSON, 400),
    ("post-conversation-id-number", "POST", "/answer", b'{"prompt": "hi", "conversation_id": 7}', JSON, 400),
    ("post-unknown-conversation", "POST", "/answer", b'{"prompt": "hi", "conversation_id": "AAAAAAAAAAAAAAAAAAAAAA"}', JSON, 404),
    ("get-unknown-conversation", "GET", "/answer?prompt=hi&conversationId=AAAAAAAAAAAAAAAAAAAAAA", None, {}, 404),
]


@pytest.mark.parametrize("method,path,body,headers,status", [c[1:] for c in BAD_ANSWER_REQUESTS],
                         ids=[c[0] for c in BAD_ANSWER_REQUESTS])
def test_bad_answer_request(api, nothing_produced, method, path, body, headers, status):
    r = api.request(method, path, body=body, headers=headers)
    if status is None:  # a malformed conversation id: 400 or 404 are both fine, never accepted
        assert r.status in (400, 404), r
        status = r.status
    assert_error(r, status)
    nothing_produced()


def test_body_over_the_limit_is_413(small_api, nothing_produced):
    body = json.dumps({"prompt": "x" * 1500}).encode()
    assert len(body) > MAX_BODY
    r = small_api.post("/answer", body, headers=JSON)
    assert_error(r, 413)
    nothing_produced()
    # Just under the limit is fine for that API: the limit is the body size, not something smaller.
    ok = small_api.post("/answer", json.dumps({"prompt": "y" * (MAX_BODY - 64)}).encode(), headers=JSON)
    assert ok.status == 202, ok
    nothing_produced.allowed.add(ok.json()["conversation_id"])  # produced on purpose
    nothing_produced()


@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/answer", {"GET", "POST"}),
    ("DELETE", "/answer", {"GET", "POST"}),
    ("PATCH", "/answer", {"GET", "POST"}),
    ("POST", "/polling", {"GET"}),
    ("PUT", "/polling", {"GET"}),
])
def test_wrong_method_is_405_with_allow(api, method, path, allow):
    body = b'{"prompt": "hi"}' if method in ("PUT", "PATCH", "DELETE") else b"{}"
    r = api.request(method, path, body=body, headers=JSON)
    assert_error(r, 405)
    assert "allow" in r.headers, f"405 without Allow: {r!r}"
    got = {m.strip().upper() for m in r.headers["allow"].split(",") if m.strip()}
    assert allow <= got and method not in got, f"{method} {path}: Allow: {r.headers['allow']!r}"


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/nope"), ("POST", "/answers"),
                                         ("GET", "/answer/extra"), ("GET", "/v1/answer")])
def test_unknown_route_is_404(api, method, path):
    assert_error(api.request(method, path, body=b"{}" if method == "POST" else None), 404)


@pytest.mark.parametrize("path,status", [
    ("/polling", 400),
    ("/polling?conversationId=", 400),
    ("/polling?conversationId=AAAAAAAAAAAAAAAAAAAAAA", 404),
    ("/polling?conversationId=" + "B" * 30, 404),
])
def test_polling_bad_or_unknown_id(api, path, status):
    assert_error(api.get(path), status)


def test_healthz_and_readyz(api):
    r = api.get("/healthz")
    assert r.status == 200, r
    r = api.get("/readyz")
    assert r.status == 200, r
    assert r.json().get("status") == "ready", r


def test_the_check_sees_a_good_prompt(api, kafka, cluster, nothing_produced):
    """Last: after all the bad requests one good request shows up on the topic, keyed by its
    conversation id: the emptiness checks above can see messages, so they could fail."""
    nothing_produced()
    prompt = unique("good")
    cid = api.submit(prompt)["conversation_id"]
    with pytest.raises(AssertionError, match=cid):
        nothing_produced()
    mine = [m for m in kafka.read(cluster.topic_prompts) if m["key"] == cid]
    assert [m["value"]["prompt"] for m in mine] == [prompt], mine
