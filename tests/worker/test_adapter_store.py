"""The Redis adapter store, against a real Valkey server (tests/valkey_server.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import torch
from valkey_server import TestRedisServer, free_port

from elasticfleet.worker.adapters.format import TENSORS_FILE
from elasticfleet.worker.adapters.store import (
    AdapterManifest,
    AdapterNotFound,
    AdapterStore,
    DigestMismatch,
    StoreAuthError,
    StoreConflict,
    StoreUnavailable,
)
from elasticfleet.worker.adapters.weights import AdapterWeights, decode_part, fetch

MakeAdapter = Callable[..., AdapterWeights]


def get(raw: redis.Redis, key: str) -> bytes:
    value = raw.get(key)
    assert isinstance(value, bytes), f"{key} is missing"
    return value


def same_tensors(a: AdapterWeights, b: AdapterWeights) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[n].dtype == b.tensors[n].dtype and torch.equal(a.tensors[n], b.tensors[n])
        for n in a.tensors
    )


def test_round_trip_is_bit_identical(
    store: AdapterStore, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    weights = make_adapter()
    weights.tensors = {
        n: t.to(torch.bfloat16) if "B." in n else t for n, t in weights.tensors.items()
    }
    manifest = store.publish(weights)
    fetched_manifest, fetched = fetch(store, "demo")
    assert fetched_manifest == manifest
    assert same_tensors(weights, fetched)
    # Saved to disk, the pulled set is byte-for-byte the pushed one.
    weights.save(tmp_path / "pushed")
    fetched.save(tmp_path / "pulled")
    pushed = (tmp_path / "pushed" / TENSORS_FILE).read_bytes()
    assert pushed == (tmp_path / "pulled" / TENSORS_FILE).read_bytes()


def test_manifest_and_key_layout(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    weights = make_adapter(router=True)
    manifest = store.publish(weights)
    spec = weights.spec
    assert manifest.version == 1
    assert manifest.spec == spec
    assert set(manifest.parts) == set(spec.part_names())
    # 2 layers = 4 blocks: A, three tasks' B and the router per block.
    assert len(manifest.parts) == 4 * (1 + 3 + 1)
    text = get(raw, "elasticfleet:adapter:demo:manifest:1")
    stored = AdapterManifest.from_json(text)
    assert stored == manifest
    for part, info in manifest.parts.items():
        blob = get(raw, f"elasticfleet:adapter:demo:blob:1:{part}")
        assert (len(blob), hashlib.sha256(blob).hexdigest()) == (info.size, info.sha256)
        assert set(decode_part(blob)) == set(weights.split()[part])
    assert raw.get("elasticfleet:adapter:demo:current") == b"1"
    assert raw.smembers("elasticfleet:adapters") == {b"demo"}
    assert raw.zrange("elasticfleet:adapter:demo:versions", 0, -1) == [b"1"]
    # The manifest a person reads names the base model, rank, alpha, modules and tasks.
    for needle in ('"base_model": "tiny-llama"', '"rank": 4', '"alpha": 8.0', '"router": true'):
        assert needle in text.decode()


def test_prefix_separates_stores(redis_url: str, make_adapter: MakeAdapter) -> None:
    first = AdapterStore.from_url(redis_url, prefix="team-a:")
    second = AdapterStore.from_url(redis_url, prefix="team-b:")
    first.publish(make_adapter())
    assert [a.name for a in first.list_adapters()] == ["demo"]
    assert second.list_adapters() == []


def test_versions_are_listed_with_sizes(store: AdapterStore, make_adapter: MakeAdapter) -> None:
    store.publish(make_adapter(seed=1))
    store.publish(make_adapter(seed=2))
    store.publish(make_adapter("other", tasks=("code",), router=False))
    (demo, other) = store.list_adapters()
    assert (demo.name, demo.current, [m.version for m in demo.versions]) == ("demo", 2, [1, 2])
    assert (other.name, other.current) == ("other", 1)
    assert all(m.total_bytes > 0 for m in demo.versions)
    assert other.versions[0].total_bytes < demo.versions[0].total_bytes
    assert store.current_version("demo") == 2
    assert store.manifest("demo").version == 2
    assert same_tensors(fetch(store, "demo", 1)[1], make_adapter(seed=1))


def test_publish_is_atomic_under_a_concurrent_reader(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    """While versions are published one after another, a reader fetching
    "current" always gets exactly one published version, never a mix."""
    # Rank 64 (about 0.5 MB a version) keeps each publish long enough to overlap reads.
    published = {1: make_adapter(seed=1, rank=64)}
    store.publish(published[1])
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                manifest, weights = fetch(store, "demo")
                seen.append(manifest.version)
                if not same_tensors(weights, published[manifest.version]):
                    raise AssertionError(f"version {manifest.version} came back mixed")
        except BaseException as error:
            errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for seed in range(2, 22):
            weights = make_adapter(seed=seed, rank=64)
            published[seed] = weights  # registered before it can become current
            assert store.publish(weights).version == seed
    finally:
        done.set()
        reader.join()
    assert not errors, errors[0]
    assert seen == sorted(seen), "the current version went backwards"
    assert len(set(seen)) > 1, "the reader never overlapped a publish"


def test_concurrent_publishers_get_distinct_versions(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    """Versions come from one counter, and "current" only moves forward, so
    racing publishers never overwrite each other and the newest wins."""
    weights = make_adapter(rank=32)
    versions: list[int] = []

    def publish() -> None:
        for _ in range(5):
            versions.append(store.publish(weights).version)

    threads = [threading.Thread(target=publish) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == list(range(1, 16))
    assert store.version_numbers("demo") == list(range(1, 16))
    assert store.current_version("demo") == 15


def test_delete_an_old_version(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    for seed in (1, 2, 3):
        store.publish(make_adapter(seed=seed))
    deleted = store.delete_version("demo", 1)
    assert deleted.version == 1
    assert store.version_numbers("demo") == [2, 3]
    assert raw.keys("elasticfleet:adapter:demo:*:1*") == []
    with pytest.raises(AdapterNotFound, match=r"no version 1 .*versions: 2, 3"):
        fetch(store, "demo", 1)
    with pytest.raises(AdapterNotFound):
        store.delete_version("demo", 1)
    assert same_tensors(fetch(store, "demo", 2)[1], make_adapter(seed=2))


def test_deleting_the_current_version_is_refused(
    store: AdapterStore, make_adapter: MakeAdapter
) -> None:
    store.publish(make_adapter(seed=1))
    store.publish(make_adapter(seed=2))
    with pytest.raises(StoreConflict, match="current version; publish a newer one first"):
        store.delete_version("demo", 2)
    assert store.version_numbers("demo") == [1, 2]
    assert same_tensors(fetch(store, "demo")[1], make_adapter(seed=2))


def test_delete_a_whole_adapter(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    store.publish(make_adapter(seed=1))
    store.publish(make_adapter(seed=2))
    store.publish(make_adapter("other"))
    assert store.delete_adapter("demo") == [1, 2]
    # Only the counter is left, so version numbers are never reused.
    assert raw.keys("elasticfleet:adapter:demo:*") == [b"elasticfleet:adapter:demo:next"]
    assert [a.name for a in store.list_adapters()] == ["other"]
    with pytest.raises(AdapterNotFound, match="adapter 'demo' is not in Redis at redis://"):
        fetch(store, "demo")
    with pytest.raises(AdapterNotFound):
        store.delete_adapter("demo")
    assert store.publish(make_adapter(seed=3)).version == 3


def test_unknown_names_are_not_found(store: AdapterStore, make_adapter: MakeAdapter) -> None:
    with pytest.raises(LookupError, match="adapter 'nope' is not in"):
        store.manifest("nope")
    with pytest.raises(LookupError, match=r"has no version 4 .*versions: none"):
        store.manifest("nope", 4)
    manifest = store.publish(make_adapter())
    with pytest.raises(LookupError, match="has no part"):
        store.read_parts(manifest, ["B/poetry/0"])
    with pytest.raises(ValueError, match="adapter name 'Bad Name' is invalid"):
        store.manifest("Bad Name")


def test_a_corrupt_blob_is_rejected(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    store.publish(make_adapter())
    raw.set("elasticfleet:adapter:demo:blob:1:B/qa/3", b"not the bytes that were published")
    with pytest.raises(DigestMismatch, match=r"adapter 'demo' version 1 part B/qa/3 is corrupt"):
        fetch(store, "demo")
    fetch(store, "demo", parts=["B/qa/2"])  # the others are fine
    raw.set("elasticfleet:adapter:demo:manifest:1", b'{"format": 1, "name": "demo"')
    with pytest.raises(DigestMismatch, match="adapter 'demo' version 1's manifest is unreadable"):
        fetch(store, "demo")


def test_the_publish_commit_checks_blobs(
    store: AdapterStore,
    make_adapter: MakeAdapter,
    raw: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A publish whose blobs vanish before the commit (an adapter deleted
    meanwhile) fails instead of publishing a version with holes."""
    real_eval = store.client.eval

    def lose_a_blob_then_eval(*args: Any) -> Any:
        raw.delete("elasticfleet:adapter:demo:blob:1:A/0")
        return real_eval(*args)

    monkeypatch.setattr(store.client, "eval", lose_a_blob_then_eval)
    with pytest.raises(StoreConflict, match="publish again"):
        store.publish(make_adapter())
    monkeypatch.undo()
    assert store.list_adapters() == []
    assert raw.keys("elasticfleet:adapter:demo:blob:*") == []  # cleaned up
    assert store.publish(make_adapter()).version == 2


