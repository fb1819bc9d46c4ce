"""The kopf handlers: thin glue between Kubernetes and the rest of the operator.

- create / update / resume of an ElasticFleet: parse the spec (a bad spec is
  a PermanentError and a Degraded condition that says what to fix), then
  create or patch its children from the pure builders (build.py). Children
  carry owner references, so deletion is garbage collection; the
  domain-qualified finalizer exists so the fleet's worker connections are
  closed before the object goes.
- a timer per fleet runs the control loop (control.py) every
  planIntervalSeconds over the fleet's ready worker pods and with the
  adapter sets its spec names, both kept by indexes from watches (no API
  call per tick); its status (status.FleetStatus, with the replicas and
  the Progressing condition added here) is written through the operator's
  own client (kube.py says why not through kopf's patch), its Events go
  through `kopf.event`.

- an AdapterSet is checked against the adapter store (adapters.py) when it
  changes and every minute; its status says whether the version it names
  is published and matches. It is checked in the Redis of every fleet that
  serves it (spec.redis, or the operator's default store for fleets in its
  namespace: spec.DefaultStore; Secrets resolved), and, while no fleet does, in
  the operator's own store if it has one (ELASTICFLEET_REDIS_URL,
  _PASSWORD, _PREFIX, as for every command).

Log in explicitly (`@kopf.on.login`): in a pod with its service account,
else from the kubeconfig. The same credentials build the small client that
creates children (kube.py).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar

import kopf

from elasticfleet.operator import build, crds
from elasticfleet.operator.adapters import (
    StoreOpener,
    adapter_status,
    check_in_stores,
    store_name,
)
from elasticfleet.operator.conditions import set_condition
from elasticfleet.operator.control import (
    AdapterWant,
    FleetController,
    FleetEvent,
    WorkerEndpoint,
    profile_for_model,
    utc_now,
)
from elasticfleet.operator.fleet_access import (
    fleet_credentials,
    store_address,
)
from elasticfleet.operator.kube import KubeApi, KubeError, custom_object_path, object_path
from elasticfleet.operator.spec import (
    DefaultStore,
    FleetSpec,
    RedisSettings,
    SecretUnavailable,
    SpecError,
)
from elasticfleet.operator.status import FleetStatus, GatewayStatus, read_conditions
from elasticfleet.worker.adapters.store import AdapterStore

log = logging.getLogger(__name__)

FINALIZER = f"{crds.GROUP}/finalizer"
FLEETS = (crds.GROUP, crds.VERSION, crds.FLEET_PLURAL)
ADAPTER_SETS = (crds.GROUP, crds.VERSION, crds.ADAPTER_PLURAL)
ADAPTER_CHECK_S = 60.0
IDLE_STORE_S = 10 * ADAPTER_CHECK_S
# The timer wakes this often and ticks when the fleet's interval has passed,
# so a changed planIntervalSeconds applies without a restart.
WAKE_S = 1.0
LOOP_CONDITIONS = ("Available", "Degraded")
RETRY_DELAY_S = 10
WATCH_TIMEOUT_S = 600


class _Connection:
    """The login's credentials and the client built from them. kopf hands
    handlers no API client, and logs in once per operator process."""

    info: kopf.ConnectionInfo | None = None
    api: KubeApi | None = None

    @classmethod
    def client(cls) -> KubeApi:
        if cls.api is None:
            if cls.info is None:
                raise kopf.TemporaryError("not logged in to the API server yet", delay=1)
            cls.api = KubeApi(cls.info)
        return cls.api


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=crds.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=crds.GROUP, key="last-handled-configuration"
    )
    # kopf's own per-handler Events would drown the plan changes.
    settings.posting.level = logging.WARNING
    # Watches that end on the server's side are reopened rather than trusted
    # forever: a silently dead connection would freeze the operator's view.
    settings.watching.server_timeout = WATCH_TIMEOUT_S
    settings.watching.client_timeout = WATCH_TIMEOUT_S + 60
    settings.watching.connect_timeout = 60


@kopf.on.login()
async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    # kopf logs in again when credentials expire: the client follows.
    if _Connection.api is not None:
        await _Connection.api.close()
        _Connection.api = None
    _Connection.info = info
    return info


class _Stores:
    """The adapter stores AdapterSets are checked in, each opened once: the
    fleets' (by URL, password and prefix) and the operator's own. Every
    AdapterSet is checked each minute, and each check sweeps first: a
    fleet's store not asked for in IDLE_STORE_S (its fleet gone, its
    password rotated) is closed."""

    opened: ClassVar[dict[tuple[str, str | None, str], tuple[AdapterStore, float]]] = {}
    own: ClassVar[AdapterStore | None] = None

    @classmethod
    def get(cls, url: str, password: str | None, prefix: str) -> AdapterStore:
        key = (url, password, prefix)
        store = cls.opened[key][0] if key in cls.opened else None
        if store is None:
            store = AdapterStore.from_url(url, password=password, prefix=prefix)
        cls.opened[key] = (store, time.monotonic())
        return store

    @classmethod
    def sweep(cls) -> None:
        now = time.monotonic()
        for key, (idle, used) in list(cls.opened.items()):
            if now - used > IDLE_STORE_S:
                del cls.opened[key]
                _close_quietly(idle)

    @classmethod
    def operators(cls) -> AdapterStore | None:
        if cls.own is None:
            cls.own = AdapterStore.from_environment()
        return cls.own

    @classmethod
    def close(cls) -> None:
        for store in [*(s for s, _ in cls.opened.values()), *([cls.own] if cls.own else [])]:
            _close_quietly(store)
        cls.opened, cls.own = {}, None


def _close_quietly(store: AdapterStore) -> None:
    try:
        store.close()
    except Exception:  # a pool that fails to close is dropped all the same
        log.warning("closing an adapter store failed", exc_info=True)


@kopf.on.cleanup()
async def close_client(**_: Any) -> None:
    if _Connection.api is not None:
        await _Connection.api.close()
        _Connection.api = None
    _Stores.close()


def _namespace(namespace: str | None) -> str:
    if not namespace:
        raise kopf.PermanentError("an ElasticFleet must be namespaced")
    return namespace


def _parse(name: str, namespace: str | None, spec: kopf.Spec) -> FleetSpec:
    """The fleet's spec, with the operator's default store where it applies
    (read from the environment each time: a handful of lookups)."""
    return FleetSpec.parse(name, _namespace(namespace), dict(spec), DefaultStore.from_environment())


@kopf.on.create(*FLEETS)
@kopf.on.update(*FLEETS, field="spec")
@kopf.on.resume(*FLEETS)
async def reconcile(
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    uid: str,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """Create or patch the fleet's Service and workload (and its gateway's
    Deployment and Service, whose address goes into the status)."""
    generation = int(meta.get("generation", 0))
    conditions = read_conditions(status)
    try:
        fleet = _parse(name, namespace, spec)
        profile_for_model(fleet.model_name)
    except SpecError as error:
        invalid = set_condition(
            conditions,
            "Degraded",
            True,
            "InvalidSpec",
            str(error),
            now=utc_now(),
            generation=generation,
        )
        patch.status.update(
            FleetStatus(observed_generation=generation, conditions=invalid).to_dict()
        )
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    api = _Connection.client()
    try:
        for child in build.build_children(fleet, build.owner_reference(name, uid)):
            await api.apply(child)
        if fleet.gateway is None:
            await _stop_gateway(api, fleet)
    except KubeError as error:
        raise kopf.TemporaryError(f"creating children: {error}", delay=RETRY_DELAY_S) from error
    # Conditions are otherwise the control timer's: a list written from two
    # handlers' views would drop whatever the other wrote meanwhile (a merge
    # patch replaces lists), so this writes them only to clear its own.
    cleared = None
    if any(c.type == "Degraded" and c.reason == "InvalidSpec" for c in conditions):
        cleared = set_condition(
            conditions,
            "Degraded",
            False,
            "SpecAccepted",
            "the spec is valid",
            now=utc_now(),
            generation=generation,
        )
    gateway = None
    if fleet.gateway is not None:
        url, grpc_address = build.gateway_url(fleet)
        gateway = GatewayStatus(url=url, grpc_address=grpc_address)
    accepted = FleetStatus(observed_generation=generation, conditions=cleared, gateway=gateway)
    patch.status.update(accepted.to_dict())
    if gateway is None and status.get("gateway") is not None:
        patch.status["gateway"] = None  # a merge patch's null removes it


async def _stop_gateway(api: KubeApi, fleet: FleetSpec) -> None:
    """Scale to zero a gateway the spec no longer enables, if there is one."""
    path = object_path("Deployment", fleet.namespace, build.gateway_name(fleet))
    if await api.get(path) is not None:
        await api.apply(build.build_gateway_stopped(fleet))


@kopf.on.delete(*FLEETS)
async def release(memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Close the fleet's worker connections; owner references remove its children."""
    controller: FleetController | None = memo.get("controller")
    if controller is not None:
        await controller.close()
    logger.info("children are removed by their owner references")


