"""The ready file: how `elasticfleet worker --ready-file PATH` tells whoever
launched it that it serves, and where.

Once its gRPC server (and its metrics server, if any) listens, the worker
writes PATH: a JSON object with the host, the bound gRPC port, the metrics
port (or null) and its pid. Why a file:

- with `--port 0` the worker binds a free port itself, so it alone knows
  the port; a launcher that picked a free port and passed it on would race
  every other process for it until the worker bound it;
- a launcher that parsed the worker's "listening on" log line would be
  coupled to wording written for people, and to whatever else the log holds;
- polling gRPC health would need the port first, and says nothing of the
  metrics port.

The file is written under a temporary name in the same folder and renamed
into place, so a reader finds no file or a whole one, never a partial one.
The worker removes it when it stops taking requests (SIGTERM); a file left
by an earlier worker at the same path (one killed before it could) is
removed at start-up, before the model loads. The pid lets whoever did not
start the worker (a person, a supervisor) signal it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

MAX_PORT = 65535
MAX_PID = 2**22  # Linux's PID_MAX_LIMIT


class ReadyFileError(ValueError):
    """A ready file that is not a worker's ready document."""


@dataclass(frozen=True)
class WorkerReady:
    """Where a worker that has started to serve listens."""

    host: str
    port: int
    metrics_port: int | None
    pid: int

    @property
    def address(self) -> str:
        """HOST:PORT of its gRPC server."""
        return f"{self.host}:{self.port}"


def write_ready_file(path: Path, ready: WorkerReady) -> None:
    """Write `ready` to `path` atomically: a temporary file in the same
    folder (so the rename stays on one file system), then a rename."""
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w") as file:
            json.dump(asdict(ready), file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def remove_ready_file(path: Path) -> None:
    """Remove a stale ready file, if any, so that none names this worker
    before it serves. Raises ReadyFileError when `path` could never be
    written (its folder does not exist), so the worker fails before it
    loads its model rather than once it serves."""
    if not path.parent.is_dir():
        raise ReadyFileError(f"ready file {path}: folder {path.parent} does not exist")
    path.unlink(missing_ok=True)


def read_ready_file(path: Path) -> WorkerReady:
    """The document at `path`. Raises FileNotFoundError while there is
    none, and ReadyFileError, saying what is wrong, for a malformed one."""
    raw = path.read_bytes()
    try:
        document: Any = json.loads(raw)
    except ValueError as error:  # not JSON, or not UTF-8
        raise ReadyFileError(f"ready file {path} is not JSON ({error}): {raw[:200]!r}") from None
    if not isinstance(document, dict):
        raise ReadyFileError(f"ready file {path} holds {type(document).__name__}, not an object")
    missing = [f.name for f in fields(WorkerReady) if f.name not in document]
    if missing:
        raise ReadyFileError(f"ready file {path} lacks {', '.join(missing)}")
    host = document["host"]
    if not isinstance(host, str) or not host:
        raise ReadyFileError(f"ready file {path}: host must be a non-empty string, got {host!r}")
    metrics_port = document["metrics_port"]
    if metrics_port is not None:
        metrics_port = _integer(path, "metrics_port", metrics_port, MAX_PORT)
    return WorkerReady(
        host=host,
        port=_integer(path, "port", document["port"], MAX_PORT),
        metrics_port=metrics_port,
        pid=_integer(path, "pid", document["pid"], MAX_PID),
    )


def _integer(path: Path, name: str, value: object, highest: int) -> int:
    """`value` if it is an integer from 1 to `highest` (JSON's true and
    false are not integers here)."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= highest:
        return value
    raise ReadyFileError(
        f"ready file {path}: {name} must be an integer from 1 to {highest}, got {value!r}"
    )
