"""The status of the custom resources, typed: the one source of what the
operator writes, what it reads back, and what the CRDs' status schemas say.

The control loop (control.py) builds a `FleetStatus` every tick, the kopf
handlers send `to_dict()` as the status patch, a restarted operator resumes
from `FleetStatus.from_dict()` of what the cluster holds, the demo reads the
typed fields, and crds.py generates the status schemas from these classes
(wire.py holds the machinery). Before, the status was a dict built in one
module, parsed with the same camelCase strings in another and described a
third time in the CRD, and the three drifted: the device source
`simulated` was written but not allowed by the schema, which a real API
server refuses. Python names are snake_case; the wire names are the
camelCase of them unless a field names its own (keptFFN).

Beyond what the schema requires (a worker's pod; a condition's type,
status, reason, message and time) every field has a default, so a status
written by an older operator reads. The fleet status's top-level fields are
None unless set: a patch carries only what its writer owns (the spec
handler writes observedGeneration and conditions, the control timer
everything). See docs/architecture.md, "The status model".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from elasticfleet.operator.wire import ApiObject, FieldSpec, OpenEnum, api

# The most workers a fleet has (its spec's replicas bound) and status shows.
MAX_WORKERS = 1000
# Plan changes the fleet status keeps, newest last.
MAX_PLAN_HISTORY = 10
# Conditions an object has (Available, Progressing, Degraded; Ready), with room.
MAX_CONDITIONS = 8

# A condition reason: one CamelCase word (metav1.Condition's pattern).
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
SHA256_PATTERN = r"^([0-9a-f]{64})?$"
# Names of pods and nodes are DNS subdomains.
DNS_NAME_LENGTH = 253
# An adapter set's version: the store's decimal counter.
VERSION_LENGTH = 20
MESSAGE_LENGTH = 4096


class ConditionStatus(OpenEnum):
    """Whether a condition holds (metav1.ConditionStatus)."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class DeviceSource(OpenEnum):
    """Where a worker's device figures come from: NVML (a GPU), the host's
    memory (no GPU), a simulated device (demos and tests) or unknown (a
    worker that does not say, or a source newer than this operator)."""

    NVML = "nvml"
    HOST = "host"
    SIMULATED = "simulated"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Condition(ApiObject):
    """One aspect of an object's state, the metav1.Condition shape;
    conditions.py keeps them (the transition time moves only on change)."""

    type: str = field(metadata=api("Condition type.", max_length=316))
    status: ConditionStatus = field(metadata=api("Whether the condition holds."))
    reason: str = field(
        metadata=api(
            "One CamelCase word saying why, for programs.",
            max_length=1024,
            pattern=REASON_PATTERN,
        )
    )
    message: str = field(
        metadata=api("What happened, for people; says what to fix.", max_length=32768)
    )
    last_transition_time: datetime = field(metadata=api("When the status last changed."))
    observed_generation: int = field(
        default=0,
        metadata=api("The spec generation the condition was computed from.", minimum=0),
    )


# Both kinds' conditions: a list keyed by type, so a server-side apply
# merges them by type rather than replacing the list.
CONDITIONS = api(
    "Available, Progressing and Degraded, each with a reason.",
    max_items=MAX_CONDITIONS,
    map_keys=("type",),
    item=FieldSpec("One aspect of the object's state (the metav1.Condition shape)."),
)


def read_conditions(status: Mapping[str, Any]) -> tuple[Condition, ...]:
    """The conditions of a stored status (of either kind), read leniently."""
    return tuple(Condition.from_dict(c) for c in status.get("conditions") or ())


@dataclass(frozen=True)
class DeviceMemory(ApiObject):
    """A worker's device memory as the worker reported it."""

    total_bytes: int = field(default=0, metadata=api("Total bytes.", minimum=0))
    used_bytes: int = field(default=0, metadata=api("Bytes in use by every process.", minimum=0))
    free_bytes: int = field(default=0, metadata=api("Bytes free.", minimum=0))
    source: DeviceSource = field(
        default=DeviceSource.UNKNOWN, metadata=api("Where the figures come from.")
    )
    own_bytes: int | None = field(
        default=None,
        metadata=api(
            "Bytes of usedBytes that the worker's process holds, read at the same moment: "
            "usedBytes minus ownBytes is what other processes hold. Absent for a worker "
            "that does not report it.",
            minimum=0,
        ),
    )


