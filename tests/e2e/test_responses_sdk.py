"""OpenAI's Responses API, driven by the official `openai` Python SDK, unmodified, pointed at asyncllm
(`openai.OpenAI(base_url="http://127.0.0.1:PORT/v1", api_key="x")`), with the fake LLM behind the worker.

Covers issue 4's proof: background create then retrieve until done, cancel (queued and in progress, twice,
and a finished one: 409), a streamed background response read halfway, dropped and resumed with
`starting_after` (on another API instance too, and with Last-Event-ID) with no event lost or repeated,
`previous_response_id`, synchronous create, `max_output_tokens` (incomplete), `instructions`, input as a list
of messages, failed responses and DELETE.
"""

import time

import openai
import pytest

from conftest import COMPLETE_TIMEOUT, llm_answer, unique, wait_for

FINAL = ("completed", "failed", "cancelled", "incomplete")


@pytest.fixture(scope="module")
def node(cluster):
    return cluster.start("all")


def sdk(port):
    # max_retries=0: a failing call must fail here, not be retried quietly by the SDK.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(node):
    return sdk(node.port)


@pytest.fixture(scope="module")
def stream_api(cluster, node):
    """A second API instance (same topics, served by node's worker). The streams that the tests drop are
    dropped here, and the last test stops it and checks its exit (see test_zz_...)."""
    return cluster.start("api")


def words(n, tag):
    return " ".join(f"{tag}{i:02d}" for i in range(n))


def retrieve_until_final(client, rid, timeout=COMPLETE_TIMEOUT):
    seen = []

    def done():
        r = client.responses.retrieve(rid)
        if not seen or seen[-1] != r.status:
            seen.append(r.status)
        return r if r.status in FINAL else None

    r = wait_for(done, timeout, f"response {rid} to finish", interval=0.02)
    return r, seen


def ntokens(*texts):
    """The fake LLM's token count: whitespace-separated words."""
    return sum(len(t.split()) for t in texts)


# ------------------------------------------------------------------------------------------------
# create (background) and retrieve
# ------------------------------------------------------------------------------------------------


def test_background_create_then_retrieve(client, fakellm):
    prompt = unique("bg hello")
    r = client.responses.create(model="fake-model", input=prompt, background=True,
                                metadata={"k": "v"}, temperature=0.5, top_p=0.9)
    assert isinstance(r, openai.types.responses.Response)
    assert r.id.startswith("resp_"), r.id
    assert r.object == "response"
    # Answered at once: queued, or already in progress if the worker was quicker than the answer.
    assert r.status in ("queued", "in_progress"), r
    assert r.background is True
    assert r.output == [] and r.usage is None and r.error is None and r.incomplete_details is None, r
    assert (r.model, r.metadata, r.temperature, r.top_p) == ("fake-model", {"k": "v"}, 0.5, 0.9), r
    assert r.created_at > 0 and abs(r.created_at - time.time()) < 600, r.created_at

    done, seen = retrieve_until_final(client, r.id)
    print(f"statuses seen while retrieving: {seen}")
    answer = llm_answer(prompt)
    assert done.status == "completed", done
    assert done.id == r.id
    assert done.output_text == answer
    assert len(done.output) == 1
    item = done.output[0]
    assert (item.type, item.role, item.status) == ("message", "assistant", "completed"), item
    assert [(c.type, c.text, c.annotations) for c in item.content] == [("output_text", answer, [])], item
    assert done.usage is not None
    assert done.usage.input_tokens == ntokens(prompt), done.usage
    assert done.usage.output_tokens == ntokens(answer), done.usage
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.completed_at is not None and done.completed_at >= done.created_at
    # The request's fields are still echoed on the finished object.
    assert (done.metadata, done.temperature, done.top_p, done.background) == ({"k": "v"}, 0.5, 0.9, True), done
    reqs = fakellm.requests_with_last_user(prompt)
    assert len(reqs) == 1, reqs
    assert reqs[0]["messages"] == [{"role": "user", "content": prompt}], reqs


