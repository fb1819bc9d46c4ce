"""The gRPC server under bad luck and hostile clients, on 127.0.0.1 with the
tiny model: callers that give up on plans, an engine thread that dies, long
prompts, undecodable bytes, oversized identifiers, a rotated token file,
the metrics endpoint's paths and host, and broken TLS files."""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import SlowSteps, certificate_pairs, make_engine
from waiting import wait_for

from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import BLOCK_TOKENS, predict_memory
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.client import WorkerClient, generate_request, plan_request
from elasticfleet.worker.serving.engine import MAX_PROMPT_BYTES, Engine
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions, server_tls

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def failure(call: Any) -> Any:
    """The grpc.RpcError (a grpc.Call too) that `call()` raises."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def health_of(target: str, timeout: float = 5.0) -> Any:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


@pytest.fixture
def server(served_model_dir: Path, one_thread: None) -> Iterator[BackgroundServer]:
    running = BackgroundServer(make_engine(served_model_dir), ServerOptions())
    yield running
    running.stop()


@pytest.fixture
def target(server: BackgroundServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.mark.usefixtures("one_thread")
def test_a_squeeze_over_grpc_preempts_and_every_stream_completes(served_model_dir: Path) -> None:
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    # Scratch and two blocks of 16 positions under the dense plan.
    budget = predict_memory(model.config, model.plan, 3, BLOCK_TOKENS).total_bytes
    engine = make_engine(served_model_dir, budget, max_queue=8, prefill_group=4)
    layers = model.config.num_hidden_layers
    small = PruningPlan.from_dropped(layers, attention=[0, 1, 2]).to_mask()
    dense = PruningPlan.dense(layers).to_mask()
    # Slow enough that the streams (12 tokens: about 5 s) outlast every step
    # below even when a loaded machine stalls this process for a second or two.
    slow = SlowSteps(engine, 0.4)
    running = BackgroundServer(engine, ServerOptions())
    target = f"127.0.0.1:{running.port}"
    try:
        with WorkerClient(target) as client:
            client.apply_plan("small", small, timeout=30)
            request = generate_request("abcd", max_new_tokens=12, ignore_eos=True)
            streams: list[Any] = [client.generate(request, timeout=60) for _ in range(4)]
            for stream in streams:
                next(stream)
            wait_for("4 running", lambda: engine.stats().picture.active_sequences == 4, 10, 0.02)
            # A caller that cancels before its plan's step withdraws it.
            call = client.stub.ApplyPlan.future(
                plan_request("dense-left", dense), metadata=client.metadata
            )
            call.cancel()
            # Dense blocks are four times larger: only two of the four fit.
            squeeze = client.apply_plan("dense", dense, timeout=30)
            assert squeeze.plan_id == "dense" and squeeze.preempted == 2
            assert squeeze.memory.kv_blocks_reserved <= 3
            assert all(len(list(s)) == 11 for s in streams)  # the preempted ones resumed
            assert health_of(target) == SERVING
            after = client.complete(generate_request("after", max_new_tokens=3), timeout=30)
            assert after.finish_reason in ("length", "eos")
            assert engine.counters.requests_failed == 0 and engine.failure is None
    finally:
        slow.undo()
        running.stop()


def test_an_engine_that_dies_turns_not_serving_and_fails_fast(
    server: BackgroundServer, target: str
) -> None:
    engine = server.server.engine

    def broken() -> int:
        raise RuntimeError("admission bug")

    engine._admit = broken  # type: ignore[method-assign]
    with WorkerClient(target) as client:
        request = generate_request("hi", max_new_tokens=3)
        first = failure(lambda: client.complete(request, timeout=10))
        assert first.code() == grpc.StatusCode.UNAVAILABLE
        wait_for("health NOT_SERVING", lambda: health_of(target) == NOT_SERVING, 10, 0.02)
        started = time.monotonic()
        calls = [
            lambda: client.complete(request, timeout=10),
            lambda: client.apply_plan("p", engine.model.plan.to_mask(), timeout=10),
            lambda: client.get_stats(timeout=10),
        ]
        for call in calls:
            assert failure(call).code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5  # not their deadlines


class SlowTokenizer:
    """The engine's tokenizer, taking `seconds` per prompt (a multi-megabyte
    one would): tokenizing on the event loop would stall everything else."""

    def __init__(self, engine: Engine, seconds: float) -> None:
        self.inner = engine.tokenizer
        self.seconds = seconds
        self.started = threading.Event()

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> Any:
        self.started.set()
        time.sleep(self.seconds)
        return self.inner.encode_batch(texts, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_health_answers_while_a_long_prompt_is_tokenized(
    server: BackgroundServer, target: str
) -> None:
    engine = server.server.engine
    slow = SlowTokenizer(engine, 3.0)
    engine.tokenizer = slow  # type: ignore[assignment]
    results: list[Any] = []
    with WorkerClient(target) as client:
        request = generate_request("a long prompt", max_new_tokens=2, ignore_eos=True)
        worker = threading.Thread(target=lambda: results.append(client.complete(request)))
        worker.start()
        assert slow.started.wait(10)
        started = time.monotonic()
        assert health_of(target, timeout=2.0) == SERVING
        assert client.list_adapters(timeout=2.0).adapters == []
        assert time.monotonic() - started < 1.5  # while the prompt is still being tokenized
        worker.join(30)
    assert len(results[0].token_ids) == 2


def test_an_oversized_prompt_is_refused_before_tokenizing(target: str) -> None:
    with WorkerClient(target) as client:
        huge = generate_request("x" * (MAX_PROMPT_BYTES + 1))
        error = failure(lambda: client.complete(huge, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"longer than {MAX_PROMPT_BYTES} bytes" in error.details()


METHODS = ("Generate", "ApplyPlan", "GetStats", "LoadAdapter", "UnloadAdapter", "ListAdapters")
# Field 1 as a string of invalid UTF-8 (proto3 refuses it) in each message
# whose field 1 is a string; Generate's prompt is field 2.
INVALID_UTF8 = {
    "Generate": b"\x12\x02\xff\xfe",
    "ApplyPlan": b"\x0a\x02\xff\xfe",
    "LoadAdapter": b"\x0a\x02\xff\xfe",
    "UnloadAdapter": b"\x0a\x02\xff\xfe",
}
CASES = [
    *((method, b"\xff\xff\xff\xff") for method in METHODS),  # an unterminated tag
    *((method, b"\x0a\x80\x80\x80\x80\x10") for method in METHODS),  # a length past the end
    *INVALID_UTF8.items(),
]


@pytest.mark.parametrize(("method", "payload"), CASES)
def test_undecodable_request_bytes_are_invalid_argument(
    target: str, method: str, payload: bytes
) -> None:
    path = f"/elasticfleet.v1.Worker/{method}"
    with grpc.insecure_channel(target) as channel:
        if method == "Generate":
            stream: Any = channel.unary_stream(path)
            error = failure(lambda: list(stream(payload, timeout=10)))
        else:
            unary: Any = channel.unary_unary(path)
            error = failure(lambda: unary(payload, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # was UNKNOWN
    assert "are not a valid" in error.details()


def test_identifiers_are_bounded_at_the_api(target: str) -> None:
    huge = "n" * 10_000
    with WorkerClient(target) as client:
        mask = list(client.get_stats().keep_mask)
        cases: dict[str, Any] = {
            "plan_id": lambda: client.apply_plan("p" * 2**20, mask, timeout=10),
            "request_id": lambda: client.complete(generate_request("hi", request_id=huge)),
            "adapter.name": lambda: client.complete(generate_request("hi", adapter=huge)),
            "adapter.task": lambda: client.complete(generate_request("hi", adapter="a", task=huge)),
            "name": lambda: client.load_adapter(huge),
            "version": lambda: client.load_adapter("a", version=huge),
            "task": lambda: client.load_adapter("a", tasks=[huge]),
        }
        cases["unload name"] = lambda: client.unload_adapter(huge)
        for field, call in cases.items():
            error = failure(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert field.split()[-1] in error.details() and len(error.details()) < 200, field
        stats = client.get_stats(timeout=10)  # used to fail after a megabyte plan id
        assert stats.plan_id == "initial"


def write_replacing(path: Path, text: str) -> None:
    """Replace `path` the way a Secret volume update does: a new file
    renamed over the old one (a new inode)."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def test_a_rotated_token_file_is_in_force_without_a_restart(
    served_model_dir: Path, one_thread: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("one\n")
    options = ServerOptions(token_file=token_file, token_check_interval_s=0.0)
    running = BackgroundServer(make_engine(served_model_dir), options)
    target = f"127.0.0.1:{running.port}"
    try:
        with WorkerClient(target, token="one") as one, WorkerClient(target, token="two") as two:
            one.get_stats()
            assert failure(two.get_stats).code() == grpc.StatusCode.UNAUTHENTICATED
            write_replacing(token_file, "two\n")
            assert failure(one.get_stats).code() == grpc.StatusCode.UNAUTHENTICATED
            two.get_stats()
            with caplog.at_level(logging.WARNING):
                write_replacing(token_file, "  \n")  # emptied: keeps the last good token
                two.get_stats()
                two.get_stats()
            warnings = [r for r in caplog.records if "keeping the previous token" in r.message]
            assert len(warnings) == 1  # once per change, not per call
            token_file.unlink()  # gone: the same
            two.get_stats()
            token_file.write_text("three")  # rewritten in place
            assert failure(two.get_stats).code() == grpc.StatusCode.UNAUTHENTICATED
        with WorkerClient(target, token="three") as three:
            three.get_stats()
    finally:
        running.stop()


