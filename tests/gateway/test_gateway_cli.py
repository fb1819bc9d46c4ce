"""`elasticfleet gateway` as people and the operator run it: a process in
front of a real worker, its tokens from files, stopped by SIGTERM; its
argument errors; how it reads workers from a fleet's status."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_helpers import GATEWAY_TOKEN, MODEL, WORKER_TOKEN, start_workers, worker_args
from valkey_server import TestRedisServer, free_port

from elasticfleet.cli import main
from elasticfleet.cli.gateway_commands import workers_from_fleet
from elasticfleet.gateway.sources import dns_workers, parse_worker_flag
from elasticfleet.worker.serving.process import WorkerProcess

pytest_plugins = ["serving_fixtures", "gateway_fixtures"]


@pytest.fixture
def worker(
    fleet_model: Path, redis_server: TestRedisServer, tmp_path: Path
) -> Iterator[WorkerProcess]:
    (started,) = start_workers(tmp_path, {"w": worker_args(fleet_model, redis_server.url)}).values()
    yield started
    started.stop()


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def test_the_command_serves_a_worker_until_sigterm(
    worker: WorkerProcess, fleet_profile: Path, tmp_path: Path
) -> None:
    (tmp_path / "gateway.token").write_text(GATEWAY_TOKEN + "\n")
    (tmp_path / "worker.token").write_text(WORKER_TOKEN)
    port = free_port()
    command = [
        sys.executable, "-m", "elasticfleet.cli", "gateway", "--port", str(port),
        "--grpc-port", "-1", "--worker", f"w={worker.address}",
        "--token-file", str(tmp_path / "gateway.token"),
        "--worker-token-file", str(tmp_path / "worker.token"),
    ]  # fmt: skip
    env = {**os.environ, "ELASTICFLEET_PROFILES": str(fleet_profile.parent)}
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(command, stderr=log, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while get(f"{url}/health")[0] != 200:
            assert process.poll() is None, (tmp_path / "gateway.log").read_text()
            assert time.monotonic() < deadline, "the gateway did not become healthy"
            time.sleep(0.1)
        status, body = get(f"{url}/info", GATEWAY_TOKEN)
        info = json.loads(body)
        assert status == 200 and info["model_id"] == MODEL
        # The profile came from $ELASTICFLEET_PROFILES: a dense plan is 1.0.
        assert info["workers"][0]["perplexity_ratio"] == 1.0
        assert get(f"{url}/info")[0] == 401
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert f"listening on http://127.0.0.1:{port}" in (tmp_path / "gateway.log").read_text()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ([], "give the workers one way"),
        (["--worker", "a=h:1", "--fleet", "f"], "give the workers one way"),
        (["--worker", "nonsense"], "expected NAME=HOST:PORT"),
        (["--workers-dns", "service"], "expected HOST:PORT"),
        (["--worker", "a=h:1", "--refresh-seconds", "2"], "at most a second old"),
    ],
)
def test_argument_errors_exit_2_saying_what_to_fix(
    args: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["gateway", *args]) == 2
    assert words in capsys.readouterr().err


def test_worker_flags_parse() -> None:
    assert parse_worker_flag("w=10.0.0.1:50051") == ("w", "10.0.0.1:50051")
    assert parse_worker_flag("h:1") == ("h:1", "h:1")
    assert parse_worker_flag("v6=[::1]:50051") == ("v6", "[::1]:50051")


def test_workers_come_from_the_fleets_status() -> None:
    fleet = {
        "status": {
            "workers": [
                {"pod": "f-worker-a", "address": "10.0.0.1:50051", "reachable": True},
                {"pod": "f-worker-b", "address": "10.0.0.2:50051", "reachable": False},
                {"pod": "f-worker-c"},  # not yet reached: no address
            ]
        }
    }
    assert workers_from_fleet(fleet) == {
        "f-worker-a": "10.0.0.1:50051",
        "f-worker-b": "10.0.0.2:50051",
    }
    assert workers_from_fleet({"status": {}}) == {} == workers_from_fleet(None)


def test_a_dns_name_yields_every_address_it_resolves_to() -> None:
    """What the operator's deployment uses: the headless worker Service's
    name resolves to each ready pod (here: localhost's addresses)."""
    workers = asyncio.run(dns_workers("localhost", 50051).fetch())
    assert workers.get("127.0.0.1") == "127.0.0.1:50051"
    assert all(address.endswith(":50051") for address in workers.values())
    assert asyncio.run(dns_workers("no-such-name.invalid", 1).fetch()) == {}
