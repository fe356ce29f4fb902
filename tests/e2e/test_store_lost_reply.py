"""A submit whose reply is lost with the connection (src/store/store.c, LUA_REJECT with turn 0).

Redis runs a submit, then the connection drops before its reply arrives (a Redis shut down gracefully closes
its clients without flushing their replies; a network cut does the same). The API answers 503, since it cannot
tell, but the turn is stored and pending: nobody would ever produce it, and it stayed pending until its TTL (seen
in the chaos test). Now the store keeps the lost submit's time and prompt and, once Redis is back, marks that turn
rejected (a follow-up's turn; a new conversation's first turn is produced at the same time as it is written, so the
produce decides: see the test), as it does for a produce that failed. A proxy between the API and Redis
drops the connection when the reply to a submit comes back, which proves Redis ran it."""

import select
import threading
import time

from conftest import RedisProxy, unique, wait_for


class DroppingProxy(RedisProxy):
    """Forwards to Redis. Once armed, the first connection that sends a submit (HSET+EXPIRE or EVALSHA) after
    arming is closed, both ways, when Redis' answer arrives: the answer is never delivered."""

    def __init__(self):
        self.armed = threading.Event()
        self.dropped = threading.Event()
        super().__init__()

    def serve(self, c, s):
        submitted = False
        try:
            while True:
                r, _, _ = select.select([c, s], [], [])
                if c in r:
                    data = c.recv(65536)
                    if not data:
                        return
                    if self.armed.is_set() and (b"EXPIRE" in data or b"EVALSHA" in data):
                        submitted = True
                    s.sendall(data)
                if s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    if submitted:
                        self.armed.clear()
                        self.dropped.set()
                        return
                    c.sendall(data)
        except OSError:
            return
        finally:
            c.close()
            s.close()


def conversations_with(redis, prompt):
    """{key: hash} of the conversations one of whose turns has this prompt."""
    out = {}
    cursor = b"0"
    while True:
        cursor, keys = redis.command("SCAN", cursor, "MATCH", "asyncllm:conv:*", "COUNT", "1000")
        for k in keys:
            h = redis.hgetall(k)
            if any(f.endswith(".prompt") and v == prompt for f, v in h.items()):
                out[k.decode()] = h
        if cursor == b"0":
            return out


def test_a_submit_lost_with_its_reply_is_rejected(cluster, redis):
    proxy = DroppingProxy()
    try:
        api = cluster.start("api", redis_port=proxy.port)

        # A new conversation: Redis stores it, its reply is lost. Its prompt was produced at the same time
        # (src/http/submit.c, "Together") and Kafka acked it, so the client gets 202 and the turn stays, pending
        # (stored without a status), for a worker to take: not rejected by the store.
        p1 = unique("new, reply lost")
        proxy.armed.set()
        r = api.submit_post(p1)
        assert proxy.dropped.is_set(), "the proxy never dropped a submit's reply: the test proves nothing"
        assert r.status == 202, r
        cid1 = r.json()["conversation_id"]
        assert "did not store its first turn" in api.proc.log(), api.proc.tail()
        wait_for(lambda: api.poll(cid1).status == 200, 15, "the store to be connected again")
        time.sleep(1.0)  # a rejection would have been written by now (within 500 ms of reconnecting)
        h = redis.hgetall("asyncllm:conv:" + cid1)
        assert h.get("t1.prompt") == p1 and "t1.status" not in h, h
        assert api.poll(cid1).json()["status"] == "pending"

        # A follow-up: its turn is marked rejected; the conversation and its accepted turn stay.
        cid = api.submit(unique("first"))["conversation_id"]
        proxy.dropped.clear()
        p2 = unique("follow-up, reply lost")
        proxy.armed.set()
        r = api.submit_post(p2, cid)
        assert proxy.dropped.is_set(), "the proxy never dropped the follow-up's reply"
        assert r.status == 503, r
        key = "asyncllm:conv:" + cid
        wait_for(lambda: redis.hgetall(key).get("t2.status") == "rejected", 15, "turn 2 to be marked rejected")
        h = redis.hgetall(key)
        assert h["t2.prompt"] == p2 and "t1.status" not in h, h  # t1 as the API writes it: pending
        assert not api.proc.stop()
    finally:
        proxy.close()
