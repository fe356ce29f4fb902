"""A new conversation's first turn goes to Redis and to Kafka at the same time (src/http/submit.c, "Together").

So a worker may take the prompt, and even finish it, before the API's own write reaches Redis. That write
must not undo the worker's: it carries no status and no updated_at (src/store/store.c, submit_new_plain), and
a stored prompt without a status reads as pending. A proxy between the API and Redis holds what the API sends
for a few seconds while the worker (straight to Redis) completes the prompt; the API's write lands after the
turn is complete, and the turn stays complete."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import REDIS_PORT, extra_port, llm_answer, unique, wait_for

HOLD_S = 5.0


class DelayingProxy:
    """Forwards 127.0.0.1:port to Redis; while `holding` is set, what the client sends waits HOLD_S seconds
    before it is passed on (in order). Replies pass at once."""

    def __init__(self):
        self.port = extra_port()
        self.holding = threading.Event()
        self.held = threading.Event()  # set once something was held
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
            threading.Thread(target=self._up, args=(c, s), daemon=True).start()
            threading.Thread(target=self._down, args=(c, s), daemon=True).start()

    def _up(self, c, s):
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                if self.holding.is_set():
                    self.held.set()
                    time.sleep(HOLD_S)
                s.sendall(data)
        except OSError:
            pass
        finally:
            s.close()
            c.close()

    def _down(self, c, s):
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.lsock.close()


def test_a_worker_that_finishes_first_is_not_undone_by_the_apis_late_write(cluster, redis, kafka):
    proxy = DelayingProxy()
    try:
        api = cluster.start("api", redis_port=proxy.port, redis_timeout_ms=30000)
        worker = cluster.start("worker")
        warm = unique("warm-up")
        assert api.wait_done(api.submit(warm)["conversation_id"])["llm_response"] == llm_answer(warm)

        prompt = unique("finished before the API's write landed")
        proxy.holding.set()
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(api.submit_post, prompt)
            # The worker stores the result while the API's HSET is still held by the proxy.
            cid = wait_for(lambda: next((m["key"] for m in kafka.read(cluster.topic_prompts, timeout=5)
                                         if (m["value"] or {}).get("prompt") == prompt), None), HOLD_S,
                           "the prompt on the topic while the API's write is held", interval=0.02)
            key = "asyncllm:conv:" + cid
            wait_for(lambda: redis.hgetall(key).get("t1.status") == "complete", HOLD_S,
                     "the worker to finish while the API's write is held", interval=0.02)
            assert not fut.done(), "the API answered before its write reached Redis: the test proves nothing"
            r = fut.result(timeout=30)
        proxy.holding.clear()
        assert proxy.held.is_set()
        assert r.status == 202 and r.json()["conversation_id"] == cid, r

        # The API's write has landed now (its reply came back): the turn is still complete, with its answer.
        h = redis.hgetall(key)
        assert (h.get("t1.status"), h.get("t1.response"), h.get("turns")) == ("complete", llm_answer(prompt), "1"), h
        assert int(h["updated_at"]) >= int(h["t1.completed_at"]), h  # not moved back to the submit's time
        assert int(h["created_at"]) == int(h["t1.submitted_at"]) <= int(h["t1.started_at"]), h
        b = api.wait_done(cid)
        assert (b["status"], b["llm_response"]) == ("complete", llm_answer(prompt)), b
        assert not worker.proc.stop() and not api.proc.stop()
    finally:
        proxy.close()
