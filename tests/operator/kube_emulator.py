"""A Kubernetes API for the operator's integration tests: kmock's emulator,
extended where our code relies on real API server behaviour, including what
a real server refuses (DESIGN.md, "Real parts, and how tests get them").

What this adds, and why:
- metadata a server assigns: `uid` (owner references need it),
  `creationTimestamp`, `generation` (1 on create, +1 when a write changes
  anything but metadata and status) and a `resourceVersion` that grows on
  every write (kopf waits to see its own patches' versions come back);
- `metadata.namespace` on objects created through a namespaced URL;
- lists that say their `kind` and a real `resourceVersion`, and watches
  from the `resourceVersion` asked for (kopf lists, then watches from the
  list's version: a replay of older versions would make it act on them
  again);
- the core group's discovery as `v1`, not `/v1`, and subresources without
  the short names of their resource (kubectl would call them ambiguous);
- Kubernetes' error statuses and reasons: a failed JSON-patch `test` (kopf
  guards its patches with one on `resourceVersion`) is 422 Invalid, not 500,
  so kopf waits for the newer object instead of retrying the stale patch;
  404s say NotFound and 409s AlreadyExists;
- discovery for the built-in kinds the operator and the chart use, a
  Secret's `stringData` stored as `data`, and 415 for a body that is not
  JSON (kubectl create sends built-in kinds as protobuf, which kmock cannot
  read: apply them instead);
- CustomResourceDefinitions that take effect: a created or updated CRD is
  marked Established and serves its resource (kind, short names,
  categories, subresources, printer columns, schema), so `kubectl apply` of
  the CRDs and then of custom resources works, and so does an upgrade of a
  CRD; ours are installed from the start unless `crds_installed=False`
  (then only the CRDs a test applies exist, as on a new cluster);
- custom resources stored as the apiextensions server stores them: the
  status subresource alone writes `status` and the main resource everything
  else; fields the schema does not declare are pruned, its defaults filled
  in; then every create, update and patch (status included) is validated
  against the structural schema and the CEL rules, transition rules
  (`oldSelf`, e.g. immutability) against the stored object, and refused
  with 422 Invalid naming each field (crd_check.py), so a status or spec the
  operator could not really write fails the tests too;
- authentication and RBAC (kube_auth.py): every request carries a bearer
  token, the admin's or a ServiceAccount's from the TokenRequest API
  (`POST .../serviceaccounts/NAME/token`, as a kubelet gets one); anything
  the Roles and bindings applied to the cluster do not grant a
  ServiceAccount is 403 Forbidden; so is an owner reference with
  blockOwnerDeletion to an object whose `finalizers` the writer may not
  update (the OwnerReferencesPermissionEnforcement admission plugin).
  `decisions` keeps every authorization and `refusals` every write refused
  as invalid, for tests to count;
- server-side printing: a list or get that asks for a Table (as kubectl
  does) gets the CRD's printer columns, evaluated with the JSONPath subset
  printer columns use (`.a.b` and `[?(@.key=="value")]` filters);
- faults on demand (kube_faults.py): `inject` makes the next matching
  requests answer 409 Conflict, 500 InternalError or, for a watch, the 410
  Expired event that ends it (after authentication and authorization, as a
  real server's storage errors come), optionally held first; and
  `expire_watches` ends every open watch of a resource with 410, as a
  compaction does. Nothing else changes: a faulted request stores nothing.

Not added: a watch sends what changed since its resourceVersion as ADDED
(no history of changes is kept), label selectors are ignored (kopf filters
labels itself), built-in kinds are neither validated nor defaulted,
strategic merge patches merge as JSON merge patches (lists replaced),
namespaces are not objects of their own (the list of them, which kopf
reads when it serves named namespaces, names those objects live in; none
can be created or deleted), and garbage collection through owner
references does not run.

`EmulatedCluster` serves it over HTTPS (kube_auth.py says why) on 127.0.0.1
on a free port in a thread of its own, so a test thread can block in
`kopf.testing.KopfRunner`, and writes an admin kubeconfig that points at it;
test modules get it as the `cluster` fixture (or `new_cluster`, without our
CRDs) with `pytest_plugins = ["kube_emulator"]`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import itertools
import re
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.test_utils
import aiohttp.web
import attrs
import jsonpatch
import kmock
import pytest
import yaml
import yarl
from crd_check import openapi_schema, prune, validation_errors
from kmock._internal import dicts, enums, rendering
from kmock._internal.k8s import KubernetesObjectConflictError
from kube_auth import (
    ADMIN,
    RBAC,
    Attributes,
    Authorizer,
    Decision,
    User,
    certificate_authority,
    client_context,
    forbidden,
    server_context,
    service_account,
    unauthorized,
)
from kube_faults import Fault, expired_event

from elasticfleet.operator import crds
from elasticfleet.operator.wire import timestamp

T = TypeVar("T")

ADMIN_TOKEN = "admin-token"
ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def _info(kind: str, namespaced: bool = True, **more: Any) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=ALL_VERBS, **more)


# The built-in kinds the operator, the test kubelet and the chart use.
RESOURCES: dict[str, kmock.ResourceInfo] = {
    "v1/pods": _info("Pod", subresources={"status"}),
    "v1/services": _info("Service"),
    "v1/events": _info("Event"),
    "v1/secrets": _info("Secret"),
    "v1/configmaps": _info("ConfigMap"),
    "v1/serviceaccounts": _info("ServiceAccount", subresources={"token"}),
    # kopf waits for namespaces in discovery even when it serves all of them.
    "v1/namespaces": _info("Namespace", namespaced=False),
    "apiextensions.k8s.io/v1/customresourcedefinitions": _info(
        "CustomResourceDefinition",
        namespaced=False,
        singular="customresourcedefinition",
        shortnames={"crd", "crds"},
    ),
    "apps/v1/deployments": _info("Deployment", subresources={"status"}),
    "apps/v1/statefulsets": _info("StatefulSet", subresources={"status"}),
    f"{RBAC}/roles": _info("Role"),
    f"{RBAC}/rolebindings": _info("RoleBinding"),
    f"{RBAC}/clusterroles": _info("ClusterRole", namespaced=False),
    f"{RBAC}/clusterrolebindings": _info("ClusterRoleBinding", namespaced=False),
}


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A write refused as invalid (422): who, what, and the server's message."""

    user: User
    attributes: Attributes
    message: str