@dataclass(frozen=True)
class ServingFleet:
    """A fleet that serves an AdapterSet, and the Redis its workers fetch from."""

    name: str
    redis: RedisSettings


@kopf.index(*FLEETS)
def fleets_by_adapter(
    name: str, namespace: str | None, spec: kopf.Spec, **_: Any
) -> dict[tuple[str | None, str], ServingFleet]:
    """Fleets by (namespace, AdapterSet they serve)."""
    try:
        fleet = _parse(name, namespace, spec)
    except (SpecError, kopf.PermanentError):
        return {}  # reconcile says what to fix
    if fleet.redis is None:
        return {}
    return {(namespace, adapter): ServingFleet(name, fleet.redis) for adapter in fleet.adapters}


async def _fleet_store(namespace: str, redis: RedisSettings) -> AdapterStore:
    """A fleet's store; ValueError for a malformed URL, naming the Secret it
    came from and never the URL (it may hold a password)."""
    address = await store_address(_read_secret, namespace, redis)
    try:
        return _Stores.get(address.url, address.password, address.prefix)
    except ValueError as error:
        ref = address.url_secret
        where = "spec.redis.url" if ref is None else f"the URL in Secret {ref.name} (key {ref.key})"
        raise ValueError(f"{where}: {error}") from None


