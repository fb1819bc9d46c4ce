"""The chart as Kubernetes and Helm see it, offline: `helm lint --strict`
with every ci values file, the rendered objects valid for Kubernetes 1.30
and 1.35 (kubernetes-validate, strict), the custom resources (the example
fleets and adapter sets, the one NOTES.txt suggests, the peering objects)
valid against the CRDs the chart renders, the values schema refusing typos
and wrong types, yamllint, monitors only where their API is, and
`helm package`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_check import validation_errors
from helm_chart import (
    CHART,
    CI_VALUES,
    MONITORING,
    ROOT,
    find,
    helm,
    one,
    render,
    render_text,
    requires_helm,
    template_args,
)

pytestmark = requires_helm

KUBERNETES_VALIDATE = str(Path(sys.executable).with_name("kubernetes-validate"))
YAMLLINT = str(Path(sys.executable).with_name("yamllint"))
EXAMPLES = ROOT / "operator" / "examples"
# Kinds kubernetes-validate has no schema for: checked against their CRDs
# below (kopf.dev) or, for the Prometheus Operator's, by test_monitors_* and
# tests/chart/test_chart_observability.py.
CUSTOM_KINDS = {
    "ClusterKopfPeering",
    "KopfPeering",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
}


def test_ci_values_cover_the_scenarios() -> None:
    assert [p.name for p in CI_VALUES] == [
        "default-values.yaml",
        "external-redis-values.yaml",
        "monitors-values.yaml",
        "namespaced-rbac-values.yaml",
        "peering-values.yaml",
    ]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_is_clean(values: Path) -> None:
    done = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("kube_version", ["1.30", "1.35"])
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_objects_are_valid_kubernetes(
    values: Path, kube_version: str, tmp_path: Path
) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(
        render_text(values=[values], api_versions=[MONITORING], kube_version=f"{kube_version}.0")
    )
    done = subprocess.run(
        [KUBERNETES_VALIDATE, "--strict", "-k", f"{kube_version}.0", str(rendered)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = done.stdout + done.stderr
    # kubernetes-validate exits 0 when it could not validate at all.
    assert done.returncode == 0 and "could not be validated" not in output, output
    passed = re.findall(r"^INFO .* passed for resource", output, flags=re.M)
    skipped = re.findall(r"^WARN .* Couldn't find schema for kind (\w+) ", output, flags=re.M)
    assert set(skipped) <= CUSTOM_KINDS, output
    documents = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    assert len(passed) + len(skipped) == len(documents), output


def test_the_chart_refuses_an_older_kubernetes() -> None:
    done = helm(*template_args(kube_version="1.29.0"), check=False)
    assert done.returncode != 0 and "kubeVersion" in done.stderr


def _crds(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        crd["spec"]["names"]["kind"]: crd for crd in find(documents, "CustomResourceDefinition")
    }


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_valid_against_the_rendered_crds(name: str) -> None:
    crds = _crds(render())
    example = yaml.safe_load((EXAMPLES / name).read_text())
    assert validation_errors(crds[example["kind"]], example) == []
    # A broken one is refused (CEL rules and schema both run).
    broken = yaml.safe_load((EXAMPLES / name).read_text())
    if broken["kind"] == "ElasticFleet":
        broken["spec"]["memoryPolicy"]["budget"] = {"fraction": 0.5, "bytes": 1}
    else:
        broken["spec"]["tasks"] = []
    assert validation_errors(crds[broken["kind"]], broken)


def test_the_fleet_notes_suggest_is_valid() -> None:
    done = helm("install", "ef", str(CHART), "--namespace", "elasticfleet", "--dry-run=client")
    notes = done.stdout[done.stdout.index("NOTES:") :]
    (manifest,) = re.findall(r"<<'YAML'\n(.*?)\nYAML\n", notes, flags=re.S)
    fleet = yaml.safe_load(manifest)
    assert validation_errors(_crds(render())["ElasticFleet"], fleet) == []
    assert fleet["spec"]["worker"]["image"] == "elasticfleet-worker:0.1.0"
    for command in ("rollout status deployment/ef-elasticfleet", "apply -f -", "get elasticfleets"):
        assert f"kubectl -n elasticfleet {command}" in notes, notes


@pytest.mark.parametrize(
    "namespaces", [[], ["team-a", "team-b"]], ids=["cluster-wide", "namespaced"]
)
def test_peering_objects_are_valid_against_their_crds(namespaces: list[str]) -> None:
    settings = [
        "peering.enabled=true",
        *(f"watchNamespaces[{i}]={n}" for i, n in enumerate(namespaces)),
    ]
    documents = render(*settings)
    crds = _crds(documents)
    peerings = [d for d in documents if d["apiVersion"] == "kopf.dev/v1"]
    assert len(peerings) == max(1, len(namespaces))
    for peering in peerings:
        crd = crds[peering["kind"]]
        assert validation_errors(crd, peering) == []
        namespaced = crd["spec"]["scope"] == "Namespaced"
        assert ("namespace" in peering["metadata"]) == namespaced


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("valkey.enbled=false", "at '/valkey': additional properties 'enbled' not allowed"),
        ("replicaCount=two", "at '/replicaCount': got string, want integer"),
        ("rbac.scope=everywhere", "at '/rbac/scope': value must be one of"),
        ("crds.keep=maybe", "at '/crds/keep': got string, want boolean"),
        # A URL with credentials would put the password in every worker pod's spec.
        ("redis.url=redis://user:secret@r:6379/0", "at '/redis/url': "),
        ("watchNamespaces[0]=Team_A", "at '/watchNamespaces/0': "),
    ],
)
def test_the_values_schema_refuses_typos_and_wrong_types(setting: str, message: str) -> None:
    done = helm("lint", "--strict", str(CHART), "--set", setting, check=False)
    assert done.returncode != 0, done.stdout
    assert message in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_values_schema_is_self_contained() -> None:
    # helm fetches a remote $ref over the network, which CI does not have.
    assert '"$ref"' not in (CHART / "values.schema.json").read_text()


def test_every_value_has_a_comment() -> None:
    """Every key of values.yaml has a comment line above it, but the
    Kubernetes fields inside a `resources` example (requests, cpu, ...)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []  # (indent, key) of the keys enclosing a line
    for number, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z]\w*):", line)
        if key is None:
            continue
        indent = len(key.group(1))
        parents = [(i, k) for i, k in parents if i < indent]
        if not any(k == "resources" for _, k in parents):
            above = lines[number - 1].strip()
            assert above.startswith("#"), f"values.yaml line {number + 1} has no comment: {line}"
        parents.append((indent, key.group(2)))


def test_yamllint_passes() -> None:
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *CI_VALUES]
    done = subprocess.run(
        [YAMLLINT, "--strict", *map(str, files)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout


def test_monitors_render_only_where_their_api_is() -> None:
    monitors = ["metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true"]
    without = render(*monitors)
    assert not find(without, "ServiceMonitor") and not find(without, "PodMonitor")
    # Enabled but off by default.
    default = render(api_versions=[MONITORING])
    assert not find(default, "ServiceMonitor") and not find(default, "PodMonitor")
    documents = render(*monitors, api_versions=[MONITORING])
    service_monitor = one(documents, "ServiceMonitor")
    service = one(documents, "Service", "ef-elasticfleet")
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_the_chart_packages(tmp_path: Path) -> None:
    helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("elasticfleet-*.tgz")
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert archive.name == f"elasticfleet-{version}.tgz"
    # What users install from the archive is what the tests rendered.
    shown = helm("show", "crds", str(archive)).stdout
    assert "clusterkopfpeerings.kopf.dev" in shown
