"""`helm install`, end to end, under RBAC, as close to a cluster as this
machine allows: the chart rendered by the real `helm template`, applied by
the real kubectl (as the admin) to the emulated API server, which enforces
the chart's RBAC on the operator's ServiceAccount and validates every write
of a custom resource; the operator started from the chart's own Deployment
(operator_pod.py); the example fleet and adapter set applied with kubectl,
and real workers started from the Deployment the operator makes
(tiny_fleet.Kubelet).

The store is an external Redis (`valkey.enabled=false`, `redis.url`,
`redis.existingSecret`): the tests' own Valkey, with a password. The chart's
Valkey cannot run here, and a kubelet playing its StatefulSet would not
help: the chart points everything at the Valkey Service's cluster DNS name,
which nothing resolves on this host, so the test would have to rewrite the
chart's own settings. The external path is used unchanged, and through it
the default store fleets of the release's namespace get (URL from the
ConfigMap, password from the Secret; tests/chart renders the Valkey).

What it proves, for each RBAC layout the chart renders (cluster-wide, with
kopf's peering, per namespace with peering): the fleet becomes Available, a
squeeze gets a smaller plan, spec changes reach the fleet's children and a
deleted fleet is released; every write passed the CRDs' schemas (the server
refused none), and the server denied the operator nothing while it used
every permission the chart grants (the rules are the least that works). A
chart upgrade that adds a CRD field updates the CRD and keeps the custom
resources.

For people with a cluster, `test_helm_install_on_a_real_cluster` runs the
same install against the current kubeconfig context when
ELASTICFLEET_E2E_CLUSTER=1 (never in CI; skipped otherwise, saying so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from conftest import TINY_MODEL
from helm_chart import CHART, HELM, NAMESPACE, RELEASE, render_text, requires_helm
from operator_pod import OperatorPod
from test_kubectl import EXAMPLES, KUBECTL
from test_operator_kopf import _condition
from test_operator_workers import BLOCKS, TASKS, publish_adapter
from tiny_fleet import DEVICE_BYTES, Kubelet, squeeze
from valkey_server import TestRedisServer, free_port
from waiting import wait_for

from elasticfleet.worker.serving.client import WorkerClient

if TYPE_CHECKING:
    from kube_auth import Decision
    from kube_emulator import EmulatedCluster

# Fixture: new_cluster (the emulated API without our CRDs).
pytest_plugins = ["kube_emulator"]

pytestmark = [
    requires_helm,
    pytest.mark.skipif(KUBECTL is None, reason="no kubectl (set ELASTICFLEET_KUBECTL or PATH)"),
]

FLEETS = "elasticfleet.io/v1alpha1/elasticfleets"
PASSWORD = "store-password-1"
STORE_SECRET = "adapter-store"


def run(*command: str, stdin: str | None = None, timeout: float = 60) -> str:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def kubectl(
    kubeconfig: Path | None, *args: str, stdin: str | None = None, timeout: float = 60
) -> str:
    """kubectl in the release's namespace (the current kubeconfig's cluster
    when `kubeconfig` is None)."""
    assert KUBECTL is not None
    where = [] if kubeconfig is None else ["--kubeconfig", str(kubeconfig)]
    return run(KUBECTL, *where, "-n", NAMESPACE, *args, stdin=stdin, timeout=timeout)


def apply(kubeconfig: Path, manifests: str) -> str:
    """`kubectl apply` as the admin. --validate=false: kubectl's own schema
    check downloads the server's OpenAPI, which the emulator does not serve
    (the server still validates custom resources)."""
    return kubectl(kubeconfig, "apply", "--validate=false", "-f", "-", stdin=manifests)


def install(kubeconfig: Path, chart: str) -> str:
    """The rendered chart applied in the order helm installs it: the CRDs
    first, then what may be of their kinds (the peering object)."""
    documents = [d for d in yaml.safe_load_all(chart) if d]
    crds = [d for d in documents if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in documents if d["kind"] != "CustomResourceDefinition"]
    return apply(kubeconfig, yaml.safe_dump_all(crds)) + apply(kubeconfig, yaml.safe_dump_all(rest))


def values(store_url: str, profiles: Path) -> list[str]:
    """The chart's settings for this machine: the external store, a free
    port for the liveness endpoint (the metrics port is never opened here:
    operator_pod.py), and the tiny model's profile."""
    return [
        "valkey.enabled=false",
        f"redis.url={store_url}",
        f"redis.existingSecret={STORE_SECRET}",
        f"health.port={free_port()}",
        "extraEnv[0].name=ELASTICFLEET_PROFILES",
        f"extraEnv[0].value={profiles}",
    ]


