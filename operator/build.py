"""Child objects of an ElasticFleet, built as plain dicts by pure functions.

The handlers only create or patch what these return, so everything about
what a fleet's workers look like (their command line, ports, probes,
labels, owner references) is decided here and unit-tested without a
cluster. Every child carries a controller owner reference to its fleet, so
deleting the fleet lets Kubernetes' garbage collector remove them.

The Service is headless: gRPC keeps one long-lived HTTP/2 connection per
channel, which a ClusterIP would pin to one pod; a headless Service lets
clients resolve every ready worker (gRPC's DNS resolver with round_robin
balances over them), and it is the governing Service a StatefulSet needs.
"""

from __future__ import annotations

import copy
from typing import Any

from elasticfleet.operator.crds import API_VERSION, FLEET_KIND, GATEWAY_SUFFIX, WORKER_SUFFIX
from elasticfleet.operator.spec import FleetSpec, GatewaySettings, SecretKey

FLEET_LABEL = "elasticfleet.io/fleet"
COMPONENT = "worker"
CONTAINER = "worker"
GATEWAY_COMPONENT = "gateway"
GRPC_PORT_NAME = "grpc"
HTTP_PORT_NAME = "http"
METRICS_PORT_NAME = "metrics"
CACHE_DIR = "/var/cache/elasticfleet"
TLS_DIR = "/etc/elasticfleet/tls"
# Mutual TLS: only ca.crt of the client Secret (never the client's key).
CLIENT_CA_DIR = "/etc/elasticfleet/client-ca"
CLIENT_CA_FILE = "ca.crt"
# The gateway presents the client Secret's certificate to such workers.
CLIENT_CERT_DIR = "/etc/elasticfleet/client"
# The bearer token, mounted from its Secret as a file: the kubelet rewrites a
# mounted Secret when it changes and the worker re-reads its token file, so a
# rotated token reaches running workers (an environment variable never changes).
TOKEN_DIR = "/etc/elasticfleet/token"
TOKEN_FILE = "token"
# The gateway's own token, which its clients send (a Secret of its own).
GATEWAY_TOKEN_DIR = "/etc/elasticfleet/gateway-token"
TMP_DIR = "/tmp"
# The elasticfleet images' user (`nonroot`); workers run as it whatever the
# image says, so a pod never runs as root by accident.
RUN_AS_USER = 65532
# The worker drains running requests for this long on SIGTERM; the pod is
# given a little more before it is killed.
DRAIN_SECONDS = 30
GRACE_SECONDS = DRAIN_SECONDS + 10
# Preparing the default model (dequantizing it into the cache) takes up to a
# few minutes on a cold node: the startup probe allows 5.
STARTUP_PERIOD_S = 5
STARTUP_FAILURES = 60

Body = dict[str, Any]


def worker_name(spec: FleetSpec) -> str:
    """Name of the fleet's workload and of its Service."""
    return f"{spec.name}{WORKER_SUFFIX}"


