"""Errors a real API server answers now and then, on demand: the emulator
(kube_emulator.py) answers them instead of serving a request, so the
fault-injection test (test_faults.py) can break the API under a running
operator and see it recover.

Each is worded as kube-apiserver words it, in the Status shape clients
parse:
- 409 Conflict: "the object has been modified" (an optimistic-concurrency
  failure; the server's own retries of a patch can end in it too);
- 500 InternalError: the storage layer failed (etcd timed out);
- 410 Expired on a watch: the resourceVersion it watches from was compacted
  away. A real server answers such a watch with 200 and one ERROR event
  carrying the Status, then ends the stream; clients must list again. On
  any other request it is an HTTP 410 (an expired `continue` token).

A `Fault` matches requests by verb, resource and subresource as RBAC names
them (kube_auth.Attributes) and, optionally, by their body; it answers the
next `times` of them. A `held` fault first keeps the request waiting until
the test calls `release()`, so a test can act while a client is stuck in
that call (kill the operator in the middle of its status write).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import kmock
from kube_auth import Attributes

# Per code: the Status reason and how the server words its message.
_REASONS = {
    409: (
        "Conflict",
        'Operation cannot be fulfilled on {what} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
    ),
    410: ("Expired", "too old resource version: {since} ({now})"),
    500: ("InternalError", "Internal error occurred: etcdserver: request timed out"),
}


@dataclasses.dataclass
class Fault:
    """Answer `code` (409, 410 or 500) to the next `times` requests that
    match; `when`, if given, must also accept the request's body."""

    code: int
    verb: str
    resource: str
    subresource: str = ""
    times: int = 1
    when: Callable[[Any], bool] | None = None
    held: bool = False
    fired: int = 0  # how many requests it answered
    reached: threading.Event = dataclasses.field(default_factory=threading.Event)
    _released: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.code not in _REASONS:
            raise ValueError(f"no fault with code {self.code}; known: {sorted(_REASONS)}")

    def matches(self, attributes: Attributes, body: Any) -> bool:
        return (
            self.fired < self.times
            and (attributes.verb, attributes.resource, attributes.subresource)
            == (self.verb, self.resource, self.subresource)
            and (self.when is None or self.when(body))
        )

    def release(self) -> None:
        """Let a held request go on (to its error)."""
        self._released.set()

    async def wait_released(self) -> None:
        """On the emulator's loop: signal `reached`, wait for `release`."""
        self.reached.set()
        while not self._released.is_set():
            await asyncio.sleep(0.02)

    def status(self, attributes: Attributes, version: int) -> dict[str, Any]:
        """The Status object a real server sends."""
        reason, template = _REASONS[self.code]
        what = (
            f"{attributes.resource}.{attributes.group}" if attributes.group else attributes.resource
        )
        message = template.format(what=what, name=attributes.name, since=version, now=version + 1)
        details = {"name": attributes.name, "group": attributes.group, "kind": attributes.resource}
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": details,
            "code": self.code,
        }

    def error(self, attributes: Attributes, version: int) -> kmock.KubernetesError:
        """The fault as an error response."""
        status = self.status(attributes, version)
        return kmock.KubernetesError(
            status=self.code,
            reason=status["reason"],
            message=status["message"],
            details=status["details"],
        )


def expired_event(attributes: Attributes, version: int) -> dict[str, Any]:
    """The ERROR event that ends a watch whose resourceVersion is gone."""
    return {"type": "ERROR", "object": Fault(410, "watch", "").status(attributes, version)}