def examples(model: Path) -> str:
    """operator/examples/ for the tiny model and the chart's store: the CPU
    fleet (one worker, greedy: the committed RL agent knows only SmolLM2; no
    quality floor, which needs SmolLM2's perplexities; no spec.redis: the
    release's store) and its adapter set; the GPU fleet as it is (a
    StatefulSet no kubelet here runs: the operator makes it all the same)."""
    fleet = yaml.safe_load((EXAMPLES / "elasticfleet.yaml").read_text())
    fleet["spec"]["model"] = {"name": TINY_MODEL, "path": str(model)}
    fleet["spec"]["replicas"] = 1
    policy = fleet["spec"]["memoryPolicy"]
    policy.update(policy="greedy", budget={"fraction": 0.5}, headroomBytes=0)
    policy.update(planIntervalSeconds=1)
    del policy["qualityFloor"], fleet["spec"]["redis"]
    adapters = yaml.safe_load((EXAMPLES / "adapterset.yaml").read_text())
    adapters["spec"].update(baseModel=TINY_MODEL, tasks=list(TASKS), rank=4, alpha=8)
    gpu = yaml.safe_load((EXAMPLES / "elasticfleet-gpu.yaml").read_text())
    return yaml.safe_dump_all([fleet, adapters, gpu])


def granted(chart: str) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every rule the rendered Roles and
    ClusterRoles grant (where they apply, the emulator checks)."""
    return {
        (group, resource, verb)
        for role in yaml.safe_load_all(chart)
        if role and role["kind"] in ("ClusterRole", "Role")
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def used(decisions: list[Decision]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every resource request decided (discovery aside)."""
    return {
        (d.attributes.group, d.attributes.full_resource, d.attributes.verb)
        for d in decisions
        if d.attributes.resource
    }


def with_notes_field(folder: Path) -> Path:
    """The next chart version, in `folder`: its ElasticFleet CRD has an
    optional spec.notes."""
    chart = folder / "chart"
    shutil.copytree(CHART, chart)
    crd = chart / "templates" / "crds" / "elasticfleets.elasticfleet.io.yaml"
    text = crd.read_text()
    spec = text.index("\n          spec:\n")
    properties = text.index("\n            properties:\n", spec) + len(
        "\n            properties:\n"
    )
    field = (
        "              notes:\n"
        "                type: string\n"
        "                description: Free text about the fleet, for people.\n"
    )
    crd.write_text(text[:properties] + field + text[properties:])
    return chart


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param([], id="cluster-rbac"),
        # With kopf's peering: a ClusterKopfPeering.
        pytest.param(["peering.enabled=true"], id="cluster-rbac-peering"),
        # A Role in the release's namespace (there, a KopfPeering) and the
        # few cluster-wide reads in a ClusterRole.
        pytest.param(
            ["rbac.scope=namespaced", f"watchNamespaces[0]={NAMESPACE}", "peering.enabled=true"],
            id="namespaced-rbac-peering",
        ),
    ],
)
def test_helm_install_runs_a_fleet_under_the_charts_rbac(
    scope: list[str],
    new_cluster: EmulatedCluster,
    tiny_profiles: Path,
    tiny_worker_model: Path,
    tmp_path: Path,
) -> None:
    store = TestRedisServer(password=PASSWORD)
    store.start()
    (tmp_path / "workers").mkdir()
    try:
        version = publish_adapter(f"redis://:{PASSWORD}@127.0.0.1:{store.port}/0")
        settings = values(store.url, tiny_profiles) + scope
        chart = render_text(*settings)
        with Kubelet(new_cluster, tmp_path / "workers", namespace=NAMESPACE) as kubelet:
            run_installed_chart(new_cluster, kubelet, chart, tiny_worker_model, tmp_path, version)
            upgrade_the_crds(new_cluster.kubeconfig, settings, tmp_path)
        assert new_cluster.emulator.refusals == []
    finally:
        store.close()


