"""Telemetry: the windowed request mix, and device memory from NVML (the
worker's share by NVML's figure for its process, else the CUDA allocator's
reserved bytes, else its tensors) or, without a GPU, from the host; the
simulated device, with and without a caching allocator; and the engine's
snapshots, which read the device and the worker's own figures at one moment.

NVML is played by a module that keeps the real pynvml's interface where the
code relies on it: its error classes (the real ones: NVMLError(code) makes
the subclass for the code), memory info with total/used/free, and running
processes with pid and usedGpuMemory (None where the driver has no figure)."""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pynvml
import pytest
import torch
from serving_helpers import make_engine

from elasticfleet.worker.errors import Unavailable
from elasticfleet.worker.model.generation import SamplingParams
from elasticfleet.worker.model.plan import PruningPlan
from elasticfleet.worker.serving.engine import TokenEvent
from elasticfleet.worker.serving.telemetry import (
    RequestMix,
    SimulatedDevice,
    SystemDevice,
    histogram,
    percentile,
    write_simulated_device,
)

# Fixtures: served_model_dir, one_thread.
pytest_plugins = ["serving_fixtures"]

GIB = 2**30


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


def fake_nvml(
    processes: Sequence[tuple[int, int | None]] | Exception = (),
    init_error: Exception | None = None,
) -> tuple[Any, list[str]]:
    """A pynvml whose GPU 0 is a 141 GiB H200 with 41 GiB in use, running
    `processes` (pid, usedGpuMemory), or raising that error when asked for
    them; the calls it got, in order."""
    calls: list[str] = []
    fake: Any = types.ModuleType("pynvml")
    fake.NVMLError = pynvml.NVMLError

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise init_error

    def running(handle: str) -> list[Any]:
        calls.append("processes")
        if isinstance(processes, Exception):
            raise processes
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes]

    def memory(handle: str) -> Any:
        calls.append("memory")
        return types.SimpleNamespace(total=141 * GIB, used=41 * GIB, free=100 * GIB)

    fake.nvmlInit = init
    fake.nvmlShutdown = lambda: calls.append("shutdown")
    fake.nvmlDeviceGetHandleByIndex = lambda index: f"handle-{index}"
    fake.nvmlDeviceGetName = lambda handle: "NVIDIA H200"
    fake.nvmlDeviceGetMemoryInfo = memory
    fake.nvmlDeviceGetComputeRunningProcesses = running
    return fake, calls


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """CUDA as this CPU-only torch has it (never initialised); the calls to
    empty_cache are recorded."""
    released: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append("empty_cache"))
    return released


