"""The few Kubernetes API calls the handlers make themselves.

kopf watches, patches the objects it handles and posts Events, but it does
not create other objects. Creating a fleet's children needs only
get / create / merge-patch of three kinds, so instead of a second client
library (with its own login) this is a small aiohttp client built from the
same `kopf.ConnectionInfo` the operator logged in with: one set of
credentials for everything the operator does.

The timers write their status here too, not through kopf's `patch`: kopf
applies a timer's patch outside the handler, and an API error there that it
does not retry (a 409 Conflict, or a 500 that outlasts its retries) ends the
timer for good, silently: the fleet's control loop would stop until the
operator restarts (tests/operator/test_faults.py found it). Written here,
a failed write is the handler's to handle, and the next tick writes the
whole status again.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import kopf

from elasticfleet.operator import crds

# kind -> (API path prefix, plural): the kinds a fleet owns.
PATHS = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "Service": ("/api/v1", "services"),
}
MERGE_PATCH = "application/merge-patch+json"


def custom_object_path(plural: str, namespace: str, name: str) -> str:
    """The path of one of our custom resources (crds.FLEET_PLURAL, ...)."""
    return f"/apis/{crds.GROUP}/{crds.VERSION}/namespaces/{namespace}/{plural}/{name}"


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


def object_path(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = PATHS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    return path if name is None else f"{path}/{name}"


class KubeApi:
    """get / create / merge-patch over one aiohttp session."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        ssl = False if info.insecure else info.as_ssl_context()
        self.session = aiohttp.ClientSession(
            base_url=info.server.rstrip("/") + "/",
            headers=info.as_http_headers(),
            connector=aiohttp.TCPConnector(ssl=ssl),
        )

    async def close(self) -> None:
        await self.session.close()

    async def _call(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        data = None if body is None else json.dumps(body)
        try:
            async with self.session.request(
                method, path.lstrip("/"), data=data, headers=headers
            ) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as error:
            # Failed as the handlers expect an API call to fail: a blip in
            # the connection must not escape a timer as an unknown error
            # (kopf would back off for a minute).
            raise KubeError(0, f"no answer from the API server: {error!r}") from error
        if response.status >= 400:
            try:
                message = json.loads(text).get("message", text)
            except ValueError:
                message = text
            raise KubeError(response.status, str(message))
        return json.loads(text) if text else None

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when there is none."""
        try:
            found: dict[str, Any] = await self._call("GET", path)
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return found

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create `body`, or merge-patch the existing object to match it. A
        restarted operator thus converges on the same children instead of
        creating them twice."""
        meta = body["metadata"]
        path = object_path(body["kind"], meta["namespace"], meta["name"])
        existing = await self.get(path)
        if existing is None:
            created: dict[str, Any] = await self._call(
                "POST",
                object_path(body["kind"], meta["namespace"]),
                body,
                **{"Content-Type": "application/json"},
            )
            return created
        patched: dict[str, Any] = await self._call(
            "PATCH", path, body, **{"Content-Type": MERGE_PATCH}
        )
        return patched

    async def patch_status(self, path: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource of the object at `path`; an
        object that is gone has no status to write."""
        try:
            await self._call(
                "PATCH", f"{path}/status", {"status": status}, **{"Content-Type": MERGE_PATCH}
            )
        except KubeError as error:
            if error.status != 404:
                raise