def run_installed_chart(
    cluster: EmulatedCluster,
    kubelet: Kubelet,
    chart: str,
    model: Path,
    folder: Path,
    version: int,
) -> None:
    """Install, run the operator from its Deployment, apply the examples;
    the fleet serves, a squeeze shrinks its plan, its spec changes reach
    its children; nothing was denied or refused."""
    kubeconfig = cluster.kubeconfig
    out = install(kubeconfig, chart)
    for created in ("customresourcedefinition.apiextensions.k8s.io/elasticfleets.elasticfleet.io",
                    "serviceaccount/ef-elasticfleet", "clusterrole.rbac.authorization.k8s.io/",
                    "configmap/ef-elasticfleet", "deployment.apps/ef-elasticfleet"):  # fmt: skip
        assert created in out, out
    password = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": STORE_SECRET},
                "stringData": {"password": PASSWORD}}  # fmt: skip
    apply(kubeconfig, yaml.safe_dump(password))
    (deployment,) = cluster.objects("apps/v1/deployments", NAMESPACE)
    with OperatorPod(cluster, deployment, folder / "operator") as operator:
        account = f"system:serviceaccount:{NAMESPACE}:ef-elasticfleet"

        def operators(decisions: list[Decision]) -> list[Decision]:
            return [d for d in decisions if d.user.name == account]

        out = apply(kubeconfig, examples(model))
        assert "elasticfleet.elasticfleet.io/smollm2 created" in out, out

        def fleet(name: str = "smollm2") -> dict[str, Any]:
            found = [f for f in cluster.objects(FLEETS, NAMESPACE) if f["metadata"]["name"] == name]
            return found[0] if found else {}

        (workers,) = wait_for(
            "the worker Deployment",
            lambda: [
                d
                for d in cluster.objects("apps/v1/deployments", NAMESPACE)
                if d["metadata"]["name"] == "smollm2-worker"
            ],
            60,
        )
        (pod,) = kubelet.sync(workers)
        wait_for("Available", lambda: _condition(fleet(), "Available").get("status") == "True", 90)
        status = fleet()["status"]
        (entry,) = status["workers"]
        # The adapter set, from the release's store.
        assert entry["adapters"][0] == {"name": "tasks", "version": str(version),
                                        "bytes": entry["adapters"][0]["bytes"]}  # fmt: skip
        address = kubelet.workers[pod].address

        # A squeeze: other processes take all but the worker's own memory.
        with WorkerClient(address) as client:
            own = client.get_stats(timeout=10).memory
        squeeze(kubelet.device(pod), DEVICE_BYTES - own.weight_bytes - own.adapter_bytes)

        def below_dense() -> bool:
            """Blocks dropped, or some below full (levels are sent only then)."""
            with WorkerClient(address) as client:
                stats = client.get_stats(timeout=10)
            return sum(stats.keep_mask) < BLOCKS or len(stats.levels) > 0

        wait_for("a smaller plan", below_dense, 60)
        wait_for("a PlanChanged Event", lambda: any(
            e.get("reason") == "PlanChanged" for e in cluster.objects("v1/events", NAMESPACE)
        ))  # fmt: skip

        # Spec changes: the operator patches the children it made.
        for name in ("smollm2", "smollm2-gpu"):
            kubectl(kubeconfig, "patch", "ef", name, "--type", "merge",
                    "-p", '{"spec": {"memoryPolicy": {"planIntervalSeconds": 2}}}')  # fmt: skip
        grants = granted(chart)
        wait_for(
            "every permission the chart grants used",
            lambda: used(operators(cluster.emulator.decisions)) >= grants,
            60,
        )
        assert used(operators(cluster.emulator.decisions)) == grants
        assert cluster.emulator.denials() == []
        assert _condition(fleet("smollm2-gpu"), "Degraded")["reason"] == "SecretUnavailable"
        assert cluster.objects("apps/v1/statefulsets", NAMESPACE)
        # Deleted: the operator releases its finalizer (children go by owner references).
        kubectl(kubeconfig, "delete", "ef", "smollm2-gpu", "--wait=false")
        wait_for("the GPU fleet to go", lambda: not fleet("smollm2-gpu"), 30)
        assert cluster.emulator.denials() == []
        assert operator.stop() == 0, operator.log.read_text()


