"""Telemetry: the windowed request mix, and device memory from NVML or,
without a GPU, from the host."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from elasticfleet.worker.serving.telemetry import (
    RequestMix,
    device_memory,
    histogram,
    percentile,
    simulated_memory,
)


def test_histogram_and_percentile() -> None:
    result = histogram([1, 2, 2, 3, 100], [1, 2, 4])
    assert result.counts == (1, 2, 1, 1)  # <=1, <=2, <=4, above
    assert percentile([5, 1, 4, 2, 3], 90) == 5
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile([], 99) == 0


def test_request_mix_forgets_what_left_the_window() -> None:
    now = [100.0]
    mix = RequestMix(window_s=10, clock=lambda: now[0])
    mix.record_step(rows=4, tokens=4)
    mix.record_finished(prompt_tokens=20, output_tokens=30)
    now[0] = 105.0
    mix.record_step(rows=2, tokens=2)
    snapshot = mix.snapshot()
    assert snapshot.finished_requests == 1
    assert snapshot.batch_size_p90 == 4 and snapshot.sequence_tokens_p90 == 50
    assert snapshot.tokens_per_second == pytest.approx(6 / 5)
    now[0] = 112.0  # the first step and the finished request are older than 10 s
    snapshot = mix.snapshot()
    assert snapshot.finished_requests == 0 and snapshot.batch_size_p90 == 2
    assert snapshot.tokens_per_second == pytest.approx(2 / 10)
    with pytest.raises(ValueError, match="window must be positive"):
        RequestMix(window_s=0)


def test_device_memory_reads_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fake: Any = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: calls.append("init")
    fake.nvmlShutdown = lambda: calls.append("shutdown")
    fake.nvmlDeviceGetHandleByIndex = lambda index: f"handle-{index}"
    fake.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        total=141 * 2**30, used=2**30, free=140 * 2**30
    )
    fake.nvmlDeviceGetName = lambda handle: "NVIDIA H200"
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    memory = device_memory()
    assert (memory.source, memory.total_bytes, memory.free_bytes) == (
        "nvml",
        141 * 2**30,
        140 * 2**30,
    )
    assert memory.detail == "GPU 0: NVIDIA H200"
    assert calls == ["init", "shutdown"]


def test_device_memory_falls_back_to_the_host_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake: Any = types.ModuleType("pynvml")

    class NVMLError_LibraryNotFound(Exception):
        pass

    def init() -> None:
        raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    memory = device_memory()
    assert memory.source == "host"
    assert "NVMLError_LibraryNotFound: NVML Shared Library Not Found" in memory.detail
    assert memory.total_bytes >= memory.free_bytes > 0
    assert memory.used_bytes == memory.total_bytes - memory.free_bytes


def test_a_simulated_device_is_read_on_every_call(tmp_path: Path) -> None:
    device = tmp_path / "device.json"
    device.write_text(json.dumps({"total_bytes": 1000, "others_bytes": 100}))
    memory = simulated_memory(device, own_bytes=300)
    assert (memory.total_bytes, memory.used_bytes, memory.free_bytes) == (1000, 400, 600)
    assert memory.source == "simulated" and str(device) in memory.detail
    device.write_text(json.dumps({"total_bytes": 1000, "others_bytes": 900}))
    squeezed = simulated_memory(device, own_bytes=300)
    assert (squeezed.used_bytes, squeezed.free_bytes) == (1000, 0)  # never below zero


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("{", 'expected JSON {"total_bytes": <int>, "others_bytes": <int>} (JSONDecodeError'),
        ('{"total_bytes": 10}', "(KeyError: 'others_bytes')"),
        ('{"total_bytes": 0, "others_bytes": 0}', "total_bytes must be positive"),
        ('{"total_bytes": 10, "others_bytes": -1}', "others_bytes not negative, got 10 and -1"),
    ],
)
def test_a_broken_simulated_device_says_what_is_wrong(
    tmp_path: Path, content: str | None, message: str
) -> None:
    device = tmp_path / "device.json"
    if content is not None:
        device.write_text(content)
    with pytest.raises(ValueError, match="simulated device") as raised:
        simulated_memory(device, own_bytes=0)
    assert message in str(raised.value)
