"""In-process stand-ins for the control loop's collaborators: workers that
answer GetStats and ApplyPlan like the real server (memory from the shared
memory model, FAILED_PRECONDITION when a plan's weights exceed the budget,
gRPC errors when down), workers on a GPU with a caching allocator, fake
time, and a sink that records what the loop would write to Kubernetes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import grpc.aio

from elasticfleet.agent.profile import ModelProfile
from elasticfleet.operator.control import FleetEvent, WorkerEndpoint
from elasticfleet.operator.status import FleetStatus
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.plans import level_fields, plan_from_fields
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

GIB = 2**30


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeTime:
    """A clock and a sleep that advances it at once (no real waiting)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.sleeps: list[float] = []

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)


@dataclass
class FakeWorker:
    """One worker's device and engine, as GetStats and ApplyPlan see them."""

    profile: ModelProfile
    total_bytes: int = 4 * GIB
    others_bytes: int = 0  # what other processes hold on the device
    batch_p90: float = 1.0
    sequence_p90: float = 256.0
    active: int = 0
    budget_bytes: int = GIB  # the budget the worker started with
    model: str = "SmolLM2-135M-Instruct"
    plan_id: str = "initial"
    down: bool = False
    # Errors raised by the next calls of each method, in order.
    stats_errors: list[grpc.aio.AioRpcError] = field(default_factory=list)
    apply_errors: list[grpc.aio.AioRpcError] = field(default_factory=list)
    applied: list[tuple[str, list[bool], int | None]] = field(default_factory=list)
    stats_calls: int = 0
    closed: bool = False
    entered: asyncio.Barrier | None = None  # GetStats waits here when set
    # The adapter store's current version of each adapter set, and the cache.
    store: dict[str, str] = field(default_factory=lambda: {"tasks": "2", "code": "1"})
    adapters: dict[str, pb.AdapterInfo] = field(default_factory=dict)
    adapter_calls: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.plan = PruningPlan.dense(self.profile.config.num_hidden_layers)

    def own_bytes(self) -> tuple[int, int]:
        """(weight bytes, reserved KV bytes) of the plan in force."""
        estimate = predict_memory(
            self.profile.config, self.plan, self.active, int(self.sequence_p90), self.profile.dtype
        )
        return estimate.weight_bytes, estimate.kv_bytes

    def memory(self) -> pb.WorkerMemory:
        weights, kv = self.own_bytes()
        return pb.WorkerMemory(
            weight_bytes=weights,
            kv_reserved_bytes=kv,
            adapter_bytes=sum(a.bytes for a in self.adapters.values()),
            budget_bytes=self.budget_bytes,
        )

    async def get_stats(self, *, timeout: float | None = None) -> pb.GetStatsResponse:
        self.stats_calls += 1
        if self.entered is not None:
            await self.entered.wait()
        self._reachable()
        if self.stats_errors:
            raise self.stats_errors.pop(0)
        return pb.GetStatsResponse(
            device=self.device(),
            memory=self.memory(),
            active_sequences=self.active,
            mix=pb.RequestMix(
                window_seconds=60,
                batch_size_p90=self.batch_p90,
                sequence_tokens_p90=self.sequence_p90,
                finished_requests=10,
            ),
            tokens_per_second=42.0,
            plan_id=self.plan_id,
            keep_mask=self.plan.to_mask(),
            model=self.model,
            levels=level_fields(self.plan)[0],
            kv_levels=level_fields(self.plan)[1],
        )

    def device(self) -> pb.DeviceMemory:
        """The device as GetStats reads it, without own_bytes (as workers
        from before the field report it)."""
        adapters = sum(a.bytes for a in self.adapters.values())
        used = self.others_bytes + sum(self.own_bytes()) + adapters
        return self.reading(used, None, pb.MEMORY_SOURCE_HOST)

    def reading(
        self, used: int, own: int | None, source: pb.MemorySource.ValueType
    ) -> pb.DeviceMemory:
        """The device with `used` bytes in use, `own` of them the worker's
        (None: not reported)."""
        free = max(self.total_bytes - used, 0)
        return pb.DeviceMemory(
            total_bytes=self.total_bytes,
            used_bytes=used,
            free_bytes=free,
            source=source,
            own_bytes=own,
        )

    def switched(self) -> pb.DeviceMemory | None:
        """What ApplyPlan's answer says of the device after a switch: nothing,
        as from workers before the field."""
        return None

    async def apply_plan(
        self,
        plan_id: str,
        keep_mask: Sequence[bool],
        budget_bytes: int | None = None,
        *,
        timeout: float | None = None,
        levels: Sequence[pb.BlockLevel.ValueType] = (),
        kv_levels: Sequence[pb.KvLevel.ValueType] = (),
    ) -> pb.ApplyPlanResponse:
        self._reachable()
        if self.apply_errors:
            raise self.apply_errors.pop(0)
        plan = plan_from_fields(keep_mask, levels, kv_levels)
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        weights = predict_memory(self.profile.config, plan, 0, 0, self.profile.dtype).weight_bytes
        if weights > budget:
            raise rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "plan weights exceed budget")
        before = sum(self.own_bytes())
        self.applied.append((plan_id, list(keep_mask), budget_bytes))
        self.plan, self.plan_id, self.budget_bytes = plan, plan_id, budget
        return pb.ApplyPlanResponse(
            plan_id=plan_id,
            bytes_before=before,
            bytes_after=sum(self.own_bytes()),
            kept_blocks=plan.kept_blocks,
            memory=self.memory(),
            device=self.switched(),
        )

    def _reachable(self) -> None:
        if self.down:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")

    async def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse:
        self._reachable()
        return pb.ListAdaptersResponse(adapters=list(self.adapters.values()))

    async def load_adapter(
        self,
        name: str,
        version: str = "",
        tasks: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> pb.LoadAdapterResponse:
        self._reachable()
        if name not in self.store:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"no adapter {name!r} in the store")
        self.adapter_calls.append(("load", name, version, *tasks))
        info = pb.AdapterInfo(
            name=name, version=version or self.store[name], tasks=list(tasks), bytes=4096
        )
        self.adapters[name] = info
        return pb.LoadAdapterResponse(adapter=info)

    async def unload_adapter(
        self, name: str, *, timeout: float | None = None
    ) -> pb.UnloadAdapterResponse:
        self._reachable()
        self.adapter_calls.append(("unload", name))
        return pb.UnloadAdapterResponse(bytes_freed=self.adapters.pop(name).bytes)

    async def close(self) -> None:
        self.closed = True


