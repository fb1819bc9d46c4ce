"""The kopf sink writes, with the control loop's status, what the /scale
subresource reads (replicas and the workers' selector) and the rollout's
Progressing condition, keeping the conditions other handlers own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import kopf

from elasticfleet.operator.handlers import KopfSink, Rollout
from elasticfleet.operator.status import Condition, ConditionStatus, FleetStatus

SELECTOR = "app.kubernetes.io/component=worker,elasticfleet.io/fleet=f"


def _condition(kind: str, status: ConditionStatus, reason: str) -> Condition:
    return Condition(kind, status, reason, "", datetime(2026, 1, 1, tzinfo=UTC), 3)


def test_the_status_has_what_scale_reads() -> None:
    invalid = _condition("Degraded", ConditionStatus.TRUE, "InvalidSpec")
    body = kopf.Body({"status": FleetStatus(conditions=(invalid,)).to_dict()})
    writes: list[dict[str, Any]] = []

    async def write(status: dict[str, Any]) -> None:
        writes.append(status)

    sink = KopfSink(body, write, Rollout(3, 2, 3, 4, SELECTOR))
    available = _condition("Available", ConditionStatus.TRUE, "WorkersServing")
    asyncio.run(sink.patch_status(FleetStatus(observed_generation=4, conditions=(available,))))
    (status,) = writes
    written = FleetStatus.from_dict(status)
    assert (written.replicas, written.ready_replicas, written.selector) == (3, 2, SELECTOR)
    conditions = {c.type: c for c in written.conditions or ()}
    assert conditions["Available"] == available
    # Degraded is the control loop's, but this tick did not write it: kept.
    assert conditions["Degraded"] == invalid
    progressing = conditions["Progressing"]
    assert (progressing.status, progressing.reason) == (ConditionStatus.TRUE, "RollingOut")
    assert progressing.message == "2 of 3 workers ready"
