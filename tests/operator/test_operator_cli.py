"""The operator's commands: `operator run` as a real process against the
emulated API (settings from the environment, the liveness endpoint, the
handlers at work, a clean stop on SIGTERM), and `operator loop` planning a
worker over gRPC without Kubernetes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio
import pytest
import yaml
from fake_fleet import GIB, FakeWorker, fake_worker_service
from waiting import wait_for

from elasticfleet.agent.profile import DEFAULT_PROFILE, ModelProfile
from elasticfleet.cli import build_parser, main
from elasticfleet.cli.operator_commands import namespaces, peering_priority
from elasticfleet.operator.crds import render_crds
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.process import stop_process

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]

PROFILE = ModelProfile.load(DEFAULT_PROFILE)
ELASTICFLEET = str(Path(sys.executable).with_name("elasticfleet"))
EXAMPLE = Path(__file__).resolve().parents[2] / "operator" / "examples" / "elasticfleet.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _alive(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


# Runs the command line with torch made unimportable (None in sys.modules).
_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from elasticfleet.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [["operator", "crds"], ["operator", "run", "--help"]])
def test_printing_operator_commands_start_without_torch(args: list[str]) -> None:
    """Commands that only print must not load torch: printing the CRDs is how
    they are installed, and a --help answers in well under a second."""
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_settings_come_from_flags_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTICFLEET_NAMESPACES", "x,y")
    args = build_parser().parse_args(["operator", "run", "--namespace", "a", "--namespace", "b"])
    assert (namespaces(args), args.peering, args.standalone) == (["a", "b"], None, False)
    monkeypatch.setenv("ELASTICFLEET_PEERING", "elasticfleet")
    args = build_parser().parse_args(["operator", "run"])
    assert (namespaces(args), args.peering) == (["x", "y"], "elasticfleet")


def test_the_peering_priority_comes_from_the_flag_the_environment_or_chance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ELASTICFLEET_PRIORITY", raising=False)
    parse = build_parser().parse_args
    assert peering_priority(parse(["operator", "run", "--priority", "7"]), False) == 7
    assert peering_priority(parse(["operator", "run"]), True) == 0  # standalone
    # Replicas of one Deployment share their settings but must not tie.
    drawn = {
        peering_priority(parse(["operator", "run", "--peering", "p"]), False) for _ in range(5)
    }
    assert len(drawn) == 5 and all(0 < p < 2**31 for p in drawn)
    monkeypatch.setenv("ELASTICFLEET_PRIORITY", "42")
    assert peering_priority(parse(["operator", "run"]), False) == 42
    monkeypatch.setenv("ELASTICFLEET_PRIORITY", "high")
    with pytest.raises(ValueError, match="ELASTICFLEET_PRIORITY must be an integer, got 'high'"):
        peering_priority(parse(["operator", "run"]), False)
    assert main(["operator", "run"]) == 2


class OperatorProcess:
    """`elasticfleet operator run ARGS` against the emulated API, its log in a file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [ELASTICFLEET, "operator", "run", "--log-format", "plain", *args],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def logged(self, text: str) -> int:
        """How often `text` is in the log so far."""
        assert self.process.poll() is None, self.log.read_text()
        return self.log.read_text().count(text)

    def stop(self) -> int:
        return stop_process(self.process)


