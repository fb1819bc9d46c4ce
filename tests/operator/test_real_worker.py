"""The control loop against the real worker server (the project's gRPC
WorkerServer and Engine on the tiny random model, on 127.0.0.1), with the
tiny model's own block profile found through $ELASTICFLEET_PROFILES.

The worker's device is simulated (`telemetry.SimulatedDevice`): the
test writes what other processes hold into its file, squeezing the worker
and letting go again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL
from fake_fleet import RecordingSink
from tiny_fleet import DEVICE_BYTES, squeeze
from tokenizers import Tokenizer, models

from elasticfleet.cli import main
from elasticfleet.operator.control import (
    FleetController,
    WorkerEndpoint,
    plaintext_connect,
    profile_for_model,
)
from elasticfleet.operator.spec import FleetSpec
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import AsyncWorkerClient
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions
from elasticfleet.worker.serving.telemetry import SimulatedDevice


def test_loop_plans_a_real_worker(
    tiny_model_dir: Path, tiny_profiles: Path, tmp_path: Path
) -> None:
    model = ElasticLlama.from_pretrained(tiny_model_dir, packed=False)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    device = tmp_path / "device.json"
    squeeze(device, 0)
    engine = Engine(model, tokenizer, budget_bytes=2**20, device=SimulatedDevice(device))
    options = ServerOptions(model_name=TINY_MODEL)
    running = BackgroundServer(engine, options)
    spec = FleetSpec.parse(
        "tiny",
        "ns",
        {
            "model": {"name": TINY_MODEL},
            "worker": {"image": "img"},
            "memoryPolicy": {"policy": "greedy", "budget": {"fraction": 0.5}},
        },
    )
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
    model = ElasticLlama.from_pretrained(tiny_model_dir, packed=False)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    options = ServerOptions(model_name=TINY_MODEL, token="loop-token")
    running = BackgroundServer(Engine(model, tokenizer, budget_bytes=2**20), options)
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