def upgrade_the_crds(kubeconfig: Path, settings: list[str], folder: Path) -> None:
    """The next chart version adds an optional field to the ElasticFleet
    CRD: applied, the CRD changes, the fleets stay, and the field, pruned
    before, is kept."""
    note = '{"spec": {"notes": "the team\'s fleet"}}'
    kubectl(kubeconfig, "patch", "ef", "smollm2", "--type", "merge", "-p", note)
    assert "notes" not in kubectl(kubeconfig, "get", "ef", "smollm2", "-o", "yaml")
    out = install(kubeconfig, render_text(*settings, chart=with_notes_field(folder)))
    crd = "customresourcedefinition.apiextensions.k8s.io/elasticfleets.elasticfleet.io"
    assert f"{crd} configured" in out and "deployment.apps/ef-elasticfleet unchanged" in out
    names = kubectl(kubeconfig, "get", "ef,adset", "-o", "name").split()
    assert names == ["elasticfleet.elasticfleet.io/smollm2", "adapterset.elasticfleet.io/tasks"]
    kubectl(kubeconfig, "patch", "ef", "smollm2", "--type", "merge", "-p", note)
    fleet = yaml.safe_load(kubectl(kubeconfig, "get", "ef", "smollm2", "-o", "yaml"))
    assert fleet["spec"]["notes"] == "the team's fleet"
    assert fleet["status"]["workers"]  # the operator's status is kept too


REAL_CLUSTER = os.environ.get("ELASTICFLEET_E2E_CLUSTER") == "1"


@pytest.mark.skipif(
    not REAL_CLUSTER,
    reason="opt-in: ELASTICFLEET_E2E_CLUSTER=1 installs the chart in the current kubeconfig "
    "context's cluster (a disposable one, e.g. kind, with the images loaded)",
)
def test_helm_install_on_a_real_cluster(tmp_path: Path) -> None:
    """`helm install` with the chart's defaults (its own Valkey; images
    elasticfleet-operator and elasticfleet-worker at the chart's version, as
    scripts/build-images makes them; ELASTICFLEET_E2E_VALUES names a values
    file to change that) in namespace elasticfleet; the example fleet, one
    SmolLM2 worker, becomes Available; the operator's log has no 403; the
    upgraded chart's CRD has the new field and the fleet stays. The real
    device cannot be squeezed from here. The namespace is removed at the
    end; the CRDs stay (crds.keep)."""
    assert HELM is not None
    helm = [HELM, "--namespace", NAMESPACE]
    extra = os.environ.get("ELASTICFLEET_E2E_VALUES")
    options = ["--wait", "--timeout", "10m", *(["--values", extra] if extra else [])]
    fleet = yaml.safe_load((EXAMPLES / "elasticfleet.yaml").read_text())
    fleet["spec"]["replicas"] = 1
    del fleet["spec"]["adapters"], fleet["spec"]["redis"]  # the release's store, unused
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["workerImage"]
    chosen = yaml.safe_load(Path(extra).read_text()) if extra else {}
    worker = {**defaults, **(chosen or {}).get("workerImage", {})}
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    fleet["spec"]["worker"]["image"] = f"{worker['repository']}:{worker['tag'] or version}"
    try:
        run(*helm, "install", RELEASE, str(CHART), "--create-namespace", *options, timeout=900)
        kubectl(None, "apply", "-f", "-", stdin=yaml.safe_dump(fleet))
        kubectl(None, "wait", "ef/smollm2", "--for=condition=Available", "--timeout=900s",
                timeout=960)  # fmt: skip
        logs = kubectl(None, "logs", f"deployment/{RELEASE}-elasticfleet")
        assert "Forbidden" not in logs and " 403" not in logs, logs
        upgrade = with_notes_field(tmp_path)
        run(*helm, "upgrade", RELEASE, str(upgrade), *options, timeout=900)
        crd = kubectl(None, "get", "crd", "elasticfleets.elasticfleet.io", "-o", "yaml")
        assert "notes:" in crd
        assert kubectl(None, "get", "ef", "-o", "name").split() == [
            "elasticfleet.elasticfleet.io/smollm2"
        ]
    finally:
        subprocess.run([KUBECTL or "kubectl", "-n", NAMESPACE, "delete", "ef", "--all"],
                       timeout=300, check=False)  # fmt: skip
        subprocess.run([*helm, "uninstall", RELEASE, "--wait"], timeout=300, check=False)
        subprocess.run([KUBECTL or "kubectl", "delete", "namespace", NAMESPACE],
                       timeout=300, check=False)  # fmt: skip
