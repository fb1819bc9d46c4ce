"""What every API of the gateway shares: the worker pool, the metrics, the
gateway's own token, and `open`, which times a request's first token.

The APIs (tgi.py, openai_api.py over HTTP; grpc_api.py) parse a request into
a worker GenerateRequest plus its adapter and quality floor, call `open`,
and convert the stream back; nothing else about routing reaches them.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from elasticfleet.gateway.errors import GatewayError, Kind
from elasticfleet.gateway.metrics import GatewayMetrics
from elasticfleet.gateway.pool import Upstream, WorkerPool
from elasticfleet.gateway.routing import AdapterRef, LoadedAdapter
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

#: The header (and gRPC metadata key) a client sets its quality floor in.
RATIO_HEADER = "x-max-perplexity-ratio"
#: Response headers naming the worker that served and its plan's ratio.
WORKER_HEADER = "x-elasticfleet-worker"
RATIO_RESPONSE_HEADER = "x-elasticfleet-perplexity-ratio"


@dataclass(frozen=True)
class Admission:
    """What a parsed request asks of the fleet."""

    request: pb.GenerateRequest
    adapter: AdapterRef | None = None
    max_ratio: float | None = None


class GatewayService:
    """The shared state of one gateway process (see the module docstring).
    `token()` is the bearer token clients must send (None: no auth), read
    on each request so a rotated Secret applies without a restart."""

    def __init__(
        self,
        pool: WorkerPool,
        metrics: GatewayMetrics,
        token: Callable[[], str | None] = lambda: None,
        model_name: str = "",
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.token = token
        self._model_name = model_name

    def authorized(self, authorization: str | None) -> bool:
        """Whether an Authorization header value carries the token
        (constant-time comparison)."""
        expected = self.token()
        if expected is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), expected.encode()
        )

    def require_auth(self, authorization: str | None) -> None:
        if not self.authorized(authorization):
            raise GatewayError(Kind.UNAUTHORIZED, "missing or wrong bearer token")

    @property
    def model_name(self) -> str:
        """The fleet's base model: as given, else as its workers report it."""
        if self._model_name:
            return self._model_name
        return next((v.model for v in self.pool.views if v.model), "")

    def served_adapters(self) -> dict[str, LoadedAdapter]:
        """Every adapter set some ready worker holds, its tasks merged."""
        merged: dict[str, LoadedAdapter] = {}
        for view in self.pool.views:
            if not view.ready:
                continue
            for name, held in view.adapters.items():
                known = merged.get(name, LoadedAdapter((), False))
                tasks = tuple(sorted({*known.tasks, *held.tasks}))
                merged[name] = LoadedAdapter(tasks, known.router or held.router)
        return dict(sorted(merged.items()))

    def ready(self) -> bool:
        return any(view.ready for view in self.pool.views)

    async def open(self, admission: Admission, api: str, started: float) -> Upstream:
        """The request's stream, its first token observed in the
        time-to-first-token histogram (from `started`, time.monotonic())."""
        upstream = await self.pool.open(admission.request, admission.adapter, admission.max_ratio)
        self.metrics.ttft.labels(api).observe(time.monotonic() - started)
        return upstream
