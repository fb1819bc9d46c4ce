"""The control loop converges on workers whose device memory behaves like a
GPU's: the real FleetController, over many ticks, against workers that

(a) report the device's used bytes and their own from one reading,
(b) keep freed memory reserved (a caching allocator) until they release it,
(c) share the device with other processes whose memory moves;

in process and through real gRPC. What must hold, tick by tick:

- every budget pushed is the one the memory other processes really hold
  leaves (they hold what the test's device gave them when GetStats read it):
  never less, so no runaway pruning, and never more;
- so the plan in force is the policy's plan for that true budget, never a
  smaller one;
- zero budget overruns: every plan pushed is predicted within its budget;
- no oscillation: once the load and the others' memory stop changing, the
  plans (and budgets) stop changing within a few ticks and stay.

A worker from before DeviceMemory.own_bytes on such a device is the control:
the loop counts its tensors as its own, every block it drops (still reserved)
looks like another process growing, and it prunes further and further, which
the same checks catch.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc.aio
import pytest
from fake_fleet import GIB, DeviceWorker, FakeTime, RecordingSink, fake_worker_service
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticfleet.agent.policy import PolicyState
from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.operator.budget import DeviceFigures, derive_budget, planned_load
from elasticfleet.operator.control import (
    Connect,
    FleetController,
    WorkerConnection,
    WorkerEndpoint,
    build_policy,
    plaintext_connect,
)
from elasticfleet.operator.spec import FleetSpec
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import PruningPlan

PROFILE = ModelProfile.load(DEFAULT_PROFILE)
SPEC = FleetSpec.parse(
    "fleet",
    "ns",
    {
        "model": {"name": PROFILE.model_name},
        "worker": {"image": "img"},
        "memoryPolicy": {
            "policy": "greedy",
            "budget": {"fraction": 0.5},
            "headroomBytes": 128 * 2**20,
        },
    },
)
POLICY = build_policy(SPEC)
ENDPOINT = WorkerEndpoint("w0", "10.0.0.1:50051")


@dataclass(frozen=True)
class Moment:
    """What a tick finds: what other processes want of the 4 GiB device,
    and the worker's load (p90 batch and sequence, sequences running)."""

    others_bytes: int
    batch: int = 8
    sequence: int = 1024
    active: int = 2


# Plenty, a squeeze, other processes coming and going while the load moves,
# then ten ticks of the same: the plan must settle and stay.
SCHEDULE = (
    [Moment(0)] * 3
    + [Moment(int(2.4 * GIB))] * 3
    + [
        Moment(int(2.0 * GIB), 4, 2048, 4),
        Moment(int(2.8 * GIB), 16, 512, 8),
        Moment(int(1.2 * GIB), 8, 2048, 1),
        Moment(int(2.9 * GIB), 2, 256, 0),
        Moment(int(2.2 * GIB), 12, 1024, 6),
        Moment(int(0.5 * GIB), 8, 4096, 2),
        Moment(int(2.6 * GIB), 8, 1024, 2),
    ]
    + [Moment(int(2.5 * GIB))] * 10
)


@dataclass(frozen=True)
class Tick:
    """One tick as the test sees it: the budget the others' true memory
    leaves, what the loop pushed, and the plan in force after it."""

    moment: Moment
    true_budget: int
    pushed: list[tuple[str, list[bool], int | None]]
    predicted: list[tuple[int, int]]  # (predicted bytes, budget) per plan change
    plan: PruningPlan


def true_budget(others_bytes: int) -> int:
    """The budget for a device on which other processes hold `others_bytes`."""
    return derive_budget(SPEC.memory, DeviceFigures(4 * GIB, others_bytes, 0))


