"""The seam between the serving engine and the adapter cache.

The engine knows adapters only through `AdapterHost`: it checks a request's
adapter when the request is submitted, counts the adapters' bytes against
the memory budget, tells the host about plan switches (so adapter modules on
dropped blocks are released), and for every forward asks it for the
`adapters=` argument of `ElasticLlama.forward`, built from each row's
choice (a row without an adapter is None). Methods raise the engine's errors
(worker/errors.py): NotFound for an adapter that is not loaded,
InvalidArgument for an invalid name or an unknown task, Unavailable when
the store cannot be reached, DataLoss for stored data that is unusable (a
blob failing its digest, an unreadable manifest or blob),
FailedPrecondition for a set that does not fit the model; the server maps
each to its status code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from elasticfleet.worker.model.plan import PruningPlan


@dataclass(frozen=True)
class AdapterRequest:
    """A request's adapter: a loaded set and a task, or its router (task None)."""

    name: str
    task: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter set in the worker's local cache."""

    name: str
    version: str
    base_model: str
    rank: int
    tasks: tuple[str, ...]
    bytes: int
    has_router: bool
    stale: str = ""  # why it cannot serve now ("" while it serves)


@dataclass(frozen=True)
class AdapterListing:
    adapters: tuple[AdapterInfo, ...] = ()
    cache_bytes: int = 0
    cache_limit_bytes: int = 0


class AdapterHost(Protocol):
    """What the engine needs from the adapter cache. Methods raise the
    engine's errors (NotFound, InvalidArgument, Unavailable, DataLoss)."""

    def check(self, request: AdapterRequest) -> None:
        """Raise unless the adapter is loaded and has the task (or a router)."""

    def batch(self, rows: Sequence[AdapterRequest | None]) -> object:
        """The `adapters=` argument of ElasticLlama.forward for these rows."""

    def resident_bytes(self) -> int:
        """Bytes the loaded adapters occupy (counted against the budget)."""

    def apply_plan(self, plan: PruningPlan) -> None:
        """Release adapter modules on blocks the plan drops (called between steps)."""

    def load(
        self, name: str, version: str, tasks: Sequence[str], room_bytes: int
    ) -> tuple[AdapterInfo, bool]:
        """Fetch an adapter set; return it and whether it was all cached
        already. Raise ResourceExhausted, before fetching, if it would need
        more than `room_bytes` (what the budget leaves)."""

    def unload(self, name: str) -> int:
        """Evict an adapter set; return the bytes freed."""

    def listing(self) -> AdapterListing:
        """The loaded adapter sets."""