@attrs.define(kw_only=True)
class ApiEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the server-side behaviour listed above."""

    crds_installed: bool = True
    decisions: list[Decision] = attrs.field(factory=list, init=False)
    refusals: list[Refusal] = attrs.field(factory=list, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _tokens: dict[str, User] = attrs.field(factory=lambda: {ADMIN_TOKEN: ADMIN}, init=False)
    _printer_columns: dict[Any, list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _crds: dict[Any, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _authorizer: Authorizer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._authorizer = Authorizer(self.stored)
        for key, info in RESOURCES.items():
            self.resources[key] = info
        if self.crds_installed:
            for crd in crds.all_crds():
                self._establish(crd)

    def inject(self, fault: Fault) -> Fault:
        """Answer `fault` to the next requests it matches (from any thread)."""
        self.faults.append(fault)
        return fault

    async def expire_watches(self, resource: str) -> None:
        """End every open watch of `resource` (e.g. 'v1/pods') with 410
        Expired, as when the server compacts the versions they watch from."""
        attributes = Attributes(verb="watch", path="", resource=resource.rpartition("/")[2])
        event = expired_event(attributes, next(self._versions))
        await self._buses[kmock.resource(resource)].put(event)

    async def _fault(self, attributes: Attributes, body: Any, *, in_stream: bool = False) -> None:
        """Raise the first injected fault that matches, once held if it is;
        `in_stream`: the faults a watch's stream answers (410), else the others."""
        fault = next(
            (
                f
                for f in self.faults
                if f.matches(attributes, body)
                and (f.code == 410 and f.verb == "watch") == in_stream
            ),
            None,
        )
        if fault is None:
            return
        fault.fired += 1
        if fault.held:
            await fault.wait_released()
        raise fault.error(attributes, next(self._versions))

    def denials(self, user: User | None = None) -> list[Decision]:
        """The requests refused with 403 (of `user`, else anyone's)."""
        return [d for d in self.decisions if not d.allowed and user in (None, d.user)]

    def stored(
        self, resource: str | kmock.resource, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """The stored objects of `resource` (e.g. 'v1/pods'; in `namespace`
        if given), in creation order; call it on the emulator's loop."""
        wanted = resource if isinstance(resource, kmock.resource) else kmock.resource(resource)
        return [
            obj.raw
            for (res, ns, _), obj in self._objects.items()
            if res == wanted and not obj.deleted and namespace in (None, ns)
        ]

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Namespaces are served here: kmock's path parser fails on the
        cluster-scoped /api/v1/namespaces, which kopf lists and watches when
        it serves named namespaces. A namespace exists once an object lives
        in it; the watch announces none later (kopf watches from its list)."""
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            return await super().__call__(raw_request)
        query = raw_request.query
        try:
            self._identify(raw_request.method, raw_request.path, query, raw_request.headers)
        except kmock.KubernetesError as error:
            return await self._render_error(error)
        if query.get("watch") not in ("true", "1"):
            names = {str(ns) for (_, ns, _), obj in self._objects.items() if ns and not obj.deleted}
            items = [
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                for name in sorted(names)
            ]
            version = {"resourceVersion": str(next(self._versions))}
            listing = {"kind": "NamespaceList", "apiVersion": "v1", "metadata": version}
            return aiohttp.web.json_response({**listing, "items": items})
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        await asyncio.sleep(float(query.get("timeoutSeconds", 3600)))
        return response

    def _identify(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[User, Attributes]:
        """Who asks (401 if no one known) and whether they may (403)."""
        user = self._tokens.get(_bearer_token(headers))
        if user is None:
            raise unauthorized()
        attributes = Attributes.of(method, path, query)
        self._authorize(user, attributes)
        return user, attributes

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        user, attributes = self._identify(
            request.method.value, request.url.path, request.params, request.headers
        )
        if request.body and "json" not in request.headers.get("Content-Type", "json"):
            # kubectl create sends built-in kinds as protobuf, which kmock
            # cannot read (kubectl apply sends JSON): refused as a server
            # refuses a format it does not know, not a 500.
            message = (
                "the body of the request was in an unknown format - accepted media types "
                "include: application/json, application/json-patch+json, "
                "application/merge-patch+json, application/strategic-merge-patch+json"
            )
            raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType", message=message)
        await self._fault(attributes, request.data)
        if attributes.verb == "create" and attributes.full_resource == "serviceaccounts/token":
            return self._token_request(attributes)
        writes = (enums.action.CREATE, enums.action.UPDATE)
        if request.resource is not None and request.action in writes and request.data is not None:
            return await self._write(request, user, attributes)
        return await super()._handle(request)

    def _authorize(self, user: User, attributes: Attributes) -> None:
        allowed = self._authorizer.allows(user, attributes)
        self.decisions.append(Decision(user, attributes, allowed))
        if not allowed:
            raise forbidden(user, attributes)

    def _token_request(self, attributes: Attributes) -> aiohttp.web.StreamResponse:
        """The TokenRequest API: a token for an existing ServiceAccount."""
        account = (kmock.resource("v1/serviceaccounts"), attributes.namespace, attributes.name)
        if account not in self._objects or self._objects[account].deleted:
            message = f'serviceaccounts "{attributes.name}" not found'
            raise kmock.KubernetesError(status=404, reason="NotFound", message=message)
        token = secrets.token_urlsafe(24)
        self._tokens[token] = service_account(attributes.namespace, attributes.name)
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": attributes.name, "namespace": attributes.namespace},
            "status": {"token": token, "expirationTimestamp": _now()},
        }
        return aiohttp.web.json_response(body, status=201)

    async def _write(
        self, request: rendering.Request, user: User, attributes: Attributes
    ) -> aiohttp.web.StreamResponse:
        """A create or patch, admitted (below) and stored in one step under
        the store's lock, so concurrent patches apply to what each finds;
        the answer is the stored object (201 Created, or 200)."""
        resource = request.resource
        assert resource is not None
        async with self._lock:
            if request.action == enums.action.CREATE:
                body = copy.deepcopy(request.data)
                meta = body.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + secrets.token_hex(3)
                key = (resource, request.namespace or meta.get("namespace"), str(meta.get("name")))
                if key in self._objects and not self._objects[key].deleted:
                    raise KubernetesObjectConflictError()
                new, old, event = body, None, "ADDED"
            else:
                key = (resource, request.namespace, str(request.name))
                if key not in self._objects or self._objects[key].deleted:
                    raise kmock.KubernetesNotFoundError(message=f'"{request.name}" not found')
                old = self._objects[key].raw
                new = dict(dicts.patch_dict(copy.deepcopy(old), request.data))
                event = "MODIFIED"
            stored = self._admit(request, user, attributes, old, new)
            if key in self._objects:
                self._objects[key].create(stored)
            else:
                self._objects[key] = stored
            raw = self._objects[key].raw
            await self._buses[resource].put({"type": event, "object": raw})
            meta = raw.get("metadata", {})
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._objects[key].delete()  # its last finalizer removed: it goes
                await self._buses[resource].put({"type": "DELETED", "object": raw})
        return aiohttp.web.json_response(raw, status=201 if old is None else 200)

    def _admit(
        self,
        request: rendering.Request,
        user: User,
        attributes: Attributes,
        old: dict[str, Any] | None,
        new: dict[str, Any],
    ) -> dict[str, Any]:
        """`new` as the server stores it, or an error status: the custom
        resource's rules, the metadata the server owns, the owner-reference
        admission check; a CRD takes effect."""
        crd = self._crds.get(request.resource)
        if crd is not None:
            new = self._custom_resource(crd, user, attributes, old, new)
        if new.get("kind") == "Secret" and "stringData" in new:  # stored as data
            encoded = {
                k: base64.b64encode(v.encode()).decode() for k, v in new["stringData"].items()
            }
            new["data"] = {**new.get("data", {}), **encoded}
            del new["stringData"]
        meta = new.setdefault("metadata", {})
        if old is None:
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta["generation"] = 1
        else:
            stored = old["metadata"]
            meta.update(uid=stored["uid"], creationTimestamp=stored["creationTimestamp"])
            changed = _content(new) != _content(old)
            meta["generation"] = int(stored.get("generation", 1)) + int(changed)
        meta["resourceVersion"] = str(next(self._versions))
        self._check_owner_references(user, attributes, old, new)
        if new.get("kind") == "CustomResourceDefinition":
            self._establish(new)
        return new

    def _custom_resource(
        self,
        crd: dict[str, Any],
        user: User,
        attributes: Attributes,
        old: dict[str, Any] | None,
        new: dict[str, Any],
    ) -> dict[str, Any]:
        """A custom resource as the apiextensions server stores it: the
        status subresource owns status, the main resource the rest; unknown
        fields pruned, defaults filled in, then validated (422 Invalid)."""
        if "status" in crd["spec"]["versions"][0].get("subresources", {}):
            kept = old if attributes.subresource == "status" else new
            owned = new if attributes.subresource == "status" else old
            new = {k: v for k, v in copy.deepcopy(kept or {}).items() if k != "status"}
            if owned is not None and "status" in owned:
                new["status"] = copy.deepcopy(owned["status"])
        schema = openapi_schema(crd)
        new = crds.with_defaults(schema, prune(schema, new))
        errors = validation_errors(crd, new, old)
        if errors:
            error = _invalid(crd, attributes.name or new["metadata"].get("name", ""), errors)
            self.refusals.append(Refusal(user, attributes, str(error.message)))
            raise error
        return new

    def _check_owner_references(
        self, user: User, attributes: Attributes, old: dict[str, Any] | None, new: dict[str, Any]
    ) -> None:
        """OwnerReferencesPermissionEnforcement: changing an object's owner
        references needs delete on it (creating it needs nothing more), and
        a new blockOwnerDeletion reference needs update on the owner's
        finalizers, so no one blocks the deletion of what they cannot
        delete."""
        refs = new["metadata"].get("ownerReferences") or []
        before = [] if old is None else old["metadata"].get("ownerReferences") or []
        if refs == before:
            return
        if old is not None:
            self._authorize(user, dataclasses.replace(attributes, verb="delete", subresource=""))
        blocking = {ref.get("uid") for ref in before if ref.get("blockOwnerDeletion")}
        for ref in refs:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in blocking:
                continue
            group = ref["apiVersion"].rpartition("/")[0]
            owner = Attributes(
                verb="update",
                path=attributes.path,
                group=group,
                resource=self._plural(group, ref["kind"]),
                subresource="finalizers",
                namespace=attributes.namespace,
                name=ref["name"],
            )
            self._authorize(user, owner)

    def _plural(self, group: str, kind: str) -> str:
        for resource, info in self.resources.items():
            if not isinstance(resource, kmock.resource) or not isinstance(info, kmock.ResourceInfo):
                continue
            if resource.group == group and info.kind == kind and resource.plural:
                return str(resource.plural)
        return kind.lower()

    def _establish(self, crd: dict[str, Any]) -> None:
        """Serve the custom resource a created or updated CRD defines."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            key = kmock.resource(f"{spec['group']}/{version['name']}/{names['plural']}")
            self.resources[key] = kmock.ResourceInfo(
                kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced",
                singular=names.get("singular", names["kind"].lower()),
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                verbs=ALL_VERBS,
                subresources=set(version.get("subresources", {})),
            )
            self._printer_columns[key] = version.get("additionalPrinterColumns", [])
            self._crds[key] = {**crd, "spec": {**spec, "versions": [version]}}
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

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        """A watch from the resourceVersion asked for, as a real server
        serves it (kopf lists, then watches from the list's version): the
        objects changed since then, then every change, none lost between
        the two. Replaying older versions would make kopf act on them again
        (its patches then fail their resourceVersion test)."""
        assert request.resource is not None
        since = int(request.params.get("resourceVersion") or 0)
        bus = self._buses[request.resource]
        yield b""  # the headers go out before anything happens
        attributes = Attributes.of(request.method.value, request.url.path, request.params)
        try:
            await self._fault(attributes, None, in_stream=True)
        except kmock.KubernetesError:
            yield expired_event(attributes, since)
            return
        async with self._lock:
            marker = await bus.mark()
            current = self.stored(request.resource, request.namespace)
        try:
            for obj in current:
                if int(obj["metadata"]["resourceVersion"]) > since and _named(request, obj):
                    yield {"type": "ADDED", "object": obj}
            async for event in bus.stream(since=marker):
                if event["type"] == "ERROR":  # expire_watches: the stream ends
                    yield event
                    return
                meta = event["object"].get("metadata", {})
                if request.namespace in (None, meta.get("namespace")) and _named(
                    request, event["object"]
                ):
                    yield event
        finally:
            await bus.unmark(marker)

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


def _bearer_token(headers: Mapping[str, str]) -> str:
    for name, value in headers.items():
        if name.lower() == "authorization" and value.startswith("Bearer "):
            return str(value[len("Bearer ") :])
    return ""


def _named(request: rendering.Request, obj: dict[str, Any]) -> bool:
    return request.name in (None, obj.get("metadata", {}).get("name"))


def _content(obj: dict[str, Any]) -> dict[str, Any]:
    """What a write must change to be a new generation: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _invalid(crd: dict[str, Any], name: str, errors: list[str]) -> kmock.KubernetesError:
    """422 Invalid as kube-apiserver words it: Kind.group "name" is invalid:
    field: why (several in brackets), each a cause naming its field."""
    kind, group = crd["spec"]["names"]["kind"], crd["spec"]["group"]
    causes = []
    for error in errors:
        field, _, why = error.partition(": ")
        causes.append({"reason": "FieldValueInvalid", "field": field.lstrip("."), "message": why})
    listed = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    message = f'{kind}.{group} "{name}" is invalid: ' + (
        listed if len(causes) == 1 else f"[{listed}]"
    )
    details = {"name": name, "group": group, "kind": kind, "causes": causes}
    return kmock.KubernetesError(status=422, reason="Invalid", message=message, details=details)


class _TlsTestServer(aiohttp.test_utils.RawTestServer):
    async def start_server(
        self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        await super().start_server(loop, ssl=server_context(), **kwargs)


def _tls_client(url: yarl.URL) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(ssl=client_context()))


class EmulatedCluster:
    """The emulator served over HTTPS from a background thread's event loop."""

    def __init__(self, kubeconfig: Path, *, crds_installed: bool = True) -> None:
        self.kubeconfig = kubeconfig
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.emulator = ApiEmulator(crds_installed=crds_installed)
        self._server = kmock.Server(
            self.emulator, server_cls=_TlsTestServer, client_fct=_tls_client
        )
        self.url = ""

    def __enter__(self) -> EmulatedCluster:
        self._thread.start()
        self.run(self.emulator.__aenter__())
        self.run(self._server.__aenter__())
        self.url = str(self._server.url).rstrip("/")
        self.write_kubeconfig(self.kubeconfig, ADMIN_TOKEN)
        return self

    def __exit__(self, *_: object) -> None:
        self.run(self._server.__aexit__(None, None, None))
        self.run(self.emulator.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def write_kubeconfig(self, path: Path, token: str) -> None:
        """A kubeconfig that reaches the emulator with `token`."""
        authority = base64.b64encode(certificate_authority()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "emulator",
                    "cluster": {"server": self.url, "certificate-authority-data": authority},
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "user"}}],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config))

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token for ServiceAccount `name`, from the TokenRequest API (as
        the kubelet asks for the token it mounts into a pod)."""
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}}
        return str(self.call("POST", path, request)["status"]["token"])

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the emulator's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(10)

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """The stored objects of `resource` (e.g. 'v1/pods'), in creation order."""

        async def collect() -> list[dict[str, Any]]:
            return [dict(obj) for obj in self.emulator.stored(resource, namespace)]

        return self.run(collect())

    def request(
        self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN
    ) -> tuple[int, Any]:
        """One API request, as a client (kubectl, or the kubelet the test
        plays) would send it, as the admin unless `token` says who: the
        HTTP status and the answer."""

        async def send() -> tuple[int, Any]:
            headers = {"Authorization": f"Bearer {token}"}
            if isinstance(body, list):
                headers["Content-Type"] = "application/json-patch+json"
            async with self.emulator.request(method, path, json=body, headers=headers) as response:
                return response.status, await response.json()

        return self.run(send())

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """`request`, failing the test on an error status; the answer."""
        code, payload = self.request(method, path, body)
        assert code < 400, (method, path, code, payload)
        return payload


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedCluster]:
    """An emulated cluster, with $KUBECONFIG pointing at it as the admin."""
    kubeconfig = tmp_path / "kubeconfig"
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with EmulatedCluster(kubeconfig) as emulated:
        yield emulated


@pytest.fixture
def new_cluster(tmp_path: Path) -> Iterator[EmulatedCluster]:
    """An emulated cluster without our CRDs, as before `helm install`; the
    admin's kubeconfig is its `kubeconfig` ($KUBECONFIG is left alone)."""
    with EmulatedCluster(tmp_path / "admin.kubeconfig", crds_installed=False) as emulated:
        yield emulated
