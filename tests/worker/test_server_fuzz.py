"""Property-based fuzzing of the worker's gRPC surface (hypothesis), against
a real server on 127.0.0.1 with the tiny model.

Hostile and random Generate, ApplyPlan, LoadAdapter, UnloadAdapter,
GetStats and ListAdapters calls: field values at and past every limit, huge
strings, odd unicode, out-of-range numbers, wrong wire types, and random
bytes as the serialized message. The invariants:

- a client's mistake is never INTERNAL or UNKNOWN (nor UNAVAILABLE: the
  worker is not going anywhere);
- the worker never dies: health is SERVING after every call;
- no request fails but the offending one: a canary thread streams
  well-formed requests all along, and every one of them completes.

Bounded and reproducible: a fixed number of examples, derandomized (the
same examples every run, no example database), each call with a deadline,
streams read for a few messages and then cancelled.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import FakeAdapters, make_engine

from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.engine import (
    MAX_ADAPTER_NAME,
    MAX_PLAN_ID,
    MAX_PROMPT_BYTES,
    MAX_REQUEST_ID,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TASK_NAME,
    MAX_TASKS,
    MAX_VERSION,
)
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions

# Fixtures: served_model_dir.
pytest_plugins = ["serving_fixtures"]

EXAMPLES = 400
# Codes that say "the worker is broken", never the answer to a client's mistake.
BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
SERVICE = "/elasticfleet.v1.Worker/"
UINT32 = 2**32 - 1
UINT64 = 2**64 - 1
# The tiny model: 4 layers (8 blocks), a 256-token context.
BLOCKS = 8


@dataclass
class Fleet:
    """The server under test, a channel to it, and the canary's tally."""

    server: BackgroundServer
    channel: grpc.Channel
    completed: list[int]
    failures: list[str]


def canary(target: str, stop: threading.Event, completed: list[int], failures: list[str]) -> None:
    """Well-formed requests, one after another, until `stop`: each must
    finish (by length: EOS is ignored) whatever the fuzzer sends meanwhile."""
    request = generate_request("canary", max_new_tokens=8, ignore_eos=True)
    with WorkerClient(target) as client:
        while not stop.is_set():
            try:
                result = client.complete(request, timeout=30)
            except grpc.RpcError as error:
                failures.append(f"canary failed: {error}")
                continue
            if result.finish_reason != "length" or len(result.token_ids) != 8:
                failures.append(f"canary ended badly: {result.finish_reason}")
            completed.append(1)


@pytest.fixture(scope="module")
def fleet(served_model_dir: Path) -> Iterator[Fleet]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, for the whole module
    engine = make_engine(served_model_dir, adapters=FakeAdapters())
    server = BackgroundServer(engine, ServerOptions())
    target = f"127.0.0.1:{server.port}"
    stop = threading.Event()
    completed: list[int] = []
    failures: list[str] = []
    runner = threading.Thread(target=canary, args=(target, stop, completed, failures))
    runner.start()
    channel = grpc.insecure_channel(target)
    try:
        yield Fleet(server, channel, completed, failures)
    finally:
        stop.set()
        runner.join(60)
        channel.close()
        server.stop()
        torch.set_num_threads(threads)


# -- strategies ------------------------------------------------------------------

# Odd unicode (any code point a protobuf string can carry: no lone surrogates),
# and lengths at and past each limit.
CHARS = st.characters(exclude_categories=["Cs"])


def text(limit: int) -> st.SearchStrategy[str]:
    """Short odd text, or exactly at / one past / far past `limit` characters."""
    return st.one_of(
        st.text(CHARS, max_size=12),
        st.sampled_from([limit, limit + 1, 4 * limit + 3, 10_000]).map(lambda n: "é" * n),
        st.sampled_from(["", " ", "\x00", "\u202e", "code", "a" * limit, "\U0001f600" * limit]),
    )


FLOATS = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-3, 0.0009, 1.0, 100.0, 100.0001, 1.5, -1.0]),
)
UINT32S = st.one_of(st.integers(0, 8), st.sampled_from([255, 256, 1_000_000, 1_000_001, UINT32]))
UINT64S = st.one_of(st.integers(0, 2**20), st.sampled_from([2**63, UINT64]))


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    prompt = draw(
        st.one_of(
            st.text(CHARS, max_size=40),
            st.sampled_from([300, MAX_PROMPT_BYTES, MAX_PROMPT_BYTES + 1]).map(lambda n: "x" * n),
        )
    )
    request = pb.GenerateRequest(
        request_id=draw(text(MAX_REQUEST_ID)),
        prompt=prompt,
        chat_template=draw(st.booleans()),
        max_new_tokens=draw(UINT32S),
        stop=draw(st.lists(text(MAX_STOP_LENGTH), max_size=MAX_STOP_STRINGS + 2)),
        ignore_eos=draw(st.booleans()),
    )
    request.sampling.temperature = draw(FLOATS)
    request.sampling.top_k = draw(UINT32S)
    request.sampling.top_p = draw(FLOATS)
    if draw(st.booleans()):
        request.sampling.seed = draw(UINT64S)
    head = draw(st.sampled_from(["none", "unset", "task", "router"]))
    if head != "unset":
        request.adapter.name = draw(st.one_of(st.just("code"), text(MAX_ADAPTER_NAME)))
        if head == "task":
            request.adapter.task = draw(
                st.one_of(st.sampled_from(["qa", "py"]), text(MAX_TASK_NAME))
            )
        elif head == "router":
            request.adapter.router.SetInParent()
    return request


