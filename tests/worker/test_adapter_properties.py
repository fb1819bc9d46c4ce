"""Property-based tests (hypothesis) of what the adapter code reads from
files and from Redis, which anyone with the password can write: random and
hostile manifests and adapter.json documents (nesting, sizes, types,
unicode, huge numbers) and random bytes as blobs.

The invariants: each input is accepted whole and consistent, or refused with
the precise error (AdapterFormatError for a document or a blob,
DigestMismatch, i.e. DATA_LOSS, for what the store holds, a worker error for
LoadAdapter), never another exception type; in bounded memory (traced
Python allocations) and time (a deadline per example), with a bounded
message.

The runs are derandomized (fixed examples, no example database), so CI sees
the same inputs every time; each test has a fixed number of examples and the
whole module takes a few seconds.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import pytest
import redis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from valkey_server import TestRedisServer

from elasticfleet.worker.adapters.cache import AdapterCache
from elasticfleet.worker.adapters.format import (
    SPEC_FILE,
    AdapterFormatError,
    AdapterSpec,
    parse_json,
)
from elasticfleet.worker.adapters.host import CachedAdapterHost
from elasticfleet.worker.adapters.store import (
    AdapterManifest,
    AdapterStore,
    DigestMismatch,
    PartInfo,
    sha256_hex,
)
from elasticfleet.worker.adapters.weights import AdapterWeights, decode_part, encode_part, fetch
from elasticfleet.worker.errors import WorkerError
from elasticfleet.worker.model.config import tiny_config
from elasticfleet.worker.model.plan import PruningPlan

T = TypeVar("T")


def bounded(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=5),  # generous: the cores are shared
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


SPEC = AdapterSpec(
    name="demo",
    base_model="tiny",
    num_layers=4,
    rank=2,
    alpha=4.0,
    modules=("q_proj", "down_proj"),
    tasks=("code", "qa"),
    router=True,
)
VALID = json.loads(
    AdapterManifest(
        SPEC,
        1,
        "2026-01-01T00:00:00+00:00",
        {p: PartInfo(100, "0" * 64) for p in SPEC.part_names()},
    ).to_json()
)
FIELDS = ["format", "name", "base_model", "num_layers", "rank", "alpha", "modules", "tasks"]
FIELDS += ["router", "version", "created", "parts"]

# JSON values: every type, unicode, huge and odd numbers, nesting (json.dumps
# recurses too, so deep nesting is built as text in its own test).
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**7, 10**18, 10**4000]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(
        [
            "demo",
            "code",
            "q_proj",
            "\uff44\uff45\uff4d\uff4f",
            "demo\x00",
            "\u202edemo",
            "A/0",
            "x" * 20_000,
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=30,
)


def mutate(document: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
    """`document` with values replaced (or added) at dotted paths such as 'parts.A/0.size'."""
    out: dict[str, Any] = json.loads(json.dumps(document))
    for path, value in changes:
        *parents, key = path.split(".")
        target: Any = out
        for parent in parents:
            target = target.get(parent) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[key] = value
    return out


paths = st.sampled_from(
    [
        *FIELDS,
        "extra",
        "parts.A/0",
        "parts.A/0.size",
        "parts.A/0.sha256",
        "parts.B/qa/7",
        "parts.C/9",
    ]
)
changes = st.lists(st.tuples(paths, json_values), min_size=1, max_size=3)


def traced(call: Callable[[], T]) -> tuple[T | Exception, int]:
    """call()'s result or the exception it raised, and the peak of Python
    allocations meanwhile."""
    tracemalloc.start()
    try:
        try:
            result: T | Exception = call()
        except Exception as error:
            result = error
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def check_manifest_text(text: str | bytes) -> None:
    result, peak = traced(lambda: AdapterManifest.from_json(text, "the manifest"))
    if isinstance(result, Exception):
        assert type(result) is DigestMismatch, repr(result)[:300]
        assert str(result).startswith("the manifest is unreadable: ")
        assert len(str(result)) < 600
    else:  # accepted: whole and consistent
        assert set(result.parts) == set(result.spec.part_names())
        assert result.version >= 1
    # About what json.loads itself holds for the text, never what it declares.
    assert peak < 40 * len(text) + (2 << 20), peak


@bounded(150)
@given(changes)
def test_hostile_manifests_are_data_loss_or_consistent(edits: list[tuple[str, Any]]) -> None:
    check_manifest_text(json.dumps(mutate(VALID, edits)))


@bounded(60)
@given(json_values)
def test_any_json_is_a_manifest_or_data_loss(value: Any) -> None:
    check_manifest_text(json.dumps(value))


@bounded(60)
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_any_bytes_are_a_manifest_or_data_loss(data: bytes) -> None:
    check_manifest_text(data)


@bounded(30)
@given(
    st.integers(min_value=1, max_value=300_000),
    st.sampled_from(["[", "{", '{"a":', '{"parts":', "[{", '["']),
)
def test_nesting_of_any_depth_is_refused_quickly(depth: int, opener: str) -> None:
    check_manifest_text('{"format": 1, "x": ' + opener * depth)
    check_manifest_text("[" * depth + "]" * depth)


# -- adapter.json -----------------------------------------------------------------

VALID_SPEC = SPEC.to_dict()


@bounded(150)
@given(st.lists(st.tuples(st.sampled_from([*FIELDS[1:9], "extra"]), json_values), max_size=3))
def test_hostile_specs_are_a_format_error_or_a_bounded_spec(edits: list[tuple[str, Any]]) -> None:
    text = json.dumps(mutate(VALID_SPEC, edits))

    def parse() -> AdapterSpec:
        return AdapterSpec.from_dict(parse_json(text, max_bytes=1 << 20, what="it"))

    result, peak = traced(parse)
    if isinstance(result, Exception):
        assert type(result) is AdapterFormatError, repr(result)[:300]
        assert len(str(result)) < 400
    else:
        assert 0 < result.num_layers <= 256 and 0 < len(result.tasks) <= 64
        assert len(result.part_names()) <= 512 * 66
    assert peak < 40 * len(text) + (2 << 20), peak


@bounded(25)
@given(
    document=json_values
    | st.lists(st.tuples(st.sampled_from(FIELDS[1:9]), json_values), max_size=3)
)
def test_an_adapter_directory_with_any_spec_is_loaded_or_refused_in_one_line(
    document: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("adapter")
    AdapterWeights(SPEC, _tensors(SPEC)).save(directory)
    if isinstance(document, list) and all(isinstance(e, tuple) for e in document):
        document = mutate(VALID_SPEC, document)
    (directory / SPEC_FILE).write_text(json.dumps(document))
    try:
        AdapterWeights.load(directory)
    except AdapterFormatError as error:
        assert str(error).startswith(str(directory / SPEC_FILE)) or "adapter.safetensors" in str(
            error
        )
        assert "\n" not in str(error) and len(str(error)) < 600


# -- blobs ----------------------------------------------------------------------------


def _tensors(spec: AdapterSpec) -> dict[str, torch.Tensor]:
    """A complete set of small tensors for `spec` (projection widths of tiny_config)."""
    from elasticfleet.worker.adapters.layer import projection_shape

    config = tiny_config()
    tensors = {}
    for layer in range(spec.num_layers):
        for module in spec.modules:
            fan_in, fan_out = projection_shape(config, module)
            prefix = f"layers.{layer}.{module}"
            tensors[f"{prefix}.A"] = torch.ones(spec.rank, fan_in)
            tensors |= {f"{prefix}.B.{t}": torch.ones(fan_out, spec.rank) for t in spec.tasks}
            tensors[f"{prefix}.router"] = torch.ones(len(spec.tasks), fan_in)
    return tensors


PARTS = AdapterWeights(SPEC, _tensors(SPEC)).split()


def safetensors_blob(header: Any, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F64", "X9", ""])
shapes = st.lists(st.integers(min_value=-1, max_value=10**12), max_size=4) | json_values
headers = st.dictionaries(
    st.sampled_from(["layers.0.q_proj.A", "layers.1.q_proj.A", "__metadata__", "x", "é" * 50]),
    st.fixed_dictionaries(
        {
            "dtype": dtypes,
            "shape": shapes,
            "data_offsets": st.lists(st.integers(-5, 10**12), max_size=3),
        }
    )
    | json_values,
    max_size=3,
)
blobs = st.one_of(
    st.binary(max_size=512),
    st.builds(safetensors_blob, headers, st.binary(max_size=256)),
    st.builds(safetensors_blob, headers, st.binary(max_size=64), st.integers(0, 2**64 - 1)),
    st.sampled_from(list(PARTS)).map(
        lambda part: encode_part(PARTS[part])
    ),  # valid, maybe misplaced
)


@bounded(200)
@given(blobs, st.sampled_from(sorted(PARTS)))
def test_any_blob_decodes_to_its_part_or_is_a_format_error(blob: bytes, part: str) -> None:
    try:
        tensors = decode_part(blob, SPEC, part)
    except AdapterFormatError as error:
        assert len(str(error)) < 600
        return
    assert set(tensors) == set(PARTS[part])
    assert all(torch.equal(tensors[n], PARTS[part][n]) for n in tensors)


# -- through Redis and the worker's host ---------------------------------------------------


def _stored(server: TestRedisServer, manifest: bytes, blob: bytes | None) -> redis.Redis:
    """An empty store holding adapter 'demo' version 1 as `manifest` says, its
    part A/0 replaced by `blob` (the manifest's digest made to match)."""
    client = server.client()
    client.flushall()
    store = AdapterStore.from_url(server.url)
    published = store.publish(AdapterWeights(SPEC, _tensors(SPEC)))
    if blob is not None:
        document = json.loads(published.to_json())
        document["parts"]["A/0"] = {"size": len(blob), "sha256": sha256_hex(blob)}
        manifest = json.dumps(document).encode()
        client.set("elasticfleet:adapter:demo:blob:1:A/0", blob)
    if manifest:
        client.set("elasticfleet:adapter:demo:manifest:1", manifest)
    store.close()
    return client


@bounded(40)
@given(edits=changes | st.binary(max_size=200).map(lambda b: [("raw", b)]))
def test_the_store_lists_and_refuses_hostile_manifests_precisely(
    edits: list[tuple[str, Any]], redis_server: TestRedisServer
) -> None:
    text = edits[0][1] if edits[0][0] == "raw" else json.dumps(mutate(VALID, edits)).encode()
    _stored(redis_server, text, None).close()
    store = AdapterStore.from_url(redis_server.url)
    try:
        (summary,) = store.list_adapters()  # never fails for one bad manifest
        assert summary.name == "demo" and len(summary.versions) + len(summary.problems) == 1
        try:
            fetch(store, "demo")
        except DigestMismatch as error:
            assert len(str(error)) < 700
    finally:
        store.close()


@bounded(40)
@given(blob=blobs)
def test_load_adapter_refuses_any_blob_with_a_worker_error(
    blob: bytes, redis_server: TestRedisServer
) -> None:
    _stored(redis_server, b"", blob).close()
    store = AdapterStore.from_url(redis_server.url)
    host = CachedAdapterHost(AdapterCache(store, 8 << 20), tiny_config(), PruningPlan.dense(4))
    try:
        host.load("demo", "", [], 64 << 20)
    except WorkerError as error:
        assert len(str(error)) < 700
        assert host.cache is not None and host.cache.stats().parts == 0  # nothing kept
    finally:
        store.close()
