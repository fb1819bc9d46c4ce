"""The custom resource definitions: `ElasticFleet` and `AdapterSet`.

This module is the one source of truth for the CRD YAML that kubectl, Helm
and the tests use (`elasticfleet operator crds` prints it), so the schema a
cluster enforces and the fields the controller reads cannot drift apart.
Every field carries a description and the validation an API server can do
for us (types, enums, bounds, patterns, and CEL rules for cross-field and
immutable fields): a bad spec is refused by `kubectl apply` instead of
surfacing later as a controller error. No `x-kubernetes-preserve-unknown-
fields` anywhere: unknown fields are pruned, not silently kept. The spec
schemas are written here by hand; the status schemas are generated from the
typed status the operator writes (status.py), so neither can drift.
"""

from __future__ import annotations

from typing import Any

import yaml

from elasticfleet.agent.registry import SERVING_POLICIES, describe_serving_policies
from elasticfleet.operator.status import MAX_WORKERS, AdapterSetStatus, FleetStatus
from elasticfleet.operator.wire import (
    Schema,
    array,
    boolean,
    integer,
    number,
    obj,
    schema_of,
    string,
)

GROUP = "elasticfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FLEET_KIND = "ElasticFleet"
FLEET_PLURAL = "elasticfleets"
ADAPTER_KIND = "AdapterSet"
ADAPTER_PLURAL = "adaptersets"
PEERING_GROUP = "kopf.dev"

WORKLOADS = ("Deployment", "StatefulSet")
ADAPTER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A DNS-1123 label (names of objects, tasks) and subdomain (Secrets, nodes).
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes resource quantities such as 500m, 2, 16Gi, 1.5e9.
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


def _immutable(node: Schema, what: str) -> Schema:
    rule = {"rule": "self == oldSelf", "message": f"{what} is immutable"}
    return {**node, "x-kubernetes-validations": [*node.get("x-kubernetes-validations", []), rule]}


def _secret_key(description: str) -> Schema:
    return obj(
        description,
        {
            "name": string(
                "Name of the Secret, in the custom resource's namespace.", maxLength=253
            ),
            "key": string("Key within the Secret whose value is used.", maxLength=253, minLength=1),
        },
        required=("name", "key"),
    )


