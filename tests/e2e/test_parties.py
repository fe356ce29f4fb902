"""The interested parties of async_llm_response (issue 7), against the real broker, Redis and the fake LLM:

- `asyncllm moderate`: a listed word (also obfuscated) flags the answer on /polling, in the Responses object's
  metadata and on the moderation topic; clean answers are not flagged; empty and truncated answers are; the
  moderation API is called when configured; a party killed with SIGKILL mid-stream and restarted loses
  nothing and stores no verdict twice.
- `asyncllm exec -- COMMAND`: a hook's results appear on their topic, one per response, in order per
  conversation; a hook that crashes is restarted and its message retried; one that always crashes, or hangs,
  ends in the dead letters with headers saying why; one process per message with --exec-per-message.
- `asyncllm tail`: shows responses submitted after it started, as JSON lines or text, filtered.
"""

import http.server
import json
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import REPO, free_port, http_request, unique, wait_for

HOOK = REPO / "tests" / "e2e" / "hook_upper.py"
WORDS = "# test word list\nshit\nass\ndamn\nfrack\n"


@pytest.fixture(scope="module")
def names(cluster):
    base = cluster.topic_responses[: -len("_responses")]
    return {
        "moderation": base + "_moderation",
        "postprocessed": base + "_pp",
        "pp_dlq": base + "_ppdlq",
        "pp_single": base + "_pp1",
        "pp_single_dlq": base + "_pp1dlq",
    }


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.start("all")


@pytest.fixture(scope="module")
def words(cluster):
    p = cluster.tmp_dir / "words.txt"
    p.write_text(WORDS)
    return p


@pytest.fixture(scope="module")
def moderator(cluster, api, names, words):
    return cluster.start("moderate", moderation_words=words, topic_moderation=names["moderation"],
                         moderation_group_id=unique("e2e-moderation"))


def verdict(api, conv, timeout=30):
    """The moderation object on /polling once it is there."""
    def get():
        b = api.poll(conv).json()
        return b.get("moderation")
    return wait_for(get, timeout, f"a moderation verdict for {conv}", interval=0.1)


def submit_reply(api, text, conv=None):
    body = api.submit(f"say it [[reply={text}]]", conversation_id=conv)
    return body["conversation_id"]


# ------------------------------------------------------------------------------------------------ moderate


def test_listed_word_flagged_everywhere(api, moderator, kafka, names):
    conv = submit_reply(api, "You are a piece of shit, frankly.")
    api.wait_done(conv)
    v = verdict(api, conv)
    assert v["flagged"] is True, v
    assert "profanity" in v["categories"], v
    assert any("shit" in r for r in v["reasons"]), v
    assert isinstance(v["checked_at"], int) and v["checked_at"] > 0
    # The Responses API shows it in metadata, as strings.
    r = api.get(f"/v1/responses/resp_{conv}_1")
    assert r.status == 200, r
    md = r.json()["metadata"]
    assert md["moderation_flagged"] == "true", md
    assert "profanity" in md["moderation_categories"].split(","), md
    # Published, keyed by conversation, with the verdict and the response.
    msgs = kafka.wait_for_key(names["moderation"], conv)
    assert len(msgs) == 1, msgs
    m = msgs[0]["value"]
    assert m["conversation_id"] == conv and m["turn"] == 1
    assert m["moderation"] == v
    assert "shit" in m["llm_response"]


def test_clean_answer_not_flagged(api, moderator, kafka, names):
    conv = submit_reply(api, "Pizza is a classic, passable and assorted dish.")
    api.wait_done(conv)
    v = verdict(api, conv)
    assert v["flagged"] is False and v["categories"] == [], v
    md = api.get(f"/v1/responses/resp_{conv}_1").json()["metadata"]
    assert md["moderation_flagged"] == "false" and md["moderation_categories"] == "", md
    # A flagged one submitted after it is published; the clean one never is.
    marker = submit_reply(api, "damn")
    kafka.wait_for_key(names["moderation"], marker)
    assert not [m for m in kafka.read(names["moderation"]) if m["key"] == conv]


@pytest.mark.parametrize("text", ["sh1t happens", "$h!t", "ＳＨＩＴ", "shiiiiiit", "s\u200bhit", "what an @$$",
                                  "d4mn it", "\u015bh\u00eft", "a\u0455\u0455"])  # accents, Cyrillic s
