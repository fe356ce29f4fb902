"""The command line: --help and an unknown flag (no stack needed, but run with the sanitized binary)."""

import os
import subprocess

from conftest import ASYNCLLM_BIN, SAN_ENV, SANITIZER_MARKERS

SUBCOMMANDS = ("api", "worker", "all", "topics", "config", "version")


def run(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCLLM_")}
    env.update(SAN_ENV)
    p = subprocess.run([str(ASYNCLLM_BIN), *args], capture_output=True, text=True, timeout=60, env=env)
    for m in SANITIZER_MARKERS:
        assert m not in p.stdout + p.stderr, f"sanitizer report from asyncllm {' '.join(args)}:\n{p.stderr}"
    return p


def test_help_exits_0_and_names_every_subcommand():
    p = run("--help")
    assert p.returncode == 0, p
    text = p.stdout
    for cmd in SUBCOMMANDS:
        assert any(line.split()[:1] == [cmd] for line in text.splitlines()), f"--help does not describe {cmd!r}:\n{text}"
    for flag in ("--kafka-brokers", "--topic-prompts", "--topic-responses", "--redis-port", "--http-port",
                 "--llm-base-url", "--llm-model", "--group-id", "--produce-timeout-ms"):
        assert flag in text, f"--help does not mention {flag}"


def test_unknown_flag_exits_2_with_a_clear_message():
    p = run("api", "--no-such-flag=1")
    assert p.returncode == 2, p
    assert "no-such-flag" in p.stderr, p.stderr
    assert p.stdout == "" or "no-such-flag" not in p.stdout


def test_unknown_command_exits_2():
    p = run("frobnicate")
    assert p.returncode == 2, p
    assert "frobnicate" in p.stderr, p.stderr


def test_bad_value_exits_2():
    p = run("api", "--partitions=abc")
    assert p.returncode == 2, p
    assert "partitions" in p.stderr and "abc" in p.stderr, p.stderr
