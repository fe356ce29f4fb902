"""The broker stops: /answer answers 503 with Retry-After (never 202), /readyz 503; the broker comes
back: normal service. Runs last (it stops the stack's Kafka); the broker is started again whatever
happens."""

import contextlib
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Proc, Redis, assert_error, extra_port, llm_answer, paused, stack, unique, wait_for

PRODUCE_TIMEOUT_MS = 3000
# The worker's consumer-group session timeout is 10 s (src/kafka/kafka.c): an outage longer than that
# always makes the group rebalance when the broker is back, which the worker must survive.
MIN_OUTAGE_S = 12


@pytest.fixture(scope="module")
def api(cluster):
    return cluster.start("api", produce_timeout_ms=PRODUCE_TIMEOUT_MS)


@pytest.fixture(scope="module")
def worker(cluster):
    return cluster.start("worker")


@contextlib.contextmanager
def broker_stopped(api, min_outage_s=0):
    """Kafka stopped for the duration of the block (at least min_outage_s), started again (and ready)
    whatever happens."""
    stack("kafka-stop")
    t0 = time.monotonic()
    try:
        yield
        time.sleep(max(0.0, min_outage_s - (time.monotonic() - t0)))
    finally:
        stack("kafka-start")
        wait_for(lambda: api.get("/readyz").status == 200, 60, "/readyz to answer 200 after the broker restart",
                 interval=0.2)


def test_503_not_202_while_the_broker_is_down_then_normal_service(api, worker, kafka, cluster):
    # Normal service first.
    p0 = unique("before")
    cid0 = api.submit(p0)["conversation_id"]
    assert api.wait_done(cid0)["llm_response"] == llm_answer(p0)

    rejected = []
    with broker_stopped(api, MIN_OUTAGE_S):
        for i, method in enumerate(["POST", "GET", "POST"]):
            p = unique(f"during-{i}")
            t0 = time.monotonic()
            r = api.submit_post(p) if method == "POST" else api.submit_get(p)
            elapsed = time.monotonic() - t0
            assert r.status != 202, f"202 for a prompt that cannot be in Kafka (broker stopped): {r!r}"
            assert_error(r, 503)
            ra = r.headers.get("retry-after")
            assert ra is not None and ra.strip().isdigit(), f"503 without Retry-After seconds: {r!r}"
            # Bounded by the produce timeout (plus slack for a slow sanitized build): a hang guard.
            assert elapsed < PRODUCE_TIMEOUT_MS / 1000 + 10, f"503 took {elapsed:.1f} s"
            rejected.append(p)

        # A follow-up to an existing conversation is refused the same way.
        assert_error(api.submit_post(unique("during-followup"), conversation_id=cid0), 503)

        # /polling needs Redis only.
        r = api.poll(cid0)
        assert r.status == 200 and r.json()["llm_response"] == llm_answer(p0), r

    # Service is back: a submit is accepted (retried while the producer reconnects) and completes.
    p1 = unique("after")

    def accepted():
        r = api.submit_post(p1)
        if r.status == 503:
            return None
        assert r.status == 202, r
        return r.json()

    cid1 = wait_for(accepted, 60, "a submit to be accepted after the broker restart", interval=0.5)["conversation_id"]
    b = api.wait_done(cid1, timeout=45)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p1)), b
    # And a follow-up on the conversation from before the outage.
    p2 = unique("after-followup")
    api.submit(p2, conversation_id=cid0)
    b = api.wait_done(cid0, timeout=45, user_prompt=p2)
    assert (b["status"], b["llm_response"]) == ("complete", llm_answer(p2, messages=3)), b

    # The prompts refused with 503 were not delivered later on behind the client's back.
    on_topic = {m["value"]["prompt"] for m in kafka.read(cluster.topic_prompts) if m["value"]}
    assert p0 in on_topic and p1 in on_topic and p2 in on_topic
    assert not (set(rejected) & on_topic), f"prompts answered 503 reached Kafka: {set(rejected) & on_topic}"


