"""The gateway's routing and failure handling on real workers over real
sockets: the quality floor keeps requests off a worker whose plan is too
heavy, adapter affinity, one retry before the first token, the bounded
waiting queue (429 with Retry-After, 503 past the wait), a client that
disconnects cancelling the worker's request (HTTP and gRPC), the gRPC
passthrough, and what /metrics, /health and /info say."""

from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from certificates import CertificateAuthority
from fleet_helpers import (
    ADAPTER,
    GATEWAY_TOKEN,
    MODEL,
    WORKER_TOKEN,
    Fleet,
    start_workers,
    worker_args,
)
from valkey_server import TestRedisServer
from waiting import wait_for

from elasticfleet.gateway.pool import PlanRatios, PoolOptions
from elasticfleet.gateway.server import Gateway, GatewayOptions
from elasticfleet.gateway.service import RATIO_HEADER, WORKER_HEADER
from elasticfleet.gateway.sources import static_workers
from elasticfleet.worker.serving.client import WorkerClient, generate_request
from elasticfleet.worker.serving.credentials import ClientTls
from elasticfleet.worker.serving.process import WorkerProcess

pytest_plugins = ["serving_fixtures", "gateway_fixtures"]

AUTH = {"Authorization": f"Bearer {GATEWAY_TOKEN}"}


def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """POST JSON; (status, headers, parsed body) whatever the status."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {**AUTH, **(headers or {})}, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def finished(worker: WorkerProcess) -> int:
    """Requests the worker finished over its stats window."""
    with WorkerClient(worker.address, token=WORKER_TOKEN) as client:
        return int(client.get_stats().mix.finished_requests)


def worker_counter(worker: WorkerProcess, outcome: str) -> float:
    """The worker's own count of requests by outcome, from its /metrics."""
    port = worker.ready.metrics_port
    text = scrape(f"http://127.0.0.1:{port}")
    found = re.search(rf'^elasticfleet_requests_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_heavy_plan_gets_none_of_the_requests_whose_floor_it_cannot_meet(
    fleet: Fleet,
) -> None:
    heavy = fleet.ratio("heavy")
    assert fleet.ratio("good-0") == fleet.ratio("good-1") == 1.0 < heavy
    floor = (1.0 + heavy) / 2
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=GATEWAY_TOKEN, max_retries=0)

    def complete(with_floor: bool) -> str:
        extra = {"max_perplexity_ratio": floor} if with_floor else None
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt="abc", max_tokens=40, temperature=0, extra_body=extra
        )
        return raw.headers[WORKER_HEADER]

    before = finished(fleet.workers["heavy"])
    with ThreadPoolExecutor(12) as pool:
        floored = Counter(pool.map(complete, [True] * 24))
    assert set(floored) == {"good-0", "good-1"}, floored
    assert finished(fleet.workers["heavy"]) == before  # not one reached it
    # The header carries the floor for TGI's routes too.
    status, headers, _ = post(
        f"{fleet.url}/generate",
        {"inputs": "abc", "parameters": {"max_new_tokens": 2}},
        {RATIO_HEADER: f"{floor}"},
    )
    assert status == 200 and headers[WORKER_HEADER] != "heavy"
    # Without a floor the heavy worker takes its share of a burst.
    with ThreadPoolExecutor(12) as pool:
        free = Counter(pool.map(complete, [False] * 24))
    assert free["heavy"] > 0, free
    # A floor of 1.0 accepts only dense plans.
    status, headers, _ = post(
        f"{fleet.url}/v1/completions",
        {"model": MODEL, "prompt": "abc", "max_perplexity_ratio": 1.0, "max_tokens": 1},
    )
    assert status == 200 and headers[WORKER_HEADER] in ("good-0", "good-1")


def test_a_floor_no_worker_meets_waits_then_says_why(fleet: Fleet) -> None:
    heavy = fleet.workers["heavy"].address
    gateway = small_gateway(fleet, {"heavy": heavy}, max_wait_s=0.5)
    try:
        url = f"http://127.0.0.1:{gateway.port}"
        status, headers, body = post(
            f"{url}/v1/completions",
            {"model": MODEL, "prompt": "abc", "max_perplexity_ratio": 1.0, "max_tokens": 1},
        )
        assert status == 503 and body["error"]["type"] == "server_error"
        assert (
            "no worker's plan is predicted within perplexity ratio 1.00" in body["error"]["message"]
        )
        assert headers["Retry-After"] == "1"
    finally:
        fleet.loop.run(gateway.stop())