def test_in_progress_is_recorded(client):
    """While the worker's LLM call runs, the response is in_progress (the worker records that it started)."""
    prompt = unique("slowish") + " [[latency=1500]]"
    r = client.responses.create(model="fake", input=prompt, background=True)
    wait_for(lambda: client.responses.retrieve(r.id).status == "in_progress", 20,
             f"{r.id} to be in_progress", interval=0.02)
    done, seen = retrieve_until_final(client, r.id)
    assert done.status == "completed" and done.output_text == llm_answer(prompt), done


def test_sync_create_returns_finished_object(client):
    prompt = unique("sync")
    t0 = time.monotonic()
    r = client.responses.create(model="fake", input=prompt)
    print(f"synchronous create answered in {1000 * (time.monotonic() - t0):.0f} ms")
    assert r.status == "completed", r
    assert r.background is False
    assert r.output_text == llm_answer(prompt)
    assert r.usage is not None and r.usage.total_tokens > 0
    assert r.completed_at is not None
    # The same object on retrieve.
    again = client.responses.retrieve(r.id)
    assert again.status == "completed" and again.output_text == r.output_text


def test_max_output_tokens_gives_incomplete(client, fakellm):
    prompt = unique("cut") + " w1 w2 w3 w4 w5 w6"
    r = client.responses.create(model="fake", input=prompt, max_output_tokens=3)
    assert r.status == "incomplete", r
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens", r
    assert r.max_output_tokens == 3
    # The fake LLM cuts the reply after the max_tokens-th word.
    cut = " ".join(llm_answer(prompt).split()[:3])
    assert r.output_text == cut, r
    assert r.usage.output_tokens == 3, r.usage
    assert [q["max_tokens"] for q in fakellm.requests_with_last_user(prompt)] == [3]
    # The same in background mode, through retrieve.
    prompt2 = unique("cutbg") + " a b c d e f g"
    r2 = client.responses.create(model="fake", input=prompt2, max_output_tokens=2, background=True)
    done, _ = retrieve_until_final(client, r2.id)
    assert done.status == "incomplete" and done.incomplete_details.reason == "max_output_tokens", done
    assert done.output_text == " ".join(llm_answer(prompt2).split()[:2])


