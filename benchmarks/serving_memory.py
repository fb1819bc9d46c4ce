"""What the paged KV cache buys, measured on a real worker over gRPC (part of
benchmarks/worker_speed.py, which owns the worker and the client process).

1. Concurrency under one budget: two workloads mixing prompt and output
   lengths (WORKLOADS: uniform prompts of 64-768 tokens and outputs of
   16-256; and chat-like, 80% short requests with prompts of 32-128 and
   outputs of 16-128, 20% long ones with prompts of 512-1024 and outputs
   of 128-256), all sent at once to a worker whose KV budget holds
   RECT_ROWS rows of RECT_TOKENS positions. Ours: the
   most sequences running at once, from GetStats sampled every 100 ms, each
   sample also checked for a budget overrun (weights + reserved KV +
   adapters above the budget). The rectangular cache this replaced: the
   rows its admission rule (rows x the longest admitted request's prompt +
   max_new_tokens, by predict_memory; worker/serving/admission.py before
   the paged cache) admits from the same queue under the same budget,
   computed, not run.
2. A squeeze: 32 closed-loop streams on a budget that holds all their
   worst cases, then the KV part of the budget halved by ApplyPlan: the
   step the switch took effect at against the step it was asked at, the
   requests it preempted, and the failed requests (none allowed).

Functions named `*_client` run in the client process and import no torch.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Any

from chat_workload import QUESTIONS

from elasticfleet.worker.serving.client import AsyncWorkerClient, generate_request

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from elasticfleet.worker.serving.engine import Engine

RECT_ROWS, RECT_TOKENS = 8, 1024
MIXED_REQUESTS = 48
# name -> [(share of requests, prompt token range, output token range)]
WORKLOADS = {
    "uniform": [(1.0, (64, 768), (16, 256))],
    "short and long": [(0.8, (32, 128), (16, 128)), (0.2, (512, 1024), (128, 256))],
}
SAMPLE_S = 0.1
SQUEEZE_STREAMS = 32


def mixed_workload(tokenizer: Tokenizer, name: str, seed: int = 7) -> list[tuple[str, int, int]]:
    """(prompt text, its token count, max_new_tokens) of workload `name`:
    questions repeated to a drawn length, cut there and decoded back to text."""
    chooser = random.Random(seed)
    filler = " ".join(QUESTIONS * 128)
    ids = tokenizer.encode(filler, add_special_tokens=False).ids
    shares = WORKLOADS[name]
    requests = []
    for _ in range(MIXED_REQUESTS):
        _, prompts, outputs = chooser.choices(shares, weights=[w for w, _, _ in shares])[0]
        text = tokenizer.decode(ids[: chooser.randint(*prompts)])
        count = len(tokenizer.encode(text, add_special_tokens=False).ids)
        requests.append((text, count, chooser.randint(*outputs)))
    return requests


def rectangular_rows(engine: Engine, requests: list[tuple[str, int, int]], kv_budget: int) -> int:
    """Rows the rectangular cache's admission took from this queue, first
    come first served: n rows fit while n x the longest worst case of the
    first n requests fits the KV budget."""
    from elasticfleet.worker.model.memory import predict_memory

    config, plan = engine.model.config, engine.model.plan
    rows, longest = 0, 0
    for _, prompt, new in requests:
        longest = max(longest, min(prompt + new, config.max_position_embeddings))
        if predict_memory(config, plan, rows + 1, longest).kv_bytes > kv_budget:
            break
        rows += 1
    return rows


def mixed_client(
    target: str, requests: list[tuple[str, int, int]], seconds: float
) -> dict[str, Any]:
    """Send every request at once, sample GetStats until they finish or
    `seconds` pass (the rest are cancelled): the samples' concurrency and overruns."""
    samples: list[dict[str, int]] = []

    async def one(client: AsyncWorkerClient, text: str, new: int) -> int:
        request = generate_request(text, max_new_tokens=new, ignore_eos=True)
        tokens = 0
        async for message in client.generate(request):
            tokens += len(message.token_ids)
        return tokens

    async def sample(client: AsyncWorkerClient, done: asyncio.Event) -> None:
        while not done.is_set():
            stats = await client.get_stats(timeout=30)
            memory = stats.memory
            held = memory.weight_bytes + memory.kv_reserved_bytes + memory.adapter_bytes
            samples.append(
                {
                    "active": stats.active_sequences,
                    "queued": stats.queue_depth,
                    "overrun": int(held > memory.budget_bytes),
                    "blocks_in_use": memory.kv_blocks_in_use,
                    "blocks_reserved": memory.kv_blocks_reserved,
                }
            )
            await asyncio.sleep(SAMPLE_S)

    async def run() -> dict[str, Any]:
        async with AsyncWorkerClient(target) as client:
            done = asyncio.Event()
            sampler = asyncio.ensure_future(sample(client, done))
            calls = [asyncio.ensure_future(one(client, t, n)) for t, _, n in requests]
            finished, pending = await asyncio.wait(calls, timeout=seconds)
            for call in pending:
                call.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            done.set()
            await sampler
            failed = [c for c in finished if c.exception() is not None]
            return {"finished": len(finished) - len(failed), "failed": len(failed)}

    outcome = asyncio.run(run())
    saturated = [s["active"] for s in samples if s["queued"]]
    return {
        **outcome,
        "samples": len(samples),
        "overruns": sum(s["overrun"] for s in samples),
        "max_active": max(s["active"] for s in samples),
        "median_active_while_queued": sorted(saturated)[len(saturated) // 2] if saturated else 0,
        "max_blocks_reserved": max(s["blocks_reserved"] for s in samples),
    }


def concurrency(engine: Engine, target: str, client: Any, seconds: float) -> dict[str, Any]:
    """Section 1 (see the module), for each workload."""
    from elasticfleet.worker.model.memory import predict_memory

    config, plan = engine.model.config, engine.model.plan
    kv_budget = predict_memory(config, plan, RECT_ROWS, RECT_TOKENS).kv_bytes
    weights = engine.stats().picture.weight_bytes
    engine.submit_plan(plan, "concurrency", budget_bytes=weights + kv_budget).result(timeout=60)
    runs = {}
    for name, shares in WORKLOADS.items():
        requests = mixed_workload(engine.tokenizer, name)
        preempted = engine.counters.preemptions
        ours = client.submit(mixed_client, target, requests, seconds).result()
        runs[name] = {
            "shares": shares,
            "rectangular_rows": rectangular_rows(engine, requests, kv_budget),
            "ours": ours,
            "preemptions": engine.counters.preemptions - preempted,
        }
        print(name, runs[name], flush=True)
    return {
        "kv_budget_bytes": kv_budget,
        "growth_tokens": engine.admission.growth_tokens,
        "requests": MIXED_REQUESTS,
        "workloads": runs,
    }


def squeeze_client(target: str, seconds: float) -> dict[str, Any]:
    """SQUEEZE_STREAMS closed-loop chat streams for `seconds`; every request
    must end with all the tokens it asked for."""
    deadline = time.perf_counter() + seconds
    counts = {"finished": 0, "failed": 0}

    async def stream(client: AsyncWorkerClient, offset: int) -> None:
        index = offset
        while time.perf_counter() < deadline:
            question = QUESTIONS[index % len(QUESTIONS)]
            index += 1
            request = generate_request(
                question, max_new_tokens=96, chat_template=True, ignore_eos=True
            )
            tokens = 0
            try:
                async for message in client.generate(request):
                    tokens += len(message.token_ids)
            except Exception:
                counts["failed"] += 1
                continue
            counts["finished" if tokens == 96 else "failed"] += 1

    async def run() -> None:
        async with AsyncWorkerClient(target) as client:
            await asyncio.gather(*(stream(client, i) for i in range(SQUEEZE_STREAMS)))

    asyncio.run(run())
    return counts


def squeeze(engine: Engine, target: str, client: Any, seconds: float) -> dict[str, Any]:
    """Section 2 (see the module): the budget holds every stream's worst
    case (longest chat prompt + 96 tokens); the squeeze halves its KV part
    a third of the way into the run, and the budget is restored at two thirds."""
    from elasticfleet.worker.model.generation import chat_prompt
    from elasticfleet.worker.model.memory import BLOCK_TOKENS, blocks_for

    plan = engine.model.plan
    longest = max(
        len(engine.tokenizer.encode(chat_prompt(q), add_special_tokens=False).ids)
        for q in QUESTIONS
    )
    blocks = 1 + SQUEEZE_STREAMS * blocks_for(longest + 96)
    full = engine.admission.total_bytes(plan, blocks, 0)
    weights = engine.admission.total_bytes(plan, 0, 0)
    half = weights + (full - weights) // 2
    engine.submit_plan(plan, "full", budget_bytes=full).result(timeout=60)
    failed_before = engine.counters.requests_failed
    load = client.submit(squeeze_client, target, seconds)
    time.sleep(seconds / 3)
    active = engine.stats().picture.active_sequences
    asked_at = engine.step_count
    switch = engine.submit_plan(plan, "half", budget_bytes=half).result(timeout=60)
    time.sleep(seconds / 3)
    engine.submit_plan(plan, "restored", budget_bytes=full).result(timeout=60)
    counts = load.result()
    return {
        "streams": SQUEEZE_STREAMS,
        "block_tokens": BLOCK_TOKENS,
        "budget_bytes": full,
        "squeezed_budget_bytes": half,
        "active_at_squeeze": active,
        "asked_at_step": asked_at,
        "effective_step": switch.effective_step,
        "steps_to_take_effect": switch.effective_step - asked_at,
        "preempted": switch.preempted,
        "held_after_bytes": switch.bytes_after,
        "requests_finished": counts["finished"],
        "requests_failed": counts["failed"] + engine.counters.requests_failed - failed_before,
    }