async def _operators_store() -> AdapterStore | None:
    try:
        return _Stores.operators()
    except ValueError as error:
        raise ValueError(f"ELASTICFLEET_REDIS_URL: {error}") from None


@kopf.on.create(*ADAPTER_SETS)
@kopf.on.update(*ADAPTER_SETS, field="spec")
@kopf.on.resume(*ADAPTER_SETS)
@kopf.timer(*ADAPTER_SETS, interval=ADAPTER_CHECK_S)
async def check_adapters(
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    **kwargs: Any,
) -> None:
    """Write whether the AdapterSet's version is published and matches, in
    the store of every fleet serving it (else in the operator's own)."""
    fleet_index: kopf.Index[tuple[str | None, str], ServingFleet] = kwargs["fleets_by_adapter"]
    generation = int(meta.get("generation", 0))
    conditions = read_conditions(status)
    _Stores.sweep()
    fleets_by_store: dict[RedisSettings, list[str]] = {}
    for serving in fleet_index.get((namespace, name), []):
        fleets_by_store.setdefault(serving.redis, []).append(serving.name)
    ns = _namespace(namespace)
    stores: list[tuple[str, StoreOpener]] = [
        (f"the store of fleet {', '.join(sorted(fleets))}", partial(_fleet_store, ns, redis))
        for redis, fleets in sorted(fleets_by_store.items(), key=lambda item: sorted(item[1]))
    ] or [("the operator's store", _operators_store)]
    verdict = await check_in_stores(name, dict(spec), stores)
    checked = adapter_status(verdict, conditions, now=utc_now(), generation=generation)
    path = custom_object_path(crds.ADAPTER_PLURAL, ns, name)
    try:
        await _Connection.client().patch_status(path, checked.to_dict())
    except KubeError as error:
        raise kopf.TemporaryError(f"writing status: {error}", delay=RETRY_DELAY_S) from error


