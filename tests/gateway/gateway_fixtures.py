"""A small real fleet for the gateway's tests: worker processes serving the
tiny model (with the character tokenizer of serving_fixtures, so texts are
readable) with adapters from the session's Valkey, and a gateway in front
of them on its own event loop thread, so tests call it with blocking
clients nobody here wrote.

Test modules load it with `pytest_plugins = ["gateway_fixtures"]` (beside
"serving_fixtures", which it builds on). Everything listens on 127.0.0.1
on free ports, and what a fixture starts it stops, workers by their PID.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fleet_helpers import (
    ADAPTER,
    GATEWAY_TOKEN,
    HEAVY_PLAN,
    MODEL,
    TASKS,
    WORKER_TOKEN,
    Fleet,
    LoopThread,
    start_workers,
    worker_args,
)
from test_lora import make_spec, trained
from valkey_server import TestRedisServer

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.profiling import profile_model
from elasticfleet.gateway.pool import PlanRatios, PoolOptions
from elasticfleet.gateway.server import Gateway, GatewayOptions
from elasticfleet.gateway.sources import static_workers
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.model.llama import ElasticLlama


@pytest.fixture(scope="module")
def fleet_model(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the character tokenizer, in a folder named
    `tiny-llama`, the name workers report and the profile is under."""
    path = tmp_path_factory.mktemp("gateway-model") / MODEL
    shutil.copytree(served_model_dir, path)
    return path


@pytest.fixture(scope="module")
def fleet_profile(fleet_model: Path) -> Path:
    """The tiny model's block profile, in a folder for $ELASTICFLEET_PROFILES."""
    tokens = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(3))
    model = ElasticLlama.from_pretrained(fleet_model, packed=False)
    out = fleet_model.parent / "profiles" / f"{MODEL}.json"
    out.parent.mkdir()
    profile_model(model, tokens, out_path=out, progress=False, model_name=MODEL)
    return out


@pytest.fixture(scope="module")
def published(redis_server: TestRedisServer) -> Iterator[str]:
    """A three-task adapter set for the tiny model in the session's Valkey;
    its name."""
    store = AdapterStore.from_url(redis_server.url)
    store.publish(trained(make_spec(ADAPTER, tasks=TASKS), seed=5).weights())
    store.close()
    yield ADAPTER


@pytest.fixture(scope="module")
def fleet(
    fleet_model: Path,
    fleet_profile: Path,
    published: str,
    redis_server: TestRedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("gateway-fleet")
    url = redis_server.url
    workers = start_workers(
        folder,
        {
            "good-0": worker_args(fleet_model, url),
            "good-1": worker_args(fleet_model, url),
            "heavy": worker_args(fleet_model, url, *HEAVY_PLAN),
        },
    )
    profile = ModelProfile.load(fleet_profile)
    loop = LoopThread()
    try:
        gateway = Gateway(
            static_workers({name: w.address for name, w in workers.items()}),
            PlanRatios(lambda model: profile),
            GatewayOptions(model_name=MODEL, pool=PoolOptions(refresh_s=0.2, max_wait_s=2.0)),
            token=lambda: GATEWAY_TOKEN,
            worker_token=lambda: WORKER_TOKEN,
        )
        loop.run(gateway.start())
        try:
            yield Fleet(workers, gateway, loop, profile)
        finally:
            loop.run(gateway.stop())
    finally:
        loop.close()
        for worker in workers.values():
            worker.stop()
