"""Long polling on the seed's route: GET /polling?conversationId=...&wait=N holds the request until the latest
turn's status changes or the wait ends (bounded by --poll-max-wait-s), without a thread per waiting client.

The API and the worker run as separate processes here, so that the API's thread count and memory are its own.
"""

import asyncio
import json
import os
import statistics
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import assert_error, llm_answer, unique, wait_for

POLL_MAX_WAIT_S = 5  # the main API's cap (the 1,000-poll API has its own, larger than their wait)
N_POLLS = 1000


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.start("api", poll_max_wait_s=POLL_MAX_WAIT_S)


@pytest.fixture(scope="module")
def worker(cluster, api):
    return cluster.start("worker")


def submit(api, prompt):
    r = api.post("/answer", {"prompt": prompt})
    assert r.status == 202, r
    return r.json()["conversation_id"]


def long_poll(api, cid, wait, timeout=120):
    """(response, seconds it took, Unix ms at return)."""
    t0 = time.monotonic()
    r = api.get("/polling?" + urllib.parse.urlencode({"conversationId": cid, "wait": wait}), timeout=timeout)
    return r, time.monotonic() - t0, time.time() * 1000


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return {"threads": int(out["Threads"]), "rss_kib": int(out["VmRSS"].split()[0])}


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


# ------------------------------------------------------------------------------------------------


def test_wait_is_capped_by_poll_max_wait(api, worker):
    cid = submit(api, unique("capped") + " [[latency=7000]]")
    r, took, _ = long_poll(api, cid, 30)
    print(f"wait=30 with --poll-max-wait-s={POLL_MAX_WAIT_S}: answered after {took:.2f} s")
    assert r.status == 200, r
    b = r.json()
    assert b["status"] == "pending" and b["conversation_id"] == cid, b
    assert POLL_MAX_WAIT_S - 0.5 <= took < POLL_MAX_WAIT_S + 5, f"answered after {took:.2f} s, not at the cap"


def test_bad_wait_is_400(api, worker):
    cid = submit(api, unique("bad wait"))
    for w in ("abc", "-1", "1.5", "", "5s"):
        r = api.get("/polling?" + urllib.parse.urlencode({"conversationId": cid, "wait": w}))
        assert_error(r, 400, "invalid_wait")
    # wait=0 answers at once, as without wait.
    r, took, _ = long_poll(api, cid, 0)
    assert r.status == 200 and took < 5, (r, took)
    # An unknown conversation is 404 at once, wait or not.
    r, took, _ = long_poll(api, "AAAAAAAAAAAAAAAAAAAAAA", 30)
    assert_error(r, 404)
    assert took < 5, took


def test_long_poll_returns_right_after_completion(api, worker, fakellm, redis):
    """The issue's bound: a long poll returns within a few milliseconds of completion. Asserted generously
    (well under a second); the measured gaps are printed."""
    latency_ms = 1500
    gaps, gaps_llm, waits = [], [], []
    for i in range(5):
        prompt = unique(f"lp{i}") + f" [[latency={latency_ms}]]"
        cid = submit(api, prompt)
        r, took, returned_ms = long_poll(api, cid, 30)
        assert r.status == 200, r
        b = r.json()
        assert (b["status"], b["llm_response"]) == ("complete", llm_answer(prompt)), b
        completed_ms = int(redis.conversation(cid)["t1.completed_at"])
        (req,) = fakellm.requests_with_last_user(prompt)
        gaps.append(returned_ms - completed_ms)
        gaps_llm.append(returned_ms - (req["ts_ms"] + latency_ms))
        waits.append(took)
    print(f"long poll return - Redis t1.completed_at (ms): {[round(g, 1) for g in gaps]} "
          f"(median {statistics.median(gaps):.1f}, max {max(gaps):.1f})")
    print(f"long poll return - fake LLM answer time (ms): {[round(g, 1) for g in gaps_llm]}")
    print(f"time each long poll was held (s): {[round(w, 2) for w in waits]}")
    # It really waited for the LLM (it was pending when it started)...
    assert min(waits) >= latency_ms / 1000 * 0.8, waits
    # ...and returned right after the turn was stored.
    assert max(gaps) < 1000, f"a long poll returned {max(gaps):.0f} ms after completion: {gaps}"


