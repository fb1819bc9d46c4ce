"""What the chart holds that has another source of truth: the CRDs are what
`elasticfleet operator crds` prints (byte for byte, but for the keep
annotation), kopf's peering CRDs and object what `operator crds --peering`
prints, the chart's version the package's, and scripts/gen-chart's output
is what is checked in."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import CHART, ROOT, find, render, render_text, requires_helm

pytestmark = requires_helm

ELASTICFLEET = str(Path(sys.executable).with_name("elasticfleet"))
KEEP = {"helm.sh/resource-policy": "keep"}


def _cli(*args: str) -> str:
    return subprocess.run(
        [ELASTICFLEET, "operator", "crds", *args], capture_output=True, text=True, check=True
    ).stdout


def _texts(stream: str) -> list[str]:
    """Each document of a YAML stream as printed, without comments and the
    separators: helm prefixes each with `# Source: ...`."""
    documents = re.split(r"^---$", stream, flags=re.M)
    texts = [
        "\n".join(line for line in d.splitlines() if not line.startswith("#")) for d in documents
    ]
    return [t.strip() for t in texts if t.strip()]


def _by_name(texts: list[str]) -> dict[str, str]:
    """CRD texts by name (helm orders them its own way)."""
    crds = [(yaml.safe_load(t), t) for t in texts]
    return {c["metadata"]["name"]: t for c, t in crds if c["kind"] == "CustomResourceDefinition"}


def test_checked_in_files_are_what_gen_chart_makes(tmp_path: Path) -> None:
    copy = tmp_path / "elasticfleet"
    shutil.copytree(CHART, copy)
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-chart"), str(copy)], check=True)
    made = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    assert made == sorted(p.relative_to(CHART) for p in CHART.rglob("*") if p.is_file())
    for path in made:
        assert (copy / path).read_text() == (CHART / path).read_text(), (
            f"charts/elasticfleet/{path} is out of date: run bash scripts/gen-chart"
        )


def test_chart_version_is_the_package_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["version"], chart["appVersion"]) == ("v2", version, version)
    # An empty image tag falls back to it.
    (deployment,) = find(render(), "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"elasticfleet-operator:{version}"
    (deployment,) = find(render("image.tag=dev"), "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":dev")


def test_crds_are_byte_for_byte_what_the_operator_prints() -> None:
    printed = _by_name(_texts(_cli()))
    rendered = _by_name(_texts(render_text("crds.keep=false")))
    assert sorted(printed) == ["adaptersets.elasticfleet.io", "elasticfleets.elasticfleet.io"]
    assert {name: rendered[name] for name in printed} == printed


def test_kept_crds_differ_only_by_the_keep_annotation() -> None:
    printed = {c["metadata"]["name"]: c for c in yaml.safe_load_all(_cli())}
    rendered = {d["metadata"]["name"]: d for d in render() if d["metadata"]["name"] in printed}
    for crd in rendered.values():
        assert crd["metadata"].pop("annotations") == KEEP
    assert rendered == printed


def test_crds_can_be_left_to_someone_else() -> None:
    # Only kopf's shared peering CRDs remain (crds/: helm install --skip-crds leaves them).
    crds = find(render("crds.install=false"), "CustomResourceDefinition")
    names = {crd["metadata"]["name"] for crd in crds}
    assert names == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


def test_peering_crds_are_what_the_operator_prints() -> None:
    printed = _by_name(_texts(_cli("--peering", "any")))
    for name in _by_name(_texts(_cli())):
        del printed[name]
    assert sorted(printed) == ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]
    shipped = sorted((CHART / "crds").glob("*.yaml"))
    assert _by_name([t for p in shipped for t in _texts(p.read_text())]) == printed


def _peering_objects(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    objects = [d for d in documents if d["apiVersion"] == "kopf.dev/v1"]
    for peering in objects:
        del peering["metadata"]["labels"]  # the chart's own labels
    return objects


@pytest.mark.parametrize(
    "namespaces", [[], ["team-a", "team-b"]], ids=["cluster-wide", "namespaced"]
)
def test_peering_objects_are_what_the_operator_prints(namespaces: list[str]) -> None:
    settings = ["peering.enabled=true", "peering.name=ef-peers"]
    settings += [f"watchNamespaces[{i}]={ns}" for i, ns in enumerate(namespaces)]
    rendered = _peering_objects(render(*settings))
    flags = [flag for ns in namespaces for flag in ("--namespace", ns)]
    printed = list(yaml.safe_load_all(_cli("--peering", "ef-peers", *flags)))[4:]
    assert rendered == printed
    # No peering, no peering object.
    assert _peering_objects(render(*settings[1:])) == []