def test_an_empty_token_file_is_refused_at_start(
    served_model_dir: Path, one_thread: None, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(" \n")
    with pytest.raises(ValueError, match=r"empty .* would turn authentication off"):
        BackgroundServer(make_engine(served_model_dir), ServerOptions(token_file=token_file))


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_metrics_answer_at_metrics_only_and_on_their_own_host(
    served_model_dir: Path, one_thread: None
) -> None:
    options = ServerOptions(metrics_port=0, metrics_host="127.0.0.2")
    running = BackgroundServer(make_engine(served_model_dir), options)
    try:
        base = f"http://127.0.0.2:{running.metrics_port}"
        assert http_status(f"{base}/metrics") == 200
        assert http_status(f"{base}/metrics?name[]=elasticfleet_budget_bytes") == 200
        for path in ("/", "/metrics/x", "/other", "/favicon.ico"):
            assert http_status(base + path) == 404, path
        with pytest.raises(urllib.error.URLError):  # not on the gRPC host
            urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5)
    finally:
        running.stop()


def test_tls_misconfiguration_is_one_clear_line(tmp_path: Path) -> None:
    (cert_a, key_a), (_, key_b) = certificate_pairs(tmp_path)
    assert server_tls(cert_a, key_a) is not None and server_tls(None, None) is None
    missing = tmp_path / "absent.pem"
    cases = [
        ((cert_a, missing), f"TLS key {missing}: No such file or directory"),
        ((missing, key_a), f"TLS certificate {missing}: No such file or directory"),
        ((cert_a, key_b), "are not a usable pair (KEY_VALUES_MISMATCH)"),
        ((key_a, cert_a), "are not a usable pair"),
        ((cert_a, None), "TLS needs both a certificate and a key file"),
    ]
    for (cert, key), message in cases:
        with pytest.raises(ValueError) as raised:
            server_tls(cert, key)
        assert message in str(raised.value) and "\n" not in str(raised.value)
