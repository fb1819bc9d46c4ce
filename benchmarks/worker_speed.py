"""Serving speed of the worker, measured against Hugging Face transformers
(and llama.cpp where its environment is given).

In one run, same weights and threads:

1. Throughput and time per output token at 1, 8 and 32 concurrent streams.
   The same requests (chat prompts, greedy, output lengths drawn from 16 to
   96 tokens with a fixed seed) go to a real worker over gRPC on 127.0.0.1,
   each stream sending its next request when the previous one finishes
   (continuous batching), and to transformers' LlamaForCausalLM.generate in
   static batches of the same size, in order (a static batch runs until its
   longest request is done). Throughput counts only the tokens each request
   asked for. Time per output token is the gap between a stream's
   consecutive tokens (ours: gRPC messages; theirs: generate's per-step
   streamer callbacks). Goals: at 8 and 32 streams ours >= 2x theirs; at
   32 streams our TPOT p99 <= 1.5x our p50.
2. Batch-1 decode against the memory-bandwidth roofline (goal >= 70%).
3. Decode-step time while plans switch every 200 ms (alternating dense and a
   plan dropping 4 attention and 4 FFN blocks) against no switching, 16
   streams: p50 and p99 of the engine's iteration times.
4. Concurrency under one budget against the rectangular cache, and a
   squeeze to half the KV budget under 32 streams (benchmarks/serving_memory.py).
5. llama.cpp, with --llama-python (benchmarks/llama_cpp_speed.py).

Usage: python benchmarks/worker_speed.py [--repeats N] [--streams 1,8,32]
           [--switch-seconds S] [--concurrency-seconds S] [--squeeze-seconds S]
           [--step-tokens N] [--skip-concurrency] [--llama-python PY]
           [--out benchmarks/results]
Writes worker_speed.json and worker_speed.md. Ours and theirs alternate
within each repeat and medians are reported, because these machines are
noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chat_workload import QUESTIONS, hf_greedy
from serving_memory import concurrency, squeeze

from elasticfleet.worker.serving.client import AsyncWorkerClient, generate_request
from elasticfleet.worker.serving.telemetry import percentile

if TYPE_CHECKING:
    # The client process imports this module too: it needs neither torch
    # nor transformers, so the worker and peer code import them lazily.
    from transformers import LlamaForCausalLM

    from elasticfleet.worker.model.plan import PruningPlan
    from elasticfleet.worker.serving.engine import Engine

STREAMS = (1, 8, 32)
REQUESTS_PER_STREAM = 2
MIN_TOKENS, MAX_TOKENS = 16, 96
GOAL = 2.0  # aggregate tok/s against transformers at 8 and 32 streams
TPOT_SPREAD_GOAL = 1.5  # TPOT p99 / p50 at 32 streams
ROOFLINE_GOAL = 0.7  # batch-1 decode against the bandwidth roofline
BANDWIDTH_BYTES = 256 * 2**20


def read_bandwidth(repeats: int = 7) -> float:
    """The machine's read bandwidth, bytes/s: the fastest of several sums
    over a 256 MB float32 tensor (larger than any cache), with torch's
    threads. The fastest, not the median: a limit is what the machine can
    do, and other processes on it only ever slow a run down."""
    import torch

    data = torch.ones(BANDWIDTH_BYTES // 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return BANDWIDTH_BYTES / min(times)


def roofline(engine: Engine, batch1_step_s: float) -> dict[str, Any]:
    """Batch-1 decode against the memory-bandwidth limit: every weight
    (the tied output head included; the embedding lookup reads one row) is
    read once per decoded token."""
    weight_bytes = engine.stats().picture.weight_bytes
    bandwidth = read_bandwidth()
    limit = bandwidth / weight_bytes
    return {
        "bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "roofline_tokens_per_s": limit,
        "batch1_decode_tokens_per_s": 1 / batch1_step_s,
        "fraction": (1 / batch1_step_s) / limit,
        "goal": ROOFLINE_GOAL,
    }


def float32_gguf(path: Path) -> Path:
    """A float32 GGUF of SmolLM2 (our serving precision), for a like-for-like
    llama.cpp run: the shipped GGUF's metadata and tokenizer, file type F32,
    and every tensor dequantized by the same gguf function `model prepare`
    uses, kept in GGUF's own layout (llama.cpp's rotary order), so llama.cpp
    computes with exactly the values our worker serves. Written once."""
    import gguf
    import numpy as np

    from elasticfleet.worker.model.prepare import find_gguf

    if path.exists():
        return path
    reader = gguf.GGUFReader(find_gguf())
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(path), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp(python: str | None, model_dir: Path, prompt: str) -> dict[str, Any]:
    """llama.cpp's single-stream decode speed on the shipped Q4_1 GGUF and
    on a float32 one (float32_gguf), each run by benchmarks/llama_cpp_speed.py
    in the interpreter of an environment where llama-cpp-python was
    compiled (never this project's: see the README)."""
    if python is None:
        return {
            "skipped": "no --llama-python: build llama-cpp-python from its PyPI source in an "
            "environment of its own and pass its python (README, Benchmarks)"
        }
    import subprocess

    from elasticfleet.worker.model.prepare import find_gguf

    script = Path(__file__).with_name("llama_cpp_speed.py")
    runs = []
    for gguf in (find_gguf(), float32_gguf(model_dir.parent / "SmolLM2-135M-Instruct.F32.gguf")):
        command = [python, str(script), "--prompt", prompt, "--gguf", str(gguf)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
        if done.returncode != 0:
            return {"skipped": f"llama_cpp_speed.py failed: {done.stderr.strip()[-500:]}"}
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"runs": runs}


def workload(streams: int, seed: int) -> list[tuple[str, int]]:
    """(question, output length) for each request of a run."""
    chooser = random.Random(seed)
    count = max(4, streams * REQUESTS_PER_STREAM)
    return [
        (QUESTIONS[i % len(QUESTIONS)], chooser.randint(MIN_TOKENS, MAX_TOKENS))
        for i in range(count)
    ]


def ours(target: str, requests: list[tuple[str, int]], streams: int) -> dict[str, Any]:
    """Closed-loop streams over gRPC: each sends its next request when done.
    Runs in the client process."""
    gaps: list[float] = []
    pending = list(enumerate(requests))

    async def stream(client: AsyncWorkerClient) -> None:
        while pending:
            index, (question, length) = pending.pop(0)
            request = generate_request(
                question, max_new_tokens=length, chat_template=True, ignore_eos=True
            )
            last = None
            tokens = 0
            async for message in client.generate(request):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                tokens += len(message.token_ids)
            assert tokens == length, (index, tokens, length)

    async def run() -> float:
        async with AsyncWorkerClient(target) as client:
            start = time.perf_counter()
            await asyncio.gather(*(stream(client) for _ in range(streams)))
            return time.perf_counter() - start

    seconds = asyncio.run(run())
    return summary(sum(n for _, n in requests), seconds, gaps)


def step_clock() -> Any:
    """A generate() streamer that records when each step's tokens appear."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return StepClock()


def theirs(
    hf: LlamaForCausalLM, prompts: dict[str, list[int]], requests: list[tuple[str, int]], size: int
) -> dict[str, Any]:
    """Static batches of `size`, in order, each until its longest request ends."""

    gaps: list[float] = []
    start = time.perf_counter()
    for first in range(0, len(requests), size):
        batch = requests[first : first + size]
        longest = max(n for _, n in batch)
        clock = step_clock()
        hf_greedy(hf, [prompts[q] for q, _ in batch], longest, streamer=clock)
        # put() #1 is the prompt, #2 the first token; then one per step. A
        # row sees the steps until its own last token.
        steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
        for _, length in batch:
            gaps.extend(steps[: length - 1])
    seconds = time.perf_counter() - start
    return summary(sum(n for _, n in requests), seconds, gaps)


def summary(tokens: int, seconds: float, gaps: list[float]) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "tpot_p50_ms": 1000 * percentile(gaps, 50),
        "tpot_p99_ms": 1000 * percentile(gaps, 99),
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def versus_transformers(
    model_dir: Path,
    engine: Engine,
    target: str,
    prompts: dict[str, list[int]],
    repeats: int,
    client: ProcessPoolExecutor,
    levels: tuple[int, ...] = STREAMS,
) -> list[dict[str, Any]]:
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # in eval mode
    rows = []
    for streams in levels:
        mine, peer = [], []
        engine.iterations.clear()
        for repeat in range(repeats):
            requests = workload(streams, seed=repeat)
            mine.append(client.submit(ours, target, requests, streams).result())
            peer.append(theirs(hf, prompts, requests, streams))
        a, b = median_of(mine), median_of(peer)
        # Decode steps alone (no prefill in the iteration), the roofline's measure.
        steps = [i.step_s for i in engine.iterations if i.rows == streams and not i.newcomers]
        rows.append(
            {
                "streams": streams,
                "ours": a,
                "transformers": b,
                "ratio": a["tokens_per_s"] / b["tokens_per_s"],
                "goal": GOAL if streams > 1 else None,
                "decode_step_p50_ms": 1000 * percentile(steps, 50),
                "tpot_p99_over_p50": a["tpot_p99_ms"] / a["tpot_p50_ms"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def steady(target: str, requests: list[tuple[str, int]], seconds: float) -> None:
    """steady_load, in the client process."""
    asyncio.run(steady_load(target, requests, seconds))


class Switcher(threading.Thread):
    """Alternates two plans every 200 ms until stopped."""

    def __init__(self, engine: Engine, plans: list[tuple[str, PruningPlan]]) -> None:
        super().__init__()
        self.engine = engine
        self.plans = plans
        self.stop = threading.Event()
        self.switches = 0

    def run(self) -> None:
        while not self.stop.wait(0.2):
            name, plan = self.plans[self.switches % len(self.plans)]
            self.engine.submit_plan(plan, name).result(timeout=60)
            self.switches += 1


async def steady_load(target: str, requests: list[tuple[str, int]], seconds: float) -> None:
    """16 closed-loop streams cycling through `requests` for `seconds`."""
    deadline = time.perf_counter() + seconds

    async def stream(client: AsyncWorkerClient, offset: int) -> None:
        index = offset
        while time.perf_counter() < deadline:
            question, length = requests[index % len(requests)]
            index += 16
            request = generate_request(
                question, max_new_tokens=length, chat_template=True, ignore_eos=True
            )
            async for _ in client.generate(request):
                pass

    async with AsyncWorkerClient(target) as client:
        await asyncio.gather(*(stream(client, i) for i in range(16)))


def switching(
    engine: Engine, target: str, seconds_per_run: float, client: ProcessPoolExecutor
) -> dict[str, Any]:
    """p50/p99 iteration time with 16 streams, without and with plan switches."""
    from elasticfleet.worker.model.plan import PruningPlan

    layers = engine.model.config.num_hidden_layers
    dense = PruningPlan.dense(layers)
    pruned = PruningPlan.from_dropped(layers, attention=[24, 25, 26, 27], ffn=[24, 25, 26, 27])
    requests = workload(16, seed=99)
    results: dict[str, Any] = {}
    for mode in ("none", "every 200 ms"):
        engine.submit_plan(dense, "dense").result(timeout=60)
        engine.iterations.clear()
        switcher = Switcher(engine, [("pruned", pruned), ("dense", dense)])
        if mode != "none":
            switcher.start()
        client.submit(steady, target, requests, seconds_per_run).result()
        if mode != "none":
            switcher.stop.set()
            switcher.join()
        iterations = [i for i in engine.iterations if i.rows]
        steps = [i.step_s for i in iterations]
        results[mode] = {
            "steps": len(steps),
            "switches": switcher.switches,
            "step_p50_ms": 1000 * percentile(steps, 50),
            "step_p99_ms": 1000 * percentile(steps, 99),
            "switch_step_p50_ms": 1000
            * percentile([i.step_s for i in iterations if i.switched], 50),
            "prefill_p50_ms": 1000
            * percentile([i.prefill_s for i in iterations if i.newcomers], 50),
        }
        print(mode, json.dumps(results[mode]), flush=True)
    results["p99_ratio"] = results["every 200 ms"]["step_p99_ms"] / results["none"]["step_p99_ms"]
    return results


def markdown(results: dict[str, Any]) -> str:
    command = f"python benchmarks/worker_speed.py --repeats {results['repeats']}"
    if "skipped" not in results["llama_cpp"]:
        command += " --llama-python PY"
    lines = [
        "# Worker speed",
        "",
        f"torch threads: {results['threads']}; command: `{command}`; "
        f"1-minute load average {results['load_average_before']:.1f} before, "
        f"{results['load_average_after']:.1f} after ({os.cpu_count()} cores)",
        "",
        "## Concurrent streams: worker over gRPC vs transformers static batches",
        "",
        f"Greedy, chat prompts, output lengths {MIN_TOKENS}-{MAX_TOKENS} tokens "
        f"({REQUESTS_PER_STREAM} requests per stream, at least 4); medians of "
        f"{results['repeats']} runs. TPOT: time per output token.",
        "",
        "| streams | ours tok/s | transformers tok/s | ratio | goal | ours TPOT p50 / p99 | "
        f"ours p99 / p50 (goal <= {TPOT_SPREAD_GOAL} at 32) | transformers TPOT p50 / p99 | "
        "ours decode step p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["versus_transformers"]:
        a, b = r["ours"], r["transformers"]
        goal = f">= {r['goal']}x" if r["goal"] else "-"
        lines.append(
            f"| {r['streams']} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
            f"{r['ratio']:.2f}x | {goal} | {a['tpot_p50_ms']:.1f} / {a['tpot_p99_ms']:.1f} ms | "
            f"{r['tpot_p99_over_p50']:.2f} | {b['tpot_p50_ms']:.1f} / {b['tpot_p99_ms']:.1f} ms | "
            f"{r['decode_step_p50_ms']:.1f} ms |"
        )
    lines += memory_markdown(results)
    s = results["switching"]
    lines += [
        "",
        "## Decode-step time while plans switch (16 streams)",
        "",
        "Switches alternate dense and a plan dropping attention and FFN of layers 24-27. "
        "A decode step's time includes a switch made before it (restoring reads the blocks "
        "back from disk) but not the prefill of requests joining in the same iteration, "
        "shown apart.",
        "",
        "| plan switches | decode steps | switches | step p50 | step p99 | "
        "steps with a switch, p50 | prefill p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("none", "every 200 ms"):
        m = s[mode]
        lines.append(
            f"| {mode} | {m['steps']} | {m['switches']} | {m['step_p50_ms']:.1f} ms | "
            f"{m['step_p99_ms']:.1f} ms | {m['switch_step_p50_ms']:.1f} ms | "
            f"{m['prefill_p50_ms']:.1f} ms |"
        )
    lines += ["", f"p99 with switching / without: {s['p99_ratio']:.2f}x", ""]
    return "\n".join(lines)


def squeeze_markdown(results: dict[str, Any]) -> list[str]:
    """The concurrency and squeeze sections."""
    lines: list[str] = []
    c = results["concurrency"]
    lines += [
        "",
        "## Concurrent sequences under one budget: paged vs rectangular KV cache",
        "",
        f"{c['requests']} requests sent at once (seeded); KV budget "
        f"{c['kv_budget_bytes'] / 1e6:.0f} MB (8 rows x 1024 positions), growth window "
        f"{c['growth_tokens']} tokens. Rectangular: rows its admission rule takes from the "
        "same queue (computed). Ours: GetStats every 100 ms, for at most "
        "--concurrency-seconds (requests still running then are cancelled).",
        "",
        "| workload (share: prompt tokens, output tokens) | rectangular (rule) | ours, most at "
        "once | ratio | ours, median while queued | samples | budget overruns | preemptions | "
        "finished / failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in c["workloads"].items():
        o = run["ours"]
        mix = "; ".join(f"{w:.0%}: {p[0]}-{p[1]}, {n[0]}-{n[1]}" for w, p, n in run["shares"])
        lines.append(
            f"| {name} ({mix}) | {run['rectangular_rows']} | {o['max_active']} | "
            f"{o['max_active'] / max(run['rectangular_rows'], 1):.2f}x | "
            f"{o['median_active_while_queued']} | {o['samples']} | {o['overruns']} | "
            f"{run['preemptions']} | {o['finished']} / {o['failed']} |"
        )
    lines += ["", "Goal: at least 2x the rectangular cache's sequences, zero overruns."]
    q = results["squeeze"]
    lines += [
        "",
        f"## A squeeze to half the KV budget with {q['streams']} streams running",
        "",
        f"Budget: weights + every stream's worst case ({q['budget_bytes'] / 1e6:.0f} MB); "
        f"squeezed to weights + half its KV ({q['squeezed_budget_bytes'] / 1e6:.0f} MB) a "
        "third into the run, restored at two thirds.",
        "",
        "| running at the squeeze | asked at step | took effect at step | preempted | "
        "held after (MB) | requests finished | failed |",
        "|---|---|---|---|---|---|---|",
        f"| {q['active_at_squeeze']} | {q['asked_at_step']} | {q['effective_step']} | "
        f"{q['preempted']} | {q['held_after_bytes'] / 1e6:.0f} | {q['requests_finished']} | "
        f"{q['requests_failed']} |",
    ]
    return lines


def memory_markdown(results: dict[str, Any]) -> list[str]:
    """The roofline, concurrency, squeeze and llama.cpp sections."""
    lines = []
    if "roofline" in results:
        r = results["roofline"]
        lines += [
            "",
            "## Batch-1 decode against the memory-bandwidth roofline",
            "",
            f"Read bandwidth {r['bandwidth_gb_s']:.1f} GB/s (fastest sum over a 256 MB tensor); "
            f"{r['weight_bytes'] / 1e6:.0f} MB of weights read per token: roofline "
            f"{r['roofline_tokens_per_s']:.1f} tok/s. Ours, decode steps of the 1-stream run: "
            f"{r['batch1_decode_tokens_per_s']:.1f} tok/s = **{r['fraction']:.0%}** of it "
            f"(goal >= {r['goal']:.0%}).",
        ]
    if "concurrency" in results:
        lines += squeeze_markdown(results)
    ll = results["llama_cpp"]
    lines += ["", "## llama.cpp (llama-cpp-python)", ""]
    if "skipped" in ll:
        lines.append(f"Not run: {ll['skipped']}")
    else:
        ours = {r["streams"]: r["ours"]["tokens_per_s"] for r in results["versus_transformers"]}
        lines += [
            "Greedy from the chat prompt, evaluated first (not timed); several sequences "
            "decode together, one llama_decode per step. Ours: the runs above (float32, over "
            "gRPC, prefill included, 1/8/32 streams).",
            "",
            "| GGUF | llama.cpp 1 / 8 / 32 sequences, tok/s | ours 1 / 8 / 32 streams, tok/s |",
            "|---|---|---|",
        ]
        mine = " / ".join(f"{ours[n]:.1f}" if n in ours else "-" for n in (1, 8, 32))
        for run in ll["runs"]:
            together = run["aggregate_tokens_per_s"]
            theirs = " / ".join(
                [f"{run['tokens_per_s']:.1f}", *(f"{together[str(n)]:.1f}" for n in (8, 32))]
            )
            lines.append(f"| {run['gguf']} | {theirs} | {mine} |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--switch-seconds", type=float, default=15.0)
    parser.add_argument(
        "--streams",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=STREAMS,
        help="comma-separated concurrency levels (default 1,8,32)",
    )
    parser.add_argument("--concurrency-seconds", type=float, default=60.0)
    parser.add_argument(
        "--step-tokens", type=int, help="the engine's per-step token budget (default: its own)"
    )
    parser.add_argument("--skip-concurrency", action="store_true", help="no memory sections")
    parser.add_argument("--squeeze-seconds", type=float, default=45.0)
    parser.add_argument(
        "--llama-python",
        help="python of an environment with llama-cpp-python built (optional peer)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import torch

    from elasticfleet.worker.model.generation import chat_prompt, load_tokenizer
    from elasticfleet.worker.model.llama import ElasticLlama
    from elasticfleet.worker.model.memory import predict_memory
    from elasticfleet.worker.model.prepare import prepare_model
    from elasticfleet.worker.serving.engine import Engine
    from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions

    model_dir = prepare_model(progress=False)
    model = ElasticLlama.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompts = {
        q: list(tokenizer.encode(chat_prompt(q), add_special_tokens=False).ids) for q in QUESTIONS
    }
    budget = predict_memory(model.config, None, 64, 512).total_bytes
    tuning = {} if args.step_tokens is None else {"step_tokens": args.step_tokens}
    engine = Engine(model, tokenizer, budget_bytes=budget, **tuning)
    server = BackgroundServer(engine, ServerOptions())
    target = f"127.0.0.1:{server.port}"
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_average_before": os.getloadavg()[0],
    }
    # Clients run in their own process, as they would in production: in the
    # worker's process they would compete with it for the GIL.
    spawn = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as client:
            results["versus_transformers"] = versus_transformers(
                model_dir, engine, target, prompts, args.repeats, client, args.streams
            )
            single = [r for r in results["versus_transformers"] if r["streams"] == 1]
            if single:
                results["roofline"] = roofline(engine, single[0]["decode_step_p50_ms"] / 1000)
            results["switching"] = switching(engine, target, args.switch_seconds, client)
            if not args.skip_concurrency:
                seconds = args.concurrency_seconds
                results["concurrency"] = concurrency(engine, target, client, seconds)
                results["squeeze"] = squeeze(engine, target, client, args.squeeze_seconds)
                print("squeeze", json.dumps(results["squeeze"]), flush=True)
    finally:
        server.stop()
    results["llama_cpp"] = llama_cpp(args.llama_python, model_dir, chat_prompt(QUESTIONS[0]))
    # Other work on the machine slows both sides; the ratios are what to read.
    results["load_average_after"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worker_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "worker_speed.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