def test_one_replica_is_active_and_another_takes_over(
    cluster: EmulatedCluster, tmp_path: Path
) -> None:
    """Two replicas meet at the peering object that `operator crds --peering`
    prints: the one with the higher priority works, the other pauses and
    resumes when it leaves."""
    for document in yaml.safe_load_all(render_crds("elasticfleet")):
        if document["kind"] == "CustomResourceDefinition":
            path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        else:
            path = "/apis/kopf.dev/v1/clusterkopfpeerings"
        cluster.call("POST", path, document)
    fleets = "/apis/elasticfleet.io/v1alpha1/namespaces/ns/elasticfleets"

    def peers() -> dict[str, Any]:
        (peering,) = cluster.objects("kopf.dev/v1/clusterkopfpeerings")
        return dict(peering.get("status") or {})

    def served(name: str) -> bool:
        fleet = yaml.safe_load(EXAMPLE.read_text())
        fleet["metadata"]["name"] = name
        cluster.call("POST", fleets, fleet)
        return wait_for(
            f"the Deployment of {name}",
            lambda: any(
                d["metadata"]["name"] == f"{name}-worker"
                for d in cluster.objects("apps/v1/deployments")
            ),
            30,
        )

    peering = ("--peering", "elasticfleet")
    created = "Creation is processed"  # kopf's line for each fleet a replica handled
    low = OperatorProcess(tmp_path / "low.log", *peering, "--priority", "10")
    high: OperatorProcess | None = None
    try:
        wait_for("the first replica among the peers", lambda: len(peers()) == 1, 60)
        assert served("first")
        wait_for("the first replica's handling", lambda: low.logged(created) == 1)
        high = OperatorProcess(tmp_path / "high.log", *peering, "--priority", "20")
        wait_for("the second replica among the peers", lambda: len(peers()) == 2, 60)
        assert sorted(p["priority"] for p in peers().values()) == [10, 20]
        wait_for("the first to pause", lambda: low.logged("Pausing operations in favour of"))
        # The second replica handles the new fleet; the paused one leaves it alone.
        assert served("second")
        wait_for("the second replica's handling", lambda: high.logged(created) == 1)
        assert low.logged(created) == 1 and not high.logged("Pausing operations")
        assert high.stop() == 0
        wait_for("the first to resume", lambda: low.logged("Resuming operations"), 30)
        assert len(peers()) == 1
        assert served("third")
        wait_for("the first replica's handling again", lambda: low.logged(created) == 2)
    finally:
        for replica in (high, low):
            if replica is not None:
                replica.stop()
    assert low.process.returncode == 0, low.log.read_text()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        return str(response.read().decode())


def test_run_serves_liveness_and_metrics_and_stops_on_sigterm(cluster: EmulatedCluster) -> None:
    liveness = f"http://127.0.0.1:{_free_port()}/healthz"
    metrics_port = _free_port()
    env = {
        **os.environ,
        "ELASTICFLEET_LIVENESS": liveness,
        "ELASTICFLEET_METRICS_PORT": str(metrics_port),
    }
    process = subprocess.Popen(
        [ELASTICFLEET, "operator", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _alive(liveness):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "no liveness endpoint"
            time.sleep(0.2)
        # The metrics server starts before kopf does: it is up by now.
        assert "process_resident_memory_bytes" in _scrape(metrics_port)
        fleet = yaml.safe_load(EXAMPLE.read_text())
        cluster.call("POST", "/apis/elasticfleet.io/v1alpha1/namespaces/ns/elasticfleets", fleet)
        while not cluster.objects("apps/v1/deployments"):
            assert time.monotonic() < deadline, "no Deployment"
            time.sleep(0.2)
        # The control loop's own metrics, once it ticks over the fleet.
        name = fleet["metadata"]["name"]
        ticked = (
            f'elasticfleet_operator_tick_duration_seconds_count{{fleet="{name}",namespace="ns"}}'
        )
        while ticked not in _scrape(metrics_port):
            assert time.monotonic() < deadline, "no tick in the operator's metrics"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_loop_plans_workers_without_kubernetes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    worker = FakeWorker(PROFILE, others_bytes=int(3.2 * GIB))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(handlers=[fake_worker_service(worker)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    fleet = yaml.safe_load(EXAMPLE.read_text())
    fleet["spec"]["memoryPolicy"] = {"policy": "greedy", "budget": {"fraction": 0.5}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    try:
        command = ["operator", "loop", str(path), "--worker", f"w0=127.0.0.1:{port}"]
        assert main([*command, "--ticks", "2", "--interval", "0"]) == 0
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    out, err = capsys.readouterr()
    status = yaml.safe_load(out)["status"]
    (entry,) = status["workers"]
    assert entry["plan"]["id"] == worker.plan_id and worker.plan != PruningPlan.dense(
        PROFILE.config.num_hidden_layers
    )
    assert entry["adapters"][0]["name"] == "tasks"
    assert err.count("Normal PlanChanged: w0:") == 1  # the second tick changes nothing


def test_loop_rejects_a_bad_worker_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "loop", "f.yaml", "--worker", "127.0.0.1:1"])
    assert "expected NAME=HOST:PORT" in capsys.readouterr().err
