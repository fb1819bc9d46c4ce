"""The pods the chart runs and the settings it hands the operator: security
defaults on every pod (the same as the operator gives its workers), the
operator's command line as the real CLI parses it, the settings checksum,
the Valkey store and its password, how fleets find that store through the
operator, and the PodMonitor finding the workers the operator labels."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import (
    CI_VALUES,
    MONITORING,
    NAMESPACE,
    ROOT,
    find,
    helm,
    one,
    pod_specs,
    render,
    requires_helm,
    template_args,
)

from elasticfleet.cli import build_parser
from elasticfleet.cli.operator_commands import namespaces
from elasticfleet.operator.build import (
    CONTAINER_SECURITY,
    METRICS_PORT_NAME,
    POD_SECURITY,
    labels,
    worker_env,
)
from elasticfleet.operator.spec import DefaultStore, FleetSpec

pytestmark = requires_helm

EXAMPLE = ROOT / "operator" / "examples" / "elasticfleet.yaml"
Doc = dict[str, Any]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_every_pod_runs_restricted_as_the_workers_do(values: Path) -> None:
    pods = pod_specs(render(values=[values]))
    assert "Deployment/ef-elasticfleet" in pods
    for name, pod in pods.items():
        assert pod["securityContext"] == POD_SECURITY, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"] == CONTAINER_SECURITY, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/tmp"]]["emptyDir"] == {}, name
            assert "resources" in container, name


def _operator(documents: list[Doc]) -> tuple[Doc, dict[str, str]]:
    """The operator container and the environment it starts with."""
    deployment = one(documents, "Deployment", "ef-elasticfleet")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (source,) = container["envFrom"]
    config = one(documents, "ConfigMap", source["configMapRef"]["name"])
    env = dict(config["data"])
    for item in container["env"]:
        ref = item.get("valueFrom", {})
        if "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            env[item["name"]] = {"metadata.namespace": NAMESPACE, "metadata.name": "pod-0"}[path]
        elif "secretKeyRef" in ref:
            env[item["name"]] = f"<{ref['secretKeyRef']['name']}/{ref['secretKeyRef']['key']}>"
        else:
            env[item["name"]] = item["value"]
    return container, env


def _run_args(container: Doc, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert container["command"] == ["elasticfleet"]
    return build_parser().parse_args(container["args"])


def test_the_operator_runs_standalone_with_json_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    container, env = _operator(render())
    args = _run_args(container, env, monkeypatch)
    assert (args.standalone, args.peering, args.log_format) == (True, None, "json")
    assert (args.verbose, args.quiet) == (False, False)
    assert namespaces(args) == []
    # The kubelet probes the endpoint the operator serves; metrics are declared.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert args.metrics_port == ports["metrics"]
    deployment = one(render(), "Deployment", "ef-elasticfleet")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_peering_replicas_each_draw_a_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ("peering.enabled=true", "replicaCount=3", "logLevel=debug")
    documents = render(*settings, "watchNamespaces[0]=team-a")
    container, env = _operator(documents)
    monkeypatch.delenv("ELASTICFLEET_PRIORITY", raising=False)
    args = _run_args(container, env, monkeypatch)
    assert (args.standalone, args.peering, args.verbose) == (False, "ef-elasticfleet", True)
    assert namespaces(args) == ["team-a"]
    # No priority is set anywhere: every replica draws its own (peering_priority).
    assert args.priority is None and "ELASTICFLEET_PRIORITY" not in env
    assert env["POD_ID"] == "pod-0"  # kopf's name for the replica among its peers
    assert one(documents, "Deployment")["spec"]["replicas"] == 3


def test_several_replicas_need_peering() -> None:
    done = helm(*template_args(settings=["replicaCount=2"]), check=False)
    assert done.returncode != 0 and "replicaCount > 1 needs peering.enabled" in done.stderr


def _checksum(*settings: str) -> str:
    deployment = one(render(*settings), "Deployment", "ef-elasticfleet")
    return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])


def test_changed_settings_roll_the_operator() -> None:
    assert _checksum() == _checksum()  # the random Valkey password is not part of it
    assert _checksum("watchNamespaces[0]=team-a") != _checksum()
    assert _checksum("redis.prefix=other:") != _checksum()


def _secret(documents: list[Doc], name: str) -> dict[str, str]:
    secret = one(documents, "Secret", name)
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def test_valkey_persists_and_keeps_its_password_off_the_command_line() -> None:
    documents = render("valkey.persistence.size=20Gi", "valkey.persistence.storageClass=fast")
    statefulset = one(documents, "StatefulSet", "ef-elasticfleet-valkey")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "/etc/valkey/auth.conf"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    secret = _secret(documents, "ef-elasticfleet-valkey")
    assert secret["auth.conf"] == f"requirepass {secret['password']}\n"
    assert len(secret["password"]) == 32 and secret["password"] not in yaml.safe_dump(statefulset)
    service = one(documents, "Service", "ef-elasticfleet-valkey")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    # `helm template` has no cluster to look the Secret up in: a new one each
    # time (on a cluster, `lookup` keeps the one there).
    assert _secret(render(), "ef-elasticfleet-valkey")["password"] != secret["password"]


def _fleet_without_redis() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())["spec"]
    del spec["redis"]
    return spec


def test_fleets_in_the_release_namespace_find_the_chart_store() -> None:
    """The chain a fleet without spec.redis relies on: the ConfigMap and the
    pod's namespace give the operator a default store (spec.DefaultStore),
    which hands the workers the Valkey Service's URL and a reference to the
    Secret with the key the chart wrote, in the fleet's own namespace."""
    documents = render()
    _, env = _operator(documents)
    store = DefaultStore.from_environment(env)
    assert store is not None and store.namespace == NAMESPACE
    fleet = FleetSpec.parse("smollm2", NAMESPACE, _fleet_without_redis(), store)
    worker = {e["name"]: e for e in worker_env(fleet)}
    service = one(documents, "Service", "ef-elasticfleet-valkey")
    (port,) = service["spec"]["ports"]
    url = f"redis://{service['metadata']['name']}.{NAMESPACE}.svc:{port['port']}/0"
    assert worker["ELASTICFLEET_REDIS_URL"]["value"] == url
    ref = worker["ELASTICFLEET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _secret(documents, ref["name"])
    assert one(documents, "Secret", ref["name"])["metadata"]["namespace"] == fleet.namespace
    # The operator itself logs in to the same store with the same password.
    assert env["ELASTICFLEET_REDIS_PASSWORD"] == f"<{ref['name']}/{ref['key']}>"


def test_an_external_redis_is_handed_on_the_same_way() -> None:
    values = [p for p in CI_VALUES if p.name == "external-redis-values.yaml"]
    documents = render(values=values)
    assert not find(documents, "StatefulSet") and not find(documents, "Secret")
    _, env = _operator(documents)
    store = DefaultStore.from_environment(env)
    assert store is not None
    fleet = FleetSpec.parse("smollm2", NAMESPACE, _fleet_without_redis(), store)
    worker = {e["name"]: e for e in worker_env(fleet)}
    assert worker["ELASTICFLEET_REDIS_URL"]["value"] == "rediss://redis.storage.svc:6380/2"
    assert worker["ELASTICFLEET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "adapter-store",
        "key": "redis-password",
    }
    assert worker["ELASTICFLEET_REDIS_PREFIX"]["value"] == "team-a:"
    # Without any store the operator hands none on.
    _, env = _operator(render("valkey.enabled=false"))
    assert "ELASTICFLEET_REDIS_URL" not in env and DefaultStore.from_environment(env) is None
    # A Redis URL and the chart's own Valkey at once is a mistake.
    done = helm(*template_args(settings=["redis.url=redis://r:6379/0"]), check=False)
    assert done.returncode != 0 and "set valkey.enabled=false" in done.stderr


@pytest.mark.parametrize("served", [[], ["team-a"]], ids=["all-namespaces", "named"])
def test_the_pod_monitor_finds_the_workers(served: list[str]) -> None:
    settings = ["metrics.podMonitor.enabled=true"]
    settings += [f"watchNamespaces[{i}]={ns}" for i, ns in enumerate(served)]
    monitor = one(render(*settings, api_versions=[MONITORING]), "PodMonitor")
    # The labels the operator gives every worker pod, whatever the fleet.
    pod_labels = labels(
        FleetSpec.parse("smollm2", "team-a", yaml.safe_load(EXAMPLE.read_text())["spec"])
    )
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == METRICS_PORT_NAME
    # Each series is labelled `fleet` from the pod label holding its fleet's
    # name (Prometheus' discovery writes a label key's other characters as _).
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "fleet"
    (source,) = relabel["sourceLabels"]
    by_meta = {
        "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key): value
        for key, value in pod_labels.items()
    }
    assert by_meta[source] == "smollm2"
    expected = {"matchNames": served} if served else {"any": True}
    assert monitor["spec"]["namespaceSelector"] == expected
