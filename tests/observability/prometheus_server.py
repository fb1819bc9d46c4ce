"""A real Prometheus server for tests, and promtool.

Both come from Debian's `prometheus` package, which scripts/setup installs
as root (`$ELASTICFLEET_PROMETHEUS` and `$ELASTICFLEET_PROMTOOL` name
others); without them the tests that need them are skipped and say so.
The server listens on a free loopback port with a configuration the test
writes, keeps its data in the test's temporary folder, and is stopped (by
its PID) by the fixture that started it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = os.environ.get("ELASTICFLEET_PROMETHEUS") or shutil.which("prometheus")
PROMTOOL = os.environ.get("ELASTICFLEET_PROMTOOL") or shutil.which("promtool")
NO_PROMETHEUS = (
    "no prometheus/promtool (Debian's `prometheus` package; scripts/setup installs it as root)"
)

requires_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
requires_promtool = pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrometheusServer:
    """`prometheus` scraping `jobs` every `interval` and evaluating `rules`."""

    def __init__(
        self,
        folder: Path,
        jobs: list[dict[str, Any]],
        rule_files: list[Path],
        interval: str = "1s",
    ) -> None:
        assert PROMETHEUS is not None
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": jobs,
        }
        config_file = folder / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready: {self.log.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful answer of the HTTP API at /api/v1/`path`."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as reply:
            answer = json.loads(reply.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> Any:
        """What `expr` evaluated to at each step from `start` to `end`."""
        return self.api("query_range", query=expr, start=str(start), end=str(end), step=step)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
