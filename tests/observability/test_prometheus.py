"""The dashboard's queries and the alerts' expressions against a real
Prometheus scraping a real fleet.

A real worker (the project's gRPC server and engine on the tiny model,
its /metrics over HTTP) on a simulated device, with adapters from a real
Valkey, and the operator's control loop (FleetController, as the kopf
operator runs it) planning two fleets, its metrics served over HTTP as
`operator run --metrics-port` serves them. Fleet `elastic` is the real
worker and a pod that never answers. Fleet `strict` has a quality floor;
its worker is the loop tests' stand-in for a SmolLM2 worker
(tests/operator/fake_fleet.py), because SmolLM2's profile predicts what
pruning costs while the tiny random model's predicts that it helps, which
no floor can refuse. A short workload runs (faster than the worker admits,
so its queue grows), the fleet drops its adapter set, both devices are
squeezed (elastic's plan shrinks, strict's floor refuses every plan that
fits) and relaxed again, while Prometheus scrapes every second and
evaluates the chart's rules, rendered with thresholds this run crosses.

Then every panel query of the dashboard and every alert expression,
evaluated over the run through Prometheus' HTTP API, must return series
with numbers (not only NaN), and every rule must evaluate without error.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chart_rules import dashboard_queries, write_rules
from conftest import TINY_MODEL
from fake_fleet import GIB, FakeFleet
from helm_chart import requires_helm
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_server import PrometheusServer, free_port, requires_prometheus
from test_lora import make_spec, trained
from tiny_fleet import DEVICE_BYTES, squeeze
from tokenizers import Tokenizer, models
from waiting import wait_for

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.operator.control import (
    AdapterWant,
    Connect,
    FleetController,
    LoopSettings,
    WorkerEndpoint,
    plaintext_connect,
    profile_for_model,
)
from elasticfleet.operator.metrics import OperatorMetrics
from elasticfleet.operator.spec import FleetSpec
from elasticfleet.operator.status import FleetStatus
from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.host import CachedAdapterHost
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions
from elasticfleet.worker.serving.telemetry import SimulatedDevice

pytestmark = [requires_helm, requires_prometheus]

NAMESPACE = "ns"
# The run is a minute long, so rates are taken over a few scrapes.
VARIABLES = {"$namespace": ".*", "$fleet": ".*", "$pod": ".*", "$__rate_interval": "10s"}
# Thresholds this run crosses, so that each alert's expression has series.
CROSSED = (
    "metrics.prometheusRule.budgetUsedRatio=0",
    "metrics.prometheusRule.planChangesPerHour=0",
    "metrics.prometheusRule.queueDepth=1",
    "metrics.prometheusRule.ttftP99Seconds=0",
)
# Each engine iteration takes this much longer, as on a slower device, so
# that requests sent every 0.1 s queue up on a worker running one at a time.
SLOW_STEP_S = 0.03


def fleet(name: str, model: str, floor: float | None = None) -> FleetSpec:
    memory: dict[str, object] = {"policy": "greedy", "budget": {"fraction": 0.5}}
    if floor is not None:
        memory["qualityFloor"] = {"maxPerplexityRatio": floor}
    body = {"model": {"name": model}, "worker": {"image": "img"}, "memoryPolicy": memory}
    return FleetSpec.parse(name, NAMESPACE, body)


def worker(model_dir: Path, device: Path, adapters: AdapterStore) -> BackgroundServer:
    """A worker running one request at a time (so that requests queue)."""
    model = ElasticLlama.from_pretrained(model_dir, packed=False)
    host = CachedAdapterHost(AdapterCache(adapters, 8 << 20), model.config, model.plan)
    engine = Engine(
        model,
        Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        budget_bytes=2**20,
        device=SimulatedDevice(device),
        adapters=host,
        max_batch=1,
    )
    options = ServerOptions(model_name=TINY_MODEL, metrics_port=0)
    return BackgroundServer(engine, options)


class _DiscardingSink:
    async def patch_status(self, status: FleetStatus) -> None:
        """The status is not what this test looks at."""

    async def post_event(self, event: object) -> None:
        """Nor the Events."""


@dataclass
class Planned:
    """A fleet the loop plans: its workers, how they are reached, and the
    adapter sets it serves (the test changes them as it goes)."""

    spec: FleetSpec
    profile: ModelProfile
    connect: Connect
    endpoints: list[WorkerEndpoint]
    adapters: list[AdapterWant] = field(default_factory=list)


class ControlLoop:
    """The fleets' controllers ticking every half second on a thread of
    their own, with their metrics on an HTTP endpoint."""

    def __init__(self, fleets: list[Planned]) -> None:
        self.registry = CollectorRegistry()
        self.metrics = OperatorMetrics(self.registry)
        self.http, _ = start_http_server(0, "127.0.0.1", self.registry)
        self.port = self.http.server_port
        self.fleets = fleets
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()))
        self._thread.start()

    async def _run(self) -> None:
        settings = LoopSettings(backoff_s=0.05, stats_timeout_s=2.0)
        controllers = [
            FleetController(f.spec, f.profile, f.connect, settings=settings, metrics=self.metrics)
            for f in self.fleets
        ]
        sink = _DiscardingSink()
        try:
            while not self._stop.is_set():
                ticks = [
                    c.tick(f.endpoints, sink, list(f.adapters))
                    for f, c in zip(self.fleets, controllers, strict=True)
                ]
                await asyncio.gather(*ticks)
                await asyncio.sleep(0.5)
        finally:
            for controller in controllers:
                await controller.close()

    def sample(self, name: str, **labels: str) -> float:
        """A series of the loop's, as it stands (0 before it exists)."""
        return self.registry.get_sample_value(name, {"namespace": NAMESPACE, **labels}) or 0.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.http.shutdown()
        self.http.server_close()


