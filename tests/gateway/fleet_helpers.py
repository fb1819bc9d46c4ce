"""What the gateway's tests and fixtures share: the names of the small
fleet (gateway_fixtures.py), how its workers start, and an event loop on a
thread of its own for the gateway, so tests drive it with blocking clients.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.gateway.server import Gateway
from elasticfleet.worker.serving.process import WorkerProcess

T = TypeVar("T")
MODEL = "tiny-llama"
WORKER_TOKEN = "worker-secret"
GATEWAY_TOKEN = "gateway-secret"
ADAPTER = "gw-set"
TASKS = ("code", "qa", "defs")
# Five of eight blocks, layer 0's attention among them: the tiny profile
# ranks that block last, so the plan is predicted well above the dense
# perplexity (dropping the others alone predicts below it: the model is random).
HEAVY_PLAN = ["--drop-attention", "0,1", "--drop-ffn", "1,2,3", "--plan-id", "heavy"]


def worker_args(model: Path, redis_url: str, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--port", "0", "--metrics-port", "0", "--threads", "1",
        "--budget-bytes", str(2**26), "--redis-url", redis_url, *extra,
    ]  # fmt: skip


def start_workers(folder: Path, runs: dict[str, list[str]]) -> dict[str, WorkerProcess]:
    """Start workers (name -> arguments) at once, with the workers' token
    in their environment; none is left running if one fails."""
    env = {"ELASTICFLEET_TOKEN": WORKER_TOKEN}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {
            name: pool.submit(WorkerProcess.start, args, folder / f"{name}.log", env)
            for name, args in runs.items()
        }
        started: dict[str, WorkerProcess] = {}
        errors = []
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except Exception as error:
                errors.append(error)
    if errors:
        for worker in started.values():
            worker.kill()
        raise errors[0]
    return started


class LoopThread:
    """An asyncio loop on a thread of its own, for servers the test's
    blocking clients talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Fleet:
    """Workers (good-0, good-1, heavy) and the gateway in front of them."""

    workers: dict[str, WorkerProcess]
    gateway: Gateway
    loop: LoopThread
    profile: ModelProfile

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def ratio(self, name: str) -> float:
        view = next(v for v in self.gateway.service.pool.views if v.name == name)
        assert view.ratio is not None
        return view.ratio
