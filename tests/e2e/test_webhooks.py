"""`asyncllm webhooks`: signed events (Standard Webhooks) for finished responses, delivered to the callback_url
given at submit time and to configured endpoints; retried until the receiver recovers; 410 stops delivery;
loopback targets refused unless allowed; undeliverable events dead-lettered."""

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time

import pytest

from conftest import free_port, unique, wait_for

SECRET = "whsec_" + base64.b64encode(b"asyncllm-test-secret-0123456789ab").decode()
KEY = base64.b64decode(SECRET[6:])


class Receiver:
    """An HTTP server that records every POST, checks its signature, and answers from a per-path script:
    script[path] is a list of status codes used in turn (the last one repeats)."""

    def __init__(self):
        self.events = []  # (path, headers, body, signature_ok, time)
        self.script = {}
        self.lock = threading.Lock()
        recv = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                mid = self.headers.get("webhook-id", "")
                ts = self.headers.get("webhook-timestamp", "")
                sig = self.headers.get("webhook-signature", "")
                mac = hmac.new(KEY, f"{mid}.{ts}.".encode() + body, hashlib.sha256).digest()
                ok = ("v1," + base64.b64encode(mac).decode()) in sig.split(" ")
                with recv.lock:
                    recv.events.append((self.path, dict(self.headers), body, ok, time.time()))
                    codes = recv.script.get(self.path, [200])
                    code = codes.pop(0) if len(codes) > 1 else codes[0]
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def on(self, path):
        with self.lock:
            return [e for e in self.events if e[0] == path]

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def nodes(cluster, receiver):
    api = cluster.start("all")
    hooks = cluster.start(
        "webhooks",
        webhook_secret=SECRET,
        webhook_allow_private=1,
        webhook_urls=receiver.url("/configured"),
        webhook_retry_base_ms=200,
        webhook_retry_max_ms=400,
        webhook_max_attempts=4,
        webhook_group_id=unique("hooks"),
        webhook_from_beginning=1,  # the module's own topic: no race between joining and the first event
        topic_webhook_dlq=cluster.topic_dlq + "_hooks",
    )
    return api, hooks


def submit(api, prompt, callback):
    r = api.post("/answer", {"prompt": prompt, "callback_url": callback})
    assert r.status == 202, r
    return r.json()["conversation_id"]


def test_signed_event_to_callback_and_configured_endpoint(nodes, receiver):
    api, _ = nodes
    cid = submit(api, "hello hooks", receiver.url("/cb1"))
    api.wait_done(cid)
    wait_for(lambda: receiver.on("/cb1"), 30, "the callback_url delivery")
    path, headers, body, ok, _ = receiver.on("/cb1")[0]
    assert ok, f"signature does not verify: {headers}"
    ev = json.loads(body)
    assert ev["object"] == "event" and ev["type"] == "response.completed", ev
    assert ev["id"] == headers["webhook-id"] == f"evt_{cid}_1"
    assert ev["data"]["id"] == f"resp_{cid}_1"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300
    wait_for(lambda: [e for e in receiver.on("/configured") if f"evt_{cid}_1".encode() in e[2]], 30,
             "the configured endpoint's delivery")


def test_receiver_failing_twice_gets_the_event_when_it_recovers(nodes, receiver):
    api, hooks = nodes
    receiver.script["/flaky"] = [500, 503, 200]
    cid = submit(api, "flaky receiver", receiver.url("/flaky"))
    wait_for(lambda: len(receiver.on("/flaky")) >= 3, 30, "three attempts on the flaky receiver")
    attempts = receiver.on("/flaky")
    assert [json.loads(e[2])["id"] for e in attempts] == [f"evt_{cid}_1"] * 3
    assert all(e[3] for e in attempts), "every attempt is signed"
    time.sleep(1.0)
    assert len(receiver.on("/flaky")) == 3, "no attempt after the 200"
    m = hooks.metrics()
    assert m.get("asyncllm_webhooks_retried_total", 0) >= 2, m


def test_410_stops_delivery(nodes, receiver):
    api, _ = nodes
    receiver.script["/gone"] = [410]
    cid = submit(api, "gone receiver", receiver.url("/gone"))
    wait_for(lambda: receiver.on("/gone"), 30, "the delivery to the 410 receiver")
    api.wait_done(cid)
    time.sleep(1.5)  # several retry periods
    assert len(receiver.on("/gone")) == 1, "a 410 must stop delivery to that URL"


def test_cancelled_response_sends_response_cancelled(nodes, receiver):
    api, _ = nodes
    r = api.post("/v1/responses", {"model": "fake", "input": "cancel me [[latency=4000]]", "background": True,
                                   "callback_url": receiver.url("/cancelled")})
    assert r.status == 200, r
    rid = r.json()["id"]
    c = api.post(f"/v1/responses/{rid}/cancel")
    assert c.status == 200 and c.json()["status"] == "cancelled", c
    wait_for(lambda: receiver.on("/cancelled"), 30, "the cancelled event")
    ev = json.loads(receiver.on("/cancelled")[0][2])
    assert ev["type"] == "response.cancelled" and ev["data"]["id"] == rid, ev


def test_loopback_refused_unless_allowed(cluster, receiver, kafka):
    strict = cluster.start("webhooks", webhook_secret=SECRET, webhook_allow_private=0,
                           webhook_group_id=unique("strict"), webhook_max_attempts=2, webhook_from_beginning=1,
                           topic_webhook_dlq=cluster.topic_dlq + "_strict")
    api = cluster.start("all")
    cid = submit(api, "private target", receiver.url("/private"))
    api.wait_done(cid)
    # The strict instance must dead-letter it without a single request reaching the receiver.
    def dead_letter():
        return [r for r in kafka.read(cluster.topic_dlq + "_strict")
                if f"evt_{cid}_1" in (r["payload"] or "")]
    records = wait_for(dead_letter, 30, "the dead letter of the refused URL")
    assert records[0]["headers"].get("asyncllm-webhook-url") == receiver.url("/private"), records
    assert "private" in records[0]["headers"].get("asyncllm-error-message", ""), records
    assert strict.proc.alive()
    # The permissive instance (webhook-allow-private=1) did deliver it: the receiver itself works.
    wait_for(lambda: receiver.on("/private"), 30, "the permissive instance's delivery")


def test_bad_callback_url_is_400(nodes):
    api, _ = nodes
    r = api.post("/answer", {"prompt": "x", "callback_url": "ftp://example.com/x"})
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_callback_url", r