def worker_address(spec: FleetSpec, pod_ip: str, pod_port: int | None = None) -> str:
    """Where the operator reaches a worker pod: its IP (an IPv6 one in
    brackets), at the port the pod declares, else the spec's."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"{host}:{pod_port or spec.worker.port}"


def worker_server_name(spec: FleetSpec, pod_ip: str) -> str:
    """The name a TLS worker's certificate is verified against: the pod's
    DNS name under the headless Service (the dashed IP,
    `10-1-2-3.<fleet>-worker.<namespace>.svc`), which a certificate for
    `*.<fleet>-worker.<namespace>.svc` covers, as no certificate covers a
    pod IP known only at run time. The operator still connects to the IP,
    so it needs no DNS and reaches a pod before its record exists. Empty
    without TLS."""
    if not spec.tls_secret:
        return ""
    host = pod_ip.replace(".", "-").replace(":", "-")
    return f"{host}.{worker_name(spec)}.{spec.namespace}.svc"


def selector_labels(spec: FleetSpec, component: str = COMPONENT) -> dict[str, str]:
    """The labels that select a fleet's worker pods, or its gateway's
    (immutable once created; the component keeps the two apart, so the
    workers' Service never selects a gateway)."""
    return {FLEET_LABEL: spec.name, "app.kubernetes.io/component": component}


def label_selector(spec: FleetSpec) -> str:
    """The selector labels as a label-selector string (`k=v,k=v`), the form
    the /scale subresource reports for HPA and KEDA (status.selector)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(spec).items()))


def labels(spec: FleetSpec, component: str = COMPONENT) -> dict[str, str]:
    """The recommended labels plus the selector labels, on every child."""
    return {
        "app.kubernetes.io/name": "elasticfleet",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/managed-by": "elasticfleet-operator",
        **selector_labels(spec, component),
    }


def owner_reference(name: str, uid: str) -> Body:
    """A controller reference to fleet `name`: children are garbage-collected
    with it and only one controller may own them."""
    if not uid:
        raise ValueError(f"fleet {name!r} has no uid; it has not been stored yet")
    return {
        "apiVersion": API_VERSION,
        "kind": FLEET_KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(spec: FleetSpec, owner: Body, component: str = COMPONENT) -> Body:
    name = worker_name(spec) if component == COMPONENT else gateway_name(spec)
    return {
        "name": name,
        "namespace": spec.namespace,
        "labels": labels(spec, component),
        "ownerReferences": [owner],
    }


def worker_command(spec: FleetSpec) -> list[str]:
    """The worker container's command line. The starting budget comes from
    the spec; the operator sends each worker its derived budget with every
    plan, which replaces it."""
    worker = spec.worker
    command = [
        "elasticfleet",
        "worker",
        "--host",
        "0.0.0.0",
        "--port",
        str(worker.port),
        "--metrics-port",
        str(worker.metrics_port),
        "--drain-timeout",
        str(DRAIN_SECONDS),
    ]
    budget = spec.memory.budget
    if budget.bytes is not None:
        command += ["--budget-bytes", str(budget.bytes)]
    else:
        command += ["--budget-fraction", str(budget.fraction)]
    if spec.model_path:
        command += ["--model", spec.model_path]
    if spec.dtype != "fp32":
        command += ["--dtype", spec.dtype]
    for flag, value in (
        ("--max-batch", worker.max_batch),
        ("--max-queue", worker.max_queue),
        ("--threads", worker.threads),
    ):
        if value is not None:
            command += [flag, str(value)]
    if spec.tls_secret:
        command += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    if spec.tls_client_secret:
        command += ["--tls-client-ca", f"{CLIENT_CA_DIR}/{CLIENT_CA_FILE}"]
    if spec.token_secret is not None:
        command += ["--token-file", f"{TOKEN_DIR}/{TOKEN_FILE}"]
    return command


def _secret_env(name: str, secret: SecretKey) -> Body:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}


def worker_env(spec: FleetSpec) -> list[Body]:
    """The environment: the model cache and the adapter store's connection,
    in the variables every elasticfleet command reads (the bearer token is a
    mounted file: pod_template).
    spec.redis is the fleet's own store or, where FleetSpec.parse applied
    it, the operator's default one (spec.DefaultStore)."""
    env: list[Body] = [{"name": "ELASTICFLEET_CACHE", "value": CACHE_DIR}]
    redis = spec.redis
    if redis is not None:
        if redis.url_secret is not None:
            env.append(_secret_env("ELASTICFLEET_REDIS_URL", redis.url_secret))
        else:
            env.append({"name": "ELASTICFLEET_REDIS_URL", "value": redis.url})
        if redis.password_secret is not None:
            env.append(_secret_env("ELASTICFLEET_REDIS_PASSWORD", redis.password_secret))
        env.append({"name": "ELASTICFLEET_REDIS_PREFIX", "value": redis.prefix})
    return env


def _resources(spec: FleetSpec) -> Body:
    # Requests equal limits: a worker's budget is derived from the memory it
    # sees, so it must not be overcommitted.
    amounts: dict[str, str] = {}
    if spec.worker.cpu:
        amounts["cpu"] = spec.worker.cpu
    if spec.worker.memory:
        amounts["memory"] = spec.worker.memory
    if spec.worker.gpus:
        amounts["nvidia.com/gpu"] = str(spec.worker.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _probe(spec: FleetSpec, period: int, failures: int) -> Body:
    # The kubelet's gRPC probe asks grpc.health.v1 but cannot speak TLS; a
    # TLS worker is probed by opening its port.
    port = spec.worker.port
    check: Body = {"tcpSocket": {"port": port}} if spec.tls_secret else {"grpc": {"port": port}}
    return {**check, "periodSeconds": period, "failureThreshold": failures}


# Restricted Pod Security Standard: no root, no privilege escalation, no
# capabilities, the runtime's seccomp profile. The root filesystem is
# read-only, so everything a worker writes goes to a volume: its model
# cache (prepared there at start) and /tmp.
POD_SECURITY: Body = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: Body = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def pod_template(spec: FleetSpec) -> Body:
    """The worker pods' template."""
    container: Body = {
        "name": CONTAINER,
        "image": spec.worker.image,
        "imagePullPolicy": spec.worker.pull_policy,
        "command": worker_command(spec),
        "env": worker_env(spec),
        "ports": [
            {"name": GRPC_PORT_NAME, "containerPort": spec.worker.port, "protocol": "TCP"},
            {
                "name": METRICS_PORT_NAME,
                "containerPort": spec.worker.metrics_port,
                "protocol": "TCP",
            },
        ],
        "startupProbe": _probe(spec, STARTUP_PERIOD_S, STARTUP_FAILURES),
        "readinessProbe": _probe(spec, 5, 2),
        "livenessProbe": _probe(spec, 10, 3),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": TMP_DIR},
        ],
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    volumes: list[Body] = [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    if spec.tls_secret:
        container["volumeMounts"].append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls_secret}})
    if spec.tls_client_secret:
        container["volumeMounts"].append(
            {"name": "client-ca", "mountPath": CLIENT_CA_DIR, "readOnly": True}
        )
        items = [{"key": "ca.crt", "path": CLIENT_CA_FILE}]
        secret = {"secretName": spec.tls_client_secret, "items": items}
        volumes.append({"name": "client-ca", "secret": secret})
    if spec.token_secret is not None:
        container["volumeMounts"].append(
            {"name": "token", "mountPath": TOKEN_DIR, "readOnly": True}
        )
        items = [{"key": spec.token_secret.key, "path": TOKEN_FILE}]
        volumes.append(
            {"name": "token", "secret": {"secretName": spec.token_secret.name, "items": items}}
        )
    pod: Body = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": GRACE_SECONDS,
    }
    if spec.worker.node_selector:
        pod["nodeSelector"] = dict(spec.worker.node_selector)
    return {"metadata": {"labels": labels(spec)}, "spec": pod}