def test_the_api_listens_to_a_conversation_only_while_someone_waits(api, worker, redis):
    """Notifications go to the conversation's own channel (asyncllm:notify:<id>): the API subscribes to it
    when a client starts waiting and unsubscribes when the last one is answered, so that no process reads the
    changes of conversations nobody waits on. Two waiters on one conversation share one subscription."""
    def subscribers(cid):
        return redis.command("PUBSUB", "NUMSUB", f"asyncllm:notify:{cid}")[1]

    prompt = unique("subscribed while waited on") + " [[latency=2500]]"
    cid = submit(api, prompt)
    assert subscribers(cid) == 0
    with ThreadPoolExecutor(2) as ex:
        polls = [ex.submit(long_poll, api, cid, 30) for _ in range(2)]
        wait_for(lambda: subscribers(cid) == 1, 10, "the API to subscribe to the conversation's channel")
        for f in polls:
            r, took, _ = f.result()
            assert r.status == 200 and r.json()["status"] == "complete", r
    wait_for(lambda: subscribers(cid) == 0, 10, "the API to unsubscribe once nobody waits")
    # and again: a new wait on the same conversation subscribes again (an answered turn returns at once)
    cid2 = submit(api, unique("second subscription") + " [[latency=1500]]")
    r, _, _ = long_poll(api, cid2, 30)
    assert r.json()["status"] == "complete", r
    wait_for(lambda: subscribers(cid2) == 0, 10, "the API to unsubscribe once nobody waits")


def test_wait_on_finished_conversation_returns_at_once(api, worker):
    prompt = unique("done already")
    cid = submit(api, prompt)
    api.wait_done(cid)
    r, took, _ = long_poll(api, cid, 30)
    print(f"wait=30 on a finished conversation answered in {1000 * took:.1f} ms")
    assert r.status == 200 and r.json()["status"] == "complete", r
    assert took < POLL_MAX_WAIT_S - 1, f"held {took:.2f} s although the conversation was finished"


def test_long_poll_sees_a_new_turn(api, worker):
    """A long poll on a finished conversation returns at once; one started before a follow-up's completion
    returns when that turn completes (not with the previous turn's answer)."""
    p1, p2 = unique("first"), unique("second") + " [[latency=1000]]"
    cid = submit(api, p1)
    api.wait_done(cid)
    r = api.post("/answer", {"prompt": p2, "conversation_id": cid})
    assert r.status == 202, r
    r, took, _ = long_poll(api, cid, 30)
    b = r.json()
    assert (b["turn"], b["status"], b["llm_response"]) == (2, "complete", llm_answer(p2, messages=3)), b


def test_long_poll_on_a_cancelled_turn_does_not_hang(api, worker):
    """A turn cancelled through the Responses API (its id is resp_<conversation>_<turn>) is final: a long poll
    waiting on it returns when it is cancelled, and one started afterwards returns at once, neither saying
    `pending` (the turn will never complete)."""
    cid = submit(api, unique("to cancel") + " [[latency=3000]]")
    box = {}

    def poll():
        box["res"] = long_poll(api, cid, 30)
        box["returned"] = time.monotonic()

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    c = api.post(f"/v1/responses/resp_{cid}_1/cancel")
    cancelled_at = time.monotonic()
    assert c.status == 200 and c.json()["status"] == "cancelled", c
    t.join(60)
    b = box["res"][0].json()
    held = box["returned"] - cancelled_at
    r2, took2, _ = long_poll(api, cid, 30)
    b2 = r2.json()
    print(f"poll waiting during the cancel returned {held:.2f} s after it: {b}")
    print(f"poll started after the cancel took {took2:.2f} s: {b2}")
    problems = []
    if held > 2 or b["status"] == "pending":
        problems.append(f"the long poll waiting on the turn returned {held:.2f} s after the cancel with status "
                        f"{b['status']!r} (state {b['state']!r})")
    if took2 > 2 or b2["status"] == "pending":
        problems.append(f"a long poll started after the cancel was held {took2:.2f} s and answered status "
                        f"{b2['status']!r} (state {b2['state']!r})")
    assert not problems, "; ".join(problems)


# ------------------------------------------------------------------------------------------------
# 1,000 concurrent long polls
# ------------------------------------------------------------------------------------------------


