"""What a worker reports about itself: the request mix over a recent window,
its throughput, and the memory of the device it runs on with its own share
of it, read at one moment (Device).

The operator feeds the window's figures to the pruning policy as its
(batch, sequence) state, so a plan anticipates the load of the last minute
rather than the last instant; high percentiles rather than means, because a
plan must hold through the busy moments of that load.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BOUNDS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Enough for a minute of 10 ms steps; older entries fall out of the window anyway.
MAX_EVENTS = 20_000


@dataclass(frozen=True)
class Histogram:
    """Observations per bucket; counts has one more entry than upper_bounds."""

    upper_bounds: tuple[float, ...]
    counts: tuple[int, ...]


def histogram(values: Sequence[float], bounds: Sequence[float]) -> Histogram:
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect.bisect_left(bounds, value)] += 1
    return Histogram(tuple(float(b) for b in bounds), tuple(counts))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


@dataclass(frozen=True)
class MixSnapshot:
    """The request mix over the window."""

    window_s: float
    batch_size: Histogram
    prompt_tokens: Histogram
    output_tokens: Histogram
    finished_requests: int
    batch_size_p90: float
    sequence_tokens_p90: float
    tokens_per_second: float


class RequestMix:
    """Decode steps and finished requests within the last `window_s` seconds."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"window must be positive, got {window_s} s")
        self.window_s = window_s
        self.clock = clock
        self.started = clock()
        self.steps: deque[tuple[float, int, int]] = deque(maxlen=MAX_EVENTS)  # t, rows, tokens
        self.finished: deque[tuple[float, int, int]] = deque(maxlen=MAX_EVENTS)  # t, prompt, out

    def record_step(self, rows: int, tokens: int) -> None:
        """One decode step over `rows` sequences that produced `tokens` tokens."""
        self.steps.append((self.clock(), rows, tokens))

    def record_finished(self, prompt_tokens: int, output_tokens: int) -> None:
        self.finished.append((self.clock(), prompt_tokens, output_tokens))

    def snapshot(self) -> MixSnapshot:
        now = self.clock()
        since = now - self.window_s
        steps = [s for s in list(self.steps) if s[0] >= since]
        done = [f for f in list(self.finished) if f[0] >= since]
        span = min(self.window_s, max(now - self.started, 1e-9))
        rows = [s[1] for s in steps]
        return MixSnapshot(
            window_s=self.window_s,
            batch_size=histogram(rows, BATCH_BOUNDS),
            prompt_tokens=histogram([f[1] for f in done], TOKEN_BOUNDS),
            output_tokens=histogram([f[2] for f in done], TOKEN_BOUNDS),
            finished_requests=len(done),
            batch_size_p90=percentile(rows, 90),
            sequence_tokens_p90=percentile([f[1] + f[2] for f in done], 90),
            tokens_per_second=sum(s[2] for s in steps) / span,
        )


