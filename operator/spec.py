"""The ElasticFleet spec as typed values the builders and the control loop read.

An API server validates a custom resource against its CRD before storing
it, but the controller cannot rely on that alone: an object stored before a
CRD upgrade, or served by an API emulator that validates nothing, reaches
the handlers as it is. So `FleetSpec.parse` fills in the CRD's defaults
(from crds.py, so there is one set) and checks the fleet against the CRD as
the API server would (schema_check.py: the same bounds, patterns and
rules), raising `SpecError` with a message that says what to fix; the
handlers turn that into a permanent error and a Degraded condition. What the
CRD admits, the builders turn into children Kubernetes accepts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from elasticfleet.agent.registry import SERVING_POLICIES
from elasticfleet.operator import schema_check
from elasticfleet.operator.crds import fleet_crd, with_defaults
from elasticfleet.worker.adapters.store import DEFAULT_PREFIX
from elasticfleet.worker.model.memory import SERVING_DTYPES


class SecretUnavailable(Exception):
    """A Secret (or key) a fleet names cannot be read yet; the message names it."""


class SpecError(ValueError):
    """A spec the controller cannot act on; the message says what to fix."""


@dataclass(frozen=True)
class SecretKey:
    """One key of a Secret in the fleet's namespace."""

    name: str
    key: str


@dataclass(frozen=True)
class Budget:
    """A worker's budget: a fraction of its usable device memory, or bytes."""

    fraction: float | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.bytes is None):
            raise SpecError("set exactly one of memoryPolicy.budget.fraction and .bytes")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SpecError(f"memoryPolicy.budget.fraction must be in (0, 1], got {self.fraction}")
        if self.bytes is not None and self.bytes < 1:
            raise SpecError(f"memoryPolicy.budget.bytes must be positive, got {self.bytes}")


@dataclass(frozen=True)
class MemoryPolicy:
    """How budgets are derived and plans chosen."""

    policy: str
    budget: Budget
    headroom_bytes: int = 0
    static_ratio: float | None = None
    max_perplexity_ratio: float | None = None
    plan_interval_s: int = 15

    def __post_init__(self) -> None:
        if self.policy not in SERVING_POLICIES:
            raise SpecError(
                f"memoryPolicy.policy {self.policy!r} is not one of {', '.join(SERVING_POLICIES)}"
            )
        if self.static_ratio is not None and self.policy != "static":
            raise SpecError("memoryPolicy.staticRatio applies only to policy static")
        if self.headroom_bytes < 0:
            raise SpecError(f"memoryPolicy.headroomBytes must be >= 0, got {self.headroom_bytes}")
        if self.plan_interval_s < 1:
            raise SpecError("memoryPolicy.planIntervalSeconds must be at least 1")


@dataclass(frozen=True)
class WorkerSettings:
    """How each worker pod runs."""

    image: str
    pull_policy: str = "IfNotPresent"
    port: int = 50051
    metrics_port: int = 9090
    max_batch: int | None = None
    max_queue: int | None = None
    threads: int | None = None
    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None
    node_selector: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GatewaySettings:
    """The fleet's gateway, when spec.gateway.enabled (build.py deploys it)."""

    image: str
    replicas: int = 1
    port: int = 8080
    grpc_port: int = 50052
    token_secret: SecretKey | None = None


@dataclass(frozen=True)
class RedisSettings:
    """Where the adapter store is."""

    url: str | None = None
    url_secret: SecretKey | None = None
    password_secret: SecretKey | None = None
    prefix: str = "elasticfleet:"


@dataclass(frozen=True)
class DefaultStore:
    """The operator's own adapter store (the Helm chart's Valkey, or the
    external Redis it was given), handed to the fleets in the operator's
    namespace whose spec names no spec.redis.

    Only there: a pod can read Secrets of its own namespace only, and the
    store's password Secret lives in the operator's. Copying it into every
    fleet's namespace would let anyone allowed to create an ElasticFleet
    anywhere obtain the password of a store every fleet shares, and the
    operator would need to write Secrets cluster-wide; a fleet elsewhere
    names its store (and a Secret of its own namespace) in spec.redis."""

    namespace: str
    redis: RedisSettings

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> DefaultStore | None:
        """The store that $ELASTICFLEET_REDIS_URL (a URL without a password)
        and _PREFIX describe, its password in the Secret
        $ELASTICFLEET_REDIS_PASSWORD_SECRET (key
        $ELASTICFLEET_REDIS_PASSWORD_SECRET_KEY, default `password`), for
        fleets in $ELASTICFLEET_OPERATOR_NAMESPACE; None unless both the
        URL and the namespace are set (an operator run outside a cluster
        hands no store to fleets)."""

        def value(name: str) -> str:
            return environ.get(name, "").strip()

        url, namespace = value("ELASTICFLEET_REDIS_URL"), value("ELASTICFLEET_OPERATOR_NAMESPACE")
        if not url or not namespace:
            return None
        secret = value("ELASTICFLEET_REDIS_PASSWORD_SECRET")
        key = value("ELASTICFLEET_REDIS_PASSWORD_SECRET_KEY") or "password"
        redis = RedisSettings(
            url=url,
            password_secret=SecretKey(secret, key) if secret else None,
            prefix=value("ELASTICFLEET_REDIS_PREFIX") or DEFAULT_PREFIX,
        )
        return cls(namespace, redis)


