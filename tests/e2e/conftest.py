"""Fixtures of the end-to-end tests: the real Kafka broker and redis-server of scripts/stack.sh, the
fake LLM (tests/fakellm) and asyncllm processes (api, worker, all) started per test module.

Only the Python standard library and pytest. Kafka is read with kcat, Redis with a tiny RESP client.

Environment (same defaults as scripts/stack.sh and docs/CONTRACTS.md):
  KAFKA_PORT     broker of the stack (default 9092)
  REDIS_PORT     redis-server of the stack (default 6390)
  ASYNCLLM_BIN   binary under test (default build/asan/asyncllm, relative to the repo)
  FAKELLM_BIN    fake LLM (default build/fakellm)
  ASYNCLLM_STACK_DIR, KAFKA_CONTROLLER_PORT are passed on to scripts/stack.sh (broker-down test).
  ASYNCLLM_E2E_EXTRA_PORTS  "first-last": ports for the servers a test starts itself (default: any free one)
  ASAN_OPTIONS, UBSAN_OPTIONS   default: leaks and errors fatal (see SAN_ENV)

Each module gets its own topics and consumer group (Cluster), so modules never see each other's
messages; processes are reused within a module and stopped with SIGTERM at its end, when a non-zero
exit status or a sanitizer report in their log fails the module's last test.
"""

import atexit
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KAFKA_PORT = int(os.environ.get("KAFKA_PORT", "9092"))
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6390"))
KAFKA_BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"
STACK_SH = REPO / "scripts" / "stack.sh"


def _bin(env_name, default):
    p = Path(os.environ.get(env_name, default))
    return p if p.is_absolute() else REPO / p


ASYNCLLM_BIN = _bin("ASYNCLLM_BIN", "build/asan/asyncllm")
FAKELLM_BIN = _bin("FAKELLM_BIN", "build/fakellm")

# Sanitizer settings for processes started here, unless the caller (scripts/e2e.sh) set them.
SAN_ENV = {
    "ASAN_OPTIONS": os.environ.get("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=23"),
    "UBSAN_OPTIONS": os.environ.get("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"),
}
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "LeakSanitizer", "runtime error:")

# Hang guards only: none of these is a performance assertion.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
COMPLETE_TIMEOUT = 60.0

