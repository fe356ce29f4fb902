"""Redis loses its script cache while the store's connection stays up (src/store/store.c, NOSCRIPT).

The store loads its Lua scripts once per connection (SCRIPT LOAD) and runs them by their SHA-1 (EVALSHA). An
operator's SCRIPT FLUSH (or a failover to a replica that never saw them) empties Redis' script cache without
closing any connection: every EVALSHA then answers -NOSCRIPT. The store used to pass that on as a failure, so
every follow-up was answered 503 and every step of the worker (BEGIN, FINISH) failed, for as long as the
connection lasted. Now an operation answered NOSCRIPT is written again after the scripts are loaded again,
transparently to its caller, and at most once (a second NOSCRIPT is a failure, as before).

A new conversation is written without a script (HSET, EXPIRE), its follow-ups with one (EVALSHA), and the worker
runs scripts only: the flush before a new conversation reaches the worker first, the one before a follow-up
the API first."""

import subprocess

from conftest import REDIS_PORT, llm_answer, unique

RETRIED = "NOSCRIPT"


def script_flush():
    p = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(REDIS_PORT), "SCRIPT", "FLUSH"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == "OK", f"redis-cli SCRIPT FLUSH: {p.returncode} {p.stdout} {p.stderr}"


def test_the_scripts_are_loaded_again_after_script_flush(cluster, redis):
    api = cluster.start("api")
    worker = cluster.start("worker")

    p0 = unique("before the flush")
    cid = api.submit(p0)["conversation_id"]
    assert api.wait_done(cid)["llm_response"] == llm_answer(p0)
    assert RETRIED not in api.proc.log() + worker.proc.log()

    # The worker meets the empty cache first: the API writes a new conversation with HSET, EXPIRE.
    script_flush()
    p1 = unique("new conversation after a flush")
    cid1 = api.submit(p1)["conversation_id"]
    b = api.wait_done(cid1, timeout=30)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p1)), b
    assert RETRIED in worker.proc.log(), "the worker did not meet NOSCRIPT: the test proves nothing"

    # The API meets it first: a follow-up runs the submit script. Answered 202 (not 503) at the first try.
    script_flush()
    p2 = unique("follow-up after a flush")
    r = api.submit_post(p2, cid)
    assert r.status == 202, f"follow-up after SCRIPT FLUSH: {r!r}"
    b = api.wait_done(cid, timeout=30, user_prompt=p2)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p2, messages=3)), b
    assert RETRIED in api.proc.log(), "the API did not meet NOSCRIPT: the test proves nothing"

    # Both go on working (their connections were never dropped).
    p3 = unique("after")
    api.submit(p3, conversation_id=cid1)
    b = api.wait_done(cid1, timeout=30, user_prompt=p3)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p3, messages=3)), b
    assert "disconnected" not in api.proc.log() + worker.proc.log()
