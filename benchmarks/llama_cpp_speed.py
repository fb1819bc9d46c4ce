"""llama.cpp's decode speed on a SmolLM2 GGUF, for benchmarks/worker_speed.py.

Runs in an environment of its own, where llama-cpp-python was compiled from
its PyPI source (minutes; never in CI or scripts/setup):

    python -m venv /tmp/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        /tmp/llama-venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python

(add -DGGML_AVX512=ON where the CPU has it: a native build crashed with an
illegal instruction here). It imports nothing of this project. Prints one
JSON line: the GGUF, threads, tokens and single-stream tokens/s (greedy,
the prompt evaluated first and not timed).

Usage: python llama_cpp_speed.py --prompt TEXT --gguf FILE [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    from llama_cpp import Llama  # type: ignore[import-not-found]  # its own environment

    llm = Llama(str(args.gguf), n_ctx=1024, n_threads=args.threads, verbose=False, seed=0)
    prompt = llm.tokenize(args.prompt.encode(), add_bos=False, special=True)
    # Greedy; the clock starts at the first token, once the prompt is evaluated.
    start = 0.0
    for count, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1), start=1):
        if count == 1:
            start = time.perf_counter()
        if count == args.tokens + 1:
            break
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "gguf": args.gguf.name,
                "threads": args.threads,
                "tokens": args.tokens,
                "tokens_per_s": args.tokens / seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
