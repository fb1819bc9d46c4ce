"""The control loop against the real worker server (the project's gRPC
WorkerServer and Engine on the tiny random model, on 127.0.0.1), with the
tiny model's own block profile found through $ELASTICFLEET_PROFILES.

The worker's device is simulated (`telemetry.SimulatedDevice`): the
test writes what other processes hold into its file, squeezing the worker
and letting go again; one device keeps freed memory reserved, as a GPU's
caching allocator does.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL
from fake_fleet import RecordingSink
from tiny_fleet import DEVICE_BYTES, squeeze
from tokenizers import Tokenizer, models

from elasticfleet.agent.policy import PolicyState
from elasticfleet.cli import main
from elasticfleet.demo.fleet import demo_figures
from elasticfleet.operator.budget import DeviceFigures, derive_budget, planned_load
from elasticfleet.operator.control import (
    FleetController,
    WorkerEndpoint,
    build_policy,
    plaintext_connect,
    profile_for_model,
)
from elasticfleet.operator.spec import FleetSpec
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import AsyncWorkerClient, generate_request
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions
from elasticfleet.worker.serving.telemetry import SimulatedDevice, write_simulated_device

SPEC = FleetSpec.parse(
    "tiny",
    "ns",
    {
        "model": {"name": TINY_MODEL},
        "worker": {"image": "img"},
        "memoryPolicy": {"policy": "greedy", "budget": {"fraction": 0.5}},
    },
)


def tiny_engine(model_dir: Path, device: Path, budget: int = 2**20) -> Engine:
    """An engine on the tiny model (every prompt one token) on the
    simulated device in the file `device`."""
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    return Engine(model, tokenizer, budget_bytes=budget, device=SimulatedDevice(device))


def slow_iterations(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, seconds: float, idle_only: bool = False
) -> None:
    """Make each iteration that runs sequences take `seconds` more between
    its decode step and the end, where the KV cache of the requests it
    finished is freed and the engine's picture is taken (only the iteration
    that leaves the engine idle, with `idle_only`)."""
    record_step = engine.mix.record_step

    def slow(rows: int, tokens: int) -> None:
        record_step(rows, tokens)
        if not idle_only or engine.idle():
            time.sleep(seconds)

    monkeypatch.setattr(engine.mix, "record_step", slow)


def test_loop_plans_a_real_worker(
    tiny_model_dir: Path, tiny_profiles: Path, tmp_path: Path
) -> None:
    device = tmp_path / "device.json"
    squeeze(device, 0)
    engine = tiny_engine(tiny_model_dir, device)
    running = BackgroundServer(engine, ServerOptions(model_name=TINY_MODEL))
    spec = SPEC
    profile = profile_for_model(TINY_MODEL)
    dense = PruningPlan.dense(profile.config.num_hidden_layers)
    weights = engine.stats().picture.weight_bytes

    async def run() -> None:
        sink = RecordingSink()
        controller = FleetController(spec, profile, plaintext_connect)
        endpoints = [WorkerEndpoint("tiny-0", f"127.0.0.1:{running.port}")]
        try:
            # Plenty: the dense model stays, the derived budget is sent.
            report = await controller.tick(endpoints, sink)
            assert engine.stats().picture.budget_bytes == DEVICE_BYTES // 2
            (worker,) = report.status.workers or ()
            assert worker.plan is not None and worker.plan.kept_attention == 4

            # Squeezed below the dense weights: blocks go, the worker frees them.
            squeeze(device, DEVICE_BYTES - weights)
            report = await controller.tick(endpoints, sink)
            (outcome,) = report.outcomes
            assert outcome.changed and outcome.plan is not None
            assert outcome.plan.kept_blocks < 8
            stats = await AsyncWorkerClient(endpoints[0].address).get_stats()
            assert outcome.status.plan is not None
            assert stats.plan_id == outcome.status.plan.id
            assert list(stats.keep_mask) == outcome.plan.to_mask()
            assert stats.memory.weight_bytes < weights
            own = stats.memory.weight_bytes + stats.memory.kv_reserved_bytes
            assert stats.device.total_bytes == DEVICE_BYTES
            assert stats.device.used_bytes == DEVICE_BYTES - weights + own
            assert stats.device.own_bytes == own
            assert stats.device.source == pb.MEMORY_SOURCE_SIMULATED
            assert [e.reason for e in sink.events] == ["PlanChanged"]

            # Relaxed: every block is restored.
            squeeze(device, 0)
            report = await controller.tick(endpoints, sink)
            assert report.outcomes[0].plan == dense
            assert engine.stats().picture.weight_bytes == weights
        finally:
            await controller.close()

    try:
        asyncio.run(run())
    finally:
        running.stop()


def test_the_loop_command_sends_the_token(
    tiny_model_dir: Path,
    tiny_profiles: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`elasticfleet operator loop` against a worker that requires a token:
    refused without it, planned with it (from $ELASTICFLEET_TOKEN)."""
    squeeze(tmp_path / "device.json", 0)
    options = ServerOptions(model_name=TINY_MODEL, token="loop-token")
    running = BackgroundServer(tiny_engine(tiny_model_dir, tmp_path / "device.json"), options)
    fleet = tmp_path / "fleet.yaml"
    spec = {
        "model": {"name": TINY_MODEL},
        "worker": {"image": "img"},
        "memoryPolicy": {"policy": "greedy", "budget": {"fraction": 0.5}},
    }
    fleet.write_text(yaml.safe_dump({"metadata": {"name": "tiny"}, "spec": spec}))
    command = ["operator", "loop", str(fleet), "--worker", f"w0=127.0.0.1:{running.port}"]
    try:
        monkeypatch.delenv("ELASTICFLEET_TOKEN", raising=False)
        assert main(command) == 0
        (refused,) = yaml.safe_load(capsys.readouterr().out)["status"]["workers"]
        assert refused["reachable"] is False and "UNAUTHENTICATED" in refused["message"]
        monkeypatch.setenv("ELASTICFLEET_TOKEN", "loop-token")
        assert main(command) == 0
        (planned,) = yaml.safe_load(capsys.readouterr().out)["status"]["workers"]
        assert planned["reachable"] is True and planned["plan"]["keptAttention"] == 4
    finally:
        running.stop()


