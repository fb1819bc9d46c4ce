"""`elasticfleet worker` as a child process: started, awaited until it
listens, stopped by its PID (`stop_process` serves any child process).

What runs worker processes outside Kubernetes uses this: the local fleet
demo, and the integration tests that play kubelet for the operator. The
worker's stderr goes to a log file (a pipe nobody drains would block it
once full). Where it serves comes from its ready file (readiness.py, next
to the log), so `--port 0` lets the worker pick a free port without a race.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from elasticfleet.worker.serving.readiness import WorkerReady, read_ready_file

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class WorkerStartError(RuntimeError):
    """The worker exited, or did not listen in time; the message ends with its log."""


class WorkerProcess:
    """One running `elasticfleet worker` and where it serves (`ready`)."""

    def __init__(self, process: subprocess.Popen[bytes], ready: WorkerReady, log: Path) -> None:
        self.process = process
        self.ready = ready
        self.log = log

    @property
    def address(self) -> str:
        """HOST:PORT of its gRPC server."""
        return self.ready.address

    @property
    def port(self) -> int:
        return self.ready.port

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        timeout_s: float = START_TIMEOUT_S,
    ) -> WorkerProcess:
        """Run `elasticfleet worker ARGS` with this Python (its environment
        plus `env`) and return once it listens, that is once it has written
        its ready file (`log` with the suffix .ready.json). Raises
        WorkerStartError, with the log's tail, if it exits first or takes
        over `timeout_s`."""
        ready_file = log.with_suffix(".ready.json")
        # Gone before the worker starts, so a file found is the new worker's.
        ready_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "elasticfleet.cli", "worker", *args,
            "--ready-file", str(ready_file),
        ]  # fmt: skip
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=sink,
                env={**os.environ, **(env or {})},
            )
        return cls.attach(process, log, ready_file, timeout_s)

    @classmethod
    def attach(
        cls,
        process: subprocess.Popen[bytes],
        log: Path,
        ready_file: Path,
        timeout_s: float = START_TIMEOUT_S,
    ) -> WorkerProcess:
        """Wait for a worker started some other way (say, by a container
        runtime, with `--ready-file` at a path this process sees as
        `ready_file`) whose stderr goes to `log`, as `start` does for its own."""
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                with contextlib.suppress(FileNotFoundError):  # not yet
                    return cls(process, read_ready_file(ready_file), log)
                if process.poll() is not None:
                    raise WorkerStartError(
                        f"worker exited with status {process.returncode}:\n{_tail(log)}"
                    )
                if time.monotonic() > deadline:
                    raise WorkerStartError(
                        f"worker did not listen within {timeout_s:.0f} s:\n{_tail(log)}"
                    )
                time.sleep(0.05)
        except BaseException:  # timed out, or interrupted: no worker is left behind
            if process.poll() is None:
                process.kill()
                process.wait()
            raise

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (the worker drains its requests), then SIGKILL after
        `timeout_s`; returns the exit status."""
        return stop_process(self.process, timeout_s)

    def kill(self) -> None:
        """SIGKILL: the worker dies as a crashed pod does, with no drain."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL if `process` has not exited after `timeout_s`;
    its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
