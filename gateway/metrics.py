"""The gateway's Prometheus metrics, `elasticfleet_gateway_*`, in a registry
of its own (several gateways in one process, as in tests, never collide).

Every label takes values from a fixed set, so a client cannot grow the
series count: `route` is one of ROUTES (an unknown path counts as `other`),
`code` one of the status codes the gateway answers with, `api` one of
tgi/openai/grpc, `result` hit/load.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The workers' buckets, so the fleet's TTFT and each worker's compare bucket for bucket.
from elasticfleet.worker.serving.latency import TTFT_BUCKETS

PREFIX = "elasticfleet_gateway_"
ROUTES = (
    "/",
    "/generate",
    "/generate_stream",
    "/info",
    "/health",
    "/metrics",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "grpc",
    "other",
)


class GatewayMetrics:
    """What the gateway counts; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests",
            "Requests answered, by route and status code (gRPC codes for route grpc).",
            ["route", "code"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            PREFIX + "queue_depth",
            "Requests waiting for a worker that can take them.",
            registry=self.registry,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From a request's arrival to its first token from a worker.",
            ["api"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            PREFIX + "upstream_retries",
            "Requests tried again on another worker after failing before the first token.",
            registry=self.registry,
        )
        self.affinity = Counter(
            PREFIX + "adapter_routing",
            "Adapter requests sent to a worker that had the task loaded (hit) or was asked "
            "to load it (load).",
            ["result"],
            registry=self.registry,
        )
        self.workers_ready = Gauge(
            PREFIX + "workers_ready",
            "Workers whose last GetStats answered.",
            registry=self.registry,
        )

    def count(self, route: str, code: int | str) -> None:
        self.requests.labels(route if route in ROUTES else "other", str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
