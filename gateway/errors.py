"""What can go wrong with a request at the gateway, one kind per answer.

The APIs answer the same failure differently (TGI: `{"error", "error_type"}`
with its status codes; OpenAI: an error object; gRPC: a status code), so the
gateway raises one `GatewayError` with a `Kind` and each API maps the kind.
A worker's own gRPC error becomes the kind its status code means.
"""

from __future__ import annotations

import enum

import grpc


class Kind(enum.Enum):
    """Kinds of failure, each with the gRPC code it maps to (each HTTP API
    maps the kinds to its own status codes)."""

    # The request is malformed or asks for something unsupported.
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    # No credentials, or the wrong ones.
    UNAUTHORIZED = grpc.StatusCode.UNAUTHENTICATED
    # The model or adapter it names does not exist.
    NOT_FOUND = grpc.StatusCode.NOT_FOUND
    # The waiting queue is full, or the workers refused for capacity.
    OVERLOADED = grpc.StatusCode.RESOURCE_EXHAUSTED
    # No worker could take it within the wait bound (none up, none meets
    # the quality floor), or a worker failed before the first token twice.
    UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
    # A worker failed after generation started, or in a way it should not.
    GENERATION = grpc.StatusCode.INTERNAL

    @property
    def grpc_code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = self.value
        return code


class GatewayError(Exception):
    """A request the gateway cannot serve; `retry_after` (seconds) is sent
    as Retry-After where waiting may help."""

    def __init__(self, kind: Kind, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


# Worker status codes, by the kind they are for the client.
_FROM_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: Kind.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: Kind.INVALID,
    grpc.StatusCode.NOT_FOUND: Kind.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Kind.OVERLOADED,
    grpc.StatusCode.UNAVAILABLE: Kind.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Kind.UNAVAILABLE,
}
# Failures another worker may not have: tried once more elsewhere, before
# the first token. NOT_FOUND is an adapter evicted since the last poll.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def from_worker(code: grpc.StatusCode, details: str, worker: str) -> GatewayError:
    """The error a worker's status means for the client. Authentication
    between gateway and worker is the gateway's business: a worker refusing
    its token is the gateway misconfigured (GENERATION), never the client's
    credentials."""
    kind = _FROM_GRPC.get(code, Kind.GENERATION)
    retry = 1 if kind in (Kind.OVERLOADED, Kind.UNAVAILABLE) else None
    return GatewayError(kind, f"worker {worker}: {code.name}: {details}", retry)