@dataclass(frozen=True)
class DeviceMemory:
    """Memory of the device the model runs on, the worker's own share of it
    read at the same moment, and where the figures came from."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    # Of used_bytes, what this worker's process holds (see Device.read).
    own_bytes: int
    source: str  # "nvml", "host" or "simulated"
    detail: str  # why this source, and how own_bytes was measured


class Device(Protocol):
    """Where a worker's memory lives.

    The operator takes what other processes hold to be used_bytes -
    own_bytes, so both must come from one reading: from different moments
    (the device after a plan switch, the worker's bytes before it, or a
    request's KV cache freed between the two) memory the worker freed or
    took is counted as someone else's, and the budget moves for nothing.
    With a caching allocator, "own" must be what the allocator reserves, not
    what the worker's tensors hold: freed blocks stay reserved, so "used"
    does not fall when the worker prunes, and the others' share computed
    from the tensors would grow with every block dropped."""

    def read(self, allocated_bytes: int) -> DeviceMemory:
        """The device's figures and the worker's share of them, at one
        moment. `allocated_bytes` is what the worker's tensors hold now
        (weights, reserved KV cache, adapters), the share where the device
        cannot measure the process itself. ValueError when the device
        cannot be read (a broken simulated device file)."""
        ...

    def release_cache(self) -> None:
        """Give the memory that the process's allocator keeps for reuse
        back to the device, so that what the worker freed can go to others."""
        ...


OWN_FROM_TENSORS = "own bytes: the worker's tensors"


def _cuda_torch() -> Any:
    """torch, when this process has initialised CUDA through it; else None.
    Only an imported torch can have done so: looking does not import it."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_initialized() else None


class SystemDevice:
    """The GPU through NVML, else the host's memory (`detail` says why).

    The worker's share: NVML's figure for this process (read right after the
    device's), else the CUDA allocator's reserved bytes, else its tensors.
    NVML knows a process by its pid in the host's namespace, which a
    container's process does not see as its own, and has no figure under
    some drivers (usedGpuMemory None); the allocator's figure leaves out the
    CUDA context, which is then counted with the others' memory."""

    def __init__(self, gpu_index: int = 0) -> None:
        self.gpu_index = gpu_index

    def read(self, allocated_bytes: int) -> DeviceMemory:
        try:
            return self._nvml(allocated_bytes)
        except Exception as error:  # pynvml.NVMLError and its many subclasses, or no module
            reason = f"NVML unavailable ({type(error).__name__}: {error}); host memory reported"
            return host_memory(reason, allocated_bytes)

    def release_cache(self) -> None:
        torch = _cuda_torch()
        if torch is not None:
            torch.cuda.empty_cache()

    def _nvml(self, allocated_bytes: int) -> DeviceMemory:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
            name = pynvml.nvmlDeviceGetName(handle)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            own, how = _own_on_gpu(pynvml, handle, allocated_bytes)
        finally:
            pynvml.nvmlShutdown()
        detail = f"GPU {self.gpu_index}: {name}; {how}"
        return DeviceMemory(int(info.total), int(info.used), int(info.free), own, "nvml", detail)


def _own_on_gpu(pynvml: Any, handle: Any, allocated_bytes: int) -> tuple[int, str]:
    """This process's bytes on the GPU, and how they were measured."""
    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:  # e.g. NotSupported, NoPermission: measure it another way
        processes = []
    pid = os.getpid()
    figures = [p.usedGpuMemory for p in processes if p.pid == pid]
    if figures and None not in figures:  # one entry per MIG instance it uses
        return sum(int(f) for f in figures), "own bytes: NVML's figure for this process"
    torch = _cuda_torch()
    if torch is not None:
        return int(torch.cuda.memory_reserved()), "own bytes: the CUDA allocator's reserved bytes"
    return allocated_bytes, f"{OWN_FROM_TENSORS} (NVML has no figure for this process)"


def host_memory(detail: str, allocated_bytes: int) -> DeviceMemory:
    """Host memory from /proc/meminfo (MemAvailable counts reclaimable cache
    as free, which is what a new allocation can get); the worker's share is
    its tensors (`allocated_bytes`)."""
    fields: dict[str, int] = {}
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                fields[name] = int(parts[0]) * 1024
    total = fields.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    free = fields.get("MemAvailable", fields.get("MemFree", 0))
    own = f"{detail}; {OWN_FROM_TENSORS}"
    return DeviceMemory(total, total - free, free, allocated_bytes, "host", own)


def open_device(simulated: Path | None) -> Device:
    """The device a worker reports: the simulated one when it was given one,
    else the GPU's, else the host's."""
    return SystemDevice() if simulated is None else SimulatedDevice(simulated)


def write_simulated_device(
    path: Path, total_bytes: int, others_bytes: int, caching_allocator: bool = False
) -> None:
    """Set a simulated device (see SimulatedDevice): `total_bytes` of which
    other processes hold `others_bytes`; with `caching_allocator`, memory the
    worker frees stays its own until it releases its cache."""
    figures: dict[str, int | bool] = {"total_bytes": total_bytes, "others_bytes": others_bytes}
    if caching_allocator:
        figures["caching_allocator"] = True
    # Replaced whole, so a worker reading it meanwhile never sees half a file.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(figures))
    partial.replace(path)


class SimulatedDevice:
    """A simulated device, for demos and tests on machines without a GPU.

    Its file holds JSON `{"total_bytes": T, "others_bytes": O}`, read on
    every call, so whoever plays the other processes squeezes the device by
    rewriting it. The worker's share is what its tensors hold; with
    `"caching_allocator": true` it is what a caching allocator would hold
    instead, the most the worker held (as seen at each reading) since it
    last released its cache, as on a GPU where freed blocks stay reserved.
    In use: the others' bytes plus the worker's, at most the total (the
    others get only what the worker leaves free). A missing or malformed
    file raises ValueError saying what is wrong with it. Read from one
    thread (the engine's)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reserved = 0

    def read(self, allocated_bytes: int) -> DeviceMemory:
        total, others, caching = self._figures()
        self._reserved = max(self._reserved, allocated_bytes) if caching else allocated_bytes
        own = self._reserved
        used = min(total, others + own)
        how = "own bytes: a caching allocator's reserved bytes" if caching else OWN_FROM_TENSORS
        detail = f"simulated by {self.path}; {how}"
        return DeviceMemory(total, used, total - used, own, "simulated", detail)

    def release_cache(self) -> None:
        self._reserved = 0  # the next reading holds what is allocated then

    def _figures(self) -> tuple[int, int, bool]:
        path = self.path
        try:
            figures = json.loads(path.read_text())
            total, others = int(figures["total_bytes"]), int(figures["others_bytes"])
            caching = figures.get("caching_allocator", False)
        except OSError as error:
            raise ValueError(f"simulated device {path}: {error.strerror or error}") from None
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(
                f"simulated device {path}: expected JSON "
                f'{{"total_bytes": <int>, "others_bytes": <int>}} ({type(error).__name__}: {error})'
            ) from None
        if total <= 0 or others < 0:
            raise ValueError(
                f"simulated device {path}: total_bytes must be positive and others_bytes "
                f"not negative, got {total} and {others}"
            )
        if not isinstance(caching, bool):
            raise ValueError(
                f"simulated device {path}: caching_allocator must be true or false, got {caching!r}"
            )
        return total, others, caching
