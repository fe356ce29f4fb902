#!/usr/bin/env python3
"""A post-processing hook for `asyncllm exec` (tests/e2e/test_parties.py): one JSON response per line in, one
JSON result per line out, in order. The result upper-cases the answer. Words in the answer steer it:

  HOOK-CRASH-ALWAYS        exit with status 3 before answering
  HOOK-CRASH-ONCE:TOKEN    exit with status 4 the first time TOKEN is seen (remembered in STATE_DIR)
  HOOK-HANG                never answer (asyncllm exec must time out and kill it)
  HOOK-NULL                answer null: nothing to publish

Usage: hook_upper.py STATE_DIR. Works long-running and per message (it reads until end of file)."""
import json
import os
import re
import sys
import time

state_dir = sys.argv[1] if len(sys.argv) > 1 else "."
for line in sys.stdin:
    msg = json.loads(line)
    text = msg.get("llm_response", "")
    if "HOOK-CRASH-ALWAYS" in text:
        sys.exit(3)
    m = re.search(r"HOOK-CRASH-ONCE:(\w+)", text)
    if m:
        mark = os.path.join(state_dir, "crashed-" + m.group(1))
        if not os.path.exists(mark):
            open(mark, "w").close()
            sys.exit(4)
    if "HOOK-HANG" in text:
        time.sleep(3600)
    if "HOOK-NULL" in text:
        print("null", flush=True)
        continue
    out = {"conversation_id": msg.get("conversation_id"), "turn": msg.get("turn"), "upper": text.upper(),
           "pid": os.getpid()}
    print(json.dumps(out), flush=True)
