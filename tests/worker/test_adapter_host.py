"""The worker's adapter host against a real Valkey server: loading only what
the plan keeps, following plan switches, and the store's failures turned
into the engine's errors."""

from __future__ import annotations

import pytest
import torch
from test_lora import make_spec, trained
from valkey_server import TestRedisServer

from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.host import CachedAdapterHost
from elasticfleet.worker.adapters.interface import AdapterRequest
from elasticfleet.worker.adapters.layer import AdapterBatch, AdapterChoice, AdapterSet
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.plan import PruningPlan

ROOM = 64 << 20  # what the budget leaves for adapters
DENSE = PruningPlan.dense(4)
PRUNED = PruningPlan.from_dropped(4, attention=[1, 3], ffn=[2])


def host_on(
    url: str, plan: PruningPlan, model: ElasticLlama
) -> tuple[CachedAdapterHost, AdapterSet]:
    """A host over a fresh store holding one trained 'multi' set (router, 3 tasks)."""
    adapters = trained(make_spec(), seed=21)
    store = AdapterStore.from_url(url)
    store.publish(adapters.weights())
    return CachedAdapterHost(AdapterCache(store, 64 << 20), model.config, plan), adapters


def test_loaded_adapter_serves_like_the_published_one(
    redis_url: str, plain_model: ElasticLlama, tiny_windows: torch.Tensor
) -> None:
    host, published = host_on(redis_url, DENSE, plain_model)
    info, cached = host.load("multi", "", [], ROOM)
    assert (info.version, info.tasks, info.has_router, cached) == (
        "1",
        ("code", "qa", "defs"),
        True,
        False,
    )
    assert host.load("multi", "1", [], ROOM)[1] is True  # everything came from the local cache
    rows = [AdapterRequest("multi", "qa"), None, AdapterRequest("multi", None)]
    for row in rows:
        if row is not None:
            host.check(row)
    batch = host.batch(rows)
    expected = AdapterBatch(
        {"multi": published}, [AdapterChoice("multi", "qa"), None, AdapterChoice("multi", None)]
    )
    ids = tiny_windows[:3]
    torch.testing.assert_close(
        plain_model(ids, adapters=batch), plain_model(ids, adapters=expected)
    )
    assert host.batch([None, None]) is None
    assert host.resident_bytes() > 0
    listing = host.listing()
    assert [a.name for a in listing.adapters] == ["multi"] and listing.cache_limit_bytes == 64 << 20
    freed = host.unload("multi")
    assert freed > 0 and host.resident_bytes() == 0
    with pytest.raises(NotFound, match="adapter 'multi' is not loaded on this worker"):
        host.check(AdapterRequest("multi", "qa"))


def test_requests_are_checked_against_what_was_loaded(
    redis_url: str, plain_model: ElasticLlama
) -> None:
    host, _ = host_on(redis_url, DENSE, plain_model)
    host.load("multi", "", ["code"], ROOM)
    host.check(AdapterRequest("multi", "code"))
    with pytest.raises(InvalidArgument, match="does not serve task 'qa' here; loaded tasks: code"):
        host.check(AdapterRequest("multi", "qa"))
    with pytest.raises(InvalidArgument, match="loaded for named tasks"):
        host.check(AdapterRequest("multi", None))
    with pytest.raises(InvalidArgument, match="has no task 'poetry'"):
        host.load("multi", "", ["poetry"], ROOM)
    with pytest.raises(InvalidArgument, match="positive integer, got 'latest'"):
        host.load("multi", "latest", [], ROOM)
    with pytest.raises(NotFound):
        host.load("missing", "", [], ROOM)
    with pytest.raises(NotFound):
        host.load("multi", "9", [], ROOM)
    with pytest.raises(FailedPrecondition, match="no adapter store"):
        CachedAdapterHost(None, plain_model.config, DENSE).load("multi", "", [], ROOM)


def test_plan_switches_release_and_refetch_blocks(
    redis_url: str, plain_model: ElasticLlama
) -> None:
    host, published = host_on(redis_url, PRUNED, plain_model)
    host.load("multi", "", ["qa"], ROOM)
    loaded = host._loaded["multi"].adapters
    assert loaded.get(1, "q_proj") is None and loaded.get(2, "up_proj") is None
    pruned_bytes = host.resident_bytes()
    rows = [AdapterRequest("multi", "qa"), None]
    first = host.batch(rows)
    assert host.batch(list(rows)) is first  # one batch per composition, not per step
    host.apply_plan(DENSE)
    assert host.batch(rows) is not first  # built anew over the restored modules
    assert loaded.get(1, "q_proj") is not None and loaded.get(2, "up_proj") is not None
    assert torch.equal(loaded.get(1, "q_proj").head("qa"), published.get(1, "q_proj").head("qa"))  # type: ignore[union-attr]
    assert host.resident_bytes() > pruned_bytes
    host.apply_plan(PRUNED)
    assert loaded.get(3, "k_proj") is None


def test_store_failures_become_engine_errors(
    restartable_redis: TestRedisServer, plain_model: ElasticLlama
) -> None:
    host, _ = host_on(restartable_redis.url, PRUNED, plain_model)
    host.load("multi", "", ["code"], ROOM)
    restartable_redis.stop()
    # Restored blocks' parts were never fetched: the adapter goes stale, not half-applied.
    host.apply_plan(DENSE)
    with pytest.raises(Unavailable, match="could not follow the new plan"):
        host.check(AdapterRequest("multi", "code"))
    with pytest.raises(Unavailable, match="will load when Redis is back"):
        host.load("other", "", [], ROOM)
    restartable_redis.start()
    host.apply_plan(DENSE)
    host.check(AdapterRequest("multi", "code"))


def test_corrupt_blob_is_data_loss(
    redis_url: str, redis_server: TestRedisServer, plain_model: ElasticLlama
) -> None:
    host, _ = host_on(redis_url, DENSE, plain_model)
    client = redis_server.client()
    (key,) = [k for k in client.keys("*blob:1:A/0")]
    client.set(key, b"not what was published")
    with pytest.raises(DataLoss, match="A/0"):
        host.load("multi", "", [], ROOM)


def test_adapter_beyond_the_budget_is_refused_before_fetching(
    redis_url: str, plain_model: ElasticLlama
) -> None:
    host, _ = host_on(redis_url, DENSE, plain_model)
    assert host.cache is not None
    with pytest.raises(ResourceExhausted, match="the budget leaves 1,000"):
        host.load("multi", "", [], 1000)
    assert host.resident_bytes() == 0 and host.cache.misses == 0
    host.load("multi", "", [], ROOM)
    held = host.resident_bytes()
    host.unload("multi")
    # The estimate never falls below what loading really holds.
    with pytest.raises(ResourceExhausted):
        host.load("multi", "", [], held - 1)