@dataclass
class DeviceWorker(FakeWorker):
    """A FakeWorker on a GPU with a caching allocator, reporting its own
    device bytes the way workers do since DeviceMemory.own_bytes.

    Other processes want `others_bytes` and hold what the worker leaves
    free (they cannot take what it has reserved). The worker's allocator
    reserves what it allocates (its weights and KV, by the memory model)
    and, with `caching`, keeps what it frees until the worker releases its
    cache, which it does after each plan switch when `releases`. Each reading
    (GetStats, and ApplyPlan's answer) is of one moment: the device and the
    worker's reserved bytes as `own_bytes`, unless `reports_own` is off (a
    worker from before the field: the operator then counts its tensors).
    `seen_others` keeps what the others held at each GetStats, the truth a
    test checks the loop's budgets against."""

    caching: bool = True
    releases: bool = True
    reports_own: bool = True
    reserved_bytes: int = 0
    seen_others: list[int] = field(default_factory=list)

    def own_bytes(self) -> tuple[int, int]:
        """(weight bytes, KV bytes) with as many of the running sequences as
        fit the budget, as the worker's admission lets run."""
        config, dtype = self.profile.config, self.profile.dtype
        for rows in range(self.active, 0, -1):
            estimate = predict_memory(config, self.plan, rows, int(self.sequence_p90), dtype)
            if estimate.total_bytes <= self.budget_bytes:
                return estimate.weight_bytes, estimate.kv_bytes
        return predict_memory(config, self.plan, 0, 0, dtype).weight_bytes, 0

    def others_held(self) -> int:
        return max(min(self.others_bytes, self.total_bytes - self.reserved_bytes), 0)

    def device(self) -> pb.DeviceMemory:
        """Read the device now, the allocator first (what the worker holds)."""
        allocated = sum(self.own_bytes())
        reserved = max(self.reserved_bytes, allocated) if self.caching else allocated
        self.reserved_bytes = reserved
        own = reserved if self.reports_own else None
        return self.reading(self.others_held() + reserved, own, pb.MEMORY_SOURCE_NVML)

    async def get_stats(self, *, timeout: float | None = None) -> pb.GetStatsResponse:
        response = await super().get_stats(timeout=timeout)
        self.seen_others.append(self.others_held())
        return response

    def switched(self) -> pb.DeviceMemory | None:
        if self.releases:
            self.reserved_bytes = 0  # what is allocated stays reserved at the next reading
        return self.device() if self.reports_own else None