def test_adapter_requests_stay_with_the_worker_that_loaded_the_task(fleet: Fleet) -> None:
    model = f"{ADAPTER}:defs"
    workers = [
        post(f"{fleet.url}/v1/completions", {"model": model, "prompt": "x", "max_tokens": 2})[1][
            WORKER_HEADER
        ]
        for _ in range(5)
    ]
    assert len(set(workers)) == 1, workers
    metrics = scrape(fleet.url)
    assert metric(metrics, 'elasticfleet_gateway_adapter_routing_total{result="hit"}') >= 4


@pytest.fixture
def refuser(
    fleet_model: Path, redis_server: TestRedisServer, tmp_path: Path
) -> Iterator[WorkerProcess]:
    """A real worker that refuses every Generate (a wait queue of 0):
    RESOURCE_EXHAUSTED before the first token, while GetStats answers."""
    args = worker_args(fleet_model, redis_server.url, "--max-queue", "0")
    (worker,) = start_workers(tmp_path, {"refuser": args}).values()
    yield worker
    worker.stop()


def small_gateway(fleet: Fleet, workers: dict[str, str], **pool: Any) -> Gateway:
    gateway = Gateway(
        static_workers(workers),
        PlanRatios(lambda model: fleet.profile),
        GatewayOptions(model_name=MODEL, grpc_port=None, pool=PoolOptions(**pool)),
        token=lambda: GATEWAY_TOKEN,
        worker_token=lambda: WORKER_TOKEN,
    )
    fleet.loop.run(gateway.start())
    return gateway


def test_a_failure_before_the_first_token_is_retried_once_elsewhere(
    fleet: Fleet, refuser: WorkerProcess
) -> None:
    good = fleet.workers["good-0"].address
    # "a-refuser" sorts first, so an idle tie picks it.
    gateway = small_gateway(fleet, {"a-refuser": refuser.address, "good": good})
    try:
        url = f"http://127.0.0.1:{gateway.port}"
        for _ in range(3):
            status, headers, _ = post(f"{url}/generate", {"inputs": "abc"})
            assert status == 200 and headers[WORKER_HEADER] == "good"
        assert metric(scrape(url), "elasticfleet_gateway_upstream_retries_total") == 3
    finally:
        fleet.loop.run(gateway.stop())
    alone = small_gateway(fleet, {"a-refuser": refuser.address})
    try:
        status, headers, body = post(f"http://127.0.0.1:{alone.port}/generate", {"inputs": "a"})
        assert status == 429 and body["error_type"] == "overloaded"
        assert "RESOURCE_EXHAUSTED" in body["error"] and headers["Retry-After"] == "1"
    finally:
        fleet.loop.run(alone.stop())


def test_the_waiting_queue_is_bounded_and_answers_429_then_503(fleet: Fleet) -> None:
    worker = fleet.workers["good-1"].address
    gateway = small_gateway(fleet, {"w": worker}, max_streams=1, max_waiting=1, max_wait_s=1.0)
    url = f"http://127.0.0.1:{gateway.port}"
    # One open stream holds the worker's only slot until the test closes it.
    held = fleet.loop.run(gateway.service.pool.open(generate_request("abc", max_new_tokens=2)))
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, f"{url}/generate", {"inputs": "abc"})
            wait_for("a waiting request", lambda: gateway.service.pool.waiting == 1)
            assert metric(scrape(url), "elasticfleet_gateway_queue_depth") == 1
            status, headers, body = post(f"{url}/generate", {"inputs": "abc"})
            assert status == 429 and headers["Retry-After"] == "1"
            assert body["error_type"] == "overloaded" and "already wait" in body["error"]
            status, headers, body = waiting.result(30)
        assert status == 503 and "every eligible worker has 1 streams open" in body["error"]
        assert int(headers["Retry-After"]) >= 1
        # Once the slot frees, a waiting request goes ahead.
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, f"{url}/generate", {"inputs": "abc"})
            wait_for("a waiting request", lambda: gateway.service.pool.waiting == 1)
            fleet.loop.run(held.close())
            assert waiting.result(30)[0] == 200
    finally:
        fleet.loop.run(held.close())
        fleet.loop.run(gateway.stop())


def long_prompt(fleet: Fleet) -> dict[str, Any]:
    """A greedy request that runs to the tiny model's context (checked, so
    a cancelled one is certainly cut short)."""
    body = {"inputs": "abc", "parameters": {"max_new_tokens": 250}}
    status, _, answer = post(f"{fleet.url}/generate", body)
    assert status == 200 and answer["generated_text"]
    return body


def open_stream(connection: http.client.HTTPConnection, body: dict[str, Any]) -> str:
    """Start /generate_stream on `connection` and read its first event."""
    connection.request("POST", "/generate_stream", json.dumps(body), AUTH)
    response = connection.getresponse()
    assert response.status == 200, response.read()
    return response.readline().decode()


