"""The worker's adapter host against a real Valkey server: loading only what
the plan keeps, following plan switches, and the store's failures turned
into the engine's errors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
import torch
from test_lora import make_spec, trained
from valkey_server import TestRedisServer

from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.host import CachedAdapterHost
from elasticfleet.worker.adapters.interface import AdapterRequest
from elasticfleet.worker.adapters.layer import AdapterBatch, AdapterChoice, AdapterSet
from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.adapters.weights import AdapterWeights
from elasticfleet.worker.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from elasticfleet.worker.model.config import tiny_config
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


# -- LoadAdapter's precise errors (issue 13, item 7) -------------------------------


def _host(url: str, model: ElasticLlama) -> CachedAdapterHost:
    return CachedAdapterHost(
        AdapterCache(AdapterStore.from_url(url), 64 << 20), model.config, DENSE
    )


def _held(host: CachedAdapterHost) -> tuple[int, int]:
    """(parts, manifests) the host's cache holds."""
    assert host.cache is not None
    return host.cache.stats().parts, len(host.cache._manifests)


def test_an_invalid_name_or_version_is_invalid_argument_in_bounded_words(
    redis_url: str, plain_model: ElasticLlama
) -> None:
    host = _host(redis_url, plain_model)
    # "multi\n": the store matched names with `$`, which in Python also
    # matches before a final newline (the AdapterSet CRD's RE2 does not).
    for name in ("x" * 10_000, "Bad Name", "", "a.b", "multi\n"):
        with pytest.raises(InvalidArgument, match=r"adapter name .* is invalid") as caught:
            host.load(name, "", [], ROOM)
        assert len(str(caught.value)) < 250
    with pytest.raises(InvalidArgument, match=r"positive integer, got '99999.*\(5000 char") as e:
        host.load("multi", "9" * 5000, [], ROOM)
    assert len(str(e.value)) < 250
    # Versions are ASCII digits, as the CRD's spec.store.version: str.isdigit
    # took other scripts' digits too.
    for version in ("0", "00", "\u0661", "1\n", "-1", "9" * 19):
        with pytest.raises(InvalidArgument, match="adapter version must be a positive integer"):
            host.load("multi", version, [], ROOM)


def test_an_adapter_for_other_shapes_is_failed_precondition_and_forgotten(
    redis_url: str, plain_model: ElasticLlama
) -> None:
    """Same layer count, another model's widths: the shapes only show once
    the blobs are read, and nothing of the version stays cached."""
    wide = ElasticLlama(tiny_config(hidden_size=96)).config
    other = AdapterSet.create(make_spec(), wide, seed=3)
    AdapterStore.from_url(redis_url).publish(other.weights())
    host = _host(redis_url, plain_model)
    with pytest.raises(
        FailedPrecondition, match="does not fit this worker's model: adapter tensor"
    ):
        host.load("multi", "", ["qa"], ROOM)
    assert _held(host) == (0, 0)
    assert host.listing().adapters == ()


def test_a_deeply_nested_manifest_or_a_blob_not_safetensors_is_data_loss(
    redis_url: str, redis_server: TestRedisServer, plain_model: ElasticLlama
) -> None:
    host, _ = host_on(redis_url, DENSE, plain_model)
    client = redis_server.client()
    manifest = client.get("elasticfleet:adapter:multi:manifest:1")
    assert isinstance(manifest, bytes)
    client.set("elasticfleet:adapter:multi:manifest:1", b"[" * 50_000 + b"]" * 50_000)
    with pytest.raises(DataLoss, match="manifest is unreadable: it is nested too deeply") as e:
        host.load("multi", "", [], ROOM)
    assert len(str(e.value)) < 250
    # A blob whose digest matches its manifest but that is not safetensors.
    blob = b"\x08" + b"\x00" * 7 + b"{not json}"
    document = json.loads(manifest)
    document["parts"]["A/0"] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    client.set("elasticfleet:adapter:multi:manifest:1", json.dumps(document))
    client.set("elasticfleet:adapter:multi:blob:1:A/0", blob)
    with pytest.raises(DataLoss, match="version 1 part A/0 is not safetensors"):
        host.load("multi", "", [], ROOM)
    assert _held(host) == (0, 0)


def test_a_rejected_manifest_is_not_remembered(
    redis_url: str,
    redis_server: TestRedisServer,
    plain_model: ElasticLlama,
    make_adapter: Callable[..., AdapterWeights],
) -> None:
    """A Redis that lost its data and was published to again reuses version
    numbers: a version this worker refused must be read afresh next time."""
    store = AdapterStore.from_url(redis_url)
    store.publish(make_adapter("multi"))  # two layers
    host = _host(redis_url, plain_model)
    with pytest.raises(InvalidArgument, match="is for a 2-layer model"):
        host.load("multi", "1", [], ROOM)
    assert _held(host) == (0, 0)
    redis_server.client().flushall()
    store.publish(trained(make_spec(), seed=21).weights())  # version 1 again, right this time
    info, _ = host.load("multi", "1", [], ROOM)
    assert info.version == "1"
    # A failed load of another version keeps what the loaded one uses.
    with pytest.raises(NotFound):
        host.load("multi", "2", [], ROOM)
    with pytest.raises(InvalidArgument, match="has no task 'poetry'"):
        host.load("multi", "1", ["poetry"], ROOM)
    host.check(AdapterRequest("multi", "qa"))
    assert _held(host)[0] > 0