@dataclass(frozen=True)
class RequestMix(ApiObject):
    """The load a worker reported over its window: what the policy plans for."""

    window_seconds: float = field(
        default=0.0, metadata=api("Length of the window in seconds.", minimum=0)
    )
    batch_size_p90: float = field(
        default=0.0, metadata=api("90th percentile of running sequences per step.", minimum=0)
    )
    sequence_tokens_p90: float = field(
        default=0.0,
        metadata=api("90th percentile of prompt plus generated tokens per request.", minimum=0),
    )
    finished_requests: int = field(
        default=0, metadata=api("Requests finished in the window.", minimum=0)
    )
    tokens_per_second: float = field(
        default=0.0, metadata=api("Generated tokens per second.", minimum=0)
    )
    queue_depth: int = field(default=0, metadata=api("Requests waiting for memory.", minimum=0))
    active_sequences: int = field(default=0, metadata=api("Sequences running.", minimum=0))


LAYER = FieldSpec("Layer index.", minimum=0)


@dataclass(frozen=True)
class PlanSummary(ApiObject):
    """A plan as people read it: its id, how many blocks of each kind it
    keeps, which layers lose theirs, and how many blocks and KV caches stand
    below full precision."""

    id: str = field(
        default="",
        # A worker reports the id it was sent or started with (any string):
        # bounded, so a long one cannot get the status patch refused.
        metadata=api("Identifier of the plan, as the worker reports it.", max_length=128),
    )
    kept_attention: int = field(default=0, metadata=api("Attention blocks kept.", minimum=0))
    kept_ffn: int = field(default=0, metadata=api("FFN blocks kept.", name="keptFFN", minimum=0))
    dropped_attention: tuple[int, ...] = field(
        default=(), metadata=api("Layers whose attention block is dropped.", item=LAYER)
    )
    dropped_ffn: tuple[int, ...] = field(
        default=(),
        metadata=api("Layers whose FFN block is dropped.", name="droppedFFN", item=LAYER),
    )
    int8_blocks: int = field(
        default=0, metadata=api("Kept blocks whose weights are int8.", minimum=0)
    )
    int4_blocks: int = field(
        default=0, metadata=api("Kept blocks whose weights are int4.", minimum=0)
    )
    int8_kv: int = field(
        default=0,
        metadata=api("Kept attention blocks whose KV cache is int8.", name="int8KV", minimum=0),
    )


@dataclass(frozen=True)
class AdapterHeld(ApiObject):
    """An adapter set a worker holds in its cache."""

    name: str = field(default="", metadata=api("Name in the store.", max_length=128))
    version: str = field(default="", metadata=api("Version held.", max_length=VERSION_LENGTH))
    size_bytes: int = field(
        default=0,
        metadata=api("Bytes it occupies in the worker's cache.", name="bytes", minimum=0),
    )


@dataclass(frozen=True)
class WorkerStatus(ApiObject):
    """One worker as the operator last saw it. The figures are None until
    the worker has answered once; an unreachable worker keeps the ones it
    last reported."""

    pod: str = field(metadata=api("Name of the worker's pod.", max_length=DNS_NAME_LENGTH))
    node: str = field(default="", metadata=api("Node the pod runs on.", max_length=DNS_NAME_LENGTH))
    address: str = field(
        default="", metadata=api("host:port the operator reaches the worker at.", max_length=512)
    )
    reachable: bool = field(default=False, metadata=api("Whether the last GetStats succeeded."))
    message: str = field(
        default="",
        # It quotes the worker's own error text, which can be any length.
        metadata=api(
            "Why the worker is unreachable or its plan failed.", max_length=MESSAGE_LENGTH
        ),
    )
    last_seen: datetime | None = field(default=None, metadata=api("When the worker last answered."))
    device: DeviceMemory | None = field(
        default=None, metadata=api("Memory of the worker's device as it reported it.")
    )
    budget_bytes: int | None = field(
        default=None, metadata=api("The budget the operator derived and sent.", minimum=0)
    )
    plan: PlanSummary | None = field(default=None, metadata=api("The plan the worker runs."))
    weight_bytes: int | None = field(
        default=None, metadata=api("Bytes of weights the worker holds.", minimum=0)
    )
    kv_bytes: int | None = field(
        default=None, metadata=api("Bytes of KV cache the worker has allocated.", minimum=0)
    )
    request_mix: RequestMix | None = field(
        default=None, metadata=api("The request mix the worker reported over its window.")
    )
    # None until the adapters were rolled out to it once; () when it holds none.
    adapters: tuple[AdapterHeld, ...] | None = field(
        default=None,
        metadata=api(
            "Adapter sets the worker holds in its cache.",
            max_items=32,
            item=FieldSpec("One adapter set."),
        ),
    )


