"""A bounded load test of a real server on 127.0.0.1: 300 concurrent
streams while plans switch every 200 ms. No request may fail, the budget may
never be exceeded (sampled through GetStats and checked against the memory
model), and every completion must be what the documented plan-switch
semantics say."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from tokenizers import Tokenizer

from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.generation import TOKENIZER_FILE
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import kv_bytes_per_token, predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import AsyncWorkerClient, CompletionResult, WorkerClient
from elasticfleet.worker.serving.client import generate_request as make_request
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]

Reference = Callable[[Sequence[int], int, PruningPlan | None, dict[int, PruningPlan]], list[int]]

REQUESTS = 300
SWITCH_EVERY_S = 0.2
LAYERS = 4
PLANS = {
    "dense": PruningPlan.dense(LAYERS),
    "no-attn-1-3": PruningPlan.from_dropped(LAYERS, attention=[1, 3]),
    "no-ffn-0-2": PruningPlan.from_dropped(LAYERS, attention=[3], ffn=[0, 2]),
    "no-attn-0": PruningPlan.from_dropped(LAYERS, attention=[0], ffn=[1]),
}


class Switcher(threading.Thread):
    """Applies the plans in turn, 200 ms after each switch; records each outcome."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.stop = threading.Event()
        self.applied: list[pb.ApplyPlanResponse] = []
        self.refused: list[str] = []

    def run(self) -> None:
        names = list(PLANS)
        with WorkerClient(self.target) as client:
            turn = 1
            while not self.stop.wait(SWITCH_EVERY_S):
                name = names[turn % len(names)]
                turn += 1
                try:
                    # Applied at the next step (preempting what no longer fits).
                    self.applied.append(client.apply_plan(name, PLANS[name].to_mask()))
                except grpc.RpcError as error:
                    self.refused.append(f"{name}: {error}")


class Sampler(threading.Thread):
    """Samples GetStats every 20 ms."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.stop = threading.Event()
        self.samples: list[pb.GetStatsResponse] = []

    def run(self) -> None:
        with WorkerClient(self.target) as client:
            while not self.stop.wait(0.02):
                self.samples.append(client.get_stats())


def test_load_with_plan_switches(
    served_model_dir: Path, one_thread: None, reference_tokens: Reference
) -> None:
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    config = model.config
    # Room for 24 dense sequences of 64 positions: requests must queue.
    budget = predict_memory(config, None, 24, 64).total_bytes
    tokenizer = Tokenizer.from_file(str(served_model_dir / TOKENIZER_FILE))
    engine = Engine(model, tokenizer, budget_bytes=budget, max_queue=REQUESTS, plan_id="dense")
    step = engine.step

    def paced_step() -> bool:  # ~10 ms steps: the run spans a few seconds of switches
        time.sleep(0.008)
        return step()

    engine.step = paced_step  # type: ignore[method-assign]
    # A switch to a plan with more attention blocks preempts requests (their
    # blocks grow); recomputed, they follow the new plan from their first
    # token, which the reference below does not model: they are only counted.
    preempted: set[str] = set()
    preempt = engine._preempt

    def recording_preempt(request: Any) -> None:
        preempted.add(request.id)
        preempt(request)

    engine._preempt = recording_preempt  # type: ignore[method-assign]
    server = BackgroundServer(engine, ServerOptions())
    target = f"127.0.0.1:{server.port}"
    chooser = random.Random(5)
    prompts = [
        "".join(chooser.choice("abcdefghij klmnop") for _ in range(chooser.randint(2, 20)))
        for _ in range(REQUESTS)
    ]
    lengths = [chooser.randint(4, 24) for _ in range(REQUESTS)]
    switcher, sampler = Switcher(target), Sampler(target)

    async def run_all() -> list[CompletionResult]:
        async with AsyncWorkerClient(target) as client:
            requests = [
                make_request(p, max_new_tokens=n, ignore_eos=True, request_id=f"r{i}")
                for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
            ]
            return list(await asyncio.gather(*(client.complete(r, timeout=120) for r in requests)))

    started = time.monotonic()
    switcher.start()
    sampler.start()
    try:
        results = asyncio.run(run_all())
    finally:
        switcher.stop.set()
        sampler.stop.set()
        switcher.join()
        sampler.join()
        server.stop()
    elapsed = time.monotonic() - started

    # Zero failed requests, each with exactly its tokens.
    assert [len(r.token_ids) for r in results] == lengths
    assert all(r.finish_reason == "length" for r in results)
    assert engine.counters.requests_finished == REQUESTS
    assert engine.counters.requests_failed == engine.counters.requests_cancelled == 0

    # Plans switched all along; each response says when it took effect.
    assert not switcher.refused
    assert len(switcher.applied) >= 5, elapsed
    effective = [(0, "dense")] + [(a.effective_step, a.plan_id) for a in switcher.applied]
    assert [s for s, _ in effective] == sorted(s for s, _ in effective)

    def plan_at(step: int) -> str:
        return [name for start, name in effective if start <= step][-1]

    spanning = 0
    for result in results:
        steps = [m.decode_step for m in result.messages]
        assert steps == sorted(steps)
        for message in result.messages:
            assert message.plan_id == plan_at(message.decode_step)
        spanning += len({m.plan_id for m in result.messages}) > 1
    assert spanning >= 20
    assert engine.counters.preemptions >= len(preempted)
    assert len(preempted) < REQUESTS // 2

    # The budget held at every sample, and the figures are the memory model's.
    assert len(sampler.samples) >= 20
    per_token = kv_bytes_per_token(config, "float32")
    for stats in sampler.samples:
        memory = stats.memory
        assert memory.weight_bytes + memory.kv_reserved_bytes + memory.adapter_bytes <= budget
        plan = PruningPlan.from_mask(list(stats.keep_mask))
        assert memory.weight_bytes == predict_memory(config, plan, 0, 0).weight_bytes
        # The pool is whole blocks, and GetStats counts them exactly.
        per_block = sum(plan.keep_attention) * per_token * memory.kv_block_tokens
        assert memory.kv_reserved_bytes == memory.kv_blocks_reserved * per_block
        assert memory.kv_committed_bytes == memory.kv_blocks_committed * per_block
        assert memory.kv_blocks_in_use < memory.kv_blocks_reserved or not stats.active_sequences
        assert memory.kv_used_bytes <= memory.kv_blocks_in_use * per_block
    assert max(s.active_sequences for s in sampler.samples) > 1
    assert max(s.queue_depth for s in sampler.samples) > 0
    idle = engine.stats().picture
    measured = account(engine.model)
    assert (idle.weight_bytes, idle.kv_reserved_bytes) == (measured.weight_bytes, 0)

    # Completions are what the documented semantics give, computed alone
    # (for 30 that spanned a switch and 10 that did not: the reference
    # costs ~50 ms a request here; plan ids were checked for all of them).
    by_name = {**PLANS}
    budget_left = {True: 30, False: 10}
    for result, prompt, count in zip(results, prompts, lengths, strict=True):
        if result.request_id in preempted:
            continue
        spans = len({m.plan_id for m in result.messages}) > 1
        budget_left[spans] -= 1
        if budget_left[spans] < 0:
            continue
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        first = result.messages[0].decode_step
        start = by_name[plan_at(first)]
        switches: dict[int, PruningPlan] = {}
        produced = 0
        current = plan_at(first)
        for message in result.messages:
            name = plan_at(message.decode_step)
            if name != current:
                switches[produced] = by_name[name]
                current = name
            produced += len(message.token_ids)
        assert result.token_ids == reference_tokens(ids, count, start, switches), result.request_id