def test_password_protected_server(make_adapter: MakeAdapter) -> None:
    server = TestRedisServer(password="s3cret-pw")
    server.start()
    try:
        in_url = AdapterStore.from_url(f"redis://:s3cret-pw@127.0.0.1:{server.port}/0")
        in_url.publish(make_adapter())
        as_argument = AdapterStore.from_url(server.url, password="s3cret-pw")
        assert [a.name for a in as_argument.list_adapters()] == ["demo"]
        wrong = AdapterStore.from_url(f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        with pytest.raises(StoreAuthError, match="refused the credentials") as caught:
            wrong.list_adapters()
        assert "wrong-pw" not in str(caught.value)
        assert "redis://:***@127.0.0.1" in str(caught.value)
        with pytest.raises(StoreAuthError):
            AdapterStore.from_url(server.url).manifest("demo")
    finally:
        server.close()


def test_unreachable_redis_is_a_quick_retryable_error() -> None:
    store = AdapterStore.from_url(f"redis://127.0.0.1:{free_port()}/0")
    start = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="unreachable while resolving adapter 'demo'") as e:
        fetch(store, "demo")
    assert time.perf_counter() - start < 3.0
    assert isinstance(e.value, ConnectionError)
    assert e.value.retryable


def test_url_and_tls_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"rediss:// \(this one starts with http://\)"):
        AdapterStore.from_url("http://127.0.0.1:6379")
    # A URL without a scheme is not repeated: it may hold a password.
    with pytest.raises(ValueError, match=r"\(this one has no scheme\)$") as raised:
        AdapterStore.from_url("user:s3cret@127.0.0.1:6379")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(ValueError, match="TLS options need a rediss:// URL"):
        AdapterStore.from_url("redis://127.0.0.1:6379/0", tls_ca="/etc/ssl/ca.pem")