def test_a_client_that_disconnects_cancels_the_workers_request(fleet: Fleet) -> None:
    worker = fleet.workers["good-1"]
    gateway = small_gateway(fleet, {"w": worker.address})
    try:
        body = long_prompt(fleet)
        cancelled = worker_counter(worker, "cancelled")
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        assert open_stream(connection, body).startswith("data:")
        connection.close()  # the client goes away mid-stream
        wait_for("the cancel", lambda: worker_counter(worker, "cancelled") == cancelled + 1)
        wait_for("no stream", lambda: gateway.service.pool.views[0].streams == 0)
    finally:
        fleet.loop.run(gateway.stop())
    # The same over the gRPC passthrough: cancelling the call cancels upstream.
    with WorkerClient(f"127.0.0.1:{fleet.gateway.grpc_port}", token=GATEWAY_TOKEN) as client:
        before = sum(worker_counter(w, "cancelled") for w in fleet.workers.values())
        call: Any = client.generate(generate_request("abc", max_new_tokens=250, ignore_eos=True))
        next(call)
        call.cancel()
        wait_for(
            "the cancel",
            lambda: (
                sum(worker_counter(w, "cancelled") for w in fleet.workers.values()) == before + 1
            ),
        )


def test_grpc_generate_passes_through_with_the_gateways_token(fleet: Fleet) -> None:
    target = f"127.0.0.1:{fleet.gateway.grpc_port}"
    request = generate_request("abc", max_new_tokens=5, adapter=ADAPTER, task="qa")
    with WorkerClient(target, token=GATEWAY_TOKEN) as client:
        result = client.complete(request)
        assert len(result.token_ids) <= 5 and result.finish_reason in ("eos", "length")
        floor = [*client.metadata, (RATIO_HEADER, "0.5")]
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(client.stub.Generate(request, metadata=floor)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with WorkerClient(target, token="wrong") as stranger, pytest.raises(grpc.RpcError) as denied:
        stranger.complete(request)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with WorkerClient(target, token=GATEWAY_TOKEN) as client, pytest.raises(grpc.RpcError) as other:
        client.get_stats()
    assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return bytes(response.read()).decode()


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_info_and_metrics(fleet: Fleet) -> None:
    with urllib.request.urlopen(f"{fleet.url}/health", timeout=10) as health:  # no token
        assert health.status == 200
    request = urllib.request.Request(f"{fleet.url}/info", headers=AUTH)
    info = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert info["model_id"] == MODEL and info["router"] == "elasticfleet-gateway"
    ratios = {w["name"]: w["perplexity_ratio"] for w in info["workers"]}
    assert ratios["good-0"] == 1.0 < ratios["heavy"]
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{fleet.url}/info", timeout=10)
    assert denied.value.code == 401
    post(f"{fleet.url}/generate", {"inputs": "abc", "parameters": {"max_new_tokens": 2}})
    text = scrape(fleet.url)
    assert metric(text, 'elasticfleet_gateway_requests_total{code="200",route="/generate"}') >= 1
    assert metric(text, 'elasticfleet_gateway_requests_total{code="401",route="/info"}') >= 1
    assert metric(text, 'elasticfleet_gateway_time_to_first_token_seconds_count{api="tgi"}') >= 1
    assert metric(text, "elasticfleet_gateway_workers_ready") == 3
    for name in ("queue_depth", "upstream_retries_total"):
        assert f"elasticfleet_gateway_{name}" in text


def test_the_gateway_presents_its_client_certificate_to_mutual_tls_workers(
    fleet: Fleet, fleet_model: Path, redis_server: TestRedisServer, tmp_path: Path
) -> None:
    """A worker that requires client certificates (--tls-client-ca) serves
    the gateway's requests when the gateway presents one its CA signed, and
    stays unready (503 after the wait) to a gateway that presents none."""
    ca = CertificateAuthority("fleet-ca")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    cert, key = ca.write(tmp_path, "worker", ips=("127.0.0.1",))
    client = ca.write(tmp_path, "operator")
    tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca_file)]
    args = worker_args(fleet_model, redis_server.url, *tls_args)
    (worker,) = start_workers(tmp_path, {"mtls": args}).values()
    try:
        for presented, expected in ((client, 200), (None, 503)):
            tls = ClientTls.from_files(ca_file, *(presented or (None, None)))
            gateway = small_gateway(fleet, {"mtls": worker.address}, tls=tls, max_wait_s=1.0)
            try:
                status, _, body = post(f"http://127.0.0.1:{gateway.port}/generate", {"inputs": "a"})
                assert status == expected, body
            finally:
                fleet.loop.run(gateway.stop())
    finally:
        worker.stop()
