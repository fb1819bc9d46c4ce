"""Status conditions (the metav1.Condition shape) kept the Kubernetes way.

The control timer writes Available, Progressing and Degraded (the spec
handler only a spec's Degraded), so the one rule that makes conditions
useful lives here: `lastTransitionTime` moves only when a condition's status
changes, not every time its message is refreshed, so `kubectl describe`
shows how long a fleet has been Degraded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

# Re-exported: callers import it from here.
from elasticfleet.operator.wire import timestamp as timestamp

Condition = dict[str, Any]


def set_condition(
    conditions: list[Condition],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """`conditions` with condition `kind` set; the others are kept in order."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == kind), None)
    if previous is None or previous.get("status") != value:
        changed = timestamp(now)
    else:
        changed = previous["lastTransitionTime"]
    condition: Condition = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": changed,
        "observedGeneration": generation,
    }
    if previous is None:
        return [*conditions, condition]
    return [condition if c is previous else c for c in conditions]
