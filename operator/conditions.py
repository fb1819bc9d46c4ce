"""Status conditions (the metav1.Condition shape) kept the Kubernetes way.

The control timer writes Available, Progressing and Degraded (the spec
handler only a spec's Degraded), so the one rule that makes conditions
useful lives here: `lastTransitionTime` moves only when a condition's status
changes, not every time its message is refreshed, so `kubectl describe`
shows how long a fleet has been Degraded.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from elasticfleet.operator.status import Condition, ConditionStatus


def set_condition(
    conditions: Sequence[Condition],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int,
) -> tuple[Condition, ...]:
    """`conditions` with condition `kind` set; the others are kept in order."""
    value = ConditionStatus.TRUE if status else ConditionStatus.FALSE
    previous = next((c for c in conditions if c.type == kind), None)
    changed = now
    if previous is not None and previous.status == value:
        changed = previous.last_transition_time
    condition = Condition(kind, value, reason, message, changed, generation)
    if previous is None:
        return (*conditions, condition)
    return tuple(condition if c is previous else c for c in conditions)
