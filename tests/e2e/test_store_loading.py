"""The store's connection to a Redis that is still loading its data set (src/store/store.c, script_load_cb).

After a restart, Redis accepts connections while it loads its data set and answers every command with
-LOADING until it is done. The store loads its Lua scripts (SCRIPT LOAD) on every new connection and runs
them by their SHA-1 (EVALSHA). It used to take the connection as ready as soon as it was made: connected
while Redis was loading, the scripts were refused, a rejection written meanwhile (store_reject) was
answered with an error and lost (test_z_broker_down's "rejection not written within 20 s" when its restarted
Redis had a large AOF to load), and once Redis was loaded every script call answered NOSCRIPT: every
submit 503, for as long as the connection lasted. Now a connection is ready once its scripts are loaded;
one whose scripts were refused is made again, with the growing reconnection delay.

The test runs its own redis-server (not the stack's) on a data set it writes, loaded slowly (key-load-delay)
so that the API certainly connects while Redis loads.

Since a connection is no longer ready when it is made, it has a deadline of its own (--redis-timeout-ms, the
timeout check's timer): a server that accepts the connection and answers nothing is left for a new
connection, not waited for forever."""

import socket
import threading
import time

import pytest

from conftest import Proc, Redis, extra_port, unique, wait_for

KEYS = 2500
KEY_LOAD_DELAY_US = 2000  # 2,500 keys: about 5 s of loading


def _state(r):
    """"up", "loading" or "down"."""
    try:
        r.command("PING")
        return "up"
    except RuntimeError as e:
        if "LOADING" in str(e):
            return "loading"
        raise
    except OSError:
        return "down"


@pytest.fixture
def loading_redis(tmp_path):
    """A redis-server that has just started loading KEYS keys, slowly; stopped at the end."""
    port = extra_port()
    data = tmp_path / "redis"
    data.mkdir()
    base = ["redis-server", "--bind", "127.0.0.1", "--port", port, "--dir", data, "--save", "", "--appendonly", "no"]
    r = Redis(port=port)
    procs = []
    try:
        procs.append(Proc("redis-server (fill)", base, tmp_path / "redis-fill.log", sanitized=False))
        wait_for(lambda: _state(r) == "up", 20, f"redis-server on port {port}")
        filler = "v" * 64
        r.pipeline([("SET", f"fill:{i}", filler) for i in range(KEYS)])
        assert r.command("SAVE") == "OK"
        assert not procs[0].stop(), procs[0].tail()
        procs.append(Proc("redis-server (loading)", base + ["--key-load-delay", KEY_LOAD_DELAY_US,
                                                            "--loading-process-events-interval-bytes", 1024],
                          tmp_path / "redis-loading.log", sanitized=False))
        wait_for(lambda: _state(r) == "loading", 20, f"redis-server on port {port} to answer LOADING")
        yield port, r
    finally:
        for p in procs:
            p.stop()


def test_a_connection_made_while_redis_loads_is_used_once_its_scripts_are_loaded(cluster, loading_redis):
    port, r = loading_redis
    api = cluster.start("api", wait=False, redis_port=port)

    # While Redis loads: not ready. A sample counts only if Redis was still loading after it was answered.
    samples = []
    while _state(r) == "loading":
        try:
            status = api.get("/readyz", timeout=5).status
        except OSError:  # not listening yet
            time.sleep(0.05)
            continue
        if _state(r) == "loading":
            samples.append(status)
        time.sleep(0.1)
    assert _state(r) == "up"
    assert "LOADING" in api.proc.log(), ("the API did not connect while Redis was loading (it started too late?): "
                                         "the test proves nothing\n" + api.proc.tail())
    assert samples and all(s == 503 for s in samples), f"/readyz while Redis was loading: {samples}"

    # Loaded: the store connects again, loads its scripts, and takes work (within the reconnection delay, 2 s
    # at most, plus slack). A new conversation is written without a script (HSET, EXPIRE); its follow-up runs
    # one (EVALSHA), as do a rejection and every step of the worker.
    deadline = time.monotonic() + 15
    cid = None
    while True:
        if cid is None:
            resp = api.submit_post(unique("after loading"))
            if resp.status == 202:
                cid = resp.json()["conversation_id"]
        if cid is not None:
            resp = api.submit_post(unique("follow-up after loading"), cid)
            if resp.status == 202:
                break
        if time.monotonic() >= deadline:
            errors = [ln for ln in api.proc.log().splitlines() if "redis" in ln and ("error" in ln or "warn" in ln)]
            pytest.fail(f"no submit accepted 15 s after Redis had loaded; last answer {resp!r}; the API's Redis "
                        "errors:\n" + "\n".join(errors[-8:]), pytrace=False)
        time.sleep(0.2)


def test_a_server_that_accepts_and_never_answers_is_left_for_a_new_connection(cluster):
    """Not Redis: a socket that accepts connections, reads nothing and answers nothing (a hung Redis' kernel,
    or a half-open connection). The store's connection is never ready, and is made again after
    --redis-timeout-ms, and again; /readyz says Redis is unavailable all along."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    conns, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except TimeoutError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        api = cluster.start("api", wait=False, redis_port=port, redis_timeout_ms=300)
        statuses = []

        def reconnected():
            try:
                statuses.append(api.get("/readyz", timeout=5).status)
            except OSError:  # not listening yet
                pass
            return api.proc.log().count("SCRIPT LOAD unanswered") >= 3

        wait_for(reconnected, 20, "the API to give up on its silent connection three times", interval=0.1)
        assert statuses and all(s == 503 for s in statuses), f"/readyz with a Redis that answers nothing: {statuses}"
        assert len(conns) >= 3, f"{len(conns)} connection(s) accepted"
    finally:
        stop.set()
        t.join(timeout=5)
        for c in conns:
            c.close()
        srv.close()