def test_obfuscated_spellings_caught(api, moderator, text):
    conv = submit_reply(api, text)
    v = verdict(api, conv)
    assert v["flagged"] is True and "profanity" in v["categories"], (text, v)


@pytest.mark.parametrize("text", ["as you like", "a classic assessment", "shirt"])
def test_near_misses_not_flagged(api, moderator, text):
    conv = submit_reply(api, text)
    v = verdict(api, conv)
    assert v["flagged"] is False, (text, v)


def test_empty_and_truncated_answers_flagged(api, moderator):
    conv = submit_reply(api, "")
    v = verdict(api, conv)
    assert v["flagged"] is True and "empty" in v["categories"], v
    r = api.post("/v1/responses", {"model": "fake", "input": "one two three four five six seven",
                                   "max_output_tokens": 2, "background": True})
    assert r.status == 200, r
    conv = r.json()["id"][len("resp_"):].rsplit("_", 1)[0]
    v = verdict(api, conv)
    assert "truncated" in v["categories"], v


class ModerationAPI:
    """A fake OpenAI-compatible moderation endpoint: flags inputs containing THREAT as harassment; every call
    takes `delay` seconds; records the inputs it saw."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.inputs = []
        self.lock = threading.Lock()
        api = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with api.lock:
                    api.inputs.append((self.path, body.get("input"), self.headers.get("Authorization")))
                time.sleep(api.delay)
                threat = "THREAT" in (body.get("input") or "")
                out = json.dumps({"id": "modr-1", "model": "fake-moderation", "results": [
                    {"flagged": threat, "categories": {"harassment": threat, "violence": False}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_moderation_api_and_kill_restart(cluster, api, moderator, redis, kafka, names, words):
    """The moderation API's categories join the verdict; a party killed with SIGKILL mid-stream and restarted
    (same group) loses nothing, and no verdict is stored twice: those stored before the kill are unchanged,
    and every message on the moderation topic carries the stored verdict."""
    mod_api = ModerationAPI(delay=0.15)
    try:
        # The first party stops, so that only the one killed here checks what comes next.
        assert moderator.proc.stop() == []
        group = unique("e2e-moderation-kill")
        settings = dict(moderation_words=words, topic_moderation=names["moderation"], moderation_group_id=group,
                        moderation_url=mod_api.url, moderation_api_key="sk-test", moderation_max_in_flight=2)
        convs = []
        for i in range(24):
            text = f"a THREAT number {i}" if i % 3 == 0 else (f"damn number {i}" if i % 3 == 1 else f"fine {i}")
            convs.append(submit_reply(api, text))
        api.wait_all_done(convs)
        party = cluster.start("moderate", **settings)
        stored = lambda: [c for c in convs if redis.command("HGET", f"asyncllm:conv:{c}", "t1.moderation")]
        wait_for(lambda: len(stored()) >= 6, 60, "some verdicts before the kill", interval=0.05)
        party.proc.kill()
        before = {c: redis.command("HGET", f"asyncllm:conv:{c}", "t1.moderation") for c in stored()}
        assert len(before) < len(convs), "the party finished before it was killed: nothing was mid-stream"
        cluster.start("moderate", **settings)
        wait_for(lambda: len(stored()) == len(convs), 60, "a verdict for every response after the restart")
        for c, v in before.items():
            assert redis.command("HGET", f"asyncllm:conv:{c}", "t1.moderation") == v, f"verdict of {c} changed"
        published = {}
        for m in kafka.read(names["moderation"]):
            published.setdefault(m["key"], []).append(m["value"])
        for i, c in enumerate(convs):
            v = json.loads(redis.command("HGET", f"asyncllm:conv:{c}", "t1.moderation"))
            if i % 3 == 0:
                assert v["flagged"] and "harassment" in v["categories"], v
                assert any("moderation API" in r for r in v["reasons"]), v
            elif i % 3 == 1:
                assert v["flagged"] and v["categories"] == ["profanity"], v
            else:
                assert not v["flagged"], v
                assert c not in published
            if v["flagged"]:
                assert published.get(c), f"flagged {c} not published"
                assert all(p["moderation"] == v for p in published[c]), published[c]
        # It called {base}/moderations with the bearer token.
        assert all(path == "/v1/moderations" and auth == "Bearer sk-test" for path, _, auth in mod_api.inputs)
    finally:
        mod_api.close()


# ------------------------------------------------------------------------------------------------ exec


@pytest.fixture(scope="module")
def hook_state(cluster):
    d = cluster.tmp_dir / "hook-state"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def execer(cluster, api, names, hook_state):
    return cluster.start("exec", "--", sys.executable, HOOK, hook_state,
                         topic_postprocessed=names["postprocessed"], topic_postprocess_dlq=names["pp_dlq"],
                         exec_group_id=unique("e2e-exec"), exec_timeout_ms=2000, exec_max_attempts=2,
                         exec_retry_base_ms=100, exec_max_in_flight=8)


def results(kafka, topic, conv):
    return [m for m in kafka.read(topic) if m["key"] == conv]


def test_exec_results_in_order_per_conversation(api, execer, kafka, names):
    convs = [submit_reply(api, f"c{i} turn one") for i in range(4)]
    for t in ("two", "three", "four"):
        for i, c in enumerate(convs):
            api.submit(f"next [[reply=c{i} turn {t}]]", conversation_id=c)
    for i, c in enumerate(convs):
        api.wait_done(c, user_prompt=f"next [[reply=c{i} turn four]]")
    for i, c in enumerate(convs):
        msgs = kafka.wait_for_key(names["postprocessed"], c, n=4)
        assert len(msgs) == 4, msgs  # one per response
        assert [m["value"]["turn"] for m in msgs] == [1, 2, 3, 4], msgs  # in order
        assert [m["value"]["upper"] for m in msgs] == [f"C{i} TURN {t}" for t in ("ONE", "TWO", "THREE", "FOUR")]
        assert len({m["partition"] for m in msgs}) == 1


# Before the hanging hook's test: a new group reads the topic from its beginning, and a process per message
# started under load needs a generous timeout.
def test_exec_per_message(cluster, api, kafka, names, hook_state):
    node = cluster.start("exec", "--exec-per-message", "--", sys.executable, HOOK, hook_state,
                         topic_postprocessed=names["pp_single"], topic_postprocess_dlq=names["pp_single_dlq"],
                         exec_group_id=unique("e2e-exec-single"), exec_timeout_ms=20000, exec_max_attempts=2,
                         exec_retry_base_ms=100, exec_max_in_flight=4)
    convs = [submit_reply(api, f"single {i}") for i in range(3)]
    pids = set()
    for i, c in enumerate(convs):
        m = kafka.wait_for_key(names["pp_single"], c)[0]["value"]
        assert m["upper"] == f"SINGLE {i}"
        pids.add(m["pid"])
    assert len(pids) == 3, pids  # one process each
    crash = submit_reply(api, "HOOK-CRASH-ALWAYS per message")
    dl = kafka.wait_for_key(names["pp_single_dlq"], crash)
    assert "exited with status 3" in dl[0]["headers"]["asyncllm-error-message"]
    assert node.metrics()["asyncllm_exec_dead_lettered_total"] >= 1
    assert node.proc.stop() == []  # SIGTERM: drains and exits 0


def test_exec_crash_restarted_and_retried(api, execer, kafka, names):
    token = unique("t").replace("-", "")
    conv = submit_reply(api, f"HOOK-CRASH-ONCE:{token} then fine")
    msgs = kafka.wait_for_key(names["postprocessed"], conv)
    assert msgs[0]["value"]["upper"] == f"HOOK-CRASH-ONCE:{token.upper()} THEN FINE"
    m = execer.metrics()
    assert m["asyncllm_exec_restarts_total"] >= 1 and m["asyncllm_exec_retries_total"] >= 1, m
    assert "exited with status 4" in execer.proc.log()


def test_exec_always_crashing_dead_lettered(api, execer, kafka, names):
    conv = submit_reply(api, "HOOK-CRASH-ALWAYS")
    dl = kafka.wait_for_key(names["pp_dlq"], conv)
    assert len(dl) == 1, dl
    h = dl[0]["headers"]
    assert "exited with status 3" in h["asyncllm-error-message"], h
    assert h["asyncllm-attempts"] == "2", h
    assert dl[0]["value"]["conversation_id"] == conv  # the original message
    assert not results(kafka, names["postprocessed"], conv)
    # The hook keeps working for others.
    ok = submit_reply(api, "after the crash")
    kafka.wait_for_key(names["postprocessed"], ok)


def test_exec_hanging_timed_out_then_dead_lettered(api, execer, kafka, names):
    conv = submit_reply(api, "HOOK-HANG")
    other = submit_reply(api, "not hanging")
    dl = kafka.wait_for_key(names["pp_dlq"], conv, timeout=60)
    h = dl[0]["headers"]
    assert "timed out after 2000 ms" in h["asyncllm-error-message"], h
    assert h["asyncllm-attempts"] == "2"
    kafka.wait_for_key(names["postprocessed"], other)
    assert execer.metrics()["asyncllm_exec_timeouts_total"] >= 2


def test_exec_null_result_publishes_nothing(api, execer, kafka, names):
    conv = submit_reply(api, "HOOK-NULL")
    after = submit_reply(api, "after null")
    kafka.wait_for_key(names["postprocessed"], after)
    wait_for(lambda: execer.metrics()["asyncllm_exec_null_results_total"] >= 1, 30, "the null result")
    assert not results(kafka, names["postprocessed"], conv)


def test_exec_rejects_unknown_command(cluster, names):
    from conftest import ASYNCLLM_BIN, KAFKA_BOOTSTRAP
    import subprocess
    p = subprocess.run([str(ASYNCLLM_BIN), "exec", f"--kafka-brokers={KAFKA_BOOTSTRAP}",
                        f"--topic-responses={cluster.topic_responses}", "--", "/nonexistent/hook"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not found" in p.stderr, p


# ------------------------------------------------------------------------------------------------ tail


def test_tail_shows_new_responses(cluster, api):
    tail = cluster.start("tail")
    conv = submit_reply(api, "seen by tail")
    api.wait_done(conv)

    def line():
        for ln in tail.proc.log().splitlines():
            if ln.startswith("{"):
                v = json.loads(ln)
                if v.get("conversation_id") == conv:
                    return v
        return None
    v = wait_for(line, 30, "tail to print the response")
    assert v["llm_response"] == "seen by tail" and v["status"] == "complete"


def test_tail_text_from_beginning_filtered(cluster, api):
    conv = submit_reply(api, "only this one")
    other = submit_reply(api, "not this one")
    api.wait_done(conv)
    api.wait_done(other)
    tail = cluster.start("tail", "--from-beginning", "--format=text", f"--conversation={conv}")
    wait_for(lambda: "llm:  only this one" in tail.proc.log(), 30, "tail's text output")
    log = tail.proc.log()
    assert f"{conv}  turn 1  complete" in log
    assert "user: say it [[reply=only this one]]" in log
    assert other not in log and "not this one" not in log


# ------------------------------------------------------------------------------------------------ the guide's examples


def run_example(argv, convs, timeout=60):
    """Runs an example party until it printed a line for each of convs; returns its output. SIGTERM at the
    end: it must exit by itself with status 0."""
    import os
    import signal
    import subprocess
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: all(any(c in ln for ln in list(out)) for c in convs), timeout,
                 f"{argv[0]} to print a line for each of {convs}", interval=0.1)
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(timeout=30)
        reader.join(timeout=10)
    return "".join(out), rc


def test_example_party_in_c(cluster, api):
    binary = REPO / "build" / "asan" / "test_party_example"
    if not binary.exists():
        pytest.skip("build/asan/test_party_example not built (make unit)")
    convs = [submit_reply(api, f"example in C {i}") for i in range(3)]
    from conftest import KAFKA_BOOTSTRAP
    out, rc = run_example([binary, "run", f"--kafka-brokers={KAFKA_BOOTSTRAP}", f"--topic-responses={cluster.topic_responses}",
                           f"--group-id={unique('e2e-party-min')}", "--commit-interval-ms=200",
                           "--shutdown-grace-ms=2000"], convs)
    for i, c in enumerate(convs):
        assert f"{c} turn 1 complete: {len(f'example in C {i}')} bytes of answer" in out, out
    assert rc == 0, out
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out


def test_example_party_with_kcat(cluster, api):
    convs = [submit_reply(api, f"example with kcat {i}") for i in range(2)]
    from conftest import KAFKA_BOOTSTRAP
    out, _ = run_example([REPO / "examples" / "party_kcat.sh", KAFKA_BOOTSTRAP, unique("e2e-party-kcat"),
                          cluster.topic_responses], convs)
    for i, c in enumerate(convs):
        assert f"{c} turn 1: {len(f'example with kcat {i}')} characters" in out, out
