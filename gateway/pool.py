"""The gateway's workers: connections, fresh views, the waiting queue, and
opening a stream with one retry.

- **Views.** Every `refresh_s` (0.5 s by default, so views are never more
  than a second old) each worker is asked GetStats and ListAdapters at
  once; its view takes its free KV (budget minus weights, adapters and the
  KV promised to admitted requests), queue, running sequences, plan and
  that plan's predicted perplexity ratio (`PlanRatios`), and its adapters.
  A worker that fails to answer is unready until it answers again, and so
  is one not heard from for `stale_s`. The source (sources.py) is asked
  for the worker list every its own interval; workers that leave it are
  closed once their streams end.
- **Waiting.** A request no worker can take now (routing.py says why)
  waits, woken by every refresh and every stream that ends, for at most
  `max_wait_s`; then it fails with that reason (503). At most
  `max_waiting` wait at once: one more gets 429 with Retry-After.
- **Opening.** `open` routes, loads the adapter where routing asks for it,
  starts Generate and waits for the first message. A worker that fails
  before that (unavailable, out of capacity, adapter gone, ...) is tried
  once more elsewhere; after the first token a failure reaches the client.
  The caller closes the stream however it ends, which cancels the call on
  the worker: a client that disconnects cancels its upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.agent.quality import ProfileQuality
from elasticfleet.gateway.errors import RETRYABLE, GatewayError, Kind, from_worker
from elasticfleet.gateway.metrics import GatewayMetrics
from elasticfleet.gateway.routing import (
    MAX_STREAMS,
    SPREAD_AFTER,
    AdapterRef,
    LoadedAdapter,
    NoRoute,
    Route,
    WorkerView,
    choose,
)
from elasticfleet.gateway.sources import WorkerSource
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import AsyncWorkerClient
from elasticfleet.worker.serving.credentials import ClientTls
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

log = logging.getLogger(__name__)

#: A worker's bearer token now (re-read where it comes from a file).
TokenSource = Callable[[], str | None]


class PlanRatios:
    """Predicted perplexity ratio of a model's plan, from the model's block
    profile (agent/quality.py); None where no profile is known and the plan
    is not dense. `profiles(model)` raises ValueError for a model without
    one; the answer is kept per model."""

    def __init__(self, profiles: Callable[[str], ModelProfile]) -> None:
        self.profiles = profiles
        self._known: dict[str, tuple[ProfileQuality, float] | None] = {}

    def __call__(self, model: str, keep_mask: Sequence[bool]) -> float | None:
        if all(keep_mask):
            return 1.0
        if model not in self._known:
            try:
                profile = self.profiles(model)
            except ValueError as error:
                log.warning("no quality estimate for model %s: %s", model, error)
                self._known[model] = None
            else:
                self._known[model] = (ProfileQuality(profile), profile.dense_perplexity)
        known = self._known[model]
        if known is None:
            return None
        quality, dense = known
        return quality(PruningPlan.from_mask(list(keep_mask))) / dense


@dataclass(frozen=True)
class PoolOptions:
    """How the pool polls, routes and waits (see the module docstring)."""

    refresh_s: float = 0.5
    stale_s: float = 3.0
    max_wait_s: float = 10.0
    max_waiting: int = 256
    max_streams: int = MAX_STREAMS
    spread_after: int = SPREAD_AFTER
    # TLS to the workers (None: plaintext): the roots the gateway verifies
    # them against and, where workers require one, its client certificate.
    tls: ClientTls | None = None
    # With TLS, verify a worker reached at IP a.b.c.d as `a-b-c-d.SUFFIX`
    # (the operator's rule for a fleet's workers: build.worker_server_name);
    # None verifies the address's own host.
    server_name_suffix: str | None = None

    def server_name(self, address: str) -> str | None:
        if self.server_name_suffix is None:
            return None
        host = address.rpartition(":")[0].strip("[]")
        return f"{host.replace('.', '-').replace(':', '-')}.{self.server_name_suffix}"


@dataclass
class _Worker:
    view: WorkerView
    client: AsyncWorkerClient
    heard_at: float = 0.0
    loading_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    gone: bool = False


class WorkerPool:
    """The workers one gateway routes to (see the module docstring)."""

    def __init__(
        self,
        source: WorkerSource,
        ratios: Callable[[str, Sequence[bool]], float | None],
        metrics: GatewayMetrics,
        token: TokenSource = lambda: None,
        options: PoolOptions | None = None,
    ) -> None:
        self.source = source
        self.ratios = ratios
        self.metrics = metrics
        self.token = token
        self.options = options or PoolOptions()
        self._workers: dict[str, _Worker] = {}
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._refreshed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Learn the workers and poll them once, then keep both fresh."""
        await self._discover()
        await self._refresh()
        self._tasks = [
            asyncio.create_task(self._every(self.source.interval_s, self._discover)),
            asyncio.create_task(self._every(self.options.refresh_s, self._refresh)),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker in self._workers.values():
            await worker.client.close()
        self._workers.clear()
        if self.source.close is not None:
            await self.source.close()

    async def _every(self, interval_s: float, step: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()  # type: ignore[misc]
            except Exception:  # a failed round must not end the loop
                log.exception("gateway background round failed")

    @property
    def views(self) -> list[WorkerView]:
        return [w.view for w in self._workers.values() if not w.gone]

    @property
    def waiting(self) -> int:
        return self._waiting

    async def _discover(self) -> None:
        found = dict(await self.source.fetch())
        for name, worker in list(self._workers.items()):
            if found.get(name) != worker.view.address:
                worker.gone = True
                worker.view.ready = False
                if worker.view.streams == 0:
                    del self._workers[name]
                    await worker.client.close()
        for name, address in found.items():
            if name not in self._workers:
                client = AsyncWorkerClient(
                    address,
                    tls=self.options.tls or False,
                    server_name=self.options.server_name(address),
                )
                self._workers[name] = _Worker(WorkerView(name, address), client)

    def _client(self, worker: _Worker) -> AsyncWorkerClient:
        """The worker's client with the token in force now (a rotated one
        applies from the next call)."""
        token = self.token()
        worker.client.metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        return worker.client

    async def _refresh(self) -> None:
        workers = [w for w in self._workers.values() if not w.gone]
        await asyncio.gather(*(self._poll(w) for w in workers))
        now = time.monotonic()
        for worker in workers:
            if now - worker.heard_at > self.options.stale_s:
                worker.view.ready = False
        self.metrics.workers_ready.set(sum(w.view.ready for w in workers))
        async with self._changed:
            self._changed.notify_all()

    async def _poll(self, worker: _Worker) -> None:
        client = self._client(worker)
        timeout = max(self.options.refresh_s * 2, 1.0)
        try:
            stats, listing = await asyncio.gather(
                client.get_stats(timeout=timeout), client.list_adapters(timeout=timeout)
            )
        except grpc.aio.AioRpcError as error:
            if worker.view.ready:
                log.warning(
                    "worker %s: %s: %s", worker.view.name, error.code().name, error.details()
                )
            worker.view.ready = False
            return
        view = worker.view
        memory = stats.memory
        held = memory.weight_bytes + memory.adapter_bytes + memory.kv_committed_bytes
        view.model = stats.model
        view.plan_id = stats.plan_id
        view.ratio = self.ratios(stats.model, list(stats.keep_mask))
        view.free_kv_bytes = max(memory.budget_bytes - held, 0)
        view.queue_depth = stats.queue_depth
        view.active = stats.active_sequences
        view.adapters = {
            info.name: LoadedAdapter(tuple(info.tasks), info.has_router)
            for info in listing.adapters
        }
        view.ready = True
        worker.heard_at = time.monotonic()

    # -- routing -------------------------------------------------------------------

    async def _acquire(
        self,
        adapter: AdapterRef | None,
        max_ratio: float | None,
        exclude: Collection[str],
        wait: bool = True,
    ) -> tuple[_Worker, bool] | None:
        """A worker for the request (its stream counted open) and whether it
        must load the adapter; waits as the module docstring says, or
        answers None at once when told not to wait."""
        decision = self._choose(adapter, max_ratio, exclude)
        if isinstance(decision, NoRoute):
            if not wait:
                return None
            if self._waiting >= self.options.max_waiting:
                raise GatewayError(
                    Kind.OVERLOADED,
                    f"{self._waiting} requests already wait for a worker ({decision.reason})",
                    retry_after=1,
                )
            decision = await self._wait(adapter, max_ratio, exclude, decision)
        worker = self._workers[decision.worker]
        worker.view.streams += 1
        if decision.load_adapter and adapter is not None:
            # Marked before any await, so the next request for it comes here.
            worker.view.loading.add(str(adapter))
        return worker, decision.load_adapter

    async def _wait(
        self,
        adapter: AdapterRef | None,
        max_ratio: float | None,
        exclude: Collection[str],
        refusal: NoRoute,
    ) -> Route:
        """Wait in the queue until a worker can take the request."""
        self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        try:
            async with asyncio.timeout(self.options.max_wait_s), self._changed:
                while True:
                    await self._changed.wait()
                    decision = self._choose(adapter, max_ratio, exclude)
                    if isinstance(decision, Route):
                        return decision
                    refusal = decision
        except TimeoutError:
            raise GatewayError(
                Kind.UNAVAILABLE,
                f"waited {self.options.max_wait_s:g} s: {refusal.reason}",
                retry_after=max(int(self.options.max_wait_s), 1),
            ) from None
        finally:
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)

    def _choose(
        self, adapter: AdapterRef | None, max_ratio: float | None, exclude: Collection[str]
    ) -> Route | NoRoute:
        return choose(
            self.views,
            adapter=adapter,
            max_ratio=max_ratio,
            exclude=exclude,
            max_streams=self.options.max_streams,
            spread_after=self.options.spread_after,
        )

    async def _release(self, worker: _Worker) -> None:
        worker.view.streams -= 1
        if (
            worker.gone
            and worker.view.streams == 0
            and self._workers.get(worker.view.name) is worker
        ):
            del self._workers[worker.view.name]
            await worker.client.close()
        async with self._changed:
            self._changed.notify_all()

    async def _ensure_adapter(self, worker: _Worker, adapter: AdapterRef, marked: bool) -> None:
        """Make sure the worker has the adapter, loading it if need be
        (keeping the tasks it already holds: LoadAdapter replaces a set's
        tasks); one load per set at a time, so a request routed here
        while an earlier one loads waits for that load. Counts a hit, or
        a load where this request made one. `marked`: routing marked the
        load pending for this request, which clears the mark."""
        lock = worker.loading_locks.setdefault(adapter.name, asyncio.Lock())
        try:
            async with lock:
                if worker.view.has_loaded(adapter):
                    self.metrics.affinity.labels("hit").inc()
                    return
                self.metrics.affinity.labels("load").inc()
                held = worker.view.adapters.get(adapter.name)
                tasks: list[str] = []
                if adapter.task is not None:
                    tasks = sorted({*(held.tasks if held else ()), adapter.task})
                response = await self._client(worker).load_adapter(adapter.name, "", tasks)
                info = response.adapter
                worker.view.adapters = {
                    **worker.view.adapters,
                    info.name: LoadedAdapter(tuple(info.tasks), info.has_router),
                }
        finally:
            if marked:
                worker.view.loading.discard(str(adapter))

    async def open(
        self,
        request: pb.GenerateRequest,
        adapter: AdapterRef | None = None,
        max_ratio: float | None = None,
    ) -> Upstream:
        """A started stream whose first message has arrived (see the module
        docstring); GatewayError when none could be started."""
        failed: GatewayError | None = None
        exclude: list[str] = []
        while True:
            acquired = await self._acquire(adapter, max_ratio, exclude, wait=failed is None)
            if acquired is None:  # the retry found no other worker
                assert failed is not None
                raise failed
            worker, load = acquired
            name = worker.view.name
            call = None
            try:
                if adapter is not None:
                    await self._ensure_adapter(worker, adapter, marked=load)
                call = self._client(worker).stub.Generate(request, metadata=worker.client.metadata)
                first = await call.read()
            except grpc.aio.AioRpcError as error:
                await self._release(worker)
                code = error.code()
                if code == grpc.StatusCode.UNAVAILABLE:
                    worker.view.ready = False  # until it answers a poll again
                refused = from_worker(code, error.details() or "", name)
                if code not in RETRYABLE or failed is not None:
                    raise refused from None
                failed = refused
                exclude.append(name)
                self.metrics.retries.inc()
                log.info("worker %s failed before the first token (%s); retrying", name, code.name)
                continue
            except BaseException:  # cancelled (client gone), or a bug: nothing left open
                if call is not None:
                    call.cancel()
                await self._release(worker)
                raise
            if first is grpc.aio.EOF:  # a worker always sends a last message; not this one
                await self._release(worker)
                raise GatewayError(
                    Kind.GENERATION, f"worker {name} ended the stream with no message"
                )
            return Upstream(self, worker, call, first)


class Upstream:
    """One worker's Generate stream, its first message already read;
    iterate for all messages, and close it however the request ends."""

    def __init__(
        self, pool: WorkerPool, worker: _Worker, call: object, first: pb.GenerateResponse
    ) -> None:
        self._pool = pool
        self._worker = worker
        self._call: grpc.aio.UnaryStreamCall[pb.GenerateRequest, pb.GenerateResponse] = call  # type: ignore[assignment]
        self.first = first
        self.worker = worker.view.name
        self.ratio = worker.view.ratio
        self._closed = False

    async def messages(self) -> AsyncIterator[pb.GenerateResponse]:
        """Every message, the first included; a worker failing midway is a
        GatewayError of kind GENERATION (or what its code means)."""
        message: object = self.first
        while message is not grpc.aio.EOF:
            yield message  # type: ignore[misc]
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as error:
                raise from_worker(error.code(), error.details() or "", self.worker) from None

    async def close(self) -> None:
        """Cancel the call if it still runs (a no-op once it finished)."""
        if self._closed:
            return
        self._closed = True
        self._call.cancel()
        await self._pool._release(self._worker)

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()