def test_tls(tls_redis: tuple[str, Path], redis_url: str, make_adapter: MakeAdapter) -> None:
    url, ca = tls_redis
    verified = AdapterStore.from_url(url, tls_ca=str(ca))
    verified.publish(make_adapter())
    assert same_tensors(fetch(verified, "demo")[1], make_adapter())
    with pytest.raises(StoreAuthError, match=r"TLS certificate failed verification.*--tls-ca"):
        AdapterStore.from_url(url).list_adapters()
    insecure = AdapterStore.from_url(url, tls_verify=False)
    assert [a.name for a in insecure.list_adapters()] == ["demo"]
    # Plaintext to a TLS port does not pass for a working connection.
    with pytest.raises(StoreUnavailable):
        AdapterStore.from_url(url.replace("rediss://", "redis://"), retries=0).list_adapters()


# -- what is read back is parsed defensively ------------------------------------

MANIFEST_KEY = "elasticfleet:adapter:demo:manifest:1"


def test_a_deeply_nested_manifest_is_data_loss_and_listed_alone(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    store.publish(make_adapter())
    store.publish(make_adapter("other", tasks=("code",), router=False))
    raw.set(MANIFEST_KEY, b'{"format": 1, "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    with pytest.raises(DigestMismatch, match="version 1's manifest is unreadable: it is nested"):
        store.manifest("demo")
    (demo, other) = store.list_adapters()
    assert (demo.name, demo.current, demo.versions) == ("demo", 1, [])
    (problem,) = demo.problems
    assert problem.startswith("adapter 'demo' version 1's manifest is unreadable")
    assert len(problem) < 300
    assert (other.name, [m.version for m in other.versions], other.problems) == ("other", [1], ())


def test_a_manifest_declaring_ten_million_layers_fails_fast_and_small(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    import tracemalloc

    manifest = store.publish(make_adapter())
    document = json.loads(manifest.to_json())
    document["num_layers"] = 10_000_000
    raw.set(MANIFEST_KEY, json.dumps(document))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DigestMismatch, match="num_layers must be 1-256"):
            store.manifest("demo")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 1 << 20  # nothing was sized by the declared layer count


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "other"}, "describes adapter 'other' version 1"),
        ({"version": 7}, "describes adapter 'demo' version 7"),
        ({"version": True}, "version True is not a positive integer"),
        ({"rank": "4"}, "field 'rank' must be int, got str"),
        ({"alpha": -1}, "alpha must be positive and finite"),
        ({"tasks": ["code"] * 65}, "lists 65 tasks, at most 64"),
        ({"parts": {}}, "its 0 parts are not the 20 of its spec"),
        ({"parts": None}, "its parts are a NoneType, not an object"),
        ({"name": "x" * 10_000}, r"adapter name 'xxx.*\(10000 characters\) is invalid"),
    ],
)
def test_a_manifest_that_contradicts_itself_or_its_key_is_data_loss(
    store: AdapterStore,
    make_adapter: MakeAdapter,
    raw: redis.Redis,
    change: dict[str, Any],
    message: str,
) -> None:
    document = json.loads(store.publish(make_adapter()).to_json()) | change
    raw.set(MANIFEST_KEY, json.dumps(document))
    with pytest.raises(DigestMismatch, match=message) as caught:
        fetch(store, "demo")
    assert len(str(caught.value)) < 400


