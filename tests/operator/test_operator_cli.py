"""`elasticfleet operator run` as a real process against the emulated API:
settings from the environment, the liveness endpoint, the handlers at work,
and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from elasticfleet.cli import build_parser

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]

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


def test_settings_come_from_flags_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["operator", "run", "--namespace", "a", "--namespace", "b"])
    assert (args.namespace, args.peering, args.standalone) == (["a", "b"], None, False)
    monkeypatch.setenv("ELASTICFLEET_NAMESPACES", "x,y")
    monkeypatch.setenv("ELASTICFLEET_PEERING", "elasticfleet")
    args = build_parser().parse_args(["operator", "run"])
    assert (args.namespace, args.peering) == (["x", "y"], "elasticfleet")


def test_run_serves_liveness_and_stops_on_sigterm(cluster: EmulatedCluster) -> None:
    liveness = f"http://127.0.0.1:{_free_port()}/healthz"
    env = {**os.environ, "ELASTICFLEET_LIVENESS": liveness}
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
        fleet = yaml.safe_load(EXAMPLE.read_text())
        cluster.call("POST", "/apis/elasticfleet.io/v1alpha1/namespaces/ns/elasticfleets", fleet)
        while not cluster.objects("apps/v1/deployments"):
            assert time.monotonic() < deadline, "no Deployment"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
