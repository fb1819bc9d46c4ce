"""Does a worker's resident memory level off under repeated load, or leak?

Starts a real `elasticfleet worker` (the prepared SmolLM2 by default) on
127.0.0.1 and runs rounds of concurrent generation streams against it,
reading the process's RSS (and its anonymous part) from /proc after each
round. Each configuration runs in a fresh worker; `--env NAME=VALUE` sets
the worker's environment (e.g. MALLOC_ARENA_MAX=2), `--configs` runs the
default comparison: the worker as shipped, and with glibc's per-thread
arenas limited.

    .venv/bin/python benchmarks/worker_rss.py --rounds 20 --streams 100

Writes benchmarks/results/worker_rss.json and .md (RSS per round per
configuration, growth over the first and second half of the rounds). A
leak grows about linearly to the end; allocator retention grows and then
flattens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from elasticfleet.worker.serving.client import AsyncWorkerClient, generate_request
from elasticfleet.worker.serving.process import WorkerProcess

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "Explain what a hash table is.",
    "Write a haiku about memory.",
    "What is the capital of France?",
    "List three prime numbers.",
]
# Configurations compared by --configs: name -> the worker's extra environment.
CONFIGS: dict[str, dict[str, str]] = {
    "as shipped": {},
    "MALLOC_ARENA_MAX=2": {"MALLOC_ARENA_MAX": "2"},
}


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of a process, in KiB, and its thread count."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "Threads"):
            fields[name] = int(value.split()[0])
    return fields


async def one_round(target: str, streams: int, max_new_tokens: int) -> int:
    """`streams` concurrent requests; returns how many completed, once the
    worker is idle again (its KV cache freed), so that every round's RSS is
    read in the same state."""
    async with AsyncWorkerClient(target) as client:
        requests = [
            generate_request(
                PROMPTS[i % len(PROMPTS)], max_new_tokens=max_new_tokens, ignore_eos=True
            )
            for i in range(streams)
        ]
        results = await asyncio.gather(
            *(client.complete(r, timeout=600) for r in requests), return_exceptions=True
        )
        while (await client.get_stats(timeout=30)).memory.kv_reserved_bytes:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    return sum(1 for r in results if not isinstance(r, BaseException))


def run_config(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    worker_args = ["--port", "0", "--threads", str(args.threads), "--max-batch", "64"]
    if args.model:
        worker_args += ["--model", str(args.model)]
    worker_args += ["--budget-bytes", str(args.budget_bytes)]
    with tempfile.TemporaryDirectory() as folder:
        worker = WorkerProcess.start(worker_args, Path(folder) / "worker.log", env=env)
        try:
            pid = worker.process.pid
            start = rss_kib(pid)
            rounds = []
            for index in range(args.rounds):
                began = time.monotonic()
                done = asyncio.run(one_round(worker.address, args.streams, args.max_new_tokens))
                figures = rss_kib(pid)
                rounds.append(
                    {"round": index + 1, "completed": done, "seconds": time.monotonic() - began}
                    | figures
                )
                print(
                    f"round {index + 1}: {done}/{args.streams} done, "
                    f"RSS {figures['VmRSS'] / 1024:.1f} MiB, {figures['Threads']} threads",
                    flush=True,
                )
        finally:
            worker.stop()
    return {"env": env, "start": start, "rounds": rounds}


def growth(rounds: list[dict[str, Any]]) -> tuple[float, float]:
    """MiB per round over the first and the second half of the rounds."""
    rss = [r["VmRSS"] / 1024 for r in rounds]
    half = len(rss) // 2
    first = (rss[half] - rss[0]) / max(half, 1)
    second = (rss[-1] - rss[half]) / max(len(rss) - 1 - half, 1)
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: prepared SmolLM2)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-bytes", type=int, default=4 * 2**30)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--configs", action="store_true", help="compare CONFIGS")
    parser.add_argument("--out", type=Path, default=RESULTS / "worker_rss")
    args = parser.parse_args()
    if args.configs:
        configs = CONFIGS
    else:
        configs = {" ".join(args.env) or "as shipped": dict(e.split("=", 1) for e in args.env)}
    results = {name: run_config(args, env) for name, env in configs.items()}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model", "env")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2) + "\n"
    )
    lines = [
        f"# Worker RSS over {args.rounds} rounds of {args.streams} concurrent streams "
        f"({args.max_new_tokens} new tokens each)",
        "",
        "| configuration | RSS after round 1 (MiB) | RSS at the end (MiB) | "
        "MiB/round, first half | MiB/round, second half | median round (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        rounds = result["rounds"]
        first, second = growth(rounds)
        median = statistics.median(r["seconds"] for r in rounds)
        lines.append(
            f"| {name} | {rounds[0]['VmRSS'] / 1024:.1f} | {rounds[-1]['VmRSS'] / 1024:.1f} | "
            f"{first:+.2f} | {second:+.2f} | {median:.1f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