def slow_down(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every iteration that runs sequences SLOW_STEP_S longer."""
    record_step = engine.mix.record_step

    def slow(rows: int, tokens: int) -> None:
        record_step(rows, tokens)
        time.sleep(SLOW_STEP_S)

    monkeypatch.setattr(engine.mix, "record_step", slow)


def burst(address: str, count: int, every_s: float, adapter: str | None = None) -> None:
    """`count` requests, one every `every_s` seconds, each on its own thread."""
    task = None if adapter is None else "qa"

    def one() -> None:
        with WorkerClient(address) as client:
            request = generate_request(
                "hello", max_new_tokens=8, ignore_eos=True, adapter=adapter, task=task
            )
            client.complete(request, timeout=60)

    with ThreadPoolExecutor(count) as pool:
        futures = []
        for _ in range(count):
            futures.append(pool.submit(one))
            time.sleep(every_s)
        for future in futures:
            future.result()


@pytest.fixture
def adapter_store(redis_url: str) -> Iterator[AdapterStore]:
    store = AdapterStore.from_url(redis_url)
    store.publish(trained(make_spec(), seed=5).weights())
    yield store
    store.close()


PLAN_CHANGES = "elasticfleet_operator_plan_changes_total"
FAILURES = "elasticfleet_operator_worker_failures_total"


def test_every_panel_and_alert_returns_data(
    tiny_model_dir: Path,
    tiny_profiles: Path,
    adapter_store: AdapterStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rules = tmp_path / "rules.yaml"
    alerts = write_rules(rules, *CROSSED)
    device = tmp_path / "device.json"
    squeeze(device, 0)
    running = worker(tiny_model_dir, device, adapter_store)
    engine = running.server.engine
    slow_down(engine, monkeypatch)
    address = f"127.0.0.1:{running.port}"
    smollm2 = profile_for_model("SmolLM2-135M-Instruct")
    fake = FakeFleet(smollm2, 1)
    elastic = Planned(
        fleet("elastic", TINY_MODEL),
        profile_for_model(TINY_MODEL),
        plaintext_connect,
        [
            WorkerEndpoint("elastic-0", address),
            WorkerEndpoint("elastic-gone", f"127.0.0.1:{free_port()}"),
        ],
        [AdapterWant("multi")],
    )
    strict = Planned(
        fleet("strict", smollm2.model_name, floor=1.05), smollm2, fake.connect, fake.endpoints()
    )
    loop = ControlLoop([elastic, strict])
    jobs: list[dict[str, Any]] = [
        {
            "job_name": "workers",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{running.metrics_port}"],
                    "labels": {"namespace": NAMESPACE, "fleet": "elastic", "pod": "elastic-0"},
                }
            ],
        },
        # As the chart's ServiceMonitor: the operator's labels name fleets and pods.
        {
            "job_name": "operator",
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{loop.port}"]}],
        },
    ]
    prometheus = PrometheusServer(tmp_path, jobs, [rules])
    start = time.time()
    try:
        wait_for(
            "both targets scraped",
            lambda: len(prometheus.api("query", query="up == 1")["result"]) == 2,
            30,
        )
        # The operator loads the fleet's adapter set (a miss in the worker's
        # cache); a client loading it again finds it there.
        with WorkerClient(address) as client:
            wait_for("the adapter loaded", lambda: client.list_adapters().adapters, 30)
            assert client.load_adapter("multi").cache_hit
        burst(address, 16, 0.1, adapter="multi")
        # The fleet drops its adapters (the operator unloads them), then
        # memory runs short: elastic's plan shrinks below the dense weights;
        # strict's squeeze is deep enough that int4 alone does not do, and
        # its floor refuses what would fit.
        elastic.adapters.clear()
        with WorkerClient(address) as client:
            wait_for("the adapter unloaded", lambda: not client.list_adapters().adapters, 30)
        weights = engine.stats().picture.weight_bytes
        squeeze(device, DEVICE_BYTES - weights)
        fake.workers["w0"].others_bytes = int(3.7 * GIB)
        wait_for(
            "a smaller plan",
            lambda: loop.sample(PLAN_CHANGES, fleet="elastic", reason="over_budget") >= 1,
            30,
        )
        wait_for(
            "the floor refusing",
            lambda: loop.sample(FAILURES, fleet="strict", reason="QualityFloor") >= 1,
            30,
        )
        burst(address, 4, 0.1)
        squeeze(device, 0)
        wait_for(
            "every block back",
            lambda: loop.sample(PLAN_CHANGES, fleet="elastic", reason="within_budget") >= 1,
            30,
        )
        time.sleep(3)  # the last figures scraped
        end = time.time()

        def numbers(expr: str) -> list[float]:
            found = prometheus.query_range(expr, start, end)["result"]
            return [float(v) for series in found for _, v in series["values"]]

        for name, query in dashboard_queries().items():
            for variable, value in VARIABLES.items():
                query = query.replace(variable, value)
            values = numbers(query)
            assert any(not math.isnan(v) for v in values), (name, query, values[:5])
        for alert, expr in alerts.items():
            assert numbers(expr), (alert, expr)
        groups = prometheus.api("rules")["groups"]
        health = {
            r["name"]: (r["health"], r.get("lastError") or "") for g in groups for r in g["rules"]
        }
        assert health == {alert: ("ok", "") for alert in alerts}, health
    finally:
        prometheus.stop()
        loop.stop()
        running.stop()
