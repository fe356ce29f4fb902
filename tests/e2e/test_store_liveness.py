"""The store's Redis timeout when Redis stops reading (src/store/store.c, check_cb; docs/STORE.md).

The API writes a follow-up prompt to Redis before producing it. Redis is stopped (SIGSTOP: the process is there,
its socket accepts connections and bytes until its buffers are full, nothing is answered) and big follow-ups
arrive:
far more bytes than the sockets between the API and Redis hold (about 4 MiB with Linux' defaults), so most of
them stay in hiredis' output buffer. The oldest written command goes unanswered, the timeout check drops the
connection and every submit is answered 503 within a few --redis-timeout-ms. A new conversation, written to
Redis and produced at the same time (src/http/submit.c, "Together"), is answered within the same bound too: 202,
since the broker has it.

The store used to give the oldest command a fresh timeout whenever the output buffer still held bytes ("our
loop was too busy to send them"), even when the socket had taken nothing since the last check: the
connection was never dropped, and the submits hung until the API's own --request-timeout-ms (a worker's
jobs forever)."""

import time
from concurrent.futures import ThreadPoolExecutor

from conftest import assert_error, paused, unique, wait_for

N = 64
PROMPT_BYTES = 256 * 1024  # 16 MiB in all: four times what the sockets took from a stopped Redis here
REDIS_TIMEOUT_MS = 500
# The API's own deadline, far above the bound: a 503 within the bound comes from the store's timeout.
REQUEST_TIMEOUT_MS = 60000
# Hang guard: a submit is written at once (the window is 512), and its connection is dropped one timeout
# after the oldest command was written. Generous for a sanitized build on a busy machine.
BOUND_S = 8.0


def test_big_prompts_while_redis_is_stopped_are_answered_503_within_the_timeout(cluster, redis):
    api = cluster.start("api", redis_timeout_ms=REDIS_TIMEOUT_MS, request_timeout_ms=REQUEST_TIMEOUT_MS,
                        conversation_ttl_s=120)  # commands Redis read before the drop run at SIGCONT
    tag = unique("big")
    filler = "x" * PROMPT_BYTES
    cid = api.submit(unique("first turn"))["conversation_id"]

    def submit(i):
        t0 = time.monotonic()
        body = {"prompt": f"{tag} {i} {filler}"}
        if i < N:
            body["conversation_id"] = cid
        try:
            r = api.post("/answer", body, timeout=BOUND_S + 4)
        except TimeoutError:
            r = None
        return r, time.monotonic() - t0

    with paused("redis"):
        with ThreadPoolExecutor(N + 1) as ex:
            results = list(ex.map(submit, range(N + 1)))
    new_conv, results = results[N], results[:N]

    hung = [i for i, (r, _) in enumerate(results) if r is None]
    assert not hung, (f"{len(hung)} of {N} submits unanswered after {BOUND_S + 4:.0f} s with Redis stopped (the "
                      f"connection was never dropped); --redis-timeout-ms={REDIS_TIMEOUT_MS}")
    for r, _ in results:
        err = assert_error(r, 503)
        assert "Redis" in err["message"], err
    slowest = max(e for _, e in results)
    assert slowest < BOUND_S, f"the slowest 503 took {slowest:.1f} s (--redis-timeout-ms={REDIS_TIMEOUT_MS})"
    assert "dropping the connection" in api.proc.log()
    r, elapsed = new_conv
    assert r is not None and r.status == 202 and elapsed < BOUND_S, (r, elapsed)

    # Redis continued: normal service again, on a new connection.
    wait_for(lambda: api.submit_post(unique("after")).status == 202, 30, "a submit to be accepted once Redis is back",
             interval=0.2)
    print(f"\nstore liveness: {N} submits of {PROMPT_BYTES // 1024} KiB with Redis stopped: all 503, the slowest "
          f"after {slowest:.2f} s (--redis-timeout-ms={REDIS_TIMEOUT_MS})")
