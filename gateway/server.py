"""One gateway process: its worker pool, HTTP server and gRPC server,
started and stopped together (the command line, the tests and the
benchmark all run it this way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc.aio
from aiohttp import web

from elasticfleet.gateway.grpc_api import serve_grpc
from elasticfleet.gateway.http import serve_http
from elasticfleet.gateway.metrics import GatewayMetrics
from elasticfleet.gateway.pool import PoolOptions, TokenSource, WorkerPool
from elasticfleet.gateway.service import GatewayService
from elasticfleet.gateway.sources import WorkerSource

# Seconds a stopping gateway gives running streams before cancelling them.
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class GatewayOptions:
    """Where the gateway listens (ports 0 pick free ones; grpc_port None
    serves no gRPC) and how its pool behaves."""

    host: str = "127.0.0.1"
    port: int = 0
    grpc_port: int | None = 0
    model_name: str = ""
    pool: PoolOptions = field(default_factory=PoolOptions)


class Gateway:
    """Start with `start()`, then `port` and `grpc_port` say where it listens."""

    def __init__(
        self,
        source: WorkerSource,
        ratios: Callable[[str, Sequence[bool]], float | None],
        options: GatewayOptions | None = None,
        token: TokenSource = lambda: None,
        worker_token: TokenSource = lambda: None,
    ) -> None:
        self.options = options = options or GatewayOptions()
        self.metrics = GatewayMetrics()
        pool = WorkerPool(source, ratios, self.metrics, worker_token, options.pool)
        self.service = GatewayService(pool, self.metrics, token, options.model_name)
        self.port = 0
        self.grpc_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._grpc: grpc.aio.Server | None = None

    async def start(self) -> None:
        await self.service.pool.start()
        self._runner, self.port = await serve_http(
            self.service, self.options.host, self.options.port
        )
        if self.options.grpc_port is not None:
            self._grpc, self.grpc_port = await serve_grpc(
                self.service, self.options.host, self.options.grpc_port
            )

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(STOP_GRACE_S)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.service.pool.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()