@st.composite
def edge_generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    """Requests the door accepts, with every sampling value at its edges
    (top_k far past the vocabulary, top_p near 0, the smallest and largest
    temperatures, any seed): they must run, and fail no one."""
    request = generate_request(
        draw(st.text(CHARS, min_size=1, max_size=30)),
        max_new_tokens=draw(st.sampled_from([0, 1, 2, 5, 1_000_000])),
        temperature=draw(
            st.one_of(st.sampled_from([0.0, 1e-3, 100.0]), st.floats(0.5, 100.0, width=32))
        ),
        top_k=draw(st.one_of(st.integers(0, 300), st.just(UINT32))),
        top_p=draw(st.one_of(st.sampled_from([0.0, 1e-38, 1.0]), st.floats(0.0, 1.0, width=32))),
        seed=draw(st.none() | st.integers(0, UINT64)),
        stop=draw(st.lists(st.text(CHARS, min_size=1, max_size=3), max_size=3)),
        chat_template=draw(st.booleans()),
        ignore_eos=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.adapter.name = "code"
        if draw(st.booleans()):
            request.adapter.task = draw(st.sampled_from(["qa", "py"]))
        else:
            request.adapter.router.SetInParent()
    return request


@st.composite
def plan_requests(draw: st.DrawFn) -> pb.ApplyPlanRequest:
    size = draw(st.sampled_from([0, 1, BLOCKS - 1, BLOCKS, BLOCKS + 1, 2 * BLOCKS, 10_000]))
    mask = (
        draw(st.lists(st.booleans(), min_size=size, max_size=size)) if size <= 16 else [True] * size
    )
    request = pb.ApplyPlanRequest(plan_id=draw(text(MAX_PLAN_ID)), keep_mask=mask)
    # Budgets the worker refuses, or so large they change nothing for the
    # canary (a moderate one would legitimately squeeze it out).
    budget = draw(st.sampled_from([None, 0, 1, 1000, 2**40, 2**63, UINT64]))
    if budget is not None:
        request.budget_bytes = budget
    return request


@st.composite
def load_requests(draw: st.DrawFn) -> pb.LoadAdapterRequest:
    return pb.LoadAdapterRequest(
        name=draw(text(MAX_ADAPTER_NAME)),
        version=draw(text(MAX_VERSION)),
        tasks=draw(
            st.one_of(
                st.lists(text(MAX_TASK_NAME), max_size=4),
                st.sampled_from([MAX_TASKS, MAX_TASKS + 1]).map(lambda n: ["t"] * n),
            )
        ),
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def wire_messages(draw: st.DrawFn) -> bytes:
    """Well-framed protobuf fields of random numbers and wire types: a
    string field sent as a varint, a bool as a 64-bit value, and so on."""
    fields = []
    for _ in range(draw(st.integers(1, 6))):
        number = draw(st.integers(1, 12))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        tag = varint(number << 3 | wire)
        if wire == 0:
            payload = varint(draw(st.integers(0, UINT64)))
        elif wire == 1:
            payload = draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            payload = draw(st.binary(min_size=4, max_size=4))
        else:
            blob = draw(st.binary(max_size=20))
            payload = varint(len(blob)) + blob
        fields.append(tag + payload)
    return b"".join(fields)


@dataclass(frozen=True)
class Call:
    """One RPC to make: the method and the request's serialized bytes."""

    method: str
    payload: bytes


def call_of(method: str) -> Callable[[Any], Call]:
    return lambda message: Call(method, message.SerializeToString())


METHODS = ["Generate", "ApplyPlan", "GetStats", "LoadAdapter", "UnloadAdapter", "ListAdapters"]
CALLS = st.one_of(
    generate_requests().map(call_of("Generate")),
    edge_generate_requests().map(call_of("Generate")),
    plan_requests().map(call_of("ApplyPlan")),
    load_requests().map(call_of("LoadAdapter")),
    text(MAX_ADAPTER_NAME).map(
        lambda name: Call("UnloadAdapter", pb.UnloadAdapterRequest(name=name).SerializeToString())
    ),
    st.builds(Call, st.sampled_from(METHODS), st.binary(max_size=64)),
    st.builds(Call, st.sampled_from(METHODS), wire_messages()),
)


# -- the property ------------------------------------------------------------------


def make_call(channel: grpc.Channel, call: Call) -> grpc.StatusCode:
    """Send the call; its status code (OK for an accepted stream, read for
    a few messages and then cancelled)."""
    path = SERVICE + call.method
    try:
        if call.method == "Generate":
            generate: Any = channel.unary_stream(path)  # bytes in: no serializer
            stream: Any = generate(call.payload, timeout=20)
            for count, _ in enumerate(stream):
                if count == 3:
                    stream.cancel()
                    break
        else:
            unary: Any = channel.unary_unary(path)
            unary(call.payload, timeout=10)
    except grpc.RpcError as raised:
        error: Any = raised
        code: grpc.StatusCode = error.code()
        if code != grpc.StatusCode.CANCELLED:
            return code
    return grpc.StatusCode.OK


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(call=CALLS)
def test_hostile_calls_never_break_the_worker(fleet: Fleet, call: Call) -> None:
    code = make_call(fleet.channel, call)
    assert code not in BROKEN, f"{call.method} answered {code.name}"
    health = health_pb2_grpc.HealthStub(fleet.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_canary_was_never_failed(fleet: Fleet) -> None:
    """Runs after the fuzzing (same module, same server): every well-formed
    request the canary sent meanwhile completed."""
    deadline = time.monotonic() + 30
    while not fleet.completed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fleet.failures == []
    assert len(fleet.completed) >= 1
    assert fleet.server.server.engine.failure is None
    assert math.isfinite(fleet.server.server.engine.stats().mix.tokens_per_second)
