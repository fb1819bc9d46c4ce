"""A Kubernetes API for the operator's integration tests: kmock's emulator,
extended only where kopf needs real API server behaviour (DESIGN.md lists
what kmock 0.8 lacks).

What this adds, and why:
- metadata a server assigns: `uid` (owner references need it),
  `creationTimestamp`, `generation` (1 on create, +1 when a patch touches
  `spec`; status changes leave it) and a `resourceVersion` that grows on
  every write (kopf waits to see its own patches' versions come back);
- `metadata.namespace` on objects created through a namespaced URL;
- lists that say their `kind` and a real `resourceVersion`;
- the core group's discovery as `v1`, not `/v1`, and subresources without
  the short names of their resource (kubectl would call them ambiguous);
- Kubernetes' error statuses and reasons: a failed JSON-patch `test` (kopf
  guards its patches with one on `resourceVersion`) is 422 Invalid, not 500,
  so kopf waits for the newer object instead of retrying the stale patch;
  404s say NotFound and 409s AlreadyExists;
- discovery for the resources the operator uses, declared up front (as an
  API server with the CRDs installed would serve them);
- CustomResourceDefinitions that take effect: a created CRD is marked
  Established and adds its resource to discovery (kind, short names,
  categories, status subresource), so `kubectl apply` of the CRDs and then
  of custom resources works, and `kubectl get` by short name;
- status validation: a patch of a custom resource's status subresource is
  checked against the CRD's status schema (ours are known from the start,
  others once their CRD is created) and refused with 422 Invalid as a real
  API server refuses it, so a status the operator cannot really write
  fails the tests too (the status subresource validates the status only);
- server-side printing: a list or get that asks for a Table (as kubectl
  does) gets the CRD's printer columns, evaluated with the JSONPath subset
  printer columns use (`.a.b` and `[?(@.key=="value")]` filters).

Not added: watches still replay every object as ADDED (kopf's handling is
idempotent over its last-handled state, so a replay changes nothing),
label selectors are ignored (kopf filters labels itself), and kmock cannot
route the cluster-scoped `/api/v1/namespaces`, so the operator runs with
`--all-namespaces` (which never lists them; discovery still names them).

`EmulatedCluster` runs it on 127.0.0.1 on a free port in a thread of its
own, so a test thread can block in `kopf.testing.KopfRunner`, and writes a
kubeconfig that points at it; test modules get it as the `cluster` fixture
with `pytest_plugins = ["kube_emulator"]`.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import re
import threading
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import pytest
import yaml
from crd_check import openapi_schema, status_errors
from kmock._internal import dicts, enums, rendering
from kmock._internal.k8s import KubernetesObjectConflictError

from elasticfleet.operator import crds
from elasticfleet.operator.wire import timestamp

T = TypeVar("T")

RESOURCES: dict[str, kmock.ResourceInfo] = {
    f"{crds.GROUP}/{crds.VERSION}/{crds.FLEET_PLURAL}": kmock.ResourceInfo(
        kind=crds.FLEET_KIND,
        namespaced=True,
        singular="elasticfleet",
        verbs={"list", "watch", "get", "patch", "create", "delete"},
        subresources={"status"},
    ),
    f"{crds.GROUP}/{crds.VERSION}/{crds.ADAPTER_PLURAL}": kmock.ResourceInfo(
        kind=crds.ADAPTER_KIND,
        namespaced=True,
        singular="adapterset",
        verbs={"list", "watch", "get", "patch", "create", "delete"},
        subresources={"status"},
    ),
    "v1/pods": kmock.ResourceInfo(kind="Pod", namespaced=True, verbs={"list", "watch", "get"}),
    "v1/services": kmock.ResourceInfo(kind="Service", namespaced=True, verbs={"get", "create"}),
    "v1/events": kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create", "list"}),
    "v1/secrets": kmock.ResourceInfo(
        kind="Secret", namespaced=True, verbs={"get", "create", "patch"}
    ),
    # kopf waits for namespaces in discovery even when it serves all of them.
    "v1/namespaces": kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": kmock.ResourceInfo(
        kind="CustomResourceDefinition",
        namespaced=False,
        singular="customresourcedefinition",
        shortnames={"crd", "crds"},
        verbs={"get", "list", "create", "patch"},
    ),
    "apps/v1/deployments": kmock.ResourceInfo(
        kind="Deployment", namespaced=True, verbs={"get", "create", "patch"}
    ),
    "apps/v1/statefulsets": kmock.ResourceInfo(
        kind="StatefulSet", namespaced=True, verbs={"get", "create", "patch"}
    ),
}


@attrs.define(kw_only=True)
class ApiEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the server-side behaviour listed above."""

    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in RESOURCES.items():
            self.resources[key] = info
        for crd in crds.all_crds():
            self._learn_status_schema(crd)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            if request.action == enums.action.CREATE:
                if request.data.get("kind") == "CustomResourceDefinition":
                    self._establish(request.data)
                if request.namespace and not meta.get("namespace"):
                    meta["namespace"] = request.namespace
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == enums.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    if request.subresource == "status":
                        self._validate_status(request, self.objects[key].raw)
                    stored = self.objects[key].raw.get("metadata", {})
                    generation = int(stored.get("generation", 1))
                    if "spec" in request.data and request.subresource is None:
                        generation += 1
                    meta["generation"] = generation
                    meta["resourceVersion"] = str(next(self._versions))
        return await super()._handle(request)

    _printer_columns: dict[Any, list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _status_schemas: dict[Any, dict[str, Any]] = attrs.field(factory=dict, init=False)

    def _learn_status_schema(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        key = f"{spec['group']}/{spec['versions'][0]['name']}/{spec['names']['plural']}"
        status = openapi_schema(crd)["properties"].get("status")
        if status is not None:
            self._status_schemas[kmock.resource(key)] = status

    def _validate_status(self, request: rendering.Request, stored: dict[str, Any]) -> None:
        """422 Invalid, naming every error, unless the object's status after
        the patch is valid under its CRD's status schema."""
        schema = self._status_schemas.get(request.resource)
        if schema is None:
            return
        patched = dicts.patch_dict(copy.deepcopy(stored), request.data)
        errors = status_errors(schema, patched.get("status", {}))
        if errors:
            kind = self.resources[request.resource].kind if request.resource else "object"
            message = f'{kind} "{request.name}" is invalid: ' + ", ".join(errors)
            raise kmock.KubernetesError(status=422, reason="Invalid", message=message)

    def _establish(self, crd: dict[str, Any]) -> None:
        """Serve the custom resource a created CRD defines."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            key = f"{spec['group']}/{version['name']}/{names['plural']}"
            self.resources[key] = kmock.ResourceInfo(
                kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced",
                singular=names.get("singular", names["kind"].lower()),
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                verbs={"list", "watch", "get", "patch", "create", "delete"},
                subresources=set(version.get("subresources", {})),
            )
            self._printer_columns[kmock.resource(key)] = version.get("additionalPrinterColumns", [])
        self._learn_status_schema(crd)
        crd["status"] = {
            "acceptedNames": names,
            "conditions": [
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"}
            ],
        }

    def _wants_table(self, request: rendering.Request) -> bool:
        return "as=Table" in request.headers.get("Accept", "") and (
            request.resource in self._printer_columns
        )

    def _table(self, request: rendering.Request, objects: list[dict[str, Any]]) -> Any:
        columns = [
            {"name": "Name", "type": "string", "format": "name", "description": "Name"},
            *self._printer_columns[request.resource],
        ]
        rows = []
        for obj in objects:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column in columns[1:]:
                value = _json_path(obj, column["jsonPath"])
                if column["type"] == "date" and isinstance(value, str):
                    value = _age(value)
                cells.append(value)
            metadata = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}
            rows.append({"cells": cells, "object": {**metadata, "metadata": obj["metadata"]}})
        definitions = [
            {
                "name": c["name"],
                "type": c["type"],
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in columns
        ]
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": str(next(self._versions))},
            "columnDefinitions": definitions,
            "rows": rows,
        }

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        payload: Any = await super()._serve_fetch(request)
        if self._wants_table(request):
            payload = self._table(request, [payload])
        return payload  # type: ignore[no-any-return]

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        error: Exception = exc
        if isinstance(exc, jsonpatch.JsonPatchTestFailed):
            error = kmock.KubernetesError(status=422, reason="Invalid", message=str(exc))
        elif isinstance(exc, kmock.KubernetesNotFoundError):
            error = kmock.KubernetesError(status=404, reason="NotFound", message=exc.message)
        elif isinstance(exc, KubernetesObjectConflictError):
            error = kmock.KubernetesError(status=409, reason="AlreadyExists", message=exc.message)
        return await super()._render_error(error)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload: Any = await super()._serve_list(request)
        if self._wants_table(request):
            return self._table(request, payload["items"])  # type: ignore[no-any-return]
        info = self.resources[request.resource] if request.resource is not None else None
        if info is not None and info.kind:
            payload["kind"] = f"{info.kind}List"
        payload["metadata"] = {"resourceVersion": str(next(self._versions))}
        return payload  # type: ignore[no-any-return]

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        payload: Any = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        for entry in payload["resources"]:
            if "/" in entry["name"]:  # a subresource has no names of its own
                entry["shortNames"], entry["categories"] = [], []
        return payload  # type: ignore[no-any-return]


_PATH_STEP = re.compile(r'\.(\w+)(?:\[\?\(@\.(\w+)=="([^"]*)"\)\])?')


def _json_path(obj: Any, path: str) -> Any:
    """The printer-column JSONPath subset: `.a.b` and `.a[?(@.k=="v")].b`."""
    value = obj
    for step in _PATH_STEP.finditer(path):
        field, key, wanted = step.groups()
        if not isinstance(value, dict) or field not in value:
            return None
        value = value[field]
        if key is not None:
            items = value if isinstance(value, list) else []
            value = next((item for item in items if item.get(key) == wanted), None)
    return value


def _age(stamp: str) -> str:
    """A timestamp as kubectl shows an age: 42s, 7m, 3h, 2d."""
    seconds = datetime.now(UTC) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    total = max(int(seconds.total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if total >= size:
            return f"{total // size}{unit}"
    return f"{total}s"


def _now() -> str:
    return timestamp(datetime.now(UTC))


class EmulatedCluster:
    """The emulator served from a background thread's event loop."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.emulator = ApiEmulator()
        self._server = kmock.Server(self.emulator)
        self.url = ""

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        self.run(self.emulator.__aenter__())
        self.run(self._server.__aenter__())
        self.url = str(self._server.url).rstrip("/")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test-token"}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}
            ],
            "current-context": "emulator",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        return self

    def __exit__(self, *_: object) -> None:
        self.run(self._server.__aexit__(None, None, None))
        self.run(self.emulator.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the emulator's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(10)

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """The stored objects of `resource` (e.g. 'v1/pods'), in creation order."""

        wanted = kmock.resource(resource)

        async def collect() -> list[dict[str, Any]]:
            return [
                dict(obj.raw)
                for (res, ns, _name), obj in self.emulator.objects.items()
                if res == wanted and not obj.deleted and namespace in (None, ns)
            ]

        return self.run(collect())

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        """One API request, as a client (kubectl, or the kubelet the test
        plays) would send it: the HTTP status and the answer."""

        async def send() -> tuple[int, Any]:
            async with self.emulator.request(method, path, json=body) as response:
                return response.status, await response.json()

        return self.run(send())

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """`request`, failing the test on an error status; the answer."""
        code, payload = self.request(method, path, body)
        assert code < 400, (method, path, code, payload)
        return payload


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedCluster]:
    """An emulated cluster, with $KUBECONFIG pointing at it."""
    kubeconfig = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with EmulatedCluster(kubeconfig) as emulated:
        yield emulated