def fleet_spec_schema() -> Schema:
    model = obj(
        "The base model every worker of the fleet serves.",
        {
            "name": string(
                "Name of the base model (e.g. SmolLM2-135M-Instruct); AdapterSets must name "
                "the same base model.",
                minLength=1,
                maxLength=253,
            ),
            "path": string(
                "Model directory inside the worker image (config.json + model.safetensors); "
                "empty means the worker prepares its default model into its cache.",
                maxLength=4096,
            ),
        },
        required=("name",),
    )
    resources = obj(
        "Compute resources of each worker pod.",
        {
            "gpus": integer(
                "NVIDIA GPUs per worker (nvidia.com/gpu); 0 runs on CPU.",
                minimum=0,
                maximum=16,
                default=0,
            ),
            "cpu": string("CPU request and limit, a Kubernetes quantity.", pattern=QUANTITY),
            "memory": string("Memory request and limit, a Kubernetes quantity.", pattern=QUANTITY),
        },
    )
    worker = obj(
        "How each worker pod runs.",
        {
            "image": string("Container image holding elasticfleet.", minLength=1, maxLength=1024),
            "imagePullPolicy": string(
                "When the kubelet pulls the image.",
                enum=["Always", "IfNotPresent", "Never"],
                default="IfNotPresent",
            ),
            "port": integer("gRPC port of the worker.", minimum=1, maximum=65535, default=50051),
            "metricsPort": integer(
                "Port of the worker's Prometheus /metrics.",
                minimum=1,
                maximum=65535,
                default=9090,
            ),
            "maxBatch": integer("Most sequences per decode step.", minimum=1, maximum=4096),
            "maxQueue": integer("Most requests waiting for memory.", minimum=0, maximum=100000),
            "threads": integer("Torch threads per worker (default: torch's choice).", minimum=1),
            "resources": resources,
            "nodeSelector": {
                "type": "object",
                "description": "Node labels a worker pod must match.",
                "additionalProperties": {"type": "string"},
                "maxProperties": 64,
            },
        },
        required=("image",),
        rules=(("self.port != self.metricsPort", "port and metricsPort must differ"),),
    )
    budget = obj(
        "Each worker's memory budget for weights, KV cache and adapters: a fraction of its "
        "device's memory, or bytes. Exactly one of the two.",
        {
            "fraction": number(
                "Share of the device memory the worker may use (of its total minus what other "
                "processes hold).",
                minimum=0,
                exclusiveMinimum=True,
                maximum=1,
            ),
            "bytes": integer("Budget in bytes.", minimum=1),
        },
        rules=(
            (
                "has(self.fraction) != has(self.bytes)",
                "set exactly one of budget.fraction and budget.bytes",
            ),
        ),
    )
    quality = obj(
        "The least quality a plan may have; a plan predicted to be worse is not pushed and the "
        "fleet is marked Degraded.",
        {
            "maxPerplexityRatio": number(
                "Largest predicted perplexity of a plan relative to the dense model "
                "(1.0 allows no loss).",
                minimum=1,
                maximum=1000,
            ),
        },
        required=("maxPerplexityRatio",),
    )
    memory_policy = obj(
        "How the operator sizes each worker's budget and chooses its pruning plan.",
        {
            "policy": string(
                f"Which policy chooses the blocks to keep: {describe_serving_policies()}.",
                enum=list(SERVING_POLICIES),
                default="rl",
            ),
            "staticRatio": number(
                "Share of blocks the static policy drops.", minimum=0, maximum=0.99
            ),
            "budget": budget,
            "headroomBytes": integer(
                "Bytes of device memory left unbudgeted on every worker.", minimum=0, default=0
            ),
            "qualityFloor": quality,
            "planIntervalSeconds": integer(
                "Seconds between two control ticks of the fleet.",
                minimum=1,
                maximum=3600,
                default=15,
            ),
        },
        required=("budget",),
        rules=(
            (
                "!has(self.staticRatio) || self.policy == 'static'",
                "staticRatio applies only to policy static",
            ),
        ),
    )
    redis = obj(
        "The Redis server the adapters are stored in: a URL, or a Secret holding it. Without "
        "it, a fleet in the operator's namespace uses the operator's store (the Helm chart's "
        "Valkey); a fleet elsewhere that serves adapters needs it.",
        {
            "url": string(
                "redis:// or rediss:// (TLS) URL, without a password.",
                pattern=r"^rediss?://[^\s]+$",
                maxLength=2048,
            ),
            "urlSecretRef": _secret_key("A Secret key holding the URL (it may carry a password)."),
            "passwordSecretRef": _secret_key("A Secret key holding the Redis password."),
            "prefix": string(
                "Key prefix of the adapter store.", maxLength=256, default="elasticfleet:"
            ),
        },
        rules=(
            (
                "has(self.url) != has(self.urlSecretRef)",
                "set exactly one of redis.url and redis.urlSecretRef",
            ),
        ),
    )
    tls = obj(
        "TLS between the operator, clients and the workers' gRPC endpoints.",
        {
            "secretName": string(
                "A kubernetes.io/tls Secret: workers serve tls.crt and tls.key, which must "
                "cover *.<fleet>-worker.<namespace>.svc (the operator verifies each worker, "
                "reached by IP, as its pod's name under the headless Service) and are "
                "verified against ca.crt (else tls.crt).",
                minLength=1,
                maxLength=253,
            ),
            "clientSecretName": string(
                "Mutual TLS: a kubernetes.io/tls Secret (e.g. a cert-manager Certificate "
                "with the client auth usage) whose tls.crt and tls.key the operator presents "
                "to the workers, and whose ca.crt the workers require every client's "
                "certificate to chain to (only ca.crt is mounted into the workers). Clients "
                "other than the operator need a certificate from that CA too.",
                minLength=1,
                maxLength=253,
            ),
        },
        required=("secretName",),
    )
    auth = obj(
        "Bearer-token authentication of the workers' gRPC API.",
        {
            "tokenSecretRef": _secret_key(
                "A Secret key holding the token workers require on every RPC but health "
                "checks; the operator sends it, and so must every client. Without spec.tls "
                "it crosses the pod network in clear text."
            ),
        },
        required=("tokenSecretRef",),
    )
    adapter = obj(
        "An AdapterSet this fleet serves.",
        {
            "name": string(
                "Name of the AdapterSet, in the fleet's namespace.", pattern=DNS_LABEL, maxLength=63
            ),
        },
        required=("name",),
    )
    return obj(
        "The desired fleet: which model, how many workers, and how their memory is managed.",
        {
            "model": _immutable(model, "model"),
            "replicas": integer("Number of workers.", minimum=0, maximum=MAX_WORKERS, default=1),
            "workload": _immutable(
                string(
                    "Kind of the workers' workload: Deployment (interchangeable pods) or "
                    "StatefulSet (stable pod names and per-pod caches).",
                    enum=list(WORKLOADS),
                    default="Deployment",
                ),
                "workload",
            ),
            "worker": worker,
            "memoryPolicy": memory_policy,
            "adapters": array(
                "AdapterSets the workers serve.",
                adapter,
                maxItems=32,
                **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
            ),
            "redis": redis,
            "tls": tls,
            "auth": auth,
        },
        # No rule that adapters need spec.redis: the API server cannot know
        # whether the operator has a default store for the fleet's
        # namespace; FleetSpec.parse refuses what it cannot serve.
        required=("model", "worker", "memoryPolicy"),
    )


