"""Where a request goes: plain functions over the gateway's views of its
workers, so every rule is unit-tested without a socket.

The rules, in order:

1. **Up.** Only workers whose last GetStats answered, recently enough
   (`WorkerView.ready`), and that the request has not already failed on.
2. **Quality.** A request may carry the largest predicted perplexity ratio
   it accepts (its quality floor). A worker whose current plan is predicted
   worse, or whose plan's quality is unknown (no profile for its model),
   is not eligible. None eligible: the request waits (pool.py bounds how
   long), since plans change as load does.
3. **Capacity.** A worker with `max_streams` of the gateway's streams open
   takes no more until one ends; all full: the request waits.
4. **Adapter affinity.** A request for an adapter task goes to the least
   loaded eligible worker that has the task loaded, or is loading it for
   an earlier request (a hit). When none has it, or every holder carries
   `spread_after` more streams than the least loaded eligible worker, the
   least loaded worker is asked to load it (a miss; LoadAdapter charges it
   to that worker's budget). So a popular task spreads to more workers, at
   most one load per worker and task.
5. **Load.** Among the eligible, the fewest requests running and waiting
   (the larger of the worker's own count and the gateway's open streams,
   which is fresher between two polls); at equal load the better predicted
   quality (so idle capacity and new adapter copies go to the workers that
   can serve every floor), then the most free KV.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

# A holder may carry this many more streams than the least loaded worker
# before the adapter is loaded elsewhere too.
SPREAD_AFTER = 8
# The gateway's own open streams per worker, at most: past this a worker's
# continuous batch only queues, and a queue here can pick another worker.
MAX_STREAMS = 64
MAX_ADAPTER_NAME = 128
MAX_TASK_NAME = 63


@dataclass(frozen=True)
class AdapterRef:
    """An adapter a request names: `set:task` selects one task head,
    `set` alone mixes the set's heads with its router."""

    name: str
    task: str | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """`set:task` or `set`; ValueError saying what is wrong."""
        name, _, task = text.partition(":")
        if not name or (":" in text and not task):
            raise ValueError(f"adapter {text!r} is not <adapterset>:<task> (or <adapterset>)")
        if len(name) > MAX_ADAPTER_NAME or len(task) > MAX_TASK_NAME:
            raise ValueError(
                f"adapter {text[:200]!r}: names are at most {MAX_ADAPTER_NAME} characters, "
                f"tasks at most {MAX_TASK_NAME}"
            )
        return cls(name, task or None)

    def __str__(self) -> str:
        return self.name if self.task is None else f"{self.name}:{self.task}"


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter set in a worker's cache: the task heads it loaded, and
    whether it can mix them with its router."""

    tasks: tuple[str, ...]
    router: bool

    def serves(self, task: str | None) -> bool:
        return self.router if task is None else task in self.tasks


@dataclass
class WorkerView:
    """One worker as the gateway last saw it (refreshed by pool.py)."""

    name: str
    address: str
    ready: bool = False
    model: str = ""
    plan_id: str = ""
    # Predicted perplexity of its plan over the dense model's; None unknown.
    ratio: float | None = None
    free_kv_bytes: int = 0
    queue_depth: int = 0
    active: int = 0
    adapters: Mapping[str, LoadedAdapter] = field(default_factory=dict)
    # Adapters (`set:task`, or `set`) the gateway is loading onto it now.
    loading: set[str] = field(default_factory=set)
    # The gateway's streams open on it now.
    streams: int = 0

    @property
    def load(self) -> int:
        """Requests running and waiting on it, as fresh as the gateway knows."""
        return max(self.streams, self.active + self.queue_depth)

    def meets(self, max_ratio: float | None) -> bool:
        if max_ratio is None:
            return True
        return self.ratio is not None and self.ratio <= max_ratio

    def serves(self, adapter: AdapterRef) -> bool:
        """Whether it has the adapter loaded, or is loading it."""
        return self.has_loaded(adapter) or str(adapter) in self.loading

    def has_loaded(self, adapter: AdapterRef) -> bool:
        loaded = self.adapters.get(adapter.name)
        return loaded is not None and loaded.serves(adapter.task)


@dataclass(frozen=True)
class Route:
    """The worker chosen, and whether it must load the adapter first."""

    worker: str
    load_adapter: bool = False


@dataclass(frozen=True)
class NoRoute:
    """Why no worker can take the request now (it may wait)."""

    reason: str


def _least_loaded(views: Iterable[WorkerView]) -> WorkerView:
    def key(v: WorkerView) -> tuple[int, float, int, str]:
        return (v.load, math.inf if v.ratio is None else v.ratio, -v.free_kv_bytes, v.name)

    return min(views, key=key)


def describe_ratios(views: Iterable[WorkerView]) -> str:
    known = sorted(v.ratio for v in views if v.ratio is not None)
    return f"{known[0]:.2f}" if known else "unknown"


def choose(
    views: Iterable[WorkerView],
    *,
    adapter: AdapterRef | None = None,
    max_ratio: float | None = None,
    exclude: Collection[str] = (),
    max_streams: int = MAX_STREAMS,
    spread_after: int = SPREAD_AFTER,
) -> Route | NoRoute:
    """The worker a request goes to by the rules of the module docstring."""
    up = [v for v in views if v.ready and v.name not in exclude]
    if not up:
        return NoRoute("no worker is ready" + (" (one failed this request)" if exclude else ""))
    good = [v for v in up if v.meets(max_ratio)]
    if not good:
        return NoRoute(
            f"no worker's plan is predicted within perplexity ratio {max_ratio:.2f}; the "
            f"best now is {describe_ratios(up)}"
        )
    eligible = [v for v in good if v.streams < max_streams]
    if not eligible:
        return NoRoute(f"every eligible worker has {max_streams} streams open")
    best = _least_loaded(eligible)
    if adapter is None:
        return Route(best.name)
    holders = [v for v in eligible if v.serves(adapter)]
    if holders:
        holder = _least_loaded(holders)
        if holder.load <= best.load + spread_after:
            return Route(holder.name)
    return Route(best.name, load_adapter=True)


def check_ratio(value: object, where: str) -> float | None:
    """A quality floor as a request gives it (None: no floor); ValueError
    for anything but a number of at least 1 (1 accepts only the dense
    model's predicted quality)."""
    if value is None:
        return None
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {str(value)[:50]!r}") from None
    if not math.isfinite(ratio) or ratio < 1.0:
        raise ValueError(
            f"{where} must be at least 1.0 (the dense model's predicted perplexity), got {ratio}"
        )
    return ratio
