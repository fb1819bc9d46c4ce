"""The fleet control loop against in-process fake workers with fake time:
squeeze a worker and see a smaller plan pushed, status and an Event; relax
it and see blocks restored; failures degrade the fleet without stalling the
others; retries back off; a restarted loop resumes from status."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import grpc
import pytest
from fake_fleet import GIB, FakeFleet, FakeTime, FakeWorker, RecordingSink, rpc_error
from prometheus_client import CollectorRegistry

from elasticfleet.agent.policy import GreedyPolicy, PolicyState
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.operator.budget import planned_load
from elasticfleet.operator.control import (
    AdapterWant,
    FleetController,
    LoopSettings,
    TickReport,
    WorkerEndpoint,
    plan_id,
    profile_for_model,
)
from elasticfleet.operator.metrics import OperatorMetrics
from elasticfleet.operator.spec import FleetSpec, SpecError
from elasticfleet.operator.status import AdapterHeld, Condition, FleetStatus, WorkerStatus
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import INT8, PruningPlan
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb

PROFILE = ModelProfile.load(DEFAULT_PROFILE)
LAYERS = PROFILE.config.num_hidden_layers
DENSE = PruningPlan.dense(LAYERS)


def _spec(policy: str = "greedy", **memory: Any) -> FleetSpec:
    memory_policy = {"policy": policy, "budget": {"fraction": 0.5}, **memory}
    raw = {
        "model": {"name": "SmolLM2-135M-Instruct"},
        "worker": {"image": "img"},
        "memoryPolicy": memory_policy,
    }
    return FleetSpec.parse("fleet", "ns", raw)


class Harness:
    """A controller over a fake fleet, with fake time, a recording sink and
    the adapter sets the fleet serves (none unless a test sets them)."""

    def __init__(self, fleet: FakeFleet, spec: FleetSpec | None = None, **kwargs: Any) -> None:
        self.fleet = fleet
        self.time = FakeTime()
        self.sink = RecordingSink()
        self.adapters: tuple[AdapterWant, ...] = ()
        self.controller = FleetController(
            spec or _spec(),
            PROFILE,
            fleet.connect,
            sleep=self.time.sleep,
            clock=self.time.clock,
            **kwargs,
        )

    async def tick_async(self) -> TickReport:
        return await self.controller.tick(self.fleet.endpoints(), self.sink, self.adapters)

    def tick(self) -> TickReport:
        return asyncio.run(self.tick_async())


def _condition(status: FleetStatus, kind: str) -> Condition:
    (condition,) = [c for c in status.conditions or () if c.type == kind]
    return condition


def _workers(status: FleetStatus) -> tuple[WorkerStatus, ...]:
    return status.workers or ()


def test_squeeze_then_relax() -> None:
    fleet = FakeFleet(PROFILE, 2, batch_p90=8, sequence_p90=2048)
    harness = Harness(fleet)
    worker = fleet.workers["w0"]

    # Plenty of memory: the dense plan stays; only the derived budget is sent.
    report = harness.tick()
    assert [o.changed for o in report.outcomes] == [False, False]
    assert worker.applied == [(plan_id(worker.plan), [True] * 2 * LAYERS, 2 * GIB)]
    assert harness.sink.events == []
    assert _condition(report.status, "Degraded").status == "False"
    assert _condition(report.status, "Available").message == "2 of 2 workers serving"

    # Squeeze w0: other processes take all but 1.6 GiB, so its budget (half
    # of that) is below the dense model's 1.29 GB at 8 x 2048 tokens.
    worker.others_bytes = int(2.4 * GIB)
    report = harness.tick()
    outcome = report.outcomes[0]
    assert outcome.changed and not report.outcomes[1].changed
    budget = int(0.5 * 1.6 * GIB)
    squeezed = worker.plan
    assert squeezed != DENSE
    assert worker.applied[-1] == (plan_id(squeezed), squeezed.to_mask(), budget)
    assert predict_memory(PROFILE.config, squeezed, 8, 2048).total_bytes <= budget
    # KV dominates at this load: the KV caches go to int8 first (the profile
    # measures them nearly free), no block is dropped.
    assert INT8 in squeezed.kv_levels() and squeezed.kept_blocks == 2 * LAYERS
    (event,) = harness.sink.events
    assert (event.type, event.reason, event.pod) == ("Normal", "PlanChanged", "w0")
    assert squeezed.describe() in event.message
    (record,) = report.status.last_plans or ()
    assert record.pod == "w0" and record.budget_bytes == budget
    assert record.predicted_bytes <= budget and record.predicted_perplexity_ratio >= 1.0
    assert "over the budget" in record.reason
    w0 = _workers(report.status)[0]
    assert w0.plan is not None and w0.plan.kept_attention == sum(squeezed.keep_attention)
    assert list(w0.plan.dropped_attention) == squeezed.dropped_attention
    assert w0.plan.int4_blocks == squeezed.level_counts()["int4"]
    assert w0.budget_bytes == budget and w0.reachable is True
    # The memory the worker holds under the new plan, from ApplyPlan's answer.
    assert (w0.weight_bytes, w0.kv_bytes) == worker.own_bytes()
    assert w0.request_mix is not None and w0.request_mix.batch_size_p90 == 8
    assert w0.device is not None and w0.device.source == "host"

    # Steady state: the same plan is not pushed again.
    pushes = len(worker.applied)
    harness.tick()
    assert len(worker.applied) == pushes and len(harness.sink.events) == 1

    # Relax: the memory comes back and every block is restored.
    worker.others_bytes = 0
    report = harness.tick()
    assert worker.plan == PruningPlan.dense(LAYERS)
    assert harness.sink.events[-1].reason == "PlanChanged"
    last_plans = report.status.last_plans or ()
    assert "within the budget" in last_plans[-1].reason and len(last_plans) == 2
    assert len(harness.sink.statuses) == 4


def test_plans_leave_room_for_the_adapters_a_worker_holds() -> None:
    """A worker counts its adapters against its budget: the plan is chosen
    for what they leave, and the record counts them."""
    fleet = FakeFleet(PROFILE, 1, batch_p90=8, sequence_p90=2048)
    harness = Harness(fleet)
    worker = fleet.workers["w0"]
    held = 200 * 2**20
    worker.adapters["tasks"] = pb.AdapterInfo(name="tasks", version="2", bytes=held)
    harness.adapters = (AdapterWant("tasks"),)
    worker.others_bytes = int(2.4 * GIB)
    report = harness.tick()
    budget = int(0.5 * 1.6 * GIB)
    plan = worker.plan
    load = planned_load(8, 2048, 0, PROFILE.config.max_position_embeddings)
    predicted = predict_memory(PROFILE.config, plan, load.batch_size, load.seq_len).total_bytes
    assert predicted + held <= budget < predicted + held + 100 * 2**20
    (record,) = report.status.last_plans or ()
    assert record.budget_bytes == budget and record.predicted_bytes == predicted + held
    # Without the adapters the same squeeze leaves a larger plan.
    alone = FakeFleet(PROFILE, 1, batch_p90=8, sequence_p90=2048)
    alone.workers["w0"].others_bytes = int(2.4 * GIB)
    Harness(alone).tick()
    larger = predict_memory(PROFILE.config, alone.workers["w0"].plan, load.batch_size, load.seq_len)
    assert larger.total_bytes > predicted

    worker.adapters["tasks"] = pb.AdapterInfo(name="tasks", version="2", bytes=budget)
    report = harness.tick()
    assert _condition(report.status, "Degraded").reason == "NoMemory"
    assert "adapters hold" in _condition(report.status, "Degraded").message


def test_heavier_load_drops_more_attention_blocks() -> None:
    # One short sequence: KV is tiny, weights are what must go; under long
    # sequences the KV of attention blocks is, so more of them go.
    plans = []
    for batch, sequence in ((1, 64), (16, 4096)):
        fleet = FakeFleet(
            PROFILE, 1, batch_p90=batch, sequence_p90=sequence, others_bytes=int(3.2 * GIB)
        )
        Harness(fleet).tick()
        plans.append(fleet.workers["w0"].plan)
    light, heavy = plans
    assert DENSE not in (light, heavy)
    assert len(heavy.dropped_attention) > len(light.dropped_attention)


def test_unreachable_worker_degrades_without_stalling_the_others() -> None:
    fleet = FakeFleet(PROFILE, 3, others_bytes=int(3.2 * GIB))
    harness = Harness(fleet)
    fleet.workers["w1"].down = True
    report = harness.tick()
    reachable = [fleet.workers["w0"], fleet.workers["w2"]]
    assert all(w.plan != DENSE for w in reachable)
    degraded = _condition(report.status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "WorkerUnreachable")
    assert degraded.message.startswith("w1: WorkerUnreachable: UNAVAILABLE")
    assert _condition(report.status, "Available").message == "2 of 3 workers serving"
    w1 = _workers(report.status)[1]
    assert w1.pod == "w1" and w1.reachable is False
    # GetStats was retried with backoff: 3 attempts, sleeps of 0.5 and 1 s.
    assert fleet.workers["w1"].stats_calls == 3 and harness.time.sleeps == [0.5, 1.0]
    warnings = [e for e in harness.sink.events if e.type == "Warning"]
    assert [(e.reason, e.pod) for e in warnings] == [("WorkerUnreachable", "w1")]

    # Still down: no second Warning. It comes back: planned, fleet healthy.
    harness.tick()
    assert len([e for e in harness.sink.events if e.type == "Warning"]) == 1
    fleet.workers["w1"].down = False
    report = harness.tick()
    assert fleet.workers["w1"].plan == fleet.workers["w0"].plan
    assert _condition(report.status, "Degraded").status == "False"
    assert _workers(report.status)[1].reachable is True


def test_an_unreachable_worker_keeps_its_last_figures() -> None:
    fleet = FakeFleet(PROFILE, 1)
    harness = Harness(fleet)
    (before,) = _workers(harness.tick().status)
    fleet.workers["w0"].down = True
    (after,) = _workers(harness.tick().status)
    assert after.device == before.device and after.last_seen == before.last_seen
    assert after.reachable is False and after.message.startswith("WorkerUnreachable")


def test_gets_stats_from_all_workers_concurrently() -> None:
    # Each GetStats waits until all of them have started: sequential calls
    # would never get past the first.
    fleet = FakeFleet(PROFILE, 5)

    async def run() -> TickReport:
        barrier = asyncio.Barrier(5)
        for worker in fleet.workers.values():
            worker.entered = barrier
        harness = Harness(fleet)
        return await asyncio.wait_for(harness.tick_async(), 5)

    report = asyncio.run(run())
    assert all(o.status.reachable for o in report.outcomes)


def test_transient_apply_failures_are_retried_with_backoff() -> None:
    fleet = FakeFleet(PROFILE, 1, others_bytes=int(3.2 * GIB))
    worker = fleet.workers["w0"]
    worker.apply_errors = [
        rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset"),
        rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    ]
    settings = LoopSettings(attempts=4, backoff_s=1.0, backoff_max_s=1.5)
    harness = Harness(fleet, settings=settings)
    report = harness.tick()
    assert report.outcomes[0].changed and len(worker.applied) == 1
    assert harness.time.sleeps == [1.0, 1.5]
    assert _condition(report.status, "Degraded").status == "False"


def test_refused_plan_is_not_retried_and_degrades() -> None:
    fleet = FakeFleet(PROFILE, 2, others_bytes=int(3.2 * GIB))
    refusal = rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "did not fit in time")
    fleet.workers["w0"].apply_errors = [refusal]
    harness = Harness(fleet)
    report = harness.tick()
    assert harness.time.sleeps == [] and fleet.workers["w0"].applied == []
    assert fleet.workers["w1"].applied
    degraded = _condition(report.status, "Degraded")
    assert degraded.reason == "PlanFailed"
    assert "FAILED_PRECONDITION: did not fit in time" in degraded.message
    assert _workers(report.status)[0].reachable is True
    assert [e.reason for e in harness.sink.events].count("PlanChanged") == 1
    assert [r.pod for r in report.status.last_plans or ()] == ["w1"]


def test_no_feasible_plan() -> None:
    fleet = FakeFleet(PROFILE, 1)
    harness = Harness(fleet, _spec(budget={"bytes": 50_000_000}))
    report = harness.tick()
    degraded = _condition(report.status, "Degraded")
    assert degraded.reason == "NoFeasiblePlan" and "greedy policy" in degraded.message
    assert fleet.workers["w0"].applied == []


def test_quality_floor_keeps_the_plan_and_says_what_to_fix() -> None:
    # Deep enough a squeeze that int4 alone does not do: blocks must go.
    fleet = FakeFleet(PROFILE, 1, others_bytes=int(3.7 * GIB))
    harness = Harness(fleet, _spec(qualityFloor={"maxPerplexityRatio": 1.05}))
    report = harness.tick()
    assert fleet.workers["w0"].applied == []
    degraded = _condition(report.status, "Degraded")
    assert degraded.reason == "QualityFloor"
    assert "raise memoryPolicy.qualityFloor.maxPerplexityRatio" in degraded.message


def test_no_memory() -> None:
    fleet = FakeFleet(PROFILE, 1, others_bytes=4 * GIB)
    report = Harness(fleet).tick()
    assert _condition(report.status, "Degraded").reason == "NoMemory"


def test_worker_serving_another_model() -> None:
    fleet = FakeFleet(PROFILE, 1, model="Llama-2-7b")
    report = Harness(fleet).tick()
    degraded = _condition(report.status, "Degraded")
    assert degraded.reason == "ModelMismatch" and "'Llama-2-7b'" in degraded.message


def test_most_severe_reason_wins() -> None:
    fleet = FakeFleet(PROFILE, 2)
    fleet.workers["w0"].model = "other"
    fleet.workers["w1"].down = True
    report = Harness(fleet).tick()
    degraded = _condition(report.status, "Degraded")
    assert degraded.reason == "WorkerUnreachable"
    assert "w0: ModelMismatch" in degraded.message and "w1: WorkerUnreachable" in degraded.message


def test_restart_resumes_from_status() -> None:
    fleet = FakeFleet(PROFILE, 2, others_bytes=int(3.2 * GIB))
    first = Harness(fleet)
    status = first.tick().status
    pushed = {pod: list(w.applied) for pod, w in fleet.workers.items()}
    first.time.now = first.time.now.replace(hour=5)

    # A new operator process, seeded with the fleet's status as the cluster
    # holds it (JSON): nothing to push.
    stored = json.loads(json.dumps(status.to_dict()))
    second = Harness(fleet, status=FleetStatus.from_dict(stored))
    second.time.now = first.time.now
    report = second.tick()
    assert {pod: w.applied for pod, w in fleet.workers.items()} == pushed
    assert second.sink.events == []
    assert report.status.last_plans == status.last_plans
    # Conditions that did not change keep their transition time.
    for kind in ("Available", "Degraded"):
        assert _condition(report.status, kind) == _condition(status, kind)


def test_condition_transition_time_moves_only_on_change() -> None:
    fleet = FakeFleet(PROFILE, 1)
    harness = Harness(fleet)
    start = _condition(harness.tick().status, "Degraded").last_transition_time
    harness.time.now = harness.time.now.replace(minute=10)
    fleet.workers["w0"].down = True
    moved = _condition(harness.tick().status, "Degraded")
    assert moved.status == "True" and moved.last_transition_time != start


def test_spec_update_changes_the_policy() -> None:
    fleet = FakeFleet(PROFILE, 1, others_bytes=int(3.2 * GIB))
    harness = Harness(fleet, _spec(policy="none"))
    assert _condition(harness.tick().status, "Degraded").reason == "NoFeasiblePlan"
    harness.controller.update(_spec(policy="greedy"), generation=2)
    report = harness.tick()
    assert report.outcomes[0].changed
    assert report.status.observed_generation == 2
    assert _condition(report.status, "Degraded").observed_generation == 2


def test_rl_policy_plans_the_fleet() -> None:
    fleet = FakeFleet(PROFILE, 2, batch_p90=16, sequence_p90=2048, others_bytes=int(2.4 * GIB))
    report = Harness(fleet, _spec(policy="rl")).tick()
    for outcome in report.outcomes:
        assert outcome.changed
        plan = fleet.workers[outcome.endpoint.pod].plan
        assert predict_memory(PROFILE.config, plan, 16, 2048).total_bytes <= int(0.8 * GIB)


def test_workers_that_leave_are_forgotten_and_closed() -> None:
    fleet = FakeFleet(PROFILE, 2)
    harness = Harness(fleet)
    harness.tick()
    gone = fleet.workers.pop("w1")
    report = harness.tick()
    assert gone.closed and [w.pod for w in _workers(report.status)] == ["w0"]
    assert fleet.connected == ["w0", "w1"]  # one connection per worker, reused
    asyncio.run(harness.controller.close())
    assert fleet.workers["w0"].closed


def test_new_credentials_close_the_old_connections() -> None:
    fleet = FakeFleet(PROFILE, 2)
    harness = Harness(fleet)
    harness.tick()
    reached: list[str] = []

    def connect(endpoint: WorkerEndpoint) -> FakeWorker:
        reached.append(endpoint.pod)
        return fleet.connect(endpoint)

    asyncio.run(harness.controller.reconnect(connect))
    assert all(worker.closed for worker in fleet.workers.values())
    harness.tick()
    assert reached == ["w0", "w1"]  # every worker reached again, the new way


def test_no_workers_yet() -> None:
    report = Harness(FakeFleet(PROFILE, 0)).tick()
    assert _condition(report.status, "Available").reason == "NoReadyWorkers"
    assert _condition(report.status, "Degraded").status == "False"


def test_profile_for_model() -> None:
    assert profile_for_model("SmolLM2-135M-Instruct").model_name == "SmolLM2-135M-Instruct"
    with pytest.raises(SpecError, match="no block profile for model 'Llama-2-7b'"):
        profile_for_model("Llama-2-7b")


def test_adapters_roll_out() -> None:
    fleet = FakeFleet(PROFILE, 2)
    harness = Harness(fleet)
    stale = pb.AdapterInfo(name="retired", version="3", bytes=10)
    fleet.workers["w1"].adapters["retired"] = stale
    harness.adapters = (AdapterWant("tasks", tasks=("code", "qa")),)
    report = harness.tick()
    for worker in fleet.workers.values():
        assert ("load", "tasks", "", "code", "qa") in worker.adapter_calls
    assert fleet.workers["w1"].adapter_calls[0] == ("unload", "retired")
    held = (AdapterHeld("tasks", "2", 4096),)
    assert [w.adapters for w in _workers(report.status)] == [held, held]
    assert _condition(report.status, "Degraded").status == "False"

    # In place: nothing is loaded again. A pinned older version is.
    calls = [list(w.adapter_calls) for w in fleet.workers.values()]
    harness.tick()
    assert [w.adapter_calls for w in fleet.workers.values()] == calls
    harness.adapters = (AdapterWant("tasks", version="1"),)
    report = harness.tick()
    assert fleet.workers["w0"].adapter_calls[-1] == ("load", "tasks", "1")
    assert [a.version for a in _workers(report.status)[0].adapters or ()] == ["1"]


def test_a_stale_adapter_set_is_loaded_again() -> None:
    """A set that could not follow a plan switch (the store was down when
    restored blocks needed their parts) is loaded again every tick until it
    serves: if the plan stays, nothing else fetches the parts it misses."""
    fleet = FakeFleet(PROFILE, 1)
    harness = Harness(fleet)
    harness.adapters = (AdapterWant("tasks"),)
    harness.tick()
    worker = fleet.workers["w0"]
    worker.adapters["tasks"].stale = "adapter 'tasks' could not follow the new plan"
    loads = len(worker.adapter_calls)
    harness.tick()
    assert worker.adapter_calls[loads:] == [("load", "tasks", "")]
    assert not worker.adapters["tasks"].stale
    harness.tick()  # serving again: left alone
    assert len(worker.adapter_calls) == loads + 1


def test_an_adapter_missing_from_the_store_degrades_but_the_plan_applies() -> None:
    fleet = FakeFleet(PROFILE, 1, others_bytes=int(3.2 * GIB))
    harness = Harness(fleet)
    harness.adapters = (AdapterWant("nowhere"),)
    report = harness.tick()
    (outcome,) = report.outcomes
    assert outcome.changed and fleet.workers["w0"].plan != DENSE
    degraded = _condition(report.status, "Degraded")
    assert degraded.reason == "AdapterFailed"
    assert "NOT_FOUND: no adapter 'nowhere' in the store" in degraded.message
    assert [e.reason for e in harness.sink.events] == ["PlanChanged", "AdapterFailed"]


class CountingPolicy:
    """Greedy decisions, counted, each taking `seconds` of real CPU-bound time."""

    name = "counting"

    def __init__(self, seconds: float = 0.0) -> None:
        self.calls = 0
        self.seconds = seconds
        self.threads: set[str] = set()

    def decide(self, state: PolicyState) -> PruningPlan:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)  # stands in for a network's forward passes
        return GreedyPolicy().decide(state)


def test_each_distinct_state_is_decided_once() -> None:
    fleet = FakeFleet(PROFILE, 4, others_bytes=int(3.2 * GIB))
    harness = Harness(fleet)
    policy = CountingPolicy()
    harness.controller.policy = policy
    harness.tick()
    assert policy.calls == 1  # four workers, one state
    assert len({w.plan for w in fleet.workers.values()}) == 1
    harness.tick()  # each worker now runs that plan: a new state, decided once
    assert policy.calls == 2


def test_decisions_do_not_block_the_event_loop() -> None:
    fleet = FakeFleet(PROFILE, 1, others_bytes=int(3.2 * GIB))
    harness = Harness(fleet)
    policy = CountingPolicy(seconds=0.3)
    harness.controller.policy = policy

    async def run() -> int:
        beats = 0
        tick = asyncio.create_task(harness.tick_async())
        while not tick.done():
            await asyncio.sleep(0.01)
            beats += 1
        await tick
        return beats

    assert asyncio.run(run()) >= 10
    assert policy.threads == {"elasticfleet-policy_0"}


def test_a_policy_for_another_model_fails_that_worker_not_the_tick() -> None:
    fleet = FakeFleet(PROFILE, 1, others_bytes=int(3.2 * GIB))
    harness = Harness(fleet)

    class WrongAgent:
        name = "rl"

        def decide(self, state: PolicyState) -> PruningPlan:
            raise ValueError("the agent was trained for 8 blocks, the model has 60")

    harness.controller.policy = WrongAgent()
    degraded = _condition(harness.tick().status, "Degraded")
    assert (degraded.reason, degraded.status) == ("PolicyFailed", "True")
    assert "trained for 8 blocks" in degraded.message


def test_an_unexpected_error_fails_that_worker_not_the_tick() -> None:
    fleet = FakeFleet(PROFILE, 2)
    harness = Harness(fleet)

    async def broken(*, timeout: float | None = None) -> Any:
        return None  # not a GetStatsResponse

    fleet.workers["w0"].get_stats = broken  # type: ignore[method-assign]
    report = harness.tick()
    assert report.outcomes[0].error_reason == "InternalError"
    assert report.outcomes[1].error_reason == ""
    assert _condition(report.status, "Degraded").reason == "InternalError"


def test_a_connection_that_fails_to_close_does_not_fail_the_tick() -> None:
    fleet = FakeFleet(PROFILE, 2)
    harness = Harness(fleet)
    harness.tick()

    async def refuse() -> None:
        raise OSError("socket already gone")

    gone = fleet.workers.pop("w1")
    gone.close = refuse  # type: ignore[method-assign]
    report = harness.tick()
    assert [w.pod for w in _workers(report.status)] == ["w0"]


def test_a_budget_within_tolerance_is_not_pushed() -> None:
    # The default spec derives a 2 GiB budget here; a worker already within
    # 2% of it keeps its plan and budget, one 3% off is sent the new budget.
    for share, pushed in ((0.99, []), (0.97, [2 * GIB])):
        fleet = FakeFleet(PROFILE, 1, budget_bytes=int(2 * GIB * share))
        Harness(fleet).tick()
        assert [applied[2] for applied in fleet.workers["w0"].applied] == pushed


def test_the_loop_counts_what_it_does_in_its_metrics() -> None:
    registry = CollectorRegistry()
    fleet = FakeFleet(PROFILE, 2, batch_p90=8, sequence_p90=2048)
    harness = Harness(fleet, metrics=OperatorMetrics(registry))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(
            "elasticfleet_operator_" + name, {"namespace": "ns", "fleet": "fleet", **labels}
        )

    # Before any tick, every reason's counter is there at zero.
    assert value("plan_changes_total", reason="over_budget") == 0
    assert value("worker_failures_total", reason="QualityFloor") == 0
    harness.tick()
    assert value("worker_budget_bytes", pod="w0") == 2 * GIB
    assert value("worker_predicted_perplexity_ratio", pod="w0") == 1.0
    assert value("tick_duration_seconds_count") == 1
    assert value("policy_decision_seconds_count", policy="greedy") == 1  # one state, decided once

    fleet.workers["w0"].others_bytes = int(2.4 * GIB)
    fleet.workers["w1"].down = True
    report = harness.tick()
    squeezed = report.outcomes[0].record
    assert squeezed is not None
    assert value("plan_changes_total", reason="over_budget") == 1
    assert value("worker_budget_bytes", pod="w0") == squeezed.budget_bytes
    ratio = value("worker_predicted_perplexity_ratio", pod="w0")
    assert ratio is not None and round(ratio, 4) == squeezed.predicted_perplexity_ratio >= 1
    assert value("worker_reachable", pod="w0") == 1
    assert value("worker_reachable", pod="w1") == 0
    assert value("worker_failures_total", reason="WorkerUnreachable") == 1

    fleet.workers["w0"].others_bytes = 0
    harness.tick()
    assert value("plan_changes_total", reason="within_budget") == 1
    assert value("worker_failures_total", reason="WorkerUnreachable") == 2

    # A pod that left takes its series with it.
    del fleet.workers["w1"]
    harness.tick()
    assert value("worker_reachable", pod="w1") is None
    assert value("worker_budget_bytes", pod="w0") is not None


def test_a_budget_the_floor_refuses_to_follow_is_still_in_the_metrics() -> None:
    registry = CollectorRegistry()
    # Deep enough a squeeze that int4 alone does not do: blocks must go.
    others = int(3.7 * GIB)
    fleet = FakeFleet(PROFILE, 1, others_bytes=others)
    spec = _spec(qualityFloor={"maxPerplexityRatio": 1.05})
    harness = Harness(fleet, spec, metrics=OperatorMetrics(registry))
    harness.tick()
    labels = {"namespace": "ns", "fleet": "fleet", "pod": "w0"}
    budget = registry.get_sample_value("elasticfleet_operator_worker_budget_bytes", labels)
    assert budget == int(0.5 * (4 * GIB - others)) < fleet.workers["w0"].budget_bytes
    ratio = "elasticfleet_operator_worker_predicted_perplexity_ratio"
    assert registry.get_sample_value(ratio, labels) is None  # no plan was accepted
    failures = {"namespace": "ns", "fleet": "fleet", "reason": "QualityFloor"}
    assert registry.get_sample_value("elasticfleet_operator_worker_failures_total", failures) == 1
