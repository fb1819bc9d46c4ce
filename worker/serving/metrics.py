"""Prometheus metrics for a worker, served over HTTP.

The engine keeps plain counters and a consistent memory picture; this module
only reads them when Prometheus scrapes, so every scrape sees figures taken
between two steps. Timings are histograms the engine observes as they
happen (worker/serving/latency.py); this module yields them as they stand.
Each server gets its own registry, so several workers (or tests) in one
process never collide on metric names.

The endpoint answers /metrics only (404 elsewhere: prometheus_client's own
server answers every path, which scanners read as something to probe), on a
host of its own choosing (`--metrics-host`), so metrics can stay on a
pod-internal or loopback address while gRPC listens for clients.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from threading import Thread
from wsgiref.simple_server import WSGIRequestHandler, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from elasticfleet.worker.serving.engine import Engine
from elasticfleet.worker.serving.latency import PREFIX


class EngineCollector(Collector):
    """Counters and gauges read from one engine at scrape time, and its
    latency histograms. Counters render with `_total` after their name."""

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
        yield CounterMetricFamily(
            PREFIX + "preemptions",
            "Running requests sent back to the queue to fit the budget (recomputed later).",
            value=counters.preemptions,
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
            "kv_blocks_in_use": ("KV blocks holding sequences' tokens.", picture.kv_blocks_in_use),
            "kv_blocks_reserved": ("KV blocks in the pool.", picture.kv_blocks_reserved),
            "kv_blocks_committed": (
                "KV blocks admission charges the running requests.",
                picture.kv_blocks_committed,
            ),
            "adapter_bytes": ("Bytes of adapters in the local cache.", picture.adapter_bytes),
            "budget_bytes": ("The memory budget admission works against.", picture.budget_bytes),
            "tokens_per_second": (
                "Generated tokens per second over the window.",
                stats.mix.tokens_per_second,
            ),
        }
        for name, (documentation, figure) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, documentation, value=figure)
        # Block 2i is layer i's attention block, 2i+1 its FFN block. Precision
        # levels (a block kept at a lower precision) will add a label here.
        kept = GaugeMetricFamily(
            PREFIX + "kept_blocks", "Blocks the current plan keeps, by kind.", labels=["kind"]
        )
        kept.add_metric(["attention"], sum(picture.keep_mask[0::2]))
        kept.add_metric(["ffn"], sum(picture.keep_mask[1::2]))
        yield kept
        yield from self.engine.latency.collect()


METRICS_PATH = "/metrics"


def metrics_only(app: WSGIApplication) -> WSGIApplication:
    """`app` at METRICS_PATH, 404 Not Found anywhere else."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found; metrics are at {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return serve


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not worth a log line each."""


class MetricsServer:
    """An HTTP server for /metrics on its own thread."""

    def __init__(self, engine: Engine, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        # IPv4 or IPv6, whichever the host is (an HTTP server binds IPv4 otherwise).
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type(
            "MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family[0][0]}
        )
        app = metrics_only(make_wsgi_app(self.registry))
        self._server: ThreadingWSGIServer = make_server(
            host, port, app, server_class, handler_class=_QuietHandler
        )
        self._thread = Thread(
            target=self._server.serve_forever, name="elasticfleet-metrics", daemon=True
        )
        self._thread.start()
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
