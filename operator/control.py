"""The fleet control loop: telemetry in, plans out, status and Events back.

A plain async class with no kopf or Kubernetes import, so unit tests, a
local demo and the benchmark drive exactly what the operator runs. The
handlers (or anything else) call `tick` with the fleet's ready workers; one
tick:

1. asks every worker for GetStats, concurrently;
2. derives each worker's budget from the device memory it reported (what
   other processes hold: the device's used bytes less the worker's own,
   read at one moment) and asks the fleet's policy for a plan for its
   windowed load (budget.py);
3. pushes the plans (and budgets) that changed with ApplyPlan, concurrently,
   retrying transient failures per worker with exponential backoff;
4. rolls out the fleet's adapter sets: loads the ones a worker lacks (or
   holds at another version, or holds stale: a plan switch restored blocks
   whose parts it could not fetch) and unloads the ones the fleet dropped;
5. writes one status patch (a typed `FleetStatus`, status.py: every
   worker's figures, the last plans, the Available and Degraded conditions)
   and one Event per plan change through the `FleetSink` it is given.

What varies from tick to tick (the ready workers, where results go, the
adapter sets the fleet serves) is passed to `tick`; what lasts (the spec,
the connections, the last status) is the controller's.

Workers are reached through an injected `connect`; the asyncio gRPC client
(`elasticfleet.worker.serving.client.AsyncWorkerClient`) fits it as it is. A worker
that cannot be reached, or whose plan cannot be applied, marks the fleet
Degraded with a reason and a message naming it, and never holds up the
others: each worker's exchange runs on its own with its own deadlines.

Policy decisions are CPU work (the RL policy runs a small network per
dropped block), so they run on one thread of the controller's own, one at a
time, and the event loop (kopf's, in the operator) keeps serving. Workers
under the same budget and load ask the same question; each distinct one is
decided once.

Plan identifiers are derived from the keep-mask, and plans are compared
with what the worker reports, so a restarted operator seeded with the
fleet's last status pushes nothing that is already in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from elasticfleet.agent.policy import NoFeasiblePlan, Policy, PolicyState
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.agent.registry import make_policy
from elasticfleet.operator.budget import (
    BudgetError,
    DeviceFigures,
    Load,
    QualityFloor,
    QualityFloorError,
    derive_budget,
    planned_load,
)
from elasticfleet.operator.conditions import set_condition
from elasticfleet.operator.metrics import (
    OPERATOR_METRICS,
    OVER_BUDGET,
    WITHIN_BUDGET,
    OperatorMetrics,
)
from elasticfleet.operator.spec import FleetSpec, SpecError
from elasticfleet.operator.status import (
    MAX_PLAN_HISTORY,
    AdapterHeld,
    Condition,
    DeviceMemory,
    DeviceSource,
    FleetStatus,
    PlanRecord,
    PlanSummary,
    RequestMix,
    WorkerStatus,
)
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import INT4, INT8, PruningPlan
from elasticfleet.worker.serving.client import AsyncWorkerClient
from elasticfleet.worker.serving.plans import level_fields, plan_from_fields
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

# Why a worker is not being planned, most severe first: the Degraded
# condition carries the reason of the most severe one present.
UNREACHABLE = "WorkerUnreachable"
MODEL_MISMATCH = "ModelMismatch"
NO_MEMORY = "NoMemory"
NO_FEASIBLE_PLAN = "NoFeasiblePlan"
QUALITY_FLOOR = "QualityFloor"
PLAN_FAILED = "PlanFailed"
ADAPTER_FAILED = "AdapterFailed"
POLICY_FAILED = "PolicyFailed"
INTERNAL_ERROR = "InternalError"
SEVERITY = (
    INTERNAL_ERROR,
    UNREACHABLE,
    MODEL_MISMATCH,
    NO_MEMORY,
    NO_FEASIBLE_PLAN,
    QUALITY_FLOOR,
    POLICY_FAILED,
    PLAN_FAILED,
    ADAPTER_FAILED,
)

# gRPC codes worth trying again: the worker or the network may recover. A
# FAILED_PRECONDITION (the plan does not fit) would fail the same way.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
# The worker's MemorySource as the status names it (unspecified: unknown).
SOURCES = {
    pb.MEMORY_SOURCE_UNSPECIFIED: DeviceSource.UNKNOWN,
    pb.MEMORY_SOURCE_NVML: DeviceSource.NVML,
    pb.MEMORY_SOURCE_HOST: DeviceSource.HOST,
    pb.MEMORY_SOURCE_SIMULATED: DeviceSource.SIMULATED,
}
PROFILES_ENV = "ELASTICFLEET_PROFILES"
# Decisions remembered across ticks; the memo starts over when it is full.
MAX_DECISIONS = 4096


class WorkerConnection(Protocol):
    """The calls the loop makes on one worker (AsyncWorkerClient has them)."""

    async def get_stats(self, *, timeout: float | None = None) -> pb.GetStatsResponse: ...

    async def apply_plan(
        self,
        plan_id: str,
        keep_mask: Sequence[bool],
        budget_bytes: int | None = None,
        *,
        timeout: float | None = None,
        levels: Sequence[pb.BlockLevel.ValueType] = (),
        kv_levels: Sequence[pb.KvLevel.ValueType] = (),
    ) -> pb.ApplyPlanResponse: ...

    async def list_adapters(self, *, timeout: float | None = None) -> pb.ListAdaptersResponse: ...

    async def load_adapter(
        self,
        name: str,
        version: str = "",
        tasks: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> pb.LoadAdapterResponse: ...

    async def unload_adapter(
        self, name: str, *, timeout: float | None = None
    ) -> pb.UnloadAdapterResponse: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerEndpoint:
    """A ready worker: its pod, where to reach it, its node, and the name
    its TLS certificate is verified against (empty: the address's host)."""

    pod: str
    address: str
    node: str = ""
    server_name: str = ""


@dataclass(frozen=True)
class AdapterWant:
    """An adapter set the fleet serves: its name in the store, the version
    (empty: the store's current one) and the task heads (empty: all)."""

    name: str
    version: str = ""
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class FleetEvent:
    """A Kubernetes Event about the fleet, regarding one worker's pod."""

    type: str  # Normal or Warning
    reason: str
    message: str
    pod: str


class FleetSink(Protocol):
    """Where a tick's results go: the fleet's status subresource and Events."""

    async def patch_status(self, status: FleetStatus) -> None: ...

    async def post_event(self, event: FleetEvent) -> None: ...


Connect = Callable[[WorkerEndpoint], WorkerConnection]


def plaintext_connect(endpoint: WorkerEndpoint) -> WorkerConnection:
    """Reach a worker over plaintext gRPC with the project's asyncio client."""
    return AsyncWorkerClient(endpoint.address)


Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LoopSettings:
    """Deadlines and retries of the loop's calls."""

    stats_timeout_s: float = 5.0
    # A worker may hold a plan until running requests finish (30 s by default).
    apply_timeout_s: float = 35.0
    # Fetching an adapter set from Redis can take a while for large sets.
    adapter_timeout_s: float = 60.0
    attempts: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 5.0
    # A budget that moved less than this share is not pushed on its own.
    budget_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")


#: What a policy decides from: budget, batch, sequence length, the plan in force.
DecisionKey = tuple[int, int, int, PruningPlan]


def plan_id(plan: PruningPlan) -> str:
    """A plan's identifier: the same blocks at the same levels always get
    the same name (a pruning-only plan keeps the name its keep-mask had
    before levels existed)."""
    text = "".join("1" if keep else "0" for keep in plan.to_mask())
    if not plan.pruning_only:
        text += "/" + ",".join(plan.levels()) + "/" + ",".join(plan.kv_levels())
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_summary(plan: PruningPlan, identifier: str) -> PlanSummary:
    """How the status shows `plan`, under the id the worker reports for it."""
    counts = plan.level_counts()
    return PlanSummary(
        identifier,
        sum(plan.keep_attention),
        sum(plan.keep_ffn),
        tuple(plan.dropped_attention),
        tuple(plan.dropped_ffn),
        int8_blocks=counts[INT8],
        int4_blocks=counts[INT4],
        int8_kv=counts["kv_int8"],
    )


def profile_for_model(model_name: str) -> ModelProfile:
    """The block profile policies need for a fleet's model: the committed
    SmolLM2 profile, or `<model>.json` in a directory of $ELASTICFLEET_PROFILES
    (os.pathsep-separated; `elasticfleet agent profile --out` writes one)."""
    folders = [part for part in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if part]
    candidates = [DEFAULT_PROFILE, *(Path(folder) / f"{model_name}.json" for folder in folders)]
    known = []
    for path in candidates:
        if path.is_file():
            profile = ModelProfile.load(path)
            if profile.model_name == model_name:
                return profile
            known.append(profile.model_name)
    raise SpecError(
        f"no block profile for model {model_name!r}; profiled models: {', '.join(known)} "
        f"(profile it with `elasticfleet agent profile --out DIR/{model_name}.json` and "
        f"add DIR to ${PROFILES_ENV})"
    )


def build_policy(spec: FleetSpec) -> Policy:
    """The policy the fleet's spec names."""
    static_ratio = spec.memory.static_ratio
    if static_ratio is None:
        return make_policy(spec.memory.policy)
    return make_policy(spec.memory.policy, static_ratio=static_ratio)


def _describe_error(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


def _transient(error: BaseException) -> bool:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in TRANSIENT
    return isinstance(error, OSError | TimeoutError)


@dataclass
class WorkerOutcome:
    """What one tick did with one worker."""

    endpoint: WorkerEndpoint
    status: WorkerStatus
    error_reason: str = ""
    error: str = ""
    plan: PruningPlan | None = None
    record: PlanRecord | None = None  # when the plan changed

    @property
    def changed(self) -> bool:
        return self.record is not None


@dataclass
class TickReport:
    """A tick's outcomes and what it sent to the sink."""

    outcomes: list[WorkerOutcome]
    status: FleetStatus
    events: list[FleetEvent] = field(default_factory=list)


class FleetController:
    """Plans one fleet's workers; see the module docstring."""

    def __init__(
        self,
        spec: FleetSpec,
        profile: ModelProfile,
        connect: Connect,
        *,
        generation: int = 0,
        status: FleetStatus | None = None,
        settings: LoopSettings | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = utc_now,
        metrics: OperatorMetrics = OPERATOR_METRICS,
    ) -> None:
        self.profile = profile
        self.metrics = metrics
        self.connect = connect
        self.settings = settings or LoopSettings()
        self.sleep = sleep
        self.clock = clock
        self._connections: dict[str, WorkerConnection] = {}
        # Seeded from the fleet's last status, a restarted operator compares
        # plans with what is in force and keeps the conditions' times.
        previous = status or FleetStatus()
        self._workers = {w.pod: w for w in previous.workers or ()}
        self._history = list(previous.last_plans or ())
        self._conditions: tuple[Condition, ...] = previous.conditions or ()
        self._worker_errors: dict[str, str] = {}
        self._decider = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elasticfleet-policy")
        self.update(spec, generation)
        metrics.start_fleet(spec.namespace, spec.name, SEVERITY)

    def update(self, spec: FleetSpec, generation: int) -> None:
        """Adopt a changed spec (policy, budget, floor); the next tick plans with it."""
        if spec.model_name != self.profile.model_name:
            raise SpecError(
                f"fleet model {spec.model_name!r} does not match the profile's "
                f"{self.profile.model_name!r}"
            )
        self.spec = spec
        self.generation = generation
        self.policy = build_policy(spec)
        self.floor = QualityFloor(self.profile, spec.memory.max_perplexity_ratio)
        self._decisions: dict[DecisionKey, PruningPlan] = {}

    async def close(self) -> None:
        """Close every worker connection and stop the decision thread; the
        workers' metric series go."""
        await self._close_connections(list(self._connections))
        for pod in self._workers:
            self.metrics.forget_worker(self.spec.namespace, self.spec.name, pod)
        self._decider.shutdown(wait=False)

    async def reconnect(self, connect: Connect) -> None:
        """Reach the workers through `connect` from now on (new credentials,
        a rotated token): the connections made the old way are closed."""
        self.connect = connect
        await self._close_connections(list(self._connections))

    async def tick(
        self,
        endpoints: Sequence[WorkerEndpoint],
        sink: FleetSink,
        adapters: Sequence[AdapterWant] = (),
    ) -> TickReport:
        """One round over `endpoints` (the fleet's ready workers), rolling
        out `adapters` (the adapter sets the fleet serves now); the status
        and Events go to `sink`."""
        started = time.perf_counter()
        await self._forget_gone(endpoints)
        outcomes = list(await asyncio.gather(*(self._guarded(e, adapters) for e in endpoints)))
        now = self.clock()
        events = self._events(outcomes)
        for outcome in outcomes:
            self._workers[outcome.endpoint.pod] = outcome.status
            if outcome.record is not None:
                self._history.append(outcome.record)
        self._history = self._history[-MAX_PLAN_HISTORY:]
        self._set_conditions(outcomes, now)
        status = FleetStatus(
            observed_generation=self.generation,
            conditions=self._conditions,
            workers=tuple(self._workers[e.pod] for e in sorted(endpoints, key=lambda e: e.pod)),
            last_plans=tuple(self._history),
        )
        await sink.patch_status(status)
        for event in events:
            await sink.post_event(event)
        self._count(outcomes)
        fleet = (self.spec.namespace, self.spec.name)
        self.metrics.tick_duration.labels(*fleet).observe(time.perf_counter() - started)
        return TickReport(outcomes, status, events)

    def _count(self, outcomes: list[WorkerOutcome]) -> None:
        """The tick's outcomes in the operator's metrics (metrics.py)."""
        fleet = (self.spec.namespace, self.spec.name)
        for outcome in outcomes:
            pod = outcome.endpoint.pod
            self.metrics.reachable.labels(*fleet, pod).set(int(outcome.status.reachable))
            if outcome.error_reason:
                self.metrics.worker_failures.labels(*fleet, outcome.error_reason).inc()

    async def _forget_gone(self, endpoints: Sequence[WorkerEndpoint]) -> None:
        live = {e.address for e in endpoints}
        await self._close_connections([a for a in self._connections if a not in live])
        pods = {e.pod for e in endpoints}
        for pod in [p for p in self._workers if p not in pods]:
            del self._workers[pod]
            self._worker_errors.pop(pod, None)
            self.metrics.forget_worker(self.spec.namespace, self.spec.name, pod)

    async def _close_connections(self, addresses: list[str]) -> None:
        # A connection that fails to close is gone all the same.
        await asyncio.gather(
            *(self._connections.pop(a).close() for a in addresses), return_exceptions=True
        )

    def _connection(self, endpoint: WorkerEndpoint) -> WorkerConnection:
        if endpoint.address not in self._connections:
            self._connections[endpoint.address] = self.connect(endpoint)
        return self._connections[endpoint.address]

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, tried again after transient failures with exponential backoff."""
        delay = self.settings.backoff_s
        for attempt in range(1, self.settings.attempts + 1):
            try:
                return await call()
            except Exception as error:
                if attempt == self.settings.attempts or not _transient(error):
                    raise
            await self.sleep(delay)
            delay = min(delay * 2, self.settings.backoff_max_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failed(
        self,
        endpoint: WorkerEndpoint,
        reason: str,
        message: str,
        observed: WorkerStatus | None = None,
    ) -> WorkerOutcome:
        """A worker not planned this tick. An unreachable one keeps the figures
        it last reported; a reachable one shows what it just reported."""
        if observed is None:
            last = self._workers.get(endpoint.pod, WorkerStatus(endpoint.pod))
            observed = replace(last, pod=endpoint.pod, node=endpoint.node, address=endpoint.address)
            reachable = False
        else:
            reachable = True
        status = replace(observed, reachable=reachable, message=f"{reason}: {message}")
        return WorkerOutcome(endpoint, status, error_reason=reason, error=message)

    async def _guarded(
        self, endpoint: WorkerEndpoint, adapters: Sequence[AdapterWant]
    ) -> WorkerOutcome:
        """One worker's round; a bug there fails that worker, not the tick."""
        try:
            return await self._worker(endpoint, adapters)
        except Exception as error:
            log.exception("planning worker %s failed", endpoint.pod)
            return self._failed(endpoint, INTERNAL_ERROR, _describe_error(error))

    async def _worker(
        self, endpoint: WorkerEndpoint, adapters: Sequence[AdapterWant]
    ) -> WorkerOutcome:
        connection = self._connection(endpoint)
        timeout = self.settings.stats_timeout_s
        try:
            stats = await self._retrying(lambda: connection.get_stats(timeout=timeout))
        except Exception as error:
            return self._failed(endpoint, UNREACHABLE, _describe_error(error))
        status = self._observed(endpoint, stats)
        try:
            current = self._current_plan(stats)
            budget = derive_budget(self.spec.memory, _device(stats))
            worker = (self.spec.namespace, self.spec.name, endpoint.pod)
            # Set before the decision: a budget no plan may follow (the
            # quality floor refusing) is what the dashboard must show.
            self.metrics.budget.labels(*worker).set(budget)
            plan_budget = _plan_budget(budget, stats.memory.adapter_bytes)
            load = planned_load(
                stats.mix.batch_size_p90,
                stats.mix.sequence_tokens_p90,
                stats.active_sequences,
                self.profile.config.max_position_embeddings,
            )
            plan = self._decisions.get(_decision_key(plan_budget, load, current))
            if plan is None:
                loop = asyncio.get_running_loop()
                plan = await loop.run_in_executor(
                    self._decider, self._decide, plan_budget, load, current
                )
            ratio = self.floor.check(plan)
            self.metrics.perplexity_ratio.labels(*worker).set(ratio)
        except SpecError as error:
            return self._failed(endpoint, MODEL_MISMATCH, str(error), status)
        except BudgetError as error:
            return self._failed(endpoint, NO_MEMORY, str(error), status)
        except NoFeasiblePlan as error:
            return self._failed(endpoint, NO_FEASIBLE_PLAN, str(error), status)
        except QualityFloorError as error:
            return self._failed(endpoint, QUALITY_FLOOR, str(error), status)
        except ValueError as error:  # e.g. an RL agent trained for another block count
            return self._failed(endpoint, POLICY_FAILED, str(error), status)
        outcome = await self._push(
            endpoint, connection, stats, status, current, plan, budget, load, ratio
        )
        if outcome.error_reason:
            return outcome
        try:
            held = await self._roll_out_adapters(connection, adapters)
        except Exception as error:
            failed = self._failed(endpoint, ADAPTER_FAILED, _describe_error(error), outcome.status)
            failed.plan, failed.record = outcome.plan, outcome.record
            return failed
        outcome.status = replace(outcome.status, adapters=held)
        return outcome

    async def _roll_out_adapters(
        self, connection: WorkerConnection, adapters: Sequence[AdapterWant]
    ) -> tuple[AdapterHeld, ...]:
        """Load the wanted adapter sets a worker lacks (or holds at another
        version, or stale: nothing else would fetch the parts it misses once
        the store is back, if the plan stays), unload the ones the fleet no
        longer serves; what it holds."""
        timeout = self.settings.adapter_timeout_s
        listed = await self._retrying(lambda: connection.list_adapters(timeout=timeout))
        held = {a.name: a for a in listed.adapters}
        wanted = {want.name: want for want in adapters}
        for name in sorted(set(held) - set(wanted)):
            await self._retrying(partial(connection.unload_adapter, name, timeout=timeout))
            del held[name]
        for want in adapters:
            have = held.get(want.name)
            if have is None or (want.version and have.version != want.version) or have.stale:
                load = partial(
                    connection.load_adapter, want.name, want.version, want.tasks, timeout=timeout
                )
                response = await self._retrying(load)
                held[want.name] = response.adapter
        return tuple(
            AdapterHeld(a.name, a.version, a.bytes)
            for a in sorted(held.values(), key=lambda a: a.name)
        )

    def _current_plan(self, stats: pb.GetStatsResponse) -> PruningPlan:
        blocks = self.profile.num_blocks
        if stats.model and stats.model != self.spec.model_name:
            raise SpecError(
                f"the worker serves {stats.model!r}, the fleet's model is {self.spec.model_name!r}"
            )
        if len(stats.keep_mask) != blocks:
            raise SpecError(
                f"the worker reports {len(stats.keep_mask)} blocks, "
                f"{self.spec.model_name} has {blocks}"
            )
        try:
            return plan_from_fields(stats.keep_mask, stats.levels, stats.kv_levels)
        except ValueError as error:
            raise SpecError(f"the worker reports a malformed plan: {error}") from None

    def _decide(self, budget: int, load: Load, current: PruningPlan) -> PruningPlan:
        # Policies are deterministic, and workers under one load and budget
        # ask the same question: decide each distinct state once.
        key = _decision_key(budget, load, current)
        if key not in self._decisions:
            if len(self._decisions) >= MAX_DECISIONS:
                self._decisions.clear()
            state = PolicyState(
                budget, load.batch_size, load.seq_len, self.profile, current, self.spec.dtype_name
            )
            timer = self.metrics.decision_duration.labels(
                self.spec.namespace, self.spec.name, self.spec.memory.policy
            ).time()
            with timer:  # a decision that raises NoFeasiblePlan took its time too
                self._decisions[key] = self.policy.decide(state)
        return self._decisions[key]

    def _predicted(self, plan: PruningPlan, load: Load) -> int:
        estimate = predict_memory(
            self.profile.config, plan, load.batch_size, load.seq_len, self.spec.dtype_name
        )
        return estimate.total_bytes

    async def _push(
        self,
        endpoint: WorkerEndpoint,
        connection: WorkerConnection,
        stats: pb.GetStatsResponse,
        status: WorkerStatus,
        current: PruningPlan,
        plan: PruningPlan,
        budget: int,
        load: Load,
        ratio: float,
    ) -> WorkerOutcome:
        identifier = plan_id(plan)
        plan_changed = plan != current
        reported = stats.memory.budget_bytes
        budget_changed = abs(budget - reported) > self.settings.budget_tolerance * budget
        if not plan_changed and not budget_changed:
            return WorkerOutcome(endpoint, status, plan=plan)
        mask = plan.to_mask()
        levels, kv_levels = level_fields(plan)
        timeout = self.settings.apply_timeout_s
        try:
            response = await self._retrying(
                lambda: connection.apply_plan(
                    identifier, mask, budget, timeout=timeout, levels=levels, kv_levels=kv_levels
                )
            )
        except Exception as error:
            return self._failed(endpoint, PLAN_FAILED, _describe_error(error), status)
        # What the worker holds now, not what it held when asked for stats;
        # the device too when the worker read it at the same moment (else
        # its figures from before the switch stand beside the new weights).
        summary = plan_summary(plan, response.plan_id or identifier)
        status = replace(status, budget_bytes=budget, plan=summary)
        if response.HasField("memory"):  # a worker older than the field answers without it
            memory = response.memory
            status = replace(
                status, weight_bytes=memory.weight_bytes, kv_bytes=memory.kv_reserved_bytes
            )
        if response.HasField("device"):
            status = replace(status, device=_device_status(response.device))
        outcome = WorkerOutcome(endpoint, status, plan=plan)
        if plan_changed:
            # Plans are chosen beside the adapters the worker holds (_plan_budget).
            held = stats.memory.adapter_bytes
            before = self._predicted(current, load) + held
            over = before > budget
            reason = OVER_BUDGET if over else WITHIN_BUDGET
            self.metrics.plan_changes.labels(self.spec.namespace, self.spec.name, reason).inc()
            side = "over" if over else "within"
            outcome.record = PlanRecord(
                time=self.clock(),
                pod=endpoint.pod,
                plan=summary,
                reason=(
                    f"the previous plan needed {before:,} bytes, {side} the budget of "
                    f"{budget:,} at batch {load.batch_size} x {load.seq_len} tokens"
                ),
                budget_bytes=budget,
                predicted_bytes=self._predicted(plan, load) + held,
                predicted_perplexity_ratio=round(ratio, 4),
            )
        return outcome

    def _observed(self, endpoint: WorkerEndpoint, stats: pb.GetStatsResponse) -> WorkerStatus:
        """The status entry for what a worker reported."""
        memory, mix = stats.memory, stats.mix
        plan = None
        try:
            reported = plan_from_fields(stats.keep_mask, stats.levels, stats.kv_levels)
            plan = plan_summary(reported, stats.plan_id)
        except ValueError:
            pass  # _current_plan names the problem
        return WorkerStatus(
            endpoint.pod,
            endpoint.node,
            endpoint.address,
            reachable=True,
            message="",
            last_seen=self.clock(),
            device=_device_status(stats.device),
            budget_bytes=memory.budget_bytes,
            plan=plan,
            weight_bytes=memory.weight_bytes,
            kv_bytes=memory.kv_reserved_bytes,
            request_mix=RequestMix(
                mix.window_seconds,
                mix.batch_size_p90,
                mix.sequence_tokens_p90,
                mix.finished_requests,
                stats.tokens_per_second,
                stats.queue_depth,
                stats.active_sequences,
            ),
        )

    def _events(self, outcomes: list[WorkerOutcome]) -> list[FleetEvent]:
        events = []
        for outcome in outcomes:
            pod = outcome.endpoint.pod
            if outcome.record is not None and outcome.plan is not None:
                record = outcome.record
                events.append(
                    FleetEvent(
                        "Normal",
                        "PlanChanged",
                        f"{pod}: {outcome.plan.describe()} (plan {record.plan.id}); "
                        f"{record.reason}; predicted {record.predicted_bytes:,} bytes, "
                        f"perplexity x{record.predicted_perplexity_ratio:.2f}",
                        pod,
                    )
                )
            # A Warning when a worker enters a failure (or a different one),
            # not on every tick it stays there.
            if outcome.error_reason and self._worker_errors.get(pod) != outcome.error_reason:
                events.append(
                    FleetEvent("Warning", outcome.error_reason, f"{pod}: {outcome.error}", pod)
                )
            if outcome.error_reason:
                self._worker_errors[pod] = outcome.error_reason
            else:
                self._worker_errors.pop(pod, None)
        return events

    def _set_conditions(self, outcomes: list[WorkerOutcome], now: datetime) -> None:
        serving = sum(1 for o in outcomes if o.status.reachable)
        failed = [o for o in outcomes if o.error_reason]
        total = len(outcomes)
        if serving:
            available = (True, "WorkersServing", f"{serving} of {total} workers serving")
        elif total:
            available = (False, "NoWorkerReachable", f"none of {total} workers answered")
        else:
            available = (False, "NoReadyWorkers", "no worker is ready yet")
        if failed:
            reason = min((o.error_reason for o in failed), key=SEVERITY.index)
            lines = [f"{o.endpoint.pod}: {o.status.message}" for o in failed]
            degraded = (True, reason, "; ".join(lines)[:4000])
        elif total:
            degraded = (False, "AllWorkersPlanned", f"all {total} workers run their plans")
        else:
            degraded = (False, "NoReadyWorkers", "no worker is ready: nothing to plan")
        conditions = self._conditions
        for kind, (value, reason, message) in (("Available", available), ("Degraded", degraded)):
            conditions = set_condition(
                conditions, kind, value, reason, message, now=now, generation=self.generation
            )
        self._conditions = conditions


def _plan_budget(budget: int, adapter_bytes: int) -> int:
    """What a plan's weights and KV may take of a worker's budget: the rest
    after the adapters it holds, which the worker counts against the same
    budget (a plan for the whole budget would be refused by its admission).
    BudgetError when the adapters leave nothing."""
    left = budget - adapter_bytes
    if left <= 0:
        raise BudgetError(
            f"the worker's adapters hold {adapter_bytes:,} bytes, its whole budget of "
            f"{budget:,} or more: serve fewer AdapterSets or give the worker more memory"
        )
    return left


def _decision_key(
    budget: int, load: Load, current: PruningPlan
) -> tuple[int, int, int, PruningPlan]:
    return (budget, load.batch_size, load.seq_len, current)


def _device(stats: pb.GetStatsResponse) -> DeviceFigures:
    """The figures a budget is derived from (budget.py): the worker's own
    bytes as it read them with the device, at one moment; from a worker that
    does not report them, its tensors (weights, reserved KV, adapters)."""
    device = stats.device
    if device.HasField("own_bytes"):
        own = device.own_bytes
    else:
        memory = stats.memory
        own = memory.weight_bytes + memory.kv_reserved_bytes + memory.adapter_bytes
    return DeviceFigures(device.total_bytes, device.used_bytes, own)


def _device_status(device: pb.DeviceMemory) -> DeviceMemory:
    """How the status shows a device a worker reported."""
    return DeviceMemory(
        device.total_bytes,
        device.used_bytes,
        device.free_bytes,
        SOURCES.get(device.source, DeviceSource.UNKNOWN),
        device.own_bytes if device.HasField("own_bytes") else None,
    )
