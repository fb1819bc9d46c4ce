"""Prometheus metrics for a worker, served over HTTP.

The engine keeps plain counters and a consistent memory picture; this module
only reads them when Prometheus scrapes, so the decode loop never touches a
metrics library and every scrape sees figures taken between two steps.
Each server gets its own registry, so several workers (or tests) in one
process never collide on metric names.
"""

from __future__ import annotations

from collections.abc import Iterator
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from elasticfleet.worker.serving.engine import RECENT_STEPS, Engine
from elasticfleet.worker.serving.telemetry import percentile

PREFIX = "elasticfleet_"


class EngineCollector(Collector):
    """Counters and gauges read from one engine at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        counters = self.engine.counters
        stats = self.engine.stats()
        picture = stats.picture
        requests = CounterMetricFamily(
            PREFIX + "requests", "Generation requests by outcome.", labels=["outcome"]
        )
        for outcome, value in (
            ("finished", counters.requests_finished),
            ("cancelled", counters.requests_cancelled),
            ("refused", counters.requests_refused),
            ("failed", counters.requests_failed),
        ):
            requests.add_metric([outcome], value)
        yield requests
        tokens = CounterMetricFamily(PREFIX + "tokens", "Tokens by kind.", labels=["kind"])
        tokens.add_metric(["prompt"], counters.prompt_tokens)
        tokens.add_metric(["generated"], counters.generated_tokens)
        yield tokens
        yield CounterMetricFamily(
            PREFIX + "plan_changes", "Pruning plans applied.", value=counters.plan_changes
        )
        adapter = CounterMetricFamily(
            PREFIX + "adapter_cache",
            "Adapter loads answered from the local cache (hit) or the store (miss).",
            labels=["result"],
        )
        adapter.add_metric(["hit"], counters.adapter_cache_hits)
        adapter.add_metric(["miss"], counters.adapter_cache_misses)
        yield adapter
        gauges: dict[str, tuple[str, float]] = {
            "queue_depth": ("Requests waiting for memory.", stats.queue_depth),
            "active_sequences": ("Sequences in the running batch.", picture.active_sequences),
            "weight_bytes": ("Bytes of model weights held.", picture.weight_bytes),
            "kv_reserved_bytes": ("Bytes of KV cache allocated.", picture.kv_reserved_bytes),
            "kv_used_bytes": ("Bytes of KV cache holding tokens.", picture.kv_used_bytes),
            "adapter_bytes": ("Bytes of adapters in the local cache.", picture.adapter_bytes),
            "budget_bytes": ("The memory budget admission works against.", picture.budget_bytes),
            "kept_blocks": ("Blocks the current plan keeps.", sum(picture.keep_mask)),
            "tokens_per_second": (
                "Generated tokens per second over the window.",
                stats.mix.tokens_per_second,
            ),
        }
        for name, (documentation, figure) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, documentation, value=figure)
        steps = list(self.engine.recent_step_s)
        step = GaugeMetricFamily(
            PREFIX + "decode_step_seconds",
            f"Decode-step time (plan switches included, prefills not) over the last "
            f"{RECENT_STEPS} steps.",
            labels=["quantile"],
        )
        for quantile in (50, 99):
            step.add_metric([f"0.{quantile}"], percentile(steps, quantile))
        yield step


class MetricsServer:
    """An HTTP server for /metrics on its own thread."""

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self._server: WSGIServer
        self._thread: Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
