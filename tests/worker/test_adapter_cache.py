"""The worker's adapter cache, against a real Valkey server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import pytest
import redis
import torch
from valkey_server import TestRedisServer

from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.store import (
    AdapterNotFound,
    AdapterStore,
    DigestMismatch,
    StoreUnavailable,
)
from elasticfleet.worker.adapters.weights import AdapterWeights, encode_part
from elasticfleet.worker.model.plan import PruningPlan

MakeAdapter = Callable[..., AdapterWeights]
MiB = 2**20


def tensor_bytes(weights: AdapterWeights, names: Iterable[str]) -> int:
    return sum(weights.tensors[n].numel() * weights.tensors[n].element_size() for n in names)


def test_only_the_parts_a_plan_and_its_tasks_need_are_read(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    weights = make_adapter()
    # LFU access counters show, server-side, exactly which keys were read.
    raw.config_set("maxmemory-policy", "allkeys-lfu")
    try:
        manifest = store.publish(weights)
        cache = AdapterCache(store, max_bytes=64 * MiB)
        plan = PruningPlan.from_dropped(2, attention=[1], ffn=[0])  # keeps blocks 0 and 3
        _, got = cache.get_for_plan("demo", None, plan, ["qa"])
        wanted = {"A/0", "A/3", "B/qa/0", "B/qa/3"}
        assert {name for name in got.tensors} == {
            n for p, part in weights.split().items() if p in wanted for n in part
        }
        for name, tensor in got.tensors.items():
            assert torch.equal(tensor, weights.tensors[name])
        read = {
            part
            for part in manifest.parts
            if int(raw.object("freq", f"elasticfleet:adapter:demo:blob:1:{part}")) > 5
        }
        assert read == wanted
    finally:
        raw.config_set("maxmemory-policy", "noeviction")
    assert (store.blobs_read, cache.misses, cache.hits) == (4, 4, 0)
    assert cache.nbytes == tensor_bytes(weights, got.tensors)


def test_cached_parts_are_hits_and_a_new_plan_fetches_only_the_difference(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    store.publish(make_adapter())
    cache = AdapterCache(store, max_bytes=64 * MiB)
    dense = PruningPlan.dense(2)
    cache.get_for_plan("demo", 1, PruningPlan.from_dropped(2, ffn=[0, 1]), ["code"])
    assert (cache.misses, store.blobs_read) == (4, 4)  # A and B/code on blocks 0 and 2
    _, weights = cache.get_for_plan("demo", 1, dense, ["code", "qa"])
    # 4 blocks x (A + 2 heads) = 12 parts, 4 of them cached.
    assert (cache.hits, cache.misses, store.blobs_read) == (4, 4 + 8, 12)
    assert len(weights.tensors) == 2 * 7 * 3  # 2 layers x 7 modules x (A + 2 B heads)
    cache.get_for_plan("demo", 1, dense, ["code", "qa"])
    assert store.blobs_read == 12
    stats = cache.stats()
    assert (stats.parts, stats.hits, stats.misses, stats.nbytes) == (12, 16, 12, cache.nbytes)


def test_the_router_needs_every_head(store: AdapterStore, make_adapter: MakeAdapter) -> None:
    store.publish(make_adapter(router=True))
    cache = AdapterCache(store, max_bytes=64 * MiB)
    _, weights = cache.get_for_plan("demo", 1, PruningPlan.dense(2), [], router=True)
    weights.check(complete=True)


def test_least_recently_used_parts_are_evicted_by_bytes(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    weights = make_adapter()
    store.publish(weights)
    parts = weights.split()
    part_bytes = {p: tensor_bytes(weights, parts[p]) for p in ("A/0", "A/1", "A/2")}
    # Room for A/0 and A/1 but not A/2 as well: A/2 pushes out A/0, the oldest.
    cache = AdapterCache(store, max_bytes=part_bytes["A/0"] + part_bytes["A/1"] + 1)
    cache.get("demo", 1, ["A/0"])
    cache.get("demo", 1, ["A/1"])
    cache.get("demo", 1, ["A/0"])  # A/0 is now the most recently used
    cache.get("demo", 1, ["A/2"])
    assert cache.evictions == 1
    assert cache.nbytes == part_bytes["A/0"] + part_bytes["A/2"] <= cache.max_bytes
    before = store.blobs_read
    cache.get("demo", 1, ["A/0"])
    assert store.blobs_read == before  # kept
    cache.get("demo", 1, ["A/1"])
    assert store.blobs_read == before + 1  # was evicted, fetched again


def test_a_request_larger_than_the_cache_is_still_served_whole(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    weights = make_adapter()
    store.publish(weights)
    cache = AdapterCache(store, max_bytes=4096)
    _, got = cache.get_for_plan("demo", 1, PruningPlan.dense(2), ["code", "qa", "defs"])
    assert len(got.tensors) == 2 * 7 * 4
    assert 0 < cache.nbytes <= 4096
    assert cache.evictions > 0


def test_concurrent_requests_keep_the_byte_count_exact(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    weights = make_adapter()
    store.publish(weights)
    cache = AdapterCache(store, max_bytes=weights.nbytes // 3)
    plans = [PruningPlan.from_dropped(2, attention=[i % 2], ffn=[(i // 2) % 2]) for i in range(4)]
    errors: list[BaseException] = []

    def serve(worker: int) -> None:
        try:
            for i in range(20):
                task = ("code", "qa", "defs")[(worker + i) % 3]
                _, got = cache.get_for_plan("demo", 1, plans[(worker * i) % 4], [task])
                assert all(torch.equal(t, weights.tensors[n]) for n, t in got.tensors.items())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    held = [entry.nbytes for entry in cache._parts.values()]
    assert cache.nbytes == sum(held) <= cache.max_bytes
    assert cache.hits + cache.misses == 4 * 20 * 4  # 4 parts per request


def test_a_corrupt_blob_is_rejected_and_never_cached(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    weights = make_adapter()
    store.publish(weights)
    key = "elasticfleet:adapter:demo:blob:1:B/code/1"
    good = raw.get(key)
    assert isinstance(good, bytes)
    # Valid safetensors with the right names, wrong values: only the digest catches it.
    forged = {n: torch.zeros_like(t) for n, t in weights.split()["B/code/1"].items()}
    raw.set(key, encode_part(forged))
    cache = AdapterCache(store, max_bytes=64 * MiB)
    with pytest.raises(DigestMismatch, match="adapter 'demo' version 1 part B/code/1 is corrupt"):
        cache.get("demo", 1, ["A/1", "B/code/1"])
    with pytest.raises(ValueError, match="it was not used"):
        cache.get("demo", 1, ["B/code/1"])
    assert (cache.nbytes, cache.stats().parts) == (0, 0)
    raw.set(key, good)  # repaired: no state was kept from the failure
    _, got = cache.get("demo", 1, ["B/code/1"])
    for name, tensor in got.tensors.items():
        assert torch.equal(tensor, weights.tensors[name])


def test_unknown_adapter_version_and_task_are_not_found(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    store.publish(make_adapter())
    cache = AdapterCache(store, max_bytes=MiB)
    with pytest.raises(AdapterNotFound, match="adapter 'other' is not in"):
        cache.get("other", None, ["A/0"])
    with pytest.raises(AdapterNotFound, match="no version 7"):
        cache.get("demo", 7, ["A/0"])
    with pytest.raises(AdapterNotFound, match=r"version 1 has no part\(s\) A/99"):
        cache.get("demo", None, ["A/0", "A/99"])
    with pytest.raises(
        LookupError, match="has no task\\(s\\) poetry; its tasks are code, qa, defs"
    ):
        cache.get_for_plan("demo", 1, PruningPlan.dense(2), ["poetry"])
    with pytest.raises(ValueError, match="plan is for 3 layers but the model has 2"):
        cache.get_for_plan("demo", 1, PruningPlan.dense(3), ["qa"])
    with pytest.raises(ValueError, match="must be positive"):
        AdapterCache(cache.store, max_bytes=0)


def test_current_follows_new_versions_while_a_pinned_one_stays(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    store.publish(make_adapter(seed=1))
    cache = AdapterCache(store, max_bytes=MiB)
    assert cache.manifest("demo").version == 1
    v2 = make_adapter(seed=2)
    store.publish(v2)
    manifest, got = cache.get("demo", None, ["A/0"])
    assert manifest.version == 2
    assert all(torch.equal(t, v2.tensors[n]) for n, t in got.tensors.items())
    assert cache.get("demo", 1, ["A/0"])[0].version == 1
    cache.forget("demo", 1)
    assert cache.nbytes == tensor_bytes(v2, got.tensors)
    cache.forget("demo")
    assert (cache.nbytes, cache.stats().parts) == (0, 0)


def test_redis_down_cached_parts_serve_and_fetching_resumes_after_restart(
    restartable_redis: TestRedisServer, make_adapter: MakeAdapter
) -> None:
    weights = make_adapter()
    store = AdapterStore.from_url(restartable_redis.url, connect_timeout_s=0.5)
    store.publish(weights)
    cache = AdapterCache(store, max_bytes=64 * MiB)
    plan = PruningPlan.dense(2)
    cache.get_for_plan("demo", None, plan, ["code"])

    restartable_redis.stop()
    start = time.perf_counter()
    # Cached: served, for the pinned version and for "current" alike.
    _, served = cache.get_for_plan("demo", 1, plan, ["code"])
    assert len(served.tensors) == 2 * 7 * 2
    assert cache.get_for_plan("demo", None, plan, ["code"])[0].version == 1
    # Not cached: a clear, retryable error.
    with pytest.raises(
        StoreUnavailable, match=r"Redis at redis://127\.0\.0\.1:\d+/0 is unreachable"
    ):
        cache.get_for_plan("demo", 1, plan, ["qa"])
    try:
        cache.get("other", None, ["A/0"])
    except ConnectionError as error:
        assert getattr(error, "retryable", False)
        assert "retry when Redis is reachable again" in str(error)
    else:
        raise AssertionError("an uncached adapter was served while Redis was down")
    assert time.perf_counter() - start < 5.0

    restartable_redis.start()
    _, qa = cache.get_for_plan("demo", 1, plan, ["qa"])
    assert all(torch.equal(t, weights.tensors[n]) for n, t in qa.tensors.items())
    store.close()
