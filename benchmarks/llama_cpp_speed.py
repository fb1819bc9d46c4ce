"""llama.cpp's decode speed on a SmolLM2 GGUF, for benchmarks/worker_speed.py.

Runs in an environment of its own, where llama-cpp-python was compiled from
its PyPI source (minutes; never in CI or scripts/setup):

    python -m venv /tmp/llama-venv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        /tmp/llama-venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python

(add -DGGML_AVX512=ON where the CPU has it: a native build crashed with an
illegal instruction here). It imports nothing of this project. Prints one
JSON line: the GGUF, threads, tokens, single-stream tokens/s and the
aggregate tokens/s of --sequences sequences decoded together in one batch
per step (llama.cpp's own multi-sequence batching, as its server does),
greedy, the prompts evaluated first and not timed.

Usage: python llama_cpp_speed.py --prompt TEXT --gguf FILE [--tokens N] [--sequences 8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def aggregate(llm: Any, prompt: list[int], sequences: int, tokens: int, threads: int) -> float:
    """Tokens/s of `sequences` copies of the prompt decoded greedily together:
    one llama_decode per step over one token of every sequence."""
    import llama_cpp  # type: ignore[import-not-found]
    import numpy as np
    from llama_cpp import _internals

    params = llama_cpp.llama_context_default_params()
    params.n_seq_max = sequences
    params.n_ctx = sequences * 256 * (1 + (len(prompt) + tokens) // 256)
    params.n_batch = params.n_ubatch = max(512, sequences * len(prompt))
    params.n_threads = params.n_threads_batch = threads
    context = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    batch = _internals.LlamaBatch(
        n_tokens=params.n_batch, embd=0, n_seq_max=sequences, verbose=False
    )
    vocab = llm.n_vocab()

    def argmax(index: int) -> int:
        logits = np.ctypeslib.as_array(context.get_logits_ith(index), shape=(vocab,))
        return int(logits.argmax())

    batch.reset()
    for sequence in range(sequences):
        batch.add_sequence(prompt, sequence, False)
    context.decode(batch)
    last = [(s + 1) * len(prompt) - 1 for s in range(sequences)]
    current = [argmax(i) for i in last]
    start = time.perf_counter()
    for step in range(tokens):
        batch.reset()
        raw = batch.batch
        raw.n_tokens = sequences
        for sequence, token in enumerate(current):
            raw.token[sequence] = token
            raw.pos[sequence] = len(prompt) + step
            raw.seq_id[sequence][0] = sequence
            raw.n_seq_id[sequence] = 1
            raw.logits[sequence] = True
        context.decode(batch)
        current = [argmax(i) for i in range(sequences)]
    seconds = time.perf_counter() - start
    context.close()
    batch.close()
    return sequences * tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--sequences",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[8, 32],
    )
    args = parser.parse_args()
    from llama_cpp import Llama  # its own environment

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
    together = {n: aggregate(llm, prompt, n, args.tokens, args.threads) for n in args.sequences}
    print(
        json.dumps(
            {
                "gguf": args.gguf.name,
                "threads": args.threads,
                "tokens": args.tokens,
                "tokens_per_s": args.tokens / seconds,
                "aggregate_tokens_per_s": together,
            }
        )
    )


if __name__ == "__main__":
    main()
