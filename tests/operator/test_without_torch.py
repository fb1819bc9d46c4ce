"""The operator at work with torch unimportable (tests/operator/without_torch.py
in a subprocess): its command line, its handlers, an rl decision and an
AdapterSet check against a real Valkey server. The operator's image has no
torch; tests/images runs the same script there."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import without_torch
from test_adapter_sets import adapter_set_spec

from elasticfleet.worker.adapters.store import AdapterStore
from elasticfleet.worker.adapters.weights import AdapterWeights

SCRIPT = Path(without_torch.__file__)
ADAPTER_SPEC = adapter_set_spec()


def check_report(report: dict[str, Any]) -> None:
    """What every run of the script must show, wherever it ran."""
    assert "--peering" in report["run_help"], report["run_help"]
    assert report["plans"] == without_torch.decisions()
    assert report["adapter_check"] == {"ready": True, "reason": "Published"}
    assert report["torch_modules"] == []


def test_the_operator_works_without_torch(
    store: AdapterStore, redis_url: str, make_adapter: Callable[..., AdapterWeights]
) -> None:
    store.publish(make_adapter(name="demo"))
    args = [sys.executable, str(SCRIPT), redis_url, "demo", json.dumps(ADAPTER_SPEC)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["torch_installed"]  # here torch is there, and was blocked
    check_report(report)
