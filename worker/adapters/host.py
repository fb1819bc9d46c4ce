"""The worker's adapters: AdapterSets built from the Redis store's local
cache, kept in step with the pruning plan, and served to the engine through
the `AdapterHost` seam.

Loading an adapter pins one version and fetches only the parts the current
plan keeps for the tasks asked for (all of them, and the router if the set
has one, when none are named). A plan switch drops the modules of dropped
blocks at once and fetches the restored blocks' parts (from the local cache
when it still holds them). If that fetch fails (Redis down, evicted parts),
the adapter is marked stale: requests for it fail with a retryable
UNAVAILABLE error, never run with half an adapter, and the next plan switch
or load retries.

Store errors become the engine's errors here, so the server's one
interceptor maps them: an invalid name or version -> InvalidArgument,
unknown adapter or version -> NotFound, unreachable store -> Unavailable,
a blob failing its digest or an unreadable manifest or blob -> DataLoss, a
set whose tensors do not fit this model's shapes -> FailedPrecondition.
Messages quote what the caller sent only in bounded length. A load that
fails leaves nothing of its version in the cache (unless a loaded set uses
it), so a version rejected once is read afresh next time, not remembered
until a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.format import (
    AdapterFormatError,
    check_name,
    shown,
)
from elasticfleet.worker.adapters.interface import (
    AdapterInfo,
    AdapterListing,
    AdapterRequest,
)
from elasticfleet.worker.adapters.layer import AdapterBatch, AdapterChoice, AdapterSet, AsymLoRA
from elasticfleet.worker.adapters.names import is_valid_version
from elasticfleet.worker.adapters.store import (
    AdapterManifest,
    AdapterNotFound,
    AdapterStoreError,
    DigestMismatch,
    StoreAuthError,
    StoreUnavailable,
)
from elasticfleet.worker.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    WorkerError,
)
from elasticfleet.worker.model.config import ModelConfig
from elasticfleet.worker.model.plan import PruningPlan


@contextmanager
def _store_errors(name: str) -> Iterator[None]:
    """Translate the store's errors into the engine's for adapter `name`."""
    try:
        yield
    except AdapterNotFound as error:
        raise NotFound(str(error)) from error
    except StoreUnavailable as error:
        raise Unavailable(f"{error}; adapter {name!r} will load when Redis is back") from error
    except DigestMismatch as error:
        raise DataLoss(str(error)) from error
    except StoreAuthError as error:
        raise FailedPrecondition(f"the adapter store refused this worker: {error}") from error
    except AdapterStoreError as error:
        raise FailedPrecondition(str(error)) from error


@contextmanager
def _model_fit(name: str) -> Iterator[None]:
    """A set whose tensors do not fit this worker's model (AdapterSet
    checks every shape before it changes anything) -> FailedPrecondition:
    the adapter is fine, it was trained for another model."""
    try:
        yield
    except ValueError as error:
        raise FailedPrecondition(
            f"adapter {name!r} does not fit this worker's model: {error}"
        ) from None


@dataclass
class _Loaded:
    manifest: AdapterManifest
    tasks: tuple[str, ...]
    router: bool
    adapters: AdapterSet
    stale: str | None = None  # why the modules do not match the plan, if they do not


class CachedAdapterHost:
    """`AdapterHost` over an `AdapterCache` (None: a worker without a store)."""

    def __init__(self, cache: AdapterCache | None, config: ModelConfig, plan: PruningPlan) -> None:
        self.cache = cache
        self.config = config
        self.plan = plan
        self._loaded: dict[str, _Loaded] = {}
        # The engine calls check/batch/apply_plan between steps while
        # load/unload run on a server thread; the lock guards the table
        # (fetches happen outside it, except a plan switch's own).
        self._lock = threading.RLock()
        # The last batch built, for the rows it was built for: the engine asks
        # every step, and a composition usually lasts many steps. Any change to
        # the loaded sets forgets it.
        self._last: tuple[tuple[AdapterRequest | None, ...], AdapterBatch] | None = None

    # -- loading ----------------------------------------------------------------

    def load(
        self, name: str, version: str, tasks: Sequence[str], room_bytes: int
    ) -> tuple[AdapterInfo, bool]:
        """Fetch (the plan's parts of) an adapter version; the bool says
        whether every part was in the local cache already. The bytes it
        will hold (its parts, as the manifest sizes them, and a copy of the
        heads) are checked against `room_bytes` before anything is fetched."""
        if self.cache is None:
            raise FailedPrecondition(
                "this worker has no adapter store: start it with --redis-url to serve adapters"
            )
        try:
            check_name("adapter", name)
        except AdapterFormatError as error:
            raise InvalidArgument(str(error)) from None
        pinned = _version(version)
        with _store_errors(name):
            manifest = self.cache.manifest(name, pinned)
        try:
            return self._load(manifest, tasks, room_bytes)
        except WorkerError:
            self._forget_rejected(name, manifest.version)
            raise

    def _load(
        self, manifest: AdapterManifest, tasks: Sequence[str], room_bytes: int
    ) -> tuple[AdapterInfo, bool]:
        """`load` once the version is pinned: check it against this worker,
        then fetch and build it."""
        assert self.cache is not None
        name, spec = manifest.name, manifest.spec
        with _store_errors(name):
            if spec.num_layers != self.config.num_hidden_layers:
                raise InvalidArgument(
                    f"adapter {name!r} is for a {spec.num_layers}-layer model, this worker "
                    f"serves {self.config.num_hidden_layers} layers"
                )
            try:
                wanted = tuple(spec.tasks[spec.task_index(t)] for t in tasks) or spec.tasks
            except ValueError as error:
                raise InvalidArgument(str(error)) from None
            router = spec.router and not tasks
            needed = _estimate(manifest, spec.parts_for_plan(self.plan, wanted, router=router))
            if needed > room_bytes:
                raise ResourceExhausted(
                    f"adapter {name!r} needs about {needed:,} bytes on this plan but the budget "
                    f"leaves {max(room_bytes, 0):,}; load fewer tasks or free memory first"
                )
            misses = self.cache.misses
            _, weights = self.cache.get_for_plan(
                name, manifest.version, self.plan, wanted, router=router
            )
            cached = self.cache.misses == misses
        with self._lock, _model_fit(name):
            adapters = AdapterSet.from_weights(weights, self.config, plan=self.plan)
            self._loaded[name] = _Loaded(manifest, wanted, router, adapters)
            self._last = None
            return self._info(name), cached

    def _forget_rejected(self, name: str, version: int) -> None:
        """Drop what a failed load of `version` left in the cache (its
        manifest and parts), unless a loaded set uses that version."""
        assert self.cache is not None
        with self._lock:
            loaded = self._loaded.get(name)
        if loaded is None:
            self.cache.forget(name)
        elif loaded.manifest.version != version:
            self.cache.forget(name, version)

    def unload(self, name: str) -> int:
        """Forget an adapter set (and its cached parts); the bytes freed."""
        with self._lock:
            loaded = self._require(name)
            before = self.resident_bytes()
            del self._loaded[name]
            self._last = None
            if self.cache is not None:
                self.cache.forget(name, loaded.manifest.version)
            return before - self.resident_bytes()

    # -- serving ------------------------------------------------------------------

    def check(self, request: AdapterRequest) -> None:
        """Raise unless the adapter is loaded, current with the plan, and has
        the task (or its router)."""
        with self._lock:
            loaded = self._require(request.name)
        if loaded.stale is not None:
            raise Unavailable(loaded.stale)
        spec = loaded.manifest.spec
        if request.task is None:
            if not loaded.router:
                hint = "it has no router" if not spec.router else "it was loaded for named tasks"
                raise InvalidArgument(
                    f"adapter {request.name!r} cannot serve the router mixture: {hint}; name "
                    f"one of its tasks: {', '.join(loaded.tasks)}"
                )
        elif request.task not in loaded.tasks:
            raise InvalidArgument(
                f"adapter {request.name!r} does not serve task {request.task!r} here; loaded "
                f"tasks: {', '.join(loaded.tasks)}"
            )

    def batch(self, rows: Sequence[AdapterRequest | None]) -> AdapterBatch | None:
        """The forward pass's routing for these rows (None: no row uses an adapter)."""
        if all(row is None for row in rows):
            return None
        key = tuple(rows)
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
            sets = {name: loaded.adapters for name, loaded in self._loaded.items()}
            choices = [None if r is None else AdapterChoice(r.name, r.task) for r in rows]
            batch = AdapterBatch(sets, choices)
            self._last = (key, batch)
            return batch

    def resident_bytes(self) -> int:
        """The local cache's decoded parts plus the loaded sets' stacked heads
        (their A matrices and routers share the cache's tensors)."""
        with self._lock:
            heads = sum(
                module.B.numel() * module.B.element_size()
                for loaded in self._loaded.values()
                for module in loaded.adapters.modules()
                if isinstance(module, AsymLoRA)
            )
        return (0 if self.cache is None else self.cache.nbytes) + heads

    def apply_plan(self, plan: PruningPlan) -> None:
        """Release modules on dropped blocks and fetch those of restored ones."""
        with self._lock:
            self.plan = plan
            self._last = None
            for name, loaded in self._loaded.items():
                self._follow(name, loaded, plan)

    def _follow(self, name: str, loaded: _Loaded, plan: PruningPlan) -> None:
        """One set's half of a plan switch."""
        loaded.adapters.retain(plan)
        assert self.cache is not None  # nothing loads without a cache
        try:
            with _store_errors(name):
                _, weights = self.cache.get_for_plan(
                    name, loaded.manifest.version, plan, loaded.tasks, router=loaded.router
                )
            with _model_fit(name):
                loaded.adapters.add(weights, plan=plan)
        except (Unavailable, DataLoss, NotFound, FailedPrecondition) as error:
            loaded.stale = (
                f"adapter {name!r} could not follow the new plan ({error}); requests for "
                "it resume after the next successful fetch"
            )
            return
        loaded.stale = None

    def listing(self) -> AdapterListing:
        with self._lock:
            infos = tuple(self._info(name) for name in sorted(self._loaded))
        return AdapterListing(
            adapters=infos,
            cache_bytes=0 if self.cache is None else self.cache.nbytes,
            cache_limit_bytes=0 if self.cache is None else self.cache.max_bytes,
        )

    # -- helpers ------------------------------------------------------------------

    def _require(self, name: str) -> _Loaded:
        if name not in self._loaded:
            known = ", ".join(sorted(self._loaded)) or "none"
            raise NotFound(f"adapter {name!r} is not loaded on this worker (loaded: {known})")
        return self._loaded[name]

    def _info(self, name: str) -> AdapterInfo:
        loaded = self._loaded[name]
        spec = loaded.manifest.spec
        return AdapterInfo(
            name=name,
            version=str(loaded.manifest.version),
            base_model=spec.base_model,
            rank=spec.rank,
            tasks=loaded.tasks,
            bytes=loaded.adapters.nbytes,
            has_router=loaded.router,
            stale=loaded.stale or "",
        )


def _estimate(manifest: AdapterManifest, parts: Sequence[str]) -> int:
    """Bytes an adapter's parts will occupy loaded: each blob's size (tensor
    bytes plus a small header) and the heads once more, stacked per module."""
    blobs = sum(manifest.parts[part].size for part in parts)
    heads = sum(manifest.parts[part].size for part in parts if part.startswith("B/"))
    return blobs + heads


def _version(text: str) -> int | None:
    """'' means the current version; otherwise a positive integer."""
    if not text:
        return None
    if not is_valid_version(text):
        raise InvalidArgument(f"adapter version must be a positive integer, got {shown(text)}")
    return int(text)