def fleet_status_schema() -> Schema:
    """Generated from the typed status (status.py), so the two cannot drift."""
    return schema_of(FleetStatus, "What the operator observed and did.")


def adapter_spec_schema() -> Schema:
    store = obj(
        "Where the adapter set lives in the fleet's Redis store.",
        {
            "name": string(
                "Name of the adapter in the store (default: the AdapterSet's name).",
                minLength=1,
                maxLength=128,
            ),
            "version": string(
                "Version to serve; empty serves the store's current version.",
                pattern=r"^[0-9]*$",
                maxLength=20,
            ),
        },
    )
    return obj(
        "An AsymLoRA adapter set: one shared A per adapted module, one B head per task.",
        {
            "baseModel": _immutable(
                string("Base model it was trained for.", minLength=1, maxLength=253), "baseModel"
            ),
            "tasks": array(
                "Task heads, one B matrix each.",
                string("A task name.", pattern=DNS_LABEL, maxLength=63),
                minItems=1,
                maxItems=64,
                **{"x-kubernetes-list-type": "set"},
            ),
            "rank": _immutable(integer("LoRA rank.", minimum=1, maximum=256), "rank"),
            "alpha": number(
                "LoRA scaling numerator (scale = alpha / rank).",
                minimum=0,
                exclusiveMinimum=True,
                maximum=4096,
            ),
            "modules": _immutable(
                array(
                    "Projections adapted in every layer.",
                    string("A projection.", enum=list(ADAPTER_MODULES)),
                    minItems=1,
                    maxItems=len(ADAPTER_MODULES),
                    **{"x-kubernetes-list-type": "set"},
                ),
                "modules",
            ),
            "router": boolean(
                "Whether the set has a HydraLoRA router (requests may mix heads).", default=False
            ),
            "store": store,
        },
        required=("baseModel", "tasks", "rank", "modules"),
    )


def adapter_status_schema() -> Schema:
    """Generated from the typed status (status.py), so the two cannot drift."""
    return schema_of(AdapterSetStatus, "What the operator found in the store.")


def _column(name: str, path: str, kind: str, description: str, priority: int = 0) -> Schema:
    column: Schema = {"name": name, "type": kind, "jsonPath": path, "description": description}
    if priority:
        column["priority"] = priority
    return column


def _condition_column(kind: str) -> Schema:
    return _column(
        kind, f'.status.conditions[?(@.type=="{kind}")].status', "string", f"{kind} condition"
    )