async def drive(
    worker: DeviceWorker, connect: Connect, schedule: list[Moment] = SCHEDULE
) -> list[Tick]:
    """Tick the real controller over `worker` through `schedule`."""
    time = FakeTime()
    controller = FleetController(SPEC, PROFILE, connect, sleep=time.sleep, clock=time.clock)
    sink = RecordingSink()
    ticks = []
    try:
        for moment in schedule:
            worker.others_bytes = moment.others_bytes
            worker.batch_p90, worker.sequence_p90 = moment.batch, moment.sequence
            worker.active = moment.active
            pushes = len(worker.applied)
            report = await controller.tick([ENDPOINT], sink)
            (outcome,) = report.outcomes
            assert not outcome.error, outcome.error
            changes = [(r.predicted_bytes, r.budget_bytes) for r in [outcome.record] if r]
            truth = true_budget(worker.seen_others[-1])
            ticks.append(Tick(moment, truth, worker.applied[pushes:], changes, worker.plan))
    finally:
        await controller.close()
    return ticks


def plan_for(budget: int, moment: Moment) -> PruningPlan:
    """The fleet's policy's plan for `budget` at the moment's load."""
    load = planned_load(
        moment.batch, moment.sequence, moment.active, PROFILE.config.max_position_embeddings
    )
    return POLICY.decide(PolicyState(budget, load.batch_size, load.seq_len, PROFILE))


def check_converges(ticks: list[Tick], settle: int = 3) -> None:
    """The module docstring's invariants, tick by tick."""
    for index, tick in enumerate(ticks):
        for _plan_id, _mask, budget in tick.pushed:
            assert budget == tick.true_budget, f"tick {index}: budget {budget:,} pushed"
        assert tick.plan == plan_for(tick.true_budget, tick.moment), f"tick {index}"
        for predicted, budget in tick.predicted:
            assert predicted <= budget, f"tick {index}: overrun, {predicted:,} > {budget:,}"
    moments = [t.moment for t in ticks]
    last_change = max(i for i in range(len(moments)) if i == 0 or moments[i] != moments[i - 1])
    settled = ticks[last_change + settle :]
    assert settled, "the schedule ends before the plan could settle"
    assert all(not t.pushed for t in settled), "plans still pushed once nothing changes"


def in_process(worker: DeviceWorker) -> Connect:
    def connect(endpoint: WorkerEndpoint) -> WorkerConnection:
        return worker

    return connect


@pytest.mark.parametrize(
    ("caching", "releases"),
    [(True, True), (True, False), (False, False)],
    ids=["caching-released-after-switches", "caching-never-released", "no-cache"],
)
def test_the_loop_converges_on_workers_that_report_their_own_bytes(
    caching: bool, releases: bool
) -> None:
    worker = DeviceWorker(PROFILE, caching=caching, releases=releases)
    ticks = asyncio.run(drive(worker, in_process(worker)))
    check_converges(ticks)
    # The squeeze pruned, and the plans followed the others' memory both ways.
    dense = PruningPlan.dense(PROFILE.config.num_hidden_layers)
    assert any(t.plan == dense for t in ticks) and any(t.plan != dense for t in ticks)
    assert len({t.plan for t in ticks}) > 3


def test_freed_memory_kept_reserved_is_the_workers_not_the_others() -> None:
    """A caching allocator that is never released: after the squeeze the
    worker's "used" does not fall, and the others cannot have what it keeps.
    The loop neither prunes further (the others did not grow) nor grows the
    plan back into memory the device does not have for it."""
    worker = DeviceWorker(PROFILE, caching=True, releases=False)
    squeeze = [Moment(0)] * 2 + [Moment(int(2.4 * GIB))] * 8
    ticks = asyncio.run(drive(worker, in_process(worker), squeeze))
    check_converges(ticks, settle=1)
    assert worker.reserved_bytes > sum(worker.own_bytes())  # the dense plan's, still reserved
    assert sum(1 for t in ticks if t.predicted) == 1  # one plan change, then none