def test_a_tick_as_a_request_finishes_budgets_what_the_others_really_hold(
    tiny_model_dir: Path, tiny_profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression for the demo's flake (tests/demo, the tiny model: a plan
    predicted at 640,000 bytes pushed to a worker whose budget is 604,774).

    The demo squeezes a worker right after it answered a prompt, and ticks.
    GetStats took the device with the engine's picture from the iteration
    before, when the iteration that sent the last token had not yet freed
    the request's KV cache (8 rows of 64 positions: 524,288 bytes). With it
    the squeezed device was full, and a device holds no more than its total,
    so the others seemed to hold 70,707 bytes less than they did: budget
    640,128, and a plan for it (one FFN dropped, 640,000 bytes predicted)
    over the 604,774 the others really leave. Here that iteration's end is
    slow, so the tick always falls into it; GetStats must wait for it."""
    profile = profile_for_model(TINY_MODEL)
    figures = demo_figures(profile, 0.8)  # the demo's device and squeeze
    path = tmp_path / "device.json"
    write_simulated_device(path, figures.total_bytes, 0)
    engine = tiny_engine(tiny_model_dir, path, budget=figures.total_bytes // 2)
    slow_iterations(engine, monkeypatch, 1.0, idle_only=True)
    running = BackgroundServer(engine, ServerOptions(model_name=TINY_MODEL))
    squeezed = figures.budget(SPEC.memory, figures.squeeze_others_bytes)

    async def run() -> None:
        controller = FleetController(SPEC, profile, plaintext_connect)
        endpoints = [WorkerEndpoint("tiny-0", f"127.0.0.1:{running.port}")]
        sink = RecordingSink()
        try:
            await controller.tick(endpoints, sink)  # plenty: the dense plan stays
            request = generate_request("Why is the sky blue?", max_new_tokens=6, ignore_eos=True)
            async with AsyncWorkerClient(endpoints[0].address) as client:
                await client.complete(request, timeout=60)
            # Told "done", while the engine's latest picture still holds the KV.
            assert engine.stats().picture.kv_reserved_bytes > 0
            write_simulated_device(path, figures.total_bytes, figures.squeeze_others_bytes)
            report = await controller.tick(endpoints, sink)
        finally:
            await controller.close()
        (outcome,) = report.outcomes
        assert outcome.record is not None, outcome.error
        assert outcome.record.budget_bytes == squeezed
        assert outcome.record.predicted_bytes <= squeezed

    try:
        asyncio.run(run())
    finally:
        running.stop()


def test_the_loop_converges_on_a_real_worker_with_a_caching_allocator(
    tiny_model_dir: Path, tiny_profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real worker on a device that keeps what it frees reserved until
    a plan switch releases it, under the real loop, tick by tick: idle; a
    request running across a tick (its KV cache allocated at one reading,
    freed but still reserved at the next); a squeeze; the others' memory
    moving; then steady. Each reading is of one moment (used less own is
    what the others hold); every budget is what the others leave and every
    plan the policy's for it (none smaller), within its budget; once nothing
    changes, nothing more is pushed (tests/operator/test_convergence.py has
    the same over many more schedules, with fake workers)."""
    profile = profile_for_model(TINY_MODEL)
    path = tmp_path / "device.json"
    engine = tiny_engine(tiny_model_dir, path)
    weights = engine.stats().picture.weight_bytes
    total = 4 * weights
    write_simulated_device(path, total, 0, caching_allocator=True)
    slow_iterations(engine, monkeypatch, 0.05)  # a request spans a tick
    running = BackgroundServer(engine, ServerOptions(model_name=TINY_MODEL))
    policy = build_policy(SPEC)
    # What the others hold, in dense weights, from the squeeze on.
    moving = [2.2, 2.2, 1.5, 2.1, 0.5, 2.2, 1.8] + [2.0] * 5

    async def run() -> None:
        controller = FleetController(SPEC, profile, plaintext_connect)
        endpoints = [WorkerEndpoint("tiny-0", f"127.0.0.1:{running.port}")]
        sink = RecordingSink()
        ticks = []

        async def tick(others: int) -> None:
            write_simulated_device(path, total, others, caching_allocator=True)
            report = await controller.tick(endpoints, sink)
            (outcome,) = report.outcomes
            assert not outcome.error, outcome.error
            (entry,) = report.status.workers or ()
            assert entry.device is not None and entry.device.own_bytes is not None
            assert entry.device.used_bytes - entry.device.own_bytes == others  # one reading
            truth = derive_budget(SPEC.memory, DeviceFigures(total, others, 0))
            mix = entry.request_mix
            assert mix is not None and entry.budget_bytes is not None
            load = planned_load(
                mix.batch_size_p90,
                mix.sequence_tokens_p90,
                mix.active_sequences,
                profile.config.max_position_embeddings,
            )
            state = PolicyState(truth, load.batch_size, load.seq_len, profile)
            assert outcome.plan == policy.decide(state)
            assert abs(entry.budget_bytes - truth) <= 0.02 * truth
            if outcome.record is not None:
                assert outcome.record.budget_bytes == truth
                assert outcome.record.predicted_bytes <= truth
            ticks.append((entry, outcome.changed))

        request = generate_request("x", max_new_tokens=40, ignore_eos=True)
        try:
            await tick(0)
            async with AsyncWorkerClient(endpoints[0].address) as client:
                answer = asyncio.create_task(client.complete(request, timeout=60))
                while engine.stats().picture.active_sequences == 0:
                    await asyncio.sleep(0.01)
                await tick(0)
                await answer
            await tick(0)
            for share in moving:
                await tick(int(share * weights))
        finally:
            await controller.close()
        during, after = ticks[1][0], ticks[2][0]
        assert during.kv_bytes and not after.kv_bytes  # freed ...
        assert during.device is not None and after.device is not None
        assert after.device.own_bytes == during.device.own_bytes  # ... but still reserved
        assert any(changed for _entry, changed in ticks)  # the squeeze pruned
        assert not any(changed for _entry, changed in ticks[-4:])  # and it settled

    try:
        asyncio.run(run())
    finally:
        running.stop()
