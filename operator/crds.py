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
from elasticfleet.operator.syntax import (
    CONFIG_MAP_KEY,
    DNS_1035_LABEL,
    DNS_SUBDOMAIN,
    FLAG_PATH,
    IMAGE,
    IMAGE_ID,
    KEY_PREFIX,
    LABEL_KEY,
    LABEL_KEY_PREFIX,
    LABEL_VALUE,
    MAX_IMAGE,
    MAX_LABEL_VALUE,
    QUANTITY,
    REDIS_URL,
    matches,
)
from elasticfleet.operator.wire import (
    Rule,
    Schema,
    array,
    boolean,
    integer,
    number,
    obj,
    schema_of,
    string,
    validated,
)
from elasticfleet.worker.adapters.names import (
    ADAPTER_VERSION,
    ALL_MODULES,
    MAX_NAME,
    MAX_RANK,
    MAX_TASKS,
    MAX_TEXT,
    MAX_VERSION_DIGITS,
    NAME,
    is_valid_name,
)
from elasticfleet.worker.model.memory import SERVING_DTYPES
from elasticfleet.worker.serving.limits import MAX_THREADS

GROUP = "elasticfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FLEET_KIND = "ElasticFleet"
FLEET_PLURAL = "elasticfleets"
ADAPTER_KIND = "AdapterSet"
ADAPTER_PLURAL = "adaptersets"
PEERING_GROUP = "kopf.dev"

WORKLOADS = ("Deployment", "StatefulSet")
# The largest integer a Kubernetes int64 field holds; byte counts beyond it
# would overflow the worker's uint64 budget on the way.
MAX_INT64 = 2**63 - 1
MAX_DNS_SUBDOMAIN = 253

# The fleet's workers' Service and workload are named <fleet>-worker. A
# Service name is a DNS-1035 label of at most 63 characters. A StatefulSet
# also labels each pod with controller-revision-hash: <statefulset>-<hash of
# up to 10 characters>, a label value of at most 63, so its name must be at
# most 52 (kubernetes/kubernetes#64023).
WORKER_SUFFIX = "-worker"
MAX_FLEET_NAME = 63 - len(WORKER_SUFFIX)
MAX_STATEFUL_FLEET_NAME = 63 - len("-") - 10 - len(WORKER_SUFFIX)
# The gateway's Deployment and Service are named <fleet>-gateway.
GATEWAY_SUFFIX = "-gateway"
MAX_GATEWAY_FLEET_NAME = 63 - len(GATEWAY_SUFFIX)

