"""The worker's adapter cache: the parts it serves, bounded in bytes.

A worker serves a few tasks of a few adapter versions on the blocks its plan
keeps, so it fetches exactly those parts (`AdapterSpec.parts_for_plan`) and
keeps them decoded in memory under a byte budget, evicting the least recently
used part first. Its `nbytes` is what the memory accountant reports as adapter
memory; `hits`, `misses` and `evictions` feed the metrics.

What the cache guarantees:
- a part enters the cache only after its sha256 matched the manifest and
  it decoded to exactly its part's tensors (`weights.read_tensors`
  checks before returning), so a corrupt blob is never served, not even
  later from the cache;
- while Redis is down, requests whose parts are all cached keep being served
  (a request for the current version uses the version last resolved), and the
  others raise `StoreUnavailable`, which is retryable; nothing is remembered
  about the failure, so the first request after Redis returns fetches again.

Versions are immutable in the store, so a cached manifest or part never goes
stale. The one exception is a Redis that lost its data (no persistence) and
was published to again: version numbers restart, and a worker keeps serving
what it cached under a number until `forget` or a restart. Run Redis with
persistence (AOF or RDB) in production.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from elasticfleet.worker.adapters.store import (
    AdapterManifest,
    AdapterNotFound,
    AdapterStore,
    StoreUnavailable,
)
from elasticfleet.worker.adapters.weights import AdapterWeights, read_tensors
from elasticfleet.worker.model.plan import PruningPlan

PartKey = tuple[str, int, str]  # (adapter, version, part)


@dataclass(frozen=True)
class _Entry:
    tensors: dict[str, torch.Tensor]
    nbytes: int


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache's counters."""

    nbytes: int
    max_bytes: int
    parts: int
    hits: int
    misses: int
    evictions: int


class AdapterCache:
    """Decoded adapter parts from one `AdapterStore`, LRU-bounded by bytes.

    Thread-safe. Redis I/O happens outside the lock, so a slow fetch does not
    block requests served from the cache; two threads missing the same part
    may both fetch it, which costs bandwidth, never correctness.
    """

    def __init__(self, store: AdapterStore, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"adapter cache size must be positive, got {max_bytes} bytes")
        self.store = store
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._parts: OrderedDict[PartKey, _Entry] = OrderedDict()
        self._manifests: dict[tuple[str, int], AdapterManifest] = {}
        self._current: dict[str, int] = {}
        self._nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded tensors held now (what the accountant reports)."""
        return self._nbytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                nbytes=self._nbytes,
                max_bytes=self.max_bytes,
                parts=len(self._parts),
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
            )

    # -- manifests ------------------------------------------------------------

    def manifest(self, name: str, version: int | None = None) -> AdapterManifest:
        """Pin a version: its manifest, from memory when known.

        `version=None` asks Redis for the current version each time (so a
        new publish is picked up); if Redis is down it falls back to the
        version this cache last resolved as current, so serving continues.
        """
        resolved = version is None
        if version is None:
            try:
                version = self.store.current_version(name)
            except StoreUnavailable:
                with self._lock:
                    last = self._current.get(name)
                if last is None:
                    raise
                version = last
        with self._lock:
            manifest = self._manifests.get((name, version))
        if manifest is None:
            manifest = self.store.manifest(name, version)
        with self._lock:
            self._manifests[(name, version)] = manifest
            if resolved:
                self._current[name] = version
        return manifest

    # -- parts ----------------------------------------------------------------

    def get(
        self, name: str, version: int | None, parts: Iterable[str]
    ) -> tuple[AdapterManifest, AdapterWeights]:
        """The tensors of `parts` of a version (current if None), as partial weights."""
        manifest = self.manifest(name, version)
        # A part the manifest lacks is never cached, so it reaches read_tensors,
        # which refuses it (before any Redis call) as AdapterNotFound.
        wanted = list(dict.fromkeys(parts))
        found: dict[str, dict[str, torch.Tensor]] = {}
        with self._lock:
            for part in wanted:
                entry = self._parts.get((name, manifest.version, part))
                if entry is not None:
                    self._parts.move_to_end((name, manifest.version, part))
                    found[part] = entry.tensors
            self.hits += len(found)
            missing = [p for p in wanted if p not in found]
            self.misses += len(missing)
        if missing:
            fetched = read_tensors(self.store, manifest, missing)
            self._insert(manifest, fetched)
            found.update(fetched)
        weights = AdapterWeights.join(manifest.spec, (found[p] for p in wanted))
        return manifest, weights

    def get_for_plan(
        self,
        name: str,
        version: int | None,
        plan: PruningPlan,
        tasks: Sequence[str],
        *,
        router: bool = False,
    ) -> tuple[AdapterManifest, AdapterWeights]:
        """What a worker needs to serve `tasks` (or the router mixture) under `plan`."""
        manifest = self.manifest(name, version)
        unknown = [t for t in tasks if t not in manifest.spec.tasks]
        if unknown:
            raise AdapterNotFound(
                f"adapter {name!r} version {manifest.version} has no task(s) "
                f"{', '.join(unknown)}; its tasks are {', '.join(manifest.spec.tasks)}"
            )
        parts = manifest.spec.parts_for_plan(plan, tasks, router=router)
        return self.get(name, manifest.version, parts)

    def _insert(self, manifest: AdapterManifest, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        """Cache verified parts, then evict least recently used ones over budget.

        The new parts are the most recent, so a request larger than the whole
        budget still returns all its parts; only the cache keeps fewer.
        """
        with self._lock:
            for part, tensors in parts.items():
                key = (manifest.name, manifest.version, part)
                old = self._parts.pop(key, None)
                if old is not None:
                    self._nbytes -= old.nbytes
                nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
                self._parts[key] = _Entry(tensors, nbytes)
                self._nbytes += nbytes
            while self._nbytes > self.max_bytes and self._parts:
                _key, entry = self._parts.popitem(last=False)
                self._nbytes -= entry.nbytes
                self.evictions += 1

    def forget(self, name: str, version: int | None = None) -> None:
        """Drop an adapter's (or one version's) parts and manifests, e.g. after it is unloaded."""
        with self._lock:
            for key in [k for k in self._parts if k[0] == name and version in (None, k[1])]:
                self._nbytes -= self._parts.pop(key).nbytes
            for mkey in [k for k in self._manifests if k[0] == name and version in (None, k[1])]:
                del self._manifests[mkey]
            if version is None:
                self._current.pop(name, None)