def test_json_has_no_infinity_and_numbers_are_finite(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    text = store.publish(make_adapter()).to_json()
    assert '"alpha": 8.0' in text
    for alpha, message in [
        ("Infinity", "Infinity is not a number JSON allows"),
        ("1e400", "finite"),
    ]:
        raw.set(MANIFEST_KEY, text.replace('"alpha": 8.0', f'"alpha": {alpha}'))
        with pytest.raises(DigestMismatch, match=message):
            store.manifest("demo")


def test_a_blob_that_is_not_safetensors_is_data_loss(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    """The manifest's digest matches (the publisher wrote these bytes), but
    they are not the part: unusable data, refused before anyone sees it."""
    manifest = store.publish(make_adapter())
    bad = {"A/0": b"\x00" * 64, "B/qa/1": get(raw, "elasticfleet:adapter:demo:blob:1:A/1")}
    for part, blob in bad.items():
        raw.set(f"elasticfleet:adapter:demo:blob:1:{part}", blob)
    document = json.loads(manifest.to_json())
    for part, blob in bad.items():
        document["parts"][part] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    raw.set(MANIFEST_KEY, json.dumps(document))
    with pytest.raises(DigestMismatch, match="part A/0 is not safetensors"):
        fetch(store, "demo", parts=["A/0"])
    with pytest.raises(
        DigestMismatch, match="part B/qa/1 should hold 3 tensors and holds 3; these differ"
    ):
        fetch(store, "demo", parts=["B/qa/1"])


def test_corrupt_index_entries_are_reported_alone(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    store.publish(make_adapter())
    store.publish(make_adapter("other", tasks=("code",), router=False))
    raw.sadd("elasticfleet:adapters", b"\xffBad Name" + b"!" * 5000)
    raw.set("elasticfleet:adapter:other:current", b"not-a-number")
    raw.zadd("elasticfleet:adapter:demo:versions", {b"garbage": 9})
    listed = {summary.name[:5]: summary for summary in store.list_adapters()}
    assert [m.version for m in listed["demo"].versions] == [1] and not listed["demo"].problems
    (index,) = listed["\ufffdBad "].problems
    assert (
        index.startswith("the adapter index: adapter name '\ufffdBad Name!!!") and len(index) < 300
    )
    assert listed["other"].current is None
    assert listed["other"].problems == (
        "adapter 'other''s current version is not a version number: b'not-a-number'",
    )
    with pytest.raises(DigestMismatch, match="current version is not a version number"):
        fetch(store, "other")


# -- a Redis that stalls --------------------------------------------------------


def test_a_stalled_redis_fails_within_the_documented_timeouts(make_adapter: MakeAdapter) -> None:
    """SIGSTOP: connections are accepted, nothing answers. Each call must
    fail within connect + read timeout (+ ~1 s of connection retries),
    whether its connection is fresh or pooled; redis-py's nested retries of
    timeouts made this 9 read timeouts (over two minutes by default)."""
    server = TestRedisServer()
    server.start()
    try:
        warm = AdapterStore.from_url(server.url, connect_timeout_s=0.5, timeout_s=1.0)
        warm.publish(make_adapter())
        with server.paused():
            for store in (
                warm,
                AdapterStore.from_url(server.url, connect_timeout_s=0.5, timeout_s=1.0),
            ):
                for call in (functools.partial(fetch, store, "demo"), store.list_adapters):
                    started = time.perf_counter()
                    with pytest.raises(StoreUnavailable, match="unreachable") as caught:
                        call()
                    assert time.perf_counter() - started < 0.5 + 1.0 + 1.0
                    assert caught.value.retryable
        assert [a.name for a in warm.list_adapters()] == ["demo"]  # resumed: works again
    finally:
        server.close()


# -- garbage --------------------------------------------------------------------


def keys(raw: redis.Redis, pattern: str) -> list[bytes]:
    return sorted(cast(list[bytes], raw.keys(pattern)))


def age(raw: redis.Redis, key: bytes, seconds: int) -> None:
    """Make `key` look untouched for `seconds` (RESTORE sets its idle time)."""
    dumped = raw.dump(key)
    assert isinstance(dumped, bytes)
    raw.restore(key, 0, dumped, replace=True, idletime=seconds)


def test_gc_sweeps_only_old_blobs_no_manifest_names(
    store: AdapterStore,
    make_adapter: MakeAdapter,
    raw: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store.publish(make_adapter())  # version 1, published: never touched

    def connection_lost(*args: Any) -> Any:
        raise redis.exceptions.ConnectionError("connection lost")

    # Version 2's push loses Redis at its commit: its blobs stay (the commit
    # may have happened, so they cannot be taken back).
    monkeypatch.setattr(store.client, "eval", connection_lost)
    with pytest.raises(StoreUnavailable):
        store.publish(make_adapter(seed=2))
    monkeypatch.undo()
    orphans = keys(raw, "elasticfleet:adapter:demo:blob:2:*")
    assert len(orphans) == 20
    sizes = sum(raw.strlen(key) for key in orphans[:15])
    assert store.manifest("demo").version == 1

    fresh = store.collect_garbage(grace_s=3600, delete=True)  # a push in progress looks like this
    assert (fresh.blobs, fresh.young, fresh.versions) == (0, 20, [])
    assert sorted(raw.keys("elasticfleet:adapter:demo:blob:2:*")) == orphans

    for key in orphans[:15]:
        age(raw, key, 7200)
    dry = store.collect_garbage(grace_s=3600)
    assert (dry.blobs, dry.young, dry.versions, dry.deleted) == (15, 5, [("demo", 2)], False)
    assert sizes < dry.bytes < sizes + 15 * 200  # MEMORY USAGE: the bytes and some overhead
    assert len(raw.keys("elasticfleet:adapter:demo:blob:2:*")) == 20  # a dry run changes nothing

    swept = store.collect_garbage(grace_s=3600, delete=True)
    assert (swept.blobs, swept.deleted) == (15, True)
    assert sorted(raw.keys("elasticfleet:adapter:demo:blob:2:*")) == orphans[15:]
    assert len(raw.keys("elasticfleet:adapter:demo:blob:1:*")) == 20
    assert same_tensors(fetch(store, "demo")[1], make_adapter())


def test_gc_never_takes_blobs_a_manifest_names(
    store: AdapterStore, make_adapter: MakeAdapter, raw: redis.Redis
) -> None:
    store.publish(make_adapter())
    for key in keys(raw, "elasticfleet:adapter:demo:blob:*"):
        age(raw, key, 7200)
    report = store.collect_garbage(grace_s=0, delete=True)
    assert (report.blobs, report.young) == (0, 0)
    assert same_tensors(fetch(store, "demo")[1], make_adapter())