def _crd(
    kind: str,
    plural: str,
    short_names: list[str],
    spec: Schema,
    status: Schema,
    columns: list[Schema],
    description: str,
    subresources: Schema,
) -> dict[str, Any]:
    schema = obj(
        description,
        {
            "apiVersion": string("Versioned schema of this representation of an object."),
            "kind": string("REST resource this object represents."),
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec,
            "status": status,
        },
        required=("spec",),
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["elasticfleet"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def fleet_crd() -> dict[str, Any]:
    """The ElasticFleet CustomResourceDefinition."""
    columns = [
        _column("Model", ".spec.model.name", "string", "Base model"),
        _column("Replicas", ".spec.replicas", "integer", "Desired workers"),
        _column("Ready", ".status.readyReplicas", "integer", "Ready workers"),
        _column("Policy", ".spec.memoryPolicy.policy", "string", "Pruning policy"),
        _condition_column("Available"),
        _condition_column("Degraded"),
        _column("Age", ".metadata.creationTimestamp", "date", "Time since creation"),
    ]
    return _crd(
        FLEET_KIND,
        FLEET_PLURAL,
        ["ef", "efleet"],
        fleet_spec_schema(),
        fleet_status_schema(),
        columns,
        "A fleet of workers serving one base model under one memory policy.",
        # /scale lets an HPA or KEDA set spec.replicas; it reads the replicas
        # and the pods' selector from the status the operator writes.
        {
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
    )


def adapter_crd() -> dict[str, Any]:
    """The AdapterSet CustomResourceDefinition."""
    columns = [
        _column("Base", ".spec.baseModel", "string", "Base model"),
        _column("Rank", ".spec.rank", "integer", "LoRA rank"),
        _column("Tasks", ".spec.tasks", "string", "Task heads", priority=1),
        _column("Ready", ".status.ready", "boolean", "Found in the store"),
        _column("Version", ".status.version", "string", "Version found"),
        _column("Size", ".status.sizeBytes", "integer", "Bytes of its parts"),
        _column("Age", ".metadata.creationTimestamp", "date", "Time since creation"),
    ]
    return _crd(
        ADAPTER_KIND,
        ADAPTER_PLURAL,
        ["adset"],
        adapter_spec_schema(),
        adapter_status_schema(),
        columns,
        "An AsymLoRA adapter set kept in Redis, served by ElasticFleets.",
        {"status": {}},
    )


def all_crds() -> list[dict[str, Any]]:
    return [fleet_crd(), adapter_crd()]


def peering_crds() -> list[dict[str, Any]]:
    """kopf's peering resources (group kopf.dev), which `operator run
    --peering` needs: ClusterKopfPeering for an operator serving every
    namespace, KopfPeering for one serving named namespaces. Each peering
    object's status maps every running replica to its priority and
    lifetime; kopf writes it, so it is left unchecked."""
    crds = []
    for kind, scope in (("ClusterKopfPeering", "Cluster"), ("KopfPeering", "Namespaced")):
        plural = f"{kind.lower()}s"
        schema = obj(
            "Where replicas of a kopf operator find each other: the one with the "
            "highest priority is active, the others pause.",
            {
                "apiVersion": string("Versioned schema of this representation of an object."),
                "kind": string("REST resource this object represents."),
                "metadata": {"type": "object", "description": "Standard object metadata."},
                "status": {
                    "type": "object",
                    "description": "Every running replica, by identity: priority and lifetime.",
                    "x-kubernetes-preserve-unknown-fields": True,
                },
            },
        )
        crds.append(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.{PEERING_GROUP}"},
                "spec": {
                    "group": PEERING_GROUP,
                    "scope": scope,
                    "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                    "versions": [
                        {
                            "name": "v1",
                            "served": True,
                            "storage": True,
                            "schema": {"openAPIV3Schema": schema},
                        }
                    ],
                },
            }
        )
    return crds


def peering_objects(name: str, namespaces: list[str]) -> list[dict[str, Any]]:
    """The peering object(s) replicas named `name` meet at: one
    ClusterKopfPeering, or a KopfPeering in each namespace served."""
    api = f"{PEERING_GROUP}/v1"
    if not namespaces:
        return [{"apiVersion": api, "kind": "ClusterKopfPeering", "metadata": {"name": name}}]
    return [
        {"apiVersion": api, "kind": "KopfPeering", "metadata": {"name": name, "namespace": ns}}
        for ns in namespaces
    ]


def render_crds(peering: str | None = None, namespaces: list[str] | None = None) -> str:
    """The CRDs as one multi-document YAML stream, as kubectl applies it;
    with `peering`, also kopf's peering CRDs and the peering object(s)."""
    documents = all_crds()
    if peering:
        documents += peering_crds() + peering_objects(peering, namespaces or [])
    return yaml.safe_dump_all(documents, sort_keys=False, width=100)


def with_defaults(schema: Schema, value: Any) -> Any:
    """`value` with the schema's defaults filled in, as an API server stores
    it. The controller applies this too, so it reads the same spec whether
    or not the server it talks to defaults (an emulator does not)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        properties: dict[str, Schema] = schema.get("properties", {})
        filled = dict(value)
        for name, child in properties.items():
            if name in filled:
                filled[name] = with_defaults(child, filled[name])
            elif "default" in child:
                filled[name] = child["default"]
        return filled
    if isinstance(value, list) and schema.get("type") == "array":
        return [with_defaults(schema["items"], item) for item in value]
    return value
