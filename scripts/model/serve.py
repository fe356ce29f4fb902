"""serve.py - the local OpenAI-compatible LLM server that scripts/model.sh starts.

llama.cpp's own HTTP server (llama-server, C++), as shipped prebuilt in the xllamacpp wheel: it
serves /v1/models and /v1/chat/completions (streaming with SSE and stream_options.include_usage,
max_tokens, finish_reason "length", usage) for one GGUF model, applying the chat template stored
in the GGUF. xllamacpp.Server starts the HTTP server in its own threads; this process only
configures it and waits for SIGTERM or SIGINT, then stops it cleanly.

Run by scripts/model.sh with the virtual environment's python; not meant to be run by hand:
    python serve.py --model FILE.gguf --alias NAME --host 127.0.0.1 --port 8090 \
        --threads 2 --ctx 2048 --parallel 2 --max-tokens 512 --temperature 0.2
"""

import argparse
import signal
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", required=True, help="path of the GGUF file")
    ap.add_argument("--alias", required=True, help="model name in /v1/models and in answers")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True, help="CPU threads for generation and prompts")
    ap.add_argument("--ctx", type=int, default=2048, help="context size of each slot, in tokens")
    ap.add_argument("--parallel", type=int, default=2, help="requests decoded at once (slots)")
    ap.add_argument("--max-tokens", type=int, default=512,
                    help="tokens generated at most when a request sets no max_tokens")
    ap.add_argument("--temperature", type=float, default=0.2,
                    help="default sampling temperature when a request sets none")
    a = ap.parse_args()

    import xllamacpp as xlc  # imported late so that --help works without it

    p = xlc.CommonParams()
    p.model.path = a.model
    p.model_alias = {a.alias}
    p.hostnames = [a.host]
    p.port = a.port
    p.n_parallel = a.parallel
    p.n_ctx = a.ctx * a.parallel  # llama-server splits n_ctx evenly between the slots
    p.n_predict = a.max_tokens  # only a default: a request's max_tokens overrides it
    p.cpuparams.n_threads = a.threads
    p.cpuparams_batch.n_threads = a.threads
    p.sampling.temp = a.temperature
    p.offline = True  # never reach for a model hub
    p.ui = False  # no web UI: an API only
    p.warmup = True

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    t0 = time.monotonic()
    server = xlc.Server(p)  # loads the model and starts listening; raises if it cannot
    print(f"serve.py: {a.alias} ({a.model}) listening on {server.listening_address} "
          f"after {time.monotonic() - t0:.1f} s; threads={a.threads} ctx={a.ctx} parallel={a.parallel} "
          f"max_tokens={a.max_tokens}", flush=True)
    while not stop.wait(1.0):
        pass
    print("serve.py: stopping", flush=True)
    del server  # stops the HTTP server and frees the model
    print("serve.py: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