# The CEL rules of both CRDs, each with its Python twin (wire.Rule), which
# schema_check.py runs where the operator reads a spec. Rules at the root of
# a CRD's schema read self.metadata.name.
PORTS_DIFFER = Rule(
    "self.port != self.metricsPort",
    "port and metricsPort must differ",
    lambda worker: worker["port"] != worker["metricsPort"],
)
ONE_BUDGET = Rule(
    "has(self.fraction) != has(self.bytes)",
    "set exactly one of budget.fraction and budget.bytes",
    lambda budget: ("fraction" in budget) != ("bytes" in budget),
)
STATIC_RATIO = Rule(
    "!has(self.staticRatio) || self.policy == 'static'",
    "staticRatio applies only to policy static",
    lambda policy: "staticRatio" not in policy or policy["policy"] == "static",
)
ONE_URL = Rule(
    "has(self.url) != has(self.urlSecretRef)",
    "set exactly one of redis.url and redis.urlSecretRef",
    lambda redis: ("url" in redis) != ("urlSecretRef" in redis),
)
IMAGE_NOT_ID = Rule(
    f"!self.matches(r'{IMAGE_ID}')",
    "a bare 64-character hex string is an image ID, which the kubelet refuses: name the "
    "repository (repository@sha256:<hex> pins a digest)",
    lambda image: not matches(IMAGE_ID, image),
)
NOT_NEGATIVE = Rule(
    "!self.startsWith('-')",
    "must not be negative: Kubernetes refuses negative requests and limits",
    lambda quantity: not quantity.startswith("-"),
)
LABEL_KEYS = Rule(
    f"self.all(k, k.matches(r'{LABEL_KEY}') && "
    f"(!k.contains('/') || k.matches(r'{LABEL_KEY_PREFIX}')))",
    "nodeSelector keys must be label keys: an optional DNS subdomain prefix of at most 253 "
    "characters and '/', then 1-63 letters, digits, '-', '_' or '.', starting and ending "
    "with a letter or digit",
    lambda selector: all(
        matches(LABEL_KEY, key) and ("/" not in key or matches(LABEL_KEY_PREFIX, key))
        for key in selector
    ),
)
FLEET_NAME = Rule(
    f"self.metadata.name.matches(r'{DNS_1035_LABEL}')",
    "metadata.name must start with a lowercase letter and hold only lowercase letters, digits "
    "and '-', ending with a letter or digit: the fleet's Service is <name>-worker, a DNS-1035 "
    "label; rename the fleet",
    lambda fleet: matches(DNS_1035_LABEL, fleet["metadata"]["name"]),
)
FLEET_NAME_LENGTH = Rule(
    f"self.metadata.name.size() <= {MAX_FLEET_NAME}",
    f"metadata.name must be at most {MAX_FLEET_NAME} characters: the fleet's Service is "
    "<name>-worker, at most 63; rename the fleet",
    lambda fleet: len(fleet["metadata"]["name"]) <= MAX_FLEET_NAME,
)
STATEFUL_FLEET_NAME_LENGTH = Rule(
    f"self.spec.workload != 'StatefulSet' || self.metadata.name.size() <= "
    f"{MAX_STATEFUL_FLEET_NAME}",
    f"a StatefulSet fleet's metadata.name must be at most {MAX_STATEFUL_FLEET_NAME} "
    "characters: each pod's controller-revision-hash label is <name>-worker-<hash>, at most "
    "63; rename the fleet or use workload Deployment",
    lambda fleet: (
        fleet["spec"]["workload"] != "StatefulSet"
        or len(fleet["metadata"]["name"]) <= MAX_STATEFUL_FLEET_NAME
    ),
)
GATEWAY_PORTS_DIFFER = Rule(
    "self.port != self.grpcPort",
    "port and grpcPort must differ",
    lambda gateway: gateway["port"] != gateway["grpcPort"],
)
GATEWAY_FLEET_NAME_LENGTH = Rule(
    "!has(self.spec.gateway) || !self.spec.gateway.enabled || "
    f"self.metadata.name.size() <= {MAX_GATEWAY_FLEET_NAME}",
    f"with spec.gateway.enabled, metadata.name must be at most {MAX_GATEWAY_FLEET_NAME} "
    "characters: the gateway's Service is <name>-gateway, at most 63; rename the fleet",
    lambda fleet: (
        not fleet["spec"].get("gateway", {}).get("enabled", False)
        or len(fleet["metadata"]["name"]) <= MAX_GATEWAY_FLEET_NAME
    ),
)
STORE_NAME = Rule(
    f"(has(self.spec.store) && has(self.spec.store.name)) || self.metadata.name.matches(r'{NAME}')",
    "without spec.store.name, metadata.name is the adapter's name in the store, which must be "
    "1-63 lowercase letters, digits, '-' or '_' (no '.'): set spec.store.name or rename the "
    "AdapterSet",
    lambda adapter_set: (
        "name" in adapter_set["spec"].get("store", {})
        or is_valid_name(adapter_set["metadata"]["name"])
    ),
)
RULES = {
    rule.cel: rule
    for rule in (
        PORTS_DIFFER,
        ONE_BUDGET,
        STATIC_RATIO,
        ONE_URL,
        IMAGE_NOT_ID,
        NOT_NEGATIVE,
        LABEL_KEYS,
        FLEET_NAME,
        FLEET_NAME_LENGTH,
        STATEFUL_FLEET_NAME_LENGTH,
        GATEWAY_PORTS_DIFFER,
        GATEWAY_FLEET_NAME_LENGTH,
        STORE_NAME,
    )
}