def build_workload(spec: FleetSpec, owner: Body) -> Body:
    """The workers' Deployment or StatefulSet (spec.workload)."""
    body: Body = {
        "apiVersion": "apps/v1",
        "kind": spec.workload,
        "metadata": _metadata(spec, owner),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(spec)},
            "template": pod_template(spec),
        },
    }
    if spec.workload == "StatefulSet":
        body["spec"]["serviceName"] = worker_name(spec)
        body["spec"]["podManagementPolicy"] = "Parallel"
    return body


def build_service(spec: FleetSpec, owner: Body) -> Body:
    """The headless Service in front of the workers (see the module docstring)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, owner),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(spec),
            "ports": [
                {
                    "name": GRPC_PORT_NAME,
                    "port": spec.worker.port,
                    "targetPort": GRPC_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {
                    "name": METRICS_PORT_NAME,
                    "port": spec.worker.metrics_port,
                    "targetPort": METRICS_PORT_NAME,
                    "protocol": "TCP",
                },
            ],
        },
    }


def gateway_name(spec: FleetSpec) -> str:
    """Name of the fleet's gateway Deployment and Service."""
    return f"{spec.name}{GATEWAY_SUFFIX}"


def gateway_url(spec: FleetSpec) -> tuple[str, str]:
    """Where clients in the cluster reach the gateway: its HTTP URL and
    gRPC address, by the Service's DNS name."""
    assert spec.gateway is not None
    host = f"{gateway_name(spec)}.{spec.namespace}.svc"
    return f"http://{host}:{spec.gateway.port}", f"{host}:{spec.gateway.grpc_port}"


def gateway_command(spec: FleetSpec, gateway: GatewaySettings) -> list[str]:
    """The gateway's command line. It finds the workers by resolving their
    headless Service (every ready worker pod), so it needs no API access,
    and polls each with GetStats; it verifies TLS workers by the same pod
    names the operator does (worker_server_name)."""
    service = f"{worker_name(spec)}.{spec.namespace}.svc"
    command = [
        "elasticfleet", "gateway", "--host", "0.0.0.0",
        "--port", str(gateway.port), "--grpc-port", str(gateway.grpc_port),
        "--workers-dns", f"{service}:{spec.worker.port}",
        "--model-name", spec.model_name,
    ]  # fmt: skip
    if spec.tls_secret:
        command += ["--worker-tls-ca", f"{TLS_DIR}/ca.crt", "--worker-server-name-suffix", service]
    if spec.tls_client_secret:
        command += [
            "--worker-tls-cert", f"{CLIENT_CERT_DIR}/tls.crt",
            "--worker-tls-key", f"{CLIENT_CERT_DIR}/tls.key",
        ]  # fmt: skip
    if spec.token_secret is not None:
        command += ["--worker-token-file", f"{TOKEN_DIR}/{TOKEN_FILE}"]
    if gateway.token_secret is not None:
        command += ["--token-file", f"{GATEWAY_TOKEN_DIR}/{TOKEN_FILE}"]
    return command