def test_readyz_stays_503_while_the_broker_is_down(api, worker):
    """/readyz says "Kafka and Redis are reachable": with the broker stopped it must answer 503, and keep
    answering 503 (not only at the moment the connection drops) while nothing is being produced."""
    assert api.get("/readyz").status == 200
    samples = []
    with broker_stopped(api):
        wait_for(lambda: api.get("/readyz").status == 503, 30, "/readyz to answer 503 with the broker down",
                 interval=0.2)
        end = time.monotonic() + 6
        while time.monotonic() < end:
            r = api.get("/readyz")
            samples.append((round(time.monotonic() - end + 6, 2), r.status, r.body.decode(errors="replace").strip()))
            time.sleep(0.25)
    bad = [s for s in samples if s[1] != 503]
    assert not bad, (f"/readyz answered {bad[0][1]} {bad[0][2]} {bad[0][0]} s after it first answered 503, with the "
                     f"broker still stopped ({len(bad)} of {len(samples)} samples over 6 s were not 503)")
    body = samples[0][2]
    assert '"kafka":false' in body.replace(" ", ""), body


def test_a_503_while_redis_is_away_is_marked_rejected_once_it_is_back(cluster, redis):
    """The worst moment for a failed follow-up: Redis took the turn, then the broker did not acknowledge it (the
    client gets 503), and Redis is unreachable when the API marks the turn rejected. The API keeps the rejection
    and writes it once Redis is back, so the turn does not stay `pending` forever. Kafka is paused (SIGSTOP),
    not stopped, so that the API still sees it up when the follow-up arrives; Redis is stopped and started."""
    api2 = cluster.start("api", produce_timeout_ms=1500, redis_timeout_ms=500, request_timeout_ms=10000)
    cid = api2.submit(unique("first turn"))["conversation_id"]
    key = f"asyncllm:conv:{cid}"
    with paused("kafka"):  # every broker thread stopped before the follow-up is sent: it cannot be acknowledged
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(api2.submit_post, unique("follow-up answered 503"), cid)
            wait_for(lambda: redis.command("HGET", key, "t2.status") == b"pending", 10,
                     "the follow-up to write its turn to Redis", interval=0.02)
            stack("redis-stop")  # graceful: the turn is in its AOF; the API's connection is closed
            try:
                r = fut.result(timeout=30)
                assert_error(r, 503)
                time.sleep(1.0)  # the rejection could not be written: it waits for Redis
            finally:
                stack("redis-start")
    wait_for(lambda: redis.command("HGET", key, "t2.status") == b"rejected", 20,
             "the API to mark the follow-up rejected once Redis is back", interval=0.2)
    assert "as rejected" in api2.proc.log_path.read_text()
    wait_for(lambda: api2.get("/readyz").status == 200, 60, "/readyz after Kafka resumed", interval=0.2)