@dataclass(frozen=True)
class FleetSpec:
    """A parsed, defaulted ElasticFleet spec."""

    name: str
    namespace: str
    model_name: str
    model_path: str | None
    replicas: int
    workload: str
    worker: WorkerSettings
    memory: MemoryPolicy
    adapters: tuple[str, ...] = ()
    redis: RedisSettings | None = None
    tls_secret: str | None = None
    # Mutual TLS: the operator's client certificate (tls.crt, tls.key) and
    # the CA the workers verify clients against (ca.crt).
    tls_client_secret: str | None = None
    token_secret: SecretKey | None = None
    gateway: GatewaySettings | None = None
    dtype: str = "fp32"  # a key of SERVING_DTYPES

    @property
    def dtype_name(self) -> str:
        """The dtype as the memory model names it."""
        return SERVING_DTYPES[self.dtype]

    @classmethod
    def parse(
        cls,
        name: str,
        namespace: str,
        spec: dict[str, Any],
        default_store: DefaultStore | None = None,
    ) -> FleetSpec:
        """The spec of fleet `namespace/name`, or SpecError saying what to
        fix. Without spec.redis, a fleet in the namespace of
        `default_store` gets that store."""
        fleet = _checked(name, spec)
        raw = fleet["spec"]
        model, worker, policy = raw["model"], raw["worker"], raw["memoryPolicy"]
        budget = policy["budget"]
        resources = worker.get("resources", {})
        floor = policy.get("qualityFloor")
        adapters = tuple(a["name"] for a in raw.get("adapters", []))
        redis = _redis(raw["redis"]) if "redis" in raw else None
        if redis is None and default_store is not None and default_store.namespace == namespace:
            redis = default_store.redis
        if adapters and redis is None:
            where = (
                ""
                if default_store is None
                else f" (the operator's store serves only namespace {default_store.namespace})"
            )
            raise SpecError(
                f"spec.adapters need spec.redis: the store they are fetched from{where}"
            )
        return cls(
            name=name,
            namespace=namespace,
            model_name=model["name"],
            model_path=model.get("path") or None,
            dtype=model.get("dtype", "fp32"),
            replicas=raw["replicas"],
            workload=raw["workload"],
            worker=WorkerSettings(
                image=worker["image"],
                pull_policy=worker["imagePullPolicy"],
                port=worker["port"],
                metrics_port=worker["metricsPort"],
                max_batch=worker.get("maxBatch"),
                max_queue=worker.get("maxQueue"),
                threads=worker.get("threads"),
                gpus=resources.get("gpus", 0),
                cpu=resources.get("cpu"),
                memory=resources.get("memory"),
                node_selector=tuple(sorted(worker.get("nodeSelector", {}).items())),
            ),
            memory=MemoryPolicy(
                policy=policy["policy"],
                budget=Budget(fraction=budget.get("fraction"), bytes=budget.get("bytes")),
                headroom_bytes=policy["headroomBytes"],
                static_ratio=policy.get("staticRatio"),
                max_perplexity_ratio=None if floor is None else floor["maxPerplexityRatio"],
                plan_interval_s=policy["planIntervalSeconds"],
            ),
            adapters=adapters,
            redis=redis,
            tls_secret=(raw.get("tls") or {}).get("secretName"),
            tls_client_secret=(raw.get("tls") or {}).get("clientSecretName"),
            token_secret=_secret((raw.get("auth") or {}).get("tokenSecretRef")),
            gateway=_gateway(raw.get("gateway"), worker["image"]),
        )


def _gateway(raw: dict[str, Any] | None, worker_image: str) -> GatewaySettings | None:
    if not raw or not raw.get("enabled"):
        return None
    return GatewaySettings(
        image=raw.get("image") or worker_image,
        replicas=raw["replicas"],
        port=raw["port"],
        grpc_port=raw["grpcPort"],
        token_secret=_secret(raw.get("tokenSecretRef")),
    )


def _checked(name: str, spec: Any) -> dict[str, Any]:
    """Fleet `name` with `spec`, defaulted, or SpecError with every reason
    the API server would refuse it (schema_check.py)."""
    schema = fleet_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fleet: dict[str, Any] = with_defaults(schema, {"metadata": {"name": name}, "spec": spec})
    errors = schema_check.check(schema, fleet)
    if errors:
        raise SpecError("; ".join(errors))
    return fleet


def _secret(raw: dict[str, str] | None) -> SecretKey | None:
    return None if raw is None else SecretKey(raw["name"], raw["key"])


def _redis(raw: dict[str, Any]) -> RedisSettings:
    return RedisSettings(
        url=raw.get("url"),
        url_secret=_secret(raw.get("urlSecretRef")),
        password_secret=_secret(raw.get("passwordSecretRef")),
        prefix=raw["prefix"],
    )