def test_instructions_are_the_system_message(client, fakellm):
    prompt = unique("with instructions")
    r = client.responses.create(model="fake", input=prompt, instructions="You are terse.")
    assert r.status == "completed", r
    assert r.instructions == "You are terse."
    assert r.output_text == llm_answer(prompt, messages=2)
    (req,) = fakellm.requests_with_last_user(prompt)
    assert req["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt}]
    # As in OpenAI's API, instructions are not carried over to a continuation.
    p2 = unique("next")
    r2 = client.responses.create(model="fake", input=p2, previous_response_id=r.id)
    assert r2.instructions is None
    (req2,) = fakellm.requests_with_last_user(p2)
    assert req2["messages"] == [{"role": "user", "content": prompt},
                                {"role": "assistant", "content": r.output_text},
                                {"role": "user", "content": p2}], req2


def test_input_as_list_of_messages(client, fakellm):
    q2 = unique("second question")
    msgs = [
        {"role": "developer", "content": "dev says hi"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": q2}]},
    ]
    r = client.responses.create(model="fake", input=msgs)
    assert r.status == "completed", r
    assert r.output_text == llm_answer(q2, messages=4)
    (req,) = fakellm.requests_with_last_user(q2)
    assert req["messages"] == [
        {"role": "system", "content": "dev says hi"},  # OpenAI's newer name, sent as "system"
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": q2},
    ], req


def test_previous_response_id_continues_the_conversation(client, fakellm):
    p1, p2, p3 = unique("turn one"), unique("turn two"), unique("branch")
    r1 = client.responses.create(model="fake", input=p1)
    a1 = llm_answer(p1)
    assert r1.output_text == a1
    r2 = client.responses.create(model="fake", input=p2, previous_response_id=r1.id, background=True)
    assert r2.previous_response_id == r1.id
    done2, _ = retrieve_until_final(client, r2.id)
    assert done2.status == "completed", done2
    assert done2.output_text == llm_answer(p2, messages=3)
    (req,) = fakellm.requests_with_last_user(p2)
    assert req["messages"] == [{"role": "user", "content": p1}, {"role": "assistant", "content": a1},
                               {"role": "user", "content": p2}], req
    # A later turn that continues from r1 again branches: r2's turn is not in its context.
    r3 = client.responses.create(model="fake", input=p3, previous_response_id=r1.id)
    assert r3.output_text == llm_answer(p3, messages=3), r3
    (req3,) = fakellm.requests_with_last_user(p3)
    assert req3["messages"] == [{"role": "user", "content": p1}, {"role": "assistant", "content": a1},
                                {"role": "user", "content": p3}], req3
    # Three continuations of one conversation: the ids share it.
    assert len({r.id.rsplit("_", 1)[0] for r in (r1, r2, r3)}) == 1, (r1.id, r2.id, r3.id)


def test_failed_response_has_an_error(client):
    # The fake LLM answers 400: not retryable, so the prompt fails for good at once.
    r = client.responses.create(model="fake", input=unique("doomed") + " [[status=400]]", background=True)
    done, _ = retrieve_until_final(client, r.id)
    assert done.status == "failed", done
    assert done.error is not None and done.error.code and done.error.message, done
    assert done.output == [] and done.usage is None, done
    assert done.completed_at is not None


# ------------------------------------------------------------------------------------------------
# cancel, delete
# ------------------------------------------------------------------------------------------------


def test_cancel_in_progress_twice_then_stays_cancelled(client, fakellm):
    prompt = unique("slow cancel") + " [[latency=3000]]"
    r = client.responses.create(model="fake", input=prompt, background=True)
    wait_for(lambda: client.responses.retrieve(r.id).status == "in_progress", 20, f"{r.id} in progress",
             interval=0.02)
    aborted_before = fakellm.stats()["aborted"]
    c1 = client.responses.cancel(r.id)
    assert c1.id == r.id and c1.status == "cancelled", c1
    c2 = client.responses.cancel(r.id)  # idempotent
    assert c2.status == "cancelled", c2
    # The worker aborts its LLM call (the fake LLM sees the connection close before its answer)...
    wait_for(lambda: fakellm.stats()["aborted"] > aborted_before, 10, "the worker to abort the LLM call")
    # ...and the response stays cancelled after the LLM's latency has passed.
    time.sleep(3.5)
    after = client.responses.retrieve(r.id)
    assert after.status == "cancelled", after
    assert after.output == [] and after.usage is None, after


def test_cancel_queued_is_skipped_by_the_worker(client, fakellm):
    """Turn 2 waits behind turn 1 of its conversation (turns run in order); cancelled while queued, the
    worker never sends it to the LLM."""
    p1, p2, p3 = unique("blocker") + " [[latency=2000]]", unique("never sent"), unique("after")
    r1 = client.responses.create(model="fake", input=p1, background=True)
    r2 = client.responses.create(model="fake", input=p2, previous_response_id=r1.id, background=True)
    c = client.responses.cancel(r2.id)
    assert c.status == "cancelled", c
    # Turn 3 comes after turn 2 in the conversation's order: once it is done, turn 2 has been handled.
    r3 = client.responses.create(model="fake", input=p3, previous_response_id=r1.id, background=True)
    done3, _ = retrieve_until_final(client, r3.id)
    assert done3.status == "completed", done3
    assert client.responses.retrieve(r1.id).status == "completed"
    assert client.responses.retrieve(r2.id).status == "cancelled"
    assert fakellm.requests_with_last_user(p2) == [], "the cancelled turn reached the LLM"


def test_cancel_finished_is_409_in_openai_shape(client):
    r = client.responses.create(model="fake", input=unique("finished"))
    assert r.status == "completed"
    with pytest.raises(openai.ConflictError) as ei:
        client.responses.cancel(r.id)
    e = ei.value
    assert e.status_code == 409
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"], body
    assert client.responses.retrieve(r.id).status == "completed"


def test_delete_then_retrieve_is_404(client):
    r = client.responses.create(model="fake", input=unique("to delete"))
    assert r.status == "completed"
    client.responses.delete(r.id)
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id),
                 lambda: client.responses.cancel(r.id)):
        with pytest.raises(openai.NotFoundError) as ei:
            call()
        body = ei.value.response.json()
        assert set(body["error"]) >= {"message", "type", "param", "code"}, body


def test_unknown_response_is_404(client):
    for rid in ("resp_AAAAAAAAAAAAAAAAAAAAAA_1", "resp_nope", "something-else"):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(rid)


