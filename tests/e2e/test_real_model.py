"""The real local model (issue 5): llama.cpp's OpenAI-compatible server with SmolLM2-135M-Instruct, both from
PyPI, installed by scripts/model.sh. The worker must work with it as with OpenAI: plain and streamed chat
completions, max_tokens honoured, finish_reason "length" surfaced as an incomplete result, usage counted,
follow-ups sent with the earlier turns. Prompts are short and max_tokens small: a couple of CPU minutes at most."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    port = free_port()
    env = dict(os.environ, ASYNCLLM_MODEL_PORT=str(port),
               ASYNCLLM_STACK_DIR=str(tmp_path_factory.mktemp("model-stack")))
    p = subprocess.run([str(REPO / "scripts/model.sh"), "start"], env=env, capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        pytest.fail(f"scripts/model.sh start failed:\n{p.stdout}\n{p.stderr}")
    settings = dict(line.split("=", 1) for line in p.stdout.split() if "=" in line)
    yield settings
    subprocess.run([str(REPO / "scripts/model.sh"), "stop"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def node(cluster, model):
    return cluster.start("all", llm_base_url=model["ASYNCLLM_LLM_BASE_URL"], llm_model=model["ASYNCLLM_LLM_MODEL"],
                         llm_max_tokens=24, llm_timeout_ms=120000)


def test_answer_usage_and_follow_up(node):
    cid = node.submit("What is the capital of France? Answer in one word.")["conversation_id"]
    first = node.wait_done(cid, timeout=180)
    assert first["status"] == "complete", first
    text = first["llm_response"]
    assert text.strip() and not text.startswith("echo:"), f"not a model's answer: {text!r}"
    u1 = first["usage"]
    assert u1["prompt_tokens"] > 0 and u1["completion_tokens"] > 0, u1
    assert u1["total_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"], u1

    node.submit("And of Italy?", conversation_id=cid)
    second = node.wait_done(cid, timeout=180, user_prompt="And of Italy?")
    assert second["status"] == "complete" and second["llm_response"].strip(), second
    # The follow-up carried the first turn (question and answer): many more prompt tokens than the
    # few words of "And of Italy?" alone.
    assert second["usage"]["prompt_tokens"] > u1["prompt_tokens"] + 3, (u1, second["usage"])


def test_tiny_max_tokens_is_incomplete(node):
    r = node.post("/v1/responses", {"model": "ignored", "input": "Write a long poem about the sea.",
                                    "max_output_tokens": 2})
    assert r.status == 200, r
    body = r.json()
    assert body["status"] == "incomplete", body
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}, body
    assert body["usage"]["output_tokens"] <= 2, body["usage"]
    assert body["output_text"].strip(), body


def test_streamed_answer(node):
    r = node.post("/v1/responses", {"model": "ignored", "input": "Say hello.", "stream": True,
                                    "max_output_tokens": 12}, timeout=180)
    assert r.status == 200, r
    events = [json.loads(line[6:]) for line in r.body.decode().splitlines() if line.startswith("data: ")]
    types = [e["type"] for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete"), types
    assert [e["sequence_number"] for e in events] == list(range(len(events))), types
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert deltas and deltas == final["output_text"], (deltas, final["output_text"])
    assert final["usage"]["output_tokens"] > 0, final["usage"]