@dataclass(frozen=True)
class PodInfo:
    """What the control loop needs of a worker pod."""

    name: str
    ip: str
    node: str
    ready: bool
    port: int | None  # its container's grpc port; None: the fleet's


@kopf.index("pods", labels={build.FLEET_LABEL: kopf.PRESENT})
def fleet_pods(
    name: str,
    namespace: str | None,
    labels: kopf.Labels,
    spec: kopf.Spec,
    status: kopf.Status,
    **_: Any,
) -> dict[tuple[str | None, str], PodInfo]:
    """Worker pods by (namespace, fleet)."""
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", [])
    )
    ip = str(status.get("podIP", ""))
    info = PodInfo(name, ip, str(spec.get("nodeName", "")), ready and bool(ip), _grpc_port(spec))
    return {(namespace, labels[build.FLEET_LABEL]): info}


def _grpc_port(spec: kopf.Spec) -> int | None:
    """The port the pod itself declares for gRPC: a pod made from an older
    template serves where that template said, not where the spec now says."""
    for container in spec.get("containers", []):
        for port in container.get("ports", []):
            if port.get("name") == build.GRPC_PORT_NAME:
                return int(port["containerPort"])
    return None


@kopf.index(crds.GROUP, crds.VERSION, crds.ADAPTER_PLURAL)
def adapter_sets(
    name: str, namespace: str | None, spec: kopf.Spec, **_: Any
) -> dict[tuple[str | None, str], AdapterWant]:
    """What the workers load for each AdapterSet, by (namespace, name)."""
    tasks = tuple(str(task) for task in spec.get("tasks", []))
    version = str(spec.get("store", {}).get("version", ""))
    want = AdapterWant(store_name(name, spec), version, tasks)
    return {(namespace, name): want}


def _adapter_wants(
    index: kopf.Index[tuple[str | None, str], AdapterWant], namespace: str, names: tuple[str, ...]
) -> tuple[AdapterWant, ...]:
    """The fleet's adapter sets; one without an AdapterSet object is loaded
    by its name with every task (its load failure then says it is missing)."""
    wants = []
    for name in names:
        found = list(index.get((namespace, name), []))
        wants.append(found[0] if found else AdapterWant(name))
    return tuple(wants)


@dataclass(frozen=True)
class Rollout:
    """How far the fleet's workload has come (its worker pods, the ready
    ones, the replicas the spec asks for) at spec generation `generation`,
    and the label selector of its pods (for the /scale subresource)."""

    pods: int
    ready: int
    desired: int
    generation: int
    selector: str


# Writes a status (as a dict) to the fleet's status subresource.
StatusWrite = Callable[[dict[str, Any]], Awaitable[None]]


def _fleet_status_write(namespace: str, name: str) -> StatusWrite:
    """Write the fleet's status through the operator's client (kube.py says
    why not through the timer's patch). A write that fails is logged: the
    next tick writes the whole status again."""
    path = custom_object_path(crds.FLEET_PLURAL, namespace, name)

    async def write(status: dict[str, Any]) -> None:
        try:
            await _Connection.client().patch_status(path, status)
        except KubeError as error:
            log.warning("writing the status of fleet %s/%s: %s", namespace, name, error)

    return write