def test_the_gpu_is_read_with_nvmls_figure_for_this_process(
    monkeypatch: pytest.MonkeyPatch, no_cuda: list[str]
) -> None:
    me = os.getpid()
    fake, calls = fake_nvml([(me + 1, 30 * GIB), (me, 3 * GIB), (me, 2 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    memory = SystemDevice().read(allocated_bytes=GIB)
    assert (memory.source, memory.total_bytes, memory.used_bytes, memory.free_bytes) == (
        "nvml",
        141 * GIB,
        41 * GIB,
        100 * GIB,
    )
    # Its own entries (one per MIG instance it uses), not its tensors' bytes.
    assert memory.own_bytes == 5 * GIB
    assert memory.detail == "GPU 0: NVIDIA H200; own bytes: NVML's figure for this process"
    # The processes are read right after the memory, in one NVML session.
    assert calls == ["init", "memory", "processes", "shutdown"]


@pytest.mark.parametrize(
    "processes",
    [
        [(1, 3 * GIB)],  # another pid: in a container NVML sees the host's pids
        [(os.getpid(), None)],  # no figure from the driver (usedGpuMemory None)
        pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED),
    ],
    ids=["not-listed", "no-figure", "not-supported"],
)
def test_without_nvmls_figure_the_cuda_allocators_reserved_bytes_count(
    monkeypatch: pytest.MonkeyPatch, processes: Sequence[tuple[int, int | None]] | Exception
) -> None:
    fake, _calls = fake_nvml(processes)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 7 * GIB)
    memory = SystemDevice().read(allocated_bytes=GIB)
    assert (memory.source, memory.own_bytes) == ("nvml", 7 * GIB)
    assert memory.detail.endswith("own bytes: the CUDA allocator's reserved bytes")


def test_without_cuda_the_workers_tensors_count(
    monkeypatch: pytest.MonkeyPatch, no_cuda: list[str]
) -> None:
    fake, _calls = fake_nvml([(1, 3 * GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    memory = SystemDevice().read(allocated_bytes=GIB)
    assert (memory.source, memory.own_bytes) == ("nvml", GIB)
    assert "own bytes: the worker's tensors (NVML has no figure for this process)" in memory.detail


def test_the_host_is_read_when_nvml_cannot_be_used_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What pynvml raises on a machine without the driver: NVMLError_LibraryNotFound.
    missing = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert isinstance(missing, pynvml.NVMLError_LibraryNotFound)
    fake, calls = fake_nvml(init_error=missing)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    memory = SystemDevice().read(allocated_bytes=123)
    assert calls == ["init"]
    assert memory.source == "host"
    assert "NVMLError_LibraryNotFound: NVML Shared Library Not Found" in memory.detail
    assert memory.detail.endswith("own bytes: the worker's tensors")
    assert memory.total_bytes >= memory.free_bytes > 0
    assert memory.used_bytes == memory.total_bytes - memory.free_bytes
    assert memory.own_bytes == 123


def test_the_cuda_cache_is_released_only_where_cuda_runs(
    monkeypatch: pytest.MonkeyPatch, no_cuda: list[str]
) -> None:
    SystemDevice().release_cache()
    assert no_cuda == []  # CUDA never initialised: nothing to give back (nor to start)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    SystemDevice().release_cache()
    assert no_cuda == ["empty_cache"]


def test_a_simulated_device_is_read_on_every_call(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    write_simulated_device(path, total_bytes=1000, others_bytes=100)
    device = SimulatedDevice(path)
    memory = device.read(allocated_bytes=300)
    assert (memory.total_bytes, memory.used_bytes, memory.free_bytes) == (1000, 400, 600)
    assert memory.own_bytes == 300
    assert memory.source == "simulated" and str(path) in memory.detail
    write_simulated_device(path, total_bytes=1000, others_bytes=900)
    squeezed = device.read(allocated_bytes=300)
    # The others get what the worker leaves: never more than the total in use.
    assert (squeezed.used_bytes, squeezed.free_bytes, squeezed.own_bytes) == (1000, 0, 300)
    assert squeezed.used_bytes - squeezed.own_bytes == 700
    assert device.read(allocated_bytes=100).own_bytes == 100  # freed memory is not its own


def test_a_simulated_caching_allocator_keeps_freed_memory_until_released(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    write_simulated_device(path, total_bytes=1000, others_bytes=100, caching_allocator=True)
    assert json.loads(path.read_text())["caching_allocator"] is True
    device = SimulatedDevice(path)
    assert device.read(allocated_bytes=500).own_bytes == 500
    pruned = device.read(allocated_bytes=200)  # blocks dropped: still reserved
    assert (pruned.own_bytes, pruned.used_bytes) == (500, 600)
    assert "a caching allocator's reserved bytes" in pruned.detail
    assert pruned.used_bytes - pruned.own_bytes == 100  # the others did not grow
    device.release_cache()
    released = device.read(allocated_bytes=200)
    assert (released.own_bytes, released.used_bytes) == (200, 300)
    # Without the option the file reads as before, and freed memory is freed.
    write_simulated_device(path, total_bytes=1000, others_bytes=100)
    assert "caching_allocator" not in json.loads(path.read_text())
    assert device.read(allocated_bytes=500).own_bytes == 500
    assert device.read(allocated_bytes=200).own_bytes == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file or directory"),
        ("{", 'expected JSON {"total_bytes": <int>, "others_bytes": <int>} (JSONDecodeError'),
        ('{"total_bytes": 10}', "(KeyError: 'others_bytes')"),
        ('{"total_bytes": 0, "others_bytes": 0}', "total_bytes must be positive"),
        ('{"total_bytes": 10, "others_bytes": -1}', "others_bytes not negative, got 10 and -1"),
        (
            '{"total_bytes": 10, "others_bytes": 1, "caching_allocator": "yes"}',
            "caching_allocator must be true or false, got 'yes'",
        ),
    ],
)
def test_a_broken_simulated_device_says_what_is_wrong(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "device.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="simulated device") as raised:
        SimulatedDevice(path).read(allocated_bytes=0)
    assert message in str(raised.value)


# -- the engine's snapshots: its figures and the device's at one moment ----------


def test_a_snapshot_asked_for_as_a_request_finishes_sees_its_kv_freed(
    served_model_dir: Path, one_thread: None, tmp_path: Path
) -> None:
    """The demo's flake: a client told "done" asks for stats while the
    iteration that finished its request has not yet freed the KV cache nor
    taken a new picture. The device read with that picture (capped at the
    total, as a device is) showed the others holding less than they do, and
    the operator budgeted memory they held. A snapshot waits for the
    iteration's end: the KV is gone, and the device agrees with the picture."""
    path = tmp_path / "device.json"
    engine = make_engine(served_model_dir, device=SimulatedDevice(path))
    weights = engine.stats().picture.weight_bytes
    total, others = 4 * weights, 3 * weights  # room for the weights, not for the KV too
    write_simulated_device(path, total, others)
    told_done = threading.Event()
    seen: dict[str, Any] = {}

    def sink(event: TokenEvent | Exception) -> None:  # on the engine's thread
        if isinstance(event, TokenEvent) and event.finish_reason:
            seen["picture"] = engine.stats().picture  # what GetStats took before
            seen["snapshot"] = engine.snapshot()  # what it takes now
            told_done.set()

    engine.start()
    try:
        engine.submit("hello", SamplingParams(max_new_tokens=3, ignore_eos=True), sink)
        assert told_done.wait(60)
        snapshot = seen["snapshot"].result(timeout=60)
    finally:
        engine.close()
    stale = seen["picture"]
    assert stale.kv_reserved_bytes > 0  # the finished request's cache, still held
    before = SimulatedDevice(path).read(stale.total_bytes)
    assert before.used_bytes == total and before.used_bytes - before.own_bytes < others
    picture = snapshot.stats.picture
    assert (picture.kv_reserved_bytes, picture.active_sequences) == (0, 0)
    assert snapshot.device.own_bytes == picture.total_bytes == weights
    assert snapshot.device.used_bytes - snapshot.device.own_bytes == others


def test_a_plan_switch_gives_the_allocators_cache_back_and_reads_the_device(
    served_model_dir: Path, one_thread: None, tmp_path: Path
) -> None:
    path = tmp_path / "device.json"
    write_simulated_device(path, 2**30, 2**20, caching_allocator=True)
    engine = make_engine(served_model_dir, device=SimulatedDevice(path))
    dense = engine.snapshot().result(timeout=0)  # not started: taken in this thread
    assert dense.device.own_bytes == dense.stats.picture.weight_bytes
    layers = engine.model.config.num_hidden_layers
    future = engine.submit_plan(PruningPlan.from_dropped(layers, ffn=[0, 1, 2]), "small")
    engine.step()
    switch = future.result(timeout=0)
    assert switch.device is not None
    # Released: the caching allocator holds what the smaller plan allocates.
    assert switch.device.own_bytes == switch.after.weight_bytes < dense.device.own_bytes
    assert switch.device.used_bytes == 2**20 + switch.device.own_bytes


def test_an_unreadable_device_fails_the_snapshot_not_the_engine(
    served_model_dir: Path, one_thread: None, tmp_path: Path
) -> None:
    path = tmp_path / "device.json"
    path.write_text("not json")
    engine = make_engine(served_model_dir, device=SimulatedDevice(path))
    engine.start()
    try:
        with pytest.raises(ValueError, match="simulated device"):
            engine.snapshot().result(timeout=60)
        # A switch still happens; it says it could not read the device.
        layers = engine.model.config.num_hidden_layers
        switch = engine.submit_plan(PruningPlan.from_dropped(layers, ffn=[0]), "p").result(60)
        assert switch.device is None
        write_simulated_device(path, 2**30, 0)
        assert engine.snapshot().result(timeout=60).device.own_bytes == switch.after.weight_bytes
    finally:
        engine.close()
    with pytest.raises(Unavailable):
        engine.snapshot()