@dataclass(frozen=True)
class PlanRecord(ApiObject):
    """A plan change the operator pushed, and why: the fleet keeps the last
    few, and each is also an Event."""

    time: datetime | None = field(default=None, metadata=api("When it was applied."))
    pod: str = field(
        default="", metadata=api("The worker it was pushed to.", max_length=DNS_NAME_LENGTH)
    )
    plan: PlanSummary = field(default_factory=PlanSummary, metadata=api("The plan."))
    reason: str = field(
        default="", metadata=api("Why the plan changed.", max_length=MESSAGE_LENGTH)
    )
    budget_bytes: int = field(default=0, metadata=api("The budget it was chosen for.", minimum=0))
    predicted_bytes: int = field(
        default=0, metadata=api("Bytes the memory model predicts for it.", minimum=0)
    )
    predicted_perplexity_ratio: float = field(
        default=0.0,
        metadata=api("Predicted perplexity relative to the dense model.", minimum=0),
    )


@dataclass(frozen=True)
class GatewayStatus(ApiObject):
    """Where clients reach the fleet's gateway (spec.gateway), by its
    Service's name; the reconcile handler writes it, and removes it when the
    spec disables the gateway."""

    url: str = field(default="", metadata=api("HTTP URL of the gateway.", max_length=512))
    grpc_address: str = field(
        default="", metadata=api("host:port of the gateway's gRPC endpoint.", max_length=512)
    )


@dataclass(frozen=True)
class FleetStatus(ApiObject):
    """An ElasticFleet's status, or a patch of it: None fields are left as
    they are (see the module docstring)."""

    observed_generation: int | None = field(
        default=None, metadata=api("The spec generation last acted on.", minimum=0)
    )
    conditions: tuple[Condition, ...] | None = field(default=None, metadata=CONDITIONS)
    replicas: int | None = field(default=None, metadata=api("Worker pods that exist.", minimum=0))
    ready_replicas: int | None = field(
        default=None, metadata=api("Worker pods ready to serve.", minimum=0)
    )
    workers: tuple[WorkerStatus, ...] | None = field(
        default=None,
        metadata=api(
            "Each worker's device, budget, plan, memory and request mix.",
            max_items=MAX_WORKERS,
            item=FieldSpec("One worker as the operator last saw it."),
        ),
    )
    last_plans: tuple[PlanRecord, ...] | None = field(
        default=None,
        metadata=api(
            f"The last {MAX_PLAN_HISTORY} plan changes, newest last.",
            max_items=MAX_PLAN_HISTORY,
            item=FieldSpec("A plan the operator pushed."),
        ),
    )
    # The /scale subresource's labelSelectorPath: HPA and KEDA count and
    # measure the pods it selects.
    selector: str | None = field(
        default=None,
        metadata=api(
            "Label selector of the worker pods, as a string (the /scale subresource's).",
            max_length=1024,
        ),
    )
    gateway: GatewayStatus | None = field(
        default=None, metadata=api("Where the fleet's gateway serves, while one is enabled.")
    )


@dataclass(frozen=True)
class AdapterSetStatus(ApiObject):
    """An AdapterSet's status: whether the store holds the version its spec
    names (adapters.py checks). Version, digest and size are None when the
    check found no manifest: the patch then leaves the last ones found."""

    observed_generation: int = field(
        default=0, metadata=api("The spec generation last checked.", minimum=0)
    )
    conditions: tuple[Condition, ...] = field(default=(), metadata=CONDITIONS)
    ready: bool = field(
        default=False, metadata=api("Whether the store holds a version matching the spec.")
    )
    version: str | None = field(
        default=None, metadata=api("The version found.", max_length=VERSION_LENGTH)
    )
    digest: str | None = field(
        default=None, metadata=api("sha256 of that version's manifest.", pattern=SHA256_PATTERN)
    )
    size_bytes: int | None = field(default=None, metadata=api("Bytes of all its parts.", minimum=0))