def _immutable(node: Schema, what: str) -> Schema:
    rule = {"rule": "self == oldSelf", "message": f"{what} is immutable"}
    return {**node, "x-kubernetes-validations": [*node.get("x-kubernetes-validations", []), rule]}


def _secret_key(description: str) -> Schema:
    return obj(
        description,
        {
            "name": string(
                "Name of the Secret, in the custom resource's namespace.",
                pattern=DNS_SUBDOMAIN,
                maxLength=MAX_DNS_SUBDOMAIN,
            ),
            "key": string(
                "Key within the Secret whose value is used.",
                pattern=CONFIG_MAP_KEY,
                maxLength=MAX_DNS_SUBDOMAIN,
            ),
        },
        required=("name", "key"),
    )


def _quantity(description: str) -> Schema:
    # No request needs 64 characters; the bound keeps every string bounded.
    return validated(string(description, pattern=QUANTITY, maxLength=64), NOT_NEGATIVE)


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
                "empty means the worker prepares its default model into its cache. It is "
                "the worker's --model flag, so it must not start with '-'.",
                pattern=FLAG_PATH,
                maxLength=4096,
            ),
            "dtype": string(
                "Serving dtype of the workers (weights, activations, KV cache); the memory "
                "model counts every byte in it.",
                enum=sorted(SERVING_DTYPES),
                default="fp32",
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
            "cpu": _quantity("CPU request and limit, a Kubernetes quantity (e.g. 500m, 2)."),
            "memory": _quantity("Memory request and limit, a Kubernetes quantity (e.g. 6Gi)."),
        },
    )
    worker = obj(
        "How each worker pod runs.",
        {
            "image": validated(
                string(
                    "Container image holding elasticfleet: [registry[:port]/]repository"
                    "[:tag][@digest], as the kubelet reads it (the repository lowercase).",
                    pattern=IMAGE,
                    maxLength=MAX_IMAGE,
                ),
                IMAGE_NOT_ID,
            ),
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
            "threads": integer(
                "Torch threads per worker (default: torch's choice).",
                minimum=1,
                maximum=MAX_THREADS,
            ),
            "resources": resources,
            "nodeSelector": validated(
                {
                    "type": "object",
                    "description": "Node labels a worker pod must match (label keys and values).",
                    "additionalProperties": string(
                        "A label value.", pattern=LABEL_VALUE, maxLength=MAX_LABEL_VALUE
                    ),
                    "maxProperties": 64,
                },
                LABEL_KEYS,
            ),
        },
        required=("image",),
        rules=(PORTS_DIFFER,),
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
            "bytes": integer("Budget in bytes.", minimum=1, maximum=MAX_INT64),
        },
        rules=(ONE_BUDGET,),
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
                "Bytes of device memory left unbudgeted on every worker.",
                minimum=0,
                maximum=MAX_INT64,
                default=0,
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
        rules=(STATIC_RATIO,),
    )
    redis = obj(
        "The Redis server the adapters are stored in: a URL, or a Secret holding it. Without "
        "it, a fleet in the operator's namespace uses the operator's store (the Helm chart's "
        "Valkey); a fleet elsewhere that serves adapters needs it.",
        {
            "url": string(
                "redis:// or rediss:// (TLS) URL: [user@]host[:port][/db], without a password "
                "(passwordSecretRef holds it) or query options (urlSecretRef may hold those).",
                pattern=REDIS_URL,
                maxLength=2048,
            ),
            "urlSecretRef": _secret_key("A Secret key holding the URL (it may carry a password)."),
            "passwordSecretRef": _secret_key("A Secret key holding the Redis password."),
            "prefix": string(
                "Key prefix of the adapter store: printable ASCII without spaces.",
                pattern=KEY_PREFIX,
                maxLength=256,
                default="elasticfleet:",
            ),
        },
        rules=(ONE_URL,),
    )
    tls = obj(
        "TLS between the operator, clients and the workers' gRPC endpoints.",
        {
            "secretName": string(
                "A kubernetes.io/tls Secret: workers serve tls.crt and tls.key, which must "
                "cover *.<fleet>-worker.<namespace>.svc (the operator verifies each worker, "
                "reached by IP, as its pod's name under the headless Service) and are "
                "verified against ca.crt (else tls.crt).",
                pattern=DNS_SUBDOMAIN,
                maxLength=MAX_DNS_SUBDOMAIN,
            ),
            "clientSecretName": string(
                "Mutual TLS: a kubernetes.io/tls Secret (e.g. a cert-manager Certificate "
                "with the client auth usage) whose tls.crt and tls.key the operator and the "
                "fleet's gateway present to the workers, and whose ca.crt the workers require "
                "every client's certificate to chain to (only ca.crt is mounted into the "
                "workers). Other clients need a certificate from that CA too.",
                pattern=DNS_SUBDOMAIN,
                maxLength=MAX_DNS_SUBDOMAIN,
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
    gateway = obj(
        "The fleet's gateway: one HTTP (TGI and OpenAI APIs) and gRPC endpoint that routes "
        "each request by the workers' plans, load and adapters (`elasticfleet gateway`).",
        {
            "enabled": boolean("Deploy the gateway (a Deployment and a Service).", default=False),
            "replicas": integer("Gateway pods.", minimum=1, maximum=100, default=1),
            "port": integer("HTTP port of the gateway.", minimum=1, maximum=65535, default=8080),
            "grpcPort": integer(
                "gRPC port of the gateway (Worker/Generate passthrough).",
                minimum=1,
                maximum=65535,
                default=50052,
            ),
            "image": validated(
                string(
                    "Container image holding elasticfleet (default: the workers' image), as "
                    "spec.worker.image.",
                    pattern=IMAGE,
                    maxLength=MAX_IMAGE,
                ),
                IMAGE_NOT_ID,
            ),
            "tokenSecretRef": _secret_key(
                "A Secret key holding the bearer token the gateway requires of its clients on "
                "every route but /health and /metrics; without it the gateway is open."
            ),
        },
        rules=(GATEWAY_PORTS_DIFFER,),
    )
    adapter = obj(
        "An AdapterSet this fleet serves.",
        {
            "name": string(
                "Name of the AdapterSet, in the fleet's namespace.",
                pattern=DNS_SUBDOMAIN,
                maxLength=MAX_DNS_SUBDOMAIN,
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
            "gateway": gateway,
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
                "Name of the adapter in the store (default: the AdapterSet's name): 1-63 "
                "lowercase letters, digits, '-' or '_', as the store names adapters.",
                pattern=NAME,
                maxLength=MAX_NAME,
            ),
            "version": string(
                "Version to serve, a positive integer; empty serves the store's current version.",
                pattern=ADAPTER_VERSION,
                maxLength=MAX_VERSION_DIGITS,
            ),
        },
    )
    return obj(
        "An AsymLoRA adapter set: one shared A per adapted module, one B head per task.",
        {
            "baseModel": _immutable(
                string("Base model it was trained for.", minLength=1, maxLength=MAX_TEXT),
                "baseModel",
            ),
            "tasks": array(
                "Task heads, one B matrix each.",
                string(
                    "A task name: 1-63 lowercase letters, digits, '-' or '_'.",
                    pattern=NAME,
                    maxLength=MAX_NAME,
                ),
                minItems=1,
                maxItems=MAX_TASKS,
                **{"x-kubernetes-list-type": "set"},
            ),
            "rank": _immutable(integer("LoRA rank.", minimum=1, maximum=MAX_RANK), "rank"),
            "alpha": number(
                "LoRA scaling numerator (scale = alpha / rank).",
                minimum=0,
                exclusiveMinimum=True,
            ),
            "modules": _immutable(
                array(
                    "Projections adapted in every layer.",
                    string("A projection.", enum=list(ALL_MODULES)),
                    minItems=1,
                    maxItems=len(ALL_MODULES),
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
    rules: tuple[Rule, ...],
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
        rules=rules,
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
        (FLEET_NAME, FLEET_NAME_LENGTH, STATEFUL_FLEET_NAME_LENGTH, GATEWAY_FLEET_NAME_LENGTH),
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
        (STORE_NAME,),
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
