"""Spec parsing and the pure builders of a fleet's children, without a cluster:
the rendered objects pass Kubernetes' own schemas (kubernetes-validate,
strict), and the worker command line parses with the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from elasticfleet.cli import build_parser
from elasticfleet.operator.build import (
    CLIENT_CA_DIR,
    FLEET_LABEL,
    TOKEN_DIR,
    build_children,
    build_service,
    build_workload,
    label_selector,
    labels,
    owner_reference,
    pod_template,
    worker_address,
    worker_command,
    worker_env,
    worker_server_name,
)
from elasticfleet.operator.spec import DefaultStore, FleetSpec, RedisSettings, SecretKey, SpecError

EXAMPLES = Path(__file__).resolve().parents[2] / "operator" / "examples"
UID = "5e1f0c3a-8d5e-4b7a-9a43-0f1f4c2d9b11"


def _spec(example: str = "elasticfleet.yaml") -> FleetSpec:
    body = yaml.safe_load((EXAMPLES / example).read_text())
    return FleetSpec.parse(body["metadata"]["name"], "ml", body["spec"])


def _raw(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load((EXAMPLES / "elasticfleet.yaml").read_text())["spec"]
    raw.update(changes)
    return raw


def test_parse_fills_in_the_crd_defaults() -> None:
    minimal = {
        "model": {"name": "m"},
        "worker": {"image": "img"},
        "memoryPolicy": {"budget": {"bytes": 1000}},
    }
    spec = FleetSpec.parse("f", "ns", minimal)
    assert (spec.replicas, spec.workload, spec.memory.policy) == (1, "Deployment", "rl")
    assert (spec.worker.port, spec.worker.metrics_port, spec.worker.pull_policy) == (
        50051,
        9090,
        "IfNotPresent",
    )
    assert (spec.memory.plan_interval_s, spec.memory.headroom_bytes) == (15, 0)
    assert spec.memory.budget.bytes == 1000 and spec.memory.budget.fraction is None
    assert spec.adapters == () and spec.redis is None and spec.tls_secret is None


def test_parse_reads_the_example() -> None:
    spec = _spec()
    assert spec.model_name == "SmolLM2-135M-Instruct"
    assert spec.memory.budget.fraction == 0.6
    assert spec.memory.max_perplexity_ratio == 3.0
    assert spec.adapters == ("tasks",)
    assert spec.redis is not None and spec.redis.url == "redis://redis.elasticfleet.svc:6379/0"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            _raw(memoryPolicy={"budget": {}}),
            "spec.memoryPolicy.budget: set exactly one of budget.fraction",
        ),
        (
            _raw(memoryPolicy={"budget": {"fraction": 0.5}, "staticRatio": 0.2}),
            "staticRatio applies only to policy static",
        ),
        (
            _raw(memoryPolicy={"budget": {"bytes": 5}, "policy": "x"}),
            "policy: 'x' is not one of rl",
        ),
        (_raw(redis=None) | {"adapters": [{"name": "a"}]}, "adapters need spec.redis"),
        ({"worker": {"image": "i"}, "memoryPolicy": {"budget": {"bytes": 5}}}, "lacks model"),
        (_raw(worker={"image": "i", "port": 9090}), "spec.worker: port and metricsPort"),
        (_raw(redis={"prefix": "p"}), "spec.redis: set exactly one of redis.url"),
        (_raw(replicas="2"), "spec.replicas: must be of type integer, got '2'"),
    ],
)
def test_parse_errors_say_what_to_fix(raw: dict[str, Any], message: str) -> None:
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(SpecError, match=message):
        FleetSpec.parse("f", "ns", raw)


def test_fleet_name_must_leave_room_for_the_service_name() -> None:
    with pytest.raises(SpecError, match=r"metadata\.name must be at most 56 characters"):
        FleetSpec.parse("x" * 57, "ns", _raw())
    assert worker_command(FleetSpec.parse("x" * 56, "ns", _raw()))


@pytest.mark.parametrize("example", ["elasticfleet.yaml", "elasticfleet-gpu.yaml"])
def test_children_are_valid_kubernetes_objects(example: str) -> None:
    spec = _spec(example)
    for child in build_children(spec, owner_reference(spec.name, UID)):
        kubernetes_validate.validate(child, "1.35", strict=True)


def test_children_are_owned_and_labelled() -> None:
    spec = _spec()
    owner = owner_reference(spec.name, UID)
    service, workload = build_children(spec, owner)
    for child in (service, workload):
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "elasticfleet.io/v1alpha1",
                "kind": "ElasticFleet",
                "name": "smollm2",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"]["labels"] == labels(spec)
        assert child["metadata"]["name"] == "smollm2-worker"
        assert child["metadata"]["namespace"] == "ml"
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector == {FLEET_LABEL: "smollm2", "app.kubernetes.io/component": "worker"}
    assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector
    assert service["spec"]["clusterIP"] == "None"


def test_owner_reference_needs_a_stored_fleet() -> None:
    with pytest.raises(ValueError, match="has no uid"):
        owner_reference("f", "")


def test_deployment_for_the_cpu_example() -> None:
    spec = _spec()
    workload = build_workload(spec, owner_reference(spec.name, UID))
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 2
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "6Gi"},
        "limits": {"cpu": "2", "memory": "6Gi"},
    }
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    env = {e["name"]: e for e in container["env"]}
    assert env["ELASTICFLEET_REDIS_URL"]["value"] == "redis://redis.elasticfleet.svc:6379/0"
    assert env["ELASTICFLEET_REDIS_PREFIX"]["value"] == "elasticfleet:"


def test_statefulset_for_the_gpu_example() -> None:
    spec = _spec("elasticfleet-gpu.yaml")
    workload = build_workload(spec, owner_reference(spec.name, UID))
    assert workload["kind"] == "StatefulSet"
    assert workload["spec"]["serviceName"] == build_service(spec, {})["metadata"]["name"]
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # TLS: the Secret is mounted, the worker serves it, probes open the port.
    assert {"name": "tls", "secret": {"secretName": "elasticfleet-workers-tls"}} in pod["volumes"]
    assert "tcpSocket" in container["readinessProbe"] and "grpc" not in container["livenessProbe"]
    # Mutual TLS: only the client Secret's ca.crt reaches the workers, never its key.
    client_ca = {
        "secretName": "elasticfleet-operator-tls",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert {"name": "client-ca", "secret": client_ca} in pod["volumes"]
    assert {"name": "client-ca", "mountPath": CLIENT_CA_DIR, "readOnly": True} in container[
        "volumeMounts"
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["ELASTICFLEET_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "redis", "key": "url"}
    }
    # The bearer token is its Secret's key mounted as a file (a rotation
    # reaches the running worker), never a flag's value or a variable.
    token = {
        "secretName": "elasticfleet-workers-token",
        "items": [{"key": "token", "path": "token"}],
    }
    assert {"name": "token", "secret": token} in pod["volumes"]
    mount = {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True}
    assert mount in container["volumeMounts"]
    assert container["command"][container["command"].index("--token-file") + 1] == (
        f"{TOKEN_DIR}/token"
    )
    assert "ELASTICFLEET_TOKEN" not in env


@pytest.mark.parametrize("example", ["elasticfleet.yaml", "elasticfleet-gpu.yaml"])
def test_worker_command_parses_with_the_real_cli(example: str) -> None:
    spec = _spec(example)
    command = worker_command(spec)
    assert command[:2] == ["elasticfleet", "worker"]
    args = build_parser().parse_args(command[1:])
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 50051, 9090)
    assert args.drain_timeout == 30.0
    if spec.memory.budget.bytes is not None:
        assert args.budget_bytes == spec.memory.budget.bytes
        assert args.model == Path("/models/smollm2") and args.max_batch == 128
        assert args.tls_cert == Path("/etc/elasticfleet/tls/tls.crt")
        assert args.tls_key == Path("/etc/elasticfleet/tls/tls.key")
        assert args.tls_client_ca == Path("/etc/elasticfleet/client-ca/ca.crt")
    else:
        assert args.budget_bytes is None and args.budget_fraction == 0.6
        assert args.model is None and args.tls_cert is None and args.tls_client_ca is None


def test_worker_address_and_tls_name() -> None:
    # Reached by IP, at the port the pod declares, else the spec's.
    assert worker_address(_spec(), "10.1.2.3") == "10.1.2.3:50051"
    assert worker_address(_spec(), "10.1.2.3", 50077) == "10.1.2.3:50077"
    assert worker_address(_spec(), "fd00::5") == "[fd00::5]:50051"
    # TLS: verified as the pod's name under the headless Service, which a
    # certificate for *.smollm2-gpu-worker.ml.svc covers.
    tls = _spec("elasticfleet-gpu.yaml")
    assert worker_address(tls, "10.1.2.3") == "10.1.2.3:50051"
    assert worker_server_name(tls, "10.1.2.3") == "10-1-2-3.smollm2-gpu-worker.ml.svc"
    assert worker_server_name(tls, "fd00::5") == "fd00--5.smollm2-gpu-worker.ml.svc"
    assert worker_server_name(_spec(), "10.1.2.3") == ""


def test_worker_pods_meet_the_restricted_pod_security_standard() -> None:
    for example in ("elasticfleet.yaml", "elasticfleet-gpu.yaml"):
        pod = pod_template(_spec(example))["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        (container,) = pod["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        # A read-only root: the model cache ($ELASTICFLEET_CACHE) and /tmp
        # are the writable volumes.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        for path in (env["ELASTICFLEET_CACHE"], "/tmp"):
            assert volumes[mounts[path]] == {"name": mounts[path], "emptyDir": {}}
    # Each pod gets its own copy: changing one template leaves the next alone.
    first = pod_template(_spec())["spec"]
    first["securityContext"]["seccompProfile"]["type"] = "Unconfined"
    assert pod_template(_spec())["spec"]["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }


def test_label_selector_selects_the_workers() -> None:
    spec = _spec()
    assert (
        label_selector(spec) == "app.kubernetes.io/component=worker,elasticfleet.io/fleet=smollm2"
    )
    selector = dict(term.split("=") for term in label_selector(spec).split(","))
    assert selector == build_workload(spec, {})["spec"]["selector"]["matchLabels"]


DEFAULT_STORE = DefaultStore(
    "elasticfleet",
    RedisSettings(
        url="redis://ef-valkey.elasticfleet.svc:6379/0",
        password_secret=SecretKey("ef-valkey", "password"),
    ),
)


def test_default_store_comes_from_the_operators_environment() -> None:
    environ = {
        "ELASTICFLEET_REDIS_URL": "redis://ef-valkey.elasticfleet.svc:6379/0\n",
        "ELASTICFLEET_REDIS_PREFIX": "ef:",
        "ELASTICFLEET_REDIS_PASSWORD_SECRET": "ef-valkey",
        "ELASTICFLEET_REDIS_PASSWORD_SECRET_KEY": "pw",
        "ELASTICFLEET_OPERATOR_NAMESPACE": "elasticfleet",
    }
    store = DefaultStore.from_environment(environ)
    assert store is not None and store.namespace == "elasticfleet"
    assert store.redis.url == "redis://ef-valkey.elasticfleet.svc:6379/0"
    assert store.redis.password_secret == SecretKey("ef-valkey", "pw")
    assert store.redis.prefix == "ef:" and store.redis.url_secret is None
    # The key defaults to `password`; a store without a password has no Secret.
    del environ["ELASTICFLEET_REDIS_PASSWORD_SECRET_KEY"], environ["ELASTICFLEET_REDIS_PREFIX"]
    store = DefaultStore.from_environment(environ)
    assert store is not None and store.redis.password_secret == SecretKey("ef-valkey", "password")
    assert store.redis.prefix == "elasticfleet:"
    del environ["ELASTICFLEET_REDIS_PASSWORD_SECRET"]
    store = DefaultStore.from_environment(environ)
    assert store is not None and store.redis.password_secret is None
    # No URL, or no namespace to serve (an operator outside a cluster): none.
    assert DefaultStore.from_environment({"ELASTICFLEET_REDIS_URL": "redis://r"}) is None
    assert DefaultStore.from_environment({"ELASTICFLEET_OPERATOR_NAMESPACE": "ns"}) is None


def test_fleets_in_the_operators_namespace_get_its_store() -> None:
    raw = _raw(redis=None)
    del raw["redis"]
    spec = FleetSpec.parse("smollm2", "elasticfleet", raw, DEFAULT_STORE)
    assert spec.redis == DEFAULT_STORE.redis
    env = {e["name"]: e for e in worker_env(spec)}
    assert env["ELASTICFLEET_REDIS_URL"] == {
        "name": "ELASTICFLEET_REDIS_URL",
        "value": "redis://ef-valkey.elasticfleet.svc:6379/0",
    }
    # The password only as a reference to the Secret, in the pod's own namespace.
    assert env["ELASTICFLEET_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "ef-valkey", "key": "password"}
    }
    assert env["ELASTICFLEET_REDIS_PREFIX"]["value"] == "elasticfleet:"
    # A fleet's own spec.redis wins over the default.
    own = FleetSpec.parse("smollm2", "elasticfleet", _raw(), DEFAULT_STORE)
    assert own.redis is not None and own.redis.url == "redis://redis.elasticfleet.svc:6379/0"


def test_fleets_elsewhere_do_not_get_the_operators_store() -> None:
    raw = _raw()
    del raw["redis"]
    with pytest.raises(SpecError, match="the operator's store serves only namespace elasticfleet"):
        FleetSpec.parse("smollm2", "team-a", raw, DEFAULT_STORE)
    # Without adapters such a fleet needs no store, and gets none.
    raw["adapters"] = []
    spec = FleetSpec.parse("smollm2", "team-a", raw, DEFAULT_STORE)
    assert spec.redis is None
    assert not any(e["name"].startswith("ELASTICFLEET_REDIS") for e in worker_env(spec))


def test_the_serving_dtype_reaches_the_worker_command() -> None:
    default = FleetSpec.parse("f", "ns", _raw())
    assert default.dtype == "fp32" and "--dtype" not in worker_command(default)
    spec = FleetSpec.parse("f", "ns", _raw(model={"name": "m", "dtype": "bf16"}))
    assert spec.dtype_name == "bfloat16"
    args = build_parser().parse_args(worker_command(spec)[1:])
    assert args.dtype == "bf16"