def test_1000_concurrent_long_polls_cost_no_thread_each(cluster, worker):
    """1,000 long polls held at once on pending conversations: the API process's thread count does not change,
    and every poll is answered when its prompt completes. The prompts sit in a topic that no worker reads
    until every poll is waiting; then a worker is started for it."""
    tag = unique("bulk").replace("-", "_")
    topic, group = f"{cluster.topic_prompts}_{tag}", f"{cluster.group_id}_{tag}"
    api = cluster.start("api", topic_prompts=topic, poll_max_wait_s=120)
    pid = api.proc.pid

    prompts = [f"{tag} poll {i}" for i in range(N_POLLS)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as ex:
        cids = list(ex.map(lambda p: submit(api, p), prompts))
    print(f"submitted {N_POLLS} prompts in {time.monotonic() - t0:.1f} s")
    assert len(set(cids)) == N_POLLS

    # The submits' connections are closed by now on our side; let the API notice them all before counting.
    def settled():
        a = open_fds(pid)
        time.sleep(0.3)
        return a == open_fds(pid)

    wait_for(settled, 30, "the API's open descriptors to settle")
    before = proc_status(pid)
    fds_before = open_fds(pid)

    results = [None] * N_POLLS
    all_sent = threading.Event()
    failures = []

    async def one(i, cid):
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(f"GET /polling?conversationId={cid}&wait=100 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Connection: close\r\n\r\n".encode())
        await writer.drain()
        return reader, writer

    async def finish(i, reader, writer):
        data = await reader.read()
        results[i] = (time.monotonic(), data)
        writer.close()

    async def main():
        conns = await asyncio.gather(*(one(i, c) for i, c in enumerate(cids)))
        all_sent.set()
        await asyncio.wait_for(asyncio.gather(*(finish(i, r, w) for i, (r, w) in enumerate(conns))), 180)

    def runner():
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failures.append(e)
            all_sent.set()

    th = threading.Thread(target=runner, daemon=True)
    th.start()
    assert all_sent.wait(60) and not failures, failures
    # Let the API read every request and register its waiter.
    wait_for(lambda: open_fds(pid) >= fds_before + N_POLLS, 30, f"the API to hold {N_POLLS} connections")
    time.sleep(1.0)
    during = proc_status(pid)
    fds_during = open_fds(pid)
    answered_early = sum(1 for r in results if r is not None)
    print(f"API pid {pid}: threads {before['threads']} before, {during['threads']} with {N_POLLS} long polls held; "
          f"RSS {before['rss_kib'] / 1024:.1f} MiB before, {during['rss_kib'] / 1024:.1f} MiB during "
          f"(+{(during['rss_kib'] - before['rss_kib']) / N_POLLS:.1f} KiB per poll, ASan build); "
          f"open fds {fds_before} -> {fds_during}")
    assert answered_early == 0, f"{answered_early} polls were answered while their prompts were pending"

    # Now let them complete.
    t_worker = time.monotonic()
    cluster.start("worker", topic_prompts=topic, group_id=group)
    th.join(180)
    assert not th.is_alive(), f"{sum(1 for r in results if r is None)} polls still unanswered"
    assert not failures, failures
    last = max(t for t, _ in results)
    print(f"all {N_POLLS} polls answered {last - t_worker:.1f} s after the worker was started")
    bad = []
    for i, (_, data) in enumerate(results):
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            b = json.loads(body)
        except ValueError:
            bad.append((i, data[:200]))
            continue
        if not head.startswith(b"HTTP/1.1 200") or b.get("status") != "complete" or \
                b.get("llm_response") != llm_answer(prompts[i]) or b.get("conversation_id") != cids[i]:
            bad.append((i, data[:300]))
    assert not bad, f"{len(bad)} polls got a wrong answer, e.g. {bad[:3]}"
    after = proc_status(pid)
    print(f"threads after: {after['threads']}, RSS after: {after['rss_kib'] / 1024:.1f} MiB")
    assert during["threads"] == before["threads"], (
        f"the API's thread count went from {before['threads']} to {during['threads']} with {N_POLLS} long polls")
    # The connections were really held by the API process itself while waiting.
    assert fds_during >= fds_before + N_POLLS, (fds_before, fds_during)