@settings(max_examples=50, deadline=None)
@given(
    others=st.lists(st.integers(0, 3 * GIB), min_size=1, max_size=8),
    loads=st.lists(
        st.tuples(st.integers(1, 16), st.integers(16, 4096), st.integers(0, 16)),
        min_size=1,
        max_size=8,
    ),
    caching=st.booleans(),
    releases=st.booleans(),
)
def test_the_loop_converges_whatever_the_others_and_the_load_do(
    others: list[int], loads: list[tuple[int, int, int]], caching: bool, releases: bool
) -> None:
    moving = [
        Moment(o, *loads[i % len(loads)]) for i, o in enumerate(others)
    ]  # then four ticks of the last moment
    worker = DeviceWorker(PROFILE, caching=caching, releases=releases)
    ticks = asyncio.run(drive(worker, in_process(worker), moving + [moving[-1]] * 4))
    check_converges(ticks)


def test_the_loop_converges_through_grpc() -> None:
    """The same over the real transport: own_bytes (an optional field) and
    ApplyPlan's device reach the loop as the worker sent them."""
    worker = DeviceWorker(PROFILE)

    async def run() -> list[Tick]:
        server = grpc.aio.server(handlers=[fake_worker_service(worker)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def connect(endpoint: WorkerEndpoint) -> WorkerConnection:
            return plaintext_connect(WorkerEndpoint(endpoint.pod, f"127.0.0.1:{port}"))

        try:
            return await drive(worker, connect)
        finally:
            await server.stop(None)

    check_converges(asyncio.run(asyncio.wait_for(run(), 120)))


def test_without_own_bytes_a_caching_allocator_makes_the_loop_prune_further_and_further() -> None:
    """The control: a worker that does not report own_bytes (the loop then
    counts its tensors) on a device that keeps freed memory reserved. Nothing
    changes after the squeeze, yet each plan it gets frees tensors but not
    device memory, the others seem to grow by as much, and the loop prunes
    again: the checks above fail on it."""
    worker = DeviceWorker(PROFILE, caching=True, releases=False, reports_own=False)
    heavy = Moment(int(2.4 * GIB), 8, 2048, 8)
    ticks = asyncio.run(drive(worker, in_process(worker), [Moment(0)] * 2 + [heavy] * 10))
    budgets = [budget or 0 for t in ticks[2:] for _plan_id, _mask, budget in t.pushed]
    assert len(budgets) >= 5 and budgets == sorted(budgets, reverse=True)  # ever smaller
    assert budgets[-1] < 0.5 * ticks[-1].true_budget  # far below what the device leaves
    held, due = (
        predict_memory(PROFILE.config, plan, 0, 0).weight_bytes
        for plan in (ticks[-1].plan, plan_for(ticks[-1].true_budget, heavy))
    )
    assert held < due
    with pytest.raises(AssertionError):
        check_converges(ticks)
    # The same worker reporting its own bytes gets one plan for the squeeze.
    honest = DeviceWorker(PROFILE, caching=True, releases=False)
    ticks = asyncio.run(drive(honest, in_process(honest), [Moment(0)] * 2 + [heavy] * 10))
    check_converges(ticks, settle=1)


def test_the_status_shows_the_device_read_after_the_switch() -> None:
    """After a push, the worker's status entry holds the device as ApplyPlan
    read it, with the worker's own bytes, beside the memory it holds now."""
    worker = DeviceWorker(
        PROFILE, others_bytes=int(2.4 * GIB), batch_p90=8, sequence_p90=2048, active=2
    )
    time = FakeTime()
    controller = FleetController(
        SPEC, PROFILE, in_process(worker), sleep=time.sleep, clock=time.clock
    )
    report = asyncio.run(controller.tick([ENDPOINT], RecordingSink()))
    (entry,) = report.status.workers or ()
    assert report.outcomes[0].changed and entry.device is not None
    weights, kv = worker.own_bytes()
    assert (entry.weight_bytes, entry.kv_bytes) == (weights, kv)
    assert entry.device.own_bytes == weights + kv == worker.reserved_bytes  # released
    assert entry.device.used_bytes == int(2.4 * GIB) + weights + kv
    weights_before = predict_memory(PROFILE.config, None, 0, 0).weight_bytes
    assert weights < weights_before
