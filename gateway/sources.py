"""Where the gateway learns which workers exist (name -> HOST:PORT).

Three sources, each asked again every `interval_s`:

- `StaticWorkers`: the `--worker NAME=HOST:PORT` flags (never change);
- `DnsWorkers`: every address a name resolves to. In a cluster that name is
  the fleet's headless worker Service, which resolves to each ready worker
  pod's IP: what the operator deploys the gateway with, needing no API
  access (so no RBAC) and following the readiness probes;
- a fleet's status (`elasticfleet gateway --fleet`, in cli/): the workers the
  operator last reached, read from the API server.

Freshness within a source's interval comes from GetStats polling (pool.py),
which marks a worker that stops answering unready within a second.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

Workers = Mapping[str, str]


@dataclass(frozen=True)
class WorkerSource:
    """`fetch()` answers the workers now; the pool asks every `interval_s`
    and calls `close` (where there is one) when it stops."""

    fetch: Callable[[], Coroutine[Any, Any, Workers]]
    interval_s: float
    description: str
    close: Callable[[], Awaitable[None]] | None = None


def static_workers(workers: Workers) -> WorkerSource:
    fixed = dict(workers)

    async def fetch() -> Workers:
        return fixed

    return WorkerSource(fetch, 3600.0, f"{len(fixed)} workers given on the command line")


def parse_worker_flag(text: str) -> tuple[str, str]:
    """`NAME=HOST:PORT` (or `HOST:PORT`, named by itself); ValueError otherwise."""
    name, sep, address = text.partition("=")
    if not sep:
        name, address = text, text
    host, colon, port = address.rpartition(":")
    if not name or not host or not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--worker {text!r}: expected NAME=HOST:PORT")
    return name, address


def dns_workers(host: str, port: int, interval_s: float = 5.0) -> WorkerSource:
    """Every address `host` resolves to, at `port`; each worker is named by
    its IP. A name that does not resolve (no ready pod yet) means none."""

    async def fetch() -> Workers:
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return {}
        workers = {}
        for family, *_, sockaddr in found:
            ip = str(sockaddr[0])
            workers[ip] = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        return workers

    return WorkerSource(fetch, interval_s, f"DNS name {host}, port {port}")