def oom_errors(r):
    """How many commands Redis has refused with -OOM (INFO errorstats)."""
    info = r.command("INFO", "errorstats")
    info = info.decode() if isinstance(info, bytes) else info
    m = re.search(r"errorstat_OOM:count=(\d+)", info)
    return int(m.group(1)) if m else 0


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own (its memory limit is changed: not the stack's), stopped at the end."""
    port = extra_port()
    data = tmp_path / "redis"
    data.mkdir()
    proc = Proc("redis-server (own)", ["redis-server", "--bind", "127.0.0.1", "--port", port, "--dir", data, "--save",
                                       "", "--appendonly", "no", "--maxmemory-policy", "noeviction"],
                tmp_path / "redis-own.log", sanitized=False)
    r = Redis(port=port)
    try:
        wait_for(lambda: r.command("PING") == "PONG", 20, f"redis-server on port {port}")
        yield port, r
    finally:
        proc.stop()


def test_a_new_conversation_redis_refuses_is_accepted_once_kafka_has_it(cluster, own_redis, kafka):
    """A new conversation's first turn is written to Redis (HSET then EXPIRE, pipelined) and produced to Kafka at
    the same time, and the produce decides the answer (src/http/submit.c, "Together"). While Redis refuses writes
    (maxmemory 1, noeviction: HSET gets -OOM) the prompt is still queued: 202, the refusal logged, nothing in
    Redis (a worker creates the conversation when it takes the prompt). Once Redis takes writes, a new
    conversation is there with its expiry, its first turn stored without a status and polled as pending."""
    port, r = own_redis
    api2 = cluster.start("api", redis_port=port, conversation_ttl_s=777)
    r.command("CONFIG", "SET", "maxmemory", "1")
    try:
        resp = api2.submit_post(unique("refused by Redis"))
        assert resp.status == 202, resp
        refused = resp.json()["conversation_id"]
        assert r.command("DBSIZE") == 0
        log = api2.proc.log()
        assert "OOM" in log and "did not store its first turn" in log, api2.proc.tail()
    finally:
        r.command("CONFIG", "SET", "maxmemory", "0")
    assert kafka.wait_for_key(cluster.topic_prompts, refused)
    cid = api2.submit(unique("taken by Redis"))["conversation_id"]
    key = f"asyncllm:conv:{cid}"
    ttl = r.command("TTL", key)
    assert 0 < ttl <= 777, f"TTL of a new conversation: {ttl}"
    assert r.command("HGET", key, "t1.status") is None
    b = api2.poll(cid).json()
    assert (b["status"], b["state"], b["updated_at"]) == ("pending", "pending", b["created_at"]), b


def test_a_new_conversation_the_broker_does_not_ack_is_503_and_deleted(cluster, own_redis):
    """A new conversation's first turn is written to Redis while it is produced (src/http/submit.c, "Together").
    If the broker does not acknowledge it (paused: the produce times out), the client gets 503 and the turn that
    Redis stored meanwhile is rejected: the new conversation is deleted. The test's own Redis holds nothing else."""
    port, r = own_redis
    api2 = cluster.start("api", redis_port=port, produce_timeout_ms=1500, request_timeout_ms=10000)
    warm = api2.submit(unique("warm-up"))["conversation_id"]  # the producer knows the topic's partitions
    p = unique("new conversation the broker does not ack")
    with paused("kafka"):
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(api2.submit_post, p)
            key = wait_for(lambda: next((k for k in r.command("KEYS", "asyncllm:conv:*")
                                         if r.command("HGET", k, "t1.prompt") == p.encode()), None), 10,
                           "Redis to store the new conversation while the broker is paused", interval=0.02)
            assert_error(fut.result(timeout=30), 503)
    wait_for(lambda: r.command("EXISTS", key) == 0, 10, "the new conversation to be deleted", interval=0.1)
    assert r.command("EXISTS", f"asyncllm:conv:{warm}") == 1
    wait_for(lambda: api2.get("/readyz").status == 200, 60, "/readyz after Kafka resumed", interval=0.2)


def test_a_503_whose_rejection_redis_refuses_is_marked_rejected_once_redis_takes_it(cluster, own_redis):
    """As above, but Redis is up and answers the rejection with an error (-OOM here; -MISCONF, -LOADING,
    -READONLY alike): the API used to drop it, so the turn stayed `pending` forever while its client had been
    told 503. Now it is kept and retried like one the connection lost. The test's own Redis takes the turn, then
    refuses writes (maxmemory 1, noeviction) before the produce fails; a while later it takes writes again."""
    port, r = own_redis
    api2 = cluster.start("api", redis_port=port, produce_timeout_ms=1500, request_timeout_ms=10000)
    cid = api2.submit(unique("first turn"))["conversation_id"]
    key = f"asyncllm:conv:{cid}"
    with paused("kafka"):  # the follow-up cannot be acknowledged: 503 after the produce timeout
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(api2.submit_post, unique("follow-up answered 503"), cid)
            wait_for(lambda: r.command("HGET", key, "t2.status") == b"pending", 10,
                     "the follow-up to write its turn to Redis", interval=0.02)
            r.command("CONFIG", "SET", "maxmemory", "1")
            try:
                assert_error(fut.result(timeout=30), 503)
                wait_for(lambda: "OOM" in api2.proc.log(), 10, "Redis to refuse the rejection (OOM)", interval=0.1)
                time.sleep(1.2)  # retried meanwhile (500 ms after the refusal) and refused again
                assert r.command("HGET", key, "t2.status") == b"pending"
                # While Redis refuses, the rounds back off (0.5, 1, 2, 4 s... up to 30): 3 in the next 6 s, where
                # a fixed 500 ms made 12. A slower machine makes fewer, never more.
                before = oom_errors(r)
                time.sleep(6.0)
                tries = oom_errors(r) - before
                assert 1 <= tries <= 5, f"{tries} refused rejection rounds in 6 s: expected 1 to 5 (backing off)"
            finally:
                r.command("CONFIG", "SET", "maxmemory", "0")
    wait_for(lambda: r.command("HGET", key, "t2.status") == b"rejected", 40,
             "the API to mark the follow-up rejected once Redis takes writes again", interval=0.2)
    assert "as rejected" in api2.proc.log()
    wait_for(lambda: api2.get("/readyz").status == 200, 60, "/readyz after Kafka resumed", interval=0.2)
