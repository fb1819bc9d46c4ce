"""What a worker reports about itself: the request mix over a recent window,
its throughput, and the memory of the device it runs on.

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
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """Memory of the device the model runs on, and where the figures came from."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    source: str  # "nvml", "host" or "simulated"
    detail: str


def device_memory(gpu_index: int = 0) -> DeviceMemory:
    """The GPU's memory through NVML, or the host's when NVML cannot be used
    (no driver, no GPU); `detail` then says why."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        finally:
            pynvml.nvmlShutdown()
        return DeviceMemory(
            int(info.total), int(info.used), int(info.free), "nvml", f"GPU {gpu_index}: {name}"
        )
    except Exception as error:  # pynvml.NVMLError and its many subclasses, or no module
        reason = f"NVML unavailable ({type(error).__name__}: {error}); host memory reported"
        return host_memory(reason)


def host_memory(detail: str) -> DeviceMemory:
    """Host memory from /proc/meminfo (MemAvailable counts reclaimable cache
    as free, which is what a new allocation can get)."""
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
    return DeviceMemory(total, total - free, free, "host", detail)


def read_device(simulated: Path | None, own_bytes: int) -> DeviceMemory:
    """The device a worker reports: the simulated one when it was given one
    (ValueError if its file is broken), else the GPU's, else the host's."""
    return device_memory() if simulated is None else simulated_memory(simulated, own_bytes)


def write_simulated_device(path: Path, total_bytes: int, others_bytes: int) -> None:
    """Set a simulated device (see simulated_memory): `total_bytes` of which
    other processes hold `others_bytes`."""
    # Replaced whole, so a worker reading it meanwhile never sees half a file.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"total_bytes": total_bytes, "others_bytes": others_bytes}))
    partial.replace(path)


def simulated_memory(path: Path, own_bytes: int) -> DeviceMemory:
    """A simulated device, for demos and tests on machines without a GPU:
    `path` holds JSON `{"total_bytes": T, "others_bytes": O}`, read on every
    call, so whoever plays the other processes squeezes the device by
    rewriting it. In use: what the others hold plus the worker's own
    `own_bytes` (weights, KV cache and adapters). A missing or malformed
    file raises ValueError saying what is wrong with it."""
    try:
        figures = json.loads(path.read_text())
        total, others = int(figures["total_bytes"]), int(figures["others_bytes"])
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
    used = min(total, others + own_bytes)
    return DeviceMemory(total, used, total - used, "simulated", f"simulated by {path}")
