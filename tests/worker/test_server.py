"""The gRPC server on 127.0.0.1 with the tiny model: streaming, status codes,
deadlines and cancellation, health and reflection, bearer token, TLS,
metrics, statistics and graceful drain."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import LARGE_BUDGET, FakeAdapters, SlowSteps, make_engine
from tokenizers import Tokenizer
from waiting import wait_for

from elasticfleet.worker.adapters.interface import AdapterRequest
from elasticfleet.worker.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from elasticfleet.worker.model.accounting import account
from elasticfleet.worker.model.generation import TOKENIZER_FILE, SamplingParams, TextGenerator
from elasticfleet.worker.model.llama import ElasticLlama
from elasticfleet.worker.model.memory import predict_memory
from elasticfleet.worker.model.plan import DROPPED, FULL, INT4, INT8, PruningPlan
from elasticfleet.worker.serving.client import AsyncWorkerClient, WorkerClient, generate_request
from elasticfleet.worker.serving.plans import level_fields, plan_from_fields
from elasticfleet.worker.serving.proto_gen import worker_pb2 as pb
from elasticfleet.worker.serving.server import BackgroundServer, ServerOptions, status_code
from elasticfleet.worker.serving.telemetry import SimulatedDevice

# Fixtures: served_model_dir, one_thread, engine, reference_tokens.
pytest_plugins = ["serving_fixtures"]


@pytest.fixture
def server(served_model_dir: Path, one_thread: None) -> Iterator[BackgroundServer]:
    running = BackgroundServer(make_engine(served_model_dir), ServerOptions(model_name="tiny"))
    yield running
    running.stop()


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[WorkerClient]:
    with WorkerClient(f"127.0.0.1:{server.port}") as client:
        yield client


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value  # a grpc.Call as well as an RpcError
    code: grpc.StatusCode = error.code()
    return code


def test_generate_streams_what_the_model_generates(
    client: WorkerClient, served_model_dir: Path
) -> None:
    request = generate_request("hello world", max_new_tokens=10, ignore_eos=True, request_id="r1")
    result = client.complete(request, timeout=30)
    generator = TextGenerator(
        ElasticLlama.from_pretrained(served_model_dir, packed=False),
        Tokenizer.from_file(str(served_model_dir / TOKENIZER_FILE)),
    )
    (alone,) = generator.generate(
        ["hello world"], SamplingParams(max_new_tokens=10, ignore_eos=True)
    )
    assert result.token_ids == alone.token_ids
    assert result.text == alone.text
    assert result.finish_reason == "length"
    assert result.request_id == "r1"
    assert result.prompt_tokens == len("hello world")
    assert len(result.messages) == 10
    assert result.messages[-1].completion_tokens == 10
    assert {m.plan_id for m in result.messages} == {"initial"}


def test_the_chat_template_and_sampling_reach_the_engine(client: WorkerClient) -> None:
    def sample(seed: int) -> list[int]:
        request = generate_request(
            "hi", max_new_tokens=8, temperature=1.0, seed=seed, ignore_eos=True, chat_template=True
        )
        result = client.complete(request, timeout=30)
        assert result.prompt_tokens > 50  # the template's system prompt
        return result.token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("x"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (DataLoss("x"), grpc.StatusCode.DATA_LOSS),
        (RuntimeError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_code_mapping(error: Exception, code: grpc.StatusCode) -> None:
    assert status_code(error) == code


def test_bad_requests_get_invalid_argument_with_a_reason(client: WorkerClient) -> None:
    cases = [
        (generate_request(""), "prompt is empty"),
        (generate_request("x" * 300), "context is 256"),
        (generate_request("hi", temperature=-1.0), "temperature must be between 0 and 100"),
        (generate_request("hi", temperature=1e-30), "a positive one at least 0.001"),
        (generate_request("hi", top_p=1.5), "top_p must be in (0, 1]"),
        (generate_request("hi", max_new_tokens=2_000_000), "max_new_tokens must be between"),
        (generate_request("hi", stop=[""]), "stop strings must not be empty"),
    ]
    for request, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            client.complete(request, timeout=10)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in error.details()
    no_head = generate_request("hi")
    no_head.adapter.name = "code"
    assert code_of(lambda: client.complete(no_head)) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        code_of(lambda: client.complete(generate_request("hi", adapter="code", task="qa")))
        == grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: client.apply_plan("p", [True] * 3)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.load_adapter("code")) == grpc.StatusCode.FAILED_PRECONDITION
    assert list(client.list_adapters().adapters) == []


def test_message_sizes_are_bounded(server: BackgroundServer) -> None:
    options = [("grpc.max_send_message_length", 16 * 2**20)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        generate = channel.unary_stream(
            "/elasticfleet.v1.Worker/Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        huge = pb.GenerateRequest(prompt="x" * (5 * 2**20))
        with pytest.raises(grpc.RpcError) as caught:
            list(generate(huge, timeout=30))
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_unexpected_error_is_internal_and_logged(
    server: BackgroundServer, client: WorkerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(server.server.engine, "stats", broken)
    with pytest.raises(grpc.RpcError) as caught:
        client.get_stats()
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in error.details() and "secret" not in error.details()


def test_plans_apply_and_stats_agree_with_the_accountant(
    server: BackgroundServer, client: WorkerClient
) -> None:
    engine = server.server.engine
    layers = engine.model.config.num_hidden_layers
    plan = PruningPlan.from_dropped(layers, attention=[1], ffn=[0, 3])
    response = client.apply_plan("p-7", plan.to_mask(), budget_bytes=LARGE_BUDGET // 2)
    assert response.plan_id == "p-7" and response.kept_blocks == plan.kept_blocks
    assert response.bytes_after < response.bytes_before
    stats = client.get_stats()
    assert stats.plan_id == "p-7" and list(stats.keep_mask) == plan.to_mask()
    assert stats.model == "tiny"
    measured = account(engine.model)
    assert stats.memory.weight_bytes == measured.weight_bytes == response.bytes_after
    assert stats.memory.weight_bytes == predict_memory(engine.model.config, plan, 0, 0).weight_bytes
    assert stats.memory.budget_bytes == LARGE_BUDGET // 2
    assert stats.device.total_bytes > 0 and stats.device.free_bytes > 0
    if stats.device.source == pb.MEMORY_SOURCE_HOST:
        assert "NVML" in stats.device.detail
    else:
        assert stats.device.source == pb.MEMORY_SOURCE_NVML
    result = client.complete(generate_request("abc", max_new_tokens=4, ignore_eos=True))
    assert {m.plan_id for m in result.messages} == {"p-7"}
    stats = client.get_stats()
    assert stats.mix.finished_requests == 1
    assert stats.mix.output_tokens.counts[0] == 1  # 4 tokens: the first bucket
    assert stats.tokens_per_second > 0


def test_levels_travel_over_grpc_and_a_keep_mask_still_means_full_or_dropped(
    server: BackgroundServer, client: WorkerClient
) -> None:
    engine = server.server.engine
    plan = PruningPlan.from_levels([INT8, INT4, DROPPED, FULL, INT4, INT8, FULL, INT8])
    levels, kv_levels = level_fields(plan)
    answer = client.apply_plan("q-1", plan.to_mask(), levels=levels, kv_levels=kv_levels)
    assert answer.kept_blocks == 7
    stats = client.get_stats()
    assert plan_from_fields(stats.keep_mask, stats.levels, stats.kv_levels) == plan
    assert engine.model.plan == plan
    assert stats.memory.weight_bytes == predict_memory(engine.model.config, plan, 0, 0).weight_bytes
    result = client.complete(generate_request("abc", max_new_tokens=3, ignore_eos=True))
    assert {m.plan_id for m in result.messages} == {"q-1"}
    # An old client's keep-mask: every kept block back at full, bit for bit.
    client.apply_plan("mask", [True] * 8)
    stats = client.get_stats()
    assert list(stats.levels) == [] and engine.model.plan == PruningPlan.dense(4)
    # Malformed levels are refused and change nothing.
    for bad in (
        lambda: client.apply_plan("x", [True] * 8, levels=[pb.BLOCK_LEVEL_INT8] * 6),
        lambda: client.apply_plan("x", [False] + [True] * 7, levels=[pb.BLOCK_LEVEL_INT8] * 8),
        lambda: client.apply_plan("x", [], levels=[pb.BLOCK_LEVEL_UNSPECIFIED] * 8),
        lambda: client.apply_plan("x", [True] * 8, kv_levels=[pb.KV_LEVEL_INT8] * 4),
    ):
        assert code_of(bad) == grpc.StatusCode.INVALID_ARGUMENT
    assert client.get_stats().plan_id == "mask"


def test_a_deadline_cancels_the_request_in_the_engine(
    server: BackgroundServer, client: WorkerClient
) -> None:
    engine = server.server.engine
    slow = SlowSteps(engine, 0.05)
    request = generate_request("abc", max_new_tokens=200, ignore_eos=True)
    assert code_of(lambda: client.complete(request, timeout=0.3)) == (
        grpc.StatusCode.DEADLINE_EXCEEDED
    )
    wait_for("the engine idle", engine.idle, 10, interval=0.01)
    assert engine.counters.requests_cancelled == 1
    assert engine.stats().picture.kv_reserved_bytes == 0
    slow.undo()


def test_a_client_cancel_frees_the_request(server: BackgroundServer, client: WorkerClient) -> None:
    engine = server.server.engine
    slow = SlowSteps(engine, 0.02)
    call: Any = client.generate(generate_request("abc", max_new_tokens=200, ignore_eos=True))
    next(call)
    call.cancel()
    wait_for("the engine idle", engine.idle, 10, interval=0.01)
    assert engine.counters.requests_cancelled == 1
    slow.undo()


def test_health_and_reflection(server: BackgroundServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "elasticfleet.v1.Worker"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"elasticfleet.v1.Worker", "grpc.health.v1.Health"} <= names


def test_metrics_are_served_with_the_prefix(served_model_dir: Path, one_thread: None) -> None:
    running = BackgroundServer(make_engine(served_model_dir), ServerOptions(metrics_port=0))
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    try:
        with WorkerClient(f"127.0.0.1:{running.port}") as client:
            client.complete(generate_request("abc", max_new_tokens=3, ignore_eos=True))
        # The last token is streamed before its decode step is timed.
        wait_for(
            "the last step timed",
            lambda: "elasticfleet_decode_step_seconds_count 2.0" in scrape(),
            10,
            interval=0.01,
        )
        text = scrape()
    finally:
        running.stop()
    assert 'elasticfleet_requests_total{outcome="finished"} 1.0' in text
    assert 'elasticfleet_tokens_total{kind="generated"} 3.0' in text
    for name in ("queue_depth", "kv_reserved_bytes", "weight_bytes", "plan_changes_total"):
        assert f"elasticfleet_{name}" in text
    assert 'elasticfleet_adapter_cache_total{result="hit"}' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        # Names carry their unit; counters render with _total; no label
        # takes a value from a request.
        assert family.name.startswith("elasticfleet_")
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= {"outcome", "kind", "result", "le"}, sample
            if family.type == "counter" and not sample.name.endswith("_created"):
                assert sample.name.endswith("_total"), sample.name

    def count(name: str) -> float:
        (total,) = [s.value for s in families[name].samples if s.name == name + "_count"]
        return total

    # One request of three tokens: its first from the prefill, two decode steps.
    for name in ("time_to_first_token", "request_duration", "queue_wait", "prefill"):
        assert count(f"elasticfleet_{name}_seconds") == 1, name
    assert count("elasticfleet_time_per_output_token_seconds") == 1
    assert count("elasticfleet_decode_step_seconds") == 2
    assert count("elasticfleet_plan_switch_seconds") == 0
    kept = {s.labels["kind"]: s.value for s in families["elasticfleet_kept_blocks"].samples}
    assert kept == {"attention": 4, "ffn": 4}


def test_a_simulated_device_reports_its_file_and_the_workers_share(
    served_model_dir: Path, one_thread: None, tmp_path: Path
) -> None:
    device = tmp_path / "device.json"
    device.write_text(json.dumps({"total_bytes": 2**30, "others_bytes": 2**20}))
    engine = make_engine(served_model_dir, device=SimulatedDevice(device))
    running = BackgroundServer(engine, ServerOptions())
    try:
        with WorkerClient(f"127.0.0.1:{running.port}") as client:
            stats = client.get_stats()
            assert stats.device.source == pb.MEMORY_SOURCE_SIMULATED
            assert stats.device.total_bytes == 2**30
            assert stats.device.used_bytes == 2**20 + stats.memory.weight_bytes
            assert stats.device.own_bytes == stats.memory.weight_bytes  # read with it
            # After a switch the device is read again, at the same moment as the memory.
            layers = engine.model.config.num_hidden_layers
            plan = PruningPlan.from_dropped(layers, ffn=[0])
            switched = client.apply_plan("small", plan.to_mask())
            own = switched.device.own_bytes
            assert own == switched.memory.weight_bytes < stats.device.own_bytes
            assert switched.device.used_bytes == 2**20 + own
            device.write_text("not json")
            with pytest.raises(grpc.RpcError) as raised:
                client.get_stats()
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "simulated device" in str(raised.value.details())
    finally:
        running.stop()


def test_the_bearer_token_is_checked_on_every_rpc_but_health(
    served_model_dir: Path, one_thread: None
) -> None:
    running = BackgroundServer(make_engine(served_model_dir), ServerOptions(token="s3cret"))
    try:
        target = f"127.0.0.1:{running.port}"
        with WorkerClient(target) as anonymous, WorkerClient(target, token="wrong") as wrong:
            assert code_of(anonymous.get_stats) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(wrong.get_stats) == grpc.StatusCode.UNAUTHENTICATED
            request = generate_request("hi", max_new_tokens=2)
            assert code_of(lambda: wrong.complete(request)) == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(anonymous.channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
        with WorkerClient(target, token="s3cret") as good:
            assert good.get_stats().model == ""
            assert good.complete(request).finish_reason in ("length", "eos")
    finally:
        running.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(served_model_dir: Path, tmp_path: Path, one_thread: None) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    options = ServerOptions(tls_cert=cert, tls_key=key)
    running = BackgroundServer(make_engine(served_model_dir), options)
    try:
        target = f"127.0.0.1:{running.port}"
        with WorkerClient(target, tls=True, root_certificates=cert.read_bytes()) as secure:
            assert secure.complete(generate_request("hi", max_new_tokens=2)).token_ids
        with WorkerClient(target) as plain:
            assert code_of(lambda: plain.get_stats(timeout=5)) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop()


def test_a_full_queue_is_resource_exhausted(served_model_dir: Path, one_thread: None) -> None:
    model = ElasticLlama.from_pretrained(served_model_dir, packed=False)
    budget = predict_memory(model.config, model.plan, 1, 64).total_bytes
    engine = make_engine(served_model_dir, budget, max_queue=1)
    slow = SlowSteps(engine, 0.02)
    running = BackgroundServer(engine, ServerOptions())
    try:
        with WorkerClient(f"127.0.0.1:{running.port}") as client:
            request = generate_request("abcd", max_new_tokens=40, ignore_eos=True)
            first: Any = client.generate(request)
            next(first)  # running: the one row the budget allows
            second: Any = client.generate(request)
            wait_for("a queued request", lambda: engine.stats().queue_depth == 1, 10, interval=0.01)
            with pytest.raises(grpc.RpcError) as caught:
                client.complete(request)
            error: Any = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "wait queue is full" in error.details()
            assert sum(1 for _ in first) == 39 and sum(1 for _ in second) == 40
    finally:
        slow.undo()
        running.stop()


def test_shutdown_drains_running_requests(served_model_dir: Path, one_thread: None) -> None:
    engine = make_engine(served_model_dir)
    slow = SlowSteps(engine, 0.01)
    running = BackgroundServer(engine, ServerOptions())
    with WorkerClient(f"127.0.0.1:{running.port}") as client:
        call: Any = client.generate(generate_request("abc", max_new_tokens=30, ignore_eos=True))
        next(call)
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        wait_for("the engine closing", lambda: engine._closing, 10, interval=0.01)
        with pytest.raises(grpc.RpcError) as caught:
            client.complete(generate_request("more", max_new_tokens=2))
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        messages = list(call)
        stopper.join()
    assert len(messages) == 29
    assert messages[-1].finish_reason == pb.FINISH_REASON_LENGTH
    slow.undo()


def test_async_client_streams_concurrently(server: BackgroundServer) -> None:
    async def run() -> Sequence[Any]:
        async with AsyncWorkerClient(f"127.0.0.1:{server.port}") as client:
            prompts = ["one", "two", "three", "four"]
            requests = [generate_request(p, max_new_tokens=6, ignore_eos=True) for p in prompts]
            results = await asyncio.gather(*(client.complete(r) for r in requests))
            stats = await client.get_stats()
            assert stats.mix.finished_requests == 4
            # Leaving a stream early cancels its request.
            async for _ in client.generate(generate_request("x", max_new_tokens=100)):
                break
            return results

    results = asyncio.run(run())
    assert [len(r.token_ids) for r in results] == [6] * 4
    engine = server.server.engine
    wait_for("the engine idle", engine.idle, 10, interval=0.01)
    assert engine.counters.requests_cancelled + engine.counters.requests_finished == 5


def test_adapter_rpcs_and_per_row_routing(served_model_dir: Path, one_thread: None) -> None:
    adapters = FakeAdapters()
    engine = make_engine(served_model_dir, adapters=adapters)
    running = BackgroundServer(engine, ServerOptions())
    try:
        with WorkerClient(f"127.0.0.1:{running.port}") as client:
            loaded = client.load_adapter("code", tasks=["qa"])
            assert loaded.cache_hit and loaded.adapter.tasks == ["qa", "py"]
            assert code_of(lambda: client.load_adapter("corrupt")) == grpc.StatusCode.DATA_LOSS
            assert code_of(lambda: client.load_adapter("remote")) == grpc.StatusCode.UNAVAILABLE
            listing = client.list_adapters()
            assert [a.name for a in listing.adapters] == ["code"]
            assert client.get_stats().memory.adapter_bytes == 1000
            bad = generate_request("hi", adapter="code", task="nope")
            assert code_of(lambda: client.complete(bad)) == grpc.StatusCode.INVALID_ARGUMENT
            task = generate_request(
                "hi", max_new_tokens=2, ignore_eos=True, adapter="code", task="qa"
            )
            router = generate_request("hi", max_new_tokens=2, ignore_eos=True, adapter="code")
            assert client.complete(task).token_ids and client.complete(router).token_ids
            assert client.unload_adapter("code").bytes_freed == 1000
    finally:
        running.stop()
    assert [AdapterRequest("code", "qa")] in adapters.batches
    assert [AdapterRequest("code", None)] in adapters.batches
    assert engine.counters.adapter_cache_hits == 1