CONV_ID_RE = re.compile(r"^[A-Za-z0-9_-]{22,}$")


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def free_port():
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extra_port():
    """A free port for a server a test starts itself (a redis-server of its own): any free one, or one in
    ASYNCLLM_E2E_EXTRA_PORTS ("first-last") where only some ports may be used on this machine."""
    spec = os.environ.get("ASYNCLLM_E2E_EXTRA_PORTS", "")
    if not spec:
        return free_port()
    first, last = (int(x) for x in spec.split("-"))
    for port in range(first, last + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in ASYNCLLM_E2E_EXTRA_PORTS={spec}")


class RedisProxy:
    """Listens on a port of its own (self.port) and connects each client it accepts to the stack's Redis; what
    passes between the two is the subclass' serve(client, server), run in a thread per connection."""

    def __init__(self):
        self.port = extra_port()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", int(self.port)))
        self.lsock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            s = socket.create_connection(("127.0.0.1", int(REDIS_PORT)))
            threading.Thread(target=self.serve, args=(c, s), daemon=True).start()

    def serve(self, c, s):
        raise NotImplementedError

    def close(self):
        self.lsock.close()


def wait_for(predicate, timeout, what, interval=0.05):
    """Calls predicate until it returns something truthy; fails the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = predicate()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def llm_answer(prompt, messages=1):
    """What the fake LLM answers to a last user message (directives removed, whitespace trimmed)."""
    text = re.sub(r"\[\[(?:reply|latency|status|hang|malformed|fail-times|retry-after)(?:=[^\]]*)?\]\]", "", prompt)
    return f"echo: {text.strip()} [messages={messages}]"


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-case name -> value (last one wins)
        self.body = body

    def json(self):
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError as e:
            raise AssertionError(f"body is not JSON ({e}): {self.body[:500]!r}") from None

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:300]!r}>"


def http_request(port, method, path, body=None, headers=None, timeout=30.0):
    """One HTTP/1.1 request on a fresh connection. path is sent as is (raw bytes allowed via
    percent-encoding); body may be bytes, str or a dict (sent as JSON)."""
    hdrs = dict(headers or {})
    if isinstance(body, dict) or isinstance(body, list):
        body = json.dumps(body).encode("utf-8")
        hdrs.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode("utf-8")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def assert_error(resp, status, code=None):
    """resp has the given status and an OpenAI-shaped error body {"error": {message, type, code}}."""
    assert resp.status == status, f"expected {status}, got {resp!r}"
    ctype = resp.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"error without a JSON content type: {resp!r}"
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"not an OpenAI error body: {body!r}"
    err = body["error"]
    for field in ("message", "type", "code"):
        assert field in err, f"error object lacks {field!r}: {body!r}"
    assert isinstance(err["message"], str) and err["message"].strip(), f"empty error message: {body!r}"
    assert isinstance(err["type"], str) and err["type"], f"empty error type: {body!r}"
    if code is not None:
        assert err["code"] == code, f"expected code {code!r}: {body!r}"
    return err


# ------------------------------------------------------------------------------------------------
# Redis: a tiny RESP client
# ------------------------------------------------------------------------------------------------


class Redis:
    def __init__(self, port=REDIS_PORT, host="127.0.0.1"):
        self.addr = (host, port)

    def command(self, *args):
        with socket.create_connection(self.addr, timeout=10) as s:
            out = [b"*%d\r\n" % len(args)]
            for a in args:
                a = a if isinstance(a, bytes) else str(a).encode("utf-8")
                out.append(b"$%d\r\n%s\r\n" % (len(a), a))
            s.sendall(b"".join(out))
            f = s.makefile("rb")
            return self._read(f)

    def _read(self, f):
        line = f.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)[:-2]
            return data
        if kind == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read(f) for _ in range(n)]
        raise RuntimeError(f"unexpected RESP line {line!r}")

    def hgetall(self, key):
        flat = self.command("HGETALL", key)
        return {flat[i].decode("utf-8"): flat[i + 1].decode("utf-8") for i in range(0, len(flat), 2)}

    def pipeline(self, commands, chunk=500):
        """Several commands, chunk at a time on one connection each; returns their replies in order (a
        Redis error reply is returned as a RuntimeError object, not raised)."""
        replies = []
        for i in range(0, len(commands), chunk):
            part = commands[i:i + chunk]
            with socket.create_connection(self.addr, timeout=30) as s:
                out = []
                for args in part:
                    out.append(b"*%d\r\n" % len(args))
                    for a in args:
                        a = a if isinstance(a, bytes) else str(a).encode("utf-8")
                        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
                s.sendall(b"".join(out))
                f = s.makefile("rb")
                for _ in part:
                    try:
                        replies.append(self._read(f))
                    except RuntimeError as e:
                        replies.append(e)
        return replies

    def conversations(self, conv_ids):
        """{id: hash} of many conversations at once (pipelined HGETALL)."""
        conv_ids = list(conv_ids)
        out = {}
        for cid, flat in zip(conv_ids, self.pipeline([("HGETALL", f"asyncllm:conv:{c}") for c in conv_ids])):
            if isinstance(flat, Exception):
                raise flat
            out[cid] = {flat[i].decode("utf-8"): flat[i + 1].decode("utf-8") for i in range(0, len(flat), 2)}
        return out

    def conversation(self, conv_id):
        return self.hgetall(f"asyncllm:conv:{conv_id}")


@pytest.fixture(scope="session")
def redis():
    r = Redis()
    try:
        assert r.command("PING") == "PONG"
    except OSError as e:
        pytest.exit(f"redis-server not reachable on 127.0.0.1:{REDIS_PORT} ({e}); run scripts/e2e.sh or scripts/stack.sh up", 3)
    return r


# ------------------------------------------------------------------------------------------------
# Kafka: read topics with kcat
# ------------------------------------------------------------------------------------------------


class Kafka:
    bootstrap = KAFKA_BOOTSTRAP

    def read(self, topic, timeout=30):
        """Every message of topic, from the beginning, as dicts {partition, offset, key, payload
        (str or None), value (parsed JSON or None)}."""
        cmd = ["kcat", "-b", self.bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-J", "-q",
               "-X", "fetch.wait.max.ms=10"]
        deadline = time.monotonic() + 10
        while True:
            p = subprocess.run(cmd, capture_output=True, timeout=timeout)
            if p.returncode == 0:
                break
            # A topic created a moment ago may not be in the broker's metadata yet: retry briefly.
            if b"Unknown topic" not in p.stderr or time.monotonic() >= deadline:
                raise AssertionError(f"kcat failed ({p.returncode}) on {topic}: {p.stderr.decode(errors='replace')}")
            time.sleep(0.2)
        out = []
        for line in p.stdout.decode("utf-8").splitlines():
            if not line.strip():
                continue
            m = json.loads(line)
            payload = m.get("payload")
            try:
                value = json.loads(payload) if payload is not None else None
            except ValueError:
                value = None
            hdrs = m.get("headers") or []
            out.append({"partition": m["partition"], "offset": m["offset"], "key": m.get("key"),
                        "payload": payload, "value": value,
                        "headers": {hdrs[i]: hdrs[i + 1] for i in range(0, len(hdrs) - 1, 2)}})
        return out

    def count(self, topic):
        return len(self.read(topic))

    def produce(self, topic, messages, timeout=60):
        """Produces (key, value) pairs (value a str or a dict sent as JSON) with kcat, acks=all, keys
        spread by murmur2 as Java clients (and asyncllm's API) do."""
        lines = []
        for key, value in messages:
            v = value if isinstance(value, str) else json.dumps(value)
            assert "\t" not in key and "\n" not in key + v, "kcat's line format: no tab in keys, no newline"
            lines.append(f"{key}\t{v}")
        cmd = ["kcat", "-b", self.bootstrap, "-P", "-t", topic, "-K", "\t", "-z", "none",
               "-X", "partitioner=murmur2_random", "-X", "acks=all", "-X", "linger.ms=5"]
        p = subprocess.run(cmd, input=("\n".join(lines) + "\n").encode("utf-8"), capture_output=True, timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"kcat produce to {topic} failed ({p.returncode}): {p.stderr.decode(errors='replace')}")

    def wait_for_key(self, topic, key, timeout=COMPLETE_TIMEOUT, n=1):
        """The messages with this key once there are at least n of them."""
        return wait_for(lambda: (lambda ms: ms if len(ms) >= n else None)([m for m in self.read(topic) if m["key"] == key]),
                        timeout, f"{n} message(s) keyed {key} on {topic}", interval=0.2)


@pytest.fixture(scope="session")
def kafka():
    k = Kafka()
    p = subprocess.run(["kcat", "-b", k.bootstrap, "-L", "-m", "5"], capture_output=True)
    if p.returncode != 0:
        pytest.exit(f"Kafka not reachable on {k.bootstrap}: {p.stderr.decode(errors='replace')}; run scripts/e2e.sh", 3)
    return k


def stack(*args, check=True):
    """Runs scripts/stack.sh with the stack's environment (inherited)."""
    p = subprocess.run([str(STACK_SH), *args], capture_output=True, text=True, timeout=180)
    if check and p.returncode != 0:
        raise AssertionError(f"stack.sh {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def stack_pid(name):
    """The pid of the stack's "kafka" or "redis" (scripts/stack.sh's pid file)."""
    d = Path(os.environ.get("ASYNCLLM_STACK_DIR") or (REPO / ".stack"))
    return int((d / "run" / f"{name}.pid").read_text().strip())


def _all_threads_stopped(pid):
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # a thread that has just exited
            continue
        if stat[stat.rindex(")") + 2] != "T":
            return False
    return True


@contextlib.contextmanager
def paused(name):
    """The stack's "kafka" or "redis" stopped with SIGSTOP for the duration of the block, continued with SIGCONT
    whatever happens. The block starts only once every thread of the process has stopped: kill() returns as soon
    as the signal is queued, and Linux stops a process' threads only after one of them has taken the signal, so
    the others run on meanwhile (measured on the broker: up to some 20 ms for its ~100 threads, longer on a busy
    machine). A request sent right after kill() could still be served (a produce acknowledged: the 202 that made
    test_z_broker_down flaky)."""
    pid = stack_pid(name)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _all_threads_stopped(pid), 10, f"every thread of {name} (pid {pid}) to stop", interval=0.002)
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


_LIVE = []  # every Proc started, for the safety net below


@atexit.register
def _kill_leftovers():
    """If pytest dies without running the fixtures' teardown, leave no process behind."""
    for p in _LIVE:
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait()


class Proc:
    """A child process logging to a file, checked for sanitizer reports and its exit status."""

    def __init__(self, name, argv, log_path, env=None, sanitized=True):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.sanitized = sanitized
        self.killed = False  # SIGKILLed on purpose: no exit-status or leak check
        self.stopped = False
        self.returncode = None
        self._log = open(self.log_path, "ab")
        # The ASYNCLLM_* (and OPENAI_API_KEY) of the caller's shell must not change what is tested.
        full_env = {k: v for k, v in os.environ.items()
                    if not (k.startswith("ASYNCLLM_") and k != "ASYNCLLM_STACK_DIR") and k != "OPENAI_API_KEY"}
        full_env.update(SAN_ENV)
        full_env.update(env or {})
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=full_env, cwd=str(REPO), start_new_session=True)
        self.pid = self.popen.pid
        _LIVE.append(self)

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self):
        return self.popen.poll() is None

    def tail(self, n=60):
        return "\n".join(self.log().splitlines()[-n:])

    def sanitizer_report(self):
        text = self.log()
        for m in SANITIZER_MARKERS:
            if m in text:
                i = text.index(m)
                return text[max(0, i - 500): i + 4000]
        return None

    def kill(self):
        """SIGKILL, on purpose (the kill test)."""
        self.killed = True
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=STOP_TIMEOUT)
        self._log.close()

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM and wait; returns a list of problems (empty if the process ended cleanly)."""
        problems = []
        if self.stopped or self.killed:
            return problems
        self.stopped = True
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.name} (pid {self.pid}) still running {timeout:.0f} s after SIGTERM; killed")
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait(timeout=10)
        self.returncode = self.popen.returncode
        self._log.close()
        if self.returncode != 0:
            problems.append(f"{self.name} (pid {self.pid}) exited with status {self.returncode}")
        if self.sanitized:
            rep = self.sanitizer_report()
            if rep:
                problems.append(f"{self.name}: sanitizer report in {self.log_path}:\n{rep}")
        if problems:
            problems.append(f"--- last lines of {self.log_path} ---\n{self.tail()}")
        return problems

    def check_running(self):
        """Problems of a process that should still be running (unexpected exit, sanitizer report)."""
        if self.stopped or self.killed:
            return []
        problems = []
        if not self.alive():
            problems.append(f"{self.name} (pid {self.pid}) exited unexpectedly with status {self.popen.returncode}")
        if self.sanitized and self.sanitizer_report():
            problems.append(f"{self.name}: sanitizer report in {self.log_path}:\n{self.sanitizer_report()}")
        if problems:
            problems.append(f"--- last lines of {self.log_path} ---\n{self.tail()}")
        return problems


class FakeLLM:
    def __init__(self, tmp_dir, extra_args=()):
        self.port = free_port()
        self.log_path = Path(tmp_dir) / "fakellm-requests.jsonl"
        self.log_path.touch()
        self.proc = Proc("fakellm", [FAKELLM_BIN, "--port", self.port, "--log", self.log_path, *extra_args],
                         Path(tmp_dir) / "fakellm.out", sanitized=False)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        wait_for(lambda: self._healthy(), START_TIMEOUT, f"fakellm on port {self.port}")

    def _healthy(self):
        if not self.proc.alive():
            pytest.fail(f"fakellm exited at start-up:\n{self.proc.log()}")
        return http_request(self.port, "GET", "/healthz", timeout=2).status == 200

    def requests(self):
        """The chat requests received so far: dicts {ts_ms, model, messages, stream, max_tokens}."""
        out = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
        return out

    def requests_with_last_user(self, text):
        return [r for r in self.requests() if r["messages"] and r["messages"][-1].get("content") == text]

    def stats(self):
        """GET /stats: {requests, completed, hangs, malformed, aborted, in_flight, status: {code: n}}."""
        r = http_request(self.port, "GET", "/stats", timeout=10)
        assert r.status == 200, r
        return r.json()


class AsyncLLM:
    """A running asyncllm process (api, worker or all)."""

    def __init__(self, proc, role, http_port, settings):
        self.proc = proc
        self.role = role
        self.port = http_port
        self.settings = settings

    # HTTP -------------------------------------------------------------------------------------
    def request(self, method, path, body=None, headers=None, timeout=30.0):
        assert self.port is not None, "this role has no HTTP API"
        return http_request(self.port, method, path, body=body, headers=headers, timeout=timeout)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def submit_get(self, prompt, conversation_id=None):
        q = {"prompt": prompt}
        if conversation_id is not None:
            q["conversationId"] = conversation_id
        return self.get("/answer?" + urllib.parse.urlencode(q, quote_via=urllib.parse.quote))

    def submit_post(self, prompt, conversation_id=None):
        body = {"prompt": prompt}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        return self.post("/answer", body)

    def submit(self, prompt, conversation_id=None, method="POST"):
        """Submits and asserts 202; returns the body. A 503 is retried after its Retry-After, as a client
        should: the API answers 503 whenever it cannot prove the prompt is in Kafka (for instance a delivery
        report without an offset, which librdkafka 2.0.2 gives for "implicitly acknowledged" messages of a
        freshly created partition under load)."""
        for _ in range(5):
            r = (self.submit_post if method == "POST" else self.submit_get)(prompt, conversation_id)
            if r.status != 503:
                break
            time.sleep(float(r.headers.get("retry-after", "1") or 1))
        assert r.status == 202, f"submit {prompt!r} ({method}): expected 202, got {r!r}"
        body = r.json()
        if conversation_id is not None:
            assert body.get("conversation_id") == conversation_id, body
        return body

    def poll(self, conversation_id):
        return self.get("/polling?" + urllib.parse.urlencode({"conversationId": conversation_id}))

    def metrics(self, timeout=10.0):
        """The worker's GET /metrics (worker and all roles) as {name or name{labels}: value}."""
        port = self.settings.get("metrics-port")
        assert port, f"{self.proc.name} has no metrics port"
        r = http_request(int(port), "GET", "/metrics", timeout=timeout)
        assert r.status == 200, r
        out = {}
        for line in r.body.decode("utf-8").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_done(self, conversation_id, timeout=COMPLETE_TIMEOUT, user_prompt=None):
        """Polls until the conversation's latest turn is complete or failed (and, if user_prompt is
        given, until the latest turn is the one with that prompt); returns the /polling body."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.poll(conversation_id)
            assert r.status == 200, f"/polling {conversation_id}: {r!r}"
            b = r.json()
            if (user_prompt is None or b.get("user_prompt") == user_prompt) and b.get("status") in ("complete", "failed"):
                return b
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for conversation {conversation_id} to complete"
                            f"{' turn ' + repr(user_prompt) if user_prompt else ''}; last /polling: {b!r}", pytrace=False)
            time.sleep(0.05)

    def wait_all_done(self, conversation_ids, timeout=COMPLETE_TIMEOUT, kafka=None, topic=None):
        """Polls every conversation until its latest turn is complete or failed; returns {id: body}.
        On timeout fails with the ids still pending (and their partitions, if kafka and topic are given)."""
        pending = list(conversation_ids)
        bodies = {}
        deadline = time.monotonic() + timeout
        while pending:
            still = []
            for cid in pending:
                r = self.poll(cid)
                assert r.status == 200, f"/polling {cid}: {r!r}"
                b = r.json()
                if b.get("status") in ("complete", "failed"):
                    bodies[cid] = b
                else:
                    still.append(cid)
            pending = still
            if not pending:
                break
            if time.monotonic() >= deadline:
                where = ""
                if kafka is not None and topic is not None:
                    parts = {}
                    for m in kafka.read(topic):
                        if m["key"] in pending:
                            parts.setdefault(m["partition"], 0)
                            parts[m["partition"]] += 1
                    where = f"; pending prompts per partition: {dict(sorted(parts.items()))}"
                pytest.fail(f"{len(pending)} of {len(bodies) + len(pending)} conversations still pending after "
                            f"{timeout:.0f} s (e.g. {pending[:3]}){where}", pytrace=False)
            time.sleep(0.1)
        return bodies


# The interested parties of test_parties.py (asyncllm moderate, exec, tail): started like webhooks.
PARTY_ROLES = ("moderate", "exec", "tail")


class Cluster:
    """Per-module names and the processes the module started."""

    def __init__(self, module_name, tmp_dir, fakellm_factory):
        base = re.sub(r"[^a-z0-9]+", "_", module_name.lower()).strip("_")[-24:]
        tag = uuid.uuid4().hex[:8]
        self.topic_prompts = f"e2e_{base}_{tag}_prompts"
        self.topic_responses = f"e2e_{base}_{tag}_responses"
        self.topic_dlq = f"e2e_{base}_{tag}_dlq"
        self.group_id = f"e2e_{base}_{tag}_workers"
        self.tmp_dir = Path(tmp_dir)
        self.procs = []
        self._fakellm_factory = fakellm_factory
        self._fakellm = None
        self._n = 0

    @property
    def fakellm(self):
        if self._fakellm is None:
            self._fakellm = self._fakellm_factory()
        return self._fakellm

    def start(self, role, *extra, wait=True, env=None, **settings):
        """Starts `asyncllm ROLE` with this module's topics and group, the fake LLM, the stack's Kafka
        and Redis, and a free HTTP port (api/all). settings are --name=value flags (underscores become
        dashes) that override the defaults; extra are raw arguments. Waits for readiness."""
        assert role in ("api", "worker", "all", "webhooks") + PARTY_ROLES
        self._n += 1
        http_port = free_port() if role in ("api", "all") else None
        opts = {
            "kafka-brokers": KAFKA_BOOTSTRAP,
            "redis-host": "127.0.0.1",
            "redis-port": REDIS_PORT,
            "topic-prompts": self.topic_prompts,
            "topic-responses": self.topic_responses,
            "topic-dlq": self.topic_dlq,
            "group-id": self.group_id,
            "partitions": 3,
            "llm-base-url": self.fakellm.base_url if role != "api" else "http://127.0.0.1:9/v1",
            "llm-model": "fake",
            "shutdown-grace-ms": 2000,
            "commit-interval-ms": 200,
            "log-level": "info",
        }
        if role in ("worker", "all", "webhooks") + PARTY_ROLES and role != "tail":
            opts["metrics-port"] = free_port()  # not the fixed default: other stacks may run here
        if http_port is not None:
            opts["http-port"] = http_port
            opts["http-addr"] = "127.0.0.1"
        for k, v in settings.items():
            opts[k.replace("_", "-")] = v
        argv = [ASYNCLLM_BIN, role] + [f"--{k}={v}" for k, v in opts.items()] + list(extra)
        log_path = self.tmp_dir / f"asyncllm-{self._n:02d}-{role}.log"
        proc = Proc(f"asyncllm {role} #{self._n}", argv, log_path, env=env)
        node = AsyncLLM(proc, role, http_port, opts)
        self.procs.append(proc)
        if wait:
            self.wait_ready(node)
        return node

    def wait_ready(self, node, timeout=START_TIMEOUT):
        proc = node.proc

        def ready():
            if not proc.alive():
                pytest.fail(f"{proc.name} exited at start-up with status {proc.popen.returncode}:\n{proc.tail()}")
            if node.role in ("worker", "webhooks"):
                return "assigned" in proc.log()
            if node.role in PARTY_ROLES:  # tail assigns itself and says "following"
                return ("following" if node.role == "tail" else "assigned") in proc.log()
            r = http_request(node.port, "GET", "/readyz", timeout=2)
            if r.status != 200:
                return False
            if node.role == "all":
                return "assigned" in proc.log()
            return True

        wait_for(ready, timeout, f"{proc.name} to be ready (log {proc.log_path})", interval=0.1)

    def stop_all(self):
        problems = []
        # Stop in reverse order of start (workers after the API that feeds them is fine either way).
        for p in reversed(self.procs):
            problems += p.stop()
        if self._fakellm is not None:
            self._fakellm.proc.stop()
        return problems

    def check_running(self):
        problems = []
        for p in self.procs:
            problems += p.check_running()
        return problems


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory, kafka, redis):
    """The module's asyncllm processes: cluster.start("all") etc. Stopped with SIGTERM at the end of
    the module; the module's last test fails (teardown error) on a non-zero exit or a sanitizer
    report."""
    for b in (ASYNCLLM_BIN, FAKELLM_BIN):
        if not b.exists():
            pytest.exit(f"{b} not found: make build/asan/asyncllm build/fakellm", 3)
    tmp = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    fake_args = getattr(request.module, "FAKELLM_ARGS", ())
    c = Cluster(request.module.__name__, tmp, lambda: FakeLLM(tmp, fake_args))
    yield c
    problems = c.stop_all()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _processes_healthy(request):
    """After each test: every process the module started and did not stop is still running and has
    no sanitizer report."""
    yield
    if "cluster" in request.fixturenames:
        c = request.getfixturevalue("cluster")
        problems = c.check_running()
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def fakellm(cluster):
    return cluster.fakellm
