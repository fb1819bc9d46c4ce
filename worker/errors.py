"""The errors the serving engine raises, one class per way a caller should
react. The gRPC server maps each class to one status code in a single
interceptor (worker/serving/server.py), so the engine and the adapter code never
import gRPC, and a client can tell "fix your request" from "retry later"
from "this worker is broken".

Messages say what was wrong and what to do, because they reach the person
who sent the request.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the errors a worker reports to its callers."""


class InvalidArgument(WorkerError, ValueError):
    """The request itself is wrong (empty or too long prompt, bad sampling
    values, an unknown task, a malformed plan). Retrying will not help."""


class NotFound(WorkerError, KeyError):
    """The request names something this worker does not have (an adapter
    that is not loaded)."""

    def __str__(self) -> str:
        # KeyError's str() quotes its argument; these messages are sentences.
        return str(self.args[0]) if self.args else ""


class ResourceExhausted(WorkerError):
    """No memory or queue space for the request now (the wait queue is full,
    or the request cannot fit the budget even on an idle worker)."""


class FailedPrecondition(WorkerError):
    """The worker's state forbids the operation (a plan that cannot fit the
    budget with the requests already running, an adapter still in use, no
    adapter store configured)."""


class Unavailable(WorkerError):
    """Temporarily unable to serve (draining for shutdown, adapter store
    unreachable); retrying elsewhere or later may succeed."""


class DataLoss(WorkerError):
    """Stored data is corrupt (an adapter blob failing its digest check)."""