class KopfSink:
    """Writes the loop's status with the rollout's replicas and Progressing
    condition, merged with the conditions the other handlers own; its
    Events go through kopf."""

    def __init__(self, body: kopf.Body, write: StatusWrite, rollout: Rollout) -> None:
        self.body = body
        self.write = write
        self.rollout = rollout

    async def patch_status(self, status: FleetStatus) -> None:
        own = {c.type: c for c in status.conditions or () if c.type in LOOP_CONDITIONS}
        kept = [c for c in read_conditions(self.body.status) if c.type not in own]
        rollout = self.rollout
        rolling = rollout.ready < rollout.desired
        conditions = set_condition(
            [*kept, *own.values()],
            "Progressing",
            rolling,
            "RollingOut" if rolling else "RolledOut",
            f"{rollout.ready} of {rollout.desired} workers ready",
            now=utc_now(),
            generation=rollout.generation,
        )
        complete = replace(
            status,
            conditions=conditions,
            replicas=rollout.pods,
            ready_replicas=rollout.ready,
            selector=rollout.selector,
        )
        await self.write(complete.to_dict())

    async def post_event(self, event: FleetEvent) -> None:
        kopf.event(self.body, type=event.type, reason=event.reason, message=event.message)


async def _read_secret(namespace: str, name: str, keys: tuple[str, ...]) -> bytes:
    """fleet_access.ReadSecret over the operator's API client."""
    path = f"/api/v1/namespaces/{namespace}/secrets/{name}"
    try:
        secret = await _Connection.client().get(path)
    except KubeError as error:
        raise SecretUnavailable(f"reading Secret {name}: {error}") from error
    data = (secret or {}).get("data", {})
    encoded = next((data[key] for key in keys if data.get(key)), None)
    if encoded is None:
        raise SecretUnavailable(f"Secret {name} has no {' or '.join(keys)} yet")
    return base64.b64decode(encoded)


@kopf.timer(*FLEETS, interval=WAKE_S)
async def control(
    body: kopf.Body,
    spec: kopf.Spec,
    name: str,
    namespace: str | None,
    meta: kopf.Meta,
    status: kopf.Status,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """One control tick when the fleet's plan interval has passed."""
    # kopf passes each index as a keyword named after its function.
    pod_index: kopf.Index[tuple[str | None, str], PodInfo] = kwargs["fleet_pods"]
    adapter_index: kopf.Index[tuple[str | None, str], AdapterWant] = kwargs["adapter_sets"]
    try:
        fleet = _parse(name, namespace, spec)
    except SpecError:
        return  # reconcile has said what to fix
    now = time.monotonic()
    if now < memo.get("next_tick", 0.0):
        return
    generation = int(meta.get("generation", 0))
    write = _fleet_status_write(fleet.namespace, name)
    try:
        credentials = await fleet_credentials(_read_secret, fleet)
    except SecretUnavailable as error:
        memo["next_tick"] = now + min(RETRY_DELAY_S, fleet.memory.plan_interval_s)
        message = f"{error}; no tick runs until the fleet's Secrets can be read"
        unavailable = set_condition(
            read_conditions(status),
            "Degraded",
            True,
            "SecretUnavailable",
            message,
            now=utc_now(),
            generation=generation,
        )
        await write(FleetStatus(conditions=unavailable).to_dict())
        return
    memo["next_tick"] = now + fleet.memory.plan_interval_s
    controller: FleetController | None = memo.get("controller")
    if controller is None:
        profile = profile_for_model(fleet.model_name)
        controller = FleetController(
            fleet,
            profile,
            credentials.connect(),
            generation=generation,
            status=FleetStatus.from_dict(status),
        )
        memo["controller"], memo["credentials"] = controller, credentials
    else:
        if controller.generation != generation:
            controller.update(fleet, generation)
        if memo["credentials"] != credentials:
            await controller.reconnect(credentials.connect())
            memo["credentials"] = credentials
    pods = list(pod_index.get((namespace, name), []))
    endpoints = [
        WorkerEndpoint(
            p.name,
            build.worker_address(fleet, p.ip, p.port),
            p.node,
            build.worker_server_name(fleet, p.ip),
        )
        for p in pods
        if p.ready
    ]
    rollout = Rollout(
        len(pods), len(endpoints), fleet.replicas, generation, build.label_selector(fleet)
    )
    sink = KopfSink(body, write, rollout)
    adapters = _adapter_wants(adapter_index, fleet.namespace, fleet.adapters)
    await controller.tick(endpoints, sink, adapters)
