"""The control loop against the real worker server (the project's gRPC
WorkerServer and Engine on the tiny random model, on 127.0.0.1), with the
tiny model's own block profile found through $ELASTICFLEET_PROFILES.

The worker's device is the one thing faked: its memory figures are set by
the test, so other processes can squeeze it and let go again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fake_fleet import RecordingSink
from tokenizers import Tokenizer, models

from elasticfleet.agent.profile import profile_model
from elasticfleet.operator.control import (
    FleetController,
    WorkerEndpoint,
    plaintext_connect,
    profile_for_model,
)
from elasticfleet.operator.spec import FleetSpec
from elasticfleet.worker import server as worker_server
from elasticfleet.worker.client import AsyncWorkerClient
from elasticfleet.worker.engine import Engine
from elasticfleet.worker.model import ElasticLlama
from elasticfleet.worker.plan import PruningPlan
from elasticfleet.worker.telemetry import DeviceMemory

MODEL = "tiny-llama"
DEVICE_BYTES = 8 * 2**20


class Device:
    """The worker's device: other processes hold `others` bytes of it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.others = 0

    def __call__(self, gpu_index: int = 0) -> DeviceMemory:
        picture = self.engine.stats().picture
        own = picture.weight_bytes + picture.kv_reserved_bytes + picture.adapter_bytes
        used = self.others + own
        return DeviceMemory(DEVICE_BYTES, used, DEVICE_BYTES - used, "host", "set by the test")


@pytest.fixture
def profiles(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The tiny model's profile (two steps of Greedy Sequential Importance
    over its 8 blocks, the proxy ranking the rest), where the operator looks
    for profiles."""
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(3))
    model = ElasticLlama.from_pretrained(tiny_model_dir, packed=False)
    profile_model(
        model, tokens, out_path=tmp_path / f"{MODEL}.json", progress=False, model_name=MODEL
    )
    monkeypatch.setenv("ELASTICFLEET_PROFILES", str(tmp_path))
    yield tmp_path


def test_loop_plans_a_real_worker(
    tiny_model_dir: Path, profiles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ElasticLlama.from_pretrained(tiny_model_dir, packed=False)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    engine = Engine(model, tokenizer, budget_bytes=2**20)
    device = Device(engine)
    monkeypatch.setattr(worker_server, "device_memory", device)
    running = worker_server.BackgroundServer(engine, worker_server.ServerOptions(model_name=MODEL))
    spec = FleetSpec.parse(
        "tiny",
        "ns",
        {
            "model": {"name": MODEL},
            "worker": {"image": "img"},
            "memoryPolicy": {"policy": "greedy", "budget": {"fraction": 0.5}},
        },
    )
    profile = profile_for_model(MODEL)
    dense = PruningPlan.dense(profile.config.num_hidden_layers)
    weights = engine.stats().picture.weight_bytes

    async def run() -> None:
        sink = RecordingSink()
        controller = FleetController(spec, profile, plaintext_connect, sink)
        endpoints = [WorkerEndpoint("tiny-0", f"127.0.0.1:{running.port}")]
        try:
            # Plenty: the dense model stays, the derived budget is sent.
            report = await controller.tick(endpoints)
            assert engine.stats().picture.budget_bytes == DEVICE_BYTES // 2
            assert report.status["workers"][0]["plan"]["keptAttention"] == 4

            # Squeezed below the dense weights: blocks go, the worker frees them.
            device.others = DEVICE_BYTES - weights
            report = await controller.tick(endpoints)
            (outcome,) = report.outcomes
            assert outcome.changed and outcome.plan is not None
            assert outcome.plan.kept_blocks < 8
            stats = await AsyncWorkerClient(endpoints[0].address).get_stats()
            assert stats.plan_id == outcome.status["plan"]["id"]
            assert list(stats.keep_mask) == outcome.plan.to_mask()
            assert stats.memory.weight_bytes < weights
            assert [e.reason for e in sink.events] == ["PlanChanged"]

            # Relaxed: every block is restored.
            device.others = 0
            report = await controller.tick(endpoints)
            assert report.outcomes[0].plan == dense
            assert engine.stats().picture.weight_bytes == weights
        finally:
            await controller.close()

    try:
        asyncio.run(run())
    finally:
        running.stop()
