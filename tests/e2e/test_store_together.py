"""A new conversation's first turn goes to Redis and to Kafka at the same time (src/http/submit.c, "Together").

So a worker may take the prompt, and even finish it, before the API's own write reaches Redis. That write
must not undo the worker's: it carries no status and no updated_at (src/store/store.c, submit_new_plain), and
a stored prompt without a status reads as pending. A proxy between the API and Redis holds what the API sends
for a few seconds while the worker (straight to Redis) completes the prompt; the API's write lands after the
turn is complete, and the turn stays complete."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import RedisProxy, llm_answer, unique, wait_for

HOLD_S = 5.0


class DelayingProxy(RedisProxy):
    """Forwards to Redis; while `holding` is set, what the client sends waits HOLD_S seconds before it is passed
    on (in order). Replies pass at once."""

    def __init__(self):
        self.holding = threading.Event()
        self.held = threading.Event()  # set once something was held
        super().__init__()

    def serve(self, c, s):
        threading.Thread(target=self._copy, args=(s, c, False), daemon=True).start()
        self._copy(c, s, True)

    def _copy(self, src, dst, upstream):
        """src to dst until either end closes; upstream (client to Redis) is held while `holding` is set."""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and self.holding.is_set():
                    self.held.set()
                    time.sleep(HOLD_S)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()


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