class FakeFleet:
    """Workers by pod name, and the `connect` the loop is given."""

    def __init__(self, profile: ModelProfile, count: int, **worker: Any) -> None:
        self.workers = {f"w{i}": FakeWorker(profile, **worker) for i in range(count)}
        self.connected: list[str] = []

    def endpoints(self) -> list[WorkerEndpoint]:
        return [
            WorkerEndpoint(pod, f"10.0.0.{i}:50051", "node-a") for i, pod in enumerate(self.workers)
        ]

    def connect(self, endpoint: WorkerEndpoint) -> FakeWorker:
        self.connected.append(endpoint.pod)
        return self.workers[endpoint.pod]


class RecordingSink:
    """Keeps every status patch and Event the loop sends."""

    def __init__(self) -> None:
        self.statuses: list[FleetStatus] = []
        self.events: list[FleetEvent] = []

    async def patch_status(self, status: FleetStatus) -> None:
        self.statuses.append(status)

    async def post_event(self, event: FleetEvent) -> None:
        self.events.append(event)


def fake_worker_service(worker: FakeWorker) -> grpc.GenericRpcHandler:
    """The Worker service's control-loop methods (all but Generate),
    answered by `worker`; its gRPC errors become the call's status."""

    def unary(
        method: Callable[..., Awaitable[Any]],
        request_type: Any,
        response_type: Any,
        arguments: Callable[[Any], tuple[Any, ...]],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await method(*arguments(request))
            except grpc.aio.AioRpcError as error:
                await context.abort(error.code(), error.details() or "")

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )

    async def apply_plan(request: pb.ApplyPlanRequest) -> pb.ApplyPlanResponse:
        return await worker.apply_plan(
            request.plan_id,
            list(request.keep_mask),
            budget(request),
            levels=list(request.levels),
            kv_levels=list(request.kv_levels),
        )

    def budget(request: pb.ApplyPlanRequest) -> int | None:
        return request.budget_bytes if request.HasField("budget_bytes") else None

    return grpc.method_handlers_generic_handler(
        "elasticfleet.v1.Worker",
        {
            "GetStats": unary(
                worker.get_stats, pb.GetStatsRequest, pb.GetStatsResponse, lambda r: ()
            ),
            "ApplyPlan": unary(
                apply_plan,
                pb.ApplyPlanRequest,
                pb.ApplyPlanResponse,
                lambda r: (r,),
            ),
            "ListAdapters": unary(
                worker.list_adapters, pb.ListAdaptersRequest, pb.ListAdaptersResponse, lambda r: ()
            ),
            "LoadAdapter": unary(
                worker.load_adapter,
                pb.LoadAdapterRequest,
                pb.LoadAdapterResponse,
                lambda r: (r.name, r.version, list(r.tasks)),
            ),
            "UnloadAdapter": unary(
                worker.unload_adapter,
                pb.UnloadAdapterRequest,
                pb.UnloadAdapterResponse,
                lambda r: (r.name,),
            ),
        },
    )
