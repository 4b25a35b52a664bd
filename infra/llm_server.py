"""Runs llama.cpp's OpenAI-compatible HTTP server (PyPI xllamacpp) on 127.0.0.1.

Usage: llm_server.py --model PATH --port PORT [--ctx N] [--parallel N] [--threads N] [--batch N]
The process serves until it receives SIGTERM/SIGINT.
"""

import argparse
import signal
import sys
import threading

import xllamacpp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="path to a GGUF model file")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alias", default="SmolLM2-135M-Instruct")
    parser.add_argument("--ctx", type=int, default=8192, help="total context across slots")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent generation slots")
    parser.add_argument("--threads", type=int, default=2)
    # Chunked prefill: each step of the server evaluates at most this many tokens, so a
    # long prompt (history, retrieved knowledge) is evaluated over several steps and a
    # short question that arrives meanwhile joins the next one instead of waiting for the
    # whole prompt (llama.cpp's default, 2048, let a 370-token prompt hold a 7-token
    # question's first token for ~0.9 s on two cores).
    parser.add_argument("--batch", type=int, default=128, help="most tokens evaluated per step")
    args = parser.parse_args()

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = args.alias
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.n_batch = args.batch
    params.n_ubatch = args.batch
    params.endpoint_metrics = True

    server = xllamacpp.Server(params)
    print(f"llm server listening on {server.listening_address}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