def _secret_volume(
    name: str, mount: str, secret: str, items: list[Body] | None = None
) -> tuple[Body, Body]:
    """A Secret volume and its read-only mount."""
    volume: Body = {"name": name, "secret": {"secretName": secret}}
    if items is not None:
        volume["secret"]["items"] = items
    return volume, {"name": name, "mountPath": mount, "readOnly": True}


def build_gateway(spec: FleetSpec, owner: Body) -> Body:
    """The gateway's Deployment: the workers' pod security (restricted, a
    read-only root, /tmp on an emptyDir), no service account token (it
    calls no API), ready while some worker is (GET /health)."""
    gateway = spec.gateway
    assert gateway is not None, "build_gateway needs spec.gateway"
    secrets = []
    if spec.tls_secret:
        secrets.append(_secret_volume("tls", TLS_DIR, spec.tls_secret))
    if spec.tls_client_secret:
        items = [{"key": key, "path": key} for key in ("tls.crt", "tls.key")]
        secrets.append(_secret_volume("client", CLIENT_CERT_DIR, spec.tls_client_secret, items))
    for name, mount, key in (
        ("token", TOKEN_DIR, spec.token_secret),
        ("gateway-token", GATEWAY_TOKEN_DIR, gateway.token_secret),
    ):
        if key is not None:
            items = [{"key": key.key, "path": TOKEN_FILE}]
            secrets.append(_secret_volume(name, mount, key.name, items))
    container: Body = {
        "name": GATEWAY_COMPONENT,
        "image": gateway.image,
        "imagePullPolicy": spec.worker.pull_policy,
        "command": gateway_command(spec, gateway),
        "ports": [
            {"name": HTTP_PORT_NAME, "containerPort": gateway.port, "protocol": "TCP"},
            {"name": GRPC_PORT_NAME, "containerPort": gateway.grpc_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": HTTP_PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        # Alive while it listens: no ready worker is not the gateway's fault.
        "livenessProbe": {
            "tcpSocket": {"port": HTTP_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_DIR}, *(m for _, m in secrets)],
    }
    pod: Body = {
        "securityContext": copy.deepcopy(POD_SECURITY),
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}, *(v for v, _ in secrets)],
    }
    if spec.worker.node_selector:
        pod["nodeSelector"] = dict(spec.worker.node_selector)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, owner, GATEWAY_COMPONENT),
        "spec": {
            "replicas": gateway.replicas,
            "selector": {"matchLabels": selector_labels(spec, GATEWAY_COMPONENT)},
            "template": {
                "metadata": {"labels": labels(spec, GATEWAY_COMPONENT)},
                "spec": pod,
            },
        },
    }


def build_gateway_service(spec: FleetSpec, owner: Body) -> Body:
    """The gateway's Service: a ClusterIP (clients want one address; the
    gateway spreads their requests over the workers itself)."""
    gateway = spec.gateway
    assert gateway is not None, "build_gateway_service needs spec.gateway"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, owner, GATEWAY_COMPONENT),
        "spec": {
            "selector": selector_labels(spec, GATEWAY_COMPONENT),
            "ports": [
                {
                    "name": HTTP_PORT_NAME,
                    "port": gateway.port,
                    "targetPort": HTTP_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                {
                    "name": GRPC_PORT_NAME,
                    "port": gateway.grpc_port,
                    "targetPort": GRPC_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
            ],
        },
    }


def build_gateway_stopped(spec: FleetSpec) -> Body:
    """The patch that scales a gateway the spec no longer enables to zero.
    The operator's RBAC has no delete verb (owner references remove a
    fleet's children with it), so a disabled gateway stays as an empty
    Deployment and its Service until the fleet goes."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": gateway_name(spec), "namespace": spec.namespace},
        "spec": {"replicas": 0},
    }


def build_children(spec: FleetSpec, owner: Body) -> list[Body]:
    """Every child of a fleet, Service first (a StatefulSet names it); the
    gateway's too when the spec enables it."""
    children = [build_service(spec, owner), build_workload(spec, owner)]
    if spec.gateway is not None:
        children += [build_gateway_service(spec, owner), build_gateway(spec, owner)]
    return children