# ------------------------------------------------------------------------------------------------
# streaming with resume
# ------------------------------------------------------------------------------------------------


def read_events(stream, stop_after_deltas=None):
    """Events of an SDK stream as (sequence_number, type, event); stops (and closes the stream) after
    stop_after_deltas text deltas."""
    out, deltas = [], 0
    for ev in stream:
        out.append((ev.sequence_number, ev.type, ev))
        if ev.type == "response.output_text.delta":
            deltas += 1
            if stop_after_deltas is not None and deltas >= stop_after_deltas:
                break
    stream.close()
    return out


def check_whole_stream(events, prompt):
    """events: every event of one response, in the order received."""
    seqs = [s for s, _, _ in events]
    assert seqs == list(range(len(seqs))), f"sequence numbers not contiguous from 0 (lost or repeated): {seqs}"
    types = [t for _, t, _ in events]
    assert types[:5] == ["response.created", "response.queued", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"], types
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"], types
    assert set(types[5:-4]) == {"response.output_text.delta"}, types
    answer = llm_answer(prompt)
    text = "".join(ev.delta for _, t, ev in events if t == "response.output_text.delta")
    assert text == answer, f"concatenated deltas {text!r} != {answer!r}"
    assert events[-4][2].text == answer
    final = events[-1][2].response
    assert final.status == "completed" and final.output_text == answer, final
    # The fake LLM streams one piece per word, spread over the call's latency: the deltas came from a streamed LLM
    # call, not one block. The worker makes one delta of what one network read brings, so two pieces that arrive
    # together (a busy machine) are one delta: fewer deltas than words is fine, far fewer is not streaming.
    deltas, nwords = types.count("response.output_text.delta"), len(answer.split())
    assert nwords // 2 < deltas <= nwords, (deltas, nwords, types)


def test_stream_dropped_halfway_and_resumed_with_starting_after(client, stream_api, fakellm):
    prompt = words(60, "sw") + " " + unique("stream") + " [[latency=2000]]"
    stream = sdk(stream_api.port).responses.create(model="fake", input=prompt, background=True, stream=True)
    first = read_events(stream, stop_after_deltas=12)  # then the connection is dropped
    rid = first[0][2].response.id
    last = first[-1][0]
    assert first[-1][1] == "response.output_text.delta"
    print(f"read {len(first)} events (last sequence number {last}), dropped the connection")

    # Resume on another API instance: numbering is the same everywhere.
    rest = read_events(client.responses.retrieve(rid, stream=True, starting_after=last))
    assert rest and rest[0][0] == last + 1, f"resumed stream starts at {rest[0][0] if rest else None}, not {last + 1}"
    check_whole_stream(first + rest, prompt)
    # The drop did not cancel the work.
    assert client.responses.retrieve(rid).status == "completed"
    assert fakellm.stats()["in_flight"] == 0

    # Replay after the end: the whole stream again, or its tail, identical.
    again = read_events(client.responses.retrieve(rid, stream=True))
    check_whole_stream(again, prompt)
    assert [(s, t) for s, t, _ in again] == [(s, t) for s, t, _ in first + rest]
    tail = read_events(client.responses.retrieve(rid, stream=True, starting_after=len(again) - 3))
    assert [s for s, _, _ in tail] == [len(again) - 2, len(again) - 1]


def test_stream_resumed_with_last_event_id(stream_api):
    c = sdk(stream_api.port)
    prompt = words(30, "le") + " " + unique("lastid") + " [[latency=1500]]"
    first = read_events(c.responses.create(model="fake", input=prompt, background=True, stream=True),
                        stop_after_deltas=5)
    rid, last = first[0][2].response.id, first[-1][0]
    rest = read_events(c.responses.retrieve(rid, stream=True, extra_headers={"Last-Event-ID": str(last)}))
    assert rest and rest[0][0] == last + 1, [s for s, _, _ in rest][:3]
    check_whole_stream(first + rest, prompt)


def test_zz_dropped_streams_leak_nothing(stream_api):
    """The API instance on which two streams were dropped by their clients stops cleanly: exit status 0 and no
    sanitizer report (a dropped stream must free its request)."""
    problems = stream_api.proc.stop()
    assert not problems, "\n".join(problems)
